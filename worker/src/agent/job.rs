//! Running one assignment on this worker: data, resume point, data-plane ring, training,
//! reports. Runs on its own OS thread because libtorch calls block.

use super::transfer;
use crate::collective::backend::{self, BackendError, Chosen};
use crate::collective::{ring::Ring, AbortHandle, Collective, GradCompression, Solo};
use crate::data::Datasets;
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::ckpt_writer::CheckpointStore;
use crate::train::live_state::{self, LiveSlot, LiveStart};
use crate::train::{self, Observer, TrainerConfig};
use cvdist_common::choices::Dataset;
use cvdist_common::client::Client;
use cvdist_common::proto::{
    job_report, worker_message, Assignment, EpochMetrics, FailureKind, Finished, JobReport, Progress, Resumed,
    WorkerMessage,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::Device;
use tokio::sync::mpsc;
use tracing::{info, info_span, warn};

/// How long ranks wait for each other when forming the data-plane ring.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(60);

/// What a running job shares with the session loop, so an abort can reach it: the
/// training loop polls `stop`, the communicator (and a ring still connecting) is cut by
/// `abort`, and transfers through the coordinator wait on `wake`.
#[derive(Clone, Default)]
pub struct JobControl {
    pub stop: Arc<Mutex<Option<String>>>,
    pub abort: Arc<Mutex<Option<AbortHandle>>>,
    pub done: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
}

impl JobControl {
    pub fn request_stop(&self, reason: &str) {
        if let Ok(mut s) = self.stop.lock() {
            s.get_or_insert_with(|| reason.to_string());
        }
        if let Ok(a) = self.abort.lock() {
            if let Some(h) = a.as_ref() {
                h.abort(reason);
            }
        }
        self.wake.notify_waiters();
    }

    /// The reason given to the first [`JobControl::request_stop`], if any.
    pub fn stop_reason(&self) -> Option<String> {
        self.stop.lock().ok().and_then(|s| s.clone())
    }

    /// Makes `handle` the one an abort fires; fires it at once if the stop came first,
    /// so an abort that arrives while the handle is being set up is not lost.
    pub fn install_abort(&self, handle: AbortHandle) {
        if let Ok(mut slot) = self.abort.lock() {
            *slot = Some(handle.clone());
        }
        if let Some(reason) = self.stop_reason() {
            handle.abort(reason);
        }
    }

    /// Runs `fut` (a transfer through the coordinator) on `runtime`, giving up with
    /// `stopped: REASON` as soon as a stop is requested, instead of when it finishes.
    pub fn block_on_unless_stopped<F: std::future::Future>(
        &self,
        runtime: &tokio::runtime::Handle,
        fut: F,
    ) -> Result<F::Output, String> {
        runtime.block_on(async {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            // Registered before the check, so a stop between the two still wakes us.
            notified.as_mut().enable();
            if let Some(reason) = self.stop_reason() {
                return Err(format!("stopped: {reason}"));
            }
            tokio::select! {
                out = fut => Ok(out),
                _ = notified => Err(format!("stopped: {}", self.stop_reason().unwrap_or_default())),
            }
        })
    }
}

pub struct JobEnv {
    pub device: Device,
    pub data: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// The id the coordinator registered this worker under: names its own scratch folder.
    pub worker_id: String,
    pub listener: std::net::TcpListener,
    pub client: Client,
    pub runtime: tokio::runtime::Handle,
    pub outbox: mpsc::UnboundedSender<WorkerMessage>,
    /// The session that holds this job now (it can change while the job trains, since a
    /// job outlives the session it was assigned on): checkpoint uploads go through it.
    pub link: super::link::SessionLink,
    /// The training state a failed attempt of this worker left, so the next attempt can
    /// continue from memory instead of a checkpoint.
    pub live: LiveSlot,
}

struct ReportingObserver<'a> {
    assignment: &'a Assignment,
    env: &'a JobEnv,
    control: JobControl,
    /// The newest checkpoint the coordinator confirmed it stored, and why the newest
    /// upload failed (cleared by a later success).
    confirmed: Option<String>,
    upload_error: Option<(String, String)>,
}

/// Why an attempt ended on this rank, and whether a restart could help.
struct Failure {
    text: String,
    kind: FailureKind,
}

impl Failure {
    /// Lost peers, network, aborts: the coordinator may restart the group.
    fn retry(text: impl Into<String>) -> Failure {
        Failure { text: text.into(), kind: FailureKind::Retryable }
    }

    /// The same assignment would fail again in the same way.
    fn config(text: impl Into<String>) -> Failure {
        Failure { text: text.into(), kind: FailureKind::Configuration }
    }
}

impl From<train::TrainError> for Failure {
    fn from(e: train::TrainError) -> Failure {
        Failure { kind: e.failure_kind(), text: e.to_string() }
    }
}

impl ReportingObserver<'_> {
    fn send(&self, kind: job_report::Kind) {
        self.send_with(kind, FailureKind::Unspecified);
    }

    fn send_with(&self, kind: job_report::Kind, failure_kind: FailureKind) {
        let report = JobReport {
            job_id: self.assignment.job_id.clone(),
            attempt: self.assignment.attempt,
            rank: self.assignment.rank,
            kind: Some(kind),
            failure_kind: failure_kind as i32,
        };
        let _ = self.env.outbox.send(WorkerMessage { msg: Some(worker_message::Msg::Report(report)) });
    }
}

impl Observer for ReportingObserver<'_> {
    fn progress(&mut self, p: &Progress) {
        self.send(job_report::Kind::Progress(*p));
    }

    fn epoch(&mut self, m: &EpochMetrics) {
        if self.assignment.rank == 0 {
            self.send(job_report::Kind::Epoch(*m));
        }
    }

    /// The upload runs on the checkpoint writer thread, off the training thread, so the
    /// other ranks do not wait at the next all-reduce while rank 0 uploads. A stop cuts it
    /// short.
    fn checkpoint_store(&mut self) -> Option<CheckpointStore> {
        let link = self.env.link.clone();
        let runtime = self.env.runtime.clone();
        let control = self.control.clone();
        let (job_id, attempt) = (self.assignment.job_id.clone(), self.assignment.attempt);
        let epochs = self.assignment.spec.as_ref().map(|s| s.epochs).unwrap_or(0);
        Some(Box::new(move |json: &Path, state: &CheckpointState| {
            let is_final = (state.epoch, state.step) == (epochs, 0);
            super::link::upload_checkpoint(&link, &control, &runtime, &job_id, attempt, json, state, is_final)?;
            // Only what the coordinator holds (this one) or has superseded (anything
            // older) may go; a local copy is the only copy until then.
            let name = state.name();
            if let Some(dir) = json.parent() {
                for old in checkpoint::list(dir) {
                    let older = old.file_stem().is_some_and(|s| s.to_string_lossy().as_ref() < name.as_str());
                    if older {
                        let _ = std::fs::remove_file(old.with_extension("safetensors"));
                        let _ = std::fs::remove_file(&old);
                    }
                }
            }
            Ok(())
        }))
    }

    fn checkpoint_stored(&mut self, name: &str, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                info!(checkpoint = %name, "checkpoint uploaded");
                self.confirmed = Some(name.to_string());
                self.upload_error = None;
            }
            // The job can go on; a restart would resume from an older checkpoint. The local
            // copy stays.
            Err(e) => {
                warn!(checkpoint = %name, error = %e, "checkpoint upload failed");
                self.upload_error = Some((name.to_string(), e.clone()));
            }
        }
    }

    fn should_stop(&mut self) -> Option<String> {
        self.control.stop.lock().ok().and_then(|s| s.clone())
    }
}

/// The message of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs the assignment to completion and reports the outcome to the coordinator.
pub fn run(assignment: Assignment, env: JobEnv, control: JobControl) {
    let span = info_span!("job", job = %assignment.job_id, attempt = assignment.attempt, rank = assignment.rank);
    let _enter = span.enter();
    let observer = ReportingObserver {
        assignment: &assignment,
        env: &env,
        control: control.clone(),
        confirmed: None,
        upload_error: None,
    };
    // A panic anywhere in the attempt (a tch call that unwraps a CUDA out-of-memory error,
    // say) is a failure like any other: reported, so the coordinator restarts the group,
    // instead of a job thread that ends silently while heartbeats go on.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(&assignment, &env, &control)))
        .unwrap_or_else(|p| Err(Failure::retry(format!("the training thread panicked: {}", panic_text(p.as_ref())))));
    match outcome {
        Ok(fin) => {
            info!(test_acc = fin.final_test_acc, "job finished");
            observer.send(job_report::Kind::Finished(fin));
        }
        Err(f) => {
            warn!(error = %f.text, kind = f.kind.as_str_name(), "job attempt ended with an error");
            observer.send_with(job_report::Kind::Failed(f.text), f.kind);
        }
    }
    control.done.store(true, Ordering::SeqCst);
}

/// Agrees on the gradient backend over the freshly formed ring (`collective::backend`):
/// a c10d group (gloo, or NCCL on CUDA) only when every rank confirmed it works, otherwise
/// (`auto`) every rank stays on the ring and the log says why. The chosen communicator
/// carries the job's `--grad-compression` (every rank reads it from the same spec).
fn choose_backend(
    ring: Ring,
    spec: &cvdist_common::proto::JobSpec,
    device: Device,
    addrs: &backend::Addresses<'_>,
    control: &JobControl,
) -> Result<Box<dyn Collective>, Failure> {
    // Creating a communicator waits for the peers; do not start once the attempt is over.
    if let Some(reason) = control.stop_reason() {
        return Err(Failure::retry(format!("stopped: {reason}")));
    }
    let world = ring.world_size();
    let timeout = cvdist_common::spec::collective_timeout(spec);
    // `validate_assignment` checked the spec, so this only fails for a bug there.
    let compression = GradCompression::from_spec(spec).map_err(|e| Failure::config(e.to_string()))?;
    let group = backend::SystemGroup::for_choice(&spec.collective, device);
    let mut comm: Box<dyn Collective> = match backend::choose(ring, &spec.collective, timeout, addrs, group.as_ref()) {
        Ok(Chosen::Group(comm)) => {
            info!(world, backend = %comm.backend(), %compression, "gradients via a c10d process group");
            Box::new(comm)
        }
        Ok(Chosen::Ring { ring, why }) => {
            if let Some(why) = why {
                warn!(%why, "--collective auto: gradients via the ring, not NCCL");
            }
            ring
        }
        // Every rank reaches this verdict from the same vote, and a restart on the same
        // workers would vote the same way: a configuration error, not retried.
        Err(e @ BackendError::Unusable { .. }) => return Err(Failure::config(e.to_string())),
        Err(e) => return Err(Failure::retry(e.to_string())),
    };
    comm.set_grad_compression(compression).map_err(|e| Failure::config(e.to_string()))?;
    if compression != GradCompression::None {
        info!(%compression, "gradient buckets travel as 16-bit values (--grad-compression)");
    }
    Ok(comm)
}

/// Checks every name and address in an assignment with the same functions the
/// coordinator applies to what it receives (`cvdist_common::names`), before any of them
/// becomes a path or a dial target: a job id like `../../x` would otherwise make the cache
/// cleanup delete a directory outside the cache.
pub fn validate_assignment(a: &Assignment) -> Result<(), String> {
    use cvdist_common::names;
    let bad = |e: names::NameError| format!("refusing the assignment: {e}");
    names::check_job_id(&a.job_id).map_err(bad)?;
    if !a.checkpoint.is_empty() {
        names::parse_checkpoint_name(&a.checkpoint).map_err(bad)?;
    }
    for p in &a.peers {
        names::check_worker_id(&p.worker_id).map_err(bad)?;
        names::check_data_addr(&p.data_addr).map_err(bad)?;
    }
    if let Some(spec) = &a.spec {
        cvdist_common::spec::validate(spec).map_err(|e| format!("refusing the assignment: {e}"))?;
    }
    Ok(())
}

fn execute(a: &Assignment, env: &JobEnv, control: &JobControl) -> Result<Finished, Failure> {
    // A coordinator that sends such names would send them again: not worth a restart.
    validate_assignment(a).map_err(Failure::config)?;
    let spec = a.spec.clone().ok_or_else(|| Failure::config("assignment without a job spec"))?;
    let world = a.world_size as usize;
    let rank = a.rank as usize;
    if rank >= world || a.peers.len() != world {
        return Err(Failure::config(format!(
            "malformed assignment: rank {rank} of {world} with {} peers",
            a.peers.len()
        )));
    }
    if spec.threads_per_worker > 0 {
        tch::set_num_threads(spec.threads_per_worker as i32);
    }
    // Per worker: several workers may be given one cache dir (`cvdist local`, or two
    // workers on one host sharing ~/.cache/cvdist), and each deletes its job folder when
    // done; a shared folder would lose another rank's checkpoint being written.
    let job_dir = scratch_dir(&env.cache_dir, &env.worker_id).join("jobs").join(&a.job_id);

    let data_dir = match (&env.data, spec.dataset.parse::<Dataset>()) {
        (_, Ok(Dataset::Synthetic)) => None,
        (Some(d), _) => Some(d.clone()),
        (None, _) => {
            let mut client = env.client.clone();
            let dir = control
                .block_on_unless_stopped(&env.runtime, transfer::fetch_dataset(&mut client, &env.cache_dir))
                .map_err(Failure::retry)?
                .map_err(|e| dataset_fetch_failure(&e))?;
            Some(dir)
        }
    };
    let data = Datasets::for_spec(&spec, data_dir.as_deref()).map_err(train::TrainError::from)?;

    // A recovery with survivors needs no checkpoint: it is fetched only once the group
    // found that no member holds a live state.
    if !a.live {
        // A state kept from an earlier job or attempt can never be used by this one: its
        // memory (a whole model, on the device) goes before this one is built.
        drop(env.live.lock().map(|mut s| s.take()));
    }
    let mut resume = if a.live { None } else { download_resume(a, env, control, &job_dir)? };

    let mut comm: Box<dyn Collective> = if world == 1 {
        Box::new(Solo::new())
    } else {
        let peers: Vec<String> = a.peers.iter().map(|p| p.data_addr.clone()).collect();
        let listener = env.listener.try_clone().map_err(|e| Failure::retry(format!("data-plane listener: {e}")))?;
        // Installed before connecting: waiting for a peer that will never come (it failed
        // to load its data, say) must end at the coordinator's abort, not the timeout.
        let abort = AbortHandle::new();
        control.install_abort(abort.clone());
        let ring =
            Ring::connect_with_abort(rank, world, &peers, listener, &a.session_secret, RENDEZVOUS_TIMEOUT, abort)
                .map_err(|e| Failure::retry(format!("forming the data-plane ring: {e}")))?;
        let addrs = backend::Addresses { peers: &peers, secret: &a.session_secret };
        let comm = choose_backend(ring, &spec, env.device, &addrs, control)?;
        control.install_abort(comm.abort_handle());
        comm
    };
    // An abort that arrived while we were connecting must still take effect.
    if let Some(reason) = control.stop.lock().ok().and_then(|s| s.clone()) {
        return Err(Failure::retry(format!("stopped: {reason}")));
    }
    let live = if a.live { continue_live(a, env, comm.as_mut(), &spec, data.train.len())? } else { None };
    if a.live && live.is_none() {
        resume = download_resume(a, env, control, &job_dir)?;
    }

    let cfg = TrainerConfig {
        spec,
        device: env.device,
        rank,
        world_size: world,
        checkpoint_dir: Some(job_dir.join(format!("attempt-{}", a.attempt))),
        resume,
        progress_interval: Duration::from_secs(2),
        freeze_bn: false,
    };
    let mut observer =
        ReportingObserver { assignment: a, env, control: control.clone(), confirmed: None, upload_error: None };
    let keep = Some((env.live.clone(), a.job_id.clone(), a.attempt));
    let outcome = train::train_from(&cfg, &data, comm.as_mut(), &mut observer, live, keep)?;
    // A clean end lets a device communicator shut down gracefully; otherwise its drop
    // aborts it, which never waits for peers.
    if let Err(e) = comm.finish() {
        warn!(error = %e, "the communicator did not shut down cleanly; aborted instead");
    }
    if let Ok(mut slot) = control.abort.lock() {
        *slot = None;
    }
    let final_test_acc = outcome.history.last().map(|m| m.test_acc).unwrap_or(0.0);
    let final_name = checkpoint::name_for(cfg.spec.epochs, 0);
    // Rank 0 says why the final model is not on the coordinator, if it is not; the
    // coordinator then does not report the job as succeeded.
    let final_checkpoint_error =
        if rank != 0 || a.checkpoint == final_name || observer.confirmed.as_deref() == Some(&final_name) {
            String::new()
        } else if let Some(e) = outcome.final_checkpoint_error {
            format!("rank 0 could not write it: {e}")
        } else if let Some((name, e)) = observer.upload_error.filter(|(n, _)| *n == final_name) {
            format!("uploading {name} failed: {e}")
        } else {
            "rank 0 did not upload it".to_string()
        };
    if rank == 0 && final_checkpoint_error.is_empty() {
        // Local copies are no longer needed once the coordinator holds the final checkpoint.
        let _ = std::fs::remove_dir_all(&job_dir);
    } else {
        // Another rank cannot know whether the final checkpoint arrives, so it keeps any
        // checkpoint it wrote as rank 0 of an earlier attempt; the downloaded copy goes.
        let _ = std::fs::remove_dir_all(job_dir.join("resume"));
        let _ = std::fs::remove_dir(&job_dir);
        if rank == 0 {
            warn!(checkpoint = %final_name, error = %final_checkpoint_error, kept = %job_dir.display(),
                "the final checkpoint is not stored by the coordinator; local checkpoints are kept");
        }
    }
    Ok(Finished { final_test_acc, wall_seconds: outcome.wall_seconds, final_checkpoint_error })
}

/// Downloads the assignment's checkpoint (if it names one) into the job's `resume` folder.
fn download_resume(
    a: &Assignment,
    env: &JobEnv,
    control: &JobControl,
    job_dir: &Path,
) -> Result<Option<PathBuf>, Failure> {
    if a.checkpoint.is_empty() {
        return Ok(None);
    }
    let mut client = env.client.clone();
    let dir = job_dir.join("resume");
    let path = control
        .block_on_unless_stopped(
            &env.runtime,
            transfer::download_checkpoint(&mut client, &a.job_id, &a.checkpoint, &dir),
        )
        .map_err(Failure::retry)?
        .map_err(|e| Failure::retry(format!("downloading checkpoint {}: {e}", a.checkpoint)))?;
    Ok(Some(path))
}

/// A recovery from memory: the members agree over the ring on the furthest live state any
/// of them kept from attempt `a.live_attempt` and all take it; rank 0 tells the
/// coordinator where the group continues. `None`: no member kept one. This worker's own
/// state goes back to its slot if the agreement fails (another recovery may use it).
fn continue_live(
    a: &Assignment,
    env: &JobEnv,
    comm: &mut dyn Collective,
    spec: &cvdist_common::proto::JobSpec,
    train_len: usize,
) -> Result<Option<LiveStart>, Failure> {
    let mut own = live_state::take(&env.live, &a.job_id, a.live_attempt, a.attempt);
    let agreed = live_state::agree(&mut own, spec, env.device, train_len, a.live_max_epoch, comm);
    live_state::put_back(&env.live, own);
    let start = agreed?;
    if a.rank == 0 {
        let batch = spec.batch_size as usize;
        let resumed = match &start {
            Some(s) => {
                let at = s.at.continue_on(a.world_size, train_len, batch);
                Resumed {
                    epoch: at.epoch,
                    step: at.step(batch),
                    samples: at.consumed(train_len, batch),
                    live: true,
                    source_worker: a.peers.get(s.source).map(|p| p.worker_id.clone()).unwrap_or_default(),
                }
            }
            None => Resumed::default(),
        };
        let report = JobReport {
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            rank: a.rank,
            kind: Some(job_report::Kind::Resumed(resumed)),
            failure_kind: FailureKind::Unspecified as i32,
        };
        let _ = env.outbox.send(WorkerMessage { msg: Some(worker_message::Msg::Report(report)) });
    }
    Ok(start)
}

/// This worker's own scratch folder under `cache_dir` (checkpoints, resume downloads):
/// `cache_dir/workers/<worker id>`.
pub fn scratch_dir(cache_dir: &Path, worker_id: &str) -> PathBuf {
    cache_dir.join("workers").join(worker_id)
}

/// A coordinator that has no dataset to serve (or serves a broken one) will answer the same
/// way on every retry; a network failure may not recur.
fn dataset_fetch_failure(e: &transfer::TransferError) -> Failure {
    let text = format!("fetching the dataset from the coordinator: {e}");
    match e {
        transfer::TransferError::Rpc {
            code: tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument, ..
        } => Failure { text, kind: FailureKind::Data },
        _ => Failure::retry(text),
    }
}

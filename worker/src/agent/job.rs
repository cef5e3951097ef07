//! Running one assignment on this worker: data, resume point, data-plane ring, training,
//! reports. Runs on its own OS thread because libtorch calls block.

use super::transfer;
use crate::collective::{nccl, ring::Ring, AbortHandle, Collective, Solo};
use crate::train::checkpoint::{self, CheckpointState};
use crate::train::{self, Datasets, Observer, TrainerConfig};
use cvdist_common::client::Client;
use cvdist_common::proto::{job_report, worker_message, Assignment, EpochMetrics, Finished, JobReport, Progress, WorkerMessage};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::Device;
use tokio::sync::mpsc;
use tracing::{info, info_span, warn};

/// How long ranks wait for each other when forming the data-plane ring.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(60);
/// Local checkpoints kept by rank 0 after upload (older ones are deleted).
const KEEP_LOCAL_CHECKPOINTS: usize = 2;

/// What a running job shares with the session loop, so an abort can reach it.
#[derive(Clone, Default)]
pub struct JobControl {
    pub stop: Arc<Mutex<Option<String>>>,
    pub abort: Arc<Mutex<Option<AbortHandle>>>,
    pub done: Arc<AtomicBool>,
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
    }
}

pub struct JobEnv {
    pub device: Device,
    pub data: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub listener: std::net::TcpListener,
    pub client: Client,
    pub runtime: tokio::runtime::Handle,
    pub outbox: mpsc::UnboundedSender<WorkerMessage>,
    /// This session's key from `Registered`, presented with checkpoint uploads.
    pub session_key: String,
}

struct ReportingObserver<'a> {
    assignment: &'a Assignment,
    env: &'a JobEnv,
    control: JobControl,
}

impl ReportingObserver<'_> {
    fn send(&self, kind: job_report::Kind) {
        let report = JobReport {
            job_id: self.assignment.job_id.clone(),
            attempt: self.assignment.attempt,
            rank: self.assignment.rank,
            kind: Some(kind),
        };
        let _ = self.env.outbox.send(WorkerMessage { msg: Some(worker_message::Msg::Report(report)) });
    }
}

impl Observer for ReportingObserver<'_> {
    fn progress(&mut self, p: &Progress) {
        self.send(job_report::Kind::Progress(p.clone()));
    }

    fn epoch(&mut self, m: &EpochMetrics) {
        if self.assignment.rank == 0 {
            self.send(job_report::Kind::Epoch(m.clone()));
        }
    }

    fn checkpoint(&mut self, json: &Path, state: &CheckpointState) {
        let mut client = self.env.client.clone();
        let a = self.assignment;
        let result = self.env.runtime.block_on(transfer::upload_checkpoint(&mut client, &a.job_id, a.attempt, &self.env.session_key, json, state));
        match result {
            Ok(()) => {
                info!(checkpoint = %state.name(), "checkpoint uploaded");
                if let Some(dir) = json.parent() {
                    for old in checkpoint::list(dir).into_iter().skip(KEEP_LOCAL_CHECKPOINTS) {
                        let _ = std::fs::remove_file(old.with_extension("safetensors"));
                        let _ = std::fs::remove_file(&old);
                    }
                }
            }
            // The job can go on; a restart would resume from an older checkpoint.
            Err(e) => warn!(checkpoint = %state.name(), error = %e, "checkpoint upload failed"),
        }
    }

    fn should_stop(&mut self) -> Option<String> {
        self.control.stop.lock().ok().and_then(|s| s.clone())
    }
}

/// Runs the assignment to completion and reports the outcome to the coordinator.
pub fn run(assignment: Assignment, env: JobEnv, control: JobControl) {
    let span = info_span!("job", job = %assignment.job_id, attempt = assignment.attempt, rank = assignment.rank);
    let _enter = span.enter();
    let observer = ReportingObserver { assignment: &assignment, env: &env, control: control.clone() };
    let outcome = execute(&assignment, &env, &control);
    match outcome {
        Ok(fin) => {
            info!(test_acc = fin.final_test_acc, "job finished");
            observer.send(job_report::Kind::Finished(fin));
        }
        Err(e) => {
            warn!(error = %e, "job attempt ended with an error");
            observer.send(job_report::Kind::Failed(e));
        }
    }
    control.done.store(true, Ordering::SeqCst);
}

/// Agrees on the gradient backend over the freshly formed ring: NCCL only when every rank
/// can use it (all on CUDA with libnccl loadable), otherwise the ring itself. Rank 0 then
/// creates the NCCL id and the ring carries it to the others.
fn choose_backend(mut ring: Ring, wanted: &str, device: Device) -> Result<Box<dyn Collective>, String> {
    let world = ring.world_size();
    let local_ok = device.is_cuda() && nccl::available().is_ok();
    let mut votes = [if local_ok { 1.0f32 } else { 0.0 }];
    ring.all_reduce_sum(&mut votes).map_err(|e| format!("agreeing on a backend: {e}"))?;
    let all_ok = votes[0] as usize == world;
    match (wanted, all_ok) {
        ("ring", _) | ("auto", false) => return Ok(Box::new(ring)),
        ("nccl", false) => {
            let why = nccl::available().err().map(|e| e.to_string()).unwrap_or_else(|| "not every rank is on CUDA".into());
            return Err(format!("--collective nccl requested but unusable on some rank: {why}"));
        }
        _ => {}
    }
    let mut id = [0f32; nccl::UNIQUE_ID_BYTES];
    if ring.rank() == 0 {
        let raw = nccl::unique_id().map_err(|e| e.to_string())?;
        for (dst, b) in id.iter_mut().zip(raw) {
            *dst = b as f32;
        }
    }
    ring.broadcast(&mut id, 0).map_err(|e| format!("sharing the NCCL id: {e}"))?;
    let bytes: [u8; nccl::UNIQUE_ID_BYTES] = std::array::from_fn(|i| id[i] as u8);
    let comm = nccl::NcclComm::new(ring.rank(), world, bytes).map_err(|e| format!("NCCL init: {e}"))?;
    info!(world, "gradients via NCCL");
    Ok(Box::new(comm))
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

fn execute(a: &Assignment, env: &JobEnv, control: &JobControl) -> Result<Finished, String> {
    validate_assignment(a)?;
    let spec = a.spec.clone().ok_or("assignment without a job spec")?;
    let world = a.world_size as usize;
    let rank = a.rank as usize;
    if rank >= world || a.peers.len() != world {
        return Err(format!("malformed assignment: rank {rank} of {world} with {} peers", a.peers.len()));
    }
    if spec.threads_per_worker > 0 {
        tch::set_num_threads(spec.threads_per_worker as i32);
    }
    let job_dir = env.cache_dir.join("jobs").join(&a.job_id);

    let data_dir = match (&env.data, spec.dataset.as_str()) {
        (_, "synthetic") => None,
        (Some(d), _) => Some(d.clone()),
        (None, _) => {
            let mut client = env.client.clone();
            let dir = env
                .runtime
                .block_on(transfer::fetch_dataset(&mut client, &env.cache_dir))
                .map_err(|e| format!("fetching the dataset from the coordinator: {e}"))?;
            Some(dir)
        }
    };
    let data = Datasets::for_spec(&spec, data_dir.as_deref()).map_err(|e| e.to_string())?;

    let resume = if a.checkpoint.is_empty() {
        None
    } else {
        let mut client = env.client.clone();
        let dir = job_dir.join("resume");
        let path = env
            .runtime
            .block_on(transfer::download_checkpoint(&mut client, &a.job_id, &a.checkpoint, &dir))
            .map_err(|e| format!("downloading checkpoint {}: {e}", a.checkpoint))?;
        Some(path)
    };

    let mut comm: Box<dyn Collective> = if world == 1 {
        Box::new(Solo::new())
    } else {
        let peers: Vec<String> = a.peers.iter().map(|p| p.data_addr.clone()).collect();
        let listener = env.listener.try_clone().map_err(|e| format!("data-plane listener: {e}"))?;
        let ring = Ring::connect(rank, world, &peers, listener, &a.session_secret, RENDEZVOUS_TIMEOUT)
            .map_err(|e| format!("forming the data-plane ring: {e}"))?;
        if let Ok(mut slot) = control.abort.lock() {
            *slot = Some(ring.abort_handle());
        }
        let comm = choose_backend(ring, &spec.collective, env.device)?;
        if let Ok(mut slot) = control.abort.lock() {
            *slot = Some(comm.abort_handle());
        }
        comm
    };
    // An abort that arrived while we were connecting must still take effect.
    if let Some(reason) = control.stop.lock().ok().and_then(|s| s.clone()) {
        return Err(format!("stopped: {reason}"));
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
    let mut observer = ReportingObserver { assignment: a, env, control: control.clone() };
    let outcome = train::train(&cfg, &data, comm.as_mut(), &mut observer).map_err(|e| e.to_string())?;
    if let Ok(mut slot) = control.abort.lock() {
        *slot = None;
    }
    let final_test_acc = outcome.history.last().map(|m| m.test_acc).unwrap_or(0.0);
    // Local copies are no longer needed once the coordinator holds the checkpoints.
    let _ = std::fs::remove_dir_all(&job_dir);
    Ok(Finished { final_test_acc, wall_seconds: outcome.wall_seconds })
}

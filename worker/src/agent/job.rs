//! Running one assignment on this worker: data, resume point, data-plane ring, training,
//! reports. Runs on its own OS thread because libtorch calls block.

use super::failure::Failure;
use super::observer::ReportingObserver;
use super::resume::{continue_live, download_resume};
use super::transfer;
use crate::collective::backend::{self, BackendError, Chosen};
use crate::collective::{ring::Ring, AbortHandle, Collective, GradCompression, Solo};
use crate::data::Datasets;
use crate::train::checkpoint;
use crate::train::live_state::LiveStart;
use crate::train::{self, TrainOutcome, TrainerConfig};
use cvdist_common::choices::Dataset;
use cvdist_common::proto::{job_report, Assignment, Finished, JobSpec};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tch::Device;
use tracing::{info, info_span, warn};

use super::control::JobControl;
use super::env::JobEnv;

/// How long ranks wait for each other when forming the data-plane ring.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(60);

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
    let observer = ReportingObserver::new(&assignment, &env, control.clone());
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
    spec: &JobSpec,
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
    let spec = checked_spec(a)?;
    if spec.threads_per_worker > 0 {
        tch::set_num_threads(spec.threads_per_worker as i32);
    }
    // Per worker: several workers may be given one cache dir (`cvdist local`, or two
    // workers on one host sharing ~/.cache/cvdist), and each deletes its job folder when
    // done; a shared folder would lose another rank's checkpoint being written.
    let job_dir = scratch_dir(&env.cache_dir, &env.worker_id).join("jobs").join(&a.job_id);
    let data = prepare_data(&spec, env, control)?;

    // A recovery with survivors needs no checkpoint: it is fetched only once the group
    // found that no member holds a live state.
    if !a.live {
        // A state kept from an earlier job or attempt can never be used by this one: its
        // memory (a whole model, on the device) goes before this one is built.
        drop(env.live.lock().map(|mut s| s.take()));
    }
    let mut resume = if a.live { None } else { download_resume(a, env, control, &job_dir)? };
    let mut comm = connect_group(a, &spec, env, control)?;
    let live = if a.live { continue_live(a, env, comm.as_mut(), &spec, data.train.len())? } else { None };
    if a.live && live.is_none() {
        resume = download_resume(a, env, control, &job_dir)?;
    }

    let cfg = TrainerConfig {
        spec,
        device: env.device,
        rank: a.rank as usize,
        world_size: a.world_size as usize,
        checkpoint_dir: Some(job_dir.join(format!("attempt-{}", a.attempt))),
        resume,
        progress_interval: Duration::from_secs(2),
        freeze_bn: false,
    };
    let (outcome, observer) = train_to_end(a, env, control, &cfg, &data, comm.as_mut(), live)?;
    let final_test_acc = outcome.history.last().map(|m| m.test_acc).unwrap_or(0.0);
    let final_name = checkpoint::name_for(cfg.spec.epochs, 0);
    // Rank 0 says why the final model is not on the coordinator, if it is not; the
    // coordinator then does not report the job as succeeded.
    let final_checkpoint = (a.rank == 0).then(|| {
        FinalCheckpoint::judge(
            &a.checkpoint,
            &final_name,
            observer.confirmed.as_deref(),
            outcome.final_checkpoint_error,
            observer.upload_error,
        )
    });
    clean_up(&job_dir, final_checkpoint.as_ref(), &final_name);
    let final_checkpoint_error = final_checkpoint.as_ref().map(FinalCheckpoint::error).unwrap_or_default();
    Ok(Finished { final_test_acc, wall_seconds: outcome.wall_seconds, final_checkpoint_error })
}

/// The assignment's job spec, once the assignment passed [`validate_assignment`] and
/// names a rank of its world with one peer per rank.
fn checked_spec(a: &Assignment) -> Result<JobSpec, Failure> {
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
    Ok(spec)
}

/// The job's data: synthetic, the worker's own `--data`, or fetched from the coordinator
/// into the cache.
fn prepare_data(spec: &JobSpec, env: &JobEnv, control: &JobControl) -> Result<Datasets, Failure> {
    let data_dir = match (&env.data, spec.dataset.parse::<Dataset>()) {
        (_, Ok(Dataset::Synthetic)) => None,
        (Some(d), _) => Some(d.clone()),
        (None, _) => {
            let mut client = env.client.clone();
            let dir = control
                .block_on_unless_stopped(&env.runtime, transfer::fetch_dataset(&mut client, &env.cache_dir))
                .map_err(Failure::retry)?
                .map_err(|e| Failure::dataset_fetch(&e))?;
            Some(dir)
        }
    };
    Ok(Datasets::for_spec(spec, data_dir.as_deref()).map_err(train::TrainError::from)?)
}

/// The attempt's communicator: none to form for a single rank; otherwise the data-plane
/// ring, then the gradient backend agreed over it. Fails if the job was stopped meanwhile.
fn connect_group(
    a: &Assignment,
    spec: &JobSpec,
    env: &JobEnv,
    control: &JobControl,
) -> Result<Box<dyn Collective>, Failure> {
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let comm: Box<dyn Collective> = if world == 1 {
        Box::new(Solo::new())
    } else {
        let peers: Vec<String> = a.peers.iter().map(|p| p.data_addr.clone()).collect();
        let listener = env.listener.try_clone().map_err(|e| Failure::retry(format!("data-plane listener: {e}")))?;
        // Installed before connecting: waiting for a peer that will never come (it failed
        // to load its data, say) must end at the coordinator's abort, not the timeout.
        let abort = AbortHandle::new();
        control.install_abort(abort.clone());
        info!(world, "forming the data-plane ring");
        let ring =
            Ring::connect_with_abort(rank, world, &peers, listener, &a.session_secret, RENDEZVOUS_TIMEOUT, abort)
                .map_err(|e| Failure::retry(format!("forming the data-plane ring: {e}")))?;
        let addrs = backend::Addresses { peers: &peers, secret: &a.session_secret };
        let comm = choose_backend(ring, spec, env.device, &addrs, control)?;
        control.install_abort(comm.abort_handle());
        comm
    };
    // An abort that arrived while we were connecting must still take effect.
    if let Some(reason) = control.stop.lock().ok().and_then(|s| s.clone()) {
        return Err(Failure::retry(format!("stopped: {reason}")));
    }
    Ok(comm)
}

/// Trains to the last epoch over `comm`, reporting to the coordinator and keeping the
/// state in memory for a later attempt; then shuts `comm` down. Returns the outcome and
/// the observer, which knows which checkpoints the coordinator stored.
fn train_to_end<'a>(
    a: &'a Assignment,
    env: &'a JobEnv,
    control: &JobControl,
    cfg: &TrainerConfig,
    data: &Datasets,
    comm: &mut dyn Collective,
    live: Option<LiveStart>,
) -> Result<(TrainOutcome, ReportingObserver<'a>), Failure> {
    let mut observer = ReportingObserver::new(a, env, control.clone());
    let keep = Some((env.live.clone(), a.job_id.clone(), a.attempt));
    let outcome = train::train_from(cfg, data, comm, &mut observer, live, keep)?;
    // A clean end lets a device communicator shut down gracefully; otherwise its drop
    // aborts it, which never waits for peers.
    if let Err(e) = comm.finish() {
        warn!(error = %e, "the communicator did not shut down cleanly; aborted instead");
    }
    if let Ok(mut slot) = control.abort.lock() {
        *slot = None;
    }
    Ok((outcome, observer))
}

/// What became of the final checkpoint, as rank 0 sees it at the end of the job.
#[derive(Debug, PartialEq)]
enum FinalCheckpoint {
    /// The coordinator holds it: it confirmed the upload, or it is the checkpoint this
    /// attempt resumed from.
    Stored,
    /// The trainer could not write it.
    WriteFailed(String),
    /// Its upload failed.
    UploadFailed { name: String, error: String },
    /// Written, but no upload of it was confirmed or refused.
    NotUploaded,
}

impl FinalCheckpoint {
    /// The verdict for `final_name`, given the checkpoint the attempt resumed from, the
    /// newest upload the coordinator `confirmed`, why the trainer could not write it and
    /// the newest failed upload (name, error).
    fn judge(
        resumed_from: &str,
        final_name: &str,
        confirmed: Option<&str>,
        write_error: Option<String>,
        upload_error: Option<(String, String)>,
    ) -> FinalCheckpoint {
        if resumed_from == final_name || confirmed == Some(final_name) {
            FinalCheckpoint::Stored
        } else if let Some(e) = write_error {
            FinalCheckpoint::WriteFailed(e)
        } else if let Some((name, error)) = upload_error.filter(|(n, _)| n == final_name) {
            FinalCheckpoint::UploadFailed { name, error }
        } else {
            FinalCheckpoint::NotUploaded
        }
    }

    /// Why the coordinator does not hold it (`Finished.final_checkpoint_error`); empty
    /// when it does.
    fn error(&self) -> String {
        match self {
            FinalCheckpoint::Stored => String::new(),
            FinalCheckpoint::WriteFailed(e) => format!("rank 0 could not write it: {e}"),
            FinalCheckpoint::UploadFailed { name, error } => format!("uploading {name} failed: {error}"),
            FinalCheckpoint::NotUploaded => "rank 0 did not upload it".to_string(),
        }
    }
}

/// Removes what the job left in `job_dir`: everything once rank 0 knows the coordinator
/// holds the final checkpoint (`final_checkpoint`, `None` on other ranks), otherwise only
/// the downloaded resume checkpoint.
fn clean_up(job_dir: &Path, final_checkpoint: Option<&FinalCheckpoint>, final_name: &str) {
    if final_checkpoint == Some(&FinalCheckpoint::Stored) {
        // Local copies are no longer needed once the coordinator holds the final checkpoint.
        let _ = std::fs::remove_dir_all(job_dir);
    } else {
        // Another rank cannot know whether the final checkpoint arrives, so it keeps any
        // checkpoint it wrote as rank 0 of an earlier attempt; the downloaded copy goes.
        let _ = std::fs::remove_dir_all(job_dir.join("resume"));
        let _ = std::fs::remove_dir(job_dir);
        if let Some(f) = final_checkpoint {
            warn!(checkpoint = %final_name, error = %f.error(), kept = %job_dir.display(),
                "the final checkpoint is not stored by the coordinator; local checkpoints are kept");
        }
    }
}

/// This worker's own scratch folder under `cache_dir` (checkpoints, resume downloads):
/// `cache_dir/workers/<worker id>`.
pub fn scratch_dir(cache_dir: &Path, worker_id: &str) -> PathBuf {
    cache_dir.join("workers").join(worker_id)
}

#[cfg(test)]
mod tests {
    use super::FinalCheckpoint;

    const FINAL: &str = "ckpt-e0003-s000000";

    fn judge(
        resumed_from: &str,
        confirmed: Option<&str>,
        write: Option<&str>,
        upload: Option<(&str, &str)>,
    ) -> FinalCheckpoint {
        FinalCheckpoint::judge(
            resumed_from,
            FINAL,
            confirmed,
            write.map(str::to_string),
            upload.map(|(n, e)| (n.to_string(), e.to_string())),
        )
    }

    #[test]
    fn the_final_checkpoint_is_stored_once_confirmed_or_resumed_from() {
        assert_eq!(judge("", Some(FINAL), Some("disk full"), Some((FINAL, "refused"))), FinalCheckpoint::Stored);
        assert_eq!(judge(FINAL, None, None, None), FinalCheckpoint::Stored);
        assert_eq!(FinalCheckpoint::Stored.error(), "");
    }

    #[test]
    fn otherwise_a_write_failure_explains_it_before_an_upload_failure() {
        let f = judge("", Some("ckpt-e0002-s000000"), Some("disk full"), Some((FINAL, "refused")));
        assert_eq!(f.error(), "rank 0 could not write it: disk full");
        let f = judge("", None, None, Some((FINAL, "refused")));
        assert_eq!(f.error(), format!("uploading {FINAL} failed: refused"));
    }

    #[test]
    fn an_older_checkpoint_s_upload_failure_does_not_explain_the_final_one() {
        let f = judge("", None, None, Some(("ckpt-e0002-s000000", "refused")));
        assert_eq!(f, FinalCheckpoint::NotUploaded);
        assert_eq!(f.error(), "rank 0 did not upload it");
    }
}

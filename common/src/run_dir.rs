//! Layout of a run directory, the place users look for results:
//!
//! ```text
//! RUN/job.json          the job spec
//! RUN/metrics.jsonl     one EpochMetrics object per line, in order
//! RUN/summary.json      final and best accuracy, wall time, outcome
//! RUN/events.out.tfevents.0.cvdist   the metrics as TensorBoard scalars (crate::tensorboard)
//! RUN/checkpoints/      ckpt-eEEEE-sSSSSSS.safetensors + .json (see worker checkpoint)
//! ```
//!
//! Both the coordinator (per job under its state dir) and `cvdist local --out` write it.

use crate::proto::{EpochMetrics, JobSpec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const JOB_FILE: &str = "job.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
pub const CHECKPOINT_DIR: &str = "checkpoints";
pub const EVENTS_FILE: &str = crate::tensorboard::RUN_EVENTS_FILE;

/// `summary.json`. Non-finite numbers follow [`crate::nonfinite`]; fields added later
/// default when absent, so older summaries stay readable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct Summary {
    pub job_id: String,
    pub model: String,
    /// "succeeded", "failed" or "cancelled".
    pub state: String,
    /// Why the run ended as it did, in one word a script can test (see [`outcome`]): for a
    /// failed run, e.g. "diverged" or "final_checkpoint_missing"; the same as `state`
    /// otherwise. Empty in summaries written before this field existed. `message` says the
    /// same for people.
    pub outcome: String,
    pub message: String,
    pub epochs_completed: u32,
    pub world_size: u32,
    pub restarts: u32,
    #[serde(with = "crate::nonfinite")]
    pub final_test_acc: f64,
    #[serde(with = "crate::nonfinite")]
    pub best_test_acc: f64,
    pub best_epoch: u32,
    #[serde(with = "crate::nonfinite")]
    pub wall_seconds: f64,
    #[serde(with = "crate::nonfinite")]
    pub mean_epoch_seconds: f64,
    /// What each recovery of the run cost, oldest first (empty when none happened).
    pub recoveries: Vec<Recovery>,
}

/// One entry of [`Summary::recoveries`]: a failed attempt re-formed from the newest stored
/// checkpoint (from `JobInfo.recoveries`, converted in `crate::convert`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct Recovery {
    /// The attempt that failed (0 for the first).
    pub attempt: u32,
    /// Why it failed, as the job log says it (e.g. "worker w1 lost (session closed)").
    pub cause: String,
    /// Seconds from the coordinator learning of the failure to the new group's first
    /// progress report past its start position; `None` (null) when the job ended or failed
    /// again before that. Rank 0 reports progress at an interval (2 s for `cvdist worker`),
    /// so this is an upper bound by up to that interval.
    pub downtime_seconds: Option<f64>,
    /// Steps of the failed group between the checkpoint the new group resumed from and the
    /// newest position the failed group reported (a lower bound when reports lag). 0 when
    /// the failure came right after a stored checkpoint.
    pub steps_replayed: u64,
    pub old_world_size: u32,
    /// 0 when no new group started (the job ended while recovering).
    pub new_world_size: u32,
    /// The checkpoint the new group loaded; empty when it started from scratch.
    pub resumed_from: String,
}

/// Values of [`Summary::outcome`] (and `JobInfo.outcome`) beyond the state names.
pub mod outcome {
    /// The loss became NaN or infinite; rerunning from the same state would repeat it.
    pub const DIVERGED: &str = "diverged";
    /// The job asks for something the workers cannot do (e.g. NCCL without CUDA).
    pub const CONFIGURATION: &str = "configuration";
    /// The training or test data cannot be read or is invalid.
    pub const DATA: &str = "data";
    /// Any other failure (lost workers beyond the restart budget, rendezvous timeout, ...).
    pub const FAILED: &str = "failed";
    /// The run trained to its end but the checkpoint after the last epoch was not stored
    /// (disk full, upload refused): its final model is missing, so it is not a success.
    pub const FINAL_CHECKPOINT_MISSING: &str = "final_checkpoint_missing";

    /// The outcome of a run that ended with a failure of `kind`.
    pub fn of_failure(kind: crate::proto::FailureKind) -> &'static str {
        use crate::proto::FailureKind;
        match kind {
            FailureKind::Diverged => DIVERGED,
            FailureKind::Configuration => CONFIGURATION,
            FailureKind::Data => DATA,
            FailureKind::Retryable | FailureKind::Unspecified => FAILED,
        }
    }

    /// Whether a failure of `kind` would repeat identically if the group were restarted.
    pub fn is_permanent(kind: crate::proto::FailureKind) -> bool {
        of_failure(kind) != FAILED
    }
}

impl Summary {
    /// Builds the summary from the metrics history.
    pub fn from_history(history: &[EpochMetrics]) -> Summary {
        let mut s = Summary::default();
        if let Some(last) = history.last() {
            s.final_test_acc = last.test_acc;
            s.epochs_completed = last.epoch + 1;
            s.world_size = last.world_size;
        }
        if let Some(best) = history.iter().max_by(|a, b| a.test_acc.total_cmp(&b.test_acc)) {
            s.best_test_acc = best.test_acc;
            s.best_epoch = best.epoch;
        }
        if !history.is_empty() {
            s.mean_epoch_seconds = history.iter().map(|m| m.seconds).sum::<f64>() / history.len() as f64;
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} line {line}: {source}")]
    Parse { path: PathBuf, line: usize, source: serde_json::Error },
}

pub fn write_job(dir: &Path, spec: &JobSpec) -> Result<(), RunDirError> {
    let path = dir.join(JOB_FILE);
    let text = serde_json::to_vec_pretty(spec).expect("JobSpec serialises");
    crate::atomic_file::write(&path, &text).map_err(|source| RunDirError::Write { path, source })
}

pub fn write_summary(dir: &Path, summary: &Summary) -> Result<(), RunDirError> {
    let path = dir.join(SUMMARY_FILE);
    let text = serde_json::to_vec_pretty(summary).expect("Summary serialises");
    crate::atomic_file::write(&path, &text).map_err(|source| RunDirError::Write { path, source })
}

/// Rewrites metrics.jsonl from the full history (atomic, so a reader never sees half a line),
/// and the TensorBoard events file with the same epochs
/// ([`crate::tensorboard::write_run_events`]), so `tensorboard --logdir` over run directories
/// shows every run.
pub fn write_metrics(dir: &Path, history: &[EpochMetrics]) -> Result<(), RunDirError> {
    let path = dir.join(METRICS_FILE);
    let mut text = Vec::new();
    for m in history {
        serde_json::to_writer(&mut text, m).expect("EpochMetrics serialises");
        text.push(b'\n');
    }
    crate::atomic_file::write(&path, &text).map_err(|source| RunDirError::Write { path, source })?;
    crate::tensorboard::write_run_events(dir, history)
        .map_err(|source| RunDirError::Write { path: dir.join(EVENTS_FILE), source })
}

pub fn read_metrics(dir: &Path) -> Result<Vec<EpochMetrics>, RunDirError> {
    let path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| RunDirError::Read { path: path.clone(), source })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| RunDirError::Parse { path: path.clone(), line: i + 1, source })
        })
        .collect()
}

pub fn read_summary(dir: &Path) -> Result<Summary, RunDirError> {
    let path = dir.join(SUMMARY_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| RunDirError::Read { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| RunDirError::Parse { path, line: 1, source })
}

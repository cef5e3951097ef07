//! Why a rank's training ended early, and whether running it again could end differently.

use super::checkpoint;
use super::sync;
use crate::collective::CollectiveError;
use cvdist_common::proto::FailureKind;

/// Errors of a rank's training; [`TrainError::failure_kind`] classifies them for the
/// coordinator's restart decision.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("data: {0}")]
    Data(String),
    #[error("model: {0}")]
    Model(String),
    #[error("collective: {0}")]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("training diverged at epoch {epoch} step {step}: {what} is {loss}")]
    Diverged { epoch: u32, step: u64, what: &'static str, loss: f64 },
    #[error(
        "training diverged at epoch {epoch} step {step}: the fp16 loss scaler skipped {skipped} steps in a row \
         from there (gradients non-finite at every loss scale down to {scale:e})"
    )]
    ScalerExhausted { epoch: u32, step: u64, skipped: u32, scale: f64 },
    #[error("stopped: {0}")]
    Stopped(String),
}

impl From<crate::data::DataError> for TrainError {
    fn from(e: crate::data::DataError) -> TrainError {
        TrainError::Data(e.to_string())
    }
}

impl From<sync::SyncError> for TrainError {
    fn from(e: sync::SyncError) -> TrainError {
        match e {
            sync::SyncError::Collective(e) => TrainError::Collective(e),
            sync::SyncError::Torch(e) => TrainError::Torch(e),
        }
    }
}

impl TrainError {
    /// Whether running the same attempt again could end differently; the coordinator only
    /// restarts a group for [`FailureKind::Retryable`] failures.
    pub fn failure_kind(&self) -> FailureKind {
        match self {
            // Every step is a deterministic function of the checkpoint it started from
            // (docs/ARCHITECTURE.md, Determinism): a rerun diverges at the same step.
            TrainError::Diverged { .. } | TrainError::ScalerExhausted { .. } => FailureKind::Diverged,
            TrainError::Data(_) => FailureKind::Data,
            // The model named by the spec cannot be built by this worker.
            TrainError::Model(_) => FailureKind::Configuration,
            TrainError::Collective(CollectiveError::NcclUnavailable(_) | CollectiveError::Config(_)) => {
                FailureKind::Configuration
            }
            // A checkpoint written for another model or shape stays wrong on every retry.
            TrainError::Checkpoint(checkpoint::CheckpointError::Mismatch { .. }) => FailureKind::Configuration,
            // Lost peers, timeouts, aborts, I/O and libtorch errors (e.g. out of memory
            // because of another process) may not recur.
            TrainError::Collective(_) | TrainError::Checkpoint(_) | TrainError::Torch(_) | TrainError::Stopped(_) => {
                FailureKind::Retryable
            }
        }
    }
}

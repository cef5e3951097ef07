//! What a rank's training reports as it goes (progress, epochs, checkpoints) and the
//! hooks a caller gets into the loop (stop requests, audits, fault injection).

use super::checkpoint::CheckpointState;
use super::ckpt_writer::CheckpointStore;
use cvdist_common::proto::{EpochMetrics, Progress};
use std::path::Path;

/// Receives what the loop produces. Every method has a no-op default.
pub trait Observer {
    fn progress(&mut self, _p: &Progress) {}
    fn epoch(&mut self, _m: &EpochMetrics) {}
    /// Called on rank 0 (on the training thread) once a checkpoint is durably written; the
    /// write runs in the background, so this comes at a later step, the next checkpoint
    /// or the end of training.
    fn checkpoint(&mut self, _json: &Path, _state: &CheckpointState) {}
    /// Where written checkpoints go next (an upload): the function runs on the checkpoint
    /// writer thread, after the write. Asked on rank 0 for every checkpoint.
    fn checkpoint_store(&mut self) -> Option<CheckpointStore> {
        None
    }
    /// The store function's result for checkpoint `name`, on the training thread, after
    /// [`Observer::checkpoint`] for it.
    fn checkpoint_stored(&mut self, _name: &str, _result: &Result<(), String>) {}
    /// Polled every step; `Some(reason)` ends training with [`TrainError::Stopped`].
    fn should_stop(&mut self) -> Option<String> {
        None
    }
    /// The dataset indices of every batch this rank trains on, for sample-level audits.
    fn batch_indices(&mut self, _epoch: u32, _step: u64, _indices: &[usize]) {}
    /// Fault injection for tests: `true` makes this rank's loss at (`epoch`, `step`) NaN,
    /// as a diverged run's would be.
    fn poison_loss(&mut self, _epoch: u32, _step: u64) -> bool {
        false
    }
}

pub struct NoObserver;
impl Observer for NoObserver {}

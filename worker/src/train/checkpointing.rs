//! Checkpoints taken during training: every rank joins the statistics average and the
//! gather of the partial-epoch sums, rank 0 snapshots and hands the write to the
//! background writer, and a finished write is reported to the observer.

use super::checkpoint::{self, CheckpointState};
use super::ckpt_writer::{BackgroundWriter, Done};
use super::engine::Engine;
use super::error::TrainError;
use super::exact_gather;
use super::observer::Observer;
use super::scaler::GradScaler;
use super::sync;
use super::trainer::TrainerConfig;
use crate::collective::Collective;
use cvdist_common::epoch_sums::EpochSums;
use tracing::warn;

/// Reports a finished background checkpoint to `observer`; a failure of the final one
/// (`final_name`) is kept in `final_error` (the run trained to its end but its final model
/// is not on disk).
pub(super) fn deliver(done: Done, observer: &mut dyn Observer, final_name: &str, final_error: &mut Option<String>) {
    match done.written {
        Ok((json, state)) => {
            observer.checkpoint(&json, &state);
            if let Some(result) = &done.stored {
                observer.checkpoint_stored(&done.name, result);
            }
        }
        // A failed checkpoint (disk full, say) must not kill a healthy run: the previous
        // checkpoint is still intact because writes are atomic.
        Err(e) => {
            warn!(checkpoint = %done.name, error = %e, "checkpoint failed; training continues with the previous checkpoint kept");
            if done.name == final_name {
                *final_error = Some(e.to_string());
            }
        }
    }
}

/// Takes a checkpoint at (`epoch`, `step`) with this rank's partial-epoch sums `partial`;
/// every rank calls it at
/// the same points. Rank 0 snapshots to host memory and hands the write to `writer`
/// (waiting for the previous checkpoint if that is still in flight, whose outcome it
/// returns).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_checkpoint(
    cfg: &TrainerConfig,
    engine: &mut Engine,
    comm: &mut dyn Collective,
    observer: &mut dyn Observer,
    writer: &mut BackgroundWriter,
    epoch: u32,
    step: u64,
    partial: EpochSums,
) -> Result<Option<Done>, TrainError> {
    let Some(dir) = &cfg.checkpoint_dir else { return Ok(None) };
    // All ranks take part so the saved statistics are the same ones every rank continues with.
    sync::average_running_stats(&engine.buffers, comm)?;
    // Mid-epoch, every rank's own sums go into the checkpoint: rank 0's alone, used by every
    // rank after a restart, would misreport the resumed epoch's loss and accuracy.
    let rank_partials: Vec<EpochSums> = if step == 0 {
        Vec::new()
    } else {
        exact_gather::gather_f64(&partial.to_array(), comm)?
            .into_iter()
            .map(|v| EpochSums::from_array(std::array::from_fn(|k| v.get(k).copied().unwrap_or(0.0))))
            .collect()
    };
    if cfg.rank != 0 {
        return Ok(None);
    }
    let mut state = CheckpointState::new(&cfg.spec.model, epoch, step, cfg.spec.seed, cfg.world_size as u32);
    state.partial = EpochSums { allreduce_seconds: 0.0, ..EpochSums::total(&rank_partials, &partial) };
    state.rank_partials = rank_partials;
    state.grad_scaler = engine.scaler.as_ref().map(GradScaler::state);
    state.loss_scale = state.grad_scaler.map_or(1.0, |s| s.scale);
    let snap = checkpoint::snapshot(&engine.variables(), &engine.sgd.momentum_buffers());
    let name = state.name();
    match writer.submit(dir, state, snap, observer.checkpoint_store()) {
        Ok(previous) => Ok(previous),
        // No thread for the writer: report it as this checkpoint's failure, like a full disk.
        Err(e) => Ok(Some(Done { name, written: Err(e), stored: None })),
    }
}

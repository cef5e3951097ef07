//! Where a run starts when no member holds a live state: the checkpoint `--resume` names
//! (weights, momentum, loss scale, this rank's partial-epoch sums), or rank 0's initial
//! weights broadcast to every rank.

use super::checkpoint;
use super::engine::Engine;
use super::error::TrainError;
use super::scaler::{GradScaler, ScalerState};
use super::sync;
use super::trainer::TrainerConfig;
use crate::collective::Collective;
use cvdist_common::epoch_sums::EpochSums;
use tracing::{info, warn};

/// Restores `engine` from `cfg.resume`'s checkpoint, or gives every rank rank 0's initial
/// weights. Returns the epoch and step to start at and this rank's sums of the partially
/// trained epoch.
pub(super) fn start_engine(
    cfg: &TrainerConfig,
    engine: &mut Engine,
    comm: &mut dyn Collective,
) -> Result<(u32, u64, EpochSums), TrainError> {
    let (mut start_epoch, mut start_step, mut partial) = (0u32, 0u64, EpochSums::default());
    if let Some(path) = &cfg.resume {
        let ckpt = checkpoint::load(path)?;
        checkpoint::restore_into(path, &ckpt.model, &engine.variables())?;
        engine
            .sgd
            .load_momentum_buffers(ckpt.momentum)
            .map_err(|reason| checkpoint::CheckpointError::Mismatch { path: path.clone(), reason })?;
        // An fp16 run continues with the saved scale and growth tracker (bit-identical
        // resume). Checkpoints written before the tracker was saved carry the scale alone
        // (the tracker restarts at 0); ones from an fp32/bf16 run (or imported ones) carry
        // no scaler and the run starts from the initial scale.
        if let Some(scaler) = engine.scaler.as_mut() {
            let saved = match ckpt.state.grad_scaler {
                Some(state) => Some(state),
                None if ckpt.state.loss_scale > 1.0 => {
                    Some(ScalerState { scale: ckpt.state.loss_scale, growth_tracker: 0 })
                }
                None => None,
            };
            if let Some(state) = saved {
                *scaler = GradScaler::from_state(cfg.device, state);
            }
        }
        start_epoch = ckpt.state.epoch;
        start_step = ckpt.state.step;
        // At the same world size each rank continues its own shard. At another size only a
        // global batch continues mid-epoch: its step k covers the same positions of the
        // epoch's order at any size, so the new ranks go on from the same step, rank 0
        // carrying the group's sums so far (the epoch's totals are sums over the ranks).
        // With a per-rank batch the remaining steps differ, and the epoch starts again.
        if ckpt.state.world_size as usize != cfg.world_size && cfg.spec.global_batch > 0 {
            if cfg.rank == 0 {
                partial = ckpt.state.partial;
            }
        } else if ckpt.state.world_size as usize == cfg.world_size {
            // Each rank continues its own sums; the epoch's totals are summed over the
            // ranks at its end, exactly as in an uninterrupted run.
            partial = match ckpt.state.rank_partials.get(cfg.rank) {
                Some(own) if ckpt.state.rank_partials.len() == cfg.world_size => *own,
                _ => {
                    if cfg.world_size > 1 && ckpt.state.step > 0 {
                        warn!("checkpoint predates per-rank sums: the resumed epoch's train loss and accuracy are estimates");
                        // Older checkpoints hold rank 0's sums only: use them as this
                        // rank's estimate (every shard has the same number of samples).
                    }
                    ckpt.state.partial
                }
            };
        } else {
            start_step = 0;
        }
        info!(checkpoint = %path.display(), epoch = start_epoch, step = start_step, "resumed");
    } else {
        sync::broadcast_from_root(&engine.variables(), comm)?;
    }

    Ok((start_epoch, start_step, partial))
}

//! The per-step commit of a rank's training state, and the state it leaves in the
//! worker's [`LiveSlot`] when training ends with an error.

use super::{lock, LiveSlot, LiveState};
use crate::collective::{Collective, Completion, CompletionState};
use crate::train::engine::Engine;
use crate::train::error::TrainError;
use crate::train::exact_gather;
use crate::train::metrics::DeviceSums;
use crate::train::position::Position;
use crate::train::sync::{unflatten_into, GradSync};
use cvdist_common::epoch_sums::EpochSums;
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

/// How long a failed attempt waits for its last step's device collectives to settle
/// before deciding whether its state can be kept.
pub const CONFIRM_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The trainer's engine, put back into the worker's [`LiveSlot`] at its last commit when
/// training ends with an error (dropped without [`Keeper::release`]).
///
/// A commit reads nothing back from the device and launches at most one kernel, so a step
/// never waits for the device: the metric sums are kept as the device tensors they are,
/// and the BatchNorm statistics as the one flat tensor the step's average produced.
pub struct Keeper {
    engine: Option<Engine>,
    slot: Option<(LiveSlot, String, u32)>,
    at: Position,
    /// Samples, seconds and all-reduce seconds of the epoch at the last commit (its
    /// loss·samples and correct are `sums`).
    host: EpochSums,
    /// Σ loss·samples and Σ correct at the last commit (0-dim f64, on the device).
    sums: (Tensor, Tensor),
    /// The BatchNorm statistics (every f32 buffer, flattened and concatenated in
    /// `engine.buffers` order) at the last commit.
    saved: Option<Tensor>,
    /// The statistics the running step commits: its cross-rank average.
    pending: Option<Tensor>,
    /// Whether the collectives the last commit's state was built from completed on their
    /// device (None: known complete, as on the ring and gloo).
    confirm: Option<Completion>,
    /// Every rank's sums after the two newest steps whose BatchNorm all-reduce completed:
    /// (position after the step, the packed sums as reduced, still on the device so that
    /// no step waits to read them).
    gathered: [Option<(Position, Tensor)>; 2],
}

impl Keeper {
    /// `slot`: where to leave the state, with the job id and attempt it belongs to; None
    /// keeps nothing (and costs nothing per step). `partial`: this rank's sums of the
    /// epoch at `at`.
    pub fn new(
        engine: Engine,
        slot: Option<(LiveSlot, String, u32)>,
        at: Position,
        partial: EpochSums,
    ) -> Result<Keeper, TrainError> {
        let device = engine.device();
        let scalar = |v: f64| Tensor::f_scalar_tensor(v, (Kind::Double, device)).map_err(TrainError::from);
        let sums = (scalar(partial.loss_sum)?, scalar(partial.correct)?);
        let mut keeper = Keeper {
            engine: Some(engine),
            slot,
            at,
            host: partial,
            sums,
            saved: None,
            pending: None,
            confirm: None,
            gathered: [None, None],
        };
        keeper.refresh_statistics();
        Ok(keeper)
    }

    fn stats(&self) -> Vec<&Tensor> {
        match &self.engine {
            Some(e) => e.buffers.iter().map(|(_, t)| t).filter(|t| t.kind() == Kind::Float).collect(),
            None => Vec::new(),
        }
    }

    /// The BatchNorm statistics as they are now become the committed ones (one kernel):
    /// after something other than a step changed them (an epoch end's or a checkpoint's
    /// average).
    pub fn refresh_statistics(&mut self) {
        if self.slot.is_none() {
            return;
        }
        let flats: Vec<Tensor> = self.stats().iter().map(|t| t.detach().reshape([-1])).collect();
        self.saved = (!flats.is_empty()).then(|| Tensor::cat(&flats, 0));
    }

    /// Whether a state is kept at all (only then does [`Keeper::commit`] want a
    /// [`Completion`]).
    pub fn keeps(&self) -> bool {
        self.slot.is_some()
    }

    /// A step (or an epoch end) is complete at `at`: `sums` holds this rank's epoch sums
    /// including it, `host` its samples, seconds and all-reduce seconds (its loss·samples
    /// and correct are not read: they are `sums`). `confirm`: the
    /// completion of the collectives it was built from, when they may still be running
    /// on the device (NCCL; [`Collective::completion`]).
    pub fn commit(&mut self, at: Position, sums: &DeviceSums, host: EpochSums, confirm: Option<Completion>) {
        if self.slot.is_none() {
            return;
        }
        // In stream order the new operations complete after the earlier ones: the newest
        // confirmation covers the earlier states too.
        self.confirm = confirm;
        self.at = at;
        self.host = host;
        self.sums = sums.snapshot();
        match self.pending.take() {
            Some(averaged) => self.saved = Some(averaged),
            None => self.refresh_statistics(),
        }
    }

    /// [`Engine::finish_step`] for a kept state: the gradient all-reduce, then (with peers)
    /// the BatchNorm average, then the update. A failure of either collective leaves
    /// weights, momentum and the last commit intact.
    ///
    /// Why the average: without it each rank's running statistics follow its own batches
    /// until the next epoch end or checkpoint averages them, and a lost rank's would be
    /// gone, so the group could not go on as if nothing happened. The update
    /// `r ← (1−m)·r + m·batch statistic` is linear, so the average of per-step averages is
    /// the average taken at the epoch end (up to float rounding): every rank now holds the
    /// group's statistics after every step, for one small exact all-reduce (resnet20:
    /// 1,376 floats; resnet50: 53,120), queued after the gradients, on the device.
    ///
    /// The same all-reduce gathers every rank's `sums` (this step included) as they will be
    /// once the step completes at `after`, bit-exactly ([`exact_gather`]), so the state a
    /// survivor keeps includes the sums of the ranks that were lost.
    ///
    /// `at`: the step's (epoch, step) for the update; `sums`: this rank's epoch sums with
    /// this step added, `seen` its samples. Returns the seconds waited for the gradient
    /// all-reduce and whether the update was applied.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_step(
        &mut self,
        grad_sync: &mut GradSync,
        comm: &mut dyn Collective,
        loss: &Tensor,
        lr: f64,
        at: (u32, u64),
        after: Position,
        sums: &DeviceSums,
        seen: f64,
    ) -> Result<(f64, bool), TrainError> {
        let reduced = self.engine_mut().reduce_gradients(grad_sync, comm, loss)?;
        self.average_batch_norm(comm, after, sums, seen)?;
        self.engine_mut().apply(reduced, lr, at)
    }

    fn average_batch_norm(
        &mut self,
        comm: &mut dyn Collective,
        after: Position,
        sums: &DeviceSums,
        seen: f64,
    ) -> Result<(), TrainError> {
        let world = comm.world_size();
        if self.slot.is_none() || world == 1 {
            return Ok(());
        }
        let stats = self.stats();
        let Some(device) = stats.first().map(|t| t.device()) else { return Ok(()) };
        let mut flats: Vec<Tensor> = stats.iter().map(|t| t.detach().reshape([-1])).collect();
        let (loss_sum, correct) = sums.snapshot();
        let seen = Tensor::f_scalar_tensor(seen, (Kind::Double, device))?;
        let packed = exact_gather::pack_on_device(&[&loss_sum, &correct, &seen], comm.rank(), world, device)?;
        let packed_len = packed.numel() as i64;
        flats.push(packed);
        let mut flat = Tensor::f_cat(&flats, 0)?;
        comm.reduce_tensor_sum_exact(&mut flat)?;
        let stats_len = flat.numel() as i64 - packed_len;
        let mean = tch::no_grad(|| flat.narrow(0, 0, stats_len) * (1.0 / world as f64));
        unflatten_into(&stats, &mean);
        let [older, newer] = &mut self.gathered;
        *older = newer.take();
        *newer = Some((after, flat.narrow(0, stats_len, packed_len)));
        self.pending = Some(mean);
        Ok(())
    }

    /// The engine whose state is kept.
    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("the engine is present until the keeper is dropped")
    }

    /// The engine, for what changes its state outside [`Keeper::finish_step`] (forward and
    /// backward, evaluation, checkpoints); [`Keeper::refresh_statistics`] after a change of
    /// the BatchNorm statistics makes it the committed state.
    pub fn engine_mut(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("the engine is present until the keeper is dropped")
    }

    /// Training ended normally: nothing is kept.
    pub fn release(&mut self) {
        self.slot = None;
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let Some((slot, job_id, attempt)) = self.slot.take() else { return };
        // The partial step's BatchNorm updates go; weights and momentum were only changed
        // by complete steps (the update runs after the all-reduces succeeded).
        if let Some(saved) = &self.saved {
            unflatten_into(&self.stats(), saved);
        }
        let Some(engine) = self.engine.take() else { return };
        // The kept model must not keep this attempt's comm thread waiting for buckets.
        engine.disconnect_hooks();
        // A state built from reductions that did not complete (an abort while NCCL still
        // ran them) holds undefined gradients in its weights: not kept, so recovery takes
        // the checkpoint instead. After an abort c10d ends the operations within moments.
        if let Some(mut confirm) = self.confirm.take() {
            let state = confirm.settle(CONFIRM_LIMIT);
            if state != CompletionState::Succeeded {
                warn!(
                    epoch = self.at.epoch,
                    steps = self.at.steps,
                    ?state,
                    "the last step's collectives did not complete on the device; its state is not kept"
                );
                return;
            }
        }
        // The one read of the kept state, at the failure (not per step).
        let read = |t: &Tensor| t.f_to_device(Device::Cpu).and_then(|t| t.f_double_value(&[])).unwrap_or(f64::NAN);
        let partial = EpochSums { loss_sum: read(&self.sums.0), correct: read(&self.sums.1), ..self.host };
        let rank_sums = self.gathered.iter().flatten().find(|(at, _)| *at == self.at).and_then(|(_, t)| unpack_sums(t));
        info!(
            epoch = self.at.epoch,
            steps = self.at.steps,
            all_sums = rank_sums.is_some(),
            "keeping the training state of the last complete step"
        );
        *lock(&slot) = Some(LiveState { job_id, attempt, engine, at: self.at, partial, rank_sums });
    }
}

/// Every rank's loss·samples, correct and samples from a reduced step buffer (read back
/// to the host); None when it cannot be read (the state is then kept without them).
fn unpack_sums(t: &Tensor) -> Option<Vec<EpochSums>> {
    let world = t.numel() / (3 * exact_gather::PIECES);
    let ranks = exact_gather::unpack_tensor(t, world).ok()?;
    ranks
        .into_iter()
        .map(|v| match v[..] {
            [loss_sum, correct, samples] => Some(EpochSums { loss_sum, correct, samples, ..EpochSums::default() }),
            _ => None,
        })
        .collect()
}

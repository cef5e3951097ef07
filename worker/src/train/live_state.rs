//! The training state a worker keeps in memory across attempts, so that a group that
//! loses a member continues from a survivor instead of the last checkpoint.
//!
//! Data-parallel replicas hold identical weights and optimizer state after every complete
//! step, so a survivor of a failed attempt *is* a checkpoint. The trainer commits the
//! position, this rank's partial-epoch sums and a copy of the BatchNorm buffers after every
//! complete step (a step is complete once its all-reduce finished and the optimizer applied
//! it); when the attempt ends with an error, [`Keeper`] puts the engine back to the last
//! commit (a partial step changed only the gradients, which the next step zeroes, the
//! BatchNorm running statistics, restored here, and its metric sums, not committed) and
//! leaves it in the worker's [`LiveSlot`]. The next attempt's members then agree over the
//! data-plane ring on the furthest complete position any of them holds ([`agree`]) and every
//! rank takes that rank's state by a broadcast over the same authenticated ring the initial
//! weights travel on.

use super::engine::Engine;
use super::error::TrainError;
use super::metrics::DeviceSums;
use super::position::Position;
use super::scaler::{GradScaler, ScalerState};
use super::sync::{self, GradSync};
use crate::collective::{Collective, CollectiveError, Completion, CompletionState};
use cvdist_common::proto::JobSpec;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

/// One rank's state at its last complete step.
pub struct LiveState {
    pub job_id: String,
    /// The attempt this state belongs to: the one that last trained or adopted it. Only
    /// a state of the attempt the coordinator recovers (`Assignment.live_attempt`) is used,
    /// so a worker that left the group earlier cannot bring back an old state.
    pub attempt: u32,
    pub engine: Engine,
    pub at: Position,
    /// This rank's sums of the epoch in progress: loss·samples, correct, samples,
    /// seconds, all-reduce seconds.
    pub partial: [f64; 5],
    /// Every rank's (loss·samples, correct, samples) at `at`, by rank, when known: gathered
    /// with each step's BatchNorm all-reduce, so a lost rank's sums are not lost.
    pub rank_sums: Option<Vec<[f64; 3]>>,
}

/// Where a worker keeps its [`LiveState`] between attempts.
pub type LiveSlot = Arc<Mutex<Option<LiveState>>>;

/// What a new attempt starts from when a member held a live state.
pub struct LiveStart {
    pub engine: Engine,
    pub at: Position,
    pub partial: [f64; 5],
    /// The rank whose state every rank took.
    pub source: usize,
}

fn lock(slot: &LiveSlot) -> std::sync::MutexGuard<'_, Option<LiveState>> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the slot's state if it is `job_id`'s state of attempt `live_attempt`, re-labelled
/// as attempt `attempt`'s (it is a member of that one now). Anything else in the slot is
/// dropped: it can never be used again.
pub fn take(slot: &LiveSlot, job_id: &str, live_attempt: u32, attempt: u32) -> Option<LiveState> {
    let mut s = lock(slot).take()?;
    if s.job_id != job_id || s.attempt != live_attempt {
        return None;
    }
    s.attempt = attempt;
    Some(s)
}

/// Puts a state taken with [`take`] back, unless the slot got a newer one meanwhile.
pub fn put_back(slot: &LiveSlot, state: Option<LiveState>) {
    if let Some(state) = state {
        lock(slot).get_or_insert(state);
    }
}

/// Values each rank contributes to the agreement before the per-rank sums.
const HEADER: usize = 15;

/// What this rank says in the agreement of a group of `world`: [`HEADER`] values, then a
/// flag and `world` × 3 sums for the new ranks (the old ranks' sums when the world size is
/// the same, since new rank r trains old rank r's shard; otherwise all of them on rank 0,
/// as an epoch's totals are sums over the ranks).
fn header(state: Option<&LiveState>, world: usize) -> Vec<f64> {
    let mut out = header_fixed(state).to_vec();
    out.extend(std::iter::repeat_n(0.0, 1 + 3 * world));
    if let Some((s, sums)) = state.and_then(|s| s.rank_sums.as_ref().map(|v| (s, v))) {
        out[HEADER] = 1.0;
        let slots = &mut out[HEADER + 1..];
        if s.at.world as usize == world && sums.len() == world {
            for (slot, v) in slots.chunks_mut(3).zip(sums) {
                slot.copy_from_slice(v);
            }
        } else {
            for v in sums {
                for k in 0..3 {
                    slots[k] += v[k];
                }
            }
        }
    }
    out
}

fn header_fixed(state: Option<&LiveState>) -> [f64; HEADER] {
    let Some(s) = state else { return [0.0; HEADER] };
    let scaler = s.engine.scaler.as_ref().map(GradScaler::state);
    let p = s.partial;
    [
        1.0,
        f64::from(s.at.epoch),
        s.at.base as f64,
        f64::from(s.at.world),
        s.at.steps as f64,
        p[0],
        p[1],
        p[2],
        p[3],
        p[4],
        if scaler.is_some() { 1.0 } else { 0.0 },
        scaler.map_or(0.0, |s| s.scale),
        scaler.map_or(0.0, |s| s.growth_tracker as f64),
        if s.engine.sgd.momentum_buffers().is_empty() { 0.0 } else { 1.0 },
        0.0,
    ]
}

fn position_of(h: &[f64]) -> Position {
    Position { epoch: h[1] as u32, base: h[2] as u64, world: h[3] as u32, steps: h[4] as u64 }
}

/// The members of a new attempt agree where it continues: each says whether it holds a
/// live state and at which position (exactly, [`sync::gather_f64`]); the furthest
/// position (samples of the furthest epoch consumed; the lowest rank among equals) is the
/// source, and every rank takes its weights, BatchNorm buffers, momentum, loss scale and
/// position by a broadcast from it. A rank with no state (a replacement) or an older one
/// (its ring let a peer finish a step it did not) receives; the source's state is not
/// changed. `Ok(None)`: no member holds a state; the group resumes from the checkpoint.
///
/// Only states in epoch `max_epoch` or before count (`Assignment.live_max_epoch`: the first
/// epoch the coordinator has not recorded; a state past it would skip that epoch's report).
///
/// `own` is only taken (moved into the result) once every collective succeeded, so after
/// an error it is still this rank's intact state.
pub fn agree(
    own: &mut Option<LiveState>,
    spec: &JobSpec,
    device: Device,
    train_len: usize,
    max_epoch: u32,
    comm: &mut dyn Collective,
) -> Result<Option<LiveStart>, TrainError> {
    let rank = comm.rank();
    let world = comm.world_size();
    let all = sync::gather_f64(&header(own.as_ref(), world), comm)?;
    let batch = spec.batch_size as usize;
    let Some(source) = (0..all.len())
        .filter(|&r| all[r].first() == Some(&1.0) && all[r].len() == HEADER + 1 + 3 * world)
        .filter(|&r| position_of(&all[r]).epoch <= max_epoch)
        .max_by_key(|&r| {
            let at = position_of(&all[r]);
            (at.epoch, at.consumed(train_len, batch), std::cmp::Reverse(r))
        })
    else {
        return Ok(None);
    };
    let src = &all[source];
    let at = position_of(src);
    let src_momentum = src[13] == 1.0;
    // A receiver needs tensors of the right shapes to receive into: its own (older) state
    // if it has one, otherwise a freshly built model.
    let mut fresh = None;
    let reuse = own.as_ref().is_some_and(|s| src_momentum || s.engine.sgd.momentum_buffers().is_empty());
    if rank != source && !reuse {
        fresh = Some(Engine::new(spec, device)?);
    }
    {
        let engine = match fresh.as_mut() {
            Some(e) => e,
            None => &mut own.as_mut().ok_or_else(|| TrainError::Model("no live state to send".into()))?.engine,
        };
        if src_momentum && engine.sgd.momentum_buffers().is_empty() {
            let zeros: Vec<(String, Tensor)> =
                engine.sgd.params().iter().map(|(n, t)| (n.clone(), t.zeros_like())).collect();
            engine.sgd.load_momentum_buffers(zeros).map_err(TrainError::Model)?;
        }
        let mut tensors: Vec<Tensor> = engine.variables().into_iter().map(|(_, t)| t).collect();
        tensors.extend(engine.sgd.momentum_buffers().into_iter().map(|(_, t)| t));
        broadcast_from(&tensors, comm, source)?;
    }
    let mut engine = match fresh {
        Some(e) => e,
        None => own.take().map(|s| s.engine).ok_or_else(|| TrainError::Model("no live state".into()))?,
    };
    engine.scaler = (src[10] == 1.0)
        .then(|| GradScaler::from_state(device, ScalerState { scale: src[11], growth_tracker: src[12] as i64 }));
    // Every rank's sums came with the source's state (the usual case): new rank r continues
    // what its shard's sums were. Otherwise each rank continues its own sums when it
    // completed exactly the source's steps, and a replacement takes the source's as its
    // estimate (the lost rank's are gone).
    let mine = &all[rank];
    let partial: [f64; 5] = if src[HEADER] == 1.0 {
        let sums = &src[HEADER + 1 + 3 * rank..HEADER + 4 + 3 * rank];
        [sums[0], sums[1], sums[2], src[8], src[9]]
    } else if mine[0] == 1.0 && position_of(mine) == at {
        std::array::from_fn(|k| mine[5 + k])
    } else {
        std::array::from_fn(|k| src[5 + k])
    };
    info!(source, epoch = at.epoch, consumed = at.consumed(train_len, batch), "continuing from a live state");
    Ok(Some(LiveStart { engine, at, partial, source }))
}

/// Makes every rank's `tensors` equal `root`'s, through one host buffer (f32 on the wire:
/// weights, momentum and running statistics are f32; `num_batches_tracked` counts stay
/// exact below 2^24).
pub fn broadcast_from(tensors: &[Tensor], comm: &mut dyn Collective, root: usize) -> Result<(), CollectiveError> {
    if comm.world_size() == 1 || tensors.is_empty() {
        return Ok(());
    }
    let flats: Vec<Tensor> =
        tensors.iter().map(|t| t.detach().reshape([-1]).to_device(Device::Cpu).to_kind(Kind::Float)).collect();
    let flat = Tensor::cat(&flats, 0).contiguous();
    let numel = flat.numel();
    let mut host = vec![0f32; numel];
    flat.copy_data(&mut host, numel);
    comm.broadcast(&mut host, root)?;
    let back = Tensor::from_slice(&host);
    tch::no_grad(|| {
        let mut offset = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            let src = back.narrow(0, offset, n).view(t.size().as_slice()).to_kind(t.kind()).to_device(t.device());
            let mut dst = t.shallow_clone();
            dst.copy_(&src);
            offset += n;
        }
    });
    Ok(())
}

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
    /// Samples, seconds and all-reduce seconds of the epoch at the last commit.
    host: [f64; 3],
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
    /// epoch at `at` (loss·samples, correct, samples, seconds, all-reduce seconds).
    pub fn new(
        engine: Engine,
        slot: Option<(LiveSlot, String, u32)>,
        at: Position,
        partial: [f64; 5],
    ) -> Result<Keeper, TrainError> {
        let device = engine.device();
        let scalar = |v: f64| Tensor::f_scalar_tensor(v, (Kind::Double, device)).map_err(TrainError::from);
        let sums = (scalar(partial[0])?, scalar(partial[1])?);
        let mut keeper = Keeper {
            engine: Some(engine),
            slot,
            at,
            host: [partial[2], partial[3], partial[4]],
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
    /// including it, `host` its samples, seconds and all-reduce seconds. `confirm`: the
    /// completion of the collectives it was built from, when they may still be running
    /// on the device (NCCL; [`Collective::completion`]).
    pub fn commit(&mut self, at: Position, sums: &DeviceSums, host: [f64; 3], confirm: Option<Completion>) {
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
    /// once the step completes at `after`, bit-exactly ([`pack_sums`]), so the state a
    /// survivor keeps includes the sums of the ranks that were lost.
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
        let packed = pack_sums(&loss_sum, &correct, seen, comm.rank(), world, device)?;
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
        let [seen, seconds, wire] = self.host;
        let partial = [read(&self.sums.0), read(&self.sums.1), seen, seconds, wire];
        let rank_sums = self.gathered.iter().flatten().find(|(at, _)| *at == self.at).map(|(_, t)| unpack_sums(t));
        info!(
            epoch = self.at.epoch,
            steps = self.at.steps,
            all_sums = rank_sums.is_some(),
            "keeping the training state of the last complete step"
        );
        *lock(&slot) = Some(LiveState { job_id, attempt, engine, at: self.at, partial, rank_sums });
    }
}

/// Copies consecutive pieces of the flat tensor `flat` into `tensors` (each its own shape),
/// the inverse of their flattened concatenation.
fn unflatten_into(tensors: &[&Tensor], flat: &Tensor) {
    tch::no_grad(|| {
        let mut offset = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            let mut dst = t.shallow_clone();
            dst.copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
            offset += n;
        }
    });
}

/// f32 pieces per f64 value in [`pack_sums`].
const PIECES: i64 = 3;
/// Values per rank in [`pack_sums`]: Σ loss·samples, Σ correct, samples.
const VALUES: i64 = 3;

/// A buffer of `world` × 3 × [`PIECES`] f32s, zero except rank `rank`'s slot, which holds
/// `loss_sum`, `correct` (0-dim f64 device tensors) and `seen`, each split into three f32s
/// `hi = f32(x)`, `mid = f32(x − hi)`, `lo = f32(x − hi − mid)`. For a finite normal f64
/// both differences are exact (the second has at most 53 − 2·24 = 5 significant bits
/// left) so `x = hi + mid + lo` exactly (the split of Dekker, "A floating-point technique
/// for extending the available precision", 1971, applied twice). Only one rank fills each
/// slot, so the f32 sum over the ranks adds only zeros to it and stays exact. Built on
/// the device: nothing is read back.
fn pack_sums(
    loss_sum: &Tensor,
    correct: &Tensor,
    seen: f64,
    rank: usize,
    world: usize,
    device: Device,
) -> Result<Tensor, TrainError> {
    tch::no_grad(|| -> Result<Tensor, tch::TchError> {
        let seen = Tensor::f_scalar_tensor(seen, (Kind::Double, device))?;
        let x = Tensor::f_stack(&[loss_sum, correct, &seen], 0)?;
        let hi = x.f_to_kind(Kind::Float)?;
        let r1 = x.f_sub(&hi.f_to_kind(Kind::Double)?)?;
        let mid = r1.f_to_kind(Kind::Float)?;
        let lo = r1.f_sub(&mid.f_to_kind(Kind::Double)?)?.f_to_kind(Kind::Float)?;
        let pieces = Tensor::f_stack(&[hi, mid, lo], 1)?.f_reshape([VALUES * PIECES])?;
        let buf = Tensor::f_zeros([world as i64 * VALUES * PIECES], (Kind::Float, device))?;
        buf.f_narrow(0, rank as i64 * VALUES * PIECES, VALUES * PIECES)?.f_copy_(&pieces)?;
        Ok(buf)
    })
    .map_err(TrainError::from)
}

/// Every rank's (Σ loss·samples, Σ correct, samples) from a reduced [`pack_sums`] buffer
/// (read back to the host): `(hi + mid) + lo` in f64, exact as explained there.
fn unpack_sums(t: &Tensor) -> Vec<[f64; 3]> {
    let Ok(t) = t.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Float)).and_then(|t| t.f_contiguous()) else {
        return Vec::new();
    };
    let n = t.numel();
    let mut buf = vec![0f32; n];
    if t.f_copy_data(&mut buf, n).is_err() {
        return Vec::new();
    }
    buf.chunks((VALUES * PIECES) as usize)
        .map(|rank| {
            let mut v = [0.0; 3];
            for (out, p) in v.iter_mut().zip(rank.chunks(PIECES as usize)) {
                if let [hi, mid, lo] = p {
                    *out = (f64::from(*hi) + f64::from(*mid)) + f64::from(*lo);
                }
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks' packed sums, added as the ring adds them (f32), unpack to each rank's
    /// exact values, also for values with all 53 mantissa bits in use.
    #[test]
    fn gathered_sums_are_bit_exact() {
        let a = [1_234.567_891_234_5, 17.0, 64.0];
        let b = [0.1 + 0.2, 1.0 / 3.0, 2.0f64.powi(40) + 1.0];
        let c = |v: f64| Tensor::from(v);
        let pa = pack_sums(&c(a[0]), &c(a[1]), a[2], 0, 2, Device::Cpu).unwrap();
        let pb = pack_sums(&c(b[0]), &c(b[1]), b[2], 1, 2, Device::Cpu).unwrap();
        let got = unpack_sums(&(pa + pb));
        assert_eq!(got.len(), 2);
        for (want, have) in [a, b].iter().zip(&got) {
            assert_eq!(want.map(f64::to_bits), have.map(f64::to_bits));
        }
    }
}

//! The training state a worker keeps in memory across attempts (issue 14, items 1–2).
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

use super::position::Position;
use super::scaler::{GradScaler, ScalerState};
use super::sync;
use super::trainer::{Engine, TrainError};
use crate::collective::{Collective, CollectiveError};
use cvdist_common::proto::JobSpec;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};
use tracing::info;

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

/// Values each rank contributes to the agreement, in this order.
const HEADER: usize = 15;

fn header(state: Option<&LiveState>) -> [f64; HEADER] {
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
/// `own` is only taken (moved into the result) once every collective succeeded, so after
/// an error it is still this rank's intact state.
pub fn agree(
    own: &mut Option<LiveState>,
    spec: &JobSpec,
    device: Device,
    train_len: usize,
    comm: &mut dyn Collective,
) -> Result<Option<LiveStart>, TrainError> {
    let rank = comm.rank();
    let all = sync::gather_f64(&header(own.as_ref()), comm)?;
    let batch = spec.batch_size as usize;
    let Some(source) =
        (0..all.len()).filter(|&r| all[r].first() == Some(&1.0) && all[r].len() == HEADER).max_by_key(|&r| {
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
    // Each rank continues its own sums when it completed exactly the source's steps; a
    // replacement takes the source's as its estimate (the lost rank's are gone).
    let mine = &all[rank];
    let partial: [f64; 5] = if mine[0] == 1.0 && position_of(mine) == at {
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

/// The trainer's engine, put back into the worker's [`LiveSlot`] at its last commit when
/// training ends with an error (dropped without [`Keeper::release`]).
pub struct Keeper {
    engine: Option<Engine>,
    slot: Option<(LiveSlot, String, u32)>,
    at: Position,
    partial: [f64; 5],
    /// The BatchNorm buffers at the last commit.
    saved: Vec<Tensor>,
}

impl Keeper {
    /// `slot`: where to leave the state, with the job id and attempt it belongs to; None
    /// keeps nothing (and costs nothing per step).
    pub fn new(engine: Engine, slot: Option<(LiveSlot, String, u32)>, at: Position, partial: [f64; 5]) -> Keeper {
        let saved = if slot.is_some() { engine.buffers.iter().map(|(_, t)| t.copy()).collect() } else { Vec::new() };
        Keeper { engine: Some(engine), slot, at, partial, saved }
    }

    /// A step (or an epoch end) is complete at `at`, with this rank's sums `partial`.
    pub fn commit(&mut self, at: Position, partial: [f64; 5]) {
        if self.slot.is_none() {
            return;
        }
        self.at = at;
        self.partial = partial;
        if let Some(engine) = &self.engine {
            tch::no_grad(|| {
                for (dst, (_, src)) in self.saved.iter_mut().zip(&engine.buffers) {
                    dst.copy_(src);
                }
            });
        }
    }

    /// Averages the BatchNorm running statistics over the ranks after a step's forward pass,
    /// before its gradient all-reduce, when a state is kept and there are peers.
    ///
    /// Without it each rank's statistics follow its own batches until the next epoch end or
    /// checkpoint averages them, and a lost rank's would be gone: the group could not go on
    /// as if nothing happened. The update `r ← (1−m)·r + m·batch statistic` is linear, so the
    /// average of per-step averages is the average taken at the epoch end (up to float
    /// rounding): every rank now holds the group's statistics after every step, at the cost
    /// of one small all-reduce (resnet20: 1,376 floats). Called before the gradient
    /// all-reduce so that a failure of either leaves the last commit intact.
    pub fn average_batch_norm(&mut self, comm: &mut dyn Collective) -> Result<(), CollectiveError> {
        let world = comm.world_size();
        if self.slot.is_none() || world == 1 {
            return Ok(());
        }
        let Some(engine) = &self.engine else { return Ok(()) };
        let stats: Vec<&Tensor> = engine.buffers.iter().map(|(_, t)| t).filter(|t| t.kind() == Kind::Float).collect();
        if stats.is_empty() {
            return Ok(());
        }
        let flats: Vec<Tensor> = stats.iter().map(|t| t.detach().reshape([-1])).collect();
        let mut flat = Tensor::cat(&flats, 0).contiguous();
        comm.reduce_tensor_sum(&mut flat)?;
        tch::no_grad(|| {
            let _ = flat.f_mul_scalar_(1.0 / world as f64);
            let mut offset = 0i64;
            for t in stats {
                let n = t.numel() as i64;
                let mut dst = t.shallow_clone();
                dst.copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
        });
        Ok(())
    }

    /// Training ended normally: nothing is kept.
    pub fn release(&mut self) {
        self.slot = None;
    }
}

impl Deref for Keeper {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        self.engine.as_ref().expect("the engine is present until the keeper is dropped")
    }
}

impl DerefMut for Keeper {
    fn deref_mut(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("the engine is present until the keeper is dropped")
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let (Some((slot, job_id, attempt)), Some(engine)) = (self.slot.take(), self.engine.take()) else { return };
        // The partial step's BatchNorm updates go; weights and momentum were only changed
        // by complete steps (the update runs after the all-reduce succeeded).
        tch::no_grad(|| {
            for (saved, (_, t)) in self.saved.iter().zip(&engine.buffers) {
                let mut dst = t.shallow_clone();
                dst.copy_(saved);
            }
        });
        info!(epoch = self.at.epoch, steps = self.at.steps, "keeping the training state of the last complete step");
        *lock(&slot) = Some(LiveState { job_id, attempt, engine, at: self.at, partial: self.partial });
    }
}

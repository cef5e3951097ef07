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
//!
//! - `keeper`: the per-step commit and the state left behind on a failure;
//! - `agree`: where the next attempt continues, and the broadcast of that state.

mod agree;
mod keeper;

pub use agree::agree;
pub use keeper::{Keeper, CONFIRM_LIMIT};

use super::engine::Engine;
use super::position::Position;
use cvdist_common::epoch_sums::EpochSums;
use std::sync::{Arc, Mutex};

/// One rank's state at its last complete step.
pub struct LiveState {
    pub job_id: String,
    /// The attempt this state belongs to: the one that last trained or adopted it. Only
    /// a state of the attempt the coordinator recovers (`Assignment.live_attempt`) is used,
    /// so a worker that left the group earlier cannot bring back an old state.
    pub attempt: u32,
    pub engine: Engine,
    pub at: Position,
    /// This rank's sums of the epoch in progress.
    pub partial: EpochSums,
    /// Every rank's loss·samples, correct and samples at `at` (the times are not
    /// gathered and read 0), by rank, when known: gathered with each step's BatchNorm
    /// all-reduce, so a lost rank's sums are not lost.
    pub rank_sums: Option<Vec<EpochSums>>,
}

/// Where a worker keeps its [`LiveState`] between attempts.
pub type LiveSlot = Arc<Mutex<Option<LiveState>>>;

/// What a new attempt starts from when a member held a live state.
pub struct LiveStart {
    pub engine: Engine,
    pub at: Position,
    /// This rank's sums of the epoch in progress, to continue from.
    pub partial: EpochSums,
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

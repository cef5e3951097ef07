//! The record of each recovery (`JobInfo.recoveries`, shown by `cvdist status`, `summary.json`
//! and `/metrics`): why the attempt failed and where it had got to, the size of the new
//! group and where it resumed from (a survivor's in-memory state or a checkpoint), how many
//! of the failed group's steps it trains again, and the downtime until its first step. A
//! recovery is open from the failure until the new group forms, then measured until that
//! group's first step past its start; closing it writes its one line in the job log.

use super::{Effect, Job, Now, Transition};
use crate::state::record;
use cvdist_common::proto::{Recovery, Resumed};
use cvdist_common::{spec, text};

/// A job's recoveries, oldest first, bounded by [`record::MAX_RECOVERIES_KEPT`]. Only the
/// newest can still be waiting for its group (its `new_world_size` is 0 until then).
pub(super) struct RecoveryLog<'a>(&'a mut Vec<Recovery>);

impl Job {
    pub(super) fn recoveries(&mut self) -> RecoveryLog<'_> {
        RecoveryLog(&mut self.info.recoveries)
    }
}

impl<'a> RecoveryLog<'a> {
    /// Adds a recovery; the oldest go once more than the record keeps.
    fn push(self, r: Recovery) {
        self.0.push(r);
        record::trim_recoveries(self.0);
    }

    /// The newest recovery if its new group has not formed yet.
    fn waiting_for_group(self) -> Option<&'a mut Recovery> {
        self.0.last_mut().filter(|r| r.new_world_size == 0)
    }

    /// Joins `reason` to the cause of the recovery waiting for its group, unless already there.
    fn add_cause(self, reason: &str) {
        if let Some(r) = self.waiting_for_group() {
            if !r.cause.contains(reason) {
                r.cause = text::bound(&format!("{}; {reason}", r.cause), text::MAX_REPORT_TEXT);
            }
        }
    }

    /// Takes back the recovery of `attempt` while it waits for its group: the restart it
    /// prepared does not happen.
    pub(super) fn withdraw(self, attempt: u32) {
        if self.0.last().is_some_and(|r| r.attempt == attempt && r.new_world_size == 0) {
            self.0.pop();
        }
    }

    /// Sets the newest recovery's downtime and returns its log line (`n` counts from 1).
    fn close(self, downtime: Option<f64>) -> Option<String> {
        let n = self.0.len();
        let r = self.0.last_mut()?;
        r.downtime_seconds = downtime;
        Some(if r.new_world_size == 0 {
            format!("recovery {n}: {}; {} workers; not resumed", r.cause, r.old_world_size)
        } else {
            let from = if r.resumed_from.is_empty() { "the start" } else { r.resumed_from.as_str() };
            let down = match downtime {
                Some(s) => format!("down for {s:.1} s"),
                None => "no step completed".to_string(),
            };
            format!(
                "recovery {n}: {}; {} -> {} workers; resumed from {from}; {} steps replayed; {down}",
                r.cause, r.old_world_size, r.new_world_size, r.steps_replayed
            )
        })
    }
}

/// A recovery starts: the attempt `attempt` of `old_world_size` members failed for `cause`.
/// Records where it had got to (its newest reported position, or the newest stored
/// checkpoint if that is further).
pub(super) fn begin_recovery(job: &mut Job, attempt: u32, cause: &str, old_world_size: u32, now: Now) {
    let (reached_epoch, reached_step) = job.attempt_position.max(job.stored_position());
    job.recoveries().push(Recovery {
        attempt,
        cause: text::bound(cause, text::MAX_REPORT_TEXT),
        lost_unix: now.unix,
        old_world_size,
        reached_epoch,
        reached_step,
        ..Default::default()
    });
}

/// A member of the failed attempt was lost while the group waits to be re-formed: a survivor's
/// report of the broken ring often arrives before the dead worker's session is noticed, so
/// the recovery's cause names the lost worker too.
pub(super) fn note_lost_member(job: &mut Job, reason: &str) {
    job.recoveries().add_cause(reason);
}

/// The new group of a pending recovery starts with `new_world_size` members from `start`:
/// counts the steps of the failed group it will train again.
pub(super) fn resume_recovery(job: &mut Job, new_world_size: u32, start: (u32, u64)) {
    let spec = &job.spec;
    let checkpoint_world_size = job.checkpoint_world_size;
    let resumed_from = job.info.latest_checkpoint.clone();
    let Some(r) = RecoveryLog(&mut job.info.recoveries).waiting_for_group() else { return };
    r.new_world_size = new_world_size;
    r.resumed_from = resumed_from;
    // The worker resumes mid-epoch only at the checkpoint's own world size (unknown: assume
    // the failed group stored it); otherwise it restarts that epoch.
    let stored_by = if checkpoint_world_size == 0 { r.old_world_size } else { checkpoint_world_size };
    let start_step = if stored_by == new_world_size { start.1 } else { 0 };
    // In steps of the failed group: its epochs are what it trained.
    let per_epoch = spec::steps_per_epoch(spec, r.old_world_size);
    // Saturating: the step of a progress report comes from a peer and is not range-checked.
    let reached = u64::from(r.reached_epoch).saturating_mul(per_epoch).saturating_add(r.reached_step);
    let resumed = u64::from(start.0).saturating_mul(per_epoch).saturating_add(start_step);
    r.steps_replayed = reached.saturating_sub(resumed);
    job.awaiting_first_step = true;
}

/// Rank 0 of the current attempt says the group continues from a survivor's in-memory state
/// at `r`: that is where the attempt starts, and the recovery replays only the
/// steps between it and what the failed group reported (0 unless a member that died had
/// completed a step no survivor completed).
pub(super) fn resumed_live(job: &mut Job, r: &Resumed, now: Now, t: &mut Transition) {
    let spec = &job.spec;
    let start = (r.epoch, r.step);
    job.attempt_start = start;
    job.attempt_position = start;
    job.attempt_reached = r.epoch;
    let source = text::bound(&r.source_worker, text::MAX_REPORT_TEXT);
    // Only a recovery's own new group measures it (a group that grew has no recovery).
    let recovering = job.awaiting_first_step;
    if let Some(rec) = job.info.recoveries.last_mut().filter(|rec| recovering && rec.new_world_size != 0) {
        rec.resumed_from = format!("live state of {source} at epoch {} step {}", r.epoch, r.step);
        // In steps of the failed group, from the samples the survivors' complete steps consumed.
        let per_epoch = spec::steps_per_epoch(spec, rec.old_world_size);
        let per_step = u64::from(rec.old_world_size)
            .saturating_mul(u64::from(spec::per_rank_batch(spec, rec.old_world_size)))
            .max(1);
        let reached = u64::from(rec.reached_epoch).saturating_mul(per_epoch).saturating_add(rec.reached_step);
        let resumed =
            u64::from(r.epoch).saturating_mul(per_epoch).saturating_add((r.samples / per_step).min(per_epoch));
        rec.steps_replayed = reached.saturating_sub(resumed);
    }
    job.log(
        format!(
            "attempt {} continues from the live state of {source} at epoch {} step {} ({} samples of the epoch done; \
             steps counted at the new world size)",
            job.info.attempt, r.epoch, r.step, r.samples
        ),
        now,
        t,
    );
    t.effects.push(Effect::Persist);
}

/// Ends a pending recovery's downtime at the current attempt's first step past its start.
pub(super) fn first_step_check(job: &mut Job, now: Now, t: &mut Transition) {
    if job.awaiting_first_step && job.attempt_position > job.attempt_start {
        let lost = job.info.recoveries.last().map(|r| r.lost_unix).unwrap_or(now.unix);
        close_recovery(job, Some((now.unix - lost).max(0.0)), now, t);
        t.effects.push(Effect::Persist);
    }
}

/// The job ends or its new group failed again: a recovery still waiting for its first step
/// (or for its group) ends with no downtime measured.
pub(super) fn end_recovery(job: &mut Job, now: Now, t: &mut Transition) {
    let waiting_for_group = job.recoveries().waiting_for_group().is_some();
    if job.awaiting_first_step || waiting_for_group {
        close_recovery(job, None, now, t);
    }
}

/// Writes the last recovery's one line in the job log.
fn close_recovery(job: &mut Job, downtime: Option<f64>, now: Now, t: &mut Transition) {
    job.awaiting_first_step = false;
    if let Some(line) = job.recoveries().close(downtime) {
        job.log(line, now, t);
    }
}

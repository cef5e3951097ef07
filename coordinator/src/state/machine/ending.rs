//! How attempts and jobs end: a cancel, a failed attempt that the job recovers from (or that
//! spends its restart budget), and the job's failure.

use super::recovery::{begin_recovery, end_recovery, note_lost_member};
use super::{state_name, Effect, Job, Now, Transition, RECOVERY_GRACE};
use crate::state::error::CoordinatorError;
use cvdist_common::proto::{Abort, JobState};
use cvdist_common::run_dir::outcome;
use cvdist_common::text;

/// Any state but an ended one → CANCELLED; the members are told to abort.
pub(super) fn cancel(job: &mut Job, now: Now, t: &mut Transition) -> Result<(), CoordinatorError> {
    if job.state().is_terminal() {
        return Err(CoordinatorError::AlreadyEnded { id: job.info.id.clone(), state: state_name(job.state()) });
    }
    release_members(job, "cancelled by user", t);
    end_recovery(job, now, t);
    job.info.set_state(JobState::Cancelled);
    job.info.finished_unix = now.unix;
    job.info.message = "cancelled by user".into();
    job.info.outcome = "cancelled".into();
    job.log("cancelled by user".into(), now, t);
    t.effects.push(Effect::Finish);
    Ok(())
}

/// RUNNING → RECOVERING after a failure of `attempt` (the current one): aborts its members and
/// re-forms the group later, or RUNNING → FAILED once the restart budget is spent. Ignored
/// for any other attempt or state.
pub(super) fn fail_attempt(job: &mut Job, attempt: u32, reason: String, now: Now, t: &mut Transition) {
    if job.state() == JobState::Recovering && job.failed_attempt.as_ref().is_some_and(|(a, _)| *a == attempt) {
        note_lost_member(job, &reason);
        return;
    }
    if job.info.attempt != attempt || job.state() != JobState::Running {
        return;
    }
    // A recovery whose new group failed before completing a step ends unmeasured.
    end_recovery(job, now, t);
    let old_world_size = leave_attempt(job, &reason, t);
    let max_restarts = job.spec.max_restarts;
    job.info.restarts += 1;
    if job.info.restarts > max_restarts {
        let msg = format!("{reason}; restart budget of {max_restarts} exhausted");
        fail_job(job, msg, outcome::FAILED, now, t);
        return;
    }
    let counted = format!(" (restart {} of {max_restarts})", job.info.restarts);
    enter_recovering(job, attempt, &reason, old_world_size, &counted, now, t);
}

/// Ends the current attempt for `reason`: its members are told to abort, kept as the
/// members of the attempt that ended (whose in-memory state the next group may continue
/// from), and the job moves on to the next attempt number. Returns the old world size.
pub(super) fn leave_attempt(job: &mut Job, reason: &str, t: &mut Transition) -> u32 {
    let old_world_size = job.members.len() as u32;
    job.failed_attempt = Some((job.info.attempt, job.members.clone()));
    // Before the attempt number moves on: the aborts name the attempt they stop.
    release_members(job, reason, t);
    job.info.attempt += 1;
    old_world_size
}

/// → RECOVERING after `failed` (of `old_world_size` members) ended for `reason`: a recovery
/// is recorded, and the group is re-formed after [`RECOVERY_GRACE`] (so that the session of
/// a worker that died is noticed first), its rendezvous timed from now. `counted` follows
/// "recovering" in the log line: how much of the restart budget this recovery uses, if any.
pub(super) fn enter_recovering(
    job: &mut Job,
    failed: u32,
    reason: &str,
    old_world_size: u32,
    counted: &str,
    now: Now,
    t: &mut Transition,
) {
    begin_recovery(job, failed, reason, old_world_size, now);
    job.info.set_state(JobState::Recovering);
    job.info.message = text::bound(reason, text::MAX_REPORT_TEXT);
    job.waiting_since = now.instant;
    job.not_before = now.instant + RECOVERY_GRACE;
    let from = if job.info.latest_checkpoint.is_empty() {
        "the start".to_string()
    } else {
        job.info.latest_checkpoint.clone()
    };
    job.log(format!("{reason}; recovering{counted} from {from}"), now, t);
    t.effects.push(Effect::Persist);
    t.effects.push(Effect::PublishSnapshot);
}

/// → FAILED; `why` is its one-word outcome (`run_dir::outcome`).
pub(super) fn fail_job(job: &mut Job, reason: String, why: &str, now: Now, t: &mut Transition) {
    end_recovery(job, now, t);
    job.info.set_state(JobState::Failed);
    job.info.message = text::bound(&reason, text::MAX_REPORT_TEXT);
    job.info.outcome = why.to_string();
    job.info.finished_unix = now.unix;
    job.log(format!("failed: {reason}"), now, t);
    t.effects.push(Effect::Finish);
}

/// Frees the job's members; those still in it are told to abort when `reason` is non-empty.
pub(super) fn release_members(job: &mut Job, reason: &str, t: &mut Transition) {
    for worker in job.members.drain(..) {
        t.effects.push(if reason.is_empty() {
            Effect::Release { worker }
        } else {
            Effect::Abort {
                worker,
                abort: Abort { job_id: job.info.id.clone(), attempt: job.info.attempt, reason: reason.to_string() },
            }
        });
    }
    job.finished.clear();
}

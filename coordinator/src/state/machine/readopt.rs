//! A coordinator restart, and re-adopting the running attempt after it. Workers
//! keep training while the coordinator is away; a restarted coordinator loads the job as
//! RUNNING and, instead of aborting the attempt, waits a bounded window for every member to
//! re-register claiming its rank (`RejoinRequest`, proof checked by the caller). All back:
//! the attempt simply continues (no abort, no recovery entry, no step trained again). A member
//! back without the attempt, or the window passing: the job falls back to the recovery of a
//! restart without re-adoption (RECOVERING in a new attempt from the newest checkpoint),
//! recorded as a recovery whose cause says why. A job that was RECOVERING, or RUNNING with
//! no known group, goes straight to RECOVERING in a new attempt.
//!
//! ```text
//!   RUNNING ──coordinator restart──▶ RUNNING (re-adopting: members re-register)
//!                                     │ all back            │ one back without the attempt,
//!                                     ▼                     ▼ or the window passed
//!                                   RUNNING              RECOVERING (new attempt, not
//!                                   (same attempt)        counted as a restart)
//! ```

use super::ending::{enter_recovering, leave_attempt};
use super::{Effect, Job, Now, Transition};
use cvdist_common::proto::JobState;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A running attempt waiting for its members after a coordinator restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Readoption {
    /// The attempt being re-adopted (the job's current one when it began).
    pub attempt: u32,
    /// When the coordinator loaded the job, and until when it waits.
    pub since: Instant,
    pub since_unix: f64,
    pub deadline: Instant,
    /// Ranks whose worker re-registered with a valid claim.
    pub rejoined: BTreeSet<u32>,
    /// Every member is back: the attempt runs on unchanged.
    pub complete: bool,
}

impl Job {
    /// The attempt of this job waiting to be re-adopted, if any.
    pub fn readopting(&self) -> Option<&Readoption> {
        self.readopt_of_current().filter(|r| !r.complete)
    }

    /// The re-adoption of the current attempt, waiting or complete.
    fn readopt_of_current(&self) -> Option<&Readoption> {
        self.readopt
            .as_ref()
            .filter(|r| r.attempt == self.info.attempt && self.state() == JobState::Running && !self.members.is_empty())
    }

    /// Whether `worker` re-registered into `rank` of the current attempt after the restart.
    pub fn rejoined(&self, worker: &str, rank: u32) -> bool {
        self.readopt_of_current().is_some_and(|r| r.rejoined.contains(&rank))
            && self.members.get(rank as usize).map(String::as_str) == Some(worker)
    }

    /// Whether `worker` is a member of the attempt being re-adopted that has not re-registered.
    pub fn awaits(&self, worker: &str) -> bool {
        self.readopting().is_some_and(|r| {
            self.members.iter().enumerate().any(|(rank, m)| m == worker && !r.rejoined.contains(&(rank as u32)))
        })
    }
}

/// The coordinator restarted: a RUNNING job with a known group waits up to `window` for its
/// members; any other active job goes to RECOVERING in a new attempt ([`resume`]).
pub(super) fn restarted(job: &mut Job, window: Duration, now: Now, t: &mut Transition) {
    if job.state() != JobState::Running || job.info.worker_ids.is_empty() {
        resume(job, now, t);
        return;
    }
    job.members = job.info.worker_ids.clone();
    job.finished.clear();
    // What the store knows of the attempt's position; the members' claims and reports
    // move it on. A checkpoint upload must lie past the newest stored one in any case.
    let stored = job.stored_position();
    let reported = job.info.history.last().map(|m| (m.epoch + 1, 0)).unwrap_or((0, 0));
    job.attempt_start = stored;
    job.attempt_position = stored.max(reported);
    job.attempt_reached = job.attempt_position.0;
    job.readopt = Some(Readoption {
        attempt: job.info.attempt,
        since: now.instant,
        since_unix: now.unix,
        deadline: now.instant + window,
        rejoined: BTreeSet::new(),
        complete: false,
    });
    job.log(
        format!(
            "coordinator restarted; waiting up to {}s for the {} workers of attempt {} ({}) to re-register",
            window.as_secs(),
            job.members.len(),
            job.info.attempt,
            job.members.join(", ")
        ),
        now,
        t,
    );
    t.effects.push(Effect::Persist);
}

/// RUNNING or RECOVERING when the coordinator stopped → RECOVERING in a new attempt: the
/// workers reconnect and the job resumes from the newest checkpoint (no survivor's state is
/// known to a restarted coordinator).
pub(super) fn resume(job: &mut Job, now: Now, t: &mut Transition) {
    if !matches!(job.state(), JobState::Running | JobState::Recovering) {
        return;
    }
    job.info.set_state(JobState::Recovering);
    job.info.attempt += 1;
    job.info.worker_ids.clear();
    job.log("coordinator restarted; waiting for workers to resume from the newest checkpoint".into(), now, t);
    t.effects.push(Effect::Persist);
}

/// What a re-registering worker claims (the fields of `Event::Rejoin`).
pub(super) struct Claimed<'a> {
    pub worker: &'a str,
    pub attempt: u32,
    pub rank: u32,
    pub world_size: u32,
    pub position: (u32, u64),
}

/// `worker` re-registered claiming `rank` of `attempt` in a group of `world_size`, at
/// `position` (its proof already checked). Adopted when it is that rank's member of the
/// attempt being re-adopted; the last member back completes the re-adoption. Anything else
/// changes nothing (the caller sees [`Job::rejoined`] false and tells the worker).
pub(super) fn rejoin(job: &mut Job, claim: Claimed<'_>, now: Now, t: &mut Transition) {
    let Claimed { worker, attempt, rank, world_size, position } = claim;
    let Some(r) = job.readopting() else { return };
    let is_member = job.members.get(rank as usize).map(String::as_str) == Some(worker);
    if attempt != r.attempt || !is_member || world_size as usize != job.members.len() || r.rejoined.contains(&rank) {
        return;
    }
    let epochs = job.spec.epochs;
    // A peer's numbers: past the job's end they are not believed.
    if position.0 <= epochs {
        job.attempt_position = job.attempt_position.max(position);
        job.attempt_reached = job.attempt_reached.max(position.0);
    }
    let Some(r) = job.readopt.as_mut() else { return };
    r.rejoined.insert(rank);
    if r.rejoined.len() < job.members.len() {
        return;
    }
    let waited = (now.unix - r.since_unix).max(0.0);
    r.complete = true;
    let (epoch, step) = job.attempt_position;
    job.log(
        format!(
            "attempt {attempt} re-adopted: all {} workers re-registered {waited:.1} s after the coordinator restarted, at epoch {epoch} step {step}; no step replayed",
            job.members.len()
        ),
        now,
        t,
    );
    t.effects.push(Effect::Persist);
    t.effects.push(Effect::PublishSnapshot);
}

/// The re-adoption cannot complete: `why` (a member came back without the attempt, or the
/// window passed). The job recovers as after a restart without re-adoption: the members still
/// training are aborted and the job resumes from the newest checkpoint in a new attempt,
/// after the recovery grace. Recorded as a recovery; not counted against `max_restarts` (the
/// job did not fail).
fn give_up(job: &mut Job, why: String, now: Now, t: &mut Transition) {
    let Some(r) = job.readopting().cloned() else { return };
    let reason = format!("coordinator restarted; attempt {} not re-adopted: {why}", r.attempt);
    job.readopt = None;
    let old_world_size = leave_attempt(job, &reason, t);
    enter_recovering(job, r.attempt, &reason, old_world_size, "", now, t);
    t.effects.push(Effect::Wake);
}

/// A member of the attempt being re-adopted registered without claiming it (it stopped the
/// job, or it is a new process under the same id): the attempt cannot continue.
pub(super) fn member_back_without_attempt(job: &mut Job, worker: &str, now: Now, t: &mut Transition) {
    if job.awaits(worker) {
        give_up(job, format!("worker {worker} re-registered without it"), now, t);
    }
}

/// A member of the attempt being re-adopted reported a retryable failure before every
/// member re-registered. The members still away may have stopped the attempt themselves
/// (`--detached-timeout` while the coordinator was down), which breaks the ring for those
/// back: the failure is the restart's consequence, not the job's, so it ends the wait like
/// a member back without the attempt and is not counted against `max_restarts`.
pub(super) fn member_failed(job: &mut Job, reason: &str, now: Now, t: &mut Transition) {
    give_up(job, format!("{reason} while the others had not re-registered"), now, t);
}

/// The window passed before every member re-registered.
pub(super) fn deadline(job: &mut Job, now: Now, t: &mut Transition) {
    let Some(r) = job.readopting() else { return };
    if now.instant < r.deadline {
        return;
    }
    let missing: Vec<String> = job
        .members
        .iter()
        .enumerate()
        .filter(|(rank, _)| !r.rejoined.contains(&(*rank as u32)))
        .map(|(_, w)| w.clone())
        .collect();
    let waited = r.deadline.saturating_duration_since(r.since).as_secs();
    give_up(job, format!("{} did not re-register within {waited}s", missing.join(", ")), now, t);
}

//! A job's life as one pure function: [`step`] takes a job and an [`Event`] and returns the
//! job's next state (changed in place) and the [`Effect`]s the caller must carry out. It does no
//! I/O (beyond a tracing line per event-log line), takes no lock and reads no clock (the time
//! comes in [`Now`]), so unit tests drive every
//! edge below without a server, a store or sockets. Every change of a job's state goes through
//! [`step`]; the guards that decide whether an event applies at all (a stale attempt, a job that
//! already ended) live here and nowhere else.
//!
//! ```text
//!            submit                  enough idle workers
//!   ───────▶ QUEUED ─────────────────────────────────▶ RUNNING ──every rank finished──▶ SUCCEEDED
//!             │ │                                      │  ▲   (final checkpoint stored)
//!             │ │ cancel                   worker lost │  │ group re-formed; survivors' state
//!             │ ▼                          or failed   ▼  │ (else the newest checkpoint)
//!             │ CANCELLED ◀─────cancel────────────── RECOVERING
//!             │                                          │
//!             │ rendezvous timeout, or                   │ rendezvous timeout, data cannot be
//!             │ the data cannot be sharded               ▼ sharded, late permanent failure
//!             └────────────────────────────────────▶ FAILED
//! ```
//!
//! RUNNING also goes straight to CANCELLED (cancel) and to FAILED (a permanent failure, the
//! restart budget spent, or no final checkpoint). A recovery continues from the failed
//! attempt's state where it can: the new group's assignments name that attempt, survivors
//! bring its state from memory and rank 0 reports where the group continues; the newest
//! checkpoint is the fallback for a group without survivors. A RUNNING job on fewer than its
//! maximum workers grows the same way, into a new attempt from its members' state. After a
//! coordinator restart a RUNNING job waits for its members to re-register and runs on in the
//! same attempt (`readopt`); a RECOVERING job, or a running one whose members do not all come
//! back with the attempt, goes to RECOVERING in a new attempt. An ended job refuses cancel,
//! reports and checkpoint uploads, and ignores everything else.
//!
//! The transitions sit in one module per concept: starting attempts and growth (`attempt`),
//! cancelling and failing (`ending`), worker reports (`report`), the recovery records
//! (`recovery`), checkpoint uploads and the final checkpoint (`upload`), and restarts
//! (`readopt`).
//!
//! The caller (`state/`) holds the job and the worker registry under one lock, applies the
//! effects that change the registry or send a message to a worker there (so their order is
//! the order decided here), and carries out the rest (the store, the run directory, watchers)
//! after releasing it.

use super::error::CoordinatorError;
use super::record;
use cvdist_common::proto::{job_event, Abort, Assignment, JobInfo, JobReport, JobSpec, JobState};
use cvdist_common::{names, text};
use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::info;

mod attempt;
mod ending;
mod readopt;
mod recovery;
mod report;
mod upload;

pub use attempt::wants_growth;
pub use readopt::Readoption;
pub use upload::{check_upload_attempt, check_upload_position, final_checkpoint_name};

/// After a failed attempt, wait this long before re-forming the group, so that the
/// session of a worker that died (and caused the failure) is noticed first.
pub const RECOVERY_GRACE: Duration = Duration::from_secs(2);
/// Appended to the reason of a failure that a restart would only repeat.
pub const NOT_RESTARTED: &str = "not restarted: the same failure would repeat";

/// The moment an event happens: a monotonic instant for timeouts, Unix seconds for records.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix: f64,
}

impl Now {
    pub fn current() -> Now {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Now { instant: Instant::now(), unix }
    }
}

/// Everything about one job that its transitions read or change.
#[derive(Debug, Clone)]
pub struct Job {
    /// The record clients see and the store keeps.
    pub info: JobInfo,
    /// The job's spec: `info.spec`, which never changes after the submission, taken out of
    /// its `Option` once, when the job is made (see [`Job::new`]).
    spec: JobSpec,
    /// Worker ids by rank for the current attempt.
    pub members: Vec<String>,
    /// Ranks of the current attempt that reported `Finished`.
    pub finished: BTreeSet<u32>,
    /// While recovering: the attempt that failed and its members by rank, so that a rank
    /// reporting after its peers (whose rings broke) that the failure would repeat can
    /// still stop the restart.
    pub failed_attempt: Option<(u32, Vec<String>)>,
    /// Since when the job waits for workers (for its rendezvous timeout).
    pub waiting_since: Instant,
    /// The job is not scheduled before this (the recovery grace period).
    pub not_before: Instant,
    /// The newest refused checkpoint upload of the current attempt: (name, reason).
    pub refused_upload: Option<(String, String)>,
    /// What rank 0 said about the final checkpoint in its `Finished` report, if not stored.
    pub final_checkpoint_error: String,
    /// Where the current attempt started, and the furthest position its ranks reported:
    /// a checkpoint must lie between them (see [`check_upload_position`]).
    pub attempt_start: (u32, u64),
    pub attempt_reached: u32,
    /// The newest position (epoch, steps done in it) the current attempt reported: a progress
    /// report's, or the start of the epoch after an epoch report. What a recovery replays
    /// is measured up to here.
    pub attempt_position: (u32, u64),
    /// The world size of the group that stored `info.latest_checkpoint`, when this
    /// coordinator saw it stored (0: unknown). A group of another size restarts that
    /// checkpoint's epoch from its first step (the worker's resume rule).
    pub checkpoint_world_size: u32,
    /// The current attempt is a recovery (the last of `info.recoveries`) whose downtime
    /// ends at the attempt's first reported step past its start.
    pub awaiting_first_step: bool,
    /// After a coordinator restart, the running attempt waiting for its members to
    /// re-register (`machine/readopt.rs`).
    pub readopt: Option<Readoption>,
}

/// An idle worker the scheduler may place in a group: its id and data-plane address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleWorker {
    pub id: String,
    pub data_addr: String,
}

/// What happens to a job.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// The coordinator restarted and loaded this job from the store.
    Resumed,
    /// A scheduler pass: the idle workers in id order, and a fresh secret for the ring
    /// handshake should an attempt start.
    Schedule { idle: &'a [IdleWorker], secret: String },
    /// A scheduler pass for a RUNNING job that may grow: its members in
    /// rank order with their data-plane addresses, the idle workers in id order, and the
    /// secret of the next attempt.
    Grow { members: &'a [IdleWorker], idle: &'a [IdleWorker], secret: String },
    /// `CancelJob`.
    Cancel,
    /// A member of `attempt` was lost (its session ended or it missed heartbeats).
    MemberLost { attempt: u32, reason: String },
    /// A report from `worker` (whose session is current). `final_checkpoint_on_disk`: both files
    /// of the job's final checkpoint exist (only read for a `Finished` report).
    Report { worker: &'a str, report: JobReport, final_checkpoint_on_disk: bool },
    /// A verified checkpoint of `attempt` was stored under `name`.
    CheckpointStored { attempt: u32, name: String },
    /// A checkpoint upload of `attempt` was refused.
    CheckpointRefused { attempt: u32, name: String, reason: String },
    /// The coordinator restarted and loaded this job: a running attempt waits up to `window`
    /// for its members to re-register (`machine/readopt.rs`); other active jobs resume as
    /// after [`Event::Resumed`].
    Restarted { window: Duration },
    /// `worker` re-registered claiming `rank` of `attempt` in a group of `world_size`, at
    /// `position` (epoch, steps done); its proof was checked by the caller.
    Rejoin { worker: &'a str, attempt: u32, rank: u32, world_size: u32, position: (u32, u64) },
    /// `worker` registered without claiming the attempt being re-adopted.
    RegisteredIdle { worker: &'a str },
    /// A housekeeping pass: the re-adoption window may have passed.
    ReadoptDeadline,
}

/// What the caller must do after a transition, in this order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Mark the worker busy in this attempt and send it the assignment.
    Assign { worker: String, assignment: Assignment },
    /// Free the worker, if it still works on this job, and tell it to abort.
    Abort { worker: String, abort: Abort },
    /// Free the worker, if it still works on this job, without a message (it finished).
    Release { worker: String },
    /// Write the spec into the run directory (`job.json`).
    WriteSpec,
    /// Rewrite `metrics.jsonl` from the history.
    WriteMetrics,
    /// Store the job record.
    Persist,
    /// The job ended: store its record, write `summary.json` and `metrics.jsonl`, tell the
    /// watchers (a final snapshot) and trim what memory keeps of it.
    Finish,
    /// Tell the watchers, once the effects before it are durable.
    Publish(job_event::Event),
    /// Send the watchers the whole record as it is after this transition.
    PublishSnapshot,
    /// Workers were freed: the scheduler should look again.
    Wake,
}

/// A transition's effects, and for a scheduler pass whether later jobs must keep waiting.
#[derive(Debug, Default)]
pub struct Transition {
    pub effects: Vec<Effect>,
    /// First come, first served: the job waits for workers, so later jobs wait behind it.
    pub holds_queue: bool,
}

/// The lower-case name of a state, as `summary.json`, the metrics and messages show it.
pub fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Recovering => "recovering",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Unspecified => "unspecified",
    }
}

impl Job {
    /// The job of a record (a submission, or one loaded from the store). Every record is
    /// stored with its spec; a record without one would get the default spec, as every
    /// reader of it would.
    pub fn new(info: JobInfo, now: Instant) -> Job {
        Job {
            spec: info.spec.clone().unwrap_or_default(),
            info,
            members: Vec::new(),
            finished: BTreeSet::new(),
            failed_attempt: None,
            waiting_since: now,
            not_before: now,
            refused_upload: None,
            final_checkpoint_error: String::new(),
            attempt_start: (0, 0),
            attempt_reached: 0,
            attempt_position: (0, 0),
            checkpoint_world_size: 0,
            awaiting_first_step: false,
            readopt: None,
        }
    }

    /// A job just submitted (the spec is valid): QUEUED, to be written to its run directory
    /// and stored.
    pub fn submitted(id: String, spec: JobSpec, now: Now) -> (Job, Transition) {
        let info = JobInfo {
            id,
            spec: Some(spec.clone()),
            state: JobState::Queued as i32,
            created_unix: now.unix,
            ..Default::default()
        };
        let mut job = Job::new(info, now.instant);
        let mut t = Transition { effects: vec![Effect::WriteSpec], holds_queue: false };
        job.log(
            format!(
                "submitted: {} for {} epochs on {}..{} workers, {}",
                spec.model,
                spec.epochs,
                spec.min_workers,
                spec.max_workers,
                cvdist_common::spec::batch_description(&spec)
            ),
            now,
            &mut t,
        );
        // Stored after the first event, so a restarted coordinator still shows it.
        t.effects.push(Effect::Persist);
        (job, t)
    }

    pub fn state(&self) -> JobState {
        self.info.state()
    }

    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// The position (epoch, step) of the newest stored checkpoint; (0, 0) before the first.
    fn stored_position(&self) -> (u32, u64) {
        names::parse_checkpoint_name(&self.info.latest_checkpoint).unwrap_or((0, 0))
    }

    /// Appends a stamped line to the event log and publishes it.
    fn log(&mut self, line: String, now: Now, t: &mut Transition) {
        let line = text::bound(&line, text::MAX_EVENT_LINE);
        info!(job = %self.info.id, "{line}");
        let stamped = format!("{:.3} {line}", now.unix);
        self.info.events.push(stamped.clone());
        record::trim_events(&mut self.info);
        t.effects.push(Effect::Publish(job_event::Event::Log(stamped)));
    }
}

/// The one transition function: applies `event` to `job`. On `Err` the job is unchanged and
/// the caller answers with the error; an event that does not apply (a stale attempt, a job in
/// another state) changes nothing and yields no effects.
pub fn step(job: &mut Job, event: Event<'_>, now: Now) -> Result<Transition, CoordinatorError> {
    let mut t = Transition::default();
    match event {
        Event::Resumed => readopt::resume(job, now, &mut t),
        Event::Schedule { idle, secret } => attempt::schedule(job, idle, secret, now, &mut t),
        Event::Grow { members, idle, secret } => attempt::grow(job, members, idle, secret, now, &mut t),
        Event::Cancel => ending::cancel(job, now, &mut t)?,
        Event::MemberLost { attempt, reason } => ending::fail_attempt(job, attempt, reason, now, &mut t),
        Event::Report { worker, report, final_checkpoint_on_disk } => {
            report::on_report(job, worker, report, final_checkpoint_on_disk, now, &mut t)?
        }
        Event::CheckpointStored { attempt, name } => upload::stored(job, attempt, name, &mut t)?,
        Event::Restarted { window } => readopt::restarted(job, window, now, &mut t),
        Event::Rejoin { worker, attempt, rank, world_size, position } => {
            let claim = readopt::Claimed { worker, attempt, rank, world_size, position };
            readopt::rejoin(job, claim, now, &mut t)
        }
        Event::RegisteredIdle { worker } => readopt::member_back_without_attempt(job, worker, now, &mut t),
        Event::ReadoptDeadline => readopt::deadline(job, now, &mut t),
        Event::CheckpointRefused { attempt, name, reason } => upload::refused(job, attempt, name, reason, now, &mut t),
    }
    Ok(t)
}

#[cfg(test)]
mod tests;

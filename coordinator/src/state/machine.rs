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
//!             │ │ cancel                   worker lost │  │ group re-formed, resume from
//!             │ ▼                          or failed   ▼  │ the newest checkpoint
//!             │ CANCELLED ◀─────cancel────────────── RECOVERING
//!             │                                          │
//!             │ rendezvous timeout, or                   │ rendezvous timeout, data cannot be
//!             │ the data cannot be sharded               ▼ sharded, late permanent failure
//!             └────────────────────────────────────▶ FAILED
//! ```
//!
//! RUNNING also goes straight to CANCELLED (cancel) and to FAILED (a permanent failure, the
//! restart budget spent, or no final checkpoint); a coordinator restart sends RUNNING and
//! RECOVERING jobs to RECOVERING in a new attempt. An ended job refuses cancel, reports and
//! checkpoint uploads, and ignores everything else.
//!
//! The caller (`state.rs`) holds the job and the worker registry under one lock, applies the
//! effects that change the registry or send a message to a worker there (so their order is
//! the order decided here), and carries out the rest (the store, the run directory, watchers)
//! after releasing it.

use super::error::CoordinatorError;
use super::record;
use cvdist_common::proto::job_report::Kind;
use cvdist_common::proto::{
    job_event, Abort, Assignment, FailureKind, JobInfo, JobReport, JobSpec, JobState, Peer, Recovery, Resumed,
};
use cvdist_common::run_dir::outcome;
use cvdist_common::{names, spec, text};
use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::info;

mod readopt;
pub use readopt::Readoption;

/// After a failed attempt, wait this long before re-forming the group, so that the
/// session of a worker that died (and caused the failure) is noticed first.
pub const RECOVERY_GRACE: Duration = Duration::from_secs(2);
/// Recoveries kept per job record (the oldest go first): `max_restarts` is not bounded, and
/// every entry carries a cause of up to `text::MAX_REPORT_TEXT` bytes.
pub const MAX_RECOVERIES_KEPT: usize = 256;
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

/// Epoch and step encoded in a checkpoint name `ckpt-eEEEE-sSSSSSS`.
pub fn checkpoint_position(name: &str) -> Option<(u32, u64)> {
    names::parse_checkpoint_name(name).ok()
}

impl Job {
    pub fn new(info: JobInfo, now: Instant) -> Job {
        Job {
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
                "submitted: {} for {} epochs on {}..{} workers, batch {} per worker",
                spec.model, spec.epochs, spec.min_workers, spec.max_workers, spec.batch_size
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

    fn spec(&self) -> JobSpec {
        self.info.spec.clone().unwrap_or_default()
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
        Event::Resumed => resume(job, now, &mut t),
        Event::Schedule { idle, secret } => schedule(job, idle, secret, now, &mut t),
        Event::Grow { members, idle, secret } => grow(job, members, idle, secret, now, &mut t),
        Event::Cancel => cancel(job, now, &mut t)?,
        Event::MemberLost { attempt, reason } => fail_attempt(job, attempt, reason, now, &mut t),
        Event::Report { worker, report, final_checkpoint_on_disk } => {
            on_report(job, worker, report, final_checkpoint_on_disk, now, &mut t)?
        }
        Event::CheckpointStored { attempt, name } => {
            check_upload_attempt(job, attempt)?;
            job.info.latest_checkpoint = name;
            job.checkpoint_world_size = job.info.world_size;
            t.effects.push(Effect::Persist);
        }
        Event::Restarted { window } => readopt::restarted(job, window, now, &mut t),
        Event::Rejoin { worker, attempt, rank, world_size, position } => {
            let claim = readopt::Claimed { worker, attempt, rank, world_size, position };
            readopt::rejoin(job, claim, now, &mut t)
        }
        Event::RegisteredIdle { worker } => readopt::member_back_without_attempt(job, worker, now, &mut t),
        Event::ReadoptDeadline => readopt::deadline(job, now, &mut t),
        Event::CheckpointRefused { attempt, name, reason } => {
            if attempt == job.info.attempt && !job.state().is_terminal() {
                job.log(format!("checkpoint {name} refused: {reason}"), now, &mut t);
                job.refused_upload = Some((name, reason));
            }
        }
    }
    Ok(t)
}

/// RUNNING or RECOVERING when the coordinator stopped → RECOVERING in a new attempt: the
/// workers reconnect and the job resumes from the newest checkpoint.
fn resume(job: &mut Job, now: Now, t: &mut Transition) {
    if !matches!(job.state(), JobState::Running | JobState::Recovering) {
        return;
    }
    job.info.set_state(JobState::Recovering);
    job.info.attempt += 1;
    job.info.worker_ids.clear();
    job.log("coordinator restarted; waiting for workers to resume from the newest checkpoint".into(), now, t);
    t.effects.push(Effect::Persist);
}

/// QUEUED or RECOVERING: starts an attempt when enough workers are idle, or fails the job
/// when its rendezvous times out or the world size cannot shard its data.
fn schedule(job: &mut Job, idle: &[IdleWorker], secret: String, now: Now, t: &mut Transition) {
    if !matches!(job.state(), JobState::Queued | JobState::Recovering) || now.instant < job.not_before {
        return;
    }
    let spec = job.spec();
    if idle.len() < spec.min_workers as usize {
        let limit = spec.rendezvous_timeout_s;
        if limit > 0 && now.instant.saturating_duration_since(job.waiting_since) > Duration::from_secs(limit as u64) {
            let msg = format!(
                "rendezvous timed out after {limit}s: {} of at least {} workers available",
                idle.len(),
                spec.min_workers
            );
            fail_job(job, msg, outcome::FAILED, now, t);
        }
        // First come, first served: later jobs wait behind this one.
        t.holds_queue = true;
        return;
    }
    let n = idle.len().min(spec.max_workers as usize);
    if let Err(e) = spec::check_shard(&spec, n as u32) {
        fail_job(job, e.to_string(), outcome::CONFIGURATION, now, t);
        return;
    }
    start_attempt(job, &idle[..n], secret, now, t);
}

/// Whether a RUNNING job would take more workers now: it runs on fewer
/// than its maximum, is not being re-adopted, and its attempt has completed a step past its
/// start (a group that just formed trains before it is re-formed again, so workers that
/// register one after another do not stop it at every registration).
pub fn wants_growth(job: &Job) -> bool {
    let max = job.info.spec.as_ref().map_or(0, |s| s.max_workers as usize);
    job.state() == JobState::Running
        && job.readopt.is_none()
        && job.members.len() < max
        && job.attempt_position > job.attempt_start
}

/// RUNNING on fewer than its maximum workers, with idle workers → a new attempt on
/// `members` (the current ones, rank order kept) plus as many `idle` workers as the job
/// takes, continuing from the members' in-memory state: the
/// members are told to stop (each at a step boundary, keeping the state of its last complete
/// step) and the assignments name the attempt they leave as the live one. No step is
/// trained again and no restart is counted; the rest of the epoch is re-sharded over the new
/// world size (worker/src/train/position.rs) and `--scale-lr` scales by it from the next
/// step. Nothing happens when the grown size would not shard the data.
fn grow(job: &mut Job, members: &[IdleWorker], idle: &[IdleWorker], secret: String, now: Now, t: &mut Transition) {
    if !wants_growth(job) || idle.is_empty() || members.len() != job.members.len() {
        return;
    }
    let spec = job.spec();
    let current = members.len();
    let n = (current + idle.len()).min(spec.max_workers as usize);
    if spec::check_shard(&spec, n as u32).is_err() {
        return;
    }
    let old_attempt = job.info.attempt;
    let reason = format!("growing from {current} to {n} workers");
    job.failed_attempt = Some((old_attempt, job.members.clone()));
    release_members(job, &reason, t);
    job.info.attempt += 1;
    let (epoch, step) = job.attempt_position;
    let lr = if spec.scale_lr {
        format!("; the learning rate is scaled by {n} instead of {current} from here (--scale-lr)")
    } else {
        String::new()
    };
    job.log(
        format!(
            "{reason} ({} idle): attempt {} continues from the members' live state after epoch {epoch} step {step}, \
             global batch {} instead of {}{lr}",
            idle.len(),
            job.info.attempt,
            n as u64 * u64::from(spec.batch_size),
            current as u64 * u64::from(spec.batch_size),
        ),
        now,
        t,
    );
    let mut group = members.to_vec();
    group.extend_from_slice(&idle[..n - current]);
    start_attempt(job, &group, secret, now, t);
}

fn start_attempt(job: &mut Job, members: &[IdleWorker], secret: String, now: Now, t: &mut Transition) {
    let spec = job.spec();
    let attempt = job.info.attempt;
    let (start_epoch, start_step) = checkpoint_position(&job.info.latest_checkpoint).unwrap_or((0, 0));
    let live_attempt = job.failed_attempt.as_ref().map(|(a, _)| *a);
    let live_max_epoch = job.info.history.last().map_or(0, |m| m.epoch + 1);
    let peers: Vec<Peer> = members
        .iter()
        .enumerate()
        .map(|(rank, w)| Peer { rank: rank as u32, worker_id: w.id.clone(), data_addr: w.data_addr.clone() })
        .collect();
    for (rank, w) in members.iter().enumerate() {
        let assignment = Assignment {
            job_id: job.info.id.clone(),
            attempt,
            rank: rank as u32,
            world_size: members.len() as u32,
            peers: peers.clone(),
            spec: Some(spec.clone()),
            start_epoch,
            start_step,
            checkpoint: job.info.latest_checkpoint.clone(),
            session_secret: secret.clone(),
            // A recovery: survivors of the failed attempt hold its state in memory;
            // the checkpoint is the fallback when none of them is in the group.
            live: live_attempt.is_some(),
            live_attempt: live_attempt.unwrap_or(0),
            live_max_epoch,
        };
        t.effects.push(Effect::Assign { worker: w.id.clone(), assignment });
    }
    let ids: Vec<String> = members.iter().map(|w| w.id.clone()).collect();
    job.members = ids.clone();
    job.finished.clear();
    job.failed_attempt = None;
    job.refused_upload = None;
    job.final_checkpoint_error.clear();
    job.attempt_start = (start_epoch, start_step);
    job.attempt_reached = start_epoch;
    job.attempt_position = (start_epoch, start_step);
    resume_recovery(job, ids.len() as u32, (start_epoch, start_step));
    job.info.set_state(JobState::Running);
    job.info.world_size = ids.len() as u32;
    job.info.worker_ids = ids.clone();
    if job.info.started_unix == 0.0 {
        job.info.started_unix = now.unix;
    }
    let from = if job.info.latest_checkpoint.is_empty() {
        "from scratch".to_string()
    } else {
        format!("from {}", job.info.latest_checkpoint)
    };
    job.log(format!("attempt {attempt} started on {} workers ({}) {from}", ids.len(), ids.join(", ")), now, t);
    t.effects.push(Effect::Persist);
    t.effects.push(Effect::PublishSnapshot);
}

/// Any state but an ended one → CANCELLED; the members are told to abort.
fn cancel(job: &mut Job, now: Now, t: &mut Transition) -> Result<(), CoordinatorError> {
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
fn fail_attempt(job: &mut Job, attempt: u32, reason: String, now: Now, t: &mut Transition) {
    if job.state() == JobState::Recovering && job.failed_attempt.as_ref().is_some_and(|(a, _)| *a == attempt) {
        note_lost_member(job, &reason);
        return;
    }
    if job.info.attempt != attempt || job.state() != JobState::Running {
        return;
    }
    // A recovery whose new group failed before completing a step ends unmeasured.
    end_recovery(job, now, t);
    let old_world_size = job.members.len() as u32;
    job.failed_attempt = Some((attempt, job.members.clone()));
    release_members(job, &reason, t);
    let spec = job.spec();
    job.info.restarts += 1;
    job.info.attempt += 1;
    if job.info.restarts > spec.max_restarts {
        let msg = format!("{reason}; restart budget of {} exhausted", spec.max_restarts);
        fail_job(job, msg, outcome::FAILED, now, t);
        return;
    }
    begin_recovery(job, attempt, &reason, old_world_size, now);
    job.info.set_state(JobState::Recovering);
    job.info.message = text::bound(&reason, text::MAX_REPORT_TEXT);
    job.waiting_since = now.instant;
    job.not_before = now.instant + RECOVERY_GRACE;
    let resume = if job.info.latest_checkpoint.is_empty() {
        "the start".to_string()
    } else {
        job.info.latest_checkpoint.clone()
    };
    job.log(
        format!("{reason}; recovering (restart {} of {}) from {resume}", job.info.restarts, spec.max_restarts),
        now,
        t,
    );
    t.effects.push(Effect::Persist);
    t.effects.push(Effect::PublishSnapshot);
}

/// → FAILED; `why` is its one-word outcome (`run_dir::outcome`).
fn fail_job(job: &mut Job, reason: String, why: &str, now: Now, t: &mut Transition) {
    end_recovery(job, now, t);
    job.info.set_state(JobState::Failed);
    job.info.message = text::bound(&reason, text::MAX_REPORT_TEXT);
    job.info.outcome = why.to_string();
    job.info.finished_unix = now.unix;
    job.log(format!("failed: {reason}"), now, t);
    t.effects.push(Effect::Finish);
}

/// Frees the job's members; those still in it are told to abort when `reason` is non-empty.
fn release_members(job: &mut Job, reason: &str, t: &mut Transition) {
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

/// A report from `worker`, whose session is the current one. Reports from an aborted
/// attempt change nothing, except a permanent failure of the attempt that just failed.
fn on_report(
    job: &mut Job,
    worker: &str,
    report: JobReport,
    final_on_disk: bool,
    now: Now,
    t: &mut Transition,
) -> Result<(), CoordinatorError> {
    if job.state().is_terminal() {
        return Err(CoordinatorError::ReportAfterEnd(report.job_id));
    }
    let failure_kind = FailureKind::try_from(report.failure_kind).unwrap_or(FailureKind::Unspecified);
    // A rank whose failure would repeat (it diverged, say) can report after its peers,
    // whose rings broke because it stopped, already ended the attempt as retryable: while
    // the group is still waiting to be re-formed, its reason replaces theirs.
    if let Some(Kind::Failed(text)) = &report.kind {
        let same_attempt = job.failed_attempt.as_ref().is_some_and(|(attempt, members)| {
            *attempt == report.attempt && members.get(report.rank as usize).map(String::as_str) == Some(worker)
        });
        if outcome::is_permanent(failure_kind) && job.state() == JobState::Recovering && same_attempt {
            // RECOVERING → FAILED: the restart being prepared does not happen.
            job.info.restarts = job.info.restarts.saturating_sub(1);
            job.info.attempt = report.attempt;
            if job.info.recoveries.last().is_some_and(|r| r.attempt == report.attempt && r.new_world_size == 0) {
                job.info.recoveries.pop();
            }
            let reason = format!("rank {} on {worker} failed: {text}; {NOT_RESTARTED}", report.rank);
            fail_job(job, reason, outcome::of_failure(failure_kind), now, t);
            t.effects.push(Effect::Wake);
            return Ok(());
        }
    }
    // Reports from an aborted attempt arrive late; they must not touch the new one.
    if report.attempt != job.info.attempt || job.members.get(report.rank as usize).map(String::as_str) != Some(worker) {
        return Ok(());
    }
    let epochs = job.info.spec.as_ref().map(|s| s.epochs).unwrap_or(0);
    let epoch_ok = |epoch: u32, what: &'static str| {
        if epoch < epochs {
            Ok(())
        } else {
            Err(CoordinatorError::EpochOutOfRange { what, epoch, job: job.info.id.clone(), epochs })
        }
    };
    match &report.kind {
        Some(Kind::Progress(p)) => epoch_ok(p.epoch, "progress report")?,
        Some(Kind::Epoch(m)) => epoch_ok(m.epoch, "epoch report")?,
        _ => {}
    }
    match report.kind {
        Some(Kind::Progress(p)) => {
            job.attempt_reached = job.attempt_reached.max(p.epoch);
            job.attempt_position = job.attempt_position.max((p.epoch, p.step));
            job.info.progress = Some(p);
            t.effects.push(Effect::Publish(job_event::Event::Progress(p)));
            first_step_check(job, now, t);
        }
        Some(Kind::Resumed(r)) => {
            if report.rank == 0 && r.live {
                resumed_live(job, &r, now, t);
            }
        }
        Some(Kind::Epoch(mut m)) => {
            // A re-registered worker sends its epoch reports again: an
            // attempt reports each epoch once, so one already recorded is a copy.
            if job.info.history.iter().any(|h| h.epoch == m.epoch && h.attempt == job.info.attempt) {
                return Ok(());
            }
            job.attempt_reached = job.attempt_reached.max(m.epoch + 1);
            job.attempt_position = job.attempt_position.max((m.epoch + 1, 0));
            first_step_check(job, now, t);
            m.attempt = job.info.attempt;
            // After a restart an epoch may be trained again; the newer record replaces it.
            job.info.history.retain(|h| h.epoch < m.epoch);
            job.info.history.push(m);
            t.effects.push(Effect::WriteMetrics);
            t.effects.push(Effect::Persist);
            t.effects.push(Effect::Publish(job_event::Event::Epoch(m)));
        }
        Some(Kind::Finished(f)) => {
            job.finished.insert(report.rank);
            if report.rank == 0 {
                job.final_checkpoint_error = f.final_checkpoint_error.clone();
            }
            if job.finished.len() == job.members.len() {
                release_members(job, "", t);
                // Trained to the end is not success until the final model is stored.
                if let Some(why) = final_checkpoint_missing(job, final_on_disk) {
                    fail_job(job, why, outcome::FINAL_CHECKPOINT_MISSING, now, t);
                } else {
                    // RUNNING → SUCCEEDED.
                    end_recovery(job, now, t);
                    job.info.set_state(JobState::Succeeded);
                    job.info.finished_unix = now.unix;
                    // From the recorded history: a group that resumed from the final
                    // checkpoint trains nothing and reports no accuracy of its own.
                    let acc = job.info.history.last().map(|m| m.test_acc).unwrap_or(f.final_test_acc);
                    job.info.message = format!("final test accuracy {:.2}%", acc * 100.0);
                    job.info.outcome = "succeeded".into();
                    job.log(format!("succeeded: {}", job.info.message), now, t);
                    t.effects.push(Effect::Finish);
                }
                t.effects.push(Effect::Wake);
            }
        }
        Some(Kind::Failed(why)) => {
            let why = text::bound(&why, text::MAX_REPORT_TEXT);
            let reason = format!("rank {} on {worker} failed: {why}", report.rank);
            if outcome::is_permanent(failure_kind) {
                // Divergence from a deterministic state, a configuration the workers
                // cannot run, bad data: a restart would fail the same way, so the job
                // fails now (RUNNING → FAILED), with this reason, and its restart budget
                // stays unused.
                release_members(job, &reason, t);
                fail_job(job, format!("{reason}; {NOT_RESTARTED}"), outcome::of_failure(failure_kind), now, t);
            } else if job.readopting().is_some() {
                readopt::member_failed(job, &reason, now, t);
            } else {
                let attempt = job.info.attempt;
                fail_attempt(job, attempt, reason, now, t);
            }
            t.effects.push(Effect::Wake);
        }
        None => return Err(CoordinatorError::EmptyReport),
    }
    Ok(())
}

/// A recovery starts: the attempt `attempt` of `old_world_size` members failed for `cause`.
/// Records where it had got to (its newest reported position, or the newest stored
/// checkpoint if that is further).
fn begin_recovery(job: &mut Job, attempt: u32, cause: &str, old_world_size: u32, now: Now) {
    let stored = checkpoint_position(&job.info.latest_checkpoint).unwrap_or((0, 0));
    let (reached_epoch, reached_step) = job.attempt_position.max(stored);
    job.info.recoveries.push(Recovery {
        attempt,
        cause: text::bound(cause, text::MAX_REPORT_TEXT),
        lost_unix: now.unix,
        old_world_size,
        reached_epoch,
        reached_step,
        ..Default::default()
    });
    let len = job.info.recoveries.len();
    if len > MAX_RECOVERIES_KEPT {
        job.info.recoveries.drain(..len - MAX_RECOVERIES_KEPT);
    }
}

/// A member of the failed attempt was lost while the group waits to be re-formed: a survivor's
/// report of the broken ring often arrives before the dead worker's session is noticed, so
/// the recovery's cause names the lost worker too.
fn note_lost_member(job: &mut Job, reason: &str) {
    if let Some(r) = job.info.recoveries.last_mut() {
        if r.new_world_size == 0 && !r.cause.contains(reason) {
            r.cause = text::bound(&format!("{}; {reason}", r.cause), text::MAX_REPORT_TEXT);
        }
    }
}

/// The new group of a pending recovery starts with `new_world_size` members from `start`:
/// counts the steps of the failed group it will train again.
fn resume_recovery(job: &mut Job, new_world_size: u32, start: (u32, u64)) {
    let spec = job.spec();
    let checkpoint_world_size = job.checkpoint_world_size;
    let Some(r) = job.info.recoveries.last_mut().filter(|r| r.new_world_size == 0) else { return };
    r.new_world_size = new_world_size;
    r.resumed_from = job.info.latest_checkpoint.clone();
    // The worker resumes mid-epoch only at the checkpoint's own world size (unknown: assume
    // the failed group stored it); otherwise it restarts that epoch.
    let stored_by = if checkpoint_world_size == 0 { r.old_world_size } else { checkpoint_world_size };
    let start_step = if stored_by == new_world_size { start.1 } else { 0 };
    // In steps of the failed group: its epochs are what it trained.
    let per_epoch = spec::steps_per_epoch(&spec, r.old_world_size);
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
fn resumed_live(job: &mut Job, r: &Resumed, now: Now, t: &mut Transition) {
    let spec = job.spec();
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
        let per_epoch = spec::steps_per_epoch(&spec, rec.old_world_size);
        let per_step = u64::from(rec.old_world_size).saturating_mul(u64::from(spec.batch_size)).max(1);
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
fn first_step_check(job: &mut Job, now: Now, t: &mut Transition) {
    if job.awaiting_first_step && job.attempt_position > job.attempt_start {
        let lost = job.info.recoveries.last().map(|r| r.lost_unix).unwrap_or(now.unix);
        close_recovery(job, Some((now.unix - lost).max(0.0)), now, t);
        t.effects.push(Effect::Persist);
    }
}

/// The job ends or its new group failed again: a recovery still waiting for its first step
/// (or for its group) ends with no downtime measured.
fn end_recovery(job: &mut Job, now: Now, t: &mut Transition) {
    let waiting_for_group = job.info.recoveries.last().is_some_and(|r| r.new_world_size == 0);
    if job.awaiting_first_step || waiting_for_group {
        close_recovery(job, None, now, t);
    }
}

/// Writes the last recovery's one line in the job log.
fn close_recovery(job: &mut Job, downtime: Option<f64>, now: Now, t: &mut Transition) {
    job.awaiting_first_step = false;
    let n = job.info.recoveries.len();
    let Some(r) = job.info.recoveries.last_mut() else { return };
    r.downtime_seconds = downtime;
    let line = if r.new_world_size == 0 {
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
    };
    job.log(line, now, t);
}

/// The name of the job's final checkpoint (the one after its last epoch).
pub fn final_checkpoint_name(job: &Job) -> String {
    names::checkpoint_name(job.info.spec.as_ref().map(|s| s.epochs).unwrap_or(0), 0)
}

/// Why the job's final checkpoint is not stored, if not; `on_disk`: both its files exist.
fn final_checkpoint_missing(job: &Job, on_disk: bool) -> Option<String> {
    let name = final_checkpoint_name(job);
    if job.info.latest_checkpoint == name && on_disk {
        return None;
    }
    let why = match (&job.refused_upload, job.final_checkpoint_error.as_str()) {
        (Some((refused, reason)), _) if *refused == name => format!("the coordinator refused it: {reason}"),
        (_, e) if !e.is_empty() => e.to_string(),
        (Some((refused, reason)), _) => {
            format!("rank 0 did not upload it; the last refused upload was {refused}: {reason}")
        }
        (None, _) => "rank 0 did not upload it".to_string(),
    };
    let newest =
        if job.info.latest_checkpoint.is_empty() { "none".to_string() } else { job.info.latest_checkpoint.clone() };
    Some(format!(
        "training finished but the final checkpoint {name} was not stored: {why}; newest stored checkpoint: {newest}"
    ))
}

fn refuse(job: &Job, why: String) -> CoordinatorError {
    CoordinatorError::CheckpointRefused { job_id: job.info.id.clone(), why }
}

/// A checkpoint upload must be for the job's current attempt, while it runs.
pub fn check_upload_attempt(job: &Job, attempt: u32) -> Result<(), CoordinatorError> {
    if job.state() != JobState::Running || attempt != job.info.attempt {
        return Err(refuse(
            job,
            format!(
                "the job is {} on attempt {}, the upload is for attempt {attempt}",
                state_name(job.state()),
                job.info.attempt
            ),
        ));
    }
    Ok(())
}

/// A checkpoint at `pos` (epoch, step) must be one the current attempt can have reached:
/// after where it started and after the newest stored checkpoint, within the job's epochs,
/// and at most `slack` epochs past what its ranks reported.
pub fn check_upload_position(job: &Job, attempt: u32, pos: (u32, u64), slack: u32) -> Result<(), CoordinatorError> {
    let spec = job.spec();
    let newest = checkpoint_position(&job.info.latest_checkpoint).unwrap_or((0, 0));
    let shown = names::checkpoint_name(pos.0, pos.1);
    if pos <= job.attempt_start || pos <= newest {
        return Err(refuse(
            job,
            format!(
                "{shown} is not after where attempt {attempt} started ({}) and the newest checkpoint ({})",
                names::checkpoint_name(job.attempt_start.0, job.attempt_start.1),
                if job.info.latest_checkpoint.is_empty() { "none" } else { &job.info.latest_checkpoint }
            ),
        ));
    }
    let reached = job.attempt_reached.max(job.attempt_start.0);
    if pos.0 > spec.epochs || (pos.0 == spec.epochs && pos.1 > 0) || pos.0 > reached + slack {
        return Err(refuse(
            job,
            format!(
                "{shown} does not follow from the attempt's progress (started at epoch {}, reported epoch {reached}, {} epochs)",
                job.attempt_start.0, spec.epochs
            ),
        ));
    }
    Ok(())
}

/// Every edge of the diagram above, and the events a job ignores or refuses in each state.
#[cfg(test)]
mod tests {
    use super::*;
    use cvdist_common::proto::{EpochMetrics, Finished, Progress};

    const ID: &str = "j0001-resnet20";

    fn now() -> Now {
        Now::current()
    }

    fn later(now: Now, by: Duration) -> Now {
        Now { instant: now.instant + by, unix: now.unix + by.as_secs_f64() }
    }

    fn spec(min: u32, max: u32) -> JobSpec {
        JobSpec { min_workers: min, max_workers: max, ..spec::default_spec("resnet20", 2) }
    }

    fn queued(spec: JobSpec) -> Job {
        Job::submitted(ID.into(), spec, now()).0
    }

    fn idle(n: usize) -> Vec<IdleWorker> {
        (0..n).map(|i| IdleWorker { id: format!("w{i}"), data_addr: format!("127.0.0.1:{}", 40000 + i) }).collect()
    }

    fn schedule(job: &mut Job, workers: &[IdleWorker], at: Now) -> Transition {
        step(job, Event::Schedule { idle: workers, secret: "s".into() }, at).expect("scheduling is never refused")
    }

    /// A job RUNNING on w0, w1 in attempt 0.
    fn running() -> Job {
        let mut job = queued(spec(2, 2));
        schedule(&mut job, &idle(2), now());
        assert_eq!(job.state(), JobState::Running);
        job
    }

    fn report(job: &mut Job, worker: &str, rank: u32, kind: Kind, on_disk: bool) -> Transition {
        report_kind(job, worker, rank, kind, FailureKind::Unspecified, on_disk).expect("report accepted")
    }

    fn report_kind(
        job: &mut Job,
        worker: &str,
        rank: u32,
        kind: Kind,
        failure: FailureKind,
        on_disk: bool,
    ) -> Result<Transition, CoordinatorError> {
        let r = JobReport {
            job_id: job.info.id.clone(),
            attempt: job.info.attempt,
            rank,
            kind: Some(kind),
            failure_kind: failure as i32,
        };
        step(job, Event::Report { worker, report: r, final_checkpoint_on_disk: on_disk }, now())
    }

    fn finished() -> Kind {
        Kind::Finished(Finished { final_test_acc: 0.5, ..Default::default() })
    }

    fn lose_member(job: &mut Job) -> Transition {
        let attempt = job.info.attempt;
        step(job, Event::MemberLost { attempt, reason: "worker w1 lost (session closed)".into() }, now()).unwrap()
    }

    fn aborts(t: &Transition) -> Vec<(String, u32)> {
        t.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Abort { worker, abort } => Some((worker.clone(), abort.attempt)),
                _ => None,
            })
            .collect()
    }

    fn kinds(t: &Transition) -> Vec<&'static str> {
        t.effects
            .iter()
            .map(|e| match e {
                Effect::Assign { .. } => "assign",
                Effect::Abort { .. } => "abort",
                Effect::Release { .. } => "release",
                Effect::WriteSpec => "write_spec",
                Effect::WriteMetrics => "write_metrics",
                Effect::Persist => "persist",
                Effect::Finish => "finish",
                Effect::Publish(job_event::Event::Log(_)) => "log",
                Effect::Publish(_) => "publish",
                Effect::PublishSnapshot => "snapshot",
                Effect::Wake => "wake",
            })
            .collect()
    }

    #[test]
    fn submit_makes_a_queued_job_written_then_stored() {
        let (job, t) = Job::submitted(ID.into(), spec(1, 1), now());
        assert_eq!(job.state(), JobState::Queued);
        assert_eq!(kinds(&t), ["write_spec", "log", "persist"]);
        assert!(
            job.info.events[0].contains("submitted: resnet20 for 2 epochs on 1..1 workers"),
            "{:?}",
            job.info.events
        );
    }

    #[test]
    fn queued_to_running_assigns_ranks_in_worker_order() {
        let mut job = queued(spec(2, 3));
        let t = schedule(&mut job, &idle(4), now());
        assert_eq!(job.state(), JobState::Running);
        assert_eq!(kinds(&t), ["assign", "assign", "assign", "log", "persist", "snapshot"]);
        let ranks: Vec<(String, u32, u32)> = t
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Assign { worker, assignment } => Some((worker.clone(), assignment.rank, assignment.world_size)),
                _ => None,
            })
            .collect();
        assert_eq!(ranks, [("w0".into(), 0, 3), ("w1".into(), 1, 3), ("w2".into(), 2, 3)]);
        assert_eq!(job.members, ["w0", "w1", "w2"]);
        assert_eq!(job.info.worker_ids, ["w0", "w1", "w2"]);
        assert!(!t.holds_queue);
    }

    #[test]
    fn a_queued_job_short_of_workers_waits_and_holds_the_queue() {
        let mut job = queued(JobSpec { rendezvous_timeout_s: 60, ..spec(2, 2) });
        let t = schedule(&mut job, &idle(1), later(now(), Duration::from_secs(30)));
        assert_eq!(job.state(), JobState::Queued);
        assert!(t.effects.is_empty() && t.holds_queue);
    }

    #[test]
    fn queued_to_failed_when_the_rendezvous_times_out() {
        let mut job = queued(JobSpec { rendezvous_timeout_s: 5, ..spec(2, 2) });
        let t = schedule(&mut job, &idle(1), later(now(), Duration::from_secs(6)));
        assert_eq!(job.state(), JobState::Failed);
        assert_eq!(job.info.outcome, outcome::FAILED);
        assert_eq!(job.info.message, "rendezvous timed out after 5s: 1 of at least 2 workers available");
        assert_eq!(kinds(&t), ["log", "finish"]);
        assert!(t.holds_queue, "later jobs still wait behind it this pass");
    }

    #[test]
    fn queued_to_failed_when_the_world_size_cannot_shard_the_data() {
        let mut job = queued(JobSpec { batch_size: 30_000, ..spec(2, 2) });
        let t = schedule(&mut job, &idle(2), now());
        assert_eq!(job.state(), JobState::Failed);
        assert_eq!(job.info.outcome, outcome::CONFIGURATION);
        assert!(job.info.message.contains("batch"), "{}", job.info.message);
        assert_eq!(kinds(&t), ["log", "finish"]);
        assert!(!t.holds_queue, "a job that cannot run does not hold the queue");
    }

    #[test]
    fn queued_to_cancelled() {
        let mut job = queued(spec(1, 1));
        let t = step(&mut job, Event::Cancel, now()).unwrap();
        assert_eq!(job.state(), JobState::Cancelled);
        assert_eq!((job.info.outcome.as_str(), job.info.message.as_str()), ("cancelled", "cancelled by user"));
        assert_eq!(kinds(&t), ["log", "finish"]);
    }

    #[test]
    fn running_to_succeeded_once_every_rank_finished_and_the_final_checkpoint_is_stored() {
        let mut job = running();
        job.info.latest_checkpoint = names::checkpoint_name(2, 0);
        let t = report(&mut job, "w1", 1, finished(), true);
        assert_eq!(job.state(), JobState::Running, "one rank of two finished");
        assert!(t.effects.is_empty());
        let t = report(&mut job, "w0", 0, finished(), true);
        assert_eq!(job.state(), JobState::Succeeded);
        assert_eq!(job.info.outcome, "succeeded");
        assert_eq!(job.info.message, "final test accuracy 50.00%");
        assert_eq!(kinds(&t), ["release", "release", "log", "finish", "wake"]);
    }

    #[test]
    fn running_to_failed_when_the_final_checkpoint_is_missing() {
        let mut job = running();
        job.info.latest_checkpoint = names::checkpoint_name(1, 0);
        report(&mut job, "w1", 1, finished(), false);
        let t = report(&mut job, "w0", 0, finished(), false);
        assert_eq!(job.state(), JobState::Failed);
        assert_eq!(job.info.outcome, outcome::FINAL_CHECKPOINT_MISSING);
        assert_eq!(
            job.info.message,
            "training finished but the final checkpoint ckpt-e0002-s000000 was not stored: rank 0 did not upload it; \
             newest stored checkpoint: ckpt-e0001-s000000"
        );
        assert_eq!(kinds(&t), ["release", "release", "log", "finish", "wake"]);
    }

    #[test]
    fn running_to_recovering_when_a_member_is_lost() {
        let mut job = running();
        let at = now();
        let t = step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost (eof)".into() }, at).unwrap();
        assert_eq!(job.state(), JobState::Recovering);
        assert_eq!((job.info.attempt, job.info.restarts), (1, 1));
        assert_eq!(aborts(&t), [("w0".into(), 0), ("w1".into(), 0)], "every member, with the failed attempt");
        assert_eq!(kinds(&t), ["abort", "abort", "log", "persist", "snapshot"]);
        assert_eq!(job.not_before, at.instant + RECOVERY_GRACE);
        assert_eq!(job.failed_attempt, Some((0, vec!["w0".to_string(), "w1".to_string()])));
        assert!(job.members.is_empty());
    }

    #[test]
    fn running_to_recovering_when_a_rank_reports_a_retryable_failure() {
        let mut job = running();
        let t =
            report_kind(&mut job, "w1", 1, Kind::Failed("ring broke".into()), FailureKind::Retryable, false).unwrap();
        assert_eq!(job.state(), JobState::Recovering);
        assert_eq!(job.info.message, "rank 1 on w1 failed: ring broke");
        assert_eq!(kinds(&t), ["abort", "abort", "log", "persist", "snapshot", "wake"]);
    }

    #[test]
    fn running_to_failed_when_the_restart_budget_is_spent() {
        let mut job = queued(JobSpec { max_restarts: 1, ..spec(2, 2) });
        schedule(&mut job, &idle(2), now());
        lose_member(&mut job);
        assert_eq!(job.state(), JobState::Recovering);
        schedule(&mut job, &idle(2), later(now(), RECOVERY_GRACE * 2));
        assert_eq!(job.state(), JobState::Running);
        let t = lose_member(&mut job);
        assert_eq!(job.state(), JobState::Failed);
        assert_eq!(job.info.outcome, outcome::FAILED);
        assert_eq!(job.info.message, "worker w1 lost (session closed); restart budget of 1 exhausted");
        // First the line of the recovery whose group never completed a step.
        assert_eq!(kinds(&t), ["log", "abort", "abort", "log", "finish"]);
        assert_eq!(job.info.recoveries.len(), 1, "the failure that spent the budget is no recovery");
        assert_eq!(job.info.recoveries[0].downtime_seconds, None);
    }

    #[test]
    fn running_to_failed_on_a_permanent_failure_without_using_the_budget() {
        let mut job = running();
        let t =
            report_kind(&mut job, "w0", 0, Kind::Failed("loss is NaN".into()), FailureKind::Diverged, false).unwrap();
        assert_eq!(job.state(), JobState::Failed);
        assert_eq!(job.info.outcome, outcome::DIVERGED);
        assert_eq!(job.info.message, format!("rank 0 on w0 failed: loss is NaN; {NOT_RESTARTED}"));
        assert_eq!(job.info.restarts, 0);
        assert_eq!(kinds(&t), ["abort", "abort", "log", "finish", "wake"]);
    }

    #[test]
    fn running_to_cancelled_aborts_the_members() {
        let mut job = running();
        let t = step(&mut job, Event::Cancel, now()).unwrap();
        assert_eq!(job.state(), JobState::Cancelled);
        assert_eq!(aborts(&t), [("w0".into(), 0), ("w1".into(), 0)]);
        assert_eq!(kinds(&t), ["abort", "abort", "log", "finish"]);
    }

    #[test]
    fn recovering_to_running_after_the_grace_period_from_the_newest_checkpoint() {
        let mut job = running();
        job.info.latest_checkpoint = names::checkpoint_name(1, 0);
        lose_member(&mut job);
        let t = schedule(&mut job, &idle(2), now());
        assert_eq!(job.state(), JobState::Recovering, "not within the grace period");
        assert!(t.effects.is_empty() && !t.holds_queue, "a job in its grace period holds no one");
        let t = schedule(&mut job, &idle(1), later(now(), RECOVERY_GRACE * 2));
        assert_eq!(job.state(), JobState::Recovering, "min 2 workers, 1 idle");
        assert!(t.holds_queue);
        let t = schedule(&mut job, &idle(3), later(now(), RECOVERY_GRACE * 2));
        assert_eq!(job.state(), JobState::Running);
        match &t.effects[0] {
            Effect::Assign { assignment, .. } => {
                assert_eq!((assignment.attempt, assignment.start_epoch, assignment.start_step), (1, 1, 0));
                assert_eq!(assignment.checkpoint, "ckpt-e0001-s000000");
            }
            other => panic!("expected an assignment first, got {other:?}"),
        }
        assert_eq!(job.attempt_start, (1, 0));
    }

    #[test]
    fn recovering_to_failed_when_the_rendezvous_times_out() {
        let mut job = queued(JobSpec { rendezvous_timeout_s: 5, ..spec(2, 2) });
        schedule(&mut job, &idle(2), now());
        lose_member(&mut job);
        let t = schedule(&mut job, &idle(1), later(now(), Duration::from_secs(10)));
        assert_eq!(job.state(), JobState::Failed);
        assert_eq!(job.info.message, "rendezvous timed out after 5s: 1 of at least 2 workers available");
        assert_eq!(kinds(&t), ["log", "log", "finish"], "the recovery's line, then the failure's");
        assert!(
            job.info
                .events
                .iter()
                .any(|e| e.ends_with("recovery 1: worker w1 lost (session closed); 2 workers; not resumed")),
            "{:?}",
            job.info.events
        );
    }

    #[test]
    fn recovering_to_failed_on_a_late_permanent_failure_of_the_failed_attempt() {
        let mut job = running();
        lose_member(&mut job);
        assert_eq!((job.info.attempt, job.info.restarts), (1, 1));
        let late = JobReport {
            job_id: ID.into(),
            attempt: 0,
            rank: 0,
            kind: Some(Kind::Failed("loss is NaN".into())),
            failure_kind: FailureKind::Diverged as i32,
        };
        let t = step(&mut job, Event::Report { worker: "w0", report: late, final_checkpoint_on_disk: false }, now())
            .unwrap();
        assert_eq!(job.state(), JobState::Failed);
        assert_eq!((job.info.attempt, job.info.restarts), (0, 0), "the restart being prepared does not count");
        assert_eq!(job.info.outcome, outcome::DIVERGED);
        assert_eq!(kinds(&t), ["log", "finish", "wake"]);
    }

    #[test]
    fn a_late_retryable_failure_or_a_stranger_does_not_end_a_recovering_job() {
        let mut job = running();
        lose_member(&mut job);
        for (worker, kind) in [("w0", FailureKind::Retryable), ("w9", FailureKind::Diverged)] {
            let late = JobReport {
                job_id: ID.into(),
                attempt: 0,
                rank: 0,
                kind: Some(Kind::Failed("x".into())),
                failure_kind: kind as i32,
            };
            let t =
                step(&mut job, Event::Report { worker, report: late, final_checkpoint_on_disk: false }, now()).unwrap();
            assert!(t.effects.is_empty());
            assert_eq!(job.state(), JobState::Recovering);
        }
    }

    #[test]
    fn recovering_to_cancelled() {
        let mut job = running();
        lose_member(&mut job);
        let t = step(&mut job, Event::Cancel, now()).unwrap();
        assert_eq!(job.state(), JobState::Cancelled);
        assert_eq!(kinds(&t), ["log", "log", "finish"], "the recovery's line; no members left to abort");
    }

    #[test]
    fn a_coordinator_restart_sends_active_jobs_to_recovering_in_a_new_attempt() {
        let mut job = running();
        let t = step(&mut job, Event::Resumed, now()).unwrap();
        assert_eq!(job.state(), JobState::Recovering);
        assert_eq!(job.info.attempt, 1);
        assert!(job.info.worker_ids.is_empty());
        assert_eq!(kinds(&t), ["log", "persist"]);
        let t = step(&mut job, Event::Resumed, now()).unwrap();
        assert_eq!((job.state(), job.info.attempt), (JobState::Recovering, 2));
        assert_eq!(kinds(&t), ["log", "persist"]);

        let mut waiting = queued(spec(1, 1));
        let t = step(&mut waiting, Event::Resumed, now()).unwrap();
        assert_eq!((waiting.state(), waiting.info.attempt), (JobState::Queued, 0));
        assert!(t.effects.is_empty());
    }

    #[test]
    fn reports_of_another_attempt_or_rank_change_nothing() {
        let mut job = running();
        let before = format!("{:?}", job.info);
        let stale = JobReport {
            job_id: ID.into(),
            attempt: 7,
            rank: 0,
            kind: Some(Kind::Epoch(EpochMetrics::default())),
            failure_kind: 0,
        };
        let t = step(&mut job, Event::Report { worker: "w0", report: stale, final_checkpoint_on_disk: false }, now())
            .unwrap();
        assert!(t.effects.is_empty());
        let t = report(&mut job, "w1", 0, Kind::Failed("not my rank".into()), false);
        assert!(t.effects.is_empty());
        assert_eq!(format!("{:?}", job.info), before);
    }

    #[test]
    fn progress_and_epoch_reports_keep_the_job_running() {
        let mut job = running();
        let t = report(&mut job, "w0", 0, Kind::Progress(Progress { epoch: 0, step: 3, ..Default::default() }), false);
        assert_eq!(kinds(&t), ["publish"], "progress is not stored");
        let t = report(&mut job, "w0", 0, Kind::Epoch(EpochMetrics { epoch: 0, ..Default::default() }), false);
        assert_eq!(kinds(&t), ["write_metrics", "persist", "publish"]);
        assert_eq!((job.state(), job.info.history.len(), job.attempt_reached), (JobState::Running, 1, 1));
        let before = format!("{:?}", job.info);
        let err = report_kind(
            &mut job,
            "w0",
            0,
            Kind::Epoch(EpochMetrics { epoch: 2, ..Default::default() }),
            FailureKind::Unspecified,
            false,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "epoch report for epoch 2, but job j0001-resnet20 has 2 epochs (0-based)");
        assert_eq!(format!("{:?}", job.info), before, "a refused report changes nothing");
    }

    #[test]
    fn a_stored_checkpoint_is_recorded_and_a_refused_one_logged_while_running() {
        let mut job = running();
        let t =
            step(&mut job, Event::CheckpointStored { attempt: 0, name: "ckpt-e0001-s000000".into() }, now()).unwrap();
        assert_eq!(job.info.latest_checkpoint, "ckpt-e0001-s000000");
        assert_eq!(kinds(&t), ["persist"]);
        let refused = Event::CheckpointRefused { attempt: 0, name: "ckpt-e0002-s000000".into(), reason: "disk".into() };
        let t = step(&mut job, refused, now()).unwrap();
        assert_eq!(kinds(&t), ["log"]);
        assert_eq!(job.refused_upload, Some(("ckpt-e0002-s000000".into(), "disk".into())));
        let err = step(&mut job, Event::CheckpointStored { attempt: 3, name: "ckpt-e0002-s000000".into() }, now())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint for job j0001-resnet20 refused: the job is running on attempt 0, the upload is for attempt 3"
        );
    }

    /// The three ended states, each reached the way the diagram says.
    fn ended_jobs() -> Vec<Job> {
        let mut succeeded = running();
        succeeded.info.latest_checkpoint = names::checkpoint_name(2, 0);
        report(&mut succeeded, "w0", 0, finished(), true);
        report(&mut succeeded, "w1", 1, finished(), true);
        let mut failed = running();
        report_kind(&mut failed, "w0", 0, Kind::Failed("bad data".into()), FailureKind::Data, false).unwrap();
        let mut cancelled = running();
        step(&mut cancelled, Event::Cancel, now()).unwrap();
        vec![succeeded, failed, cancelled]
    }

    #[test]
    fn an_ended_job_refuses_cancel_reports_and_checkpoints() {
        for mut job in ended_jobs() {
            let state = state_name(job.state());
            let before = format!("{:?}", job.info);
            let err = step(&mut job, Event::Cancel, now()).unwrap_err();
            assert_eq!(err.to_string(), format!("job {ID} already ended ({state})"));
            let err = report_kind(&mut job, "w0", 0, finished(), FailureKind::Unspecified, true).unwrap_err();
            assert_eq!(err.to_string(), format!("job {ID} already ended"));
            let attempt = job.info.attempt;
            let stored = Event::CheckpointStored { attempt, name: "ckpt-e0001-s000000".into() };
            let err = step(&mut job, stored, now()).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("checkpoint for job {ID} refused: the job is {state}")),
                "{err}"
            );
            assert_eq!(format!("{:?}", job.info), before, "{state}: refused events change nothing");
        }
    }

    #[test]
    fn an_ended_job_ignores_scheduling_lost_members_restarts_and_refused_uploads() {
        for mut job in ended_jobs() {
            let state = job.state();
            let before = format!("{:?}", job.info);
            let attempt = job.info.attempt;
            let far = later(now(), Duration::from_secs(3600));
            let events = [
                Event::Schedule { idle: &idle(4), secret: "s".into() },
                Event::MemberLost { attempt, reason: "lost".into() },
                Event::Resumed,
                Event::CheckpointRefused { attempt, name: "ckpt-e0001-s000000".into(), reason: "r".into() },
            ];
            for event in events {
                let t = step(&mut job, event, far).unwrap();
                assert!(t.effects.is_empty() && !t.holds_queue, "{state:?}: {:?}", t.effects);
            }
            assert_eq!(job.state(), state);
            assert_eq!(format!("{:?}", job.info), before);
        }
    }

    #[test]
    fn a_lost_member_of_an_old_attempt_changes_nothing() {
        let mut job = running();
        let t = step(&mut job, Event::MemberLost { attempt: 5, reason: "old".into() }, now()).unwrap();
        assert!(t.effects.is_empty());
        assert_eq!(job.state(), JobState::Running);
    }

    /// A job of 2 epochs on 2 workers, `steps` steps per epoch on 2 ranks (256 samples,
    /// batch 32: 128 per rank, 4 steps).
    fn small_running() -> Job {
        let mut job = queued(JobSpec { train_samples: 256, batch_size: 32, ..spec(2, 2) });
        schedule(&mut job, &idle(2), now());
        assert_eq!(spec::steps_per_epoch(&job.spec(), 2), 4);
        job
    }

    fn progress(epoch: u32, step: u64) -> Kind {
        Kind::Progress(Progress { epoch, step, steps_per_epoch: 4, ..Default::default() })
    }

    #[test]
    fn a_recovery_records_its_cause_sizes_replayed_steps_and_downtime() {
        let t0 = now();
        let mut job = small_running();
        step(&mut job, Event::CheckpointStored { attempt: 0, name: names::checkpoint_name(0, 2) }, t0).unwrap();
        report(&mut job, "w0", 0, progress(1, 1), false);
        report(&mut job, "w0", 0, progress(0, 3), false);
        // Lost at epoch 1, step 1; the newest checkpoint is epoch 0, step 2.
        let lost = later(t0, Duration::from_secs(10));
        step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost (eof)".into() }, lost).unwrap();
        let r = job.info.recoveries.last().cloned().unwrap();
        assert_eq!(
            (r.attempt, r.cause.as_str(), r.old_world_size, r.new_world_size),
            (0, "worker w1 lost (eof)", 2, 0)
        );
        assert_eq!((r.reached_epoch, r.reached_step, r.lost_unix), (1, 1, lost.unix));

        let restart = later(lost, RECOVERY_GRACE * 2);
        let others = [
            IdleWorker { id: "w0".into(), data_addr: "a".into() },
            IdleWorker { id: "w2".into(), data_addr: "b".into() },
        ];
        step(&mut job, Event::Schedule { idle: &others, secret: "s".into() }, restart).unwrap();
        assert_eq!(job.state(), JobState::Running);
        let r = job.info.recoveries.last().cloned().unwrap();
        // (1·4 + 1) − (0·4 + 2) = 3 steps of the failed group are trained again.
        assert_eq!((r.new_world_size, r.resumed_from.as_str(), r.steps_replayed), (2, "ckpt-e0000-s000002", 3));
        assert_eq!(r.downtime_seconds, None, "no step of the new group yet");

        // A report at the start position is no step of the new group; the next one is.
        let t = report(&mut job, "w0", 0, progress(0, 2), false);
        assert_eq!(kinds(&t), ["publish"]);
        let first = later(restart, Duration::from_secs(5));
        let r = JobReport { job_id: ID.into(), attempt: 1, rank: 0, kind: Some(progress(0, 3)), failure_kind: 0 };
        let t =
            step(&mut job, Event::Report { worker: "w0", report: r, final_checkpoint_on_disk: false }, first).unwrap();
        assert_eq!(kinds(&t), ["publish", "log", "persist"]);
        let r = job.info.recoveries.last().cloned().unwrap();
        let down = r.downtime_seconds.expect("measured at the first step");
        assert!((down - (first.unix - lost.unix)).abs() < 1e-9, "{down}");
        assert!(
            job.info.events.last().unwrap().ends_with(
                "recovery 1: worker w1 lost (eof); 2 -> 2 workers; resumed from ckpt-e0000-s000002; 3 steps replayed; down for 9.0 s"
            ),
            "{:?}",
            job.info.events
        );
        // Later progress changes nothing more; the summary carries the entry.
        let t = report(&mut job, "w0", 0, progress(1, 1), false);
        assert_eq!(kinds(&t), ["publish"]);
        assert_eq!(job.info.recoveries.len(), 1);
        let summary = cvdist_common::run_dir::Recovery::from(&job.info.recoveries[0]);
        assert_eq!((summary.steps_replayed, summary.old_world_size, summary.new_world_size), (3, 2, 2));
    }

    #[test]
    fn replayed_steps_count_from_the_epoch_start_when_the_world_size_changes() {
        let mut job = queued(JobSpec { train_samples: 256, batch_size: 32, ..spec(1, 2) });
        schedule(&mut job, &idle(2), now());
        step(&mut job, Event::CheckpointStored { attempt: 0, name: names::checkpoint_name(1, 2) }, now()).unwrap();
        report(&mut job, "w0", 0, progress(1, 3), false);
        lose_member(&mut job);
        schedule(&mut job, &idle(1), later(now(), RECOVERY_GRACE * 2));
        let r = &job.info.recoveries[0];
        // One worker restarts epoch 1 from its first step: 3 steps of the 2-worker group again.
        assert_eq!((r.old_world_size, r.new_world_size, r.steps_replayed), (2, 1, 3));
    }

    #[test]
    fn an_epoch_report_or_a_stored_checkpoint_past_the_reports_is_the_reached_position() {
        let mut job = small_running();
        report(&mut job, "w0", 0, Kind::Epoch(EpochMetrics { epoch: 0, ..Default::default() }), false);
        step(&mut job, Event::CheckpointStored { attempt: 0, name: names::checkpoint_name(1, 2) }, now()).unwrap();
        lose_member(&mut job);
        let r = &job.info.recoveries[0];
        assert_eq!((r.reached_epoch, r.reached_step), (1, 2));
        schedule(&mut job, &idle(2), later(now(), RECOVERY_GRACE * 2));
        assert_eq!(job.info.recoveries[0].steps_replayed, 0, "lost right after a stored checkpoint");
        // The epoch report of the new group ends the downtime too.
        report(&mut job, "w0", 0, Kind::Epoch(EpochMetrics { epoch: 1, ..Default::default() }), false);
        assert!(job.info.recoveries[0].downtime_seconds.is_some());
    }

    #[test]
    fn the_lost_worker_joins_the_cause_when_a_survivor_reported_first() {
        let mut job = running();
        report_kind(&mut job, "w0", 0, Kind::Failed("ring broke".into()), FailureKind::Retryable, false).unwrap();
        let t = step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost (eof)".into() }, now()).unwrap();
        assert!(t.effects.is_empty());
        assert_eq!(job.state(), JobState::Recovering);
        assert_eq!(job.info.recoveries[0].cause, "rank 0 on w0 failed: ring broke; worker w1 lost (eof)");
        assert_eq!(job.info.restarts, 1, "the same failure, not a second one");
    }

    #[test]
    fn a_late_permanent_failure_takes_back_the_recovery_being_prepared() {
        let mut job = running();
        lose_member(&mut job);
        let late = JobReport {
            job_id: ID.into(),
            attempt: 0,
            rank: 0,
            kind: Some(Kind::Failed("loss is NaN".into())),
            failure_kind: FailureKind::Diverged as i32,
        };
        step(&mut job, Event::Report { worker: "w0", report: late, final_checkpoint_on_disk: false }, now()).unwrap();
        assert_eq!(job.state(), JobState::Failed);
        assert!(job.info.recoveries.is_empty());
    }

    fn assignments(t: &Transition) -> Vec<Assignment> {
        t.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Assign { assignment, .. } => Some(assignment.clone()),
                _ => None,
            })
            .collect()
    }

    /// A first attempt starts from the checkpoint (none here); a recovery tells the
    /// new group which attempt's in-memory state its survivors may bring.
    #[test]
    fn a_recovery_assigns_the_failed_attempts_live_state() {
        let mut job = queued(spec(2, 2));
        let t = schedule(&mut job, &idle(2), now());
        assert!(assignments(&t).iter().all(|a| !a.live), "a fresh attempt has no live state");
        lose_member(&mut job);
        let t = schedule(&mut job, &idle(3)[1..], later(now(), RECOVERY_GRACE * 2));
        let a = assignments(&t);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|a| a.live && a.live_attempt == 0 && a.attempt == 1), "{a:?}");
        // No epoch recorded yet: a live state must still be in epoch 0.
        assert!(a.iter().all(|a| a.live_max_epoch == 0), "{a:?}");
        // The checkpoint stays the fallback for a group without survivors.
        assert!(a.iter().all(|a| a.checkpoint == job.info.latest_checkpoint));
        // A coordinator restart knows no survivor: the next group starts from the checkpoint.
        step(&mut job, Event::Resumed, now()).unwrap();
        let t = schedule(&mut job, &idle(2), later(now(), RECOVERY_GRACE * 2));
        assert!(assignments(&t).iter().all(|a| !a.live));
    }

    /// A `1:2` job running on one worker grows once a second is idle, but
    /// only after its attempt completed a step: the member is told to stop, the new group of
    /// two (the member keeps rank 0) continues from attempt 0's live state, no restart or
    /// recovery is counted, and a full job does not grow further.
    #[test]
    fn a_running_job_below_its_maximum_grows_from_its_live_state() {
        let mut job = queued(JobSpec { scale_lr: true, ..spec(1, 2) });
        schedule(&mut job, &idle(1), now());
        assert_eq!((job.state(), job.members.len()), (JobState::Running, 1));
        let members = idle(1);
        let newcomer = &idle(2)[1..];
        let grow = |job: &mut Job| {
            step(job, Event::Grow { members: &members, idle: newcomer, secret: "s1".into() }, now()).unwrap()
        };
        assert!(!wants_growth(&job), "no step completed yet");
        assert!(grow(&mut job).effects.is_empty());
        report(&mut job, "w0", 0, progress(0, 3), false);
        assert!(wants_growth(&job));
        let t = grow(&mut job);
        assert_eq!(aborts(&t), [("w0".to_string(), 0)]);
        let a = assignments(&t);
        let ranks: Vec<(&str, u32, u32)> =
            a.iter().map(|a| (a.peers[a.rank as usize].worker_id.as_str(), a.rank, a.world_size)).collect();
        assert_eq!(ranks, [("w0", 0, 2), ("w1", 1, 2)]);
        assert!(a.iter().all(|a| a.live && a.live_attempt == 0 && a.attempt == 1 && a.session_secret == "s1"));
        assert_eq!((job.state(), job.info.world_size, job.info.restarts), (JobState::Running, 2, 0));
        assert!(job.info.recoveries.is_empty(), "growth is not a recovery");
        let log = job.info.events.join("\n");
        assert!(log.contains("growing from 1 to 2 workers"), "{log}");
        assert!(log.contains("scaled by 2 instead of 1"), "{log}");
        // The live resume of the grown group changes no recovery; a full job stays as it is.
        let live = Resumed { epoch: 0, step: 1, samples: 3 * 64, live: true, source_worker: "w0".into() };
        report(&mut job, "w0", 0, Kind::Resumed(live), false);
        assert!(job.info.recoveries.is_empty());
        report(&mut job, "w0", 0, progress(0, 5), false);
        assert!(!wants_growth(&job), "at its maximum");
    }

    /// Rank 0 reports that the group continues from a survivor's state past every reported
    /// step: nothing is replayed, the recovery names the survivor, and the downtime ends at
    /// the first step after that position.
    #[test]
    fn a_live_resume_replays_no_step_and_names_the_survivor() {
        let t0 = now();
        let mut job = small_running();
        step(&mut job, Event::CheckpointStored { attempt: 0, name: names::checkpoint_name(1, 0) }, t0).unwrap();
        report(&mut job, "w0", 0, progress(1, 2), false);
        let lost = later(t0, Duration::from_secs(10));
        step(&mut job, Event::MemberLost { attempt: 0, reason: "worker w1 lost (eof)".into() }, lost).unwrap();
        let restart = later(lost, RECOVERY_GRACE * 2);
        schedule(&mut job, &idle(3)[..1].iter().chain(&idle(3)[2..]).cloned().collect::<Vec<_>>(), restart);
        assert_eq!(job.state(), JobState::Running);
        assert_eq!(job.info.recoveries[0].steps_replayed, 2, "from the checkpoint, until the group says otherwise");

        // The survivor completed step 3 of epoch 1 (one more than rank 0 reported).
        let live = Resumed { epoch: 1, step: 3, samples: 3 * 2 * 32, live: true, source_worker: "w0".into() };
        let t = report(&mut job, "w0", 0, Kind::Resumed(live.clone()), false);
        assert_eq!(kinds(&t), ["log", "persist"]);
        let r = job.info.recoveries[0].clone();
        assert_eq!((r.resumed_from.as_str(), r.steps_replayed), ("live state of w0 at epoch 1 step 3", 0));
        assert_eq!(job.attempt_start, (1, 3));
        // Another rank's report, or one of a failed-over group without state, changes nothing.
        let before = job.info.recoveries.clone();
        report(&mut job, "w2", 1, Kind::Resumed(live), false);
        report(&mut job, "w0", 0, Kind::Resumed(Resumed::default()), false);
        assert_eq!(job.info.recoveries, before);

        // Progress at the start position is no step; the next one ends the downtime.
        report(&mut job, "w0", 0, progress(1, 3), false);
        assert_eq!(job.info.recoveries[0].downtime_seconds, None);
        report(&mut job, "w0", 0, progress(1, 4), false);
        assert!(job.info.recoveries[0].downtime_seconds.is_some());
        assert!(
            job.info.events.iter().any(|e| e.contains(
                "recovery 1: worker w1 lost (eof); 2 -> 2 workers; resumed from live state of w0 at epoch 1 step 3; \
                 0 steps replayed; down for"
            )),
            "{:?}",
            job.info.events
        );
    }

    /// A member that died after completing a step no survivor completed: that one step is
    /// trained again, and counted.
    #[test]
    fn a_live_resume_behind_the_reported_step_counts_the_difference() {
        let mut job = small_running();
        report(&mut job, "w0", 0, progress(1, 3), false);
        lose_member(&mut job);
        schedule(&mut job, &[idle(3)[0].clone(), idle(3)[2].clone()], later(now(), RECOVERY_GRACE * 2));
        let live = Resumed { epoch: 1, step: 2, samples: 2 * 2 * 32, live: true, source_worker: "w0".into() };
        report(&mut job, "w0", 0, Kind::Resumed(live), false);
        assert_eq!(job.info.recoveries[0].steps_replayed, 1);
    }
}

//! The coordinator's state machine: jobs, workers, rendezvous and recovery.
//!
//! ```text
//!            submit                 enough idle workers
//!   ───────▶ QUEUED ──────────────────────────────▶ RUNNING ──all ranks finished──▶ SUCCEEDED
//!              │                                   │   ▲
//!              │ cancel                 worker lost│   │ group re-formed from
//!              ▼                        or failed  ▼   │ the newest checkpoint
//!          CANCELLED ◀──────cancel────────────── RECOVERING ──budget/timeout──▶ FAILED
//! ```
//!
//! Everything lives behind one mutex that is never held across an await; durable changes
//! go to the [`Store`] before the lock is released.

use crate::store::{Store, StoreError};
use cvdist_common::proto::{
    coordinator_message, job_event, Abort, Assignment, CoordinatorMessage, FailureKind, JobEvent, JobInfo, JobReport,
    JobSpec, JobState, Peer, RegisterRequest, Registered, WorkerCapabilities, WorkerInfo, WorkerState,
};
use cvdist_common::run_dir::outcome;
use cvdist_common::{models, names, run_dir, spec, text, version};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tonic::Status;
use tracing::{info, warn};

/// After a failed attempt, wait this long before re-forming the group, so that the
/// session of a worker that died (and caused the failure) is noticed first.
const RECOVERY_GRACE: Duration = Duration::from_secs(2);
/// Events buffered per watched job for a slow watcher (~0.5 MB: a slot holds a whole
/// `JobInfo` snapshot), so the channel exists only while someone watches.
const EVENT_BUFFER: usize = 1024;
const MAX_EVENTS_KEPT: usize = 500;
/// Appended to the reason of a failure that a restart would only repeat.
const NOT_RESTARTED: &str = "not restarted: the same failure would repeat";
/// Bytes of event log kept per job (oldest lines go first). With the epoch history bounded
/// by the job's epochs and every peer string bounded, this bounds the whole job record.
const MAX_EVENT_BYTES: usize = 256 * 1024;
/// Longest capability string (device, GPU name) a worker may register with.
const MAX_CAPABILITY_TEXT: usize = 128;

pub type WorkerTx = mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>;

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub heartbeat_timeout: Duration,
}

struct JobEntry {
    /// The whole record while the job is active; once it has ended and is stored, only what
    /// listing and scheduling need (see [`JobEntry::retire`]).
    info: JobInfo,
    /// Worker ids by rank for the current attempt.
    members: Vec<String>,
    finished: BTreeSet<u32>,
    /// Live events for `WatchJob`: created by the first watcher, dropped once no one
    /// watches or the job has ended.
    events: Option<broadcast::Sender<JobEvent>>,
    /// While recovering: the attempt that failed and its members by rank, so that a rank
    /// reporting after its peers (whose rings broke) that the failure would repeat can
    /// still stop the restart.
    failed_attempt: Option<(u32, Vec<String>)>,
    /// The job has ended and its full record is in the store; `info` is trimmed.
    retired: bool,
    waiting_since: Instant,
    not_before: Instant,
    /// The newest refused checkpoint upload of the current attempt: (name, reason).
    refused_upload: Option<(String, String)>,
    /// What rank 0 said about the final checkpoint in its `Finished` report, if not stored.
    final_checkpoint_error: String,
    /// Where the current attempt started, and the furthest position its ranks reported:
    /// a checkpoint must lie between them (see [`Coordinator::accepts_checkpoint`]).
    attempt_start: (u32, u64),
    attempt_reached: u32,
}

struct WorkerEntry {
    /// Proves on an upload that the caller is this session (sent in `Registered`).
    key: String,
    data_addr: String,
    caps: WorkerCapabilities,
    tx: WorkerTx,
    session: u64,
    job: Option<(String, u32)>,
    last_seen: Instant,
    registered_unix: f64,
}

struct Inner {
    jobs: BTreeMap<String, JobEntry>,
    workers: BTreeMap<String, WorkerEntry>,
    next_job: u64,
    next_session: u64,
}

pub struct Coordinator {
    inner: Mutex<Inner>,
    store: Store,
    cfg: StateConfig,
    pub wake: Notify,
    /// Set once by [`Coordinator::shut_down`]; long-lived streams watch it and end.
    closing: watch::Sender<bool>,
}

/// Counts for the metrics endpoint.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub jobs_by_state: BTreeMap<&'static str, u64>,
    pub workers: u64,
    pub busy_workers: u64,
    pub restarts: u64,
    pub images_per_sec: f64,
    pub step_seconds: f64,
    pub allreduce_seconds: f64,
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn state_name(s: JobState) -> &'static str {
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

pub fn is_terminal(s: JobState) -> bool {
    matches!(s, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
}

fn internal(e: StoreError) -> Status {
    Status::internal(format!("coordinator storage error: {e}"))
}

/// The checkpoint name for a position: `ckpt-eEEEE-sSSSSSS` (as the worker writes it).
pub fn checkpoint_name(epoch: u32, step: u64) -> String {
    format!("ckpt-e{epoch:04}-s{step:06}")
}

/// Epoch and step encoded in a checkpoint name `ckpt-eEEEE-sSSSSSS`.
pub fn checkpoint_position(name: &str) -> Option<(u32, u64)> {
    names::parse_checkpoint_name(name).ok()
}

/// Keeps a job record within its byte bound: message and event lines escaped and cut, the
/// event log within [`MAX_EVENT_BYTES`], the history within the job's epochs. Also applied
/// to records loaded from the store, which older releases did not bound.
fn bound_record(info: &mut JobInfo) {
    info.message = text::bound(&info.message, text::MAX_REPORT_TEXT);
    for e in info.events.iter_mut() {
        if e.len() > text::MAX_EVENT_LINE || e.chars().any(text::is_unsafe) {
            *e = text::bound(e, text::MAX_EVENT_LINE);
        }
    }
    trim_events(info);
    let epochs = info.spec.as_ref().map(|s| s.epochs).unwrap_or(0);
    info.history.retain(|h| h.epoch < epochs);
}

/// Cuts a job record to what a listing shows (`ListJobs`): the newest epoch's metrics and no
/// event log. One record is bounded (see [`bound_record`]), but a listing holds every job
/// ever submitted; with whole records a few hundred 200-epoch jobs (~70 KB each) would pass
/// the 16 MiB message limit and `cvdist jobs` would stop working. `GetJob` has the rest.
fn summarise(info: &mut JobInfo) {
    if info.history.len() > 1 {
        info.history.drain(..info.history.len() - 1);
    }
    info.events.clear();
}

/// Drops the oldest events beyond [`MAX_EVENTS_KEPT`] lines or [`MAX_EVENT_BYTES`] bytes.
fn trim_events(info: &mut JobInfo) {
    let mut total: usize = info.events.iter().map(String::len).sum();
    let mut drop = 0;
    while total > MAX_EVENT_BYTES || info.events.len() - drop > MAX_EVENTS_KEPT {
        total -= info.events[drop].len();
        drop += 1;
    }
    info.events.drain(..drop);
}

impl JobEntry {
    fn new(info: JobInfo) -> JobEntry {
        JobEntry {
            info,
            members: Vec::new(),
            finished: BTreeSet::new(),
            events: None,
            failed_attempt: None,
            retired: false,
            waiting_since: Instant::now(),
            not_before: Instant::now(),
            refused_upload: None,
            final_checkpoint_error: String::new(),
            attempt_start: (0, 0),
            attempt_reached: 0,
        }
    }

    fn log(&mut self, line: String) {
        let line = text::bound(&line, text::MAX_EVENT_LINE);
        info!(job = %self.info.id, "{line}");
        let stamped = format!("{:.3} {line}", now_unix());
        self.info.events.push(stamped.clone());
        trim_events(&mut self.info);
        self.emit(job_event::Event::Log(stamped));
    }

    fn snapshot(&mut self) {
        if self.events.is_some() {
            self.emit(job_event::Event::Snapshot(self.info.clone()));
        }
    }

    /// Sends to the watchers, if any; the channel goes when the last watcher has.
    fn emit(&mut self, event: job_event::Event) {
        let Some(tx) = &self.events else { return };
        if tx.receiver_count() == 0 || tx.send(JobEvent { event: Some(event) }).is_err() {
            self.events = None;
        }
    }

    /// A subscription to this job's events, creating the channel for the first watcher.
    fn subscribe(&mut self) -> broadcast::Receiver<JobEvent> {
        match &self.events {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(EVENT_BUFFER);
                self.events = Some(tx);
                rx
            }
        }
    }

    /// Called once an ended job's full record is stored: keeps the spec, state, message and
    /// counters in memory (kilobytes), and lets `get`/`watch`/`list` read the history and
    /// event log from the store. Watchers have had the final snapshot; dropping the sender
    /// ends their streams.
    fn retire(&mut self) {
        self.events = None;
        self.failed_attempt = None;
        self.members = Vec::new();
        self.finished = BTreeSet::new();
        self.info.history = Vec::new();
        self.info.events = Vec::new();
        self.info.progress = None;
        self.retired = true;
    }
}

impl Coordinator {
    /// Loads every stored job. Jobs that were running when the coordinator stopped go back
    /// to recovery: their workers will reconnect and they resume from the newest checkpoint.
    pub fn new(store: Store, cfg: StateConfig) -> Result<Arc<Coordinator>, StoreError> {
        let mut jobs = BTreeMap::new();
        let mut next_job = 1;
        let mut resumed = Vec::new();
        // One record at a time: ended jobs are trimmed as they are read, so loading many
        // stored jobs never needs all their histories in memory at once.
        store.for_each_job(|mut info| {
            if let Some(n) =
                info.id.strip_prefix('j').and_then(|r| r.split('-').next()).and_then(|n| n.parse::<u64>().ok())
            {
                next_job = next_job.max(n + 1);
            }
            bound_record(&mut info);
            if matches!(info.state(), JobState::Running | JobState::Recovering) {
                info.set_state(JobState::Recovering);
                info.attempt += 1;
                info.worker_ids.clear();
                let mut entry = JobEntry::new(info);
                entry.log("coordinator restarted; waiting for workers to resume from the newest checkpoint".into());
                resumed.push(entry.info.id.clone());
                jobs.insert(entry.info.id.clone(), entry);
            } else {
                let mut entry = JobEntry::new(info);
                if is_terminal(entry.info.state()) {
                    entry.retire();
                }
                jobs.insert(entry.info.id.clone(), entry);
            }
        })?;
        for id in resumed {
            if let Some(entry) = jobs.get(&id) {
                store.put_job(&entry.info)?;
            }
        }
        Ok(Arc::new(Coordinator {
            inner: Mutex::new(Inner { jobs, workers: BTreeMap::new(), next_job, next_session: 1 }),
            store,
            cfg,
            wake: Notify::new(),
            closing: watch::Sender::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep serving rather than cascade.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Begins a shutdown: every worker session is ended with UNAVAILABLE (the workers
    /// stop their jobs and reconnect with backoff), new registrations are refused, and
    /// [`Coordinator::closing`] fires so that watch streams end too. Without this the
    /// gRPC server's graceful shutdown waits for these never-ending streams forever.
    /// Running jobs stay RUNNING in the store: a restarted coordinator recovers them.
    pub fn shut_down(&self) {
        let mut inner = self.lock();
        for (_, w) in std::mem::take(&mut inner.workers) {
            let _ = w.tx.send(Err(Status::unavailable("coordinator is shutting down")));
        }
        self.closing.send_replace(true);
    }

    /// Resolves once [`Coordinator::shut_down`] ran (at once if it already did).
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }

    // ------------------------------------------------------------------ clients

    pub fn submit(&self, spec: JobSpec) -> Result<String, Status> {
        spec::validate(&spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut inner = self.lock();
        if !spec.name.is_empty()
            && inner.jobs.values().any(|j| j.info.spec.as_ref().is_some_and(|s| s.name == spec.name))
        {
            return Err(Status::already_exists(format!("a job named {:?} already exists", spec.name)));
        }
        let id = format!("j{:04}-{}", inner.next_job, spec.model);
        inner.next_job += 1;
        let info = JobInfo {
            id: id.clone(),
            spec: Some(spec.clone()),
            state: JobState::Queued as i32,
            created_unix: now_unix(),
            ..Default::default()
        };
        let dir = self.store.job_dir(&id);
        run_dir::write_job(&dir, &spec).map_err(|e| Status::internal(e.to_string()))?;
        let mut entry = JobEntry::new(info);
        entry.log(format!(
            "submitted: {} for {} epochs on {}..{} workers, batch {} per worker",
            spec.model, spec.epochs, spec.min_workers, spec.max_workers, spec.batch_size
        ));
        // Stored after the first event, so a restarted coordinator still shows it.
        self.store.put_job(&entry.info).map_err(internal)?;
        inner.jobs.insert(id.clone(), entry);
        drop(inner);
        self.wake.notify_one();
        Ok(id)
    }

    /// Number of jobs known (active and ended).
    pub fn job_count(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Every job, in id order; ended jobs as stored (with history and event log).
    pub fn list(&self) -> Result<Vec<JobInfo>, Status> {
        let (mut jobs, retired): (Vec<JobInfo>, Vec<usize>) = {
            let inner = self.lock();
            let jobs: Vec<JobInfo> = inner.jobs.values().map(|j| j.info.clone()).collect();
            let retired = inner.jobs.values().enumerate().filter(|(_, j)| j.retired).map(|(i, _)| i).collect();
            (jobs, retired)
        };
        // An ended job's record no longer changes, so reading it outside the lock is safe.
        let ids: Vec<&str> = retired.iter().map(|&i| jobs[i].id.as_str()).collect();
        let stored = self.store.get_jobs(&ids).map_err(internal)?;
        for (i, full) in retired.into_iter().zip(stored) {
            if let Some(full) = full {
                jobs[i] = full;
            }
        }
        for job in &mut jobs {
            summarise(job);
        }
        Ok(jobs)
    }

    pub fn get(&self, id: &str) -> Result<JobInfo, Status> {
        let inner = self.lock();
        let job = inner.jobs.get(id).ok_or_else(|| not_found(id))?;
        if !job.retired {
            return Ok(job.info.clone());
        }
        let trimmed = job.info.clone();
        drop(inner);
        self.stored(trimmed)
    }

    /// The full record of an ended job, read from the store (the trimmed one if it is gone).
    fn stored(&self, trimmed: JobInfo) -> Result<JobInfo, Status> {
        let full = self.store.get_jobs(&[trimmed.id.as_str()]).map_err(internal)?.pop().flatten();
        Ok(full.unwrap_or(trimmed))
    }

    /// The job as it is now, and a subscription to its events unless it has ended.
    pub fn watch(&self, id: &str) -> Result<(JobInfo, Option<broadcast::Receiver<JobEvent>>), Status> {
        let mut inner = self.lock();
        let job = inner.jobs.get_mut(id).ok_or_else(|| not_found(id))?;
        if job.retired {
            let trimmed = job.info.clone();
            drop(inner);
            return Ok((self.stored(trimmed)?, None));
        }
        Ok((job.info.clone(), Some(job.subscribe())))
    }

    pub fn cancel(&self, id: &str) -> Result<JobInfo, Status> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let job = inner.jobs.get_mut(id).ok_or_else(|| not_found(id))?;
        if is_terminal(job.info.state()) {
            return Err(Status::failed_precondition(format!(
                "job {id} already ended ({})",
                state_name(job.info.state())
            )));
        }
        release_members(job, &mut inner.workers, "cancelled by user");
        job.info.set_state(JobState::Cancelled);
        job.info.finished_unix = now_unix();
        job.info.message = "cancelled by user".into();
        job.info.outcome = "cancelled".into();
        job.log("cancelled by user".into());
        self.finish_job(job)
    }

    // ------------------------------------------------------------------ workers

    /// Registers a worker session and sends it `Registered` (its id and the session key its
    /// checkpoint uploads present) on `tx`, ahead of any assignment; returns the id and
    /// the session number.
    pub fn register(&self, req: RegisterRequest, tx: WorkerTx) -> Result<(String, u64), Status> {
        if req.protocol_version != version::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker speaks protocol version {} but this coordinator speaks {}; run the same cvdist release on both",
                req.protocol_version,
                version::PROTOCOL_VERSION
            )));
        }
        if !req.worker_id.is_empty() {
            names::check_worker_id(&req.worker_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        names::check_data_addr(&req.data_addr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut caps = req.capabilities.unwrap_or_default();
        caps.device = text::bound(&caps.device, MAX_CAPABILITY_TEXT);
        caps.gpu_name = text::bound(&caps.gpu_name, MAX_CAPABILITY_TEXT);
        let mut inner = self.lock();
        if *self.closing.borrow() {
            return Err(Status::unavailable("coordinator is shutting down"));
        }
        let id = if req.worker_id.is_empty() {
            format!("worker-{:06x}", rand::random::<u32>() & 0xff_ffff)
        } else {
            req.worker_id.clone()
        };
        if inner.workers.contains_key(&id) {
            return Err(Status::already_exists(format!(
                "a worker with id {id:?} is already connected; ids must be unique (a restarted worker may retry once the old session times out)"
            )));
        }
        let session = inner.next_session;
        inner.next_session += 1;
        let key = hex::encode(rand::random::<[u8; 32]>());
        // `Registered` goes out under the lock, before the worker is visible to the
        // scheduler: the channel is FIFO, so it always precedes the worker's first
        // `Assignment`. Sent after the lock is released, an assignment made in between
        // reached the worker first, and that job ran without the session key its rank 0
        // needs for checkpoint uploads (its final checkpoint was refused).
        let registered = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Registered(Registered {
                worker_id: id.clone(),
                session_key: key.clone(),
            })),
        };
        if tx.send(Ok(registered)).is_err() {
            return Err(Status::cancelled("worker session closed while registering"));
        }
        inner.workers.insert(
            id.clone(),
            WorkerEntry {
                key: key.clone(),
                data_addr: req.data_addr,
                caps,
                tx,
                session,
                job: None,
                last_seen: Instant::now(),
                registered_unix: now_unix(),
            },
        );
        info!(worker = %id, workers = inner.workers.len(), "worker registered");
        drop(inner);
        self.wake.notify_one();
        Ok((id, session))
    }

    pub fn heartbeat(&self, worker: &str, session: u64) {
        if let Some(w) = self.lock().workers.get_mut(worker) {
            if w.session == session {
                w.last_seen = Instant::now();
            }
        }
    }

    /// The worker's session ended (process died, network lost, or it shut down).
    pub fn session_closed(&self, worker: &str, session: u64, why: &str) {
        let mut inner = self.lock();
        if inner.workers.get(worker).map(|w| w.session) != Some(session) {
            return;
        }
        let entry = inner.workers.remove(worker);
        warn!(worker, why, "worker session ended");
        if let Some((job_id, attempt)) = entry.and_then(|w| w.job) {
            self.fail_attempt(&mut inner, &job_id, attempt, format!("worker {worker} lost ({why})"));
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// A report from `worker`'s session `session`; only the session that holds the rank in
    /// the job's current attempt is heard.
    pub fn report(&self, worker: &str, session: u64, report: JobReport) -> Result<(), Status> {
        use cvdist_common::proto::job_report::Kind;
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.workers.get(worker).map(|w| w.session) != Some(session) {
            return Err(Status::permission_denied(format!("report from a closed session of worker {worker}")));
        }
        let job = inner.jobs.get_mut(&report.job_id).ok_or_else(|| not_found(&report.job_id))?;
        if is_terminal(job.info.state()) {
            return Err(Status::failed_precondition(format!("job {} already ended", report.job_id)));
        }
        let failure_kind = FailureKind::try_from(report.failure_kind).unwrap_or(FailureKind::Unspecified);
        // A rank whose failure would repeat (it diverged, say) can report after its peers,
        // whose rings broke because it stopped, already ended the attempt as retryable: while
        // the group is still waiting to be re-formed, its reason replaces theirs.
        if let Some(Kind::Failed(text)) = &report.kind {
            let same_attempt = job.failed_attempt.as_ref().is_some_and(|(attempt, members)| {
                *attempt == report.attempt && members.get(report.rank as usize).map(String::as_str) == Some(worker)
            });
            if outcome::is_permanent(failure_kind) && job.info.state() == JobState::Recovering && same_attempt {
                // The restart being prepared does not happen.
                job.info.restarts = job.info.restarts.saturating_sub(1);
                job.info.attempt = report.attempt;
                let reason = format!("rank {} on {worker} failed: {text}; {NOT_RESTARTED}", report.rank);
                self.fail_job(job, reason, outcome::of_failure(failure_kind));
                drop(guard);
                self.wake.notify_one();
                return Ok(());
            }
        }
        // Reports from an aborted attempt arrive late; they must not touch the new one.
        if report.attempt != job.info.attempt
            || job.members.get(report.rank as usize).map(String::as_str) != Some(worker)
        {
            return Ok(());
        }
        let epochs = job.info.spec.as_ref().map(|s| s.epochs).unwrap_or(0);
        let epoch_ok = |e: u32, what: &str| {
            if e < epochs {
                Ok(())
            } else {
                Err(Status::invalid_argument(format!(
                    "{what} for epoch {e}, but job {} has {epochs} epochs (0-based)",
                    job.info.id
                )))
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
                job.info.progress = Some(p.clone());
                job.emit(job_event::Event::Progress(p));
            }
            Some(Kind::Epoch(mut m)) => {
                job.attempt_reached = job.attempt_reached.max(m.epoch + 1);
                m.attempt = job.info.attempt;
                // After a restart an epoch may be trained again; the newer record replaces it.
                job.info.history.retain(|h| h.epoch < m.epoch);
                job.info.history.push(m.clone());
                let dir = self.store.job_dir(&job.info.id);
                if let Err(e) = run_dir::write_metrics(&dir, &job.info.history) {
                    warn!(error = %e, "could not write metrics.jsonl");
                }
                self.store.put_job(&job.info).map_err(internal)?;
                job.emit(job_event::Event::Epoch(m));
            }
            Some(Kind::Finished(f)) => {
                job.finished.insert(report.rank);
                if report.rank == 0 {
                    job.final_checkpoint_error = f.final_checkpoint_error.clone();
                }
                if job.finished.len() == job.members.len() {
                    release_members(job, &mut inner.workers, "");
                    // Trained to the end is not success until the final model is stored.
                    if let Some(why) = self.final_checkpoint_missing(job) {
                        self.fail_job(job, why, outcome::FINAL_CHECKPOINT_MISSING);
                    } else {
                        job.info.set_state(JobState::Succeeded);
                        job.info.finished_unix = now_unix();
                        // From the recorded history: a group that resumed from the final
                        // checkpoint trains nothing and reports no accuracy of its own.
                        let acc = job.info.history.last().map(|m| m.test_acc).unwrap_or(f.final_test_acc);
                        job.info.message = format!("final test accuracy {:.2}%", acc * 100.0);
                        job.info.outcome = "succeeded".into();
                        job.log(format!("succeeded: {}", job.info.message));
                        self.finish_job(job)?;
                    }
                    drop(guard);
                    self.wake.notify_one();
                }
            }
            Some(Kind::Failed(why)) => {
                let why = text::bound(&why, text::MAX_REPORT_TEXT);
                let reason = format!("rank {} on {worker} failed: {why}", report.rank);
                if outcome::is_permanent(failure_kind) {
                    // Divergence from a deterministic state, a configuration the workers
                    // cannot run, bad data: a restart would fail the same way, so the job
                    // fails now, with this reason, and its restart budget stays unused.
                    release_members(job, &mut inner.workers, &reason);
                    self.fail_job(job, format!("{reason}; {NOT_RESTARTED}"), outcome::of_failure(failure_kind));
                } else {
                    let id = job.info.id.clone();
                    let attempt = job.info.attempt;
                    self.fail_attempt(inner, &id, attempt, reason);
                }
                drop(guard);
                self.wake.notify_one();
            }
            None => return Err(Status::invalid_argument("empty job report")),
        }
        Ok(())
    }

    /// Records that a verified checkpoint of the current attempt is stored, if it is still
    /// the newest and its uploader still holds rank 0 of that attempt.
    pub fn checkpoint_stored(&self, job_id: &str, attempt: u32, session_key: &str, name: &str) -> Result<(), Status> {
        let pos = names::parse_checkpoint_name(name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.accepts_checkpoint(job_id, attempt, session_key, pos, 1)?;
        let mut inner = self.lock();
        let job = inner.jobs.get_mut(job_id).ok_or_else(|| not_found(job_id))?;
        job.info.latest_checkpoint = name.to_string();
        self.store.put_job(&job.info).map_err(internal)?;
        Ok(())
    }

    /// Records a refused checkpoint upload of the current attempt, so the job's log shows
    /// it and a job whose final checkpoint never arrives can say why.
    pub fn checkpoint_refused(&self, job_id: &str, attempt: u32, name: &str, reason: &str) {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get_mut(job_id) else { return };
        if attempt != job.info.attempt || is_terminal(job.info.state()) {
            return;
        }
        job.log(format!("checkpoint {name} refused: {reason}"));
        job.refused_upload = Some((name.to_string(), reason.to_string()));
    }

    /// Why the job's final checkpoint (the one after its last epoch) is not stored, if not.
    fn final_checkpoint_missing(&self, job: &JobEntry) -> Option<String> {
        let epochs = job.info.spec.as_ref().map(|s| s.epochs).unwrap_or(0);
        let name = checkpoint_name(epochs, 0);
        let dir = self.store.checkpoint_dir(&job.info.id);
        let on_disk = dir.join(format!("{name}.json")).is_file() && dir.join(format!("{name}.safetensors")).is_file();
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
        Some(format!("training finished but the final checkpoint {name} was not stored: {why}; newest stored checkpoint: {newest}"))
    }

    /// Whether an upload of the checkpoint at `pos` (epoch, step) may be stored; returns the
    /// most bytes it may take. Only the session holding rank 0 of the job's current,
    /// running attempt may upload (`session_key` from its `Registered`), and only a
    /// position this attempt can have reached: after where it started and after the newest
    /// stored checkpoint, within the job's epochs, and at most `slack` epochs past what its
    /// ranks reported (1 when the upload is complete: rank 0 reports the last step of an
    /// epoch before it uploads that epoch's checkpoint; 2 at the first chunk, which may
    /// overtake that report on the wire).
    pub fn accepts_checkpoint(
        &self,
        job_id: &str,
        attempt: u32,
        session_key: &str,
        pos: (u32, u64),
        slack: u32,
    ) -> Result<u64, Status> {
        let inner = self.lock();
        let job = inner.jobs.get(job_id).ok_or_else(|| not_found(job_id))?;
        let refuse =
            |why: String| Err(Status::permission_denied(format!("checkpoint for job {job_id} refused: {why}")));
        if job.info.state() != JobState::Running || attempt != job.info.attempt {
            return refuse(format!(
                "the job is {} on attempt {}, the upload is for attempt {attempt}",
                state_name(job.info.state()),
                job.info.attempt
            ));
        }
        let holder = job.members.first().and_then(|id| inner.workers.get(id));
        let is_rank0 = holder.is_some_and(|w| {
            w.job.as_ref().is_some_and(|(j, a)| j == job_id && *a == attempt)
                && cvdist_common::auth::constant_time_eq(w.key.as_bytes(), session_key.as_bytes())
        });
        if !is_rank0 {
            return refuse("only rank 0 of the current attempt uploads checkpoints".into());
        }
        let spec = job.info.spec.clone().unwrap_or_default();
        let newest = checkpoint_position(&job.info.latest_checkpoint).unwrap_or((0, 0));
        let shown = names::checkpoint_name(pos.0, pos.1);
        if pos <= job.attempt_start || pos <= newest {
            return refuse(format!(
                "{shown} is not after where attempt {attempt} started ({}) and the newest checkpoint ({})",
                names::checkpoint_name(job.attempt_start.0, job.attempt_start.1),
                if job.info.latest_checkpoint.is_empty() { "none" } else { &job.info.latest_checkpoint }
            ));
        }
        let reached = job.attempt_reached.max(job.attempt_start.0);
        if pos.0 > spec.epochs || (pos.0 == spec.epochs && pos.1 > 0) || pos.0 > reached + slack {
            return refuse(format!(
                "{shown} does not follow from the attempt's progress (started at epoch {}, reported epoch {reached}, {} epochs)",
                job.attempt_start.0, spec.epochs
            ));
        }
        models::max_checkpoint_bytes(&spec.model).ok_or_else(|| {
            Status::failed_precondition(format!("job {job_id} has an unknown model {}", text::quoted(&spec.model)))
        })
    }

    // ------------------------------------------------------------------ scheduling

    /// Periodic housekeeping: expired heartbeats, rendezvous timeouts, forming groups.
    pub fn tick(&self) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let expired: Vec<(String, u64)> = inner
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen.elapsed() > self.cfg.heartbeat_timeout)
            .map(|(id, w)| (id.clone(), w.session))
            .collect();
        for (id, _) in &expired {
            if let Some(w) = inner.workers.remove(id) {
                warn!(worker = %id, "no heartbeat within {:?}; dropping the worker", self.cfg.heartbeat_timeout);
                let _ = w.tx.send(Err(Status::deadline_exceeded("heartbeat timeout")));
                if let Some((job, attempt)) = w.job {
                    self.fail_attempt(inner, &job, attempt, format!("worker {id} missed heartbeats"));
                }
            }
        }
        self.schedule(inner);
    }

    fn schedule(&self, inner: &mut Inner) {
        let waiting: Vec<String> = inner
            .jobs
            .values()
            .filter(|j| matches!(j.info.state(), JobState::Queued | JobState::Recovering))
            .map(|j| j.info.id.clone())
            .collect();
        for id in waiting {
            let idle: Vec<String> =
                inner.workers.iter().filter(|(_, w)| w.job.is_none()).map(|(id, _)| id.clone()).collect();
            let Some(job) = inner.jobs.get_mut(&id) else { continue };
            let spec = job.info.spec.clone().unwrap_or_default();
            if Instant::now() < job.not_before {
                continue;
            }
            if idle.len() < spec.min_workers as usize {
                let limit = spec.rendezvous_timeout_s;
                if limit > 0 && job.waiting_since.elapsed() > Duration::from_secs(limit as u64) {
                    let msg = format!(
                        "rendezvous timed out after {limit}s: {} of at least {} workers available",
                        idle.len(),
                        spec.min_workers
                    );
                    self.fail_job(job, msg, outcome::FAILED);
                }
                // First come, first served: later jobs wait behind this one.
                break;
            }
            let n = idle.len().min(spec.max_workers as usize);
            if let Err(e) = spec::check_shard(&spec, n as u32) {
                self.fail_job(job, e.to_string(), outcome::CONFIGURATION);
                continue;
            }
            let members: Vec<String> = idle.into_iter().take(n).collect();
            self.start_attempt(job, members, &mut inner.workers);
        }
    }

    fn start_attempt(&self, job: &mut JobEntry, members: Vec<String>, workers: &mut BTreeMap<String, WorkerEntry>) {
        let spec = job.info.spec.clone().unwrap_or_default();
        let attempt = job.info.attempt;
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let (start_epoch, start_step) = checkpoint_position(&job.info.latest_checkpoint).unwrap_or((0, 0));
        let peers: Vec<Peer> = members
            .iter()
            .enumerate()
            .map(|(rank, id)| Peer {
                rank: rank as u32,
                worker_id: id.clone(),
                data_addr: workers.get(id).map(|w| w.data_addr.clone()).unwrap_or_default(),
            })
            .collect();
        for (rank, id) in members.iter().enumerate() {
            let Some(w) = workers.get_mut(id) else { continue };
            w.job = Some((job.info.id.clone(), attempt));
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
            };
            let _ = w.tx.send(Ok(CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(assignment)) }));
        }
        job.members = members.clone();
        job.finished.clear();
        job.failed_attempt = None;
        job.refused_upload = None;
        job.final_checkpoint_error.clear();
        job.attempt_start = (start_epoch, start_step);
        job.attempt_reached = start_epoch;
        job.info.set_state(JobState::Running);
        job.info.world_size = members.len() as u32;
        job.info.worker_ids = members.clone();
        if job.info.started_unix == 0.0 {
            job.info.started_unix = now_unix();
        }
        let from = if job.info.latest_checkpoint.is_empty() {
            "from scratch".to_string()
        } else {
            format!("from {}", job.info.latest_checkpoint)
        };
        job.log(format!("attempt {attempt} started on {} workers ({}) {from}", members.len(), members.join(", ")));
        if let Err(e) = self.store.put_job(&job.info) {
            warn!(error = %e, "could not persist job start");
        }
        job.snapshot();
    }

    /// Ends the current attempt after a failure: aborts its members and either recovers
    /// (re-forms the group later) or fails the job once the restart budget is spent.
    fn fail_attempt(&self, inner: &mut Inner, job_id: &str, attempt: u32, reason: String) {
        let Some(job) = inner.jobs.get_mut(job_id) else { return };
        if job.info.attempt != attempt || job.info.state() != JobState::Running {
            return;
        }
        job.failed_attempt = Some((attempt, job.members.clone()));
        release_members(job, &mut inner.workers, &reason);
        let spec = job.info.spec.clone().unwrap_or_default();
        job.info.restarts += 1;
        job.info.attempt += 1;
        if job.info.restarts > spec.max_restarts {
            let msg = format!("{reason}; restart budget of {} exhausted", spec.max_restarts);
            self.fail_job(job, msg, outcome::FAILED);
            return;
        }
        job.info.set_state(JobState::Recovering);
        job.info.message = text::bound(&reason, text::MAX_REPORT_TEXT);
        job.waiting_since = Instant::now();
        job.not_before = Instant::now() + RECOVERY_GRACE;
        let resume = if job.info.latest_checkpoint.is_empty() {
            "the start".to_string()
        } else {
            job.info.latest_checkpoint.clone()
        };
        job.log(format!("{reason}; recovering (restart {} of {}) from {resume}", job.info.restarts, spec.max_restarts));
        if let Err(e) = self.store.put_job(&job.info) {
            warn!(error = %e, "could not persist recovery");
        }
        job.snapshot();
    }

    /// Ends the job as FAILED; `why` is its one-word outcome (`run_dir::outcome`).
    fn fail_job(&self, job: &mut JobEntry, reason: String, why: &str) {
        job.info.set_state(JobState::Failed);
        job.info.message = text::bound(&reason, text::MAX_REPORT_TEXT);
        job.info.outcome = why.to_string();
        job.info.finished_unix = now_unix();
        job.log(format!("failed: {reason}"));
        if let Err(e) = self.finish_job(job) {
            warn!(error = %e, "could not persist job failure");
        }
    }

    /// Persists a terminal job, writes its summary, tells watchers, and trims what is kept
    /// in memory; returns the full record.
    fn finish_job(&self, job: &mut JobEntry) -> Result<JobInfo, Status> {
        self.store.put_job(&job.info).map_err(internal)?;
        let mut summary = run_dir::Summary::from_history(&job.info.history);
        summary.job_id = job.info.id.clone();
        summary.model = job.info.spec.as_ref().map(|s| s.model.clone()).unwrap_or_default();
        summary.state = state_name(job.info.state()).to_string();
        summary.outcome = job.info.outcome.clone();
        summary.message = job.info.message.clone();
        summary.restarts = job.info.restarts;
        if job.info.started_unix > 0.0 {
            summary.wall_seconds = job.info.finished_unix - job.info.started_unix;
        }
        let dir = self.store.job_dir(&job.info.id);
        if let Err(e) =
            run_dir::write_summary(&dir, &summary).and_then(|_| run_dir::write_metrics(&dir, &job.info.history))
        {
            warn!(error = %e, "could not write the run directory");
        }
        job.snapshot();
        let full = job.info.clone();
        job.retire();
        Ok(full)
    }

    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let mut s = Stats::default();
        for j in inner.jobs.values() {
            *s.jobs_by_state.entry(state_name(j.info.state())).or_default() += 1;
            s.restarts += j.info.restarts as u64;
            if j.info.state() == JobState::Running {
                if let Some(p) = &j.info.progress {
                    s.images_per_sec += p.images_per_sec;
                    s.step_seconds = s.step_seconds.max(p.step_seconds);
                    s.allreduce_seconds = s.allreduce_seconds.max(p.allreduce_seconds);
                }
            }
        }
        s.workers = inner.workers.len() as u64;
        s.busy_workers = inner.workers.values().filter(|w| w.job.is_some()).count() as u64;
        s
    }

    /// Registered workers by id, for `cvdist status` without a job (RPC ListWorkers).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let inner = self.lock();
        let now = now_unix();
        inner
            .workers
            .iter()
            .map(|(id, w)| {
                let mut info = WorkerInfo {
                    worker_id: id.clone(),
                    capabilities: Some(w.caps.clone()),
                    data_addr: w.data_addr.clone(),
                    state: WorkerState::Idle as i32,
                    registered_unix: w.registered_unix,
                    last_heartbeat_unix: now - w.last_seen.elapsed().as_secs_f64(),
                    ..Default::default()
                };
                if let Some((job_id, attempt)) = &w.job {
                    info.set_state(WorkerState::Busy);
                    info.job_id = job_id.clone();
                    info.attempt = *attempt;
                    if let Some(job) = inner.jobs.get(job_id) {
                        info.rank = job.members.iter().position(|m| m == id).unwrap_or(0) as u32;
                        info.world_size = job.members.len() as u32;
                    }
                }
                info
            })
            .collect()
    }
}

/// Frees a job's workers; those still in it are told to abort when `reason` is non-empty.
fn release_members(job: &mut JobEntry, workers: &mut BTreeMap<String, WorkerEntry>, reason: &str) {
    for id in job.members.drain(..) {
        if let Some(w) = workers.get_mut(&id) {
            if w.job.as_ref().is_some_and(|(j, _)| *j == job.info.id) {
                w.job = None;
                if !reason.is_empty() {
                    let abort =
                        Abort { job_id: job.info.id.clone(), attempt: job.info.attempt, reason: reason.to_string() };
                    let _ = w.tx.send(Ok(CoordinatorMessage { msg: Some(coordinator_message::Msg::Abort(abort)) }));
                }
            }
        }
    }
    job.finished.clear();
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no job with id {}; `cvdist jobs` lists them", text::quoted(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> JobEntry {
        JobEntry::new(JobInfo { id: "j0001-resnet20".into(), state: JobState::Queued as i32, ..Default::default() })
    }

    #[test]
    fn a_worker_hears_registered_before_its_first_assignment() {
        // A job is already waiting when the worker registers, so the scheduler can hand it
        // out at once; the session key must still reach the worker first.
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let state = Coordinator::new(store, StateConfig { heartbeat_timeout: Duration::from_secs(60) }).expect("state");
        state.submit(spec::default_spec("resnet20", 1)).expect("submit");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let req = RegisterRequest {
            protocol_version: version::PROTOCOL_VERSION,
            worker_id: "w1".into(),
            data_addr: "127.0.0.1:40000".into(),
            ..Default::default()
        };
        let (id, _) = state.register(req, tx).expect("register");
        state.tick();
        let first = rx.try_recv().expect("a first message").expect("not an error").msg;
        let key = match first {
            Some(coordinator_message::Msg::Registered(r)) => {
                assert_eq!(r.worker_id, id);
                r.session_key
            }
            other => panic!("the first message must be Registered, got {other:?}"),
        };
        assert_eq!(key.len(), 64, "a 32-byte hex session key");
        match rx.try_recv().expect("a second message").expect("not an error").msg {
            Some(coordinator_message::Msg::Assignment(a)) => assert_eq!(a.rank, 0),
            other => panic!("the second message must be the assignment, got {other:?}"),
        }
    }

    #[test]
    fn the_event_channel_exists_only_while_someone_watches() {
        let mut job = entry();
        job.log("no one watches".into());
        assert!(job.events.is_none(), "no channel without a watcher");
        let mut rx = job.subscribe();
        job.log("watched".into());
        match rx.try_recv().map(|e| e.event) {
            Ok(Some(job_event::Event::Log(line))) => assert!(line.ends_with(" watched"), "{line}"),
            other => panic!("expected the log line, got {other:?}"),
        }
        drop(rx);
        job.log("the watcher left".into());
        assert!(job.events.is_none(), "the channel goes with its last watcher");
        assert_eq!(job.info.events.len(), 3, "the event log itself is kept");
    }

    #[test]
    fn a_retired_job_keeps_only_what_listing_and_scheduling_need() {
        let mut job = entry();
        job.info.spec = Some(spec::default_spec("resnet20", 2));
        job.info.history.push(Default::default());
        job.info.restarts = 2;
        job.info.message = "cancelled by user".into();
        job.log("cancelled by user".into());
        let _rx = job.subscribe();
        job.retire();
        assert!(job.retired && job.events.is_none());
        assert!(job.info.history.is_empty() && job.info.events.is_empty());
        assert_eq!((job.info.restarts, job.info.message.as_str()), (2, "cancelled by user"));
        assert!(job.info.spec.is_some(), "the name check on submit needs the spec");
    }
}

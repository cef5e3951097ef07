//! The coordinator's state: every job and every worker, behind one mutex that is never held
//! across an await nor during I/O. This module is the glue; each concept has its own:
//!
//! - [`machine`]: a job's life as one pure function (state, event) → (state, effects), with the
//!   job state diagram and its guards;
//! - [`registry`]: the worker sessions, heartbeats, idle/busy and session keys;
//! - [`effects`]: carrying out a transition's durable writes and watcher events after the lock
//!   is released, in decision order, behind the [`effects::Durable`] trait;
//! - [`record`]: the size bounds of a job record;
//! - [`error`]: why a request was refused ([`CoordinatorError`]; `service.rs` maps it to gRPC).
//!
//! A method here takes the lock, feeds the event to [`machine::step`], applies the effects that
//! touch the registry or message a worker (so those messages keep the decided order), queues
//! the rest, releases the lock and runs the queue. A client never sees a state whose record is
//! not yet durable: answers wait for the batches behind them ([`effects::Committer`]).

pub mod effects;
pub mod error;
pub mod machine;
pub mod record;
pub mod registry;

pub use error::CoordinatorError;
pub use registry::WorkerTx;

use crate::store::{Store, StoreError};
use cvdist_common::proto::{
    job_event, JobEvent, JobInfo, JobReport, JobSpec, JobState, RegisterRequest, RejoinRequest, WorkerInfo, WorkerState,
};
use cvdist_common::{models, names, rejoin, run_dir, spec};
use effects::{Batch, Committer, Durable, Outcome, Pending, Write};
use machine::{state_name, Effect, Event, IdleWorker, Job, Now, Transition};
use registry::{CheckedRegistration, Registry};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch, Notify};
use tonic::Status;
use tracing::warn;

/// Events buffered per watched job for a slow watcher (~0.5 MB: a slot holds a whole
/// `JobInfo` snapshot), so the channel exists only while someone watches.
const EVENT_BUFFER: usize = 1024;

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub heartbeat_timeout: Duration,
}

/// After a restart, how many heartbeat timeouts a running attempt's workers get to
/// re-register before the job falls back to recovery. A worker that lost
/// its session retries at least every second while it trains (`worker/src/agent`), so a
/// live worker is back within about a second of the coordinator listening again; three
/// heartbeat timeouts (30 s by default) leave room for a loaded host and a slow TLS
/// handshake, and bound how long a job whose worker died with the coordinator waits
/// before it recovers (a member that comes back without the attempt ends the wait at once).
pub const READOPT_HEARTBEAT_TIMEOUTS: u32 = 3;

impl StateConfig {
    /// How long a restarted coordinator waits for a running attempt's members.
    pub fn readopt_window(&self) -> Duration {
        self.heartbeat_timeout * READOPT_HEARTBEAT_TIMEOUTS
    }
}

/// A job as the coordinator keeps it: the state machine's job, plus who watches it and what
/// of it is durable.
struct JobEntry {
    /// The whole record while the job is active; once it has ended and is stored, only what
    /// listing and scheduling need (see [`JobEntry::retire`]).
    job: Job,
    /// Live events for `WatchJob`, each with the sequence number of the batch that sent it:
    /// created by the first watcher, dropped once no one watches or the job has ended.
    events: Option<broadcast::Sender<(u64, JobEvent)>>,
    /// The job has ended and its full record is in the store; `job.info` is trimmed.
    retired: bool,
    /// The submission's record is durable. Until then the job is invisible (it only holds
    /// its name) and is not scheduled.
    stored: bool,
    /// The newest batch of effects of this job: what a reader shows is durable once it ran.
    seq: u64,
}

impl JobEntry {
    fn new(job: Job, stored: bool) -> JobEntry {
        JobEntry { job, events: None, retired: false, stored, seq: 0 }
    }

    /// A subscription to this job's events, creating the channel for the first watcher.
    fn subscribe(&mut self) -> broadcast::Receiver<(u64, JobEvent)> {
        match &self.events {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(EVENT_BUFFER);
                self.events = Some(tx);
                rx
            }
        }
    }

    /// Queues `event` for the watchers, if any; the channel goes when the last watcher has.
    fn publish(&mut self, event: job_event::Event, batch: &mut Batch) {
        let Some(tx) = &self.events else { return };
        if tx.receiver_count() == 0 {
            self.events = None;
            return;
        }
        batch.events.push((tx.clone(), JobEvent { event: Some(event) }));
    }

    /// Called once an ended job's full record is stored: keeps the spec, state, message and
    /// counters in memory (kilobytes), and lets `get`/`watch`/`list` read the history and
    /// event log from the store. Watchers have had the final snapshot; dropping the sender
    /// ends their streams.
    fn retire(&mut self) {
        self.events = None;
        let job = &mut self.job;
        job.failed_attempt = None;
        job.members = Vec::new();
        job.finished = Default::default();
        job.info.history = Vec::new();
        job.info.events = Vec::new();
        job.info.progress = None;
        self.retired = true;
    }
}

struct Inner {
    jobs: BTreeMap<String, JobEntry>,
    workers: Registry,
    next_job: u64,
    /// The sequence number the next batch of effects gets (see [`Committer`]).
    next_seq: u64,
}

impl Inner {
    /// A job clients may see (its submission is stored).
    fn visible(&mut self, id: &str) -> Result<&mut JobEntry, CoordinatorError> {
        self.jobs.get_mut(id).filter(|e| e.stored).ok_or_else(|| CoordinatorError::NoSuchJob(id.to_string()))
    }

    /// Applies a transition of job `id` under the lock: registry changes and messages to
    /// workers now, in the decided order; durable writes and watcher events into a batch for
    /// after the lock. Returns whether the scheduler should look again.
    fn apply(&mut self, id: &str, t: Transition, pending: &mut Pending<'_>) -> bool {
        let Inner { jobs, workers, next_seq, .. } = self;
        let Some(entry) = jobs.get_mut(id) else { return false };
        let mut slot: Option<Batch> = None;
        let mut wake = false;
        for effect in t.effects {
            let info = &entry.job.info;
            match effect {
                Effect::Assign { worker, assignment } => workers.assign(&worker, assignment),
                Effect::Abort { worker, abort } => workers.release(&worker, id, Some(abort)),
                Effect::Release { worker } => workers.release(&worker, id, None),
                Effect::Wake => wake = true,
                Effect::WriteSpec => {
                    let spec = info.spec.clone().unwrap_or_default();
                    new_batch(&mut slot, next_seq, id).writes.push(Write::Spec(Box::new(spec)))
                }
                Effect::WriteMetrics => {
                    new_batch(&mut slot, next_seq, id).writes.push(Write::Metrics(info.history.clone()))
                }
                Effect::Persist => new_batch(&mut slot, next_seq, id).writes.push(Write::Job(Box::new(info.clone()))),
                Effect::Finish => {
                    let b = new_batch(&mut slot, next_seq, id);
                    b.writes.push(Write::Job(Box::new(info.clone())));
                    b.writes.push(Write::Summary(Box::new(summary(info)), info.history.clone()));
                    b.retire = true;
                    if entry.events.is_some() {
                        entry.publish(job_event::Event::Snapshot(entry.job.info.clone()), b);
                    }
                }
                // No one watches: nothing to send, and no channel is made for it.
                Effect::Publish(_) | Effect::PublishSnapshot if entry.events.is_none() => {}
                Effect::Publish(event) => entry.publish(event, new_batch(&mut slot, next_seq, id)),
                Effect::PublishSnapshot => {
                    let snapshot = job_event::Event::Snapshot(info.clone());
                    entry.publish(snapshot, new_batch(&mut slot, next_seq, id))
                }
            }
        }
        if let Some(b) = slot {
            // A batch with nothing to run (a progress line no one watches) still takes its
            // turn: its number was handed out.
            if !b.writes.is_empty() || b.retire {
                entry.seq = b.seq;
            }
            pending.push(b);
        }
        wake
    }
}

/// The batch of the transition being applied, numbered when first needed.
fn new_batch<'s>(slot: &'s mut Option<Batch>, next_seq: &mut u64, id: &str) -> &'s mut Batch {
    slot.get_or_insert_with(|| {
        let b = Batch::new(*next_seq, id);
        *next_seq += 1;
        b
    })
}

/// `summary.json` of an ended job.
fn summary(info: &JobInfo) -> run_dir::Summary {
    let mut summary = run_dir::Summary::from_history(&info.history);
    summary.job_id = info.id.clone();
    summary.model = info.spec.as_ref().map(|s| s.model.clone()).unwrap_or_default();
    summary.state = state_name(info.state()).to_string();
    summary.outcome = info.outcome.clone();
    summary.message = info.message.clone();
    summary.restarts = info.restarts;
    summary.recoveries = info.recoveries.iter().map(run_dir::Recovery::from).collect();
    if info.started_unix > 0.0 {
        summary.wall_seconds = info.finished_unix - info.started_unix;
    }
    summary
}

/// A watcher's subscription to a job's events after the snapshot it was given.
pub struct Subscription {
    rx: broadcast::Receiver<(u64, JobEvent)>,
    /// Events of batches up to this one are already in the snapshot.
    after: u64,
}

impl Subscription {
    /// The next event; `Lagged` when a slow watcher missed some, `Closed` once the job ended.
    pub async fn recv(&mut self) -> Result<JobEvent, broadcast::error::RecvError> {
        loop {
            let (seq, event) = self.rx.recv().await?;
            if seq > self.after {
                return Ok(event);
            }
        }
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<JobEvent, broadcast::error::TryRecvError> {
        loop {
            let (seq, event) = self.rx.try_recv()?;
            if seq > self.after {
                return Ok(event);
            }
        }
    }
}

pub struct Coordinator {
    inner: Mutex<Inner>,
    store: Arc<Store>,
    /// Where effects are written: the store in production, a recorder in tests.
    durable: Arc<dyn Durable>,
    committer: Committer,
    cfg: StateConfig,
    pub wake: Notify,
    /// Set once by [`Coordinator::shut_down`]; long-lived streams watch it and end.
    closing: watch::Sender<bool>,
    /// The store's key for attempt secrets (`cvdist_common::rejoin`).
    attempt_key: [u8; rejoin::KEY_BYTES],
}

/// Counts for the metrics endpoint.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub jobs_by_state: BTreeMap<&'static str, u64>,
    pub workers: u64,
    pub busy_workers: u64,
    pub restarts: u64,
    /// Recoveries of every job (`JobInfo.recoveries`), and the steps they trained again.
    pub recoveries: u64,
    pub steps_replayed: u64,
    pub images_per_sec: f64,
    pub step_seconds: f64,
    pub allreduce_seconds: f64,
    /// The world size of each RUNNING job, by job id (it changes when a job shrinks in a
    /// recovery or grows).
    pub world_sizes: BTreeMap<String, u64>,
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Coordinator {
    /// Loads every stored job. A job that was running when the coordinator stopped waits
    /// [`StateConfig::readopt_window`] for its workers, which keep training, to re-register;
    /// one that was recovering, or whose workers do not all come back
    /// with the attempt, resumes from the newest checkpoint in a new attempt.
    pub fn new(store: Store, cfg: StateConfig) -> Result<Arc<Coordinator>, StoreError> {
        let store = Arc::new(store);
        Coordinator::with_durable(store.clone(), store, cfg)
    }

    /// As [`Coordinator::new`], with the effects written to `durable` (tests record them).
    pub fn with_durable(
        store: Arc<Store>,
        durable: Arc<dyn Durable>,
        cfg: StateConfig,
    ) -> Result<Arc<Coordinator>, StoreError> {
        let mut jobs = BTreeMap::new();
        let mut next_job = 1;
        let mut resumed = Vec::new();
        let now = Now::current();
        let window = cfg.readopt_window();
        // One record at a time: ended jobs are trimmed as they are read, so loading many
        // stored jobs never needs all their histories in memory at once.
        store.for_each_job(|mut info| {
            if let Some(n) =
                info.id.strip_prefix('j').and_then(|r| r.split('-').next()).and_then(|n| n.parse::<u64>().ok())
            {
                next_job = next_job.max(n + 1);
            }
            record::bound_record(&mut info);
            let mut entry = JobEntry::new(Job::new(info, now.instant), true);
            // Never refused: a restart applies to any state (and changes only active jobs).
            if let Ok(t) = machine::step(&mut entry.job, Event::Restarted { window }, now) {
                if t.effects.contains(&Effect::Persist) {
                    resumed.push(entry.job.info.id.clone());
                }
            }
            if entry.job.state().is_terminal() {
                entry.retire();
            }
            jobs.insert(entry.job.info.id.clone(), entry);
        })?;
        for id in resumed {
            if let Some(entry) = jobs.get(&id) {
                durable.put_job(&entry.job.info)?;
            }
        }
        let attempt_key = store.attempt_key()?;
        Ok(Arc::new(Coordinator {
            inner: Mutex::new(Inner { jobs, workers: Registry::new(), next_job, next_seq: 1 }),
            store,
            durable,
            committer: Committer::default(),
            cfg,
            wake: Notify::new(),
            closing: watch::Sender::new(false),
            attempt_key,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep serving rather than cascade.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs batches decided under the lock (which must be released by now), retires the jobs
    /// that ended, and returns the errors by job.
    fn run(&self, pending: Pending<'_>) -> Vec<(String, CoordinatorError)> {
        let outcomes: Vec<Outcome> = pending.run(&*self.durable);
        let mut errors = Vec::new();
        let mut retire = Vec::new();
        for (id, retires, result) in outcomes {
            match result {
                Ok(()) if retires => retire.push(id),
                Ok(()) => {}
                Err(e) => errors.push((id, e)),
            }
        }
        if !retire.is_empty() {
            let mut inner = self.lock();
            for id in retire {
                if let Some(entry) = inner.jobs.get_mut(&id) {
                    entry.retire();
                }
            }
        }
        errors
    }

    /// As [`Coordinator::run`], for a caller that answers no one: errors are logged.
    fn run_logged(&self, pending: Pending<'_>) {
        for (job, e) in self.run(pending) {
            warn!(%job, error = %e, "could not persist a job change");
        }
    }

    /// Begins a shutdown: every worker session is ended with UNAVAILABLE (the workers keep
    /// training and reconnect with backoff), new registrations are refused, and
    /// [`Coordinator::closing`] fires so that watch streams end too. Without this the
    /// gRPC server's graceful shutdown waits for these never-ending streams forever.
    /// Running jobs stay RUNNING in the store: a restarted coordinator re-adopts them.
    pub fn shut_down(&self) {
        let mut inner = self.lock();
        inner.workers.drop_all(Status::from(CoordinatorError::ShuttingDown));
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

    /// Validates and stores a job; returns its id once its record is durable.
    pub fn submit(&self, spec: JobSpec) -> Result<String, CoordinatorError> {
        spec::validate(&spec).map_err(|e| CoordinatorError::InvalidSpec(e.to_string()))?;
        let mut pending = Pending::new(&self.committer);
        let id = {
            let mut inner = self.lock();
            if !spec.name.is_empty()
                && inner.jobs.values().any(|j| j.job.info.spec.as_ref().is_some_and(|s| s.name == spec.name))
            {
                return Err(CoordinatorError::NameTaken(spec.name));
            }
            let id = format!("j{:04}-{}", inner.next_job, spec.model);
            inner.next_job += 1;
            let (job, t) = Job::submitted(id.clone(), spec, Now::current());
            // Holds the name from now on, but stays invisible until its record is stored.
            inner.jobs.insert(id.clone(), JobEntry::new(job, false));
            inner.apply(&id, t, &mut pending);
            id
        };
        let failed = self.run(pending).into_iter().next();
        let mut inner = self.lock();
        if let Some((_, e)) = failed {
            inner.jobs.remove(&id);
            return Err(e);
        }
        if let Some(entry) = inner.jobs.get_mut(&id) {
            entry.stored = true;
        }
        drop(inner);
        self.wake.notify_one();
        Ok(id)
    }

    /// Number of jobs known (active and ended).
    pub fn job_count(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Every job, in id order, summarised (see [`record::summarise`]).
    pub fn list(&self) -> Result<Vec<JobInfo>, CoordinatorError> {
        let (mut jobs, retired, seq) = {
            let inner = self.lock();
            let visible: Vec<&JobEntry> = inner.jobs.values().filter(|j| j.stored).collect();
            let jobs: Vec<JobInfo> = visible.iter().map(|j| j.job.info.clone()).collect();
            let retired: Vec<usize> = visible.iter().enumerate().filter(|(_, j)| j.retired).map(|(i, _)| i).collect();
            let seq = visible.iter().map(|j| j.seq).max().unwrap_or(0);
            (jobs, retired, seq)
        };
        self.committer.wait_through(seq);
        // An ended job's record never changes again, so reading it outside the lock is safe.
        let ids: Vec<&str> = retired.iter().map(|&i| jobs[i].id.as_str()).collect();
        let stored = self.store.get_jobs(&ids)?;
        for (i, full) in retired.into_iter().zip(stored) {
            if let Some(full) = full {
                jobs[i] = full;
            }
        }
        for job in &mut jobs {
            record::summarise(job);
        }
        Ok(jobs)
    }

    pub fn get(&self, id: &str) -> Result<JobInfo, CoordinatorError> {
        let mut inner = self.lock();
        let entry = inner.visible(id)?;
        let (info, retired, seq) = (entry.job.info.clone(), entry.retired, entry.seq);
        drop(inner);
        if retired {
            return self.stored(info);
        }
        self.committer.wait_through(seq);
        Ok(info)
    }

    /// The full record of an ended job, read from the store (the trimmed one if it is gone).
    fn stored(&self, trimmed: JobInfo) -> Result<JobInfo, CoordinatorError> {
        let full = self.store.get_jobs(&[trimmed.id.as_str()])?.pop().flatten();
        Ok(full.unwrap_or(trimmed))
    }

    /// The job as it is now, and a subscription to its later events unless it has ended.
    pub fn watch(&self, id: &str) -> Result<(JobInfo, Option<Subscription>), CoordinatorError> {
        let mut inner = self.lock();
        let decided = inner.next_seq - 1;
        let entry = inner.visible(id)?;
        if entry.retired {
            let trimmed = entry.job.info.clone();
            drop(inner);
            return Ok((self.stored(trimmed)?, None));
        }
        let rx = entry.subscribe();
        let (info, seq) = (entry.job.info.clone(), entry.seq);
        drop(inner);
        self.committer.wait_through(seq);
        Ok((info, Some(Subscription { rx, after: decided })))
    }

    /// Cancels a job that has not ended; returns its final record once stored.
    pub fn cancel(&self, id: &str) -> Result<JobInfo, CoordinatorError> {
        let mut pending = Pending::new(&self.committer);
        let full = {
            let mut inner = self.lock();
            let entry = inner.visible(id)?;
            let t = machine::step(&mut entry.job, Event::Cancel, Now::current())?;
            let full = entry.job.info.clone();
            inner.apply(id, t, &mut pending);
            full
        };
        match self.run(pending).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(full),
        }
    }

    // ------------------------------------------------------------------ workers

    /// Registers a worker session and sends it `Registered` (its id and the session key its
    /// checkpoint uploads present) on `tx`, ahead of any assignment; returns the id and
    /// the session number.
    pub fn register(&self, req: RegisterRequest, tx: WorkerTx) -> Result<(String, u64), CoordinatorError> {
        let reg = CheckedRegistration::new(req)?;
        let mut pending = Pending::new(&self.committer);
        let registered = {
            let mut inner = self.lock();
            if *self.closing.borrow() {
                return Err(CoordinatorError::ShuttingDown);
            }
            let registered = inner.workers.register(reg, tx, now_unix(), None)?;
            self.back_without_attempt(&mut inner, &registered.0, &mut pending);
            registered
        };
        self.run_logged(pending);
        self.wake.notify_one();
        Ok(registered)
    }

    /// A worker registered idle: if a restarted coordinator waits for it to re-register into
    /// a running attempt, that attempt cannot be re-adopted.
    fn back_without_attempt(&self, inner: &mut Inner, worker: &str, pending: &mut Pending<'_>) {
        let waiting: Vec<String> =
            inner.jobs.iter().filter(|(_, e)| e.job.awaits(worker)).map(|(id, _)| id.clone()).collect();
        for id in waiting {
            self.step_job(inner, &id, Event::RegisteredIdle { worker }, pending);
        }
    }

    /// A worker that kept training while its session was down re-registers, claiming its
    /// rank in the attempt it runs. When a restarted coordinator waits for
    /// that attempt's members and the claim is this worker's (its proof is made with the
    /// attempt's secret, which only the attempt's members received), the session starts busy
    /// in the attempt and `Registered.adopted` says so; otherwise it registers as
    /// [`Coordinator::register`] does and the worker stops the attempt. A claim on an attempt
    /// being re-adopted whose proof does not match is refused (PERMISSION_DENIED): no one
    /// may take another worker's place in a running group.
    pub fn rejoin(&self, req: RejoinRequest, tx: WorkerTx) -> Result<(String, u64), CoordinatorError> {
        let register = req.register.clone().unwrap_or_default();
        let worker = register.worker_id.clone();
        let reg = CheckedRegistration::new(register)?;
        let mut pending = Pending::new(&self.committer);
        let registered = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if *self.closing.borrow() {
                return Err(CoordinatorError::ShuttingDown);
            }
            inner.workers.check_free(&worker)?;
            let claim = rejoin::Claim {
                job_id: &req.job_id,
                attempt: req.attempt,
                rank: req.rank,
                world_size: req.world_size,
                worker_id: &worker,
            };
            let adopted = match inner.jobs.get_mut(&req.job_id).filter(|e| e.stored && !worker.is_empty()) {
                Some(entry) if entry.job.readopting().is_some_and(|r| r.attempt == req.attempt) => {
                    let secret = rejoin::attempt_secret(&self.attempt_key, &req.job_id, req.attempt);
                    if !rejoin::verify(&secret, &claim, &req.proof) {
                        return Err(CoordinatorError::RejoinRefused(format!(
                            "the proof for rank {} of attempt {} of job {} does not match",
                            req.rank, req.attempt, req.job_id
                        )));
                    }
                    let event = Event::Rejoin {
                        worker: &worker,
                        attempt: req.attempt,
                        rank: req.rank,
                        world_size: req.world_size,
                        position: (req.epoch, req.step),
                    };
                    let t = machine::step(&mut entry.job, event, Now::current())?;
                    let adopted = entry.job.rejoined(&worker, req.rank);
                    inner.apply(&req.job_id, t, &mut pending);
                    adopted
                }
                _ => false,
            };
            if !adopted {
                warn!(worker = %worker, job = ?req.job_id, attempt = req.attempt,
                    "a re-registering worker's attempt is not re-adopted; it stops it");
            }
            let registered =
                inner.workers.register(reg, tx, now_unix(), adopted.then(|| (req.job_id.clone(), req.attempt)))?;
            if !adopted {
                self.back_without_attempt(inner, &registered.0, &mut pending);
            }
            registered
        };
        self.run_logged(pending);
        self.wake.notify_one();
        Ok(registered)
    }

    pub fn heartbeat(&self, worker: &str, session: u64) {
        self.lock().workers.heartbeat(worker, session);
    }

    /// The worker's session ended (process died, network lost, or it shut down).
    pub fn session_closed(&self, worker: &str, session: u64, why: &str) {
        let mut pending = Pending::new(&self.committer);
        {
            let mut inner = self.lock();
            let Some(entry) = inner.workers.remove_session(worker, session) else { return };
            warn!(worker, why, "worker session ended");
            let reason = format!("worker {worker} lost ({why})");
            if let Some((job_id, attempt)) = entry.job {
                self.step_job(&mut inner, &job_id, Event::MemberLost { attempt, reason }, &mut pending);
            } else {
                self.lost_after_abort(&mut inner, worker, reason, &mut pending);
            }
        }
        self.run_logged(pending);
        self.wake.notify_one();
    }

    /// A worker without a job was lost: if it was a member of an attempt that already failed
    /// (a survivor reported the broken ring first, and every member was aborted), the job's
    /// recovery learns which worker was lost.
    fn lost_after_abort(&self, inner: &mut Inner, worker: &str, reason: String, pending: &mut Pending<'_>) {
        let found = inner.jobs.iter().find_map(|(id, e)| match &e.job.failed_attempt {
            Some((attempt, members))
                if e.job.state() == JobState::Recovering && members.iter().any(|m| m == worker) =>
            {
                Some((id.clone(), *attempt))
            }
            _ => None,
        });
        if let Some((job_id, attempt)) = found {
            self.step_job(inner, &job_id, Event::MemberLost { attempt, reason }, pending);
        }
    }

    /// Feeds an event that cannot be refused to a job, if the job exists.
    fn step_job(&self, inner: &mut Inner, id: &str, event: Event<'_>, pending: &mut Pending<'_>) -> bool {
        let Some(entry) = inner.jobs.get_mut(id) else { return false };
        match machine::step(&mut entry.job, event, Now::current()) {
            Ok(t) => inner.apply(id, t, pending),
            Err(_) => false,
        }
    }

    /// A report from `worker`'s session `session`; only the session that holds the rank in
    /// the job's current attempt is heard.
    pub fn report(&self, worker: &str, session: u64, report: JobReport) -> Result<(), CoordinatorError> {
        use cvdist_common::proto::job_report::Kind;
        let mut pending = Pending::new(&self.committer);
        let wake = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if !inner.workers.is_current(worker, session) {
                return Err(CoordinatorError::ClosedSession(worker.to_string()));
            }
            let id = report.job_id.clone();
            let entry = inner.visible(&id)?;
            // Read only for `Finished`: whether the final checkpoint's files exist.
            let on_disk = matches!(report.kind, Some(Kind::Finished(_)))
                && self.durable.checkpoint_on_disk(&id, &machine::final_checkpoint_name(&entry.job));
            let event = Event::Report { worker, report, final_checkpoint_on_disk: on_disk };
            let t = machine::step(&mut entry.job, event, Now::current())?;
            inner.apply(&id, t, &mut pending)
        };
        let failed = self.run(pending).into_iter().next();
        if wake {
            self.wake.notify_one();
        }
        match failed {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Records that a verified checkpoint of the current attempt is stored, if it is still
    /// the newest and its uploader still holds rank 0 of that attempt; returns once the
    /// record naming it is durable (the worker then deletes its local copy).
    pub fn checkpoint_stored(
        &self,
        job_id: &str,
        attempt: u32,
        session_key: &str,
        name: &str,
    ) -> Result<(), CoordinatorError> {
        let pos = names::parse_checkpoint_name(name).map_err(|e| CoordinatorError::BadCheckpointName(e.to_string()))?;
        let mut pending = Pending::new(&self.committer);
        {
            let mut inner = self.lock();
            accepts(&inner, job_id, attempt, session_key, pos, 1)?;
            let entry = inner.visible(job_id)?;
            let t = machine::step(
                &mut entry.job,
                Event::CheckpointStored { attempt, name: name.to_string() },
                Now::current(),
            )?;
            inner.apply(job_id, t, &mut pending);
        }
        match self.run(pending).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Records a refused checkpoint upload of the current attempt, so the job's log shows
    /// it and a job whose final checkpoint never arrives can say why.
    pub fn checkpoint_refused(&self, job_id: &str, attempt: u32, name: &str, reason: &str) {
        let mut pending = Pending::new(&self.committer);
        {
            let mut inner = self.lock();
            if inner.visible(job_id).is_err() {
                return;
            }
            let event = Event::CheckpointRefused { attempt, name: name.to_string(), reason: reason.to_string() };
            self.step_job(&mut inner, job_id, event, &mut pending);
        }
        self.run_logged(pending);
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
    ) -> Result<u64, CoordinatorError> {
        accepts(&self.lock(), job_id, attempt, session_key, pos, slack)
    }

    // ------------------------------------------------------------------ scheduling

    /// Periodic housekeeping: expired heartbeats, rendezvous timeouts, forming groups.
    pub fn tick(&self) {
        let mut pending = Pending::new(&self.committer);
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            for id in inner.workers.silent(self.cfg.heartbeat_timeout) {
                warn!(worker = %id, "no heartbeat within {:?}; dropping the worker", self.cfg.heartbeat_timeout);
                let Some(w) = inner.workers.drop_worker(&id, Status::deadline_exceeded("heartbeat timeout")) else {
                    continue;
                };
                let reason = format!("worker {id} missed heartbeats");
                if let Some((job, attempt)) = w.job {
                    self.step_job(inner, &job, Event::MemberLost { attempt, reason }, &mut pending);
                } else {
                    self.lost_after_abort(inner, &id, reason, &mut pending);
                }
            }
            let readopting: Vec<String> =
                inner.jobs.iter().filter(|(_, e)| e.job.readopting().is_some()).map(|(id, _)| id.clone()).collect();
            for id in readopting {
                self.step_job(inner, &id, Event::ReadoptDeadline, &mut pending);
            }
            schedule(inner, &self.attempt_key, &mut pending);
        }
        self.run_logged(pending);
    }

    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        let mut s = Stats::default();
        for j in inner.jobs.values().filter(|j| j.stored).map(|j| &j.job) {
            *s.jobs_by_state.entry(state_name(j.state())).or_default() += 1;
            s.restarts += j.info.restarts as u64;
            s.recoveries += j.info.recoveries.len() as u64;
            s.steps_replayed += j.info.recoveries.iter().map(|r| r.steps_replayed).sum::<u64>();
            if j.state() == JobState::Running {
                s.world_sizes.insert(j.info.id.clone(), u64::from(j.info.world_size));
                if let Some(p) = &j.info.progress {
                    s.images_per_sec += p.images_per_sec;
                    s.step_seconds = s.step_seconds.max(p.step_seconds);
                    s.allreduce_seconds = s.allreduce_seconds.max(p.allreduce_seconds);
                }
            }
        }
        s.workers = inner.workers.len() as u64;
        s.busy_workers = inner.workers.busy() as u64;
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
                    if let Some(entry) = inner.jobs.get(job_id) {
                        info.rank = entry.job.members.iter().position(|m| m == id).unwrap_or(0) as u32;
                        info.world_size = entry.job.members.len() as u32;
                    }
                }
                info
            })
            .collect()
    }
}

/// First come, first served: offers the idle workers to each waiting job in id order; a job
/// that waits for more workers holds the jobs behind it.
fn schedule(inner: &mut Inner, attempt_key: &[u8], pending: &mut Pending<'_>) {
    let waiting: Vec<String> = inner
        .jobs
        .values()
        .filter(|j| j.stored && matches!(j.job.state(), JobState::Queued | JobState::Recovering))
        .map(|j| j.job.info.id.clone())
        .collect();
    let now = Now::current();
    for id in waiting {
        let idle = inner.workers.idle();
        let Some(entry) = inner.jobs.get_mut(&id) else { continue };
        // Derived, not stored: a restarted coordinator checks re-registration proofs with it.
        let secret = rejoin::attempt_secret(attempt_key, &id, entry.job.info.attempt);
        let Ok(t) = machine::step(&mut entry.job, Event::Schedule { idle: &idle, secret }, now) else { continue };
        let holds = t.holds_queue;
        inner.apply(&id, t, pending);
        if holds {
            // Waiting jobs come first: no running job grows while one waits for workers.
            return;
        }
    }
    let growing: Vec<String> = inner
        .jobs
        .values()
        .filter(|j| j.stored && machine::wants_growth(&j.job))
        .map(|j| j.job.info.id.clone())
        .collect();
    for id in growing {
        let idle = inner.workers.idle();
        if idle.is_empty() {
            return;
        }
        let Some(entry) = inner.jobs.get_mut(&id) else { continue };
        let members: Option<Vec<IdleWorker>> = entry
            .job
            .members
            .iter()
            .map(|m| inner.workers.data_addr(m).map(|a| IdleWorker { id: m.clone(), data_addr: a }))
            .collect();
        // A member without a session is being lost: the recovery, not growth, re-forms.
        let Some(members) = members else { continue };
        let secret = rejoin::attempt_secret(attempt_key, &id, entry.job.info.attempt + 1);
        let Ok(t) = machine::step(&mut entry.job, Event::Grow { members: &members, idle: &idle, secret }, now) else {
            continue;
        };
        inner.apply(&id, t, pending);
    }
}

/// See [`Coordinator::accepts_checkpoint`].
fn accepts(
    inner: &Inner,
    job_id: &str,
    attempt: u32,
    session_key: &str,
    pos: (u32, u64),
    slack: u32,
) -> Result<u64, CoordinatorError> {
    let entry =
        inner.jobs.get(job_id).filter(|e| e.stored).ok_or_else(|| CoordinatorError::NoSuchJob(job_id.into()))?;
    let job = &entry.job;
    machine::check_upload_attempt(job, attempt)?;
    let is_rank0 = job.members.first().is_some_and(|w| inner.workers.holds_attempt(w, job_id, attempt, session_key));
    if !is_rank0 {
        return Err(CoordinatorError::CheckpointRefused {
            job_id: job_id.to_string(),
            why: "only rank 0 of the current attempt uploads checkpoints".into(),
        });
    }
    machine::check_upload_position(job, attempt, pos, slack)?;
    let model = job.info.spec.as_ref().map(|s| s.model.clone()).unwrap_or_default();
    models::max_checkpoint_bytes(&model)
        .ok_or_else(|| CoordinatorError::UnknownModel { job_id: job_id.to_string(), model: model.clone() })
}

#[cfg(test)]
mod tests;

//! The coordinator's state: every job and every worker, behind one mutex. The lock is never
//! held across an await, a write or a wait for one; the one piece of I/O under it is a read,
//! when a job's last rank reports `Finished`: whether the final checkpoint's two files exist
//! (two `stat` calls), which must agree with the job's record of its newest checkpoint, and
//! that changes only under the lock. This module is the glue; each concept has its own:
//!
//! - [`machine`]: a job's life as one pure function (state, event) → (state, effects), with the
//!   job state diagram and its guards;
//! - [`registry`]: the worker sessions, heartbeats, idle/busy and session keys;
//! - [`effects`]: carrying out a transition's durable writes and watcher events after the lock
//!   is released, in decision order, behind the [`effects::Durable`] trait;
//! - [`record`]: the size bounds of a job record;
//! - [`error`]: why a request was refused ([`CoordinatorError`]; `service/` maps it to gRPC);
//! - `entry`: a job as kept between transitions, with its watchers;
//! - the [`Coordinator`]'s methods by caller: `clients` (the job RPCs), `sessions` (the
//!   worker sessions), `uploads` (checkpoint uploads), `scheduler` (the periodic pass), `stats`.
//!
//! A method takes the lock, feeds the event to [`machine::step`], applies the effects that
//! touch the registry or message a worker (so those messages keep the decided order), queues
//! the rest, releases the lock and runs the queue. A client never sees a state whose record is
//! not yet durable: answers wait for the batches behind them ([`effects::Committer`]). Those
//! writes and waits block the calling thread, so the server calls these methods off the async
//! runtime's worker threads.

mod clients;
pub mod effects;
mod entry;
pub mod error;
pub mod machine;
pub mod record;
pub mod registry;
mod scheduler;
mod sessions;
mod stats;
mod uploads;

pub use entry::Subscription;
pub use error::CoordinatorError;
pub use registry::WorkerTx;
pub use stats::Stats;
pub use uploads::{UploadClaim, UploadStage};

use crate::store::{Store, StoreError};
use cvdist_common::proto::job_event;
use cvdist_common::{rejoin, run_dir};
use effects::{Batch, Committer, Durable, Outcome, Pending, Write};
use entry::JobEntry;
use machine::{state_name, Effect, Event, Job, Now, Transition};
use registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};
use tonic::Status;
use tracing::warn;

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
                    let spec = entry.job.spec().clone();
                    new_batch(&mut slot, next_seq, id).writes.push(Write::Spec(Box::new(spec)))
                }
                Effect::WriteMetrics => {
                    new_batch(&mut slot, next_seq, id).writes.push(Write::Metrics(info.history.clone()))
                }
                Effect::Persist => new_batch(&mut slot, next_seq, id).writes.push(Write::Job(Box::new(info.clone()))),
                Effect::Finish => {
                    let b = new_batch(&mut slot, next_seq, id);
                    b.writes.push(Write::Job(Box::new(info.clone())));
                    b.writes.push(Write::Summary(Box::new(summary(&entry.job)), info.history.clone()));
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
fn summary(job: &Job) -> run_dir::Summary {
    let info = &job.info;
    let mut summary = run_dir::Summary::from_history(&info.history);
    summary.job_id = info.id.clone();
    summary.model = job.spec().model.clone();
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

    /// Feeds a job an event it cannot refuse, if the job exists.
    fn step_job(&self, inner: &mut Inner, id: &str, event: Event<'_>, pending: &mut Pending<'_>) -> bool {
        let Some(entry) = inner.jobs.get_mut(id) else { return false };
        match machine::step(&mut entry.job, event, Now::current()) {
            Ok(t) => inner.apply(id, t, pending),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests;

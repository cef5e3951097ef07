//! A job as the coordinator keeps it between transitions: the machine's job, whether its
//! submission is durable, the newest batch of its effects, its watchers' channel, and, once
//! it has ended and is stored, only the part of it that listing and scheduling need.

use super::effects::Batch;
use super::machine::Job;
use cvdist_common::proto::{job_event, JobEvent};
use tokio::sync::broadcast;

/// Events buffered per watched job for a slow watcher (~0.5 MB: a slot holds a whole
/// `JobInfo` snapshot), so the channel exists only while someone watches.
const EVENT_BUFFER: usize = 1024;

/// A job as the coordinator keeps it: the state machine's job, plus who watches it and what
/// of it is durable.
pub(super) struct JobEntry {
    /// The whole record while the job is active; once it has ended and is stored, only what
    /// listing and scheduling need (see [`JobEntry::retire`]).
    pub(super) job: Job,
    /// Live events for `WatchJob`, each with the sequence number of the batch that sent it:
    /// created by the first watcher, dropped once no one watches or the job has ended.
    pub(super) events: Option<broadcast::Sender<(u64, JobEvent)>>,
    /// The job has ended and its full record is in the store; `job.info` is trimmed.
    pub(super) retired: bool,
    /// The submission's record is durable. Until then the job is invisible (it only holds
    /// its name) and is not scheduled.
    pub(super) stored: bool,
    /// The newest batch of effects of this job: what a reader shows is durable once it ran.
    pub(super) seq: u64,
}

impl JobEntry {
    pub(super) fn new(job: Job, stored: bool) -> JobEntry {
        JobEntry { job, events: None, retired: false, stored, seq: 0 }
    }

    /// A subscription to this job's events, creating the channel for the first watcher.
    pub(super) fn subscribe(&mut self) -> broadcast::Receiver<(u64, JobEvent)> {
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
    pub(super) fn publish(&mut self, event: job_event::Event, batch: &mut Batch) {
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
    pub(super) fn retire(&mut self) {
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

/// A watcher's subscription to a job's events after the snapshot it was given.
pub struct Subscription {
    pub(super) rx: broadcast::Receiver<(u64, JobEvent)>,
    /// Events of batches up to this one are already in the snapshot.
    pub(super) after: u64,
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

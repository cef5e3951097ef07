//! Carrying out a transition's effects outside the coordinator's lock, in the order they
//! were decided.
//!
//! Under the lock, each transition's durable writes (redb commits, run-directory files) and
//! the events its watchers get are put into a [`Batch`] with a sequence number. After the lock
//! is released, batches run strictly in sequence order ([`Committer`]): a later transition's
//! record can never be overwritten by an earlier one, however the threads are scheduled. A
//! batch first makes its writes durable and only then publishes its events, and whoever
//! answers a client waits until the batches behind what it shows have run
//! ([`Committer::wait_through`]), so nothing a client sees is lost when the coordinator is
//! killed. Messages to workers are not effects of this kind: they go into the workers'
//! channels under the lock (see `registry.rs`).

use super::error::CoordinatorError;
use crate::store::{Store, StoreError};
use cvdist_common::proto::{EpochMetrics, JobEvent, JobInfo, JobSpec};
use cvdist_common::run_dir::{self, RunDirError, Summary};
use std::sync::{Condvar, Mutex};
use tokio::sync::broadcast;
use tracing::warn;

/// The durable writes of the state machine, behind a trait so tests can record them.
pub trait Durable: Send + Sync {
    /// Stores the job record (one redb transaction).
    fn put_job(&self, info: &JobInfo) -> Result<(), StoreError>;
    /// Writes `job.json` into the job's run directory.
    fn write_spec(&self, job_id: &str, spec: &JobSpec) -> Result<(), RunDirError>;
    /// Rewrites `metrics.jsonl` in the job's run directory.
    fn write_metrics(&self, job_id: &str, history: &[EpochMetrics]) -> Result<(), RunDirError>;
    /// Writes `summary.json` in the job's run directory.
    fn write_summary(&self, job_id: &str, summary: &Summary) -> Result<(), RunDirError>;
    /// Whether both files of checkpoint `name` of the job exist (a read, made under the lock
    /// when the last rank finishes).
    fn checkpoint_on_disk(&self, job_id: &str, name: &str) -> bool;
}

impl Durable for Store {
    fn put_job(&self, info: &JobInfo) -> Result<(), StoreError> {
        Store::put_job(self, info)
    }

    fn write_spec(&self, job_id: &str, spec: &JobSpec) -> Result<(), RunDirError> {
        run_dir::write_job(&self.job_dir(job_id), spec)
    }

    fn write_metrics(&self, job_id: &str, history: &[EpochMetrics]) -> Result<(), RunDirError> {
        run_dir::write_metrics(&self.job_dir(job_id), history)
    }

    fn write_summary(&self, job_id: &str, summary: &Summary) -> Result<(), RunDirError> {
        run_dir::write_summary(&self.job_dir(job_id), summary)
    }

    fn checkpoint_on_disk(&self, job_id: &str, name: &str) -> bool {
        let dir = self.checkpoint_dir(job_id);
        dir.join(format!("{name}.json")).is_file() && dir.join(format!("{name}.safetensors")).is_file()
    }
}

/// One durable write of a batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// `job.json`; failing it fails the submission. Boxed like the job record, so that a
    /// batch's writes stay small whatever the spec grows to.
    Spec(Box<JobSpec>),
    /// `metrics.jsonl`; a failure is logged.
    Metrics(Vec<EpochMetrics>),
    /// The job record; failing it fails the batch (nothing after it runs).
    Job(Box<JobInfo>),
    /// `summary.json` and `metrics.jsonl` of an ended job; a failure is logged.
    Summary(Box<Summary>, Vec<EpochMetrics>),
}

/// The effects of one transition of one job that run outside the lock.
pub struct Batch {
    pub seq: u64,
    pub job_id: String,
    pub writes: Vec<Write>,
    /// Events for the job's watchers, sent once the writes are durable.
    pub events: Vec<(broadcast::Sender<(u64, JobEvent)>, JobEvent)>,
    /// The job ended: once its record is stored, memory keeps only a summary of it.
    pub retire: bool,
}

impl Batch {
    pub fn new(seq: u64, job_id: &str) -> Batch {
        Batch { seq, job_id: job_id.to_string(), writes: Vec::new(), events: Vec::new(), retire: false }
    }

    /// Runs the writes in order, then sends the events. A failed job-record write or spec
    /// write stops the batch there and is returned; run-directory files that only mirror
    /// the record are logged and skipped.
    pub fn run(&self, durable: &dyn Durable) -> Result<(), CoordinatorError> {
        for w in &self.writes {
            match w {
                Write::Spec(spec) => durable.write_spec(&self.job_id, spec)?,
                Write::Job(info) => durable.put_job(info)?,
                Write::Metrics(history) => {
                    if let Err(e) = durable.write_metrics(&self.job_id, history) {
                        warn!(job = %self.job_id, error = %e, "could not write metrics.jsonl");
                    }
                }
                Write::Summary(summary, history) => {
                    if let Err(e) = durable
                        .write_summary(&self.job_id, summary)
                        .and_then(|_| durable.write_metrics(&self.job_id, history))
                    {
                        warn!(job = %self.job_id, error = %e, "could not write the run directory");
                    }
                }
            }
        }
        for (tx, event) in &self.events {
            // No receiver left is fine: the next event under the lock drops the channel.
            let _ = tx.send((self.seq, event.clone()));
        }
        Ok(())
    }
}

/// Runs batches one at a time in sequence order (a ticket lock: batch `n` waits until batch
/// `n - 1` has run). Sequence numbers start at 1 and are handed out under the coordinator's
/// lock; every number handed out must be run or skipped, or the batches after it wait forever
/// ([`Pending`] sees to that).
pub struct Committer {
    /// The sequence number of the newest batch that has run.
    done: Mutex<u64>,
    turn: Condvar,
}

impl Default for Committer {
    fn default() -> Committer {
        Committer { done: Mutex::new(0), turn: Condvar::new() }
    }
}

impl Committer {
    fn done(&self) -> std::sync::MutexGuard<'_, u64> {
        self.done.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for `batch`'s turn, runs it, and lets the next one go (also should it panic).
    pub fn run(&self, batch: &Batch, durable: &dyn Durable) -> Result<(), CoordinatorError> {
        struct Turn<'a>(&'a Committer, u64);
        impl Drop for Turn<'_> {
            fn drop(&mut self) {
                self.0.finish(self.1);
            }
        }
        self.wait_for(batch.seq - 1);
        let _turn = Turn(self, batch.seq);
        batch.run(durable)
    }

    /// Marks `seq` as run without running it (its owner gave up).
    fn skip(&self, seq: u64) {
        self.wait_for(seq - 1);
        self.finish(seq);
    }

    fn finish(&self, seq: u64) {
        let mut done = self.done();
        *done = (*done).max(seq);
        self.turn.notify_all();
    }

    /// Blocks until every batch up to `seq` has run (at once for 0).
    pub fn wait_through(&self, seq: u64) {
        self.wait_for(seq);
    }

    fn wait_for(&self, seq: u64) {
        let mut done = self.done();
        while *done < seq {
            done = self.turn.wait(done).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// Batches decided under the lock and not yet run. Dropping it unrun (an early return or a
/// panic) skips them in order, so later batches never wait for them.
pub struct Pending<'c> {
    committer: &'c Committer,
    batches: std::collections::VecDeque<Batch>,
}

/// What became of one batch: its job, whether the job is to be retired, the result.
pub type Outcome = (String, bool, Result<(), CoordinatorError>);

impl<'c> Pending<'c> {
    pub fn new(committer: &'c Committer) -> Pending<'c> {
        Pending { committer, batches: Default::default() }
    }

    pub fn push(&mut self, batch: Batch) {
        self.batches.push_back(batch);
    }

    /// Runs the batches in order.
    pub fn run(mut self, durable: &dyn Durable) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(self.batches.len());
        while let Some(b) = self.batches.pop_front() {
            let result = self.committer.run(&b, durable);
            outcomes.push((b.job_id, b.retire, result));
        }
        outcomes
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        for b in &self.batches {
            self.committer.skip(b.seq);
        }
    }
}

//! The worker registry: who is connected (one session each), their data-plane addresses,
//! capabilities and session keys, when each was last heard from, and which job attempt each
//! works on (busy) or none (idle). Jobs live in the state machine (`machine/`); the
//! registry only knows a worker's `(job, attempt)`.
//!
//! Messages to a worker go into its session's unbounded channel here, under the coordinator's
//! lock, so they reach the worker in the order they were decided (`Registered` before the
//! first `Assignment`, an `Abort` before the next assignment).

use super::error::CoordinatorError;
use super::machine::IdleWorker;
use cvdist_common::proto::{
    coordinator_message, Abort, Assignment, CoordinatorMessage, RegisterRequest, Registered, WorkerCapabilities,
};
use cvdist_common::{names, text, version};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::info;

/// Longest capability string (device, GPU name) a worker may register with.
const MAX_CAPABILITY_TEXT: usize = 128;

/// A worker session's outgoing stream: messages, or the status that ends the session.
pub type WorkerTx = mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>;

pub struct WorkerEntry {
    /// Proves on an upload that the caller is this session (sent in `Registered`).
    pub key: String,
    pub data_addr: String,
    pub caps: WorkerCapabilities,
    pub tx: WorkerTx,
    pub session: u64,
    /// The attempt this worker works on; `None` while idle.
    pub job: Option<(String, u32)>,
    pub last_seen: Instant,
    pub registered_unix: f64,
}

pub struct Registry {
    workers: BTreeMap<String, WorkerEntry>,
    next_session: u64,
}

/// A registration checked for what needs no lock: protocol version, id and address syntax,
/// capability text bounded.
pub struct CheckedRegistration {
    req: RegisterRequest,
    caps: WorkerCapabilities,
}

impl CheckedRegistration {
    pub fn new(req: RegisterRequest) -> Result<CheckedRegistration, CoordinatorError> {
        if req.protocol_version != version::PROTOCOL_VERSION {
            return Err(CoordinatorError::ProtocolMismatch {
                worker: req.protocol_version,
                ours: version::PROTOCOL_VERSION,
            });
        }
        if !req.worker_id.is_empty() {
            names::check_worker_id(&req.worker_id).map_err(|e| CoordinatorError::InvalidWorker(e.to_string()))?;
        }
        names::check_data_addr(&req.data_addr).map_err(|e| CoordinatorError::InvalidWorker(e.to_string()))?;
        let mut caps = req.capabilities.clone().unwrap_or_default();
        caps.device = text::bound(&caps.device, MAX_CAPABILITY_TEXT);
        caps.gpu_name = text::bound(&caps.gpu_name, MAX_CAPABILITY_TEXT);
        Ok(CheckedRegistration { req, caps })
    }
}

impl Default for Registry {
    fn default() -> Registry {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry { workers: BTreeMap::new(), next_session: 1 }
    }

    /// Adds a worker session and sends it `Registered` (its id and the session key its
    /// checkpoint uploads present) on `tx`; returns the id and the session number.
    /// `adopted`: the worker re-registered into this running attempt,
    /// so it starts busy in it and `Registered.adopted` tells it so.
    pub fn register(
        &mut self,
        reg: CheckedRegistration,
        tx: WorkerTx,
        now_unix: f64,
        adopted: Option<(String, u32)>,
    ) -> Result<(String, u64), CoordinatorError> {
        let CheckedRegistration { req, caps } = reg;
        let id = if req.worker_id.is_empty() {
            format!("worker-{:06x}", rand::random::<u32>() & 0xff_ffff)
        } else {
            req.worker_id.clone()
        };
        self.check_free(&id)?;
        let session = self.next_session;
        self.next_session += 1;
        let key = hex::encode(rand::random::<[u8; 32]>());
        // `Registered` goes out under the coordinator's lock, before the worker is visible to
        // the scheduler: the channel is FIFO, so it always precedes the worker's first
        // `Assignment`. Sent after the lock is released, an assignment made in between
        // reached the worker first, and that job ran without the session key its rank 0
        // needs for checkpoint uploads (its final checkpoint was refused).
        let registered = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Registered(Registered {
                worker_id: id.clone(),
                session_key: key.clone(),
                adopted: adopted.is_some(),
            })),
        };
        if tx.send(Ok(registered)).is_err() {
            return Err(CoordinatorError::SessionClosedWhileRegistering);
        }
        self.workers.insert(
            id.clone(),
            WorkerEntry {
                key,
                data_addr: req.data_addr,
                caps,
                tx,
                session,
                job: adopted,
                last_seen: Instant::now(),
                registered_unix: now_unix,
            },
        );
        info!(worker = %id, workers = self.workers.len(), "worker registered");
        Ok((id, session))
    }

    /// Refuses an id that already has a session.
    pub fn check_free(&self, id: &str) -> Result<(), CoordinatorError> {
        if self.workers.contains_key(id) {
            return Err(CoordinatorError::DuplicateWorker(id.to_string()));
        }
        Ok(())
    }

    /// Whether `session` is the worker's current session.
    pub fn is_current(&self, worker: &str, session: u64) -> bool {
        self.workers.get(worker).map(|w| w.session) == Some(session)
    }

    pub fn heartbeat(&mut self, worker: &str, session: u64) {
        if let Some(w) = self.workers.get_mut(worker) {
            if w.session == session {
                w.last_seen = Instant::now();
            }
        }
    }

    /// Removes the worker if `session` is its current one.
    pub fn remove_session(&mut self, worker: &str, session: u64) -> Option<WorkerEntry> {
        if !self.is_current(worker, session) {
            return None;
        }
        self.workers.remove(worker)
    }

    /// Ids of the workers not heard from within `timeout`, in id order.
    pub fn silent(&self, timeout: Duration) -> Vec<String> {
        self.workers.iter().filter(|(_, w)| w.last_seen.elapsed() > timeout).map(|(id, _)| id.clone()).collect()
    }

    /// Removes the worker and ends its session stream with `status`.
    pub fn drop_worker(&mut self, worker: &str, status: Status) -> Option<WorkerEntry> {
        let w = self.workers.remove(worker)?;
        let _ = w.tx.send(Err(status));
        Some(w)
    }

    /// Ends every session with `status` (a shutdown).
    pub fn drop_all(&mut self, status: Status) {
        for (_, w) in std::mem::take(&mut self.workers) {
            let _ = w.tx.send(Err(status.clone()));
        }
    }

    /// The idle workers in id order.
    pub fn idle(&self) -> Vec<IdleWorker> {
        self.workers
            .iter()
            .filter(|(_, w)| w.job.is_none())
            .map(|(id, w)| IdleWorker { id: id.clone(), data_addr: w.data_addr.clone() })
            .collect()
    }

    /// The data-plane address of a registered worker (busy or idle).
    pub fn data_addr(&self, worker: &str) -> Option<String> {
        self.workers.get(worker).map(|w| w.data_addr.clone())
    }

    /// Marks the worker busy in the assignment's attempt and sends it the assignment.
    pub fn assign(&mut self, worker: &str, assignment: Assignment) {
        let Some(w) = self.workers.get_mut(worker) else { return };
        w.job = Some((assignment.job_id.clone(), assignment.attempt));
        let _ = w.tx.send(Ok(CoordinatorMessage { msg: Some(coordinator_message::Msg::Assignment(assignment)) }));
    }

    /// Frees the worker if it still works on `job_id`, telling it to abort when `abort` is set.
    pub fn release(&mut self, worker: &str, job_id: &str, abort: Option<Abort>) {
        let Some(w) = self.workers.get_mut(worker) else { return };
        if w.job.as_ref().is_none_or(|(j, _)| j != job_id) {
            return;
        }
        w.job = None;
        if let Some(abort) = abort {
            let _ = w.tx.send(Ok(CoordinatorMessage { msg: Some(coordinator_message::Msg::Abort(abort)) }));
        }
    }

    /// Whether `worker` works on `attempt` of `job_id` and `session_key` is its session's key
    /// (compared in constant time).
    pub fn holds_attempt(&self, worker: &str, job_id: &str, attempt: u32, session_key: &str) -> bool {
        self.workers.get(worker).is_some_and(|w| {
            w.job.as_ref().is_some_and(|(j, a)| j == job_id && *a == attempt)
                && cvdist_common::auth::constant_time_eq(w.key.as_bytes(), session_key.as_bytes())
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn busy(&self) -> usize {
        self.workers.values().filter(|w| w.job.is_some()).count()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &WorkerEntry)> {
        self.workers.iter()
    }
}

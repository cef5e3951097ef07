//! A watchdog per device communicator: no rank ever waits forever on a collective.
//!
//! Device collectives (NCCL) are enqueued on a CUDA stream and return at once; a dead or
//! stalled peer shows up later, as a kernel that never finishes. Whatever then waits for
//! that stream (a host read of the result, a stream sync inside libtorch) would block
//! without limit. As in PyTorch's ProcessGroupNCCL, a thread per communicator watches
//! every enqueued operation and aborts the communicator — which makes the stuck kernels
//! return — when
//!
//! * an operation is not complete [`Watchdog::timeout`] after it was enqueued
//!   (`--collective-timeout`, [`cvdist_common::spec::collective_timeout`]),
//! * the communicator reports an asynchronous error (a peer died, a network error), or
//! * the job's [`AbortHandle`] fires (the coordinator ended the attempt, `cvdist cancel`).
//!
//! After that every operation on the communicator fails with the recorded cause. The
//! trainer waits through [`Watchdog::wait`], which the same causes cut short, never through
//! an unbounded device sync.
//!
//! The logic only knows two small traits, [`Pending`] (one enqueued operation) and
//! [`Watched`] (the communicator), so it is tested on CPU with fakes that never complete
//! (`worker/tests/watchdog.rs`); `nccl.rs` implements them with CUDA events and NCCL calls.

use super::{AbortHandle, CollectiveError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the watchdog thread checks deadlines, the abort flag and the communicator's
/// asynchronous error state. A fault is acted on at most this long after it is visible;
/// the checks are a few cheap calls, so 10 ms costs nothing measurable.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Longest single sleep of a thread in [`Watchdog::wait`] between completion polls. Short
/// waits (a step's all-reduce) start at a few microseconds and back off up to this.
const WAIT_POLL_MAX: Duration = Duration::from_micros(500);

/// One enqueued operation whose completion can be polled.
pub trait Pending: Send {
    /// `Ok(true)` once complete, `Ok(false)` while in flight, `Err(text)` when the query
    /// itself failed (e.g. a CUDA error), which the watchdog treats as a fault.
    fn poll(&self) -> Result<bool, String>;
}

/// The communicator a [`Watchdog`] guards.
pub trait Watched: Send + Sync {
    /// `Ok` while healthy; the error once the communicator failed asynchronously.
    fn async_error(&self) -> Result<(), CollectiveError>;
    /// Aborts the communicator: in-flight operations return (with undefined results) and it
    /// is unusable afterwards. Must not wait for peers. The watchdog calls it at most once.
    fn abort(&self);
    /// Called once on the watchdog thread before its first check (NCCL: selects the
    /// communicator's CUDA device, which is per host thread).
    fn bind_thread(&self) {}
}

/// Why a communicator was given up; kept so every later call reports the same cause.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// An operation was not complete within the collective timeout.
    Deadline { op: &'static str, secs: f64 },
    /// The job's abort handle fired with this reason.
    Aborted(String),
    /// The communicator or a completion query reported an error.
    Failed(String),
}

impl Fault {
    pub fn to_error(&self) -> CollectiveError {
        match self {
            Fault::Deadline { op, secs } => CollectiveError::Deadline { op, secs: *secs },
            Fault::Aborted(reason) => CollectiveError::Aborted(reason.clone()),
            Fault::Failed(text) => CollectiveError::Broken(text.clone()),
        }
    }
}

struct Entry {
    op: &'static str,
    pending: Box<dyn Pending>,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    /// In enqueue order; on one stream they also complete in this order.
    queue: VecDeque<Entry>,
    fault: Option<Fault>,
    stop: bool,
}

struct Shared {
    comm: Arc<dyn Watched>,
    timeout: Duration,
    abort: AbortHandle,
    state: Mutex<State>,
    wake: Condvar,
    /// Set by the first fault; guarantees `comm.abort()` runs once.
    comm_aborted: AtomicBool,
}

/// Watches one communicator's operations from its own thread; see the module docs.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog").field("timeout", &self.shared.timeout).field("fault", &self.fault()).finish()
    }
}

impl Watchdog {
    /// Starts the watchdog thread for `comm`. `timeout` is the longest an operation may
    /// take from enqueue to completion; `abort` is the job's abort handle.
    ///
    /// Errors: `Config` for a zero timeout, `Io` if the thread cannot be started.
    pub fn spawn(comm: Arc<dyn Watched>, timeout: Duration, abort: AbortHandle) -> Result<Watchdog, CollectiveError> {
        if timeout.is_zero() {
            return Err(CollectiveError::Config("collective timeout must be > 0".into()));
        }
        let shared = Arc::new(Shared {
            comm,
            timeout,
            abort,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            comm_aborted: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || run(&s))
            .map_err(|e| CollectiveError::io("starting the collective watchdog", e))?;
        Ok(Watchdog { shared, thread: Some(thread) })
    }

    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// The fault that ended the communicator, if any.
    pub fn fault(&self) -> Option<Fault> {
        lock(&self.shared.state).fault.clone()
    }

    /// Ok while the communicator may be used: no fault so far and the abort handle has not
    /// fired (if it has, the communicator is aborted now, from this thread).
    pub fn check(&self) -> Result<(), CollectiveError> {
        self.shared.with_checks(|st| match &st.fault {
            Some(f) => Err(f.to_error()),
            None => Ok(()),
        })
    }

    /// Registers an operation that was just enqueued; its deadline starts now.
    pub fn watch(&self, op: &'static str, pending: Box<dyn Pending>) -> Result<(), CollectiveError> {
        let mut st = lock(&self.shared.state);
        if let Some(f) = &st.fault {
            return Err(f.to_error());
        }
        st.queue.push_back(Entry { op, pending, deadline: Instant::now() + self.shared.timeout });
        Ok(())
    }

    /// Waits until every watched operation has completed. Returns the fault instead as soon
    /// as there is one: a deadline passed, the abort handle fired, or the communicator
    /// failed. Never blocks longer than the oldest operation's deadline plus one poll.
    pub fn wait(&self) -> Result<(), CollectiveError> {
        let mut nap = Duration::from_micros(5);
        loop {
            let done = self.shared.with_checks(|st| match &st.fault {
                Some(f) => Some(Err(f.to_error())),
                None if st.queue.is_empty() => Some(Ok(())),
                None => None,
            });
            if let Some(result) = done {
                return result;
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(WAIT_POLL_MAX);
        }
    }

    /// True when nothing is in flight and nothing failed: the communicator may be torn
    /// down gracefully.
    pub fn is_clean(&self) -> bool {
        self.shared.with_checks(|st| st.fault.is_none() && st.queue.is_empty())
    }

    /// Gives the communicator up with `fault` (aborting it) unless it already failed.
    pub fn fail(&self, fault: Fault) {
        let mut st = lock(&self.shared.state);
        self.shared.record(&mut st, fault);
        drop(st);
        self.shared.abort_comm();
    }

    /// Stops the watchdog thread (idempotent). The communicator is left as it is.
    pub fn shutdown(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            // A panic in the watchdog thread has already been reported by the runtime.
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    /// Runs the checks ([`Shared::observe`]), then `f` on the state; aborts the
    /// communicator afterwards, outside the lock, if the checks found a fault.
    fn with_checks<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let mut st = lock(&self.state);
        self.observe(&mut st);
        let out = f(&st);
        let failed = st.fault.is_some();
        drop(st);
        if failed {
            self.abort_comm();
        }
        out
    }

    /// One round of checks: retire completed operations, then look for a fault (abort
    /// handle, query error, the oldest operation's deadline) and record it.
    fn observe(&self, st: &mut State) {
        if st.fault.is_some() {
            return;
        }
        if self.abort.is_aborted() {
            let reason = self.abort.reason().unwrap_or_else(|| "aborted".into());
            return self.record(st, Fault::Aborted(reason));
        }
        while let Some(front) = st.queue.front() {
            match front.pending.poll() {
                Ok(true) => {
                    st.queue.pop_front();
                }
                Ok(false) => break,
                Err(e) => {
                    let text = format!("{}: {e}", front.op);
                    return self.record(st, Fault::Failed(text));
                }
            }
        }
        if let Some(front) = st.queue.front() {
            if Instant::now() >= front.deadline {
                let fault = Fault::Deadline { op: front.op, secs: self.timeout.as_secs_f64() };
                self.record(st, fault);
            }
        }
    }

    /// Records the first fault and forgets what was in flight; the caller then calls
    /// [`Shared::abort_comm`] once it has released the state lock, so that waiters see the
    /// fault at once even if the abort itself takes a moment.
    fn record(&self, st: &mut State, fault: Fault) {
        if st.fault.is_none() {
            st.fault = Some(fault);
        }
        st.queue.clear();
        self.wake.notify_all();
    }

    /// Aborts the communicator the first time it is called.
    fn abort_comm(&self) {
        if !self.comm_aborted.swap(true, Ordering::SeqCst) {
            self.comm.abort();
        }
    }
}

fn run(shared: &Shared) {
    shared.comm.bind_thread();
    loop {
        let stop = shared.with_checks(|st| st.stop || st.fault.is_some());
        if stop {
            return;
        }
        // Asked without the state lock: the call may take a moment, and waiters must not
        // stall behind it.
        if let Err(e) = shared.comm.async_error() {
            let mut st = lock(&shared.state);
            shared.record(&mut st, Fault::Failed(e.to_string()));
            drop(st);
            shared.abort_comm();
            return;
        }
        let st = lock(&shared.state);
        if st.stop {
            return;
        }
        // Woken early only by shutdown; the checks themselves run on the interval.
        let _ = shared.wake.wait_timeout(st, WATCH_INTERVAL);
    }
}

/// Polls `ready` until it returns true, for at most `timeout`: how a non-blocking
/// communicator's creation (and its other set-up steps) is awaited. The abort handle cuts
/// the wait short. The caller aborts whatever it was waiting for when this fails.
///
/// Errors: `Deadline` after `timeout`, `Aborted` when `abort` fires, or `ready`'s error.
pub fn wait_until(
    op: &'static str,
    timeout: Duration,
    abort: &AbortHandle,
    mut ready: impl FnMut() -> Result<bool, CollectiveError>,
) -> Result<(), CollectiveError> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_micros(5);
    loop {
        abort.check()?;
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CollectiveError::Deadline { op, secs: timeout.as_secs_f64() });
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(1));
    }
}

/// A panic elsewhere while holding the lock leaves a plain queue behind; the watchdog must
/// keep working (and aborting) even then.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

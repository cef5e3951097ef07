//! The collective watchdog (issue 12, item 2) driven by a fake communicator whose
//! operations never complete, the way a dead or stalled NCCL peer leaves them: the abort
//! fires at the deadline, the job's abort flag fires it too, an asynchronous error fires
//! it, and the trainer's gradient reduction returns an error instead of blocking.
//!
//! Time bounds are generous on purpose (CI machines are slow and shared): each test checks
//! that the wait ends after the cause and long before "forever".

use cvdist_worker::collective::watchdog::{self, Fault, Pending, Watchdog, Watched};
use cvdist_worker::collective::{AbortHandle, Collective, CollectiveError};
use cvdist_worker::train::buckets::{Buckets, BUCKET_ELEMS};
use cvdist_worker::train::sync::{GradSync, SyncError};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Slack allowed on top of a deadline before a test calls it a hang.
const SLACK: Duration = Duration::from_secs(10);

/// A communicator whose kernels run until it is aborted, as NCCL's do when a peer is gone.
#[derive(Default)]
struct FakeComm {
    aborts: AtomicUsize,
    aborted_at: Mutex<Option<Instant>>,
    aborted: AtomicBool,
    async_error: Mutex<Option<String>>,
}

impl FakeComm {
    fn aborts(&self) -> usize {
        self.aborts.load(Ordering::SeqCst)
    }
}

impl Watched for FakeComm {
    fn async_error(&self) -> Result<(), CollectiveError> {
        match self.async_error.lock().unwrap().clone() {
            Some(text) => Err(CollectiveError::Nccl { call: "async", code: 6, message: text }),
            None => Ok(()),
        }
    }
    fn abort(&self) {
        self.aborts.fetch_add(1, Ordering::SeqCst);
        *self.aborted_at.lock().unwrap() = Some(Instant::now());
        self.aborted.store(true, Ordering::SeqCst);
    }
}

/// An operation that completes only when its communicator is aborted (NCCL kernels exit on
/// `ncclCommAbort`), i.e. never on its own.
struct NeverDone(Arc<FakeComm>);

impl Pending for NeverDone {
    fn poll(&self) -> Result<bool, String> {
        Ok(self.0.aborted.load(Ordering::SeqCst))
    }
}

/// Completes on its `n`-th poll.
struct DoneAfter(AtomicUsize);

impl Pending for DoneAfter {
    fn poll(&self) -> Result<bool, String> {
        Ok(self.0.fetch_sub(1, Ordering::SeqCst) <= 1)
    }
}

fn spawn(timeout: Duration, abort: &AbortHandle) -> (Arc<FakeComm>, Watchdog) {
    let comm = Arc::new(FakeComm::default());
    let dog = Watchdog::spawn(comm.clone(), timeout, abort.clone()).unwrap();
    (comm, dog)
}

#[test]
fn an_operation_that_never_completes_is_aborted_at_its_deadline() {
    let timeout = Duration::from_millis(300);
    let (comm, dog) = spawn(timeout, &AbortHandle::new());
    let enqueued = Instant::now();
    dog.watch("ncclAllReduce", Box::new(NeverDone(comm.clone()))).unwrap();
    let err = dog.wait().unwrap_err();
    let waited = enqueued.elapsed();
    match &err {
        CollectiveError::Deadline { op, secs } => assert_eq!((*op, *secs), ("ncclAllReduce", 0.3)),
        other => panic!("expected Deadline, got {other:?}"),
    }
    assert!(err.to_string().contains("--collective-timeout"), "{err}");
    assert!(waited >= timeout, "returned after {waited:?}, before the deadline");
    assert!(waited < timeout + SLACK, "returned only after {waited:?}");
    let aborted_after = comm.aborted_at.lock().unwrap().expect("communicator aborted") - enqueued;
    assert!(aborted_after >= timeout && aborted_after < timeout + SLACK, "aborted after {aborted_after:?}");
    assert_eq!(comm.aborts(), 1);
    // Unusable from now on, with the same cause.
    assert!(matches!(dog.check(), Err(CollectiveError::Deadline { .. })));
    assert!(matches!(dog.watch("ncclBroadcast", Box::new(DoneAfter(1.into()))), Err(CollectiveError::Deadline { .. })));
    assert_eq!(dog.fault(), Some(Fault::Deadline { op: "ncclAllReduce", secs: 0.3 }));
    assert!(!dog.is_clean());
    assert_eq!(comm.aborts(), 1, "aborted exactly once");
}

/// The watchdog thread acts on its own: the communicator is aborted at the deadline even
/// when nobody waits (the trainer may be blocked inside a libtorch sync instead, which
/// only the abort releases).
#[test]
fn the_watchdog_thread_aborts_without_a_waiter() {
    let timeout = Duration::from_millis(200);
    let (comm, dog) = spawn(timeout, &AbortHandle::new());
    let enqueued = Instant::now();
    dog.watch("ncclAllReduce", Box::new(NeverDone(comm.clone()))).unwrap();
    // Stand-in for a stream sync inside libtorch: returns only once the kernel exits.
    while !comm.aborted.load(Ordering::SeqCst) {
        assert!(enqueued.elapsed() < timeout + SLACK, "never aborted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(enqueued.elapsed() >= timeout);
    assert!(matches!(dog.check(), Err(CollectiveError::Deadline { .. })));
    assert_eq!(comm.aborts(), 1);
}

#[test]
fn the_job_abort_flag_aborts_the_communicator() {
    let abort = AbortHandle::new();
    let (comm, dog) = spawn(Duration::from_secs(600), &abort);
    dog.watch("ncclAllReduce", Box::new(NeverDone(comm.clone()))).unwrap();
    let fire = {
        let abort = abort.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            abort.abort("coordinator ended attempt 3");
        })
    };
    let start = Instant::now();
    let err = dog.wait().unwrap_err();
    fire.join().unwrap();
    assert!(start.elapsed() < SLACK, "took {:?}", start.elapsed());
    match err {
        CollectiveError::Aborted(reason) => assert_eq!(reason, "coordinator ended attempt 3"),
        other => panic!("expected Aborted, got {other:?}"),
    }
    assert_eq!(comm.aborts(), 1);
}

/// An abort with nothing in flight (between steps) still reaches the communicator, from
/// the watchdog thread.
#[test]
fn an_abort_between_operations_aborts_the_idle_communicator() {
    let abort = AbortHandle::new();
    let (comm, dog) = spawn(Duration::from_secs(600), &abort);
    abort.abort("cancelled");
    let start = Instant::now();
    while comm.aborts() == 0 {
        assert!(start.elapsed() < SLACK, "idle communicator never aborted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(dog.check(), Err(CollectiveError::Aborted(r)) if r == "cancelled"));
}

#[test]
fn an_asynchronous_error_aborts_the_communicator() {
    let (comm, dog) = spawn(Duration::from_secs(600), &AbortHandle::new());
    dog.watch("ncclAllReduce", Box::new(NeverDone(comm.clone()))).unwrap();
    *comm.async_error.lock().unwrap() = Some("remote process exited or there was a network error".into());
    let start = Instant::now();
    let err = dog.wait().unwrap_err();
    assert!(start.elapsed() < SLACK);
    assert!(matches!(err, CollectiveError::Broken(ref t) if t.contains("network error")), "{err:?}");
    assert_eq!(comm.aborts(), 1);
}

#[test]
fn completed_operations_leave_the_communicator_clean() {
    let (comm, dog) = spawn(Duration::from_secs(600), &AbortHandle::new());
    for n in [1, 3, 50] {
        dog.watch("ncclAllReduce", Box::new(DoneAfter(n.into()))).unwrap();
    }
    dog.wait().unwrap();
    assert!(dog.is_clean());
    dog.check().unwrap();
    assert_eq!(comm.aborts(), 0);
}

/// Non-blocking communicator creation: a peer that never joins ends in `Deadline`, an abort
/// in `Aborted`, both well before "forever".
#[test]
fn communicator_creation_is_bounded() {
    let abort = AbortHandle::new();
    let start = Instant::now();
    let err =
        watchdog::wait_until("ncclCommInitRankConfig", Duration::from_millis(200), &abort, || Ok(false)).unwrap_err();
    assert!(matches!(err, CollectiveError::Deadline { op: "ncclCommInitRankConfig", .. }), "{err:?}");
    assert!(start.elapsed() >= Duration::from_millis(200) && start.elapsed() < SLACK);

    let fire = {
        let abort = abort.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            abort.abort("cancelled");
        })
    };
    let err =
        watchdog::wait_until("ncclCommInitRankConfig", Duration::from_secs(600), &abort, || Ok(false)).unwrap_err();
    fire.join().unwrap();
    assert!(matches!(err, CollectiveError::Aborted(ref r) if r == "cancelled"), "{err:?}");
    let mut polls = 0;
    watchdog::wait_until("x", Duration::from_secs(600), &AbortHandle::new(), || {
        polls += 1;
        Ok(polls == 3)
    })
    .unwrap();
}

/// A device communicator as the trainer sees it, on the fake: every reduction is enqueued
/// and watched, and `wait` goes through the watchdog.
struct FakeDeviceComm {
    comm: Arc<FakeComm>,
    dog: Watchdog,
    abort: AbortHandle,
}

impl Collective for FakeDeviceComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.dog.watch("ncclAllReduce", Box::new(NeverDone(self.comm.clone())))?;
        self.dog.wait()
    }
    fn broadcast(&mut self, buf: &mut [f32], _root: usize) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buf)
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.all_reduce_sum(&mut [])
    }
    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
    fn reduce_tensor_sum(&mut self, _t: &mut Tensor) -> Result<(), CollectiveError> {
        self.dog.check()?;
        self.dog.watch("ncclAllReduce", Box::new(NeverDone(self.comm.clone())))
    }
    fn wait(&mut self) -> Result<(), CollectiveError> {
        self.dog.wait()
    }
}

/// Two parameters in flat buckets, with gradients from one backward.
fn buckets_with_grads() -> Buckets {
    let w = Tensor::ones([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let params = vec![("w".to_string(), w.shallow_clone()), ("b".to_string(), b.shallow_clone())];
    let buckets = Buckets::new(&params, BUCKET_ELEMS, BUCKET_ELEMS).expect("buckets");
    (w.sum(Kind::Float) + b.sum(Kind::Float)).backward();
    buckets
}

/// The trainer-facing call: one step's gradient reduction against a peer that never
/// answers returns `Deadline` at the collective timeout, and the next step fails at once.
#[test]
fn the_gradient_reduction_returns_an_error_instead_of_blocking() {
    let timeout = Duration::from_millis(300);
    let abort = AbortHandle::new();
    let (comm, dog) = spawn(timeout, &abort);
    let mut fake = FakeDeviceComm { comm: comm.clone(), dog, abort };
    let mut buckets = buckets_with_grads();
    let mut sync = GradSync::new();
    let start = Instant::now();
    let err = sync.reduce(&mut buckets, &mut fake, &Tensor::from(0.5f32), None).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, SyncError::Collective(CollectiveError::Deadline { op: "ncclAllReduce", .. })), "{err:?}");
    assert!(took >= timeout && took < timeout + SLACK, "took {took:?}");
    assert_eq!(comm.aborts(), 1);
    let again = Instant::now();
    assert!(matches!(sync.reduce(&mut buckets, &mut fake, &Tensor::from(0.5f32), None), Err(SyncError::Collective(_))));
    assert!(again.elapsed() < SLACK);
}

/// The same reduction, cut short by the coordinator's abort long before the timeout.
#[test]
fn the_gradient_reduction_ends_at_the_coordinators_abort() {
    let abort = AbortHandle::new();
    let (comm, dog) = spawn(Duration::from_secs(600), &abort);
    let mut fake = FakeDeviceComm { comm: comm.clone(), dog, abort: abort.clone() };
    let fire = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        abort.abort("job cancelled");
    });
    let mut buckets = buckets_with_grads();
    let start = Instant::now();
    let err = GradSync::new().reduce(&mut buckets, &mut fake, &Tensor::from(0.5f32), None).unwrap_err();
    fire.join().unwrap();
    assert!(start.elapsed() < SLACK, "took {:?}", start.elapsed());
    assert!(matches!(err, SyncError::Collective(CollectiveError::Aborted(ref r)) if r == "job cancelled"), "{err:?}");
    assert_eq!(comm.aborts(), 1);
}

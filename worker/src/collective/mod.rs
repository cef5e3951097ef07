//! Data-plane collectives: how workers sum gradients and share parameters.
//!
//! * [`Ring`]: bandwidth-optimal ring all-reduce over direct TCP links between workers,
//!   used for host (CPU) buffers.
//! * [`c10d::ProcessGroup`]: PyTorch's own process groups (NCCL for CUDA tensors, gloo
//!   for CPU ones), rendezvoused through the authenticated [`rendezvous`] store.
//! * [`Solo`]: world size 1, every op is a no-op.
//!
//! Gradients may travel as 16-bit values (`--grad-compression`, [`compress`]): only the
//! gradient all-reduce ([`Collective::reduce_tensor_sum`], [`Collective::all_reduce_sum_grads`])
//! is compressed; every other op stays exact f32.
//!
//! Every op either completes on all ranks or fails with a [`CollectiveError`] within the
//! configured timeout; a failed ring is unusable afterwards (ops return
//! [`CollectiveError::Broken`]) because its peers can no longer agree on where in the
//! byte stream they are. Recovery is the caller's job: tear down and rendezvous again.

pub mod backend;
pub mod c10d;
pub mod compress;
mod executor;
mod io_error;
mod link;
pub mod rendezvous;
pub mod ring;
mod schedule;
pub mod wire;

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

pub use cvdist_common::choices::GradCompression;
pub use ring::Ring;

/// Why a collective operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("{op} timed out after {secs:.1}s waiting on rank {peer}")]
    Timeout { op: &'static str, peer: usize, secs: f64 },
    #[error("rank {peer} closed the connection")]
    PeerClosed { peer: usize },
    #[error("collective aborted: {0}")]
    Aborted(String),
    #[error("rank {peer} failed data-plane authentication (wrong job secret?)")]
    Auth { peer: usize },
    #[error("data-plane protocol error: {0}")]
    Protocol(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid collective arguments: {0}")]
    Config(String),
    #[error("communicator unusable after an earlier failure: {0}")]
    Broken(String),
    #[error("NCCL unavailable: {0}")]
    NcclUnavailable(String),
    #[error("NCCL {call} failed: {message} (ncclResult_t {code})")]
    Nccl { call: &'static str, code: i32, message: String },
    /// A device collective did not complete within `--collective-timeout`; the
    /// communicator was aborted (a peer is dead or stalled).
    #[error("{op} not complete after {secs:.0}s (--collective-timeout); communicator aborted")]
    Deadline { op: &'static str, secs: f64 },
}

impl CollectiveError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CollectiveError::Io { context: context.into(), source }
    }
}

/// A group of ranks that can sum and share `f32` host buffers.
///
/// All ranks must issue the same sequence of ops with the same lengths (and roots);
/// a mismatch is detected and reported as [`CollectiveError::Protocol`] where possible.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In-place sum across ranks of a host f32 buffer.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Overwrites `buf` on every rank with `root`'s contents.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// A handle that can make in-flight and future ops fail fast from another thread.
    fn abort_handle(&self) -> AbortHandle;

    /// Sets the format gradients travel in (`--grad-compression`), for every later
    /// [`Collective::all_reduce_sum_grads`] and [`Collective::reduce_tensor_sum`]; all ranks
    /// must set the same. The default accepts only `None`: a communicator without a
    /// compressed path says so (`Config`) rather than silently sending f32.
    fn set_grad_compression(&mut self, c: GradCompression) -> Result<(), CollectiveError> {
        match c {
            GradCompression::None => Ok(()),
            other => Err(CollectiveError::Config(format!("this communicator cannot send gradients as {other}"))),
        }
    }

    /// The format set by [`Collective::set_grad_compression`] (`None` until then).
    fn grad_compression(&self) -> GradCompression {
        GradCompression::None
    }

    /// In-place sum across ranks of a host f32 buffer of gradients, on the wire in the
    /// format of [`Collective::set_grad_compression`]; with `None` exactly
    /// [`Collective::all_reduce_sum`]. With a 16-bit format every rank ends with the same
    /// values, within the rounding bound of `compress.rs` of the exact sum.
    fn all_reduce_sum_grads(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buf)
    }

    /// Waits until every op enqueued so far has completed, or fails once the
    /// communicator's watchdog gave it up (deadline, abort, peer failure). Host
    /// collectives complete before they return, so the default has nothing to wait for.
    fn wait(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }

    /// Called once when the job ended cleanly on this rank: a device communicator waits
    /// (bounded) for its last ops so that dropping it tears it down gracefully; without
    /// this call a drop aborts it, which never waits for peers.
    fn finish(&mut self) -> Result<(), CollectiveError> {
        self.wait()
    }

    /// In-place sum of a contiguous f32 tensor of gradients across ranks (the trainer's
    /// per-bucket all-reduce), compressed as [`Collective::all_reduce_sum_grads`]. The
    /// default works on host memory (CPU tensors in place, others staged through a host
    /// copy); a c10d group reduces the tensor where it is.
    fn reduce_tensor_sum(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        reduce_on_host(self, t, true)
    }

    /// In-place sum of a contiguous f32 tensor across ranks, never compressed (state that
    /// must stay exact, such as BatchNorm statistics and packed metric sums, which live
    /// recovery restores). The default works on host memory as
    /// [`Collective::reduce_tensor_sum`]'s does; a c10d group reduces the tensor where it is.
    fn reduce_tensor_sum_exact(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        reduce_on_host(self, t, false)
    }

    /// Starts [`Collective::reduce_tensor_sum`] of one gradient bucket; the result is
    /// only defined after [`Collective::finish_reduce_grads`]. Buckets must be started in
    /// the same order on every rank. A communicator that cannot leave an op in flight
    /// completes it here (the default).
    fn start_reduce_grads(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        self.reduce_tensor_sum(t)
    }

    /// Completes every bucket started since the last call (c10d on CUDA: the caller's
    /// current stream waits for them on the device; the host does not). Fails with the
    /// first bucket's error.
    fn finish_reduce_grads(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }

    /// Whether the collectives issued so far completed on their device, for those that
    /// may still be running there: c10d on NCCL finishes an operation only in stream
    /// order, so a host that went on may hold a state built from a reduction that later
    /// failed (an abort in flight). None when every operation issued is known complete
    /// (the ring and gloo wait on the host). Each call covers the operations since the
    /// previous one (and, in stream order, every earlier one).
    fn completion(&mut self) -> Option<Completion> {
        None
    }
}

/// Where the device collectives covered by a [`Completion`] stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionState {
    Running,
    Succeeded,
    /// Some operation recorded an error (an abort or a timeout included): the values it
    /// wrote are undefined.
    Failed,
}

/// A poll of some device collectives' completion ([`Collective::completion`]).
pub struct Completion(Box<dyn FnMut() -> CompletionState + Send>);

impl Completion {
    pub fn new(poll: impl FnMut() -> CompletionState + Send + 'static) -> Completion {
        Completion(Box::new(poll))
    }

    /// Where they stand now, without waiting.
    pub fn poll(&mut self) -> CompletionState {
        (self.0)()
    }

    /// Polls until they are no longer running or `limit` has passed.
    pub fn settle(&mut self, limit: std::time::Duration) -> CompletionState {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let state = self.poll();
            if state != CompletionState::Running || std::time::Instant::now() >= deadline {
                return state;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// The host-memory reductions behind [`Collective::reduce_tensor_sum`] (`grads`: with the
/// gradient compression) and [`Collective::reduce_tensor_sum_exact`]: CPU tensors in
/// place, others staged through a host copy.
fn reduce_on_host<C: Collective + ?Sized>(c: &mut C, t: &mut tch::Tensor, grads: bool) -> Result<(), CollectiveError> {
    if t.kind() != tch::Kind::Float || !t.is_contiguous() {
        return Err(CollectiveError::Config("reduce_tensor_sum needs a contiguous f32 tensor".into()));
    }
    let n = t.numel();
    let mut reduce = |buf: &mut [f32]| if grads { c.all_reduce_sum_grads(buf) } else { c.all_reduce_sum(buf) };
    if t.device() == tch::Device::Cpu {
        // SAFETY: contiguous CPU f32 tensor of n elements, exclusively borrowed.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) };
        return reduce(buf);
    }
    let mut host = vec![0f32; n];
    t.f_copy_data(&mut host, n).map_err(|e| CollectiveError::Protocol(format!("staging tensor: {e}")))?;
    reduce(&mut host)?;
    let back = tch::Tensor::from_slice(&host).to_device(t.device());
    t.copy_(&back);
    Ok(())
}

/// All-reduces the gradients `buf` in pieces of at most `bucket_elems` floats, the way the
/// trainer syncs its buckets (compressed as [`Collective::all_reduce_sum_grads`]). Pieces
/// go one after another; each already pipelines internally, so overlapping buckets would
/// only add contention.
pub fn all_reduce_buckets(
    comm: &mut dyn Collective,
    buf: &mut [f32],
    bucket_elems: usize,
) -> Result<(), CollectiveError> {
    if bucket_elems == 0 {
        return Err(CollectiveError::Config("bucket_elems must be > 0".into()));
    }
    for bucket in buf.chunks_mut(bucket_elems) {
        comm.all_reduce_sum_grads(bucket)?;
    }
    Ok(())
}

/// Clone + Send handle that aborts a communicator from any thread (e.g. when the
/// coordinator says the job attempt is over): sockets are shut down so that blocked
/// reads/writes return at once, and every later op fails with
/// [`CollectiveError::Aborted`].
#[derive(Clone, Default)]
pub struct AbortHandle {
    inner: Arc<AbortInner>,
}

#[derive(Default)]
struct AbortInner {
    aborted: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Sockets to shut down on abort, keyed by a registration id so that a dropped
    /// ring can take its (duplicated) descriptors back out.
    streams: Mutex<Vec<(u64, TcpStream)>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Threads that may be parked waiting for progress and must re-check the flag.
    threads: Mutex<Vec<Thread>>,
    /// Run once by the first `abort()` (a c10d group's own abort).
    callbacks: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle").field("aborted", &self.is_aborted()).finish()
    }
}

impl AbortHandle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Aborts with `reason`; idempotent (the first reason wins).
    pub fn abort(&self, reason: impl Into<String>) {
        {
            let mut slot = lock(&self.inner.reason);
            if slot.is_none() {
                *slot = Some(reason.into());
            }
        }
        self.inner.aborted.store(true, Ordering::SeqCst);
        for (_, s) in lock(&self.inner.streams).iter() {
            // Errors only mean the socket is already gone, which is the goal.
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in lock(&self.inner.threads).iter() {
            t.unpark();
        }
        let callbacks = std::mem::take(&mut *lock(&self.inner.callbacks));
        for f in callbacks {
            f();
        }
    }

    /// Runs `f` at the first `abort()`, or at once if that already happened.
    pub(crate) fn on_abort(&self, f: Box<dyn FnOnce() + Send>) {
        let mut callbacks = lock(&self.inner.callbacks);
        if self.is_aborted() {
            drop(callbacks);
            f();
        } else {
            callbacks.push(f);
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.inner.aborted.load(Ordering::SeqCst)
    }

    /// The reason given to the first `abort()`, if any.
    pub fn reason(&self) -> Option<String> {
        lock(&self.inner.reason).clone()
    }

    pub(crate) fn error(&self) -> CollectiveError {
        CollectiveError::Aborted(self.reason().unwrap_or_else(|| "aborted".into()))
    }

    /// Fails with `Aborted` if the handle has fired.
    pub(crate) fn check(&self) -> Result<(), CollectiveError> {
        if self.is_aborted() {
            Err(self.error())
        } else {
            Ok(())
        }
    }

    /// Registers a socket to shut down on abort. If the abort already happened the
    /// socket is shut down immediately, so a late registration cannot escape it.
    pub(crate) fn register_stream(&self, s: &TcpStream) -> Result<u64, CollectiveError> {
        let clone = s.try_clone().map_err(|e| CollectiveError::io("cloning socket for abort", e))?;
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        lock(&self.inner.streams).push((id, clone));
        if self.is_aborted() {
            let _ = s.shutdown(Shutdown::Both);
        }
        Ok(id)
    }

    /// Closes our duplicates of a dropped communicator's sockets.
    pub(crate) fn unregister_streams(&self, ids: &[u64]) {
        lock(&self.inner.streams).retain(|(id, _)| !ids.contains(id));
    }

    pub(crate) fn register_thread(&self, t: Thread) {
        lock(&self.inner.threads).push(t);
    }
}

/// Mutex poisoning only means another thread panicked while holding a plain list; the
/// data is still usable, and aborting must work even then.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fails with [`CollectiveError::Config`] unless `root` is a rank of a group of `world`.
fn check_broadcast_root(root: usize, world: usize) -> Result<(), CollectiveError> {
    if root >= world {
        return Err(CollectiveError::Config(format!("broadcast root {root} >= world size {world}")));
    }
    Ok(())
}

/// World size 1: every op is a no-op (but still honours abort).
#[derive(Debug, Default)]
pub struct Solo {
    abort: AbortHandle,
    grad_compression: GradCompression,
}

impl Solo {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.abort.check()
    }
    fn broadcast(&mut self, _buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        check_broadcast_root(root, 1)?;
        self.abort.check()
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.abort.check()
    }
    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
    /// Any format: with one rank nothing travels, so nothing is rounded either.
    fn set_grad_compression(&mut self, c: GradCompression) -> Result<(), CollectiveError> {
        self.grad_compression = c;
        Ok(())
    }
    fn grad_compression(&self) -> GradCompression {
        self.grad_compression
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solo_is_identity_and_honours_abort() {
        let mut s = Solo::new();
        let mut v = vec![1.0, 2.0];
        s.all_reduce_sum(&mut v).unwrap();
        s.broadcast(&mut v, 0).unwrap();
        s.barrier().unwrap();
        assert_eq!(v, [1.0, 2.0]);
        assert!(matches!(s.broadcast(&mut v, 1), Err(CollectiveError::Config(_))));
        // One rank sends nothing, so any compression is accepted and changes nothing.
        s.set_grad_compression(GradCompression::Fp16).unwrap();
        assert_eq!(s.grad_compression(), GradCompression::Fp16);
        let mut big = vec![1e6f32, 1.0 + 1e-6];
        s.all_reduce_sum_grads(&mut big).unwrap();
        assert_eq!(big, [1e6, 1.0 + 1e-6]);
        s.abort_handle().abort("test over");
        match s.all_reduce_sum(&mut v) {
            Err(CollectiveError::Aborted(r)) => assert_eq!(r, "test over"),
            other => panic!("expected Aborted, got {other:?}"),
        }
    }

    #[test]
    fn buckets_cover_the_whole_buffer() {
        struct Count(usize, Vec<usize>);
        impl Collective for Count {
            fn rank(&self) -> usize {
                0
            }
            fn world_size(&self) -> usize {
                1
            }
            fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
                self.0 += 1;
                self.1.push(buf.len());
                Ok(())
            }
            fn broadcast(&mut self, _: &mut [f32], _: usize) -> Result<(), CollectiveError> {
                Ok(())
            }
            fn barrier(&mut self) -> Result<(), CollectiveError> {
                Ok(())
            }
            fn abort_handle(&self) -> AbortHandle {
                AbortHandle::new()
            }
        }
        let mut c = Count(0, vec![]);
        let mut v = vec![0.0; 10];
        all_reduce_buckets(&mut c, &mut v, 4).unwrap();
        assert_eq!(c.1, [4, 4, 2]);
        assert!(all_reduce_buckets(&mut c, &mut v, 0).is_err());
        // A communicator without a compressed path refuses one instead of sending f32.
        assert!(c.set_grad_compression(GradCompression::None).is_ok());
        match c.set_grad_compression(GradCompression::Bf16) {
            Err(CollectiveError::Config(m)) => assert_eq!(m, "this communicator cannot send gradients as bf16"),
            other => panic!("expected Config, got {other:?}"),
        }
    }
}

//! A [`Collective`] on PyTorch's own c10d process groups (`csrc/c10d_shim.cpp`):
//! `ProcessGroupNCCL` for CUDA tensors (`--collective nccl`, or `auto` on GPUs) and
//! `ProcessGroupGloo` for CPU tensors (`--collective gloo`). Both go through the same
//! code here; only the constructor and the device differ, so the CI runs on gloo test the
//! glue a GPU run uses.
//!
//! What c10d owns, and cvdist therefore does not re-implement: the NCCL communicator and
//! its streams, the ordering of a collective after the kernels that produced its input
//! (an event on the caller's current stream), keeping inputs alive until the collective
//! completes, the watchdog that aborts a communicator whose collective exceeds the
//! timeout (`TORCH_NCCL_*` settings and the flight recorder apply as in any PyTorch job),
//! and `Work::wait`, which on CUDA makes the caller's stream wait on the device instead of
//! blocking the host.
//!
//! The rendezvous goes through [`super::rendezvous`]: rank 0 serves a store that only
//! holders of the attempt's secret can use, so nobody else can join, stall or poison it.
//!
//! Gradient buckets are started by [`Collective::start_reduce_grads`] and completed
//! together by [`Collective::finish_reduce_grads`], so on CUDA the reductions overlap
//! backward and the compute stream waits for them once, after backward, with no host
//! wait. On gloo completion is waited for on the host, polling the abort handle, so an
//! abort ends the wait at once even though gloo cannot interrupt its running collective;
//! a group left with a collective in flight is released on a background thread (its
//! collective ends at the group's timeout or when a peer's socket closes).

use super::rendezvous::{StoreClient, StoreError, StoreServer};
use super::{
    check_broadcast_root, AbortHandle, Collective, CollectiveError, Completion, CompletionState, GradCompression,
};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Bytes of an error message from the shim.
const ERR_CAP: usize = 512;

#[repr(C)]
struct StoreOps {
    set: unsafe extern "C" fn(*mut c_void, *const u8, usize, *const u8, usize, *mut c_char, usize) -> c_int,
    get: unsafe extern "C" fn(*mut c_void, *const u8, usize, i64, *mut c_void, *mut c_char, usize) -> c_int,
    add: unsafe extern "C" fn(*mut c_void, *const u8, usize, i64, *mut i64, *mut c_char, usize) -> c_int,
    check: unsafe extern "C" fn(*mut c_void, *const u8, usize, *mut c_int, *mut c_char, usize) -> c_int,
    remove: unsafe extern "C" fn(*mut c_void, *const u8, usize, *mut c_int, *mut c_char, usize) -> c_int,
    num_keys: unsafe extern "C" fn(*mut c_void, *mut i64, *mut c_char, usize) -> c_int,
    release: unsafe extern "C" fn(*mut c_void),
}

#[repr(C)]
struct CGroup {
    _private: [u8; 0],
}
#[repr(C)]
struct CWork {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn cvdist_bytes_assign(out: *mut c_void, data: *const u8, len: usize);
    fn cvdist_nccl_built() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn cvdist_group_gloo(
        ctx: *mut c_void,
        ops: *const StoreOps,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        host: *const c_char,
        err: *mut c_char,
        cap: usize,
    ) -> *mut CGroup;
    #[allow(clippy::too_many_arguments)]
    fn cvdist_group_nccl(
        ctx: *mut c_void,
        ops: *const StoreOps,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        device: c_int,
        err: *mut c_char,
        cap: usize,
    ) -> *mut CGroup;
    fn cvdist_group_all_reduce(
        g: *mut CGroup,
        t: *mut torch_sys::C_tensor,
        wire: c_int,
        err: *mut c_char,
        cap: usize,
    ) -> *mut CWork;
    fn cvdist_group_broadcast(
        g: *mut CGroup,
        t: *mut torch_sys::C_tensor,
        root: c_int,
        err: *mut c_char,
        cap: usize,
    ) -> *mut CWork;
    fn cvdist_group_barrier(g: *mut CGroup, err: *mut c_char, cap: usize) -> *mut CWork;
    fn cvdist_work_completed(w: *mut CWork) -> c_int;
    fn cvdist_work_state(w: *mut CWork) -> c_int;
    fn cvdist_work_finish(w: *mut CWork, err: *mut c_char, cap: usize) -> c_int;
    fn cvdist_work_free(w: *mut CWork);
    fn cvdist_group_abort(g: *mut CGroup);
    fn cvdist_group_shutdown(g: *mut CGroup);
    fn cvdist_group_free(g: *mut CGroup);
}

/// Whether this build can make NCCL process groups (its libtorch has CUDA and the NCCL
/// headers were found when it was compiled).
pub fn nccl_built() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { cvdist_nccl_built() == 1 }
}

fn message(buf: &[c_char]) -> String {
    // SAFETY: the shim NUL-terminates within ERR_CAP; the buffer starts zeroed.
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

fn write_err(e: impl std::fmt::Display, err: *mut c_char, cap: usize) {
    if err.is_null() || cap == 0 {
        return;
    }
    let text = e.to_string();
    let n = text.len().min(cap - 1);
    // SAFETY: `err` points at `cap` writable bytes (the shim's buffer).
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), err as *mut u8, n);
        *err.add(n) = 0;
    }
}

/// # Safety
/// `ctx` is a live `StoreClient` from `Box::into_raw`; `key` points at `klen` bytes.
unsafe fn store_and_key<'a>(ctx: *mut c_void, key: *const u8, klen: usize) -> (&'a StoreClient, &'a [u8]) {
    // SAFETY: as the caller guarantees.
    unsafe { (&*(ctx as *const StoreClient), std::slice::from_raw_parts(key, klen)) }
}

fn done(r: Result<(), StoreError>, err: *mut c_char, cap: usize) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => {
            write_err(e, err, cap);
            -1
        }
    }
}

unsafe extern "C" fn store_set(
    ctx: *mut c_void,
    key: *const u8,
    klen: usize,
    val: *const u8,
    vlen: usize,
    err: *mut c_char,
    cap: usize,
) -> c_int {
    // SAFETY: the shim passes its live context and buffers of the given lengths.
    let (store, key) = unsafe { store_and_key(ctx, key, klen) };
    let value = unsafe { std::slice::from_raw_parts(val, vlen) };
    done(store.set(key, value), err, cap)
}

unsafe extern "C" fn store_get(
    ctx: *mut c_void,
    key: *const u8,
    klen: usize,
    timeout_ms: i64,
    out: *mut c_void,
    err: *mut c_char,
    cap: usize,
) -> c_int {
    // SAFETY: as in `store_set`; `out` is the shim's vector.
    let (store, key) = unsafe { store_and_key(ctx, key, klen) };
    let r = store.get(key, Duration::from_millis(timeout_ms.max(0) as u64)).map(|v| {
        // SAFETY: `out` is a live `std::vector<uint8_t>*`; `v` outlives the call.
        unsafe { cvdist_bytes_assign(out, v.as_ptr(), v.len()) }
    });
    done(r, err, cap)
}

unsafe extern "C" fn store_add(
    ctx: *mut c_void,
    key: *const u8,
    klen: usize,
    delta: i64,
    out: *mut i64,
    err: *mut c_char,
    cap: usize,
) -> c_int {
    // SAFETY: as in `store_set`; `out` is a valid pointer.
    let (store, key) = unsafe { store_and_key(ctx, key, klen) };
    done(store.add(key, delta).map(|v| unsafe { *out = v }), err, cap)
}

unsafe extern "C" fn store_check(
    ctx: *mut c_void,
    key: *const u8,
    klen: usize,
    present: *mut c_int,
    err: *mut c_char,
    cap: usize,
) -> c_int {
    // SAFETY: as in `store_set`; `present` is a valid pointer.
    let (store, key) = unsafe { store_and_key(ctx, key, klen) };
    done(store.check(key).map(|p| unsafe { *present = p as c_int }), err, cap)
}

unsafe extern "C" fn store_remove(
    ctx: *mut c_void,
    key: *const u8,
    klen: usize,
    removed: *mut c_int,
    err: *mut c_char,
    cap: usize,
) -> c_int {
    // SAFETY: as in `store_set`; `removed` is a valid pointer.
    let (store, key) = unsafe { store_and_key(ctx, key, klen) };
    done(store.delete(key).map(|r| unsafe { *removed = r as c_int }), err, cap)
}

unsafe extern "C" fn store_num_keys(ctx: *mut c_void, out: *mut i64, err: *mut c_char, cap: usize) -> c_int {
    // SAFETY: `ctx` is the live client; `out` is a valid pointer.
    let store = unsafe { &*(ctx as *const StoreClient) };
    done(store.num_keys().map(|n| unsafe { *out = n }), err, cap)
}

unsafe extern "C" fn store_release(ctx: *mut c_void) {
    // SAFETY: `ctx` came from `Box::into_raw` and the shim releases it exactly once.
    drop(unsafe { Box::from_raw(ctx as *mut StoreClient) });
}

static STORE_OPS: StoreOps = StoreOps {
    set: store_set,
    get: store_get,
    add: store_add,
    check: store_check,
    remove: store_remove,
    num_keys: store_num_keys,
    release: store_release,
};

/// Which c10d backend a group runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBackend {
    /// `ProcessGroupGloo`, CPU tensors; the address gloo binds and advertises.
    Gloo,
    /// `ProcessGroupNCCL` on `cuda:K`.
    Nccl { device: usize },
}

impl std::fmt::Display for GroupBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupBackend::Gloo => f.write_str("gloo"),
            GroupBackend::Nccl { device } => write!(f, "nccl on cuda:{device}"),
        }
    }
}

/// Where a rank finds the attempt's rendezvous store and how it proves membership.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// `host:port` of rank 0's [`StoreServer`].
    pub store_addr: String,
    /// The attempt's data-plane secret.
    pub secret: Vec<u8>,
    /// The address this rank's gloo device binds and advertises to its peers (this rank's
    /// data-plane host).
    pub host: String,
}

/// The C++ group, freed when the last holder lets go (the group itself, or an abort
/// callback that is running).
struct GroupPtr {
    raw: *mut CGroup,
    /// Set when a collective may still be running in the group: freeing then waits for
    /// it, so the free goes to a background thread.
    in_flight: std::sync::atomic::AtomicBool,
}

// SAFETY: the C++ process group is thread-safe for abort/shutdown/free from another
// thread (c10d calls abort from its watchdog thread); collectives are issued by the one
// owner of the `ProcessGroup`.
unsafe impl Send for GroupPtr {}
unsafe impl Sync for GroupPtr {}

impl Drop for GroupPtr {
    fn drop(&mut self) {
        let raw = self.raw as usize;
        let free = move || {
            // SAFETY: the only remaining owner of a live group.
            unsafe { cvdist_group_free(raw as *mut CGroup) }
        };
        if self.in_flight.load(Ordering::SeqCst) {
            let _ = std::thread::Builder::new().name("cvdist-group-free".into()).spawn(free);
        } else {
            free();
        }
    }
}

/// An operation in flight.
struct Pending {
    work: *mut CWork,
    /// The tensor it reduces, kept alive until finished.
    _tensor: Tensor,
    op: &'static str,
}

// SAFETY: a `Work` handle may be waited on from any thread; it is used by one owner.
unsafe impl Send for Pending {}

impl Drop for Pending {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once.
        unsafe { cvdist_work_free(self.work) }
    }
}

/// Counts of what the group did, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Host waits for a collective to complete (gloo: every finish; NCCL: only the
    /// host-staged ops, never a gradient bucket or a device tensor's reduction).
    pub host_waits: AtomicU64,
    /// Collectives issued.
    pub collectives: AtomicU64,
    /// Operations staged through a host buffer, and barriers: on NCCL each one blocks the
    /// host until the device has drained, so none may run per training step.
    pub host_staged: AtomicU64,
}

/// A c10d process group as a [`Collective`]; see the module docs.
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    backend: GroupBackend,
    group: Arc<GroupPtr>,
    abort: AbortHandle,
    timeout: Duration,
    grad_compression: GradCompression,
    /// Gradient buckets started and not yet finished.
    grads: Vec<Pending>,
    /// NCCL: operations finished in stream order whose completion on the device has not
    /// been handed to a [`Completion`] yet (kept alive so that it can be polled).
    unconfirmed: Vec<Pending>,
    broken: Option<String>,
    stats: Arc<GroupStats>,
    /// Rank 0 serves the rendezvous store for as long as the group lives (NCCL may use
    /// it again, to create a communicator or report a timeout).
    _server: Option<StoreServer>,
}

impl ProcessGroup {
    /// Joins the group of `world` ranks as `rank` through `rendezvous` (connecting to the
    /// store, then constructing the backend, which waits for every peer). `timeout` bounds
    /// the rendezvous and becomes the collective timeout; `abort` ends a connection
    /// attempt early and later aborts the group.
    ///
    /// Errors: the store is unreachable or refuses this rank, or the backend could not be
    /// constructed (a peer missing, NCCL not built in).
    pub fn new(
        backend: GroupBackend,
        rank: usize,
        world: usize,
        rendezvous: &Rendezvous,
        timeout: Duration,
        abort: AbortHandle,
        server: Option<StoreServer>,
    ) -> Result<ProcessGroup, CollectiveError> {
        if world < 2 || rank >= world {
            return Err(CollectiveError::Config(format!("rank {rank} of world size {world} for a c10d group")));
        }
        let stop = {
            let abort = abort.clone();
            move || abort.is_aborted()
        };
        let client = StoreClient::connect(&rendezvous.store_addr, rank as u32, &rendezvous.secret, timeout, &stop)
            .map_err(|e| CollectiveError::Protocol(format!("{backend} rendezvous: {e}")))?;
        let ctx = Box::into_raw(Box::new(client)) as *mut c_void;
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let mut err = [0 as c_char; ERR_CAP];
        let raw = match backend {
            GroupBackend::Gloo => {
                let host = CString::new(rendezvous.host.clone())
                    .map_err(|_| CollectiveError::Config("a NUL byte in the data-plane host".into()))?;
                // SAFETY: ownership of `ctx` passes to the shim (released on failure too);
                // the other pointers are live for the call.
                unsafe {
                    cvdist_group_gloo(
                        ctx,
                        &STORE_OPS,
                        rank as c_int,
                        world as c_int,
                        timeout_ms,
                        host.as_ptr(),
                        err.as_mut_ptr(),
                        ERR_CAP,
                    )
                }
            }
            // SAFETY: as above.
            GroupBackend::Nccl { device } => unsafe {
                cvdist_group_nccl(
                    ctx,
                    &STORE_OPS,
                    rank as c_int,
                    world as c_int,
                    timeout_ms,
                    device as c_int,
                    err.as_mut_ptr(),
                    ERR_CAP,
                )
            },
        };
        if raw.is_null() {
            return Err(CollectiveError::Protocol(format!("creating the {backend} process group: {}", message(&err))));
        }
        let group = Arc::new(GroupPtr { raw, in_flight: false.into() });
        let weak = Arc::downgrade(&group);
        abort.on_abort(Box::new(move || {
            if let Some(g) = weak.upgrade() {
                g.in_flight.store(true, Ordering::SeqCst);
                abort_within(
                    ABORT_DEADLINE,
                    // SAFETY: a live group (held by this closure); c10d's abort may be
                    // called from any thread.
                    move || unsafe { cvdist_group_abort(g.raw) },
                    end_process_after_hung_abort,
                );
            }
        }));
        Ok(ProcessGroup {
            rank,
            world,
            backend,
            group,
            abort,
            timeout,
            grad_compression: GradCompression::None,
            grads: Vec::new(),
            unconfirmed: Vec::new(),
            broken: None,
            stats: Arc::default(),
            _server: server,
        })
    }

    /// Counters of this group's collectives and host waits.
    pub fn stats(&self) -> Arc<GroupStats> {
        self.stats.clone()
    }

    /// The backend this group runs.
    pub fn backend(&self) -> GroupBackend {
        self.backend
    }

    fn check(&self) -> Result<(), CollectiveError> {
        self.abort.check()?;
        match &self.broken {
            Some(why) => Err(CollectiveError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        // A failed collective leaves the peers at unknown positions: nothing more may run.
        self.group.in_flight.store(true, Ordering::SeqCst);
        self.broken.get_or_insert_with(|| e.to_string());
        e
    }

    fn device(&self) -> Device {
        match self.backend {
            GroupBackend::Gloo => Device::Cpu,
            GroupBackend::Nccl { device } => Device::Cuda(device),
        }
    }

    /// Issues a collective through `issue` on `t`.
    fn start(
        &mut self,
        op: &'static str,
        t: &Tensor,
        issue: impl FnOnce(*mut CGroup, *mut torch_sys::C_tensor, *mut c_char) -> *mut CWork,
    ) -> Result<Pending, CollectiveError> {
        self.check()?;
        let mut tensor = t.shallow_clone();
        let mut err = [0 as c_char; ERR_CAP];
        let work = issue(self.group.raw, tensor.as_mut_ptr(), err.as_mut_ptr());
        if work.is_null() {
            let e = CollectiveError::Protocol(format!("{op}: {}", message(&err)));
            return Err(self.fail(e));
        }
        self.stats.collectives.fetch_add(1, Ordering::Relaxed);
        Ok(Pending { work, _tensor: tensor, op })
    }

    /// Completes `p`: on gloo waits on the host, polling the abort handle and the
    /// timeout; on NCCL lets c10d order the caller's stream after it (no host wait).
    fn complete(&mut self, p: Pending) -> Result<(), CollectiveError> {
        if self.backend == GroupBackend::Gloo {
            self.stats.host_waits.fetch_add(1, Ordering::Relaxed);
            let deadline = Instant::now() + self.timeout;
            let mut nap = Duration::from_micros(5);
            // SAFETY: a live work handle.
            while unsafe { cvdist_work_completed(p.work) } == 0 {
                if let Err(e) = self.abort.check() {
                    return Err(self.fail(e));
                }
                if Instant::now() >= deadline {
                    let e = CollectiveError::Deadline { op: p.op, secs: self.timeout.as_secs_f64() };
                    return Err(self.fail(e));
                }
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_micros(200));
            }
        }
        let mut err = [0 as c_char; ERR_CAP];
        // SAFETY: a live work handle and an error buffer of ERR_CAP bytes.
        if unsafe { cvdist_work_finish(p.work, err.as_mut_ptr(), ERR_CAP) } != 0 {
            let text = message(&err);
            let e = match self.abort.reason() {
                Some(r) => CollectiveError::Aborted(r),
                None => CollectiveError::Protocol(format!("{}: {text}", p.op)),
            };
            return Err(self.fail(e));
        }
        if self.backend != GroupBackend::Gloo {
            // Finished in stream order only: its completion is confirmed later. Those that
            // already succeeded need no confirmation, so the list stays short even when no
            // one asks for a [`Completion`].
            // SAFETY: live work handles.
            self.unconfirmed.retain(|w| unsafe { cvdist_work_state(w.work) } != 1);
            self.unconfirmed.push(p);
        }
        Ok(())
    }

    fn all_reduce_tensor(&mut self, t: &Tensor, wire: c_int) -> Result<Pending, CollectiveError> {
        self.start("all-reduce", t, |g, t, err| {
            // SAFETY: live group and tensor; `err` has ERR_CAP bytes.
            unsafe { cvdist_group_all_reduce(g, t, wire, err, ERR_CAP) }
        })
    }

    fn wire(&self) -> c_int {
        match self.grad_compression {
            GradCompression::None => 0,
            GradCompression::Bf16 => 1,
            GradCompression::Fp16 => 2,
        }
    }

    /// Runs `f` on a tensor holding `buf` on this group's device, then copies it back.
    fn on_host_buffer(
        &mut self,
        buf: &mut [f32],
        f: impl FnOnce(&mut Self, &Tensor) -> Result<Pending, CollectiveError>,
    ) -> Result<(), CollectiveError> {
        self.stats.host_staged.fetch_add(1, Ordering::Relaxed);
        let t = Tensor::from_slice(buf).to_device(self.device());
        let p = f(self, &t)?;
        self.complete(p)?;
        if self.backend != GroupBackend::Gloo {
            self.stats.host_waits.fetch_add(1, Ordering::Relaxed);
        }
        t.to_device(Device::Cpu)
            .f_copy_data(buf, buf.len())
            .map_err(|e| CollectiveError::Protocol(format!("reading back a host buffer: {e}")))
    }

    fn check_tensor(&self, t: &Tensor) -> Result<(), CollectiveError> {
        if t.kind() != Kind::Float || !t.is_contiguous() {
            return Err(CollectiveError::Config("c10d reductions take a contiguous f32 tensor".into()));
        }
        if t.device() != self.device() {
            return Err(CollectiveError::Config(format!("a tensor on {:?} for a {} group", t.device(), self.backend)));
        }
        Ok(())
    }
}

impl Collective for ProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.on_host_buffer(buf, |g, t| g.all_reduce_tensor(t, 0))
    }
    fn all_reduce_sum_grads(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let wire = self.wire();
        self.on_host_buffer(buf, |g, t| g.all_reduce_tensor(t, wire))
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        check_broadcast_root(root, self.world)?;
        self.on_host_buffer(buf, |g, t| {
            g.start("broadcast", t, |g, t, err| {
                // SAFETY: live group and tensor; `err` has ERR_CAP bytes.
                unsafe { cvdist_group_broadcast(g, t, root as c_int, err, ERR_CAP) }
            })
        })
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.check()?;
        self.stats.host_staged.fetch_add(1, Ordering::Relaxed);
        let mut err = [0 as c_char; ERR_CAP];
        // SAFETY: a live group; `err` has ERR_CAP bytes.
        let work = unsafe { cvdist_group_barrier(self.group.raw, err.as_mut_ptr(), ERR_CAP) };
        if work.is_null() {
            let e = CollectiveError::Protocol(format!("barrier: {}", message(&err)));
            return Err(self.fail(e));
        }
        let p = Pending { work, _tensor: Tensor::new(), op: "barrier" };
        self.complete(p)
    }
    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
    fn set_grad_compression(&mut self, c: GradCompression) -> Result<(), CollectiveError> {
        self.grad_compression = c;
        Ok(())
    }
    fn grad_compression(&self) -> GradCompression {
        self.grad_compression
    }
    fn reduce_tensor_sum(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.start_reduce_grads(t)?;
        self.finish_reduce_grads()
    }
    fn reduce_tensor_sum_exact(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.check_tensor(t)?;
        let p = self.all_reduce_tensor(t, 0)?;
        self.complete(p)
    }
    fn start_reduce_grads(&mut self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.check_tensor(t)?;
        let wire = self.wire();
        let p = self.all_reduce_tensor(t, wire)?;
        self.grads.push(p);
        Ok(())
    }
    fn finish_reduce_grads(&mut self) -> Result<(), CollectiveError> {
        let mut first = None;
        for p in std::mem::take(&mut self.grads) {
            if first.is_some() {
                // Dropping an unfinished work detaches it; the group is broken anyway.
                continue;
            }
            if let Err(e) = self.complete(p) {
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
    fn wait(&mut self) -> Result<(), CollectiveError> {
        self.finish_reduce_grads()?;
        self.check()
    }
    fn completion(&mut self) -> Option<Completion> {
        if self.backend == GroupBackend::Gloo {
            return None;
        }
        let mut works = std::mem::take(&mut self.unconfirmed);
        Some(Completion::new(move || {
            let mut state = CompletionState::Succeeded;
            for w in &works {
                // SAFETY: live work handles, owned by this closure.
                match unsafe { cvdist_work_state(w.work) } {
                    1 => {}
                    0 => state = CompletionState::Running,
                    _ => return CompletionState::Failed,
                }
            }
            if state == CompletionState::Succeeded {
                // Confirmed once and for all: nothing left to poll or keep alive.
                works.clear();
            }
            state
        }))
    }
    fn finish(&mut self) -> Result<(), CollectiveError> {
        self.wait()?;
        // SAFETY: a live group with nothing in flight.
        unsafe { cvdist_group_shutdown(self.group.raw) };
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.grads.is_empty() {
            self.group.in_flight.store(true, Ordering::SeqCst);
        }
        self.grads.clear();
    }
}

/// How long a process group's abort may take. NCCL's `ncclCommAbort` can itself hang
/// (a device stuck in a kernel that never completes); c10d's own heartbeat monitor ends
/// such a process after `TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC` (480 s by default), which is
/// longer than a replacement takes to be ready.
pub const ABORT_DEADLINE: Duration = Duration::from_secs(60);

/// Exit status of a worker whose process-group abort hung (the agent's supervisor and
/// the coordinator see a lost worker and replace it).
pub const EXIT_ABORT_HUNG: i32 = 75;

/// Runs `abort` on its own thread, so that the caller (the thread that noticed a dead peer
/// or a job stop) never blocks on it; if it has not returned after `deadline`, calls
/// `on_hang` (in the worker: [`end_process_after_hung_abort`]) on a watcher thread.
pub fn abort_within(
    deadline: Duration,
    abort: impl FnOnce() + Send + 'static,
    on_hang: impl FnOnce() + Send + 'static,
) {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new().name("cvdist-group-abort".into()).spawn(move || {
        abort();
        let _ = done_tx.send(());
    });
    if spawned.is_err() {
        // No thread to run it on: nothing can end it in time either.
        on_hang();
        return;
    }
    let _ = std::thread::Builder::new().name("cvdist-abort-watch".into()).spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(deadline) {
            on_hang();
        }
    });
}

/// A process whose process group cannot be aborted cannot take part in any later group
/// (its device may still be running the stuck collective): it ends, with one line saying
/// why, and its supervisor and the coordinator replace it as they replace a lost worker.
pub fn end_process_after_hung_abort() {
    tracing::error!(
        deadline_s = ABORT_DEADLINE.as_secs(),
        "the process group's abort did not return within the deadline; ending this worker process"
    );
    eprintln!(
        "cvdist-worker: the process group's abort hung for {} s (a stuck device collective); exiting with status {EXIT_ABORT_HUNG}",
        ABORT_DEADLINE.as_secs()
    );
    std::process::exit(EXIT_ABORT_HUNG);
}

/// The IP a rank's store server binds: the host of its own data-plane address when it is
/// an IP literal, else every interface.
pub fn bind_ip(data_addr: &str) -> IpAddr {
    data_addr
        .rsplit_once(':')
        .and_then(|(h, _)| h.trim_matches(|c| c == '[' || c == ']').parse().ok())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// The host part of `host:port`.
pub fn host_of(addr: &str) -> String {
    addr.rsplit_once(':').map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']').to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An abort that returns in time ends nothing; one that hangs past the deadline is
    /// reported (the worker ends its process there) while the caller returned at once.
    #[test]
    fn a_hung_abort_is_reported_after_the_deadline_and_never_blocks_the_caller() {
        for (takes, hangs) in [(Duration::ZERO, false), (Duration::from_secs(3), true)] {
            let (tx, rx) = mpsc::channel();
            let called = Instant::now();
            abort_within(Duration::from_millis(300), move || std::thread::sleep(takes), move || tx.send(()).unwrap());
            assert!(called.elapsed() < Duration::from_millis(100), "the caller waited for the abort");
            let reported = rx.recv_timeout(Duration::from_secs(2)).is_ok();
            assert_eq!(reported, hangs, "abort taking {takes:?}");
        }
    }
}

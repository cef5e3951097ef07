//! NCCL, loaded at run time so that the worker builds and runs on hosts without it.
//!
//! The library is looked up, in order, at `$CVDIST_NCCL_LIB`, next to the libtorch that
//! this process loaded (the PyTorch wheel ships `site-packages/nvidia/nccl/lib`, and
//! libtorch zips put it in `lib/`), under `$CVDIST_TORCH_VENV`, and finally by soname
//! through the default loader path. Because libtorch_cuda itself links `libnccl.so.2`,
//! the first hit is normally the copy already mapped into the process.
//!
//! Device ops enqueue on the legacy default stream (stream 0, which is also where tch
//! launches its kernels unless told otherwise). Nothing here waits on the device without a
//! bound: the communicator is created non-blocking (`ncclCommInitRankConfig` with
//! `blocking = 0`) and polled under the collective timeout, a CUDA event is recorded after
//! every op, and a [`Watchdog`] thread polls those events and `ncclCommGetAsyncError`,
//! calling `ncclCommAbort` on a deadline, an error or the job's abort. Callers wait
//! through [`Collective::wait`], never through a device-wide synchronise. The CUDA runtime
//! (`libcudart`) is loaded at run time like NCCL: the copy libtorch_cuda already mapped.
//!
//! **16-bit gradients** (`--grad-compression bf16|fp16`): [`Collective::reduce_tensor_sum`]
//! all-reduces a bf16/fp16 copy of the f32 bucket (`ncclBfloat16`/`ncclFloat16`) and
//! writes the sum back into the bucket in its own dtype, like PyTorch's
//! `bf16_compress_hook`/`fp16_compress_hook`. Unlike the TCP ring, which widens every
//! hop's partial sum to f32 before adding, NCCL's reduction kernels add the 16-bit values
//! and store every partial sum in 16 bits, so the accumulation itself is 16-bit on NCCL
//! (one rounding per addition, the same count as the ring's one per hop, but the addends
//! are already rounded). Every rank still ends with identical values. The cast and the
//! write-back are kernels on the same stream as the collective, so no host wait is added.

use super::watchdog::{self, Fault, Pending, Watchdog, Watched};
use super::{AbortHandle, Collective, CollectiveError, GradCompression};
use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const UNIQUE_ID_BYTES: usize = 128;

/// Environment variable naming an explicit `libnccl.so.2` to load.
pub const NCCL_LIB_ENV: &str = "CVDIST_NCCL_LIB";

/// `ncclDataType_t` values (stable across NCCL 2.x).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NcclDataType {
    Int8 = 0,
    Uint8 = 1,
    Int32 = 2,
    Uint32 = 3,
    Int64 = 4,
    Uint64 = 5,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    Bfloat16 = 9,
}

impl NcclDataType {
    /// The NCCL type for a tch tensor kind, if NCCL can reduce it.
    pub fn from_kind(kind: tch::Kind) -> Option<Self> {
        use tch::Kind::*;
        Some(match kind {
            Int8 => Self::Int8,
            Uint8 => Self::Uint8,
            Int => Self::Int32,
            Int64 => Self::Int64,
            Half => Self::Float16,
            Float => Self::Float32,
            Double => Self::Float64,
            BFloat16 => Self::Bfloat16,
            _ => return None,
        })
    }
}

const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;
const NCCL_SUM: c_int = 0;

#[repr(C)]
#[derive(Clone, Copy)]
struct RawUniqueId {
    internal: [c_char; UNIQUE_ID_BYTES],
}

type Comm = *mut c_void;
type Stream = *mut c_void;

thread_local! {
    /// The CUDA stream this thread's NCCL ops and their completion markers go on; 0 is
    /// the legacy default stream (see [`on_stream`]).
    static STREAM: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f` with the calling thread's NCCL ops (and the watchdog's completion markers
/// after them) enqueued on `stream` instead of the legacy default stream, as PyTorch's
/// "current stream" does. The gradient communication thread uses it to reduce buckets on
/// its own stream while backward kernels keep running on stream 0
/// (`train::overlap`); the caller orders the stream after the producing kernels with an
/// event. `stream` must be a live `cudaStream_t` of the communicator's device.
pub fn on_stream<R>(stream: *mut c_void, f: impl FnOnce() -> R) -> R {
    let previous = STREAM.with(|s| s.replace(stream as usize));
    // Restored even if `f` panics, so a later op on this thread is not misdirected.
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            STREAM.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(previous);
    f()
}

fn current_stream() -> Stream {
    STREAM.with(|s| s.get()) as Stream
}

/// The leading fields of `ncclConfig_t` as NCCL 2.17 laid them out (nccl.h). NCCL copies
/// `min(size, its own sizeof)` bytes over its defaults and ignores fields newer than
/// `version`, so this prefix is valid for every NCCL ≥ 2.17, including the 2.29 of the
/// current wheels. `NCCL_CONFIG_UNDEF_INT` (`INT_MIN`) and null mean "NCCL's default".
#[repr(C)]
struct NcclConfig {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
    /// Fills what would otherwise be padding (NCCL ≥ 2.19 has `trafficClass` here), so no
    /// uninitialised byte reaches NCCL's copy.
    traffic_class: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT` from nccl.h.
const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;

impl NcclConfig {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`.
    fn non_blocking() -> Self {
        NcclConfig {
            size: std::mem::size_of::<NcclConfig>(),
            magic: 0xcafe_beef,
            // NCCL_VERSION(2, 18, 0): the release that added split_share, our last field.
            version: 21800,
            blocking: 0,
            cga_cluster_size: NCCL_CONFIG_UNDEF_INT,
            min_ctas: NCCL_CONFIG_UNDEF_INT,
            max_ctas: NCCL_CONFIG_UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: NCCL_CONFIG_UNDEF_INT,
            traffic_class: NCCL_CONFIG_UNDEF_INT,
        }
    }
}

/// Resolved entry points. The `Library` is kept alive for the whole process (the
/// struct lives in a static), so the function pointers never dangle.
struct Api {
    _lib: Library,
    path: String,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut RawUniqueId) -> c_int,
    comm_init_rank_config: unsafe extern "C" fn(*mut Comm, c_int, RawUniqueId, c_int, *mut NcclConfig) -> c_int,
    comm_finalize: unsafe extern "C" fn(Comm) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
}

impl Api {
    fn error_string(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string (or null).
        let p = unsafe { (self.get_error_string)(code) };
        if p.is_null() {
            return format!("unknown NCCL error {code}");
        }
        // SAFETY: non-null static C string from NCCL.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, call: &'static str, code: c_int) -> Result<(), CollectiveError> {
        if code == NCCL_SUCCESS {
            Ok(())
        } else {
            Err(CollectiveError::Nccl { call, code, message: self.error_string(code) })
        }
    }

    fn version(&self) -> Option<i32> {
        let mut v: c_int = 0;
        // SAFETY: valid out-pointer.
        (unsafe { (self.get_version)(&mut v) } == NCCL_SUCCESS).then_some(v)
    }
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn api() -> Result<&'static Api, CollectiveError> {
    API.get_or_init(load_api).as_ref().map_err(|e| CollectiveError::NcclUnavailable(e.clone()))
}

/// Candidate library paths, most specific first; the last entry is the bare soname.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var(NCCL_LIB_ENV) {
        if !p.is_empty() {
            out.push(PathBuf::from(p));
        }
    }
    for dir in torch_lib_dirs() {
        out.push(dir.join("libnccl.so.2"));
        // torch/lib → site-packages/nvidia/nccl/lib in the PyTorch wheel layout.
        if let Some(site) = dir.parent().and_then(Path::parent) {
            out.push(site.join("nvidia/nccl/lib/libnccl.so.2"));
        }
    }
    if let Ok(venv) = std::env::var("CVDIST_TORCH_VENV") {
        if let Ok(rd) = std::fs::read_dir(Path::new(&venv).join("lib")) {
            for e in rd.flatten() {
                out.push(e.path().join("site-packages/nvidia/nccl/lib/libnccl.so.2"));
            }
        }
    }
    out.push(PathBuf::from("libnccl.so.2"));
    out
}

/// Directories of libtorch libraries mapped into this process, or named by `$LIBTORCH`.
fn torch_lib_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        for line in maps.lines() {
            let Some(path) = line.split_whitespace().nth(5) else { continue };
            let file = Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or("");
            if file.starts_with("libtorch_cpu.so") || file.starts_with("libc10.so") {
                if let Some(dir) = Path::new(path).parent() {
                    if !dirs.iter().any(|d| d == dir) {
                        dirs.push(dir.to_path_buf());
                    }
                }
            }
        }
    }
    if let Ok(lt) = std::env::var("LIBTORCH") {
        let d = Path::new(&lt).join("lib");
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

fn load_api() -> Result<Api, String> {
    let mut tried = Vec::new();
    for cand in candidates() {
        let is_soname = cand.components().count() == 1;
        if !is_soname && !cand.exists() {
            continue;
        }
        // SAFETY: loading NCCL runs its (well-behaved) initialisers only.
        match unsafe { Library::new(&cand) } {
            Ok(lib) => return resolve(lib, cand.display().to_string()),
            Err(e) => tried.push(format!("{}: {e}", cand.display())),
        }
    }
    Err(format!("libnccl.so.2 not found (set {NCCL_LIB_ENV}); tried {}", tried.join("; ")))
}

fn resolve(lib: Library, path: String) -> Result<Api, String> {
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the signature matches nccl.h for NCCL 2.x.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.map_err(|e| format!("{path} lacks {}: {e}", $name))?
        };
    }
    Ok(Api {
        get_version: sym!("ncclGetVersion"),
        get_unique_id: sym!("ncclGetUniqueId"),
        // Both since NCCL 2.14; torch wheels ship 2.2x.
        comm_init_rank_config: sym!("ncclCommInitRankConfig"),
        comm_finalize: sym!("ncclCommFinalize"),
        all_reduce: sym!("ncclAllReduce"),
        broadcast: sym!("ncclBroadcast"),
        comm_abort: sym!("ncclCommAbort"),
        comm_destroy: sym!("ncclCommDestroy"),
        get_error_string: sym!("ncclGetErrorString"),
        comm_get_async_error: sym!("ncclCommGetAsyncError"),
        path,
        _lib: lib,
    })
}

/// Ok when NCCL can be used here: the library loads, has every entry point we need,
/// and at least one CUDA device is visible. The error says which of these failed.
pub fn available() -> Result<(), CollectiveError> {
    let api = api()?;
    let devices = tch::Cuda::device_count();
    if devices <= 0 {
        return Err(CollectiveError::NcclUnavailable(format!(
            "no CUDA device visible to libtorch (NCCL {} loaded from {})",
            version_string(api.version()),
            api.path
        )));
    }
    Ok(())
}

/// "2.29.7" from NCCL's packed version code.
fn version_string(v: Option<i32>) -> String {
    match v {
        Some(v) if v >= 10000 => format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100),
        Some(v) => format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100),
        None => "?".into(),
    }
}

/// Version and path of the NCCL that would be used, for logs.
pub fn describe() -> Result<String, CollectiveError> {
    let api = api()?;
    Ok(format!("NCCL {} ({})", version_string(api.version()), api.path))
}

/// Creates the job's unique id; rank 0 calls this and distributes it (see
/// [`unique_id_to_hex`]). Requires [`available`].
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
    available()?;
    let api = api()?;
    let mut raw = RawUniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: valid out-pointer to a 128-byte ncclUniqueId.
    api.check("ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut raw) })?;
    Ok(raw.internal.map(|c| c as u8))
}

pub fn unique_id_to_hex(id: &[u8; UNIQUE_ID_BYTES]) -> String {
    hex::encode(id)
}

pub fn unique_id_from_hex(s: &str) -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
    let bytes =
        hex::decode(s.trim()).map_err(|e| CollectiveError::Config(format!("NCCL unique id is not hex: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        CollectiveError::Config(format!("NCCL unique id has {} bytes, expected {UNIQUE_ID_BYTES}", b.len()))
    })
}

/// The CUDA runtime entry points the watchdog needs, from the `libcudart` this process
/// already mapped (libtorch_cuda links it; the wheel's copy is
/// `nvidia/cu13/lib/libcudart.so.13`, a libtorch zip's is `lib/libcudart-<hash>.so.*`),
/// else by soname.
struct Cudart {
    _lib: Library,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    event_create_with_flags: unsafe extern "C" fn(*mut CudaEvent, c_uint) -> c_int,
    event_record: unsafe extern "C" fn(CudaEvent, Stream) -> c_int,
    event_query: unsafe extern "C" fn(CudaEvent) -> c_int,
    event_destroy: unsafe extern "C" fn(CudaEvent) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

type CudaEvent = *mut c_void;
const CUDA_SUCCESS: c_int = 0;
/// `cudaErrorNotReady`: the event's work has not completed yet.
const CUDA_ERROR_NOT_READY: c_int = 600;
/// `cudaEventDisableTiming`: completion markers only, the cheapest kind of event.
const CUDA_EVENT_DISABLE_TIMING: c_uint = 0x02;

impl Cudart {
    fn error_string(&self, code: c_int) -> String {
        // SAFETY: cudaGetErrorString returns a static NUL-terminated string (or null).
        let p = unsafe { (self.get_error_string)(code) };
        if p.is_null() {
            return format!("CUDA error {code}");
        }
        // SAFETY: non-null static C string from the CUDA runtime.
        format!("{} (cudaError_t {code})", unsafe { CStr::from_ptr(p) }.to_string_lossy())
    }

    fn check(&self, call: &str, code: c_int) -> Result<(), CollectiveError> {
        if code == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(CollectiveError::Broken(format!("{call}: {}", self.error_string(code))))
        }
    }

    /// Makes `device` current on the calling thread (CUDA's current device is per thread).
    fn use_device(&self, device: usize) -> Result<(), CollectiveError> {
        let d = c_int::try_from(device).map_err(|_| CollectiveError::Config(format!("CUDA device {device}")))?;
        // SAFETY: plain call with an int.
        self.check("cudaSetDevice", unsafe { (self.set_device)(d) })
    }
}

static CUDART: OnceLock<Result<Cudart, String>> = OnceLock::new();

fn cudart() -> Result<&'static Cudart, CollectiveError> {
    CUDART.get_or_init(load_cudart).as_ref().map_err(|e| CollectiveError::NcclUnavailable(e.clone()))
}

fn load_cudart() -> Result<Cudart, String> {
    let (lib, cand) = crate::cuda_runtime::open()?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the signature matches cuda_runtime_api.h (CUDA 11-13).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{} lacks {}: {e}", cand, $name))?
        };
    }
    Ok(Cudart {
        set_device: sym!("cudaSetDevice"),
        event_create_with_flags: sym!("cudaEventCreateWithFlags"),
        event_record: sym!("cudaEventRecord"),
        event_query: sym!("cudaEventQuery"),
        event_destroy: sym!("cudaEventDestroy"),
        get_error_string: sym!("cudaGetErrorString"),
        _lib: lib,
    })
}

/// A CUDA event recorded on the collective's stream (stream 0 unless [`on_stream`] says
/// otherwise) right after it: complete exactly when the collective is.
struct EventMarker {
    rt: &'static Cudart,
    event: CudaEvent,
}

// SAFETY: CUDA events may be queried and destroyed from any host thread.
unsafe impl Send for EventMarker {}

impl EventMarker {
    /// Records a marker after everything enqueued so far on the legacy default stream.
    fn record(rt: &'static Cudart) -> Result<EventMarker, CollectiveError> {
        let mut event: CudaEvent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; flags from cuda_runtime_api.h.
        rt.check("cudaEventCreateWithFlags", unsafe {
            (rt.event_create_with_flags)(&mut event, CUDA_EVENT_DISABLE_TIMING)
        })?;
        let marker = EventMarker { rt, event };
        // SAFETY: live event; the stream the collectives of this thread use (null: the
        // legacy default stream).
        rt.check("cudaEventRecord", unsafe { (rt.event_record)(event, current_stream()) })?;
        Ok(marker)
    }
}

impl Pending for EventMarker {
    fn poll(&self) -> Result<bool, String> {
        // SAFETY: live event owned by self.
        match unsafe { (self.rt.event_query)(self.event) } {
            CUDA_SUCCESS => Ok(true),
            CUDA_ERROR_NOT_READY => Ok(false),
            code => Err(self.rt.error_string(code)),
        }
    }
}

impl Drop for EventMarker {
    fn drop(&mut self) {
        // SAFETY: live event, destroyed once; CUDA releases it after pending work completes.
        unsafe { (self.rt.event_destroy)(self.event) };
    }
}

/// The raw communicator, shared by the owning thread (which enqueues) and the watchdog
/// (which checks and aborts). The mutex makes an abort and an enqueue never overlap, and
/// the null pointer after an abort or destroy makes every later call a clean error.
struct Handle {
    api: &'static Api,
    rt: &'static Cudart,
    device: usize,
    comm: Mutex<usize>,
}

impl Handle {
    /// Runs `f` on the live communicator under the lock; `Broken` once it is gone.
    fn with<R>(&self, f: impl FnOnce(Comm) -> R) -> Result<R, CollectiveError> {
        let guard = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        if *guard == 0 {
            return Err(CollectiveError::Broken("NCCL communicator was aborted".into()));
        }
        Ok(f(*guard as Comm))
    }

    /// `ncclCommGetAsyncError`: Ok(true) while an operation of a non-blocking communicator
    /// is still being set up (`ncclInProgress`), Ok(false) when idle and healthy.
    fn in_progress(&self) -> Result<bool, CollectiveError> {
        let mut state: c_int = NCCL_SUCCESS;
        // SAFETY: live comm (checked under the lock), valid out-pointer.
        let code = self.with(|c| unsafe { (self.api.comm_get_async_error)(c, &mut state) })?;
        self.api.check("ncclCommGetAsyncError", code)?;
        match state {
            NCCL_SUCCESS => Ok(false),
            NCCL_IN_PROGRESS => Ok(true),
            code => Err(CollectiveError::Nccl { call: "async", code, message: self.api.error_string(code) }),
        }
    }

    /// Ends the communicator: `ncclCommDestroy` when `graceful` (every op complete and
    /// finalized), else `ncclCommAbort`, which never waits for peers. Idempotent.
    fn close(&self, graceful: bool) {
        let mut guard = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let comm = std::mem::take(&mut *guard) as Comm;
        if comm.is_null() {
            return;
        }
        // SAFETY: live comm, taken out of the handle so nothing uses it afterwards.
        unsafe {
            if graceful {
                (self.api.comm_destroy)(comm);
            } else {
                (self.api.comm_abort)(comm);
            }
        }
    }
}

impl Watched for Handle {
    fn async_error(&self) -> Result<(), CollectiveError> {
        match self.in_progress() {
            // Gone means an abort that the watchdog already accounts for.
            Err(CollectiveError::Broken(_)) => Ok(()),
            other => other.map(|_| ()),
        }
    }
    fn abort(&self) {
        self.close(false);
    }
    fn bind_thread(&self) {
        // A failure here also shows in the first event query, which is then a fault.
        let _ = self.rt.use_device(self.device);
    }
}

/// How an [`NcclComm`] is created.
#[derive(Debug, Clone)]
pub struct NcclOptions {
    /// The rank's CUDA device index; made current on the calling thread and the watchdog.
    pub device: usize,
    /// Longest wait for the communicator's creation and for each collective
    /// (`--collective-timeout`); the communicator is aborted when it passes.
    pub timeout: Duration,
    /// The job's abort handle: firing it aborts the communicator (also during creation).
    pub abort: AbortHandle,
}

impl Default for NcclOptions {
    fn default() -> Self {
        NcclOptions {
            device: 0,
            timeout: Duration::from_secs(cvdist_common::spec::DEFAULT_COLLECTIVE_TIMEOUT_S as u64),
            abort: AbortHandle::new(),
        }
    }
}

/// One rank's NCCL communicator on its CUDA device, guarded by a [`Watchdog`].
pub struct NcclComm {
    handle: Arc<Handle>,
    watchdog: Watchdog,
    rank: usize,
    world: usize,
    device: usize,
    abort: AbortHandle,
    /// Set by [`Collective::finish`] once every op completed and the communicator was
    /// finalized: only then does dropping it destroy rather than abort it.
    finished: bool,
    /// The format gradient buckets travel in.
    grad_compression: GradCompression,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not
// concurrent, which `&mut self` on every op and the handle's mutex guarantee.
unsafe impl Send for NcclComm {}
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .finish()
    }
}

impl NcclComm {
    /// [`NcclComm::init`] on device 0 with the default timeout and a fresh abort handle.
    pub fn new(rank: usize, world: usize, unique_id: [u8; UNIQUE_ID_BYTES]) -> Result<Self, CollectiveError> {
        Self::init(rank, world, unique_id, &NcclOptions::default())
    }

    /// Joins the communicator of `world` ranks that call this with the same `unique_id`.
    /// Makes `opts.device` the calling thread's CUDA device, creates the communicator
    /// non-blocking and polls it until ready, for at most `opts.timeout`.
    ///
    /// Errors: `Config` (rank or device out of range), `NcclUnavailable`, `Nccl` (NCCL
    /// refused), `Deadline` (a peer never joined), `Aborted` (the abort handle fired). On
    /// every error the half-made communicator is aborted, never left waiting.
    pub fn init(
        rank: usize,
        world: usize,
        unique_id: [u8; UNIQUE_ID_BYTES],
        opts: &NcclOptions,
    ) -> Result<Self, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::Config(format!("NCCL rank {rank} out of range for world size {world}")));
        }
        let nranks =
            c_int::try_from(world).map_err(|_| CollectiveError::Config(format!("world size {world} too large")))?;
        available()?;
        let api = api()?;
        let rt = cudart()?;
        let count = tch::Cuda::device_count().max(0) as usize;
        if opts.device >= count {
            return Err(CollectiveError::Config(format!(
                "CUDA device {} requested for NCCL but {count} device(s) are visible",
                opts.device
            )));
        }
        // NCCL binds the communicator to the device current on this thread.
        rt.use_device(opts.device)?;
        let id = RawUniqueId { internal: unique_id.map(|b| b as c_char) };
        let mut config = NcclConfig::non_blocking();
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer and config; id passed by value as nccl.h declares.
        let code = unsafe { (api.comm_init_rank_config)(&mut comm, nranks, id, rank as c_int, &mut config) };
        let handle = Arc::new(Handle { api, rt, device: opts.device, comm: Mutex::new(comm as usize) });
        if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
            handle.close(false);
            return Err(CollectiveError::Nccl {
                call: "ncclCommInitRankConfig",
                code,
                message: api.error_string(code),
            });
        }
        if comm.is_null() {
            return Err(CollectiveError::Nccl {
                call: "ncclCommInitRankConfig",
                code,
                message: "returned a null communicator".into(),
            });
        }
        let ready = watchdog::wait_until("ncclCommInitRankConfig", opts.timeout, &opts.abort, || {
            handle.in_progress().map(|busy| !busy)
        });
        if let Err(e) = ready {
            handle.close(false);
            return Err(e);
        }
        let watchdog = match Watchdog::spawn(handle.clone(), opts.timeout, opts.abort.clone()) {
            Ok(w) => w,
            Err(e) => {
                handle.close(false);
                return Err(e);
            }
        };
        Ok(NcclComm {
            handle,
            watchdog,
            rank,
            world,
            device: opts.device,
            abort: opts.abort.clone(),
            finished: false,
            grad_compression: GradCompression::None,
        })
    }

    /// The CUDA device this communicator's ops run on.
    pub fn device(&self) -> usize {
        self.device
    }

    fn usable(&self) -> Result<(), CollectiveError> {
        self.watchdog.check()
    }

    /// Checks the communicator's health now (errors the watchdog would act on).
    pub fn async_error(&mut self) -> Result<(), CollectiveError> {
        self.usable()?;
        if let Err(e) = Watched::async_error(&*self.handle) {
            self.watchdog.fail(Fault::Failed(e.to_string()));
            return Err(e);
        }
        Ok(())
    }

    /// Enqueues one NCCL call, lets a non-blocking communicator finish setting it up
    /// (bounded), then records its completion marker for the watchdog.
    fn enqueue(&mut self, call: &'static str, f: impl FnOnce(Comm) -> c_int) -> Result<(), CollectiveError> {
        self.usable()?;
        let code = self.handle.with(f)?;
        let result = if code == NCCL_IN_PROGRESS || code == NCCL_SUCCESS {
            let handle = &self.handle;
            watchdog::wait_until(call, self.watchdog.timeout(), &self.abort, || handle.in_progress().map(|b| !b))
        } else {
            Err(CollectiveError::Nccl { call, code, message: self.handle.api.error_string(code) })
        };
        let marked = result.and_then(|()| EventMarker::record(self.handle.rt));
        match marked {
            Ok(marker) => self.watchdog.watch(call, Box::new(marker)),
            Err(e) => {
                self.watchdog.fail(Fault::Failed(e.to_string()));
                Err(e)
            }
        }
    }

    /// In-place sum of `count` elements at device pointer `ptr`, enqueued on stream 0
    /// (or the thread's stream set by [`on_stream`]).
    ///
    /// # Safety
    /// `ptr` must point to at least `count` elements of `dtype` in memory of this
    /// communicator's CUDA device, valid until the stream has executed the op.
    pub unsafe fn all_reduce_sum_device(
        &mut self,
        ptr: *mut c_void,
        count: usize,
        dtype: NcclDataType,
    ) -> Result<(), CollectiveError> {
        let api = self.handle.api;
        self.enqueue("ncclAllReduce", |comm| {
            // SAFETY: the caller guarantees `ptr` holds `count` elements of `dtype` on this
            // communicator's device until the stream has run the op.
            unsafe { (api.all_reduce)(ptr, ptr, count, dtype as c_int, NCCL_SUM, comm, current_stream()) }
        })
    }

    /// In-place broadcast from `root` of `count` elements at device pointer `ptr`.
    ///
    /// # Safety
    /// As for [`NcclComm::all_reduce_sum_device`].
    pub unsafe fn broadcast_device(
        &mut self,
        ptr: *mut c_void,
        count: usize,
        dtype: NcclDataType,
        root: usize,
    ) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Config(format!("broadcast root {root} >= world size {}", self.world)));
        }
        let api = self.handle.api;
        self.enqueue("ncclBroadcast", |comm| {
            // SAFETY: as for `all_reduce_sum_device`, guaranteed by the caller.
            unsafe { (api.broadcast)(ptr, ptr, count, dtype as c_int, root as c_int, comm, current_stream()) }
        })
    }

    /// Sums a contiguous CUDA tensor in place (enqueued; [`Collective::wait`] before
    /// reading it on the host).
    pub fn all_reduce_sum_tensor(&mut self, t: &tch::Tensor) -> Result<(), CollectiveError> {
        let (ptr, n, dt) = self.tensor_args(t)?;
        // SAFETY: `t` is a contiguous tensor on this device with `n` elements of `dt`;
        // the caller keeps it alive until the op completed.
        unsafe { self.all_reduce_sum_device(ptr, n, dt) }
    }

    /// Broadcasts a contiguous CUDA tensor in place from `root`.
    pub fn broadcast_tensor(&mut self, t: &tch::Tensor, root: usize) -> Result<(), CollectiveError> {
        let (ptr, n, dt) = self.tensor_args(t)?;
        // SAFETY: as in all_reduce_sum_tensor.
        unsafe { self.broadcast_device(ptr, n, dt, root) }
    }

    fn tensor_args(&self, t: &tch::Tensor) -> Result<(*mut c_void, usize, NcclDataType), CollectiveError> {
        if t.device() != tch::Device::Cuda(self.device) {
            return Err(CollectiveError::Config(format!(
                "tensor on {:?}, NCCL comm on cuda:{}",
                t.device(),
                self.device
            )));
        }
        if !t.is_contiguous() {
            return Err(CollectiveError::Config("NCCL needs a contiguous tensor".into()));
        }
        let kind = t.kind();
        let dt = NcclDataType::from_kind(kind)
            .ok_or_else(|| CollectiveError::Config(format!("NCCL cannot reduce tensors of kind {kind:?}")))?;
        Ok((t.data_ptr(), t.numel(), dt))
    }

    /// Sums a contiguous CUDA tensor of gradients in place, in the format set by
    /// [`Collective::set_grad_compression`]: as it is for `None` (and for a tensor already
    /// in the 16-bit kind), otherwise through a 16-bit copy whose sum is written back in
    /// the tensor's own dtype (see the module docs for where NCCL rounds).
    pub fn reduce_grads_tensor(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        let Some(kind) = wire_kind(self.grad_compression) else {
            return self.all_reduce_sum_tensor(t);
        };
        if t.kind() == kind {
            return self.all_reduce_sum_tensor(t);
        }
        if !t.is_floating_point() {
            return Err(CollectiveError::Config(format!(
                "--grad-compression {} needs floating-point gradients, got {:?}",
                self.grad_compression,
                t.kind()
            )));
        }
        let dev = self.device;
        let torch = |e: tch::TchError| CollectiveError::Protocol(format!("16-bit gradient copy on cuda:{dev}: {e}"));
        // Cast, all-reduce and write-back are queued in that order on the one stream, so
        // none needs a host wait. Dropping `wire` after the write-back is queued is safe:
        // the caching allocator hands its memory only to later work on the same stream.
        let wire = t.f_to_kind(kind).map_err(torch)?;
        self.all_reduce_sum_tensor(&wire)?;
        t.f_copy_(&wire).map_err(torch)
    }

    /// Aborts the communicator (unblocks this rank's and peers' pending NCCL work); it
    /// can't be used afterwards.
    pub fn abort(&mut self) {
        self.watchdog.fail(Fault::Failed("aborted by its owner".into()));
    }

    /// Host-buffer op staged through a device tensor; the trainer's gradient path uses the
    /// tensor ops directly instead.
    fn staged(&mut self, buf: &mut [f32], op: Staged) -> Result<(), CollectiveError> {
        self.usable()?;
        let dev = tch::Device::Cuda(self.device);
        let stage = |e: tch::TchError| CollectiveError::Protocol(format!("staging NCCL buffer on {dev:?}: {e}"));
        let mut t = tch::Tensor::f_from_slice(buf).and_then(|t| t.f_to_device(dev)).map_err(stage)?;
        match op {
            Staged::Sum => self.all_reduce_sum_tensor(&t)?,
            Staged::SumGrads => self.reduce_grads_tensor(&mut t)?,
            Staged::Broadcast(r) => self.broadcast_tensor(&t, r)?,
        }
        // Bounded: the watchdog cuts this short; the copy below then finds the op done.
        self.watchdog.wait()?;
        let n = buf.len();
        t.f_to_device(tch::Device::Cpu).and_then(|h| h.f_copy_data(buf, n)).map_err(stage)
    }
}

/// Which op [`NcclComm::staged`] runs on the staged buffer.
#[derive(Clone, Copy)]
enum Staged {
    Sum,
    /// A sum of gradients, in the configured compression.
    SumGrads,
    Broadcast(usize),
}

/// The tch kind (and so the NCCL data type) gradients travel in; `None` for f32.
fn wire_kind(c: GradCompression) -> Option<tch::Kind> {
    match c {
        GradCompression::None => None,
        GradCompression::Bf16 => Some(tch::Kind::BFloat16),
        GradCompression::Fp16 => Some(tch::Kind::Half),
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.staged(buf, Staged::Sum)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.staged(buf, Staged::Broadcast(root))
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [1.0f32];
        self.staged(&mut one, Staged::Sum)
    }
    fn set_grad_compression(&mut self, c: GradCompression) -> Result<(), CollectiveError> {
        self.grad_compression = c;
        Ok(())
    }
    fn grad_compression(&self) -> GradCompression {
        self.grad_compression
    }
    fn all_reduce_sum_grads(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.staged(buf, Staged::SumGrads)
    }
    /// The job's abort handle: firing it makes the watchdog abort the communicator within
    /// [`watchdog::WATCH_INTERVAL`], which also ends ops already running on the device.
    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
    /// Reduces device memory in place, enqueued on the default stream after the kernels
    /// that produced it; later kernels on that stream see the result without a sync.
    fn reduce_tensor_sum(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        self.reduce_grads_tensor(t)
    }
    /// As [`Collective::reduce_tensor_sum`], in f32 whatever the gradient compression.
    fn reduce_tensor_sum_exact(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        self.all_reduce_sum_tensor(t)
    }
    fn wait(&mut self) -> Result<(), CollectiveError> {
        self.watchdog.wait()
    }
    /// Waits for the last ops, then `ncclCommFinalize` (which syncs with the peers) under
    /// the collective timeout; on success a drop destroys the communicator gracefully.
    fn finish(&mut self) -> Result<(), CollectiveError> {
        self.watchdog.wait()?;
        let api = self.handle.api;
        // SAFETY: live comm under the handle's lock.
        let code = self.handle.with(|c| unsafe { (api.comm_finalize)(c) })?;
        let handle = &self.handle;
        let done = if code == NCCL_SUCCESS || code == NCCL_IN_PROGRESS {
            watchdog::wait_until("ncclCommFinalize", self.watchdog.timeout(), &self.abort, || {
                handle.in_progress().map(|b| !b)
            })
        } else {
            Err(CollectiveError::Nccl { call: "ncclCommFinalize", code, message: api.error_string(code) })
        };
        match done {
            Ok(()) => {
                self.finished = true;
                Ok(())
            }
            Err(e) => {
                self.watchdog.fail(Fault::Failed(e.to_string()));
                Err(e)
            }
        }
    }
}

impl Drop for NcclComm {
    /// Destroys the communicator only after a clean [`Collective::finish`]; in every other
    /// case (an error, an abort, a job that ended early) it aborts it, because
    /// `ncclCommDestroy` may wait for peers that will never answer.
    fn drop(&mut self) {
        let graceful = self.finished && self.watchdog.is_clean();
        self.watchdog.shutdown();
        self.handle.close(graceful);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let mut id = [0u8; UNIQUE_ID_BYTES];
        id[0] = 0xab;
        id[127] = 0x01;
        let h = unique_id_to_hex(&id);
        assert_eq!(h.len(), 256);
        assert_eq!(unique_id_from_hex(&h).unwrap(), id);
        assert!(matches!(unique_id_from_hex("zz"), Err(CollectiveError::Config(_))));
        assert!(matches!(unique_id_from_hex("abcd"), Err(CollectiveError::Config(_))));
    }

    #[test]
    fn version_formatting() {
        assert_eq!(version_string(Some(22907)), "2.29.7");
        assert_eq!(version_string(Some(2708)), "2.7.8");
        assert_eq!(version_string(None), "?");
    }

    /// The config prefix must match nccl.h's `ncclConfig_t` field for field (x86_64): NCCL
    /// copies it byte for byte.
    #[test]
    fn config_layout_matches_nccl_h() {
        use std::mem::{offset_of, size_of};
        assert_eq!(offset_of!(NcclConfig, blocking), 16);
        assert_eq!(offset_of!(NcclConfig, max_ctas), 28);
        assert_eq!(offset_of!(NcclConfig, net_name), 32);
        assert_eq!(offset_of!(NcclConfig, split_share), 40);
        assert_eq!(offset_of!(NcclConfig, traffic_class), 44);
        assert_eq!(size_of::<NcclConfig>(), 48);
        let c = NcclConfig::non_blocking();
        assert_eq!((c.size, c.magic, c.blocking, c.cga_cluster_size), (48, 0xcafe_beef, 0, i32::MIN));
    }

    #[test]
    fn bad_rank_is_a_config_error() {
        assert!(matches!(NcclComm::new(3, 2, [0; UNIQUE_ID_BYTES]), Err(CollectiveError::Config(_))));
    }
}

//! NCCL, loaded at run time so that the worker builds and runs on hosts without it.
//!
//! The library is looked up, in order, at `$CVDIST_NCCL_LIB`, next to the libtorch that
//! this process loaded (the PyTorch wheel ships `site-packages/nvidia/nccl/lib`, and
//! libtorch zips put it in `lib/`), under `$CVDIST_TORCH_VENV`, and finally by soname
//! through the default loader path. Because libtorch_cuda itself links `libnccl.so.2`,
//! the first hit is normally the copy already mapped into the process.
//!
//! Device ops enqueue on the legacy default stream (stream 0, which is also where tch
//! launches its kernels unless told otherwise); callers synchronise before reading the
//! result on the host.

use super::{AbortHandle, Collective, CollectiveError};
use libloading::Library;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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

/// Resolved entry points. The `Library` is kept alive for the whole process (the
/// struct lives in a static), so the function pointers never dangle.
struct Api {
    _lib: Library,
    path: String,
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut RawUniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, RawUniqueId, c_int) -> c_int,
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
        comm_init_rank: sym!("ncclCommInitRank"),
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

/// One rank's NCCL communicator, bound to the CUDA device current at creation (device
/// 0 unless the thread selected another).
pub struct NcclComm {
    api: &'static Api,
    comm: Comm,
    rank: usize,
    world: usize,
    device: usize,
    abort: AbortHandle,
    /// Set once the comm was aborted or hit an async error; it must then be aborted,
    /// not destroyed, and never used again.
    failed: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not
// concurrent, which `&mut self` on every op guarantees.
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

impl NcclComm {
    /// Joins the communicator; blocks until all `world` ranks have called this with the
    /// same `unique_id`.
    pub fn new(rank: usize, world: usize, unique_id: [u8; UNIQUE_ID_BYTES]) -> Result<Self, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::Config(format!("NCCL rank {rank} out of range for world size {world}")));
        }
        let nranks =
            c_int::try_from(world).map_err(|_| CollectiveError::Config(format!("world size {world} too large")))?;
        available()?;
        let api = api()?;
        let id = RawUniqueId { internal: unique_id.map(|b| b as c_char) };
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer; id passed by value as nccl.h declares.
        let code = unsafe { (api.comm_init_rank)(&mut comm, nranks, id, rank as c_int) };
        api.check("ncclCommInitRank", code)?;
        if comm.is_null() {
            return Err(CollectiveError::Nccl {
                call: "ncclCommInitRank",
                code,
                message: "returned a null communicator".into(),
            });
        }
        Ok(NcclComm { api, comm, rank, world, device: 0, abort: AbortHandle::new(), failed: false })
    }

    fn usable(&self) -> Result<(), CollectiveError> {
        self.abort.check()?;
        if self.failed {
            return Err(CollectiveError::Broken("NCCL communicator failed earlier".into()));
        }
        Ok(())
    }

    /// Checks the communicator's asynchronous error state (e.g. a peer died).
    pub fn async_error(&mut self) -> Result<(), CollectiveError> {
        let mut code: c_int = NCCL_SUCCESS;
        // SAFETY: live comm, valid out-pointer.
        self.api.check("ncclCommGetAsyncError", unsafe { (self.api.comm_get_async_error)(self.comm, &mut code) })?;
        if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
            self.failed = true;
            return Err(CollectiveError::Nccl { call: "async", code, message: self.api.error_string(code) });
        }
        Ok(())
    }

    fn after_call(&mut self, call: &'static str, code: c_int) -> Result<(), CollectiveError> {
        if let Err(e) = self.api.check(call, code) {
            self.failed = true;
            return Err(e);
        }
        self.async_error()
    }

    /// In-place sum of `count` elements at device pointer `ptr`, enqueued on stream 0.
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
        self.usable()?;
        let code = (self.api.all_reduce)(ptr, ptr, count, dtype as c_int, NCCL_SUM, self.comm, std::ptr::null_mut());
        self.after_call("ncclAllReduce", code)
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
        self.usable()?;
        if root >= self.world {
            return Err(CollectiveError::Config(format!("broadcast root {root} >= world size {}", self.world)));
        }
        let code =
            (self.api.broadcast)(ptr, ptr, count, dtype as c_int, root as c_int, self.comm, std::ptr::null_mut());
        self.after_call("ncclBroadcast", code)
    }

    /// Sums a contiguous CUDA tensor in place (enqueued; synchronise before reading).
    pub fn all_reduce_sum_tensor(&mut self, t: &tch::Tensor) -> Result<(), CollectiveError> {
        let (ptr, n, dt) = self.tensor_args(t)?;
        // SAFETY: `t` is a contiguous tensor on this device with `n` elements of `dt`;
        // the caller keeps it alive until the stream is synchronised.
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

    /// Aborts the communicator (unblocks peers' pending NCCL work); it can't be used
    /// afterwards.
    pub fn abort(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: live comm; nulled right after so it's never used again.
            unsafe { (self.api.comm_abort)(self.comm) };
            self.comm = std::ptr::null_mut();
        }
        self.failed = true;
    }

    /// Host-buffer op staged through a device tensor; the trainer's gradient path should
    /// use the tensor/device ops directly instead.
    fn staged(&mut self, buf: &mut [f32], root: Option<usize>) -> Result<(), CollectiveError> {
        self.usable()?;
        let dev = tch::Device::Cuda(self.device);
        let stage = |e: tch::TchError| CollectiveError::Protocol(format!("staging NCCL buffer on {dev:?}: {e}"));
        let t = tch::Tensor::f_from_slice(buf).and_then(|t| t.f_to_device(dev)).map_err(stage)?;
        match root {
            None => self.all_reduce_sum_tensor(&t)?,
            Some(r) => self.broadcast_tensor(&t, r)?,
        }
        tch::Cuda::synchronize(self.device as i64);
        self.async_error()?;
        let n = buf.len();
        t.f_to_device(tch::Device::Cpu).and_then(|h| h.f_copy_data(buf, n)).map_err(stage)
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
        self.staged(buf, None)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.staged(buf, Some(root))
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [1.0f32];
        self.staged(&mut one, None)
    }
    /// Makes later ops fail fast; an op already blocked inside CUDA is not interrupted
    /// (use [`NcclComm::abort`] from the owning thread for that).
    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
    /// Reduces device memory in place, enqueued on the default stream after the kernels
    /// that produced it; later kernels on that stream see the result without a sync.
    fn reduce_tensor_sum(&mut self, t: &mut tch::Tensor) -> Result<(), CollectiveError> {
        NcclComm::all_reduce_sum_tensor(self, t)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // A failed comm may have peers that will never answer, and ncclCommDestroy
        // would wait for them; abort doesn't.
        // SAFETY: live comm, not used after this.
        unsafe {
            if self.failed || self.abort.is_aborted() {
                (self.api.comm_abort)(self.comm);
            } else {
                (self.api.comm_destroy)(self.comm);
            }
        }
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

    #[test]
    fn bad_rank_is_a_config_error() {
        assert!(matches!(NcclComm::new(3, 2, [0; UNIQUE_ID_BYTES]), Err(CollectiveError::Config(_))));
    }
}

//! The few CUDA stream and event calls tch lacks, for the gradient communication thread
//! ([`super::overlap`]): a stream of its own, events that order it after the backward
//! kernels that produced a bucket, a stream wait that orders the step after the
//! reduction, and timing events read lazily.
//!
//! The CUDA runtime is loaded at run time (the `libcudart` libtorch_cuda already mapped,
//! as `collective::nccl` does), so the worker builds and runs on hosts without CUDA; on
//! those, nothing here is ever called.

use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

type RawStream = *mut c_void;
type RawEvent = *mut c_void;

/// `cudaStreamNonBlocking`: no implicit synchronisation with the legacy default stream,
/// which would otherwise serialise the reduction with the backward kernels.
const STREAM_NON_BLOCKING: c_uint = 0x01;
/// `cudaEventDisableTiming`.
const EVENT_DISABLE_TIMING: c_uint = 0x02;
const CUDA_SUCCESS: c_int = 0;

struct Api {
    _lib: Library,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
    stream_create_with_flags: unsafe extern "C" fn(*mut RawStream, c_uint) -> c_int,
    stream_destroy: unsafe extern "C" fn(RawStream) -> c_int,
    stream_wait_event: unsafe extern "C" fn(RawStream, RawEvent, c_uint) -> c_int,
    event_create_with_flags: unsafe extern "C" fn(*mut RawEvent, c_uint) -> c_int,
    event_record: unsafe extern "C" fn(RawEvent, RawStream) -> c_int,
    event_query: unsafe extern "C" fn(RawEvent) -> c_int,
    event_elapsed_time: unsafe extern "C" fn(*mut f32, RawEvent, RawEvent) -> c_int,
    event_destroy: unsafe extern "C" fn(RawEvent) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl Api {
    fn check(&self, call: &str, code: c_int) -> Result<(), String> {
        if code == CUDA_SUCCESS {
            return Ok(());
        }
        // SAFETY: cudaGetErrorString returns a static NUL-terminated string (or null).
        let p = unsafe { (self.get_error_string)(code) };
        let text = if p.is_null() {
            format!("CUDA error {code}")
        } else {
            // SAFETY: non-null static C string from the CUDA runtime.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        Err(format!("{call}: {text} (cudaError_t {code})"))
    }
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn api() -> Result<&'static Api, String> {
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    let (lib, cand) = crate::cuda_runtime::open()?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the signature matches cuda_runtime_api.h (CUDA 11-13).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{} lacks {}: {e}", cand, $name))?
        };
    }
    Ok(Api {
        set_device: sym!("cudaSetDevice"),
        stream_create_with_flags: sym!("cudaStreamCreateWithFlags"),
        stream_destroy: sym!("cudaStreamDestroy"),
        stream_wait_event: sym!("cudaStreamWaitEvent"),
        event_create_with_flags: sym!("cudaEventCreateWithFlags"),
        event_record: sym!("cudaEventRecord"),
        event_query: sym!("cudaEventQuery"),
        event_elapsed_time: sym!("cudaEventElapsedTime"),
        event_destroy: sym!("cudaEventDestroy"),
        get_error_string: sym!("cudaGetErrorString"),
        _lib: lib,
    })
}

/// Makes `device` current on the calling thread (CUDA's current device is per thread).
pub fn use_device(device: usize) -> Result<(), String> {
    let api = api()?;
    let d = c_int::try_from(device).map_err(|_| format!("CUDA device {device}"))?;
    // SAFETY: plain call with an int.
    api.check("cudaSetDevice", unsafe { (api.set_device)(d) })
}

/// A stream that does not synchronise with the legacy default stream; destroyed on drop.
pub struct Stream {
    api: &'static Api,
    raw: RawStream,
}

// SAFETY: CUDA streams may be used from any host thread.
unsafe impl Send for Stream {}
// SAFETY: as above; every call through `&Stream` is thread-safe in the CUDA runtime.
unsafe impl Sync for Stream {}

impl Stream {
    /// A new non-blocking stream on the calling thread's current device.
    pub fn new() -> Result<Stream, String> {
        let api = api()?;
        let mut raw: RawStream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; flag from cuda_runtime_api.h.
        api.check("cudaStreamCreateWithFlags", unsafe {
            (api.stream_create_with_flags)(&mut raw, STREAM_NON_BLOCKING)
        })?;
        Ok(Stream { api, raw })
    }

    /// The raw `cudaStream_t` (for `collective::nccl::on_stream`).
    pub fn raw(&self) -> *mut c_void {
        self.raw
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: live stream, destroyed once; CUDA releases it after its pending work.
        unsafe { (self.api.stream_destroy)(self.raw) };
    }
}

/// The stream tch launches its kernels on: the legacy default stream.
pub const COMPUTE: Option<&Stream> = None;

/// A CUDA event; destroyed on drop.
pub struct Event {
    api: &'static Api,
    raw: RawEvent,
}

// SAFETY: CUDA events may be recorded, queried and destroyed from any host thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// A new event; `timing` events can be measured with [`Event::elapsed_since`].
    pub fn new(timing: bool) -> Result<Event, String> {
        let api = api()?;
        let mut raw: RawEvent = std::ptr::null_mut();
        let flags = if timing { 0 } else { EVENT_DISABLE_TIMING };
        // SAFETY: valid out-pointer; flags from cuda_runtime_api.h.
        api.check("cudaEventCreateWithFlags", unsafe { (api.event_create_with_flags)(&mut raw, flags) })?;
        Ok(Event { api, raw })
    }

    /// Records the event after the work enqueued so far on `stream` (None: the legacy
    /// default stream, where tch's kernels run).
    pub fn record(&self, stream: Option<&Stream>) -> Result<(), String> {
        let s = stream.map_or(std::ptr::null_mut(), |s| s.raw);
        // SAFETY: live event and stream (or null, the legacy default stream).
        self.api.check("cudaEventRecord", unsafe { (self.api.event_record)(self.raw, s) })
    }

    /// Makes `stream` (None: the legacy default stream) wait, on the device, for the work
    /// this event was last recorded after. The host does not wait.
    pub fn block(&self, stream: Option<&Stream>) -> Result<(), String> {
        let s = stream.map_or(std::ptr::null_mut(), |s| s.raw);
        // SAFETY: live event and stream; flags 0 as documented.
        self.api.check("cudaStreamWaitEvent", unsafe { (self.api.stream_wait_event)(s, self.raw, 0) })
    }

    /// Seconds between `start` and this event when both completed, None while they have
    /// not (never waits: read lazily, a step later).
    pub fn elapsed_since(&self, start: &Event) -> Option<f64> {
        // SAFETY: live event.
        if unsafe { (self.api.event_query)(self.raw) } != CUDA_SUCCESS {
            return None;
        }
        let mut ms = 0f32;
        // SAFETY: live timing events, both recorded and complete.
        let code = unsafe { (self.api.event_elapsed_time)(&mut ms, start.raw, self.raw) };
        (code == CUDA_SUCCESS).then_some(f64::from(ms) / 1e3)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: live event, destroyed once.
        unsafe { (self.api.event_destroy)(self.raw) };
    }
}

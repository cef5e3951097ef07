//! Process-wide heap settings for a training process.
//!
//! A training step allocates and frees the same few hundred activation and gradient
//! buffers every time, many of them above glibc's largest mmap threshold (32 MiB; one
//! resnet18 activation at batch 128 is 33.5 MB). By default each such buffer is a fresh
//! `mmap` whose pages the kernel faults in and zeroes on first touch, then `munmap`s on
//! free: 2–3 s of kernel time in a 2-step resnet18 run on the 2-core test machine, about
//! half of it gone with the settings below (docs/BENCHMARKS.md).
//! Serving every block from the heap and never trimming it lets the next step reuse the
//! same pages, as PyTorch's CUDA caching allocator does on the GPU. The cost is that the
//! process keeps its peak footprint, which is what a dedicated training worker wants.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    use std::os::raw::c_int;
    // From glibc's <malloc.h>.
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_MAX: c_int = -4;
    unsafe extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // SAFETY: mallopt only adjusts allocator parameters; it is safe to call at any time
    // and returns 0 if a value is rejected, which leaves the default in place.
    let ok = unsafe { mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, c_int::MAX) == 1 };
    if !ok {
        tracing::debug!("glibc rejected the allocator settings; keeping its defaults");
    }
}

/// Other platforms keep their allocator's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}

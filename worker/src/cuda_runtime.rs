//! Finding the CUDA runtime (libcudart) at run time. The worker links no CUDA library
//! directly (the same binary runs on CPU-only hosts), so the few runtime calls tch lacks —
//! device selection, streams, events — are resolved with `dlopen` by the modules that need
//! them (`collective/nccl.rs`, `train/cuda_stream.rs`); this is where the library is found.

use libloading::Library;
use std::path::{Path, PathBuf};

/// Opens the CUDA runtime: the copy already mapped into the process first (libtorch_cuda
/// loaded it, and a second copy would have its own device state), then the sonames of
/// CUDA 13 and 12. Returns the library and the path it was opened from (for messages).
///
/// Errors: one line naming every candidate tried and why it failed to load.
pub fn open() -> Result<(Library, String), String> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
            let file = Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or("");
            if file.starts_with("libcudart") && !cands.iter().any(|c| c == Path::new(path)) {
                cands.push(PathBuf::from(path));
            }
        }
    }
    cands.extend(["libcudart.so.13", "libcudart.so.12", "libcudart.so"].map(PathBuf::from));
    let mut tried = Vec::new();
    for cand in cands {
        // SAFETY: the CUDA runtime's initialisers are well-behaved; normally this only takes
        // another reference to the copy already mapped.
        match unsafe { Library::new(&cand) } {
            Ok(lib) => return Ok((lib, cand.display().to_string())),
            Err(e) => tried.push(format!("{}: {e}", cand.display())),
        }
    }
    Err(format!("the CUDA runtime (libcudart) is not loadable; tried {}", tried.join("; ")))
}

// Per-device autocast control for cvdist's trainer.
//
// tch only exposes at::autocast::set_enabled(bool), which in libtorch 2.x is the CUDA
// switch with the CUDA default dtype (fp16). bf16 needs set_autocast_dtype, and CPU
// autocast has its own enable flag and dtype (at::kCPU, default bfloat16), so this shim
// calls the device-typed functions libtorch_cpu.so exports. Built with the `cc` crate
// against the headers torch-sys located (worker/build.rs) rather than found by dlsym on a
// mangled C++ name: a signature change then fails the build instead of a run.
//
// Every entry point catches C++ exceptions: one must never unwind into Rust.
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

namespace {
c10::DeviceType device_of(int cuda) { return cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU; }
}  // namespace

extern "C" {

// Enables autocast on the calling thread for CUDA (`cuda` != 0) or CPU, casting to
// bfloat16 (`bf16` != 0) or float16, and saves the previous state in `prev_enabled` /
// `prev_dtype` (opaque: only for cvdist_autocast_exit). Returns 0, or -1 on error.
int cvdist_autocast_enter(int cuda, int bf16, int* prev_enabled, int* prev_dtype) {
  try {
    auto dev = device_of(cuda);
    *prev_enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::set_autocast_dtype(dev, bf16 ? at::kBFloat16 : at::kHalf);
    at::autocast::increment_nesting();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Restores what cvdist_autocast_enter saved; the outermost exit clears the cast cache
// (as torch.autocast's __exit__ does) so cached low-precision weight copies are freed.
int cvdist_autocast_exit(int cuda, int prev_enabled, int prev_dtype) {
  try {
    auto dev = device_of(cuda);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dev, prev_enabled != 0);
    at::autocast::set_autocast_dtype(dev, static_cast<c10::ScalarType>(prev_dtype));
    return 0;
  } catch (...) {
    return -1;
  }
}

// The autocast state of CUDA (`cuda` != 0) or CPU on the calling thread: whether it is
// enabled, and whether its dtype is bfloat16 (1), float16 (0) or another (-1).
int cvdist_autocast_state(int cuda, int* enabled, int* bf16) {
  try {
    auto dev = device_of(cuda);
    *enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    auto t = at::autocast::get_autocast_dtype(dev);
    *bf16 = t == at::kBFloat16 ? 1 : (t == at::kHalf ? 0 : -1);
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

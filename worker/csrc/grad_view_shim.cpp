// Lets cvdist point a parameter's `.grad` at a view of a flat bucket buffer.
//
// tch can read a gradient but not assign one. With the gradient already defined,
// autograd's AccumulateGrad adds each backward's result into it in place (when grad mode
// is off, as it is during backward), so a gradient that is a view into a bucket buffer
// stays one: packing for the all-reduce needs no copy and zeroing is one call per bucket
// (the design of PyTorch DDP's `gradient_as_bucket_view`). Built with the `cc` crate
// against the libtorch headers torch-sys located (worker/build.rs).
//
// No C++ exception may unwind into Rust: every entry point catches them.
#include <ATen/core/Tensor.h>

extern "C" {

// Sets `param`'s gradient to `grad` (both `at::Tensor*`, tch's C_tensor). The caller
// guarantees shape, strides, dtype and device match the parameter. Returns 0, or -1 when
// libtorch refused (for instance, a tensor without autograd metadata).
int cvdist_set_grad(at::Tensor* param, const at::Tensor* grad) {
  try {
    param->mutable_grad() = *grad;
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

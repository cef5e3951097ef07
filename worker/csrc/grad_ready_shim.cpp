// Tells cvdist when a parameter's gradient is final for the running backward, so its
// bucket can be all-reduced while the rest of backward still computes.
//
// tch exposes no autograd hooks. libtorch runs a parameter's post-accumulate-grad hook
// (torch/csrc/autograd/function_hook.h, `PostAccumulateGradHook`; what Python's
// `Tensor.register_post_accumulate_grad_hook` installs) inside its AccumulateGrad node,
// right after the new gradient was added into `.grad`: once per backward, even when the
// parameter is used several times in the graph. The hook here only calls a C function
// pointer with a context pointer and the parameter's index; the Rust side decides what
// that means. Built with the `cc` crate against the libtorch headers torch-sys located
// (worker/build.rs).
//
// No C++ exception may unwind into Rust: every entry point catches them. The callback is
// Rust code that never unwinds (a panic there aborts the process).
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <memory>

extern "C" {
typedef void (*cvdist_grad_ready_fn)(void* ctx, int64_t index);
}

namespace {

struct GradReadyHook : torch::autograd::PostAccumulateGradHook {
  GradReadyHook(cvdist_grad_ready_fn fn, void* ctx, int64_t index) : fn_(fn), ctx_(ctx), index_(index) {}
  void operator()(const torch::autograd::Variable& /*param*/) override { fn_(ctx_, index_); }

  cvdist_grad_ready_fn fn_;
  void* ctx_;
  int64_t index_;
};

}  // namespace

extern "C" {

// Installs the hook on `param` (an `at::Tensor*`, tch's C_tensor): after each backward has
// accumulated into its gradient, `fn(ctx, index)` runs on the thread that ran the
// AccumulateGrad node. A tensor holds one such hook; this replaces any earlier one. The
// caller keeps `ctx` alive until `cvdist_clear_grad_ready` removed the hook. Returns 0, or
// -1 when libtorch refused (e.g. a tensor that does not require grad).
int cvdist_set_grad_ready(at::Tensor* param, cvdist_grad_ready_fn fn, void* ctx, int64_t index) {
  try {
    if (!param->requires_grad() || !param->is_leaf()) {
      return -1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(*param, std::make_unique<GradReadyHook>(fn, ctx, index));
    return 0;
  } catch (...) {
    return -1;
  }
}

// Removes the hook `cvdist_set_grad_ready` installed on `param`. Returns 0 or -1.
int cvdist_clear_grad_ready(at::Tensor* param) {
  try {
    torch::autograd::impl::set_post_acc_grad_hooks(*param, nullptr);
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// A sum across ranks that autograd can differentiate, for SyncBatchNorm.
//
// SyncBatchNorm normalises over the whole global batch: every rank adds its per-channel
// sums into a group-wide total in forward, and backward must send each rank the gradient
// of the loss of *every* rank with respect to that total. For y = Σ_r x_r that gradient is
// the sum over ranks of the incoming gradients, so the backward of an all-reduce (sum) is
// an all-reduce (sum) of the gradient: one custom autograd node does both directions, and
// the rest of SyncBatchNorm is ordinary differentiable tensor code (as in
// torch.nn.SyncBatchNorm, whose backward all-reduces the gradient sums the same way).
//
// tch has no custom autograd functions. The node here calls a C function pointer with a
// context pointer and the tensor to sum in place; the Rust side runs the collective and
// keeps any error for the caller (the callback never fails from C++'s point of view, so no
// exception crosses into the autograd engine). Built with the `cc` crate against the
// libtorch headers torch-sys located (worker/build.rs).
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstring>

extern "C" {
// Sums `t` (a contiguous tensor) in place over the ranks of the group `ctx` names.
typedef void (*cvdist_sum_fn)(void* ctx, at::Tensor* t);
}

namespace {

struct GroupSum : torch::autograd::Function<GroupSum> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t fn, int64_t group) {
    ctx->saved_data["fn"] = fn;
    ctx->saved_data["group"] = group;
    at::Tensor y = x.detach().contiguous().clone();
    reinterpret_cast<cvdist_sum_fn>(fn)(reinterpret_cast<void*>(group), &y);
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    auto fn = reinterpret_cast<cvdist_sum_fn>(ctx->saved_data["fn"].toInt());
    auto group = reinterpret_cast<void*>(ctx->saved_data["group"].toInt());
    at::Tensor g = grads[0].contiguous().clone();
    fn(group, &g);
    return {g, at::Tensor(), at::Tensor()};
  }
};

void copy_error(const char* what, char* err, size_t cap) {
  if (err != nullptr && cap > 0) {
    std::strncpy(err, what, cap - 1);
    err[cap - 1] = '\0';
  }
}

}  // namespace

extern "C" {

// `x` summed over the group's ranks, as a new tensor whose gradient is the group's sum of
// gradients. `fn(group, t)` runs once in forward and once in backward, on the thread that
// runs each; the caller keeps `group` valid until the backward of the result has run (or
// the graph is freed). Returns a new `at::Tensor*` (tch's C_tensor, owned by the caller),
// or nullptr with a message in `err`.
at::Tensor* cvdist_group_sum(const at::Tensor* x, cvdist_sum_fn fn, void* group, char* err, size_t cap) {
  try {
    return new at::Tensor(
        GroupSum::apply(*x, reinterpret_cast<int64_t>(fn), reinterpret_cast<int64_t>(group)));
  } catch (const std::exception& e) {
    copy_error(e.what(), err, cap);
    return nullptr;
  } catch (...) {
    copy_error("unknown C++ exception", err, cap);
    return nullptr;
  }
}

}  // extern "C"

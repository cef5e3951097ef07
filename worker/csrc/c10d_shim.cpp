// cvdist's data plane on PyTorch's own c10d: the rendezvous store (served by Rust over an
// authenticated connection), the gloo process group, and the collectives cvdist issues on
// any c10d backend (gloo here, NCCL in c10d_nccl.cpp). Every stream, event, allocator and
// watchdog rule of a device collective is therefore the one PyTorch DDP runs.
//
// Compressed gradients (`--grad-compression bf16|fp16`) follow the order of DDP's
// `fp16_compress_hook`/`bf16_compress_hook`: the f32 bucket is divided by the world size
// and cast to 16 bits on the caller's current stream, the process group all-reduces the
// 16-bit copy (it orders its own stream after the caller's and keeps the copy alive until
// the operation completes), and `cvdist_work_finish` writes the result back on the caller's
// stream after `Work::wait` made that stream wait for the reduction. The result is scaled
// back by the world size, so callers always receive a sum.
//
// Built with the `cc` crate against the libtorch headers torch-sys found (worker/build.rs).
// No C++ exception may unwind into Rust: every entry point catches them.
#define USE_C10D_GLOO
#include "c10d_shim.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <stdexcept>

void cvdist_write_error(const char* msg, char* err, size_t cap) {
  if (err == nullptr || cap == 0) return;
  std::strncpy(err, msg, cap - 1);
  err[cap - 1] = '\0';
}

namespace cvdist {

namespace {
constexpr size_t kErrCap = 512;

[[noreturn]] void fail(const char* what, const char* err) {
  throw std::runtime_error(std::string("cvdist rendezvous store: ") + what + ": " + err);
}

const uint8_t* bytes(const std::string& s) {
  return reinterpret_cast<const uint8_t*>(s.data());
}
}  // namespace

c10::intrusive_ptr<c10d::Store> CallbackStore::clone() {
  return c10::make_intrusive<CallbackStore>(h_, timeout_);
}

void CallbackStore::set(const std::string& key, const std::vector<uint8_t>& value) {
  char err[kErrCap] = {0};
  if (h_->ops.set(h_->ctx, bytes(key), key.size(), value.data(), value.size(), err, kErrCap) != 0) fail("set", err);
}

std::vector<uint8_t> CallbackStore::get_within(const std::string& key, std::chrono::milliseconds timeout) {
  char err[kErrCap] = {0};
  std::vector<uint8_t> out;
  if (h_->ops.get(h_->ctx, bytes(key), key.size(), timeout.count(), &out, err, kErrCap) != 0) fail("get", err);
  return out;
}

std::vector<uint8_t> CallbackStore::get(const std::string& key) {
  return get_within(key, timeout_);
}

int64_t CallbackStore::add(const std::string& key, int64_t value) {
  char err[kErrCap] = {0};
  int64_t out = 0;
  if (h_->ops.add(h_->ctx, bytes(key), key.size(), value, &out, err, kErrCap) != 0) fail("add", err);
  return out;
}

bool CallbackStore::deleteKey(const std::string& key) {
  char err[kErrCap] = {0};
  int removed = 0;
  if (h_->ops.remove(h_->ctx, bytes(key), key.size(), &removed, err, kErrCap) != 0) fail("delete", err);
  return removed != 0;
}

bool CallbackStore::check(const std::vector<std::string>& keys) {
  for (const auto& key : keys) {
    char err[kErrCap] = {0};
    int present = 0;
    if (h_->ops.check(h_->ctx, bytes(key), key.size(), &present, err, kErrCap) != 0) fail("check", err);
    if (present == 0) return false;
  }
  return true;
}

int64_t CallbackStore::getNumKeys() {
  char err[kErrCap] = {0};
  int64_t out = 0;
  if (h_->ops.num_keys(h_->ctx, &out, err, kErrCap) != 0) fail("num_keys", err);
  return out;
}

void CallbackStore::wait(const std::vector<std::string>& keys) {
  wait(keys, timeout_);
}

void CallbackStore::wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) {
  // One deadline for all keys, as c10d's stores apply it.
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (const auto& key : keys) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    get_within(key, std::max(left, std::chrono::milliseconds(1)));
  }
}

}  // namespace cvdist

// An operation in flight. `wire` is the 16-bit copy of a compressed bucket (undefined
// otherwise), written back into `target` times `scale` when the operation is finished.
struct CvdWork {
  c10::intrusive_ptr<c10d::Work> work;
  at::Tensor target;
  at::Tensor wire;
  double scale = 1.0;
};

namespace {

template <class F>
auto guarded(char* err, size_t cap, F f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    cvdist_write_error(e.what(), err, cap);
  } catch (...) {
    cvdist_write_error("unknown C++ exception", err, cap);
  }
  return decltype(f())();
}

}  // namespace

extern "C" {

// Makes `cuda:index` the calling thread's current device through libtorch's device guard
// implementation (registered by libtorch_cuda). 0, or -1 when there is none.
int cvdist_set_cuda_device(int index) {
  try {
    auto impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    impl->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
    return 0;
  } catch (...) {
    return -1;
  }
}

// Replaces the bytes of `out` (a `std::vector<uint8_t>*` handed to a store callback).
void cvdist_bytes_assign(void* out, const uint8_t* data, size_t len) {
  static_cast<std::vector<uint8_t>*>(out)->assign(data, data + len);
}

// A gloo process group of `world` ranks over a store served by `ops` (ownership of `ctx`
// passes here: it is released when the group and every clone of the store are gone, or
// at once on failure). `host` is the address this rank's gloo device binds and
// advertises. `timeout_ms` bounds every collective. Null on failure, with `err` set.
CvdGroup* cvdist_group_gloo(void* ctx, const CvdStoreOps* ops, int rank, int world, int64_t timeout_ms,
                            const char* host, char* err, size_t cap) {
  auto handle = std::make_shared<cvdist::StoreHandle>(ctx, *ops);
  return guarded(err, cap, [&]() -> CvdGroup* {
    std::chrono::milliseconds timeout(timeout_ms);
    auto store = c10::make_intrusive<cvdist::CallbackStore>(handle, timeout);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
    // One thread: cvdist issues one collective at a time per group, in order.
    options->threads = 1;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    return new CvdGroup{pg, world};
  });
}

// In-place sum of `t` across the group. `wire`: 0 f32, 1 bf16, 2 fp16 (see the file
// comment). Null on failure, with `err` set.
CvdWork* cvdist_group_all_reduce(CvdGroup* g, at::Tensor* t, int wire, char* err, size_t cap) {
  return guarded(err, cap, [&]() -> CvdWork* {
    auto w = std::make_unique<CvdWork>();
    std::vector<at::Tensor> tensors;
    if (wire == 0) {
      tensors.push_back(*t);
    } else {
      auto kind = wire == 1 ? at::kBFloat16 : at::kHalf;
      w->target = *t;
      w->wire = t->mul(1.0 / g->world).to(kind);
      w->scale = g->world;
      tensors.push_back(w->wire);
    }
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    w->work = g->backend->allreduce(tensors, opts);
    return w.release();
  });
}

// Overwrites `t` on every rank with rank `root`'s. Null on failure, with `err` set.
CvdWork* cvdist_group_broadcast(CvdGroup* g, at::Tensor* t, int root, char* err, size_t cap) {
  return guarded(err, cap, [&]() -> CvdWork* {
    auto w = std::make_unique<CvdWork>();
    std::vector<at::Tensor> tensors{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    w->work = g->backend->broadcast(tensors, opts);
    return w.release();
  });
}

CvdWork* cvdist_group_barrier(CvdGroup* g, char* err, size_t cap) {
  return guarded(err, cap, [&]() -> CvdWork* {
    auto w = std::make_unique<CvdWork>();
    w->work = g->backend->barrier(c10d::BarrierOptions());
    return w.release();
  });
}

// 1 once the operation has completed (successfully or not), 0 while it runs. Never
// blocks; on a CUDA backend it asks the device without waiting.
int cvdist_work_completed(CvdWork* w) {
  try {
    return w->work->isCompleted() ? 1 : 0;
  } catch (...) {
    return 1;
  }
}

// Where the operation stands on its device, without waiting: 0 still running, 1 completed
// successfully, 2 failed (an exception recorded, an abort or a timeout included).
int cvdist_work_state(CvdWork* w) {
  try {
    if (!w->work->isCompleted()) {
      return 0;
    }
    return w->work->exception() ? 2 : 1;
  } catch (...) {
    return 2;
  }
}

// Waits for the operation as c10d defines it (the host for gloo; for NCCL the caller's
// current stream waits on the device, the host does not) and writes a compressed result
// back. 0, or -1 with `err` set when the operation failed.
int cvdist_work_finish(CvdWork* w, char* err, size_t cap) {
  return guarded(err, cap, [&]() -> int {
    w->work->wait();
    if (w->wire.defined()) {
      w->target.copy_(w->wire);
      w->target.mul_(w->scale);
      w->wire = at::Tensor();
    }
    return 1;
  }) == 1 ? 0 : -1;
}

void cvdist_work_free(CvdWork* w) {
  delete w;
}

// Aborts the group's communicators (NCCL: ncclCommAbort through c10d; gloo has no
// abort of a running collective, which ends at its timeout or when a peer's socket
// closes). Never throws.
void cvdist_group_abort(CvdGroup* g) {
  try {
    g->backend->abort();
  } catch (...) {
  }
}

// Ends the group cleanly after its last operation completed.
void cvdist_group_shutdown(CvdGroup* g) {
  try {
    g->backend->shutdown();
  } catch (...) {
  }
}

void cvdist_group_free(CvdGroup* g) {
  try {
    delete g;
  } catch (...) {
  }
}

}  // extern "C"

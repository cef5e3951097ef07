// The NCCL process group of c10d (ProcessGroupNCCL), built only where the libtorch cvdist
// links has CUDA and the NCCL and CUDA headers are present (worker/build.rs defines
// CVDIST_WITH_NCCL then). Everything else about a group is in c10d_shim.cpp.
#include "c10d_shim.h"

#ifdef CVDIST_WITH_NCCL
#define USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

extern "C" {

// 1 when this build can make NCCL groups.
int cvdist_nccl_built(void) {
#ifdef CVDIST_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// An NCCL process group on `cuda:device`, its communicator created now (eager init), so
// a failure shows here and not at the first gradient bucket. `timeout_ms` is c10d's
// collective timeout, enforced by its watchdog. Ownership of `ctx` passes as for
// cvdist_group_gloo. Null on failure, with `err` set.
CvdGroup* cvdist_group_nccl(void* ctx, const CvdStoreOps* ops, int rank, int world, int64_t timeout_ms, int device,
                            char* err, size_t cap) {
  auto handle = std::make_shared<cvdist::StoreHandle>(ctx, *ops);
#ifdef CVDIST_WITH_NCCL
  try {
    std::chrono::milliseconds timeout(timeout_ms);
    auto store = c10::make_intrusive<cvdist::CallbackStore>(handle, timeout);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
    pg->setBoundDeviceId(dev);
    pg->eagerConnectSingleDevice(dev);
    return new CvdGroup{pg, world};
  } catch (const std::exception& e) {
    cvdist_write_error(e.what(), err, cap);
  } catch (...) {
    cvdist_write_error("unknown C++ exception", err, cap);
  }
  return nullptr;
#else
  (void)rank;
  (void)world;
  (void)timeout_ms;
  (void)device;
  cvdist_write_error("this cvdist was built against a libtorch without CUDA/NCCL", err, cap);
  return nullptr;
#endif
}

}  // extern "C"

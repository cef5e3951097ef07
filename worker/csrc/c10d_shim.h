// Shared by the c10d shims: the store whose operations Rust serves, and the handles Rust
// holds for a process group and an operation in flight. See c10d_shim.cpp.
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

extern "C" {
// The store operations, implemented in Rust (worker/src/collective/c10d.rs). Each
// returns 0 on success and -1 on failure with a message in `err` (at most `cap` bytes,
// NUL-terminated). `out` is an opaque `std::vector<uint8_t>*` filled through
// `cvdist_bytes_assign`.
struct CvdStoreOps {
  int (*set)(void* ctx, const uint8_t* key, size_t klen, const uint8_t* val, size_t vlen, char* err, size_t cap);
  int (*get)(void* ctx, const uint8_t* key, size_t klen, int64_t timeout_ms, void* out, char* err, size_t cap);
  int (*add)(void* ctx, const uint8_t* key, size_t klen, int64_t delta, int64_t* out, char* err, size_t cap);
  int (*check)(void* ctx, const uint8_t* key, size_t klen, int* present, char* err, size_t cap);
  int (*remove)(void* ctx, const uint8_t* key, size_t klen, int* removed, char* err, size_t cap);
  int (*num_keys)(void* ctx, int64_t* out, char* err, size_t cap);
  void (*release)(void* ctx);
};
}

namespace cvdist {

// Owns the Rust side of a store; released once the last clone of the store is gone.
struct StoreHandle {
  void* ctx;
  CvdStoreOps ops;
  StoreHandle(void* c, const CvdStoreOps& o) : ctx(c), ops(o) {}
  ~StoreHandle() { ops.release(ctx); }
};

// A c10d::Store whose every operation is a call into Rust, which carries it over a
// connection authenticated with the attempt's secret (collective/c10d/store.rs).
class CallbackStore : public c10d::Store {
 public:
  CallbackStore(std::shared_ptr<StoreHandle> h, std::chrono::milliseconds timeout)
      : c10d::Store(timeout), h_(std::move(h)) {}
  c10::intrusive_ptr<c10d::Store> clone() override;
  void set(const std::string& key, const std::vector<uint8_t>& value) override;
  std::vector<uint8_t> get(const std::string& key) override;
  int64_t add(const std::string& key, int64_t value) override;
  bool deleteKey(const std::string& key) override;
  bool check(const std::vector<std::string>& keys) override;
  int64_t getNumKeys() override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override;

 private:
  std::vector<uint8_t> get_within(const std::string& key, std::chrono::milliseconds timeout);
  std::shared_ptr<StoreHandle> h_;
};

}  // namespace cvdist

// A process group as Rust holds it.
struct CvdGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
  int world;
};

// Writes `msg` into `err` (at most `cap` bytes, NUL-terminated).
void cvdist_write_error(const char* msg, char* err, size_t cap);

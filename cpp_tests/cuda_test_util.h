// Shared pieces of the CUDA test suites: the run-time device check (cases skip without a GPU), an owning
// cudaMalloc buffer and a checked upload.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstddef>

namespace qx_test {

inline bool gpu_available() {
  static const bool has = [] {
    int count = 0;
    const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
    cudaGetLastError();  // a missing driver leaves an error behind; later checks must not see it
    return ok;
  }();
  return has;
}

#define REQUIRE_GPU()                                                 \
  do {                                                                \
    if (!::qx_test::gpu_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// Device memory from cudaMalloc only (never managed memory), freed on scope exit.
class DevBuf {
 public:
  explicit DevBuf(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&p_, bytes ? bytes : 1) != cudaSuccess) p_ = nullptr;
  }
  ~DevBuf() {
    if (p_) cudaFree(p_);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  bool ok() const { return p_ != nullptr; }
  template <typename T = void>
  T* get(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(p_) + byte_offset);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_;
};

inline ::testing::AssertionResult upload(const DevBuf& d, const void* src, size_t bytes, size_t offset = 0) {
  if (!d.ok()) return ::testing::AssertionFailure() << "cudaMalloc failed";
  if (bytes == 0) return ::testing::AssertionSuccess();
  const cudaError_t e = cudaMemcpy(d.get(offset), src, bytes, cudaMemcpyHostToDevice);
  if (e != cudaSuccess) return ::testing::AssertionFailure() << "upload: " << cudaGetErrorString(e);
  return ::testing::AssertionSuccess();
}

}  // namespace qx_test

// GoogleTest: the CUDA optimizer steps match the CPU kernels bit for bit (finite data), and paged memory refuses requests above
// the free device memory, prefetches both ways and frees. Every test skips without a GPU.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "common/convert.h"
#include "optim/optim.h"
#include "quant/quant.h"
#include "cuda_test_util.h"

using namespace qx;

namespace {

template <typename T>
T* to_device(const std::vector<T>& h, size_t extra_bytes = 0) {
  void* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, h.size() * sizeof(T) + extra_bytes + 16), cudaSuccess);
  char* p = static_cast<char*>(d) + extra_bytes;
  EXPECT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return reinterpret_cast<T*>(p);
}
template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

std::vector<uint8_t> random_bytes(size_t n, std::mt19937& gen) {
  std::uniform_int_distribution<int> d(0, 255);
  std::vector<uint8_t> v(n);
  for (auto& x : v) x = uint8_t(d(gen));
  return v;
}

// Parameters as raw bytes of `dt` (float32: 4 bytes per element, 16-bit types: 2).
std::vector<uint8_t> random_param(DType dt, int64_t n, float scale, std::mt19937& gen) {
  std::vector<uint8_t> b(n * dtype_size(dt));
  std::normal_distribution<float> d(0.0f, scale);
  for (int64_t i = 0; i < n; ++i) store_elem(b.data(), dt, i, d(gen));
  return b;
}

}  // namespace

TEST(OptimCuda, MatchesCpuBitForBit) {
  REQUIRE_GPU();
  std::mt19937 gen(11);
  const int64_t sizes[] = {1, 7, 255, 256, 257, 4097, 1 << 20 | 5};
  for (int kind = 0; kind < 2; ++kind)
    for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
      for (int64_t n : sizes)
        for (bool eight : {false, true})
          for (size_t misalign : {size_t(0), size_t(4)}) {  // 4 bytes off: the kernels' unvectorized path
            const OptimKind k = OptimKind(kind);
            const bool adam = k == OptimKind::kAdamW;
            const int64_t nb = (n + kOptimBlock - 1) / kOptimBlock;
            auto p = random_param(dt, n, 1.0f, gen), g = random_param(dt, n, 0.1f, gen);
            if (n > 300) store_elem(g.data(), dt, 300, NAN);
            std::vector<float> m(n, 0.01f), v(n, 1e-4f), am(nb), av(nb);
            std::vector<uint8_t> qm = random_bytes(n, gen), qv = random_bytes(n, gen);
            for (auto& a : am) a = 0.01f;
            for (auto& a : av) a = 1e-4f;
            OptimHyper h;
            ASSERT_EQ(optim_hyper(k, 1e-3, 0.9, 0.99, 1e-8, 0.01, 4, &h), Status::kOk);
            auto* dp = to_device(p, misalign);
            auto* dg = to_device(g, misalign);
            OptimState ds, hs;
            float *dm = to_device(m), *dv = to_device(v), *dam = to_device(am), *dav = to_device(av);
            uint8_t *dqm = to_device(qm), *dqv = to_device(qv);
            if (eight) {
              ds.qm = dqm, ds.absmax_m = dam, hs.qm = qm.data(), hs.absmax_m = am.data();
              if (adam) ds.qv = dqv, ds.absmax_v = dav, hs.qv = qv.data(), hs.absmax_v = av.data();
            } else {
              ds.m = dm, hs.m = m.data();
              if (adam) ds.v = dv, hs.v = v.data();
            }
            ASSERT_EQ(optim_step_cuda(k, dp, dg, dt, n, ds, h, nullptr), Status::kOk);
            ASSERT_EQ(optim_step_cpu(k, p.data(), g.data(), dt, n, hs, h), Status::kOk);
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            const char* what = eight ? "8-bit" : "32-bit";
            EXPECT_EQ(to_host(dp, p.size()), p) << what << " kind=" << kind << " n=" << n;
            if (eight) {
              EXPECT_EQ(to_host(dqm, n), qm) << what << " n=" << n;
              EXPECT_EQ(to_host(dam, nb), am);
              if (adam) EXPECT_EQ(to_host(dqv, n), qv);
              if (adam) EXPECT_EQ(to_host(dav, nb), av);
            } else {
              EXPECT_EQ(to_host(dm, n), m) << what << " n=" << n;
              if (adam) EXPECT_EQ(to_host(dv, n), v);
            }
            for (void* ptr : {static_cast<void*>(reinterpret_cast<char*>(dp) - misalign),
                              static_cast<void*>(reinterpret_cast<char*>(dg) - misalign), static_cast<void*>(dm),
                              static_cast<void*>(dv), static_cast<void*>(dam), static_cast<void*>(dav),
                              static_cast<void*>(dqm), static_cast<void*>(dqv)})
              cudaFree(ptr);
          }
}

TEST(OptimCuda, BadArgumentsAreRejected) {
  REQUIRE_GPU();
  OptimHyper h;
  ASSERT_EQ(optim_hyper(OptimKind::kAdamW, 1e-3, 0.9, 0.999, 1e-8, 0, 1, &h), Status::kOk);
  float* d = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), 64), cudaSuccess);
  EXPECT_EQ(optim_step_cuda(OptimKind::kAdamW, d, d, DType::kFloat32, 4, OptimState{d}, h, nullptr),
            Status::kInvalidArgument);  // AdamW without v
  EXPECT_EQ(optim_step_cuda(OptimKind::kAdamW, d, nullptr, DType::kFloat32, 4, OptimState{d, d}, h, nullptr),
            Status::kInvalidArgument);
  cudaFree(d);
}

TEST(OptimCuda, PagedAllocationRefusesMoreThanFreeMemory) {
  REQUIRE_GPU();
  size_t free = 0, total = 0;
  ASSERT_EQ(cuda_mem_info(0, &free, &total), Status::kOk);
  void* p = reinterpret_cast<void*>(0x1);
  size_t seen = 0;
  // Refused before anything is allocated (never oversubscribe managed memory here).
  EXPECT_EQ(paged_alloc(0, free + (size_t(1) << 30), &p, &seen), Status::kOutOfMemory);
  EXPECT_EQ(p, nullptr);
  EXPECT_GT(seen, size_t(0));
  EXPECT_EQ(paged_alloc(0, 0, &p, nullptr), Status::kInvalidArgument);
  EXPECT_EQ(paged_alloc(-1, 64, &p, nullptr), Status::kInvalidArgument);
}

TEST(OptimCuda, PagedMemoryPrefetchesBothWaysAndFrees) {
  REQUIRE_GPU();
  int concurrent = 0;
  cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, 0);
  if (!concurrent) GTEST_SKIP() << "device has no concurrent managed access";
  const size_t bytes = size_t(256) << 20;
  size_t free0 = 0, total = 0;
  ASSERT_EQ(cuda_mem_info(0, &free0, &total), Status::kOk);
  ASSERT_LT(bytes * 4, free0) << "not enough free memory for this test";
  void* p = nullptr;
  ASSERT_EQ(paged_alloc(0, bytes, &p, nullptr), Status::kOk);
  ASSERT_NE(p, nullptr);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  ASSERT_EQ(paged_prefetch(p, bytes, 0, stream), Status::kOk);
  ASSERT_EQ(cudaMemsetAsync(p, 0x3c, bytes, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  size_t free_resident = 0, free_out = 0, free_after = 0;
  ASSERT_EQ(cuda_mem_info(0, &free_resident, &total), Status::kOk);
  ASSERT_EQ(paged_prefetch(p, bytes, -1, stream), Status::kOk);  // page out to the host
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cuda_mem_info(0, &free_out, &total), Status::kOk);
  EXPECT_GE(free_out, free_resident + bytes * 9 / 10) << "paging out did not release the device pages";
  EXPECT_EQ(static_cast<unsigned char*>(p)[bytes - 1], 0x3c);  // the host sees the data
  ASSERT_EQ(paged_prefetch(p, bytes, 0, stream), Status::kOk);  // and back
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(paged_free(p), Status::kOk);
  ASSERT_EQ(cuda_mem_info(0, &free_after, &total), Status::kOk);
  EXPECT_GE(free_after, free_resident + bytes * 9 / 10);
  cudaStreamDestroy(stream);
}

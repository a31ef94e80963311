// CUDA twins of the optim.h launchers: one fused kernel per parameter tensor (float32 or blockwise 8-bit state,
// decode -> update -> re-encode in registers), designed bit-exact with optim_cpu.cpp on finite data (every rounding is an explicit
// _rn intrinsic), and the paged (managed) memory that holds optimizer state. No launcher synchronizes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common/cuda_status.cuh"
#include "../quant/quant.h"
#include "optim.h"

namespace qx {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVec32 = 4;  // float32 state: elements per thread per iteration (one 16-byte state load)
constexpr int kVec8 = 8;   // 8-bit state: elements per lane, a warp covers one block of 256

static_assert(kVec8 * 32 == kOptimBlock, "one warp per 8-bit block");

struct Maps8 {  // passed by value (2 KiB of kernel parameters), staged in shared memory
  float s[256];
  float u[256];
};

Status sm_count(int* count) {
  int dev = 0;
  *count = 1;
  if (cuda_ok(cudaGetDevice(&dev), "cudaGetDevice") != Status::kOk ||
      cuda_ok(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute(SM count)") !=
          Status::kOk)
    return Status::kCudaError;
  *count = std::max(*count, 1);
  return Status::kOk;
}

// Restores the caller's current device (the paged-memory helpers take an explicit device).
struct DeviceScope {
  int prev = -1;
  bool ok = false;
  explicit DeviceScope(int device) {
    ok = cuda_ok(cudaGetDevice(&prev), "cudaGetDevice") == Status::kOk &&
         cuda_ok(cudaSetDevice(device), "cudaSetDevice") == Status::kOk;
  }
  ~DeviceScope() {
    if (prev >= 0) cuda_ok(cudaSetDevice(prev), "cudaSetDevice (restoring the current device)");
  }
};

// ---- element access ----
__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// N consecutive elements from an address aligned to N * sizeof(T) (N = 4 or 8).
template <int N>
__device__ __forceinline__ void ldv(const float* p, float (&v)[N]) {
#pragma unroll
  for (int k = 0; k < N; k += 4) {
    const float4 a = *reinterpret_cast<const float4*>(p + k);
    v[k] = a.x, v[k + 1] = a.y, v[k + 2] = a.z, v[k + 3] = a.w;
  }
}
template <int N>
__device__ __forceinline__ void stv(float* p, const float (&v)[N]) {
#pragma unroll
  for (int k = 0; k < N; k += 4) *reinterpret_cast<float4*>(p + k) = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
}
template <int N, typename H>  // 16-bit types: N / 2 32-bit words
__device__ __forceinline__ void ldv16(const H* p, float (&v)[N]) {
  uint32_t w[N / 2];
  if constexpr (N == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    w[0] = u.x, w[1] = u.y;
  }
#pragma unroll
  for (int k = 0; k < N / 2; ++k) {
    H lo, hi;
    const uint16_t l = static_cast<uint16_t>(w[k] & 0xffffu), h = static_cast<uint16_t>(w[k] >> 16);
    memcpy(&lo, &l, 2);
    memcpy(&hi, &h, 2);
    v[2 * k] = ld(&lo, 0), v[2 * k + 1] = ld(&hi, 0);
  }
}
template <int N, typename H>
__device__ __forceinline__ void stv16(H* p, const float (&v)[N]) {
  uint32_t w[N / 2];
#pragma unroll
  for (int k = 0; k < N / 2; ++k) {
    H lo, hi;
    st(&lo, 0, v[2 * k]);
    st(&hi, 0, v[2 * k + 1]);
    uint16_t l, h;
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    w[k] = uint32_t(l) | (uint32_t(h) << 16);
  }
  if constexpr (N == 8) *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  else *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
}
template <int N>
__device__ __forceinline__ void ld_param(const float* p, float (&v)[N]) { ldv<N>(p, v); }
template <int N>
__device__ __forceinline__ void ld_param(const __half* p, float (&v)[N]) { ldv16<N>(p, v); }
template <int N>
__device__ __forceinline__ void ld_param(const __nv_bfloat16* p, float (&v)[N]) { ldv16<N>(p, v); }
template <int N>
__device__ __forceinline__ void st_param(float* p, const float (&v)[N]) { stv<N>(p, v); }
template <int N>
__device__ __forceinline__ void st_param(__half* p, const float (&v)[N]) { stv16<N>(p, v); }
template <int N>
__device__ __forceinline__ void st_param(__nv_bfloat16* p, const float (&v)[N]) { stv16<N>(p, v); }

// The update of optim.h, in the CPU kernels' operation order (see optim_cpu_body.inc).
template <OptimKind K>
__device__ __forceinline__ void update(float& p, float g, float& m, float& v, const OptimHyper& h) {
  if constexpr (K == OptimKind::kAdamW) {
    const float m1 = __fadd_rn(m, __fmul_rn(h.one_minus_beta1, __fsub_rn(g, m)));
    const float v1 = __fadd_rn(__fmul_rn(v, h.beta2), __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
    const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(v1), h.bc2_sqrt), h.eps);
    const float p1 = __fadd_rn(__fmul_rn(p, h.decay), __fdiv_rn(__fmul_rn(h.neg_step, m1), den));
    if (isfinite(g) && isfinite(v1)) p = p1, m = m1, v = v1;
  } else {
    const float c = __fadd_rn(__fmul_rn(m, h.beta1), __fmul_rn(g, h.one_minus_beta1));
    const float sgn = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    const float p1 = __fadd_rn(__fmul_rn(p, h.decay), __fmul_rn(h.neg_step, sgn));
    const float m1 = __fadd_rn(__fmul_rn(m, h.beta2), __fmul_rn(g, h.one_minus_beta2));
    if (isfinite(g)) p = p1, m = m1;
  }
}

// ---- float32 state: kVec32 consecutive elements per thread, grid-stride ----
template <typename T, OptimKind K, bool VEC>
__global__ void __launch_bounds__(kThreads)
    step32_kernel(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m, float* __restrict__ v, int64_t n,
                  OptimHyper h) {
  const int64_t stride = int64_t(gridDim.x) * kThreads * kVec32;
  for (int64_t base = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec32; base < n; base += stride) {
    if (VEC && base + kVec32 <= n) {
      float pv[kVec32], gv[kVec32], mv[kVec32], vv[kVec32] = {};
      ld_param<kVec32>(p + base, pv);
      ld_param<kVec32>(g + base, gv);
      ldv<kVec32>(m + base, mv);
      if constexpr (K == OptimKind::kAdamW) ldv<kVec32>(v + base, vv);
#pragma unroll
      for (int j = 0; j < kVec32; ++j) update<K>(pv[j], gv[j], mv[j], vv[j], h);
      st_param<kVec32>(p + base, pv);
      stv<kVec32>(m + base, mv);
      if constexpr (K == OptimKind::kAdamW) stv<kVec32>(v + base, vv);
    } else {
      for (int64_t i = base; i < base + kVec32 && i < n; ++i) {
        float pf = ld(p, i), mf = m[i], vf = 0.0f;
        if constexpr (K == OptimKind::kAdamW) vf = v[i];
        update<K>(pf, ld(g, i), mf, vf, h);
        st(p, i, pf);
        m[i] = mf;
        if constexpr (K == OptimKind::kAdamW) v[i] = vf;
      }
    }
  }
}

// Nearest code (quantize_nearest8's rule): the last code <= x by a branchless binary search over the sorted
// map in shared memory, then the nearer of it and its successor, ties to the lower index.
__device__ __forceinline__ uint32_t nearest8(const float* code, float x) {
  int lo = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) lo += (code[lo + step] <= x) ? step : 0;
  const int hi = min(lo + 1, 255);
  const float dl = fabsf(__fsub_rn(x, code[lo])), dr = fabsf(__fsub_rn(x, code[hi]));
  return static_cast<uint32_t>(dr < dl ? hi : lo);
}

__device__ __forceinline__ void unpack8(uint64_t w, uint8_t (&q)[kVec8]) {
#pragma unroll
  for (int j = 0; j < kVec8; ++j) q[j] = static_cast<uint8_t>(w >> (8 * j));
}
__device__ __forceinline__ uint64_t pack8(const uint8_t (&q)[kVec8]) {
  uint64_t w = 0;
#pragma unroll
  for (int j = 0; j < kVec8; ++j) w |= uint64_t(q[j]) << (8 * j);
  return w;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// ---- 8-bit state: one warp per block of 256 elements, kVec8 per lane ----
template <typename T, OptimKind K, bool VEC>
__global__ void __launch_bounds__(kThreads)
    step8_kernel(T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ qm, uint8_t* __restrict__ qv,
                 float* __restrict__ am, float* __restrict__ av, int64_t n, OptimHyper h, Maps8 maps) {
  __shared__ float s_code[256], u_code[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_code[i] = maps.s[i], u_code[i] = maps.u[i];
  __syncthreads();
  constexpr bool kAdam = K == OptimKind::kAdamW;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nblocks = (n + kOptimBlock - 1) / kOptimBlock;
  for (int64_t b = int64_t(blockIdx.x) * kWarps + warp; b < nblocks; b += int64_t(gridDim.x) * kWarps) {
    const int64_t e0 = b * kOptimBlock + lane * kVec8;
    const bool full = e0 + kVec8 <= n;
    const float sm = am[b], sv = kAdam ? av[b] : 0.0f;  // read by every lane before lane 0 rewrites them
    float pv[kVec8], gv[kVec8], mv[kVec8], vv[kVec8];
    uint8_t qmb[kVec8], qvb[kVec8];
    if (VEC && full) {
      ld_param<kVec8>(p + e0, pv);
      ld_param<kVec8>(g + e0, gv);
      unpack8(*reinterpret_cast<const uint64_t*>(qm + e0), qmb);  // 8-byte aligned: one load
      if constexpr (kAdam) unpack8(*reinterpret_cast<const uint64_t*>(qv + e0), qvb);
    } else {
#pragma unroll
      for (int j = 0; j < kVec8; ++j) {  // padding past n decodes to 0 with a zero gradient: it stays 0
        const bool in = e0 + j < n;
        pv[j] = in ? ld(p, e0 + j) : 0.0f;
        gv[j] = in ? ld(g, e0 + j) : 0.0f;
        qmb[j] = in ? qm[e0 + j] : 0;
        qvb[j] = (kAdam && in) ? qv[e0 + j] : 0;
      }
    }
    float mx_m = 0.0f, mx_v = 0.0f;
#pragma unroll
    for (int j = 0; j < kVec8; ++j) {
      const bool in = e0 + j < n;
      mv[j] = in ? __fmul_rn(s_code[qmb[j]], sm) : 0.0f;
      vv[j] = (kAdam && in) ? __fmul_rn(u_code[qvb[j]], sv) : 0.0f;
      update<K>(pv[j], gv[j], mv[j], vv[j], h);
      mx_m = fmaxf(mx_m, fabsf(mv[j]));
      mx_v = fmaxf(mx_v, fabsf(vv[j]));
    }
    mx_m = warp_max(mx_m);
    if constexpr (kAdam) mx_v = warp_max(mx_v);
#pragma unroll
    for (int j = 0; j < kVec8; ++j) {  // x / absmax as quantize_8bit: an all-zero block encodes 0
      qmb[j] = static_cast<uint8_t>(nearest8(s_code, mx_m == 0.0f ? 0.0f : __fdiv_rn(mv[j], mx_m)));
      if constexpr (kAdam)
        qvb[j] = static_cast<uint8_t>(nearest8(u_code, mx_v == 0.0f ? 0.0f : __fdiv_rn(vv[j], mx_v)));
    }
    if (VEC && full) {
      st_param<kVec8>(p + e0, pv);
      *reinterpret_cast<uint64_t*>(qm + e0) = pack8(qmb);
      if constexpr (kAdam) *reinterpret_cast<uint64_t*>(qv + e0) = pack8(qvb);
    } else {
      for (int j = 0; j < kVec8 && e0 + j < n; ++j) {
        st(p, e0 + j, pv[j]);
        qm[e0 + j] = qmb[j];
        if constexpr (kAdam) qv[e0 + j] = qvb[j];
      }
    }
    if (lane == 0) {
      am[b] = mx_m;
      if constexpr (kAdam) av[b] = mx_v;
    }
  }
}

bool aligned(const void* ptr, size_t a) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % a == 0; }

template <typename T, OptimKind K>
Status launch(T* p, const T* g, int64_t n, const OptimState& s, const OptimHyper& h, cudaStream_t stream) {
  if (cuda_no_pending() != Status::kOk) return Status::kCudaError;
  int sms = 1;
  if (sm_count(&sms) != Status::kOk) return Status::kCudaError;
  const int64_t cap = int64_t(sms) * 8;  // resident blocks; the kernels stride over the rest
  if (!s.eight_bit()) {
    const bool vec =
        aligned(p, kVec32 * sizeof(T)) && aligned(g, kVec32 * sizeof(T)) && aligned(s.m, 16) && aligned(s.v, 16);
    const int64_t blocks = std::min<int64_t>(cap, (n + kThreads * kVec32 - 1) / (kThreads * kVec32));
    if (vec) step32_kernel<T, K, true><<<unsigned(blocks), kThreads, 0, stream>>>(p, g, s.m, s.v, n, h);
    else step32_kernel<T, K, false><<<unsigned(blocks), kThreads, 0, stream>>>(p, g, s.m, s.v, n, h);
  } else {
    Maps8 maps;
    std::memcpy(maps.s, dynamic_map(true), sizeof(maps.s));
    std::memcpy(maps.u, dynamic_map(false), sizeof(maps.u));
    const bool vec = aligned(p, kVec8 * sizeof(T)) && aligned(g, kVec8 * sizeof(T)) && aligned(s.qm, kVec8) &&
                     aligned(s.qv, kVec8);
    const int64_t nblocks = (n + kOptimBlock - 1) / kOptimBlock;
    const int64_t blocks = std::min<int64_t>(cap, (nblocks + kWarps - 1) / kWarps);
    auto kernel = vec ? step8_kernel<T, K, true> : step8_kernel<T, K, false>;
    kernel<<<unsigned(blocks), kThreads, 0, stream>>>(p, g, s.qm, s.qv, s.absmax_m, s.absmax_v, n, h, maps);
  }
  return launch_status(s.eight_bit() ? "step8_kernel" : "step32_kernel");
}

template <typename T>
Status launch_kind(OptimKind kind, void* p, const void* g, int64_t n, const OptimState& s, const OptimHyper& h,
                   cudaStream_t stream) {
  T* pt = static_cast<T*>(p);
  const T* gt = static_cast<const T*>(g);
  return kind == OptimKind::kAdamW ? launch<T, OptimKind::kAdamW>(pt, gt, n, s, h, stream)
                                   : launch<T, OptimKind::kLion>(pt, gt, n, s, h, stream);
}

}  // namespace

Status optim_step_cuda(OptimKind kind, void* param, const void* grad, DType dtype, int64_t n, const OptimState& s,
                       const OptimHyper& h, void* stream) {
  if (n < 0 || (kind != OptimKind::kAdamW && kind != OptimKind::kLion)) return Status::kInvalidArgument;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16) return Status::kUnsupported;
  if (n == 0) return Status::kOk;
  const bool adam = kind == OptimKind::kAdamW;
  if (!param || !grad) return Status::kInvalidArgument;
  if (s.eight_bit() ? (!s.absmax_m || (adam && (!s.qv || !s.absmax_v))) : (!s.m || (adam && !s.v)))
    return Status::kInvalidArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_kind<float>(kind, param, grad, n, s, h, st);
    case DType::kFloat16: return launch_kind<__half>(kind, param, grad, n, s, h, st);
    default: return launch_kind<__nv_bfloat16>(kind, param, grad, n, s, h, st);
  }
}

// ------------------------------------------------------------------------------------------------
// Paged memory
// ------------------------------------------------------------------------------------------------
Status cuda_mem_info(int device, size_t* free_bytes, size_t* total_bytes) {
  if (device < 0 || !free_bytes || !total_bytes) return Status::kInvalidArgument;
  DeviceScope scope(device);
  if (!scope.ok || cuda_ok(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo") != Status::kOk) {
    return Status::kCudaError;
  }
  return Status::kOk;
}

Status paged_alloc(int device, size_t bytes, void** ptr, size_t* free_bytes) {
  if (!ptr || device < 0 || bytes == 0) return Status::kInvalidArgument;
  *ptr = nullptr;
  int concurrent = 0;
  if (cuda_ok(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device),
              "cudaDeviceGetAttribute(concurrent managed access)") != Status::kOk) {
    return Status::kCudaError;
  }
  if (!concurrent) return Status::kUnsupported;  // prefetching managed memory needs it
  size_t free = 0, total = 0;
  Status s = cuda_mem_info(device, &free, &total);
  if (s != Status::kOk) return s;
  if (free_bytes) *free_bytes = free;
  // Managed memory may be oversubscribed, and on these machines that can stall everything: refuse up front.
  if (bytes > free) return Status::kOutOfMemory;
  DeviceScope scope(device);
  if (!scope.ok || cuda_ok(cudaMallocManaged(ptr, bytes, cudaMemAttachGlobal), "cudaMallocManaged") != Status::kOk) {
    *ptr = nullptr;
    return Status::kCudaError;
  }
  return Status::kOk;
}

Status paged_free(void* ptr) {
  if (!ptr) return Status::kOk;
  if (cuda_ok(cudaFree(ptr), "cudaFree") != Status::kOk) {
    return Status::kCudaError;
  }
  return Status::kOk;
}

Status paged_prefetch(const void* ptr, size_t bytes, int device, void* stream) {
  if (!ptr || bytes == 0) return Status::kInvalidArgument;
  cudaMemLocation loc{};
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : device;
  // CUDA 13 signature: (ptr, bytes, location, flags, stream).
  if (cuda_ok(cudaMemPrefetchAsync(ptr, bytes, loc, 0, static_cast<cudaStream_t>(stream)), "cudaMemPrefetchAsync") !=
      Status::kOk) {
    return Status::kCudaError;
  }
  return Status::kOk;
}

}  // namespace qx

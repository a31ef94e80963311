// CUDA twins of the quant.h launchers (blockwise NF4/FP4 and 8-bit), designed bit-exact with quant_cpu.cpp on
// finite data: every rounding step is an explicit _rn intrinsic so that no FMA contraction or fast-math can
// change a bit. NaN results are NaN on both, but the GPU's arithmetic and conversions produce the canonical
// NaN where the CPU keeps the input's sign and payload (no bit-level promise for NaN).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "../common/cuda_convert.cuh"
#include "../common/cuda_status.cuh"
#include "codes.h"
#include "quant.h"

namespace qx {
namespace {

constexpr int kThreads = 256;  // every kernel: 8 warps, enough to hide latency at full occupancy
constexpr int kWarps = kThreads / 32;

// 4-bit dequantize: a warp takes a 512-byte segment of packed data (1024 elements) per step,
// one 16-byte load per lane.
constexpr int kSegBytes = 512;
constexpr int64_t kSegElems = 2 * kSegBytes;

enum : int { kModeNF4 = 0, kModeFP4 = 1, kMode8 = 2 };

// ---------------------------------------------------------------------------------------------
// Host-side tables (passed to kernels by value, then staged in shared memory)
// ---------------------------------------------------------------------------------------------
struct Code16 {
  float v[16];
};

// Sorted decision thresholds, padded with +inf so the branchless search may read one past the end.
struct Thresholds {
  float t[16];
  uint32_t fp4_rank_to_code;  // nibble r = low 3 bits of the FP4 code of the r-th smallest magnitude
};

float host_bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

struct HostTables {
  Code16 nf4, fp4;
  Thresholds nf4_thr, fp4_thr;
  HostTables() {
    for (int i = 0; i < 16; ++i) {
      nf4.v[i] = host_bits_to_float(kNF4Bits[i]);
      fp4.v[i] = host_bits_to_float(kFP4Bits[i]);
      nf4_thr.t[i] = fp4_thr.t[i] = std::numeric_limits<float>::infinity();
    }
    // Midpoints in double, rounded once to float32: the format's definition of the thresholds.
    for (int i = 0; i < 15; ++i)
      nf4_thr.t[i] = static_cast<float>((static_cast<double>(nf4.v[i]) + static_cast<double>(nf4.v[i + 1])) / 2.0);
    nf4_thr.fp4_rank_to_code = 0;
    int order[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    std::sort(order, order + 8, [&](int a, int b) { return fp4.v[a] < fp4.v[b]; });
    for (int i = 0; i < 7; ++i)
      fp4_thr.t[i] = static_cast<float>(
          (static_cast<double>(fp4.v[order[i]]) + static_cast<double>(fp4.v[order[i + 1]])) / 2.0);
    fp4_thr.fp4_rank_to_code = 0;
    for (int i = 0; i < 8; ++i) fp4_thr.fp4_rank_to_code |= static_cast<uint32_t>(order[i]) << (4 * i);
  }
};

const HostTables& host_tables() {
  static const HostTables t;
  return t;
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 8 consecutive elements from a 16-byte aligned address (32 bytes for float32).
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bfloat16 is the top half of a float32
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void store_one(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_one(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_one(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Same rules as quantize_nibble(): NaN -> 0, clamp, count thresholds strictly below (ties go low).
// The 4-step search reads the thresholds from shared memory: 16 floats sit in 16 distinct banks,
// so divergent indices never conflict.
template <int MODE>
__device__ __forceinline__ uint32_t encode_nibble(float s, const float* thr, uint32_t rank_to_code) {
  s = (s != s) ? 0.0f : s;
  s = fminf(1.0f, fmaxf(-1.0f, s));
  if constexpr (MODE == kModeNF4) {
    int i = (s > thr[7]) ? 8 : 0;
    i += (s > thr[i + 3]) ? 4 : 0;
    i += (s > thr[i + 1]) ? 2 : 0;
    i += (s > thr[i]) ? 1 : 0;
    return static_cast<uint32_t>(i);
  } else {
    const float m = fabsf(s);
    int r = (m > thr[3]) ? 4 : 0;
    r += (m > thr[r + 1]) ? 2 : 0;
    r += (m > thr[r]) ? 1 : 0;
    return ((rank_to_code >> (4 * r)) & 7u) | (s < 0.0f ? 8u : 0u);
  }
}

// quantize_grid8 (quant.h): bitsandbytes' 65536-point grid, then the number of map midpoints below the
// grid value, found by a branchless binary search over the 255 sorted midpoints in shared memory; every
// operation rounds as in the CPU table, so both give the same code.
__device__ __forceinline__ void grid8_midpoints(const float* code, float* mid, int tid, int nthreads) {
  for (int j = tid; j < 255; j += nthreads) mid[j] = __fmul_rn(0.5f, __fadd_rn(code[j], code[j + 1]));
}
__device__ __forceinline__ uint32_t grid8(const float* mid, float v) {
  v = fminf(1.0f, fmaxf(-1.0f, v));
  const int u = static_cast<int>(__fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(v, 1.0f), 0.5f), 65535.0f), 0.5f));
  const float val = __fadd_rn(-1.0f, __fdiv_rn(__fmul_rn(2.0f, static_cast<float>(u)), 65535.0f));
  int c = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) c += (c + step <= 255 && mid[c + step - 1] < val) ? step : 0;
  return static_cast<uint32_t>(c);
}

// ---------------------------------------------------------------------------------------------
// Blockwise quantize (4-bit and 8-bit). A thread owns 8 consecutive elements per chunk and CHUNKS
// chunks per tile (CHUNKS = 2 only for block size 4096, so a 256-thread CTA always covers whole
// blocks). The threads of one quantization block are a power-of-two group: shuffles reduce inside a
// warp, shared memory across warps when a block spans several.
// ---------------------------------------------------------------------------------------------
template <typename T, int MODE, int CHUNKS>
__global__ void __launch_bounds__(kThreads)
    quantize_blockwise_kernel(const T* __restrict__ A, int64_t n, int log2_bs, Thresholds thr,
                              const float* __restrict__ code8, uint8_t* __restrict__ out, float* __restrict__ absmax,
                              int* __restrict__ error_flag, bool vec_in, bool vec_out) {
  __shared__ float s_tab[256];
  __shared__ float s_warp_max[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if constexpr (MODE == kMode8) {
    grid8_midpoints(code8, s_tab, tid, kThreads);  // 8-bit: the map's midpoints (see grid8)
  } else if (tid == 0) {  // constant indices keep the parameter struct out of local memory
#pragma unroll
    for (int i = 0; i < 16; ++i) s_tab[i] = thr.t[i];
  }
  __syncthreads();

  constexpr int kChunkStride = kThreads * 8;
  constexpr int kTile = kChunkStride * CHUNKS;
  const int group = (1 << log2_bs) / (8 * CHUNKS);
  const int64_t ntiles = (n + kTile - 1) / kTile;
  bool bad = false;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t base = tile * kTile + static_cast<int64_t>(tid) * 8;
    float v[CHUNKS][8];
    float m = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t start = base + static_cast<int64_t>(c) * kChunkStride;
      if (vec_in && start + 8 <= n) {
        load8(A + start, v[c]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[c][j] = (start + j < n) ? to_float(A[start + j]) : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float a = fabsf(v[c][j]);
        bad |= !(a <= FLT_MAX);
        m = fmaxf(m, a);  // drops NaN like std::max(amax, NaN) in the CPU reference
      }
    }
    const int width = group < 32 ? group : 32;
    for (int off = 1; off < width; off <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (group > 32) {  // uniform across the CTA, so the barriers are safe
      if (lane == 0) s_warp_max[warp] = m;
      __syncthreads();
      const int wpg = group >> 5, w0 = warp & ~(wpg - 1);
      m = s_warp_max[w0];
      for (int w = 1; w < wpg; ++w) m = fmaxf(m, s_warp_max[w0 + w]);
      __syncthreads();  // s_warp_max is rewritten by the next tile
    }
    if ((tid & (group - 1)) == 0 && base < n) absmax[base >> log2_bs] = m;

    const bool zero = (m == 0.0f);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t start = base + static_cast<int64_t>(c) * kChunkStride;
      if (start >= n) continue;
      const bool full = start + 8 <= n;
      if constexpr (MODE == kMode8) {
        uint32_t q[2] = {0u, 0u};
        const float r = __frcp_rn(m);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (start + j < n && !zero) q[j >> 2] |= grid8(s_tab, __fmul_rn(v[c][j], r)) << (8 * (j & 3));
        }
        if (vec_out && full) {
          *reinterpret_cast<uint2*>(out + start) = make_uint2(q[0], q[1]);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (start + j < n) out[start + j] = static_cast<uint8_t>(q[j >> 2] >> (8 * (j & 3)));
        }
      } else {
        const float r = __frcp_rn(m);
        uint32_t word = 0;  // element 2j -> high nibble of byte j; bytes little-endian in the word
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // past the end v is 0.0: an odd tail's low nibble is the code of 0.0
          const float s = zero ? 0.0f : __fmul_rn(v[c][j], r);
          word |= encode_nibble<MODE>(s, s_tab, thr.fp4_rank_to_code) << (8 * (j >> 1) + ((j & 1) ? 0 : 4));
        }
        if (vec_out && full) {
          *reinterpret_cast<uint32_t*>(out + start / 2) = word;
        } else {
#pragma unroll
          for (int b = 0; b < 4; ++b)
            if (start + 2 * b < n) out[start / 2 + b] = static_cast<uint8_t>(word >> (8 * b));
        }
      }
    }
  }
  if (__any_sync(0xffffffffu, bad) && lane == 0) *error_flag = 1;
}

// 8-bit quantize for block sizes the tiled kernel cannot split (not a power of two >= 64): one warp per
// block, two passes (the second mostly hits L1/L2). The CPU reference accepts any block size > 0.
__global__ void __launch_bounds__(kThreads)
    quantize_8bit_generic_kernel(const float* __restrict__ A, int64_t n, int64_t bs, const float* __restrict__ code,
                                 uint8_t* __restrict__ out, float* __restrict__ absmax, int* __restrict__ error_flag) {
  __shared__ float s_mid[255];
  grid8_midpoints(code, s_mid, threadIdx.x, kThreads);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t nblocks = (n + bs - 1) / bs;
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5; b < nblocks; b += nwarps) {
    const int64_t e0 = b * bs, e1 = bs < n - e0 ? e0 + bs : n;
    float m = 0.0f;
    bool bad = false;
    for (int64_t i = e0 + lane; i < e1; i += 32) {
      const float a = fabsf(A[i]);
      bad |= !(a <= FLT_MAX);
      m = fmaxf(m, a);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0) absmax[b] = m;
    if (__any_sync(0xffffffffu, bad) && lane == 0) *error_flag = 1;
    const bool zero = (m == 0.0f);
    const float r = __frcp_rn(m);
    for (int64_t i = e0 + lane; i < e1; i += 32)
      out[i] = zero ? uint8_t(0) : static_cast<uint8_t>(grid8(s_mid, __fmul_rn(A[i], r)));
  }
}

// ---------------------------------------------------------------------------------------------
// 4-bit dequantize.
// Per step a warp owns a 512-byte segment: lane l loads bytes [16l, 16l+16) with one 16-byte load
// (32 elements, always inside one quantization block since blocks are >= 32 elements and 32-aligned)
// and computes that block's scale once. The segment is staged in shared memory and re-read transposed
// so that each 16-byte store of the warp covers 512 contiguous output bytes: stores coalesce fully.
// The next segment's load and scale are issued before the current one is expanded.
// ---------------------------------------------------------------------------------------------
struct ScaleArgs {
  const float* absmax;
  const uint8_t* qabsmax;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int64_t nested_bs;
  int nested_shift;  // log2(nested_bs) when it is a power of two, else -1 (64-bit division)
};

template <bool DQ>
__device__ __forceinline__ float block_scale(const ScaleArgs& sc, const float* s_ncode, int64_t b) {
  if constexpr (DQ) {
    const int64_t nb = sc.nested_shift >= 0 ? (b >> sc.nested_shift) : (b / sc.nested_bs);
    // Separate multiply and add: bitsandbytes rounds twice, an FMA would not.
    return __fadd_rn(__fmul_rn(s_ncode[__ldg(sc.qabsmax + b)], __ldg(sc.nested_absmax + nb)), sc.offset);
  } else {
    return __ldg(sc.absmax + b);
  }
}

__device__ __forceinline__ uint4 load16(const uint8_t* p, bool aligned) {
  if (aligned) return __ldg(reinterpret_cast<const uint4*>(p));
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = static_cast<uint32_t>(p[4 * i]) | (static_cast<uint32_t>(p[4 * i + 1]) << 8) |
           (static_cast<uint32_t>(p[4 * i + 2]) << 16) | (static_cast<uint32_t>(p[4 * i + 3]) << 24);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Expands a staged segment; `out` points at the segment's first element (16-byte aligned).
template <typename OutT>
__device__ __forceinline__ void emit_segment(const uint4* data, const float* scale, const float* code, OutT* out,
                                             int lane) {
  if constexpr (sizeof(OutT) == 4) {
    // float32: a 16-byte store is 4 elements = 2 packed bytes; lane l takes bytes 64k + 2l.
    const uint16_t* h = reinterpret_cast<const uint16_t*>(data);
    float4* o = reinterpret_cast<float4*>(out);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t x = h[32 * k + lane];
      const float a = scale[4 * k + (lane >> 3)];
      float4 r;
      r.x = __fmul_rn(code[(x >> 4) & 15u], a);
      r.y = __fmul_rn(code[x & 15u], a);
      r.z = __fmul_rn(code[(x >> 12) & 15u], a);
      r.w = __fmul_rn(code[(x >> 8) & 15u], a);
      o[32 * k + lane] = r;
    }
  } else {
    // 16-bit: a 16-byte store is 8 elements = 4 packed bytes; lane l takes bytes 128k + 4l.
    const uint32_t* w = reinterpret_cast<const uint32_t*>(data);
    uint4* o = reinterpret_cast<uint4*>(out);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t x = w[32 * k + lane];
      const float a = scale[8 * k + (lane >> 2)];
      uint4 r;
      r.x = pack_pair<OutT>(__fmul_rn(code[(x >> 4) & 15u], a), __fmul_rn(code[x & 15u], a));
      r.y = pack_pair<OutT>(__fmul_rn(code[(x >> 12) & 15u], a), __fmul_rn(code[(x >> 8) & 15u], a));
      r.z = pack_pair<OutT>(__fmul_rn(code[(x >> 20) & 15u], a), __fmul_rn(code[(x >> 16) & 15u], a));
      r.w = pack_pair<OutT>(__fmul_rn(code[(x >> 28) & 15u], a), __fmul_rn(code[(x >> 24) & 15u], a));
      o[32 * k + lane] = r;
    }
  }
}

template <typename OutT, bool DQ>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, ScaleArgs sc, Code16 code, int64_t n, int log2_bs,
                           OutT* __restrict__ out, bool vec, bool packed16) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[DQ ? 256 : 1];
  __shared__ uint4 s_data[kWarps][32];
  __shared__ float s_scale[kWarps][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {  // constant indices: a run-time index would copy the parameter struct to local memory
#pragma unroll
    for (int i = 0; i < 16; ++i) s_code[i] = code.v[i];
  }
  if constexpr (DQ) {
    for (int i = tid; i < 256; i += kThreads) s_ncode[i] = __ldg(sc.nested_code + i);
  }
  __syncthreads();

  const int64_t nseg = (n + kSegElems - 1) / kSegElems;
  const int64_t nfull = vec ? n / kSegElems : 0;  // segments with all 1024 elements in range
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  int64_t seg = static_cast<int64_t>(blockIdx.x) * kWarps + warp;

  uint4 pre = make_uint4(0u, 0u, 0u, 0u);
  float pre_scale = 0.0f;
  auto fetch = [&](int64_t s) {
    const int64_t byte0 = s * kSegBytes + 16 * lane;
    pre = load16(packed + byte0, packed16);
    pre_scale = block_scale<DQ>(sc, s_ncode, (2 * byte0) >> log2_bs);
  };
  if (seg < nfull) fetch(seg);

  for (; seg < nseg; seg += stride) {
    if (seg < nfull) {
      s_data[warp][lane] = pre;
      s_scale[warp][lane] = pre_scale;
      if (seg + stride < nfull) fetch(seg + stride);
      __syncwarp();
      emit_segment<OutT>(s_data[warp], s_scale[warp], s_code, out + seg * kSegElems, lane);
      __syncwarp();  // the staging slot is overwritten next step
    } else {
      // The ragged tail, or every segment when `out` is not 16-byte aligned: one element per lane.
      const int64_t base = seg * kSegElems;
      for (int e = lane; e < kSegElems; e += 32) {
        const int64_t i = base + e;
        if (i >= n) break;
        const uint32_t byte = packed[i >> 1];
        const uint32_t nib = (i & 1) ? (byte & 15u) : (byte >> 4);
        store_one(out + i, __fmul_rn(s_code[nib], block_scale<DQ>(sc, s_ncode, i >> log2_bs)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 8-bit dequantize: a thread expands 16 output bytes per step (4 float32 or 8 half/bfloat16), so both
// the byte loads and the 16-byte stores are contiguous across the warp.
// ---------------------------------------------------------------------------------------------
template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    dequantize_8bit_kernel(const uint8_t* __restrict__ A, const float* __restrict__ absmax,
                           const float* __restrict__ code, int64_t n, int64_t bs, int log2_bs, OutT* __restrict__ out,
                           bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(OutT));
  __shared__ float s_code[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_code[i] = __ldg(code + i);
  __syncthreads();
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t done = 0;
  if (vec) {  // power-of-two block size >= V, so a group of V never straddles two blocks
    const int64_t ngroups = n / V;
    for (int64_t g = gtid; g < ngroups; g += nthreads) {
      const int64_t i = g * V;
      const float a = __ldg(absmax + (i >> log2_bs));
      if constexpr (V == 4) {
        const uint32_t w = __ldg(reinterpret_cast<const unsigned int*>(A + i));
        float4 r;
        r.x = __fmul_rn(s_code[w & 255u], a);
        r.y = __fmul_rn(s_code[(w >> 8) & 255u], a);
        r.z = __fmul_rn(s_code[(w >> 16) & 255u], a);
        r.w = __fmul_rn(s_code[w >> 24], a);
        *reinterpret_cast<float4*>(out + i) = r;
      } else {
        const uint2 w = __ldg(reinterpret_cast<const uint2*>(A + i));
        uint4 r;
        r.x = pack_pair<OutT>(__fmul_rn(s_code[w.x & 255u], a), __fmul_rn(s_code[(w.x >> 8) & 255u], a));
        r.y = pack_pair<OutT>(__fmul_rn(s_code[(w.x >> 16) & 255u], a), __fmul_rn(s_code[w.x >> 24], a));
        r.z = pack_pair<OutT>(__fmul_rn(s_code[w.y & 255u], a), __fmul_rn(s_code[(w.y >> 8) & 255u], a));
        r.w = pack_pair<OutT>(__fmul_rn(s_code[(w.y >> 16) & 255u], a), __fmul_rn(s_code[w.y >> 24], a));
        *reinterpret_cast<uint4*>(out + i) = r;
      }
    }
    done = ngroups * V;
  }
  for (int64_t i = done + gtid; i < n; i += nthreads) {
    const int64_t b = log2_bs >= 0 ? (i >> log2_bs) : (i / bs);
    store_one(out + i, __fmul_rn(s_code[A[i]], __ldg(absmax + b)));
  }
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------
int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

bool is_aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

bool valid_dtype(DType t) { return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16; }

// CTAs that fit on the current device at once: grids are capped there and grid-stride over the rest.
// Cached per (kernel, device) because the occupancy query costs more than launching a small kernel.
Status resident_ctas(const void* kernel, int* out) {
  struct Entry {
    const void* kernel;
    int device;
    int ctas;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  int dev = 0;
  if (cuda_ok(cudaGetDevice(&dev), "cudaGetDevice") != Status::kOk) return Status::kCudaError;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const Entry& e : cache) {
      if (e.kernel == kernel && e.device == dev) {
        *out = e.ctas;
        return Status::kOk;
      }
    }
  }
  int sms = 0, per_sm = 0;
  if (cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute(SM count)") !=
          Status::kOk ||
      cuda_ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0),
              "cudaOccupancyMaxActiveBlocksPerMultiprocessor") != Status::kOk)
    return Status::kCudaError;
  const int ctas = std::max(1, sms) * std::max(1, per_sm);
  {
    std::lock_guard<std::mutex> lock(mu);
    cache.push_back({kernel, dev, ctas});
  }
  *out = ctas;
  return Status::kOk;
}

// Also the entry check of every launch: an error left pending by an earlier CUDA call is reported first.
Status grid_size(const void* kernel, int64_t work_ctas, int* grid) {
  if (cuda_no_pending() != Status::kOk) return Status::kCudaError;
  int limit = 1;
  if (resident_ctas(kernel, &limit) != Status::kOk) return Status::kCudaError;
  *grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work_ctas, limit)));
  return Status::kOk;
}

template <typename T, int MODE, int CHUNKS>
Status launch_quantize(const void* A, int64_t n, int log2_bs, const Thresholds& thr, const float* code8,
                       uint8_t* out, float* absmax, int* error_flag, cudaStream_t stream) {
  auto kernel = quantize_blockwise_kernel<T, MODE, CHUNKS>;
  constexpr int64_t kTile = int64_t{kThreads} * 8 * CHUNKS;
  int grid = 1;
  if (grid_size(reinterpret_cast<const void*>(kernel), (n + kTile - 1) / kTile, &grid) != Status::kOk)
    return Status::kCudaError;
  const T* a = static_cast<const T*>(A);
  const bool vec_in = is_aligned(A, 16);
  const bool vec_out = is_aligned(out, MODE == kMode8 ? 8 : 4);
  kernel<<<grid, kThreads, 0, stream>>>(a, n, log2_bs, thr, code8, out, absmax, error_flag, vec_in, vec_out);
  return launch_status(MODE == kMode8 ? "quantize_blockwise_kernel (8-bit)" : "quantize_blockwise_kernel (4-bit)");
}

template <typename T, int MODE>
Status dispatch_quantize_chunks(const void* A, int64_t n, int log2_bs, const Thresholds& thr, const float* code8,
                                uint8_t* out, float* absmax, int* error_flag, cudaStream_t stream) {
  // A 256-thread tile holds 2048 elements at 8 per thread; 4096-element blocks take two chunks each.
  if (log2_bs > 11)
    return launch_quantize<T, MODE, 2>(A, n, log2_bs, thr, code8, out, absmax, error_flag, stream);
  return launch_quantize<T, MODE, 1>(A, n, log2_bs, thr, code8, out, absmax, error_flag, stream);
}

template <typename OutT, bool DQ>
Status launch_dequantize_4bit(const uint8_t* packed, const ScaleArgs& sc, const Code16& code, int64_t n,
                              int log2_bs, void* out, cudaStream_t stream) {
  auto kernel = dequantize_4bit_kernel<OutT, DQ>;
  const int64_t nseg = (n + kSegElems - 1) / kSegElems;
  int grid = 1;
  if (grid_size(reinterpret_cast<const void*>(kernel), (nseg + kWarps - 1) / kWarps, &grid) != Status::kOk)
    return Status::kCudaError;
  const bool vec = is_aligned(out, 16), packed16 = is_aligned(packed, 16);
  kernel<<<grid, kThreads, 0, stream>>>(packed, sc, code, n, log2_bs, static_cast<OutT*>(out), vec, packed16);
  return launch_status("dequantize_4bit_kernel");
}

template <typename OutT>
Status launch_dequantize_8bit(const uint8_t* A, const float* absmax, const float* code, int64_t n, int64_t bs,
                              void* out, cudaStream_t stream) {
  auto kernel = dequantize_8bit_kernel<OutT>;
  constexpr int V = 16 / static_cast<int>(sizeof(OutT));
  int grid = 1;
  const int64_t per_cta = int64_t{kThreads} * V;
  if (grid_size(reinterpret_cast<const void*>(kernel), (n + per_cta - 1) / per_cta, &grid) != Status::kOk)
    return Status::kCudaError;
  const int log2_bs = log2_exact(bs);
  const bool vec = log2_bs >= 0 && bs >= V && is_aligned(A, V) && is_aligned(out, 16);
  kernel<<<grid, kThreads, 0, stream>>>(A, absmax, code, n, bs, log2_bs, static_cast<OutT*>(out), vec);
  return launch_status("dequantize_8bit_kernel");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
Status quantize_4bit_cuda(const void* A, DType dtype, int64_t n, int64_t blocksize, QuantType qt, uint8_t* packed,
                          float* absmax, int* error_flag, void* stream) {
  if (n < 0 || !valid_blocksize_4bit(blocksize)) return Status::kInvalidArgument;
  if (qt != QuantType::kNF4 && qt != QuantType::kFP4) return Status::kInvalidArgument;
  if (!valid_dtype(dtype)) return Status::kUnsupported;
  if (n == 0) return Status::kOk;
  if (!A || !packed || !absmax || !error_flag) return Status::kInvalidArgument;
  const int log2_bs = log2_exact(blocksize);
  if (log2_bs < 5) return Status::kInvalidArgument;
  const HostTables& t = host_tables();
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool nf4 = qt == QuantType::kNF4;
  const Thresholds& thr = nf4 ? t.nf4_thr : t.fp4_thr;
  switch (dtype) {
    case DType::kFloat32:
      return nf4 ? dispatch_quantize_chunks<float, kModeNF4>(A, n, log2_bs, thr, nullptr, packed, absmax, error_flag, st)
                 : dispatch_quantize_chunks<float, kModeFP4>(A, n, log2_bs, thr, nullptr, packed, absmax, error_flag, st);
    case DType::kFloat16:
      return nf4
                 ? dispatch_quantize_chunks<__half, kModeNF4>(A, n, log2_bs, thr, nullptr, packed, absmax, error_flag, st)
                 : dispatch_quantize_chunks<__half, kModeFP4>(A, n, log2_bs, thr, nullptr, packed, absmax, error_flag, st);
    case DType::kBFloat16:
      return nf4 ? dispatch_quantize_chunks<__nv_bfloat16, kModeNF4>(A, n, log2_bs, thr, nullptr, packed, absmax,
                                                                     error_flag, st)
                 : dispatch_quantize_chunks<__nv_bfloat16, kModeFP4>(A, n, log2_bs, thr, nullptr, packed, absmax,
                                                                     error_flag, st);
  }
  return Status::kUnsupported;
}

Status dequantize_4bit_cuda(const uint8_t* packed, const AbsmaxView& scales, int64_t n, int64_t blocksize,
                            QuantType qt, void* out, DType out_dtype, void* stream) {
  if (n < 0 || !valid_blocksize_4bit(blocksize)) return Status::kInvalidArgument;
  if (qt != QuantType::kNF4 && qt != QuantType::kFP4) return Status::kInvalidArgument;
  if (!valid_dtype(out_dtype)) return Status::kUnsupported;
  if (n == 0) return Status::kOk;
  if (!packed || !out) return Status::kInvalidArgument;
  const bool dq = scales.double_quant();
  if (dq ? (!scales.nested_absmax || !scales.nested_code || scales.nested_blocksize <= 0) : !scales.absmax)
    return Status::kInvalidArgument;
  const int log2_bs = log2_exact(blocksize);
  if (log2_bs < 5) return Status::kInvalidArgument;  // the vector path needs 32-element-aligned blocks
  ScaleArgs sc;
  sc.absmax = scales.absmax;
  sc.qabsmax = scales.qabsmax;
  sc.nested_absmax = scales.nested_absmax;
  sc.nested_code = scales.nested_code;
  sc.offset = scales.offset;
  sc.nested_bs = dq ? scales.nested_blocksize : 1;
  sc.nested_shift = log2_exact(sc.nested_bs);
  const HostTables& t = host_tables();
  const Code16& code = qt == QuantType::kNF4 ? t.nf4 : t.fp4;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case DType::kFloat32:
      return dq ? launch_dequantize_4bit<float, true>(packed, sc, code, n, log2_bs, out, st)
                : launch_dequantize_4bit<float, false>(packed, sc, code, n, log2_bs, out, st);
    case DType::kFloat16:
      return dq ? launch_dequantize_4bit<__half, true>(packed, sc, code, n, log2_bs, out, st)
                : launch_dequantize_4bit<__half, false>(packed, sc, code, n, log2_bs, out, st);
    case DType::kBFloat16:
      return dq ? launch_dequantize_4bit<__nv_bfloat16, true>(packed, sc, code, n, log2_bs, out, st)
                : launch_dequantize_4bit<__nv_bfloat16, false>(packed, sc, code, n, log2_bs, out, st);
  }
  return Status::kUnsupported;
}

// Block sizes: any value > 0, as quantize_8bit_cpu accepts; powers of two >= 64 take the tiled kernel.
Status quantize_8bit_cuda(const float* A, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                          float* absmax, int* error_flag, void* stream) {
  if (n < 0 || blocksize <= 0) return Status::kInvalidArgument;
  if (n == 0) return Status::kOk;
  if (!A || !code || !out || !absmax || !error_flag) return Status::kInvalidArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (valid_blocksize_8bit(blocksize)) {
    const int log2_bs = log2_exact(blocksize);
    if (log2_bs >= 6)
      return dispatch_quantize_chunks<float, kMode8>(A, n, log2_bs, host_tables().nf4_thr, code, out, absmax,
                                                     error_flag, st);
  }
  auto kernel = quantize_8bit_generic_kernel;
  int grid = 1;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  if (grid_size(reinterpret_cast<const void*>(kernel), (nblocks + kWarps - 1) / kWarps, &grid) != Status::kOk)
    return Status::kCudaError;
  kernel<<<grid, kThreads, 0, st>>>(A, n, blocksize, code, out, absmax, error_flag);
  return launch_status("quantize_8bit_generic_kernel");
}

Status dequantize_8bit_cuda(const uint8_t* A, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                            void* out, DType out_dtype, void* stream) {
  if (n < 0 || blocksize <= 0) return Status::kInvalidArgument;
  if (!valid_dtype(out_dtype)) return Status::kUnsupported;
  if (n == 0) return Status::kOk;
  if (!A || !absmax || !code || !out) return Status::kInvalidArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case DType::kFloat32: return launch_dequantize_8bit<float>(A, absmax, code, n, blocksize, out, st);
    case DType::kFloat16: return launch_dequantize_8bit<__half>(A, absmax, code, n, blocksize, out, st);
    case DType::kBFloat16: return launch_dequantize_8bit<__nv_bfloat16>(A, absmax, code, n, blocksize, out, st);
  }
  return Status::kUnsupported;
}

}  // namespace qx

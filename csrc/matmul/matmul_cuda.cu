// CUDA 4-bit matmul: out[M, N] = x[M, K] @ Wdq^T with W a packed NF4/FP4 [N, K] weight (matmul.h).
//
// Wdq[n, k] = code[nibble(e)] * scale(e / blocksize) with e = n*K + k, rounded once in float32 exactly as
// the dequantize kernels do (this file is built with --fmad=false; the dot products use explicit
// __fmaf_rn). Two kernels:
//  * gemv (M <= 4): memory bound. A warp owns 4 output rows; each lane streams 16-byte chunks (32 weights,
//    always inside one quantization block) of all 4 rows at once, so every x value read from shared memory
//    serves 4 rows, and the next chunk's loads are in flight while the current one is decoded. x is staged
//    once per CTA in shared memory as float32 (XOR-swizzled so the lanes' 16-byte reads never conflict).
//    Small N splits K over the warps of a CTA (reduced through shared memory) to keep enough bytes in flight.
//  * small GEMM (M <= 64): a CTA computes a [M, 64] output tile, streaming K in tiles: packed weights and x
//    arrive by cp.async (3 stages), the weight tile is dequantized into shared memory (float32 Wdq rounded
//    to x's dtype), then multiplied with tensor cores (wmma m16n16k16, float accumulate) for float16 /
//    bfloat16 x, or with CUDA-core FMAs in float32 for float32 x (float32-accurate, no TF32).
// Shapes need no alignment: rows of W may start mid-byte and blocks may straddle rows; those cases (K not a
// multiple of 32, unaligned pointers) take slower element-wise paths of the same kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common/cuda_convert.cuh"
#include "../common/cuda_status.cuh"
#include "../quant/codes.h"
#include "matmul.h"

namespace qx {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Host-side parameters
// ---------------------------------------------------------------------------------------------
struct Code16 {
  float v[16];
};

Code16 make_code16(QuantType qt) {
  Code16 c;
  const uint32_t* bits = qt == QuantType::kNF4 ? kNF4Bits : kFP4Bits;
  for (int i = 0; i < 16; ++i) std::memcpy(&c.v[i], &bits[i], sizeof(float));
  return c;
}

struct ScaleArgs {
  const float* absmax;         // plain scales
  const uint8_t* qabsmax;      // double-quantized: index into nested_code
  const float* nested_absmax;  // [ceil(nblocks / nested_bs)]
  const float* nested_code;    // [256]
  float offset;
  int64_t nested_bs;
  int nested_shift;  // log2(nested_bs) when it is a power of two, else -1
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
// One x element from global memory, read-only path.
__device__ __forceinline__ float ldg_x(const float* p) { return __ldg(p); }
__device__ __forceinline__ float ldg_x(const __half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ float ldg_x(const __nv_bfloat16* p) {
  return __uint_as_float(static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}

// Four consecutive x elements from global memory; `vec`: p is 16-byte (float) / 8-byte (16-bit) aligned.
__device__ __forceinline__ float4 ldg_x4(const float* p, bool vec) {
  if (vec) return __ldg(reinterpret_cast<const float4*>(p));
  return make_float4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
}
template <typename T>
__device__ __forceinline__ float4 ldg_x4(const T* p, bool vec) {
  if (vec) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    float4 r;
    if constexpr (std::is_same<T, __half>::value) {
      r.x = __half2float(__ushort_as_half(static_cast<unsigned short>(u.x & 0xffffu)));
      r.y = __half2float(__ushort_as_half(static_cast<unsigned short>(u.x >> 16)));
      r.z = __half2float(__ushort_as_half(static_cast<unsigned short>(u.y & 0xffffu)));
      r.w = __half2float(__ushort_as_half(static_cast<unsigned short>(u.y >> 16)));
    } else {
      r.x = __uint_as_float(u.x << 16);
      r.y = __uint_as_float(u.x & 0xffff0000u);
      r.z = __uint_as_float(u.y << 16);
      r.w = __uint_as_float(u.y & 0xffff0000u);
    }
    return r;
  }
  return make_float4(ldg_x(p), ldg_x(p + 1), ldg_x(p + 2), ldg_x(p + 3));
}

// 16 bytes of x (4 float32 or 8 16-bit values) as float32; p 16-byte aligned.
template <typename T>
__device__ __forceinline__ void ldg16_as_float(const T* p, float (&f)[16 / sizeof(T)]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same<T, float>::value) {
      f[i] = __uint_as_float(w[i]);
    } else if constexpr (std::is_same<T, __half>::value) {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    } else {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}

// Output element (odt as int: 0 float32, 1 float16, 2 bfloat16), one RNE rounding.
__device__ __forceinline__ void store_out(void* out, int odt, int64_t i, float v) {
  if (odt == static_cast<int>(DType::kFloat32)) {
    static_cast<float*>(out)[i] = v;
  } else if (odt == static_cast<int>(DType::kFloat16)) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
}

// Streaming 16-byte load of packed weights (read once: keep them out of L1).
__device__ __forceinline__ uint4 ldg_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// A block's scale in two halves: the loads (issued early, with the weights) and the decode.
struct RawScale {
  float a;     // plain: the absmax; double-quantized: nested_absmax[b / nested_bs]
  uint32_t q;  // double-quantized: qabsmax[b]
};

// kPow2Nested: the caller guarantees nested_bs is a power of two (the fast paths; bitsandbytes uses 256).
template <bool DQ, bool kPow2Nested = false>
__device__ __forceinline__ RawScale load_scale(const ScaleArgs& sc, int64_t b) {
  RawScale r;
  if constexpr (DQ) {
    const int64_t nb =
        (kPow2Nested || sc.nested_shift >= 0) ? (b >> sc.nested_shift) : (b / sc.nested_bs);
    r.q = __ldg(sc.qabsmax + b);
    r.a = __ldg(sc.nested_absmax + nb);
  } else {
    r.a = __ldg(sc.absmax + b);
    r.q = 0u;
  }
  return r;
}

template <bool DQ>
__device__ __forceinline__ float decode_scale(const RawScale& r, const float* s_ncode, float offset) {
  if constexpr (DQ) {
    // Two roundings (multiply, then add), as bitsandbytes and the CPU kernels do.
    return __fadd_rn(__fmul_rn(s_ncode[r.q], r.a), offset);
  } else {
    return r.a;
  }
}

// Nibble decoding: per packed word, 4 * nibble of every byte in two masks (one shift + one LOP3 each),
// then one PRMT per element yields the byte offset of its code in the shared 16-entry table.
// Element 2j of a byte is its high nibble.
struct NibbleOffsets {
  uint32_t hi4, lo4;  // byte j: 4 * (high / low) nibble of byte j
};
__device__ __forceinline__ NibbleOffsets nibble_offsets(uint32_t w) {
  return NibbleOffsets{(w >> 2) & 0x3c3c3c3cu, (w << 2) & 0x3c3c3c3cu};
}
__device__ __forceinline__ float code_at(const float* s_code, uint32_t offsets, int byte) {
  const uint32_t off = __byte_perm(offsets, 0u, 0x4440u | static_cast<uint32_t>(byte));
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(s_code) + off);
}

template <bool DQ>
__device__ __forceinline__ void init_tables(const Code16& code, const ScaleArgs& sc, float* s_code, float* s_ncode) {
  if (threadIdx.x == 0) {  // constant indices: a run-time index would copy the parameter struct to local memory
#pragma unroll
    for (int i = 0; i < 16; ++i) s_code[i] = code.v[i];
  }
  if constexpr (DQ) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_ncode[i] = __ldg(sc.nested_code + i);
  }
}

// Reduces VP per-lane partial sums (VP a power of two <= 32) across the warp with VP - 1 + 5 - log2(VP)
// shuffles: each halving step trades half of the values with the partner lane. On return a[0] of lane L
// holds the warp total of value index (L >> (5 - log2 VP)); every lane of that group holds the same total.
template <int VP>
__device__ __forceinline__ void warp_reduce_multi(float (&a)[VP], int lane) {
  static_assert(VP >= 1 && VP <= 32 && (VP & (VP - 1)) == 0, "VP must be a power of two <= 32");
  constexpr int kSteps = VP == 1 ? 0 : VP == 2 ? 1 : VP == 4 ? 2 : VP == 8 ? 3 : VP == 16 ? 4 : 5;
  // Linear loops with constant trip counts only: every index below folds to a constant once unrolled
  // (a run-time index would move `a` to local memory).
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int h = VP >> (step + 1);
    const int off = 16 >> step;
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int j = 0; j < (VP > 1 ? VP / 2 : 1); ++j) {
      if (j < h) {
        const float send = upper ? a[j] : a[j + h];
        const float keep = upper ? a[j + h] : a[j];
        a[j] = __fadd_rn(keep, __shfl_xor_sync(kFullMask, send, off));
      }
    }
  }
#pragma unroll
  for (int step = kSteps; step < 5; ++step) a[0] = __fadd_rn(a[0], __shfl_xor_sync(kFullMask, a[0], 16 >> step));
}

template <int V>
struct Pow2Ceil {
  static constexpr int value = V <= 1 ? 1 : V <= 2 ? 2 : V <= 4 ? 4 : V <= 8 ? 8 : V <= 16 ? 16 : 32;
};

// ---------------------------------------------------------------------------------------------
// GEMV, fast path: K % 32 == 0 and packed 16-byte aligned (every row's bytes are 16-byte aligned).
//
// A CTA of 8 warps; warps form G = 8 / KS groups of KS warps; a group owns R = 4 consecutive rows and its
// KS warps split the row's 16-byte chunks (chunk c = 32 * t + lane, t = kslot, kslot + KS, ...). Work
// items (a CTA's 4 * G rows) are grid-strided; the next item's loads are issued before the current one is
// decoded, across item boundaries too.
// ---------------------------------------------------------------------------------------------
constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvRows = 4;

template <typename XT, int M, bool DQ, bool XS>
__global__ void __launch_bounds__(kGemvThreads, XS ? (M == 1 ? 3 : 2) : 1)
    gemv4_fast_kernel(const uint8_t* __restrict__ packed, ScaleArgs sc, Code16 code, const XT* __restrict__ x,
                      int64_t N, int64_t K, int log2_bs, int ks_log2, bool x_vec, void* __restrict__ out, int odt) {
  constexpr int R = kGemvRows;
  constexpr int V = R * M;
  constexpr int VP = Pow2Ceil<V>::value;
  extern __shared__ __align__(16) unsigned char qx_dyn_smem[];
  __shared__ float s_code[16];
  __shared__ float s_ncode[DQ ? 256 : 1];
  __shared__ float s_red[kGemvWarps][VP];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  const int KS = 1 << ks_log2, G = kGemvWarps >> ks_log2;
  const int gi = warp >> ks_log2, kslot = warp & (KS - 1);
  const int64_t kc = K >> 5;               // 16-byte chunks per row
  const int64_t nsteps = (kc + 31) >> 5;   // warp steps per row
  const int64_t row_bytes = K >> 1;
  const int64_t rows_per_item = static_cast<int64_t>(R) * G;
  const int64_t nitems = (N + rows_per_item - 1) / rows_per_item;
  const int sw = lane & 7;
  const int kq = static_cast<int>(K >> 2);  // float4 per staged x row (used when XS)
  // x as float32, [M][K], float4 f of each row stored at f ^ ((f >> 3) & 7): lane l reads the 8 float4 of
  // its chunk in the order i ^ (l & 7), so the 8 lanes of each quarter-warp hit 8 distinct bank groups.
  float4* s_x4 = reinterpret_cast<float4*>(qx_dyn_smem);

  uint4 nxt[R];
  RawScale nsc[R];
  // Out-of-range rows / chunks load chunk 0 of row 0 instead (always valid) and are never used: no
  // branches. Addresses advance row by row from one 64-bit base per fetch.
  auto fetch = [&](int64_t item, int64_t t) {
    const int64_t c = t * 32 + lane;
    const int64_t n0 = item * rows_per_item + gi * R;
    const bool c_ok = c < kc;
    const uint8_t* p = packed + n0 * row_bytes + 16 * c;
    int64_t e = n0 * K + 32 * c;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool ok = c_ok && n0 + r < N;
      nxt[r] = ldg_stream16(ok ? p : packed);
      nsc[r] = load_scale<DQ, true>(sc, (ok ? e : int64_t{0}) >> log2_bs);
      p += row_bytes;
      e += K;
    }
  };

  int64_t item = blockIdx.x;
  if (item < nitems && kslot < nsteps) fetch(item, kslot);  // the first weights load while x is staged

  if constexpr (XS) {
    if (x_vec) {  // 16-byte loads, several in flight per thread (K % 32 == 0 here)
      constexpr int E = 16 / static_cast<int>(sizeof(XT));
      const int per_row = static_cast<int>(K) / E;
      for (int m = 0; m < M; ++m) {
#pragma unroll 4
        for (int v = tid; v < per_row; v += kGemvThreads) {
          float f[E];
          ldg16_as_float(x + m * K + static_cast<int64_t>(v) * E, f);
#pragma unroll
          for (int q = 0; q < E / 4; ++q) {
            const int f4 = v * (E / 4) + q;
            s_x4[m * kq + (f4 ^ ((f4 >> 3) & 7))] = make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
          }
        }
      }
    } else {
      float* s_xf = reinterpret_cast<float*>(qx_dyn_smem);
      for (int m = 0; m < M; ++m) {
#pragma unroll 4
        for (int k = tid; k < K; k += kGemvThreads) {
          const int f4 = k >> 2;
          s_xf[m * static_cast<int>(K) + ((f4 ^ ((f4 >> 3) & 7)) << 2) + (k & 3)] = ldg_x(x + m * K + k);
        }
      }
    }
  }
  init_tables<DQ>(code, sc, s_code, s_ncode);
  __syncthreads();  // tables and x

  for (; item < nitems; item += gridDim.x) {  // uniform across the CTA: the barriers below are safe
    float acc[VP];
#pragma unroll
    for (int j = 0; j < VP; ++j) acc[j] = 0.0f;

    for (int64_t t = kslot; t < nsteps; t += KS) {
      uint4 cur[R];
      RawScale csc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) cur[r] = nxt[r], csc[r] = nsc[r];
      {  // prefetch the next (item, step) of this warp
        int64_t nt = t + KS, ni = item;
        if (nt >= nsteps) nt = kslot, ni = item + gridDim.x;
        if (ni < nitems) fetch(ni, nt);
      }
      const int64_t c = t * 32 + lane;
      if (c < kc) {
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = decode_scale<DQ>(csc[r], s_ncode, sc.offset);
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {  // one 32-bit word = 8 elements of each row
          NibbleOffsets no[R];
#pragma unroll
          for (int r = 0; r < R; ++r)
            no[r] = nibble_offsets(wi == 0 ? cur[r].x : wi == 1 ? cur[r].y : wi == 2 ? cur[r].z : cur[r].w);
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // 4 elements per sub-step: bytes 2h, 2h + 1 of the word
            const int i = 2 * wi + h;
            float4 xv[M];
#pragma unroll
            for (int m = 0; m < M; ++m) {
              if constexpr (XS) {
                xv[m] = s_x4[m * kq + static_cast<int>(c) * 8 + (i ^ sw)];
              } else {
                xv[m] = ldg_x4(x + m * K + 32 * c + 4 * i, x_vec);
              }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const float w0 = __fmul_rn(code_at(s_code, no[r].hi4, 2 * h), s[r]);
              const float w1 = __fmul_rn(code_at(s_code, no[r].lo4, 2 * h), s[r]);
              const float w2 = __fmul_rn(code_at(s_code, no[r].hi4, 2 * h + 1), s[r]);
              const float w3 = __fmul_rn(code_at(s_code, no[r].lo4, 2 * h + 1), s[r]);
#pragma unroll
              for (int m = 0; m < M; ++m) {
                float a = acc[r * M + m];
                a = __fmaf_rn(xv[m].x, w0, a);
                a = __fmaf_rn(xv[m].y, w1, a);
                a = __fmaf_rn(xv[m].z, w2, a);
                a = __fmaf_rn(xv[m].w, w3, a);
                acc[r * M + m] = a;
              }
            }
          }
        }
      }
    }

    warp_reduce_multi<VP>(acc, lane);
    constexpr int kGroup = 32 / VP;
    const int j = lane / kGroup;
    const bool holder = (lane % kGroup) == 0 && j < V;
    const int64_t n = item * rows_per_item + gi * R + j / M;
    const int m = j % M;
    if (KS == 1) {
      if (holder && n < N) store_out(out, odt, m * N + n, acc[0]);
    } else {
      if (holder) s_red[warp][j] = acc[0];
      __syncthreads();
      if (kslot == 0 && holder && n < N) {
        float v = s_red[warp][j];
        for (int q = 1; q < KS; ++q) v = __fadd_rn(v, s_red[warp + q][j]);
        store_out(out, odt, m * N + n, v);
      }
      __syncthreads();  // s_red is rewritten by the next item
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GEMV, general path (any K, any alignment): a warp per row, lane l takes elements k = l + 32 i, so the
// byte loads and the x reads are contiguous across the warp; the block scale is recomputed only when
// the block changes.
// ---------------------------------------------------------------------------------------------
template <typename XT, int M, bool DQ>
__global__ void __launch_bounds__(kGemvThreads)
    gemv4_generic_kernel(const uint8_t* __restrict__ packed, ScaleArgs sc, Code16 code, const XT* __restrict__ x,
                         int64_t N, int64_t K, int log2_bs, bool xs, void* __restrict__ out, int odt) {
  constexpr int VP = Pow2Ceil<M>::value;
  extern __shared__ __align__(16) unsigned char qx_dyn_smem[];
  __shared__ float s_code[16];
  __shared__ float s_ncode[DQ ? 256 : 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  init_tables<DQ>(code, sc, s_code, s_ncode);
  float* s_x = reinterpret_cast<float*>(qx_dyn_smem);  // [M][K] when xs
  if (xs) {
    for (int m = 0; m < M; ++m) {
#pragma unroll 4
      for (int k = tid; k < K; k += kGemvThreads) s_x[m * static_cast<int>(K) + k] = ldg_x(x + m * K + k);
    }
  }
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGemvWarps;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp; n < N; n += stride) {
    float acc[VP];
#pragma unroll
    for (int j = 0; j < VP; ++j) acc[j] = 0.0f;
    const int64_t row0 = n * K;
    int64_t cached_block = -1;
    float s = 0.0f;
    const int k_end = static_cast<int>(K);  // K < 2^31 (host check)
#pragma unroll 2
    for (int k = lane; k < k_end; k += 32) {
      const int64_t e = row0 + k;
      const int64_t b = e >> log2_bs;
      if (b != cached_block) {
        s = decode_scale<DQ>(load_scale<DQ>(sc, b), s_ncode, sc.offset);
        cached_block = b;
      }
      const uint32_t byte = __ldg(packed + (e >> 1));
      const uint32_t nib = (e & 1) ? (byte & 15u) : (byte >> 4);
      const float w = __fmul_rn(s_code[nib], s);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float xv = xs ? s_x[m * k_end + k] : ldg_x(x + m * K + k);
        acc[m] = __fmaf_rn(xv, w, acc[m]);
      }
    }
    warp_reduce_multi<VP>(acc, lane);
    constexpr int kGroup = 32 / VP;
    const int j = lane / kGroup;
    if ((lane % kGroup) == 0 && j < M) store_out(out, odt, j * N + n, acc[0]);
  }
}

// ---------------------------------------------------------------------------------------------
// Small GEMM. A CTA (8 warps) owns 64 rows of W (output columns) and all M (<= BM) rows of x.
// Per K tile: cp.async brings the packed W tile (64 rows x BK/2 bytes) and the x tile (BM x BK) into a
// 3-stage ring; each thread dequantizes EPT consecutive weights of one row (one block, one scale, whose
// loads were issued a tile earlier) into the single W buffer; then
//  * half / bfloat16: warp w computes columns 16 (w & 3) .. +16 over the K sub-steps of half (w >> 2) of the
//    tile with wmma m16n16k16 (BM / 16 accumulators); both halves meet in shared memory at the end.
//  * float32: thread t computes rows (t >> 4) + 16 i and columns (t & 15) + 16 j with float4 reads.
// ---------------------------------------------------------------------------------------------
constexpr int kGemmThreads = 256;
constexpr int kGemmBN = 64;
constexpr int kGemmStages = 3;

template <typename XT>
struct GemmTraits {
  static constexpr bool kTC = !std::is_same<XT, float>::value;
  static constexpr int BK = kTC ? 64 : 32;  // K per tile
  static constexpr int LD = BK + (kTC ? 8 : 4);  // row stride (elements) of the x and W tiles: 16-byte rows,
                                                 // conflict-free wmma loads / float4 reads
};

template <typename XT, int BM>
struct GemmSmem {
  using Tr = GemmTraits<XT>;
  static constexpr int kRawStage = kGemmBN * Tr::BK / 2;  // packed bytes per stage
  static constexpr int kXStage = BM * Tr::LD * static_cast<int>(sizeof(XT));
  static constexpr int kW = kGemmBN * Tr::LD * static_cast<int>(sizeof(XT));
  static constexpr int kOffRaw = 0;
  static constexpr int kOffX = kOffRaw + kGemmStages * kRawStage;
  static constexpr int kOffW = kOffX + kGemmStages * kXStage;
  static constexpr int kPipe = kOffW + kW;
  static constexpr int kEpiLD = kGemmBN + 4;
  static constexpr int kEpi = Tr::kTC ? 2 * BM * kEpiLD * 4 : 0;  // the two K halves' float partials
  static constexpr int kBytes = kPipe > kEpi ? kPipe : kEpi;
  static_assert(kRawStage % 128 == 0 && kXStage % 128 == 0, "stage buffers must stay 128-byte aligned");
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// 8 weights from one packed 32-bit word (element 2j = high nibble of byte j), scaled in float32.
__device__ __forceinline__ void decode8(uint32_t u, float s, const float* code, float (&w)[8]) {
  const NibbleOffsets no = nibble_offsets(u);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    w[2 * j] = __fmul_rn(code_at(code, no.hi4, j), s);
    w[2 * j + 1] = __fmul_rn(code_at(code, no.lo4, j), s);
  }
}

template <typename XT>
__device__ __forceinline__ void store8(XT* dst, const float (&w)[8]) {  // dst 16-byte aligned
  if constexpr (std::is_same<XT, float>::value) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(w[0], w[1], w[2], w[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(w[4], w[5], w[6], w[7]);
  } else {
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(pack_pair<XT>(w[0], w[1]), pack_pair<XT>(w[2], w[3]), pack_pair<XT>(w[4], w[5]), pack_pair<XT>(w[6], w[7]));
  }
}

template <typename XT, int BM, bool TC = GemmTraits<XT>::kTC>
struct GemmAcc;

// Tensor cores: warp (wn, wk) = (w & 3, w >> 2).
template <typename XT, int BM>
struct GemmAcc<XT, BM, true> {
  static constexpr int MT = BM / 16;
  static constexpr int LD = GemmTraits<XT>::LD;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[MT];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < MT; ++i) nvcuda::wmma::fill_fragment(acc[i], 0.0f);
  }
  __device__ __forceinline__ void tile(const XT* xs, const XT* ws, int warp) {
    using namespace nvcuda;
    const int wn = warp & 3, wk = warp >> 2;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int k0 = wk * 32 + s * 16;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, XT, wmma::col_major> bf;  // B = Wdq^T: W rows are B columns
      wmma::load_matrix_sync(bf, ws + wn * 16 * LD + k0, LD);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, XT, wmma::row_major> af;
        wmma::load_matrix_sync(af, xs + i * 16 * LD + k0, LD);
        wmma::mma_sync(acc[i], af, bf, acc[i]);
      }
    }
  }
  // Partials to c[wk][m][n] (row stride GemmSmem::kEpiLD).
  __device__ __forceinline__ void stash(float* c, int warp) {
    constexpr int kLD = GemmSmem<XT, BM>::kEpiLD;
    const int wn = warp & 3, wk = warp >> 2;
#pragma unroll
    for (int i = 0; i < MT; ++i)
      nvcuda::wmma::store_matrix_sync(c + (wk * BM + i * 16) * kLD + wn * 16, acc[i], kLD, nvcuda::wmma::mem_row_major);
  }
};

// CUDA cores, float32: thread t owns rows (t >> 4) + 16 i, columns (t & 15) + 16 j.
template <typename XT, int BM>
struct GemmAcc<XT, BM, false> {
  static constexpr int MI = BM / 16;
  static constexpr int LD = GemmTraits<XT>::LD;
  static constexpr int BK = GemmTraits<XT>::BK;
  float acc[MI][4];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  __device__ __forceinline__ void tile(const float* xs, const float* ws, int tid) {
    const int tm = tid >> 4, tn = tid & 15;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 4) {
      float4 a[MI], b[4];
#pragma unroll
      for (int i = 0; i < MI; ++i) a[i] = *reinterpret_cast<const float4*>(xs + (tm + 16 * i) * LD + kk);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const float4*>(ws + (tn + 16 * j) * LD + kk);
#pragma unroll
      for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float v = acc[i][j];
          v = __fmaf_rn(a[i].x, b[j].x, v);
          v = __fmaf_rn(a[i].y, b[j].y, v);
          v = __fmaf_rn(a[i].z, b[j].z, v);
          v = __fmaf_rn(a[i].w, b[j].w, v);
          acc[i][j] = v;
        }
      }
    }
  }
  __device__ __forceinline__ void write(void* out, int odt, int M, int64_t N, int64_t n_base, int tid) const {
    const int tm = tid >> 4, tn = tid & 15;
#pragma unroll
    for (int i = 0; i < MI; ++i) {
      const int m = tm + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n_base + tn + 16 * j;
        if (m < M && n < N) store_out(out, odt, m * N + n, acc[i][j]);
      }
    }
  }
};

template <typename XT, int BM, bool DQ>
__global__ void __launch_bounds__(kGemmThreads)
    gemm4_small_kernel(const uint8_t* __restrict__ packed, ScaleArgs sc, Code16 code, const XT* __restrict__ x, int M,
                       int64_t N, int64_t K, int log2_bs, bool w_fast, bool x_fast, void* __restrict__ out, int odt) {
  using Tr = GemmTraits<XT>;
  using L = GemmSmem<XT, BM>;
  constexpr int BK = Tr::BK, LD = Tr::LD;
  constexpr int EPT = kGemmBN * BK / kGemmThreads;  // weights dequantized per thread per tile: 16 or 8
  constexpr int TPR = BK / EPT;                     // threads per W row
  constexpr int kRawChunks = kGemmBN * BK / 32;     // 16-byte packed chunks per tile
  constexpr int kXV = 16 / static_cast<int>(sizeof(XT));  // x elements per 16-byte chunk
  constexpr int kXChunks = BM * BK / kXV;
  static_assert(EPT == 8 || EPT == 16, "a thread decodes one or two packed words");
  static_assert(kRawChunks <= kGemmThreads && (BM * BK) % kGemmThreads == 0, "tile / thread mapping");

  __shared__ __align__(128) unsigned char smem[L::kBytes];
  __shared__ float s_code[16];
  __shared__ float s_ncode[DQ ? 256 : 1];
  init_tables<DQ>(code, sc, s_code, s_ncode);

  uint8_t* s_raw = smem + L::kOffRaw;
  XT* s_x = reinterpret_cast<XT*>(smem + L::kOffX);
  XT* s_w = reinterpret_cast<XT*>(smem + L::kOffW);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kGemmBN;
  const int nk = static_cast<int>((K + BK - 1) / BK);  // K < 2^31 (host check)
  const int w_row = tid / TPR, w_k = (tid % TPR) * EPT;  // this thread's slice of the W tile
  const int64_t w_n = n_base + w_row;

  auto issue = [&](int kt, int stage) {
    const int64_t k0 = static_cast<int64_t>(kt) * BK;
    if (w_fast && tid < kRawChunks) {
      const int row = tid / (BK / 32), q = tid % (BK / 32);
      const int64_t n = n_base + row, k = k0 + 32 * q;
      const bool ok = n < N && k < K;  // K % 32 == 0: a chunk is wholly inside or outside
      cp_async16(s_raw + stage * L::kRawStage + tid * 16, ok ? packed + n * (K >> 1) + (k >> 1) : packed, ok);
    }
    XT* xs = s_x + stage * (BM * LD);
    if (x_fast) {
#pragma unroll
      for (int it = 0; it < (kXChunks + kGemmThreads - 1) / kGemmThreads; ++it) {
        const int c = tid + it * kGemmThreads;
        if (kXChunks % kGemmThreads == 0 || c < kXChunks) {
          const int m = c / (BK / kXV), q = c % (BK / kXV);
          const int64_t k = k0 + q * kXV;
          const bool ok = m < M && k < K;  // K % kXV == 0
          cp_async16(xs + m * LD + q * kXV, ok ? x + m * K + k : x, ok);
        }
      }
    } else {
#pragma unroll 4
      for (int it = 0; it < BM * BK / kGemmThreads; ++it) {
        const int i = tid + it * kGemmThreads;
        const int m = i / BK, kk = i % BK;
        const int64_t k = k0 + kk;
        xs[m * LD + kk] = (m < M && k < K) ? x[m * K + k] : from_float<XT>(0.0f);
      }
    }
  };

  auto tile_scale = [&](int kt) -> RawScale {
    const int64_t k = static_cast<int64_t>(kt) * BK + w_k;
    if (w_fast && w_n < N && k < K) return load_scale<DQ, true>(sc, (w_n * K + k) >> log2_bs);
    return RawScale{0.0f, 0u};
  };

  auto dequant = [&](int kt, int stage, const RawScale& rs) {
    const int64_t k = static_cast<int64_t>(kt) * BK + w_k;
    XT* dst = s_w + w_row * LD + w_k;
    float w[EPT];
    if (w_fast) {
      if (w_n < N && k < K) {
        // K % 32 == 0 and EPT | 32: the EPT weights lie in one block
        const float s = decode_scale<DQ>(rs, s_ncode, sc.offset);
        const uint8_t* src = s_raw + stage * L::kRawStage + w_row * (BK / 2) + w_k / 2;
        if constexpr (EPT == 16) {
          const uint2 u = *reinterpret_cast<const uint2*>(src);
          float lo[8], hi[8];
          decode8(u.x, s, s_code, lo);
          decode8(u.y, s, s_code, hi);
#pragma unroll
          for (int j = 0; j < 8; ++j) w[j] = lo[j], w[8 + j] = hi[j];
        } else {
          float lo[8];
          decode8(*reinterpret_cast<const uint32_t*>(src), s, s_code, lo);
#pragma unroll
          for (int j = 0; j < 8; ++j) w[j] = lo[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < EPT; ++j) w[j] = 0.0f;
      }
    } else {
      // Element-wise: rows may start mid-byte and blocks may straddle rows.
      int64_t cached_block = -1;
      float s = 0.0f;
#pragma unroll
      for (int j = 0; j < EPT; ++j) {
        w[j] = 0.0f;
        if (w_n < N && k + j < K) {
          const int64_t e = w_n * K + k + j;
          const int64_t b = e >> log2_bs;
          if (b != cached_block) {
            s = decode_scale<DQ>(load_scale<DQ>(sc, b), s_ncode, sc.offset);
            cached_block = b;
          }
          const uint32_t byte = __ldg(packed + (e >> 1));
          w[j] = __fmul_rn(s_code[(e & 1) ? (byte & 15u) : (byte >> 4)], s);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < EPT / 8; ++h) {
      float part[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) part[j] = w[8 * h + j];
      store8<XT>(dst + 8 * h, part);
    }
  };

  __syncthreads();  // tables
#pragma unroll
  for (int s = 0; s < kGemmStages - 1; ++s) {
    if (s < nk) issue(s, s);
    cp_async_commit();
  }
  RawScale nsc = tile_scale(0);
  GemmAcc<XT, BM> acc;
  acc.init();

  for (int kt = 0; kt < nk; ++kt) {
    const int stage = kt % kGemmStages;
    const RawScale csc = nsc;
    if (kt + 1 < nk) nsc = tile_scale(kt + 1);  // a tile ahead of its use
    cp_async_wait<kGemmStages - 2>();  // this thread's copies of tile kt landed
    __syncthreads();                   // everyone's copies visible; tile kt - 1's products done with s_w
    dequant(kt, stage, csc);
    const int nt = kt + kGemmStages - 1;
    if (nt < nk) issue(nt, nt % kGemmStages);  // into the stage tile kt - 1 used
    cp_async_commit();
    __syncthreads();  // s_w complete
    if constexpr (Tr::kTC) {
      acc.tile(s_x + stage * (BM * LD), s_w, warp);
    } else {
      acc.tile(s_x + stage * (BM * LD), s_w, tid);
    }
  }

  if constexpr (Tr::kTC) {
    cp_async_wait<0>();
    __syncthreads();  // the pipeline buffers are reused for the partial sums
    float* c = reinterpret_cast<float*>(smem);
    acc.stash(c, warp);
    __syncthreads();
    constexpr int kLD = L::kEpiLD;
    for (int i = tid; i < BM * kGemmBN; i += kGemmThreads) {
      const int m = i / kGemmBN, nn = i % kGemmBN;
      const int64_t n = n_base + nn;
      if (m < M && n < N) store_out(out, odt, m * N + n, __fadd_rn(c[m * kLD + nn], c[(BM + m) * kLD + nn]));
    }
  } else {
    acc.write(out, odt, M, N, n_base, tid);
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

// Per (kernel, device): static shared memory, the dynamic shared memory it may use, whether the opt-in
// limit was raised, and resident CTAs per SM by dynamic shared memory size. Cached: the queries cost more
// than a small launch.
struct KernelInfo {
  const void* fn;
  int device;
  int sms;
  size_t max_dynamic;
  bool raised;
  std::vector<std::pair<size_t, int>> per_sm;
};

std::mutex g_kernel_mu;
std::vector<KernelInfo> g_kernels;

Status kernel_info(const void* fn, KernelInfo** out) {  // call with g_kernel_mu held
  int dev = 0;
  if (cuda_ok(cudaGetDevice(&dev), "cudaGetDevice") != Status::kOk) return Status::kCudaError;
  for (KernelInfo& k : g_kernels) {
    if (k.fn == fn && k.device == dev) {
      *out = &k;
      return Status::kOk;
    }
  }
  cudaFuncAttributes attr;
  int sms = 0, optin = 0;
  if (cuda_ok(cudaFuncGetAttributes(&attr, fn), "cudaFuncGetAttributes") != Status::kOk ||
      cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute(SM count)") !=
          Status::kOk ||
      cuda_ok(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
              "cudaDeviceGetAttribute(shared memory opt-in)") != Status::kOk)
    return Status::kCudaError;
  KernelInfo k;
  k.fn = fn;
  k.device = dev;
  k.sms = std::max(1, sms);
  const size_t reserve = 1024;  // headroom below the opt-in limit
  k.max_dynamic = static_cast<size_t>(optin) > attr.sharedSizeBytes + reserve
                      ? static_cast<size_t>(optin) - attr.sharedSizeBytes - reserve
                      : 0;
  k.raised = false;
  g_kernels.push_back(k);
  *out = &g_kernels.back();
  return Status::kOk;
}

Status max_dynamic_smem(const void* fn, size_t* bytes) {
  std::lock_guard<std::mutex> lock(g_kernel_mu);
  KernelInfo* k = nullptr;
  const Status s = kernel_info(fn, &k);
  if (s != Status::kOk) return s;
  *bytes = k->max_dynamic;
  return Status::kOk;
}

// Makes `fn` launchable with `dyn` bytes of dynamic shared memory and returns the CTAs that fit on the
// device at once (at least 1).
Status prepare_launch(const void* fn, int threads, size_t dyn, int* slots) {
  std::lock_guard<std::mutex> lock(g_kernel_mu);
  KernelInfo* k = nullptr;
  const Status s = kernel_info(fn, &k);
  if (s != Status::kOk) return s;
  if (dyn > k->max_dynamic)
    return cuda_failed(cudaErrorInvalidValue, "prepare_launch (dynamic shared memory above the opt-in limit)");
  if (dyn > 48 * 1024 && !k->raised) {
    if (cuda_ok(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(k->max_dynamic)),
                "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)") != Status::kOk)
      return Status::kCudaError;
    k->raised = true;
  }
  for (const auto& e : k->per_sm) {
    if (e.first == dyn) {
      *slots = std::max(1, e.second) * k->sms;
      return Status::kOk;
    }
  }
  int per_sm = 0;
  if (cuda_ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, threads, dyn),
              "cudaOccupancyMaxActiveBlocksPerMultiprocessor") != Status::kOk)
    return Status::kCudaError;
  if (per_sm <= 0) return cuda_failed(cudaErrorInvalidConfiguration, "prepare_launch (no CTA fits on an SM)");
  k->per_sm.emplace_back(dyn, per_sm);
  *slots = per_sm * k->sms;
  return Status::kOk;
}

struct MatmulArgs {
  const void* x;
  int64_t M;
  const Weight4* w;
  void* out;
  DType odt;
  cudaStream_t stream;
  ScaleArgs sc;
  Code16 code;
  int log2_bs;
};

constexpr int64_t kMaxK = (int64_t{1} << 31) - 1024;

bool valid_weight(const Weight4& w) {
  if (w.N <= 0 || w.K <= 0 || !w.packed || !valid_blocksize_4bit(w.blocksize)) return false;
  if (w.qt != QuantType::kNF4 && w.qt != QuantType::kFP4) return false;
  const AbsmaxView& s = w.scales;
  return s.double_quant() ? (s.nested_absmax && s.nested_code && s.nested_blocksize > 0) : s.absmax != nullptr;
}

Status prepare_args(const void* x, DType xdt, int64_t M, int64_t max_m, const Weight4& w, void* out, DType odt,
                    void* stream, MatmulArgs* a) {
  if (!valid_weight(w) || M < 0 || M > max_m || (M > 0 && (!x || !out))) return Status::kInvalidArgument;
  // The kernels count K in 32-bit (a row of 2^31 weights would be 1 GiB of packed bytes).
  if (w.K > kMaxK) return Status::kInvalidArgument;
  if (!valid_dtype(xdt) || !valid_dtype(odt)) return Status::kUnsupported;
  if (M > 0 && cuda_no_pending() != Status::kOk) return Status::kCudaError;
  a->x = x;
  a->M = M;
  a->w = &w;
  a->out = out;
  a->odt = odt;
  a->stream = static_cast<cudaStream_t>(stream);
  const AbsmaxView& s = w.scales;
  a->sc.absmax = s.absmax;
  a->sc.qabsmax = s.qabsmax;
  a->sc.nested_absmax = s.nested_absmax;
  a->sc.nested_code = s.nested_code;
  a->sc.offset = s.offset;
  a->sc.nested_bs = s.double_quant() ? s.nested_blocksize : 1;
  a->sc.nested_shift = log2_exact(a->sc.nested_bs);
  a->code = make_code16(w.qt);
  a->log2_bs = log2_exact(w.blocksize);
  return a->log2_bs >= 5 ? Status::kOk : Status::kInvalidArgument;
}

// ---- GEMV launch ----
// Split-K factor: the KS (power of two <= min(8, steps per row)) whose balanced grid keeps the most CTAs
// busy; items are spread evenly (every CTA gets the same number of rounds, give or take one).
void choose_split(int64_t N, int64_t nsteps, int slots, int* ks_log2, int64_t* grid) {
  int best_ks = 0;
  int64_t best_grid = 0;
  for (int ks = 0; ks <= 3; ++ks) {
    if (ks > 0 && (int64_t{1} << ks) > nsteps) break;
    const int64_t rows = int64_t{kGemvRows} * (kGemvWarps >> ks);
    const int64_t items = (N + rows - 1) / rows;
    const int64_t rounds = (items + slots - 1) / slots;
    const int64_t g = (items + rounds - 1) / rounds;
    if (g > best_grid) best_grid = g, best_ks = ks;
  }
  *ks_log2 = best_ks;
  *grid = std::max<int64_t>(1, best_grid);
}

template <typename XT, int M, bool DQ>
Status launch_gemv(const MatmulArgs& a) {
  const Weight4& w = *a.w;
  const XT* x = static_cast<const XT*>(a.x);
  const int64_t N = w.N, K = w.K;
  const int odt = static_cast<int>(a.odt);
  // Fast path: 16-byte aligned rows, and (double quant) a power-of-two nested block size.
  const bool fast = (K % 32) == 0 && is_aligned(w.packed, 16) && a.sc.nested_shift >= 0;
  // Shared-memory size of the staged x (float32 [M][K]); never more than the opt-in limit, so int-indexed.
  const size_t xbytes = static_cast<size_t>(M) * static_cast<size_t>(K) * sizeof(float);

  if (fast) {
    const void* k_smem = reinterpret_cast<const void*>(gemv4_fast_kernel<XT, M, DQ, true>);
    const void* k_glob = reinterpret_cast<const void*>(gemv4_fast_kernel<XT, M, DQ, false>);
    size_t cap = 0;
    if (max_dynamic_smem(k_smem, &cap) != Status::kOk) return Status::kCudaError;
    const bool xs = xbytes <= cap;
    const void* fn = xs ? k_smem : k_glob;
    const size_t dyn = xs ? xbytes : 0;
    int slots = 1;
    if (prepare_launch(fn, kGemvThreads, dyn, &slots) != Status::kOk) return Status::kCudaError;
    int ks_log2 = 0;
    int64_t grid = 1;
    choose_split(N, ((K >> 5) + 31) >> 5, slots, &ks_log2, &grid);
    grid = std::min<int64_t>(grid, 0x7fffffff);
    const bool x_vec = is_aligned(x, 16);
    if (xs) {
      gemv4_fast_kernel<XT, M, DQ, true><<<static_cast<unsigned>(grid), kGemvThreads, dyn, a.stream>>>(
          w.packed, a.sc, a.code, x, N, K, a.log2_bs, ks_log2, x_vec, a.out, odt);
    } else {
      gemv4_fast_kernel<XT, M, DQ, false><<<static_cast<unsigned>(grid), kGemvThreads, 0, a.stream>>>(
          w.packed, a.sc, a.code, x, N, K, a.log2_bs, ks_log2, x_vec, a.out, odt);
    }
    return launch_status("gemv4_fast_kernel");
  }

  const void* fn = reinterpret_cast<const void*>(gemv4_generic_kernel<XT, M, DQ>);
  size_t cap = 0;
  if (max_dynamic_smem(fn, &cap) != Status::kOk) return Status::kCudaError;
  const bool xs = xbytes <= cap;
  const size_t dyn = xs ? xbytes : 0;
  int slots = 1;
  if (prepare_launch(fn, kGemvThreads, dyn, &slots) != Status::kOk) return Status::kCudaError;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>((N + kGemvWarps - 1) / kGemvWarps, slots));
  gemv4_generic_kernel<XT, M, DQ><<<static_cast<unsigned>(grid), kGemvThreads, dyn, a.stream>>>(
      w.packed, a.sc, a.code, x, N, K, a.log2_bs, xs, a.out, odt);
  return launch_status("gemv4_generic_kernel");
}

template <typename XT, bool DQ>
Status dispatch_gemv_m(const MatmulArgs& a) {
  switch (a.M) {
    case 1: return launch_gemv<XT, 1, DQ>(a);
    case 2: return launch_gemv<XT, 2, DQ>(a);
    case 3: return launch_gemv<XT, 3, DQ>(a);
    case 4: return launch_gemv<XT, 4, DQ>(a);
  }
  return Status::kInvalidArgument;
}

template <typename XT>
Status dispatch_gemv(const MatmulArgs& a) {
  return a.sc.qabsmax ? dispatch_gemv_m<XT, true>(a) : dispatch_gemv_m<XT, false>(a);
}

// ---- small GEMM launch ----
template <typename XT, int BM, bool DQ>
Status launch_gemm(const MatmulArgs& a) {
  const Weight4& w = *a.w;
  const XT* x = static_cast<const XT*>(a.x);
  const int64_t N = w.N, K = w.K;
  const int64_t grid = (N + kGemmBN - 1) / kGemmBN;
  if (grid > 0x7fffffff) return Status::kInvalidArgument;
  constexpr int kXV = 16 / static_cast<int>(sizeof(XT));
  const bool w_fast = (K % 32) == 0 && is_aligned(w.packed, 16) && a.sc.nested_shift >= 0;
  const bool x_fast = (K % kXV) == 0 && is_aligned(x, 16);
  gemm4_small_kernel<XT, BM, DQ><<<static_cast<unsigned>(grid), kGemmThreads, 0, a.stream>>>(
      w.packed, a.sc, a.code, x, static_cast<int>(a.M), N, K, a.log2_bs, w_fast, x_fast, a.out,
      static_cast<int>(a.odt));
  return launch_status("gemm4_small_kernel");
}

template <typename XT, bool DQ>
Status dispatch_gemm_m(const MatmulArgs& a) {
  if (a.M <= 16) return launch_gemm<XT, 16, DQ>(a);
  if (a.M <= 32) return launch_gemm<XT, 32, DQ>(a);
  return launch_gemm<XT, 64, DQ>(a);
}

template <typename XT>
Status dispatch_gemm(const MatmulArgs& a) {
  return a.sc.qabsmax ? dispatch_gemm_m<XT, true>(a) : dispatch_gemm_m<XT, false>(a);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
Status gemv_4bit_cuda(const void* x, DType xdt, int64_t M, const Weight4& w, void* out, DType odt, void* stream) {
  MatmulArgs a;
  const Status s = prepare_args(x, xdt, M, kCudaGemvMaxM, w, out, odt, stream, &a);
  if (s != Status::kOk) return s;
  if (M == 0) return Status::kOk;
  switch (xdt) {
    case DType::kFloat32: return dispatch_gemv<float>(a);
    case DType::kFloat16: return dispatch_gemv<__half>(a);
    case DType::kBFloat16: return dispatch_gemv<__nv_bfloat16>(a);
  }
  return Status::kUnsupported;
}

Status gemm_4bit_small_cuda(const void* x, DType xdt, int64_t M, const Weight4& w, void* out, DType odt,
                            void* stream) {
  MatmulArgs a;
  const Status s = prepare_args(x, xdt, M, kCudaSmallMaxM, w, out, odt, stream, &a);
  if (s != Status::kOk) return s;
  if (M == 0) return Status::kOk;
  switch (xdt) {
    case DType::kFloat32: return dispatch_gemm<float>(a);
    case DType::kFloat16: return dispatch_gemm<__half>(a);
    case DType::kBFloat16: return dispatch_gemm<__nv_bfloat16>(a);
  }
  return Status::kUnsupported;
}

}  // namespace qx

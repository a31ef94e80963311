// CPU 4-bit matmul: a fused dequantize-multiply for small M; for large M a packed GEMM decoding W into its panels
// (AVX2) and the tiles the other paths hand to the platform GEMM.
// The weights used are exactly the dequantized ones (code[nibble] * scale, one float32 rounding), except in
// the AVX2 M = 1 block kernel, which scales each block's partial sum instead (see there). AVX-512
// and AVX2: the GEMV decodes 32 weights at a time in registers and feeds them straight into FMAs with every
// row of x. Scalar: rows of W are decoded a chunk at a time into an L1-resident buffer by the dequantize
// kernels, then dotted with every row of x.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "../common/convert.h"
#include "../common/parallel.h"
#include "../quant/quant_cpu_detail.h"
#include "matmul.h"

namespace qx {
namespace {

// Scalar GEMV: K is walked in chunks of kChunk; kRows rows of W are decoded per chunk into an L1-resident buffer, so a
// chunk of x (M x kChunk floats, <= 8 KiB) is loaded from L1 once per kRows rows rather than once per row.
constexpr int64_t kChunk = 256;
constexpr int64_t kRows = 4;

// acc[m] += dot(x[m * ldx .. + len], w[0 .. len]) for m < M: each weight vector is loaded once for all M rows.
void dots_scalar(const float* x, int64_t ldx, int64_t M, const float* w, int64_t len, float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    float a0 = 0, a1 = 0;
    int64_t i = 0;
    for (; i + 2 <= len; i += 2) a0 += xm[i] * w[i], a1 += xm[i + 1] * w[i + 1];
    for (; i < len; ++i) a0 += xm[i] * w[i];
    acc[m] += a0 + a1;
  }
}

#define QX_MM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

// Fused AVX-512 GEMV over rows [r0, r1) of W: out[m * ldo + n] = sum_k x[m * K + k] * Wdq[n, k] (float32).
// Per 32 weights: one 16-byte load of packed nibbles, two dword permutes + shifts turn them into the
// element-ordered nibble indices (element 2j is the high nibble of byte j; vpermps reads only the low four
// bits of an index, so the low nibble needs no mask), two table permutes give the codes, one multiply by
// the block's scale rounds each weight exactly as dequantize does, then two FMAs per row of x. A row is one
// or more block segments (blocks may straddle rows when K is not a multiple of the block size); a segment
// that starts mid-byte takes one scalar element, and a segment's tail takes masked loads (the masked-off
// packed bytes are never read, x lanes are zero, weights are zeroed).
template <int M>
QX_MM_AVX512 void gemv_rows_avx512(const float* x, const Weight4& w, const float* code, int64_t r0, int64_t r1,
                                   float* out, int64_t ldo) {
  const int64_t K = w.K, bs = w.blocksize;
  const int bs_shift = __builtin_ctzll(static_cast<unsigned long long>(bs));  // block sizes are powers of two
  const __m512 lut = _mm512_loadu_ps(code);
  const __m512i dup0 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i dup1 = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const uint8_t* packed = w.packed;
  for (int64_t n = r0; n < r1; ++n) {
    __m512 acc0[M], acc1[M];
    float tail[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps(), tail[m] = 0.0f;
    const int64_t row0 = n * K, row1 = row0 + K;
    for (int64_t e = row0; e < row1;) {
      const int64_t b = e >> bs_shift, seg_end = std::min(row1, (b + 1) << bs_shift);
      const float a = detail::block_scale(w.scales, b);
      const __m512 va = _mm512_set1_ps(a);
      int64_t i = e;
      if (i & 1) {  // the row starts on a low nibble (K odd)
        const float wv = code[packed[i >> 1] & 0xf] * a;
        for (int m = 0; m < M; ++m) tail[m] += x[m * K + (i - row0)] * wv;
        ++i;
      }
      for (; i + 32 <= seg_end; i += 32) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (i >> 1))));
        const __m512i n0 = _mm512_srlv_epi32(_mm512_permutexvar_epi32(dup0, q), shifts);
        const __m512i n1 = _mm512_srlv_epi32(_mm512_permutexvar_epi32(dup1, q), shifts);
        const __m512 v0 = _mm512_mul_ps(_mm512_permutexvar_ps(n0, lut), va);
        const __m512 v1 = _mm512_mul_ps(_mm512_permutexvar_ps(n1, lut), va);
        const float* xk = x + (i - row0);
        for (int m = 0; m < M; ++m) {
          acc0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xk + m * K), v0, acc0[m]);
          acc1[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xk + m * K + 16), v1, acc1[m]);
        }
      }
      if (i < seg_end) {  // 1..31 elements left, i even
        const int64_t rem = seg_end - i;
        const __mmask16 bytes = static_cast<__mmask16>((1u << ((rem + 1) >> 1)) - 1);
        const __mmask16 k0 = rem >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << rem) - 1);
        const __mmask16 k1 = rem > 16 ? static_cast<__mmask16>((1u << (rem - 16)) - 1) : __mmask16(0);
        const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(bytes, packed + (i >> 1)));
        const __m512i n0 = _mm512_srlv_epi32(_mm512_permutexvar_epi32(dup0, q), shifts);
        const __m512i n1 = _mm512_srlv_epi32(_mm512_permutexvar_epi32(dup1, q), shifts);
        const __m512 v0 = _mm512_maskz_mul_ps(k0, _mm512_permutexvar_ps(n0, lut), va);
        const __m512 v1 = _mm512_maskz_mul_ps(k1, _mm512_permutexvar_ps(n1, lut), va);
        const float* xk = x + (i - row0);
        for (int m = 0; m < M; ++m) {
          acc0[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k0, xk + m * K), v0, acc0[m]);
          acc1[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k1, xk + m * K + 16), v1, acc1[m]);
        }
      }
      e = seg_end;
    }
    for (int m = 0; m < M; ++m) out[m * ldo + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + tail[m];
  }
}


#define QX_MM_AVX2 __attribute__((target("avx2,fma")))

// Sum of the 8 lanes of s.
QX_MM_AVX2 inline float hsum_avx2(__m256 s) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// Fused AVX2 GEMV over rows [r0, r1) of W, the same contract as gemv_rows_avx512. Per 32 weights: the
// byte-plane decode shared with the dequantize kernel (detail::avx2_decode32: one broadcast load, five
// shuffles and four table lookups, eight unpacks, four multiplies by the block's scale), then four FMAs per
// row of x. A segment head that starts mid-byte takes one scalar element; a tail under 32 weights is decoded
// element by element (same rounding) into a zero-padded vector and multiplied with masked loads of x (lanes
// past it not read).
template <int M>
QX_MM_AVX2 void gemv_rows_avx2(const float* x, const Weight4& w, const float* code, int64_t r0, int64_t r1,
                               float* out, int64_t ldo) {
  constexpr int NA = M == 1 ? 4 : M == 2 ? 2 : 1;  // independent FMA chains per row of x (latency)
  const int64_t K = w.K, bs = w.blocksize;
  const int bs_shift = __builtin_ctzll(static_cast<unsigned long long>(bs));  // block sizes are powers of two
  const detail::Avx2Code4 tables = detail::avx2_code4(code);
  const uint8_t* packed = w.packed;
  for (int64_t n = r0; n < r1; ++n) {
    __m256 acc[M][NA];
    float tail[M];
    for (int m = 0; m < M; ++m) {
      for (int j = 0; j < NA; ++j) acc[m][j] = _mm256_setzero_ps();
      tail[m] = 0.0f;
    }
    const int64_t row0 = n * K, row1 = row0 + K;
    for (int64_t e = row0; e < row1;) {
      const int64_t b = e >> bs_shift, seg_end = std::min(row1, (b + 1) << bs_shift);
      const float a = detail::block_scale(w.scales, b);
      const __m256 va = _mm256_set1_ps(a);
      int64_t i = e;
      if (i & 1) {  // the row starts on a low nibble (K odd)
        const float wv = code[packed[i >> 1] & 0xf] * a;
        for (int m = 0; m < M; ++m) tail[m] += x[m * K + (i - row0)] * wv;
        ++i;
      }
      for (; i + 32 <= seg_end; i += 32) {
        __m256 v[4];
        detail::avx2_decode32(packed + (i >> 1), tables, va, v);
        const float* xk = x + (i - row0);
        for (int j = 0; j < 4; ++j)
          for (int m = 0; m < M; ++m)
            acc[m][j % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(xk + m * K + 8 * j), v[j], acc[m][j % NA]);
      }
      if (i < seg_end) {  // 1..31 weights left (i even): decoded one by one, then masked vector FMAs
        const int64_t rem = seg_end - i;
        alignas(32) float wt[32] = {};
        for (int64_t j = 0; j < rem; ++j) {
          const uint8_t byte = packed[(i + j) >> 1];
          wt[j] = code[(j & 1) ? (byte & 0xf) : (byte >> 4)] * a;
        }
        const float* xk = x + (i - row0);
        for (int j = 0; 8 * j < rem; ++j) {
          const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem - 8 * j)),
                                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
          const __m256 v = _mm256_load_ps(wt + 8 * j);
          for (int m = 0; m < M; ++m)
            acc[m][j % NA] = _mm256_fmadd_ps(_mm256_maskload_ps(xk + m * K + 8 * j, lanes), v, acc[m][j % NA]);
        }
      }
      e = seg_end;
    }
    for (int m = 0; m < M; ++m) {
      __m256 t = acc[m][0];
      for (int j = 1; j < NA; ++j) t = _mm256_add_ps(t, acc[m][j]);
      out[m * ldo + n] = hsum_avx2(t) + tail[m];
    }
  }
}

// AVX2 GEMV for rows made of whole blocks of a multiple of 32 weights (K a multiple of the block size: every
// real layer), the same contract as gemv_rows_avx2 except that x comes pre-permuted (permute_x32) so that each
// 32-weight group decodes in the order that costs the fewest shuffles: the 16 packed bytes are broadcast to both
// lanes, lane 0 keeps the high nibbles (even weights 0, 2, ..., 30) and lane 1 the low ones (odd weights; one
// shift, one blend, one mask), and four plane lookups and eight in-lane unpacks give the float vectors
// {0, 2, 4, 6, 1, 3, 5, 7}, {8, 10, 12, 14, 9, 11, 13, 15}, and so on for 16-23 and 24-31. No segment bookkeeping:
// each block runs a fixed number of groups, and the accumulators stay in registers for the whole row (the
// unroll pragmas matter: without them GCC kept the accumulator array on the stack, 20% slower). At M = 1 the
// block's scale multiplies the block's partial dot product once, (sum x * code) * scale, rather than every
// weight: a rounding difference of the order of the summation's own, and 10% faster.
template <int M, int G>
QX_MM_AVX2 void gemv_rows_avx2_blocks(const float* xp, const Weight4& w, const float* code, int64_t r0, int64_t r1,
                                      float* out, int64_t ldo) {
  constexpr int NA = M == 1 ? 4 : M == 2 ? 2 : 1;
  const int64_t K = w.K, bs = w.blocksize, nblk = K / bs;
  const detail::Avx2Code4 T = detail::avx2_code4(code);
  const __m256i nib = _mm256_set1_epi8(0x0f);
  const int64_t groups = G > 0 ? G : bs / 32;
  for (int64_t n = r0; n < r1; ++n) {
    __m256 acc[M][NA];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int j = 0; j < NA; ++j) acc[m][j] = _mm256_setzero_ps();
    const uint8_t* p = w.packed + ((n * K) >> 1);
    const float* xk = xp;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const __m256 va = _mm256_set1_ps(detail::block_scale(w.scales, n * nblk + blk));
      __m256 bacc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#pragma GCC unroll 2
      for (int64_t grp = 0; grp < groups; ++grp, p += 16, xk += 32) {
        const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const __m256i idx = _mm256_and_si256(_mm256_blend_epi32(q, _mm256_srli_epi16(q, 4), 0x0f), nib);
        const __m256i b0 = _mm256_shuffle_epi8(T.t0, idx), b1 = _mm256_shuffle_epi8(T.t1, idx);
        const __m256i b2 = _mm256_shuffle_epi8(T.t2, idx), b3 = _mm256_shuffle_epi8(T.t3, idx);
        const __m256i l0 = _mm256_unpacklo_epi8(b0, b1), l1 = _mm256_unpackhi_epi8(b0, b1);
        const __m256i h0 = _mm256_unpacklo_epi8(b2, b3), h1 = _mm256_unpackhi_epi8(b2, b3);
        const __m256 c[4] = {_mm256_castsi256_ps(_mm256_unpacklo_epi16(l0, h0)),
                             _mm256_castsi256_ps(_mm256_unpackhi_epi16(l0, h0)),
                             _mm256_castsi256_ps(_mm256_unpacklo_epi16(l1, h1)),
                             _mm256_castsi256_ps(_mm256_unpackhi_epi16(l1, h1))};
        if constexpr (M == 1) {
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) bacc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 8 * j), c[j], bacc[j]);
        } else {
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const __m256 v = _mm256_mul_ps(c[j], va);
#pragma GCC unroll 8
            for (int m = 0; m < M; ++m)
              acc[m][j % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(xk + m * K + 8 * j), v, acc[m][j % NA]);
          }
        }
      }
      if constexpr (M == 1) {
        acc[0][0] = _mm256_fmadd_ps(_mm256_add_ps(bacc[0], bacc[1]), va, acc[0][0]);
        acc[0][1] = _mm256_fmadd_ps(_mm256_add_ps(bacc[2], bacc[3]), va, acc[0][1]);
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m256 t = acc[m][0];
#pragma GCC unroll 4
      for (int j = 1; j < NA; ++j) t = _mm256_add_ps(t, acc[m][j]);
      out[m * ldo + n] = hsum_avx2(t);
    }
  }
}

// x[m * K + 32 g + i] in the order gemv_rows_avx2_blocks decodes each group of 32 weights: within every 8,
// the even elements, then the odd ones.
void permute_x32(const float* x, int64_t M, int64_t K, float* xp) {
  for (int64_t g = 0; g < M * K; g += 8)  // K is a multiple of 32, so groups never straddle rows
    for (int i = 0; i < 4; ++i) xp[g + i] = x[g + 2 * i], xp[g + 4 + i] = x[g + 2 * i + 1];
}

using GemvRowsFn = void (*)(const float*, const Weight4&, const float*, int64_t, int64_t, float*, int64_t);
GemvRowsFn pick_gemv(int64_t M) {
  static constexpr GemvRowsFn avx512[kGemvMaxM] = {gemv_rows_avx512<1>, gemv_rows_avx512<2>, gemv_rows_avx512<3>,
                                                   gemv_rows_avx512<4>, gemv_rows_avx512<5>, gemv_rows_avx512<6>,
                                                   gemv_rows_avx512<7>, gemv_rows_avx512<8>};
  static constexpr GemvRowsFn avx2[kGemvMaxM] = {gemv_rows_avx2<1>, gemv_rows_avx2<2>, gemv_rows_avx2<3>,
                                                 gemv_rows_avx2<4>, gemv_rows_avx2<5>, gemv_rows_avx2<6>,
                                                 gemv_rows_avx2<7>, gemv_rows_avx2<8>};
  static_assert(kGemvMaxM == 8, "one instantiation per M");
  return (detail::isa_level() == 2 ? avx512 : avx2)[M - 1];
}

// The block kernel for M = 1 and 2, where decoding dominates (for M >= 3 the FMAs do, and gemv_rows_avx2, which
// keeps more rows of x in registers, measured faster). Blocks of 64 (QLoRA's) get a fully unrolled block body.
GemvRowsFn pick_gemv_blocks(int64_t M, int64_t blocksize) {
  static constexpr GemvRowsFn fns[2][2] = {{gemv_rows_avx2_blocks<1, 2>, gemv_rows_avx2_blocks<1, 0>},
                                           {gemv_rows_avx2_blocks<2, 2>, gemv_rows_avx2_blocks<2, 0>}};
  return fns[M - 1][blocksize == 64 ? 0 : 1];
}

// The packed GEMM behind gemm_4bit_cpu, in the usual blocked form: the inner dimension in slices of kKC, each
// thread's output columns in blocks of kNC, rows of the left operand in blocks of kMC; B's slice is packed into
// column panels of kNR (kKC x kNR floats: L1), A's block into row panels of kMR (kMC x kKC: L2), and a 6x16
// register tile (12 accumulators, two B vectors, one broadcast) runs over every pair of panels.
constexpr int64_t kMR = 6, kNR = 16, kKC = 256, kMC = 144, kNC = 2048;

// C[mr x nr] (=, or += unless first) the product of an A panel [kc][kMR] and a B panel [kc][kNR].
QX_MM_AVX2 void gemm_tile_6x16(int64_t kc, const float* a, const float* b, float* C, int64_t ldc, int64_t mr,
                               int64_t nr, bool first) {
  // twelve named accumulators: as an array, GCC stored every one back to the stack on each iteration
  for (int64_t i = 0; i < mr; ++i) {  // the tile of C is needed only at the end: fetch it during the k loop
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + nr - 1), _MM_HINT_T0);
  }
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 ai = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(ai, b0, c00), c01 = _mm256_fmadd_ps(ai, b1, c01);
    ai = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ai, b0, c10), c11 = _mm256_fmadd_ps(ai, b1, c11);
    ai = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ai, b0, c20), c21 = _mm256_fmadd_ps(ai, b1, c21);
    ai = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ai, b0, c30), c31 = _mm256_fmadd_ps(ai, b1, c31);
    ai = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ai, b0, c40), c41 = _mm256_fmadd_ps(ai, b1, c41);
    ai = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ai, b0, c50), c51 = _mm256_fmadd_ps(ai, b1, c51);
  }
  const __m256 c[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (mr == kMR && nr == kNR) {
    for (int i = 0; i < kMR; ++i) {
      float* ci = C + i * ldc;
      _mm256_storeu_ps(ci, first ? c[i][0] : _mm256_add_ps(c[i][0], _mm256_loadu_ps(ci)));
      _mm256_storeu_ps(ci + 8, first ? c[i][1] : _mm256_add_ps(c[i][1], _mm256_loadu_ps(ci + 8)));
    }
    return;
  }
  alignas(32) float t[kMR][kNR];
  for (int i = 0; i < kMR; ++i) _mm256_store_ps(t[i], c[i][0]), _mm256_store_ps(t[i] + 8, c[i][1]);
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) C[i * ldc + j] = first ? t[i][j] : C[i * ldc + j] + t[i][j];
}

// Rows [0, mc) x columns [0, kc) of A (row stride lda) as row panels [mc / kMR][kc][kMR], the last zero-padded.
void pack_a(const float* A, int64_t lda, int64_t mc, int64_t kc, float* ap) {
  for (int64_t i0 = 0; i0 < mc; i0 += kMR, ap += kMR * kc) {
    for (int64_t i = 0; i < kMR; ++i) {
      if (i0 + i < mc) {
        const float* src = A + (i0 + i) * lda;
        for (int64_t k = 0; k < kc; ++k) ap[k * kMR + i] = src[k];
      } else {
        for (int64_t k = 0; k < kc; ++k) ap[k * kMR + i] = 0.0f;
      }
    }
  }
}

// Rows [p0, p0 + kc) x columns [j0, j0 + nc) of the dequantized W as column panels [nc / kNR][kc][kNR], the last
// zero-padded: each row segment is decoded once into `row` (the dequantize kernel, the same rounding) and split.
void pack_w_rows(const Weight4& w, const float* code, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* bp,
                 float* row) {
  for (int64_t k = 0; k < kc; ++k) {
    const int64_t e = (p0 + k) * w.K + j0;
    detail::dequantize_4bit_range(w.packed, w.scales, w.blocksize, code, row, DType::kFloat32, e, e + nc);
    for (int64_t j = 0; j < nc; j += kNR) {
      float* dst = bp + j * kc + k * kNR;
      const int64_t n = std::min(kNR, nc - j);
      std::memcpy(dst, row + j, n * sizeof(float));
      std::fill(dst + n, dst + kNR, 0.0f);
    }
  }
}

// Rows [p0, p0 + kc) x columns [j0, j0 + nc) of W^T (rows j0.. of W, columns p0..) as the same column panels:
// each of a panel's kNR rows of W is decoded into `rows` ([kNR][kc]), then transposed into place.
void pack_w_cols(const Weight4& w, const float* code, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* bp,
                 float* rows) {
  for (int64_t j = 0; j < nc; j += kNR, bp += kNR * kc) {
    const int64_t n = std::min(kNR, nc - j);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t e = (j0 + j + r) * w.K + p0;
      detail::dequantize_4bit_range(w.packed, w.scales, w.blocksize, code, rows + r * kc, DType::kFloat32, e, e + kc);
    }
    std::fill(rows + n * kc, rows + kNR * kc, 0.0f);
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t r = 0; r < kNR; ++r) bp[k * kNR + r] = rows[r * kc + k];
  }
}

bool valid(const Weight4& w) {
  if (w.N <= 0 || w.K <= 0 || !w.packed || !valid_blocksize_4bit(w.blocksize)) return false;
  const AbsmaxView& s = w.scales;
  return s.double_quant() ? (s.nested_absmax && s.nested_code && s.nested_blocksize > 0) : s.absmax != nullptr;
}

}  // namespace

int64_t gemv_4bit_cpu_max_m() { return detail::isa_level() >= 1 ? kGemvMaxMSimd : kGemvMaxM; }

Status dequantize_4bit_tile_cpu(const Weight4& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, void* out,
                                DType odt) {
  if (!valid(w) || n0 < 0 || n1 > w.N || n0 > n1 || k0 < 0 || k1 > w.K || k0 > k1) return Status::kInvalidArgument;
  const int64_t K = w.K, kc = k1 - k0;
  if (n1 == n0 || kc == 0) return Status::kOk;
  if (!out) return Status::kInvalidArgument;
  const float* code = code4(w.qt);
  const int64_t row_bytes = kc * dtype_size(odt);
  parallel_for(n1 - n0, std::max<int64_t>(1, 16384 / kc), [&](int64_t r0, int64_t r1) {
    char* o = static_cast<char*>(out) + r0 * row_bytes;
    if (kc == K) {  // whole rows: one contiguous range
      detail::dequantize_4bit_range(w.packed, w.scales, w.blocksize, code, o, odt, (n0 + r0) * K, (n0 + r1) * K);
      return;
    }
    for (int64_t r = n0 + r0; r < n0 + r1; ++r, o += row_bytes)
      detail::dequantize_4bit_range(w.packed, w.scales, w.blocksize, code, o, odt, r * K + k0, r * K + k1);
  });
  return Status::kOk;
}

Status gemv_4bit_cpu(const void* x, DType xdt, int64_t M, const Weight4& w, void* out, DType odt) {
  if (!valid(w) || M < 0 || M > gemv_4bit_cpu_max_m() || (M > 0 && (!x || !out))) return Status::kInvalidArgument;
  if (M == 0) return Status::kOk;
  const int64_t K = w.K, N = w.N;
  // x as float32 rows (converted once; a float32 x is used in place)
  std::vector<float> xbuf;
  const float* xf = static_cast<const float*>(x);
  if (xdt != DType::kFloat32) {
    xbuf.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = load_elem(x, xdt, i);
    xf = xbuf.data();
  }
  const float* code = code4(w.qt);
  if (detail::isa_level() >= 1) {  // fused: AVX-512 or AVX2
    // float32 results go straight to out; other dtypes through a float32 buffer (rounded once)
    std::vector<float> obuf(odt == DType::kFloat32 ? 0 : M * N);
    float* o = odt == DType::kFloat32 ? static_cast<float*>(out) : obuf.data();
    // Rows of x in groups of 8 (the register budget); each group sweeps a tile of W rows (~256 KiB packed)
    // that stays in L2 for the next group, so the packed weight comes from memory once. Threads take tiles from a
    // shared counter rather than one fixed share each: a thread that starts late (woken from sleep, or preempted on
    // a busy or virtual machine) then costs its lateness shared between the threads, not added to the whole call.
    const bool blocks = detail::isa_level() == 1 && M <= 2 && K % w.blocksize == 0 && w.blocksize % 32 == 0;
    std::vector<float> xperm(blocks ? M * K : 0);
    if (blocks) permute_x32(xf, M, K, xperm.data());
    const int64_t tile_bytes = M > 8 ? (int64_t(256) << 10) : (int64_t(64) << 10);
    const int64_t tile = std::max<int64_t>(1, tile_bytes / (K / 2 + 1));
    const int64_t ntiles = (N + tile - 1) / tile;
    std::atomic<int64_t> next{0};
    parallel_for(ntiles, std::max<int64_t>(1, 32768 / (tile * K)), [&](int64_t, int64_t) {
      for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < ntiles;
           t = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t t0 = t * tile, t1 = std::min(N, t0 + tile);
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
          const int64_t mg = std::min<int64_t>(8, M - m0);
          if (blocks)
            pick_gemv_blocks(mg, w.blocksize)(xperm.data() + m0 * K, w, code, t0, t1, o + m0 * N, N);
          else
            pick_gemv(mg)(xf + m0 * K, w, code, t0, t1, o + m0 * N, N);
        }
      }
    });
    if (odt != DType::kFloat32)
      for (int64_t i = 0; i < M * N; ++i) store_elem(out, odt, i, obuf[i]);
    return Status::kOk;
  }
  // ~32K weights per task: enough work to amortize the hand-off, enough tasks to balance two cores
  const int64_t grain = std::max<int64_t>(kRows, (32768 / K + kRows - 1) / kRows * kRows);
  parallel_for((N + kRows - 1) / kRows, std::max<int64_t>(1, grain / kRows), [&](int64_t t0, int64_t t1) {
    alignas(64) float wbuf[kRows][kChunk];
    float acc[kRows][kGemvMaxM];
    for (int64_t n0 = t0 * kRows; n0 < std::min(N, t1 * kRows); n0 += kRows) {
      const int64_t rows = std::min(kRows, N - n0);
      for (int64_t r = 0; r < rows; ++r) std::fill(acc[r], acc[r] + M, 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t len = std::min(kChunk, K - k0);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t e = (n0 + r) * K + k0;
          detail::dequantize_4bit_range(w.packed, w.scales, w.blocksize, code, wbuf[r], DType::kFloat32, e, e + len);
          dots_scalar(xf + k0, K, M, wbuf[r], len, acc[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t m = 0; m < M; ++m) store_elem(out, odt, m * N + n0 + r, acc[r][m]);
    }
  });
  return Status::kOk;
}

bool gemm_4bit_cpu_fused() { return detail::isa_level() == 1; }

Status gemm_4bit_cpu(const float* a, int64_t M, const Weight4& w, bool w_transposed, float* out) {
  if (!valid(w) || M < 0 || (M > 0 && (!a || !out))) return Status::kInvalidArgument;
  if (!gemm_4bit_cpu_fused()) return Status::kUnsupported;
  if (M == 0) return Status::kOk;
  // out[M, cols] = a[M, inner] @ B, B = W^T [K, N] (forward) or W [N, K] (the gradient for x)
  const int64_t inner = w_transposed ? w.K : w.N, cols = w_transposed ? w.N : w.K;
  const float* code = code4(w.qt);
  // out[m0:m1, c0:c1] on one thread, with its own packed panels (so no barriers between threads).
  auto block = [&](int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
    thread_local std::vector<float> bbuf, abuf, wbuf;  // ~2.2 MiB, kept between calls (no fresh pages per call)
    bbuf.resize(kKC * kNC), abuf.resize(kMC * kKC), wbuf.resize(std::max(kNC, kNR * kKC));
    for (int64_t jc = c0; jc < c1; jc += kNC) {
      const int64_t nc = std::min(kNC, c1 - jc);
      for (int64_t pc = 0; pc < inner; pc += kKC) {
        const int64_t kc = std::min(kKC, inner - pc);
        if (w_transposed)
          pack_w_cols(w, code, pc, kc, jc, nc, bbuf.data(), wbuf.data());
        else
          pack_w_rows(w, code, pc, kc, jc, nc, bbuf.data(), wbuf.data());
        for (int64_t ic = m0; ic < m1; ic += kMC) {
          const int64_t mc = std::min(kMC, m1 - ic);
          pack_a(a + ic * inner + pc, inner, mc, kc, abuf.data());
          for (int64_t jr = 0; jr < nc; jr += kNR)
            for (int64_t ir = 0; ir < mc; ir += kMR)
              gemm_tile_6x16(kc, abuf.data() + ir * kc, bbuf.data() + jr * kc, out + (ic + ir) * cols + jc + jr,
                             cols, std::min(kMR, mc - ir), std::min(kNR, nc - jr), pc == 0);
        }
      }
    }
  };
  // Threads split the output by columns (each packs all of `a`: M x inner floats) or, where that copy is the
  // larger, by rows (each decodes all of W: inner x cols weights, about twice a copy's work).
  if (M > 2 * cols) {
    parallel_for((M + kMR - 1) / kMR, 1,
                 [&](int64_t t0, int64_t t1) { block(t0 * kMR, std::min(M, t1 * kMR), 0, cols); });
  } else {
    parallel_for((cols + kNR - 1) / kNR, 1,
                 [&](int64_t t0, int64_t t1) { block(0, M, t0 * kNR, std::min(cols, t1 * kNR)); });
  }
  return Status::kOk;
}

}  // namespace qx

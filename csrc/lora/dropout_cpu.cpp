// CPU LoRA dropout (dropout.h): Philox4x32-10 keep masks computed 16 (AVX-512) or 8 (AVX2) counters at a time
// and applied in the same pass over x, so one call reads x once and writes out once. A scalar version of the
// same stream serves other CPUs and every partial 64-element chunk at the end.
// GCC 12 reports the intrinsics' internal "undefined" registers as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "../common/parallel.h"
#include "../quant/quant_cpu_detail.h"
#include "dropout.h"

namespace qx {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox4x32 multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 10;
constexpr int64_t kChunk = 64;                            // elements per (counter k, 16 lanes x 4 words)

// Scalar: elements [64k, min(64k + 64, n)).
void chunk_scalar(const float* x, float* out, int64_t n, int64_t k, uint64_t seed, uint32_t thr, float scale) {
  for (uint32_t l = 0; l < 16; ++l) {
    uint32_t c[4] = {static_cast<uint32_t>(k), static_cast<uint32_t>(static_cast<uint64_t>(k) >> 32), l, 0};
    philox4x32_10(c, seed);
    for (int j = 0; j < 4; ++j) {
      const int64_t e = k * kChunk + 16 * j + l;
      if (e < n) out[e] = x[e] * (c[j] >= thr ? scale : 0.0f);
    }
  }
}

#define QX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define QX_AVX2 __attribute__((target("avx2,fma,f16c")))

// The 32x32 -> 64-bit products of every lane: high and low words in place.
QX_AVX512 inline void mulhilo(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

QX_AVX512 void range_avx512(const float* x, float* out, int64_t k0, int64_t k1, uint64_t seed, uint32_t thr,
                            float scale) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0)), m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  __m512i key0[kRounds], key1[kRounds];
  for (int r = 0; r < kRounds; ++r) {
    key0[r] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed) + r * kW0));
    key1[r] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32) + r * kW1));
  }
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vthr = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t k = k0; k < k1; ++k) {
    __m512i c0 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(k)));
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(static_cast<uint64_t>(k) >> 32)));
    __m512i c2 = lanes, c3 = _mm512_setzero_si512();
    for (int r = 0; r < kRounds; ++r) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo(c0, m0, &hi0, &lo0);
      mulhilo(c2, m1, &hi1, &lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), key0[r]);
      c1 = lo1;
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), key1[r]);
      c3 = lo0;
    }
    const __m512i words[4] = {c0, c1, c2, c3};
    const int64_t base = k * kChunk;
    for (int j = 0; j < 4; ++j) {
      const __mmask16 keep = _mm512_cmpge_epu32_mask(words[j], vthr);
      const __m512 v = _mm512_loadu_ps(x + base + 16 * j);
      _mm512_storeu_ps(out + base + 16 * j, _mm512_mul_ps(v, _mm512_maskz_mov_ps(keep, vscale)));
    }
  }
}

QX_AVX2 inline void mulhilo(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

QX_AVX2 void range_avx2(const float* x, float* out, int64_t k0, int64_t k1, uint64_t seed, uint32_t thr,
                        float scale) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0)), m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  __m256i key0[kRounds], key1[kRounds];
  for (int r = 0; r < kRounds; ++r) {
    key0[r] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed) + r * kW0));
    key1[r] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32) + r * kW1));
  }
  const __m256i vthr = _mm256_set1_epi32(static_cast<int>(thr));
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t k = k0; k < k1; ++k) {
    for (int half = 0; half < 2; ++half) {  // lanes 0-7, then 8-15
      __m256i c0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(k)));
      __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(static_cast<uint64_t>(k) >> 32)));
      __m256i c2 = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * half));
      __m256i c3 = _mm256_setzero_si256();
      for (int r = 0; r < kRounds; ++r) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo(c0, m0, &hi0, &lo0);
        mulhilo(c2, m1, &hi1, &lo1);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), key0[r]);
        c1 = lo1;
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), key1[r]);
        c3 = lo0;
      }
      const __m256i words[4] = {c0, c1, c2, c3};
      const int64_t base = k * kChunk + 8 * half;
      for (int j = 0; j < 4; ++j) {
        // unsigned w >= thr  <=>  max(w, thr) == w
        const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(words[j], vthr), words[j]);
        const __m256 v = _mm256_loadu_ps(x + base + 16 * j);
        _mm256_storeu_ps(out + base + 16 * j, _mm256_mul_ps(v, _mm256_and_ps(_mm256_castsi256_ps(keep), vscale)));
      }
    }
  }
}

}  // namespace

void philox4x32_10(uint32_t c[4], uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0], p1 = static_cast<uint64_t>(kM1) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0, n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = static_cast<uint32_t>(p1);
    c[2] = n2;
    c[3] = static_cast<uint32_t>(p0);
    k0 += kW0;
    k1 += kW1;
  }
}

uint32_t dropout_threshold(double p) {
  if (!(p > 0.0)) return 0;
  const double t = std::nearbyint(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

Status dropout_cpu(const float* x, float* out, int64_t n, uint64_t seed, uint32_t threshold, float scale) {
  if (n < 0 || (n > 0 && (x == nullptr || out == nullptr))) return Status::kInvalidArgument;
  const int64_t full = n / kChunk, chunks = (n + kChunk - 1) / kChunk;
  const int level = detail::isa_level();
  parallel_for(chunks, 512, [&](int64_t k0, int64_t k1) {
    const int64_t vend = std::min(k1, full);  // vector code for whole chunks only
    if (k0 < vend && level >= 2) {
      range_avx512(x, out, k0, vend, seed, threshold, scale);
      k0 = vend;
    } else if (k0 < vend && level == 1) {
      range_avx2(x, out, k0, vend, seed, threshold, scale);
      k0 = vend;
    }
    for (int64_t k = k0; k < k1; ++k) chunk_scalar(x, out, n, k, seed, threshold, scale);
  });
  return Status::kOk;
}

}  // namespace qx

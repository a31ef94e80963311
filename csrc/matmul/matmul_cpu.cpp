// CPU 4-bit matmul: a fused dequantize-multiply for small M and the row tiles of the large-M path.
// Rows of W are decoded a chunk at a time into an L1-resident buffer by the same per-ISA kernels as
// dequantize_4bit (so the weights used are exactly the dequantized ones), then dotted with every row of x.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/convert.h"
#include "../common/parallel.h"
#include "../quant/quant_cpu_detail.h"
#include "matmul.h"

namespace qx {
namespace {

constexpr int64_t kChunk = 512;  // weights decoded per step: 2 KiB of floats, stays in L1

float dot_scalar(const float* x, const float* w, int64_t len) {
  float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) a0 += x[i] * w[i], a1 += x[i + 1] * w[i + 1], a2 += x[i + 2] * w[i + 2], a3 += x[i + 3] * w[i + 3];
  for (; i < len; ++i) a0 += x[i] * w[i];
  return (a0 + a1) + (a2 + a3);
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* x, const float* w, int64_t len) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(w + i + 8), a1);
  }
  __m256 a = _mm256_add_ps(a0, a1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; i < len; ++i) s += x[i] * w[i];
  return s;
}

__attribute__((target("avx512f"))) float dot_avx512(const float* x, const float* w, int64_t len) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(w + i + 16), a1);
  }
  for (; i < len; i += 16) {  // masked tail: no scalar loop
    __mmask16 m = len - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - i)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, w + i), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

using DotFn = float (*)(const float*, const float*, int64_t);
DotFn pick_dot() {
  switch (detail::isa_level()) {
    case 2: return dot_avx512;
    case 1: return dot_avx2;
    default: return dot_scalar;
  }
}

bool valid(const Weight4& w) {
  if (w.N <= 0 || w.K <= 0 || !w.packed || !valid_blocksize_4bit(w.blocksize)) return false;
  const AbsmaxView& s = w.scales;
  return s.double_quant() ? (s.nested_absmax && s.nested_code && s.nested_blocksize > 0) : s.absmax != nullptr;
}

}  // namespace

Status dequantize_4bit_rows_cpu(const Weight4& w, int64_t n0, int64_t n1, void* out, DType odt) {
  if (!valid(w) || n0 < 0 || n1 > w.N || n0 > n1 || (!out && n1 > n0)) return Status::kInvalidArgument;
  const float* code = code4(w.qt);
  const int64_t K = w.K;
  parallel_for(n1 - n0, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    char* o = static_cast<char*>(out) + r0 * K * dtype_size(odt);
    detail::dequantize_4bit_range(w.packed, w.scales, w.blocksize, code, o, odt, (n0 + r0) * K, (n0 + r1) * K);
  });
  return Status::kOk;
}

Status gemv_4bit_cpu(const void* x, DType xdt, int64_t M, const Weight4& w, void* out, DType odt) {
  if (!valid(w) || M < 0 || M > kGemvMaxM || (M > 0 && (!x || !out))) return Status::kInvalidArgument;
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
  const DotFn dot = pick_dot();
  // ~32K weights per task: enough work to amortize the hand-off, enough tasks to balance two cores
  parallel_for(N, std::max<int64_t>(1, 32768 / K), [&](int64_t r0, int64_t r1) {
    alignas(64) float wbuf[kChunk];
    float acc[kGemvMaxM];
    for (int64_t n = r0; n < r1; ++n) {
      std::fill(acc, acc + M, 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t len = std::min(kChunk, K - k0);
        detail::dequantize_4bit_range(w.packed, w.scales, w.blocksize, code, wbuf, DType::kFloat32, n * K + k0,
                                      n * K + k0 + len);
        for (int64_t m = 0; m < M; ++m) acc[m] += dot(xf + m * K + k0, wbuf, len);
      }
      for (int64_t m = 0; m < M; ++m) store_elem(out, odt, m * N + n, acc[m]);
    }
  });
  return Status::kOk;
}

}  // namespace qx

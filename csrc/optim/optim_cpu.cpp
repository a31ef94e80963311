// CPU optimizer steps (optim.h): AdamW and Lion with float32 or blockwise 8-bit state, params in float32 /
// float16 / bfloat16, one pass over memory, multithreaded on qx::parallel_for, vectorized for AVX-512 and AVX2
// with a scalar fallback (the instruction set the quantization kernels picked, QLORA_EXT_CPU_ISA caps it).
// The update is written once (optim_cpu_body.inc) and instantiated per ISA below; built with
// -ffp-contract=off so that no ISA fuses a multiply-add and all of them give the same bits.
// GCC 12 reports the intrinsics' internal "undefined" registers as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "../common/convert.h"
#include "../common/parallel.h"
#include "../quant/quant.h"
#include "../quant/quant_cpu_detail.h"
#include "optim.h"
#include "optim_cpu_detail.h"

namespace qx {
namespace {

// Nearest-code encoding of one dynamic map by one table lookup. The 65536 floats sharing their top 16 bits (a
// "bucket": sign, exponent, 7 mantissa bits) hold at most one decision point of the map (checked when the table
// is built), so lut[bits >> 16] = base | (t << 8) gives the code exactly: base, plus one if the value's position
// in its bucket (low 16 bits, reversed for negative floats so that it grows with the value) is >= t
// (t = 0x10000: no decision point in the bucket). NaN, the only non-monotone case, encodes to 0.
struct Encoder {
  alignas(64) uint32_t lut[65536];
};

bool build_encoder(const float* code, Encoder* e) {
  for (uint32_t key = 0; key < 65536; ++key) {
    const bool neg = key & 0x8000u;
    auto at = [&](uint32_t pos) { return bits_to_float((key << 16) | (neg ? 0xffffu - pos : pos)); };
    if ((key & 0x7f80u) == 0x7f80u) {  // +-Inf (position 0 of +Inf's bucket, 0xffff of -Inf's) and NaNs
      e->lut[key] = quantize_nearest8(code, at(neg ? 0xffffu : 0u)) | (0x10000u << 8);
      continue;
    }
    // quantize_nearest8 is monotone in the value: bisect the bucket for its decision point, if any.
    const uint32_t lo = quantize_nearest8(code, at(0)), hi = quantize_nearest8(code, at(0xffff));
    if (hi > lo + 1) return false;
    uint32_t t = 0x10000u;
    if (hi != lo) {
      uint32_t a = 0, b = 0xffff;  // encodes to lo at a, to hi at b
      while (b - a > 1) {
        const uint32_t mid = a + (b - a) / 2;
        (quantize_nearest8(code, at(mid)) == hi ? b : a) = mid;
      }
      t = b;
    }
    e->lut[key] = lo | (t << 8);
  }
  return true;
}

struct Maps {  // the 8-bit state's code tables, their encoders and the index of 0.0 in each (for padding)
  const float* s;
  const float* u;
  Encoder enc_s, enc_u;
  uint8_t zero_s, zero_u;
  bool ok;  // both maps have at most one decision point per bucket (true for the format's maps)
};

const Maps& maps() {
  static const Maps* m = [] {
    Maps* r = new Maps();
    r->s = dynamic_map(true);
    r->u = dynamic_map(false);
    r->ok = build_encoder(r->s, &r->enc_s) && build_encoder(r->u, &r->enc_u);
    r->zero_s = quantize_nearest8(r->s, 0.0f);
    r->zero_u = quantize_nearest8(r->u, 0.0f);
    return r;
  }();
  return *m;
}

// ------------------------------------------------------------------------------------------------
// Scalar: one lane.
// ------------------------------------------------------------------------------------------------
namespace isa_scalar {
#define QX_FN inline
constexpr int W = 1;
using V = float;
using M = bool;
using I = int32_t;
QX_FN V set1(float x) { return x; }
QX_FN V add(V a, V b) { return a + b; }
QX_FN V sub(V a, V b) { return a - b; }
QX_FN V mul(V a, V b) { return a * b; }
QX_FN V div(V a, V b) { return a / b; }
QX_FN V vsqrt(V a) { return std::sqrt(a); }
QX_FN V vabs(V a) { return std::fabs(a); }
QX_FN V vmax(V a, V b) { return a > b ? a : b; }
QX_FN M lt(V a, V b) { return a < b; }
QX_FN M gt(V a, V b) { return a > b; }
QX_FN M le(V a, V b) { return a <= b; }
QX_FN M mand(M a, M b) { return a && b; }
QX_FN M finite(V a) { return std::fabs(a) < std::numeric_limits<float>::infinity(); }
QX_FN V select(M m, V a, V b) { return m ? a : b; }
QX_FN I iset1(int x) { return x; }
QX_FN I iadd(I a, int b) { return a + b; }
QX_FN I iselect(M m, I a, I b) { return m ? a : b; }
QX_FN V gather(const float* t, I i) { return t[i]; }
QX_FN I load_idx(const uint8_t* p) { return *p; }
QX_FN void store_idx(uint8_t* p, I i) { *p = static_cast<uint8_t>(i); }
QX_FN V load(const float* p) { return *p; }
QX_FN void store(float* p, V v) { *p = v; }
QX_FN float hmax(V v) { return v; }
template <DType D>
QX_FN V load_p(const void* p, int64_t i) { return load_elem(p, D, i); }
template <DType D>
QX_FN void store_p(void* p, int64_t i, V v) { store_elem(p, D, i, v); }
QX_FN I nearest(const Encoder& e, V x) {
  if (x != x) return 0;
  const uint32_t b = float_to_bits(x), ent = e.lut[b >> 16];
  const uint32_t pos = (b & 0xffffu) ^ ((b >> 31) ? 0xffffu : 0u);
  return static_cast<I>((ent & 0xffu) + (pos >= (ent >> 8) ? 1u : 0u));
}
#include "optim_cpu_body.inc"
#undef QX_FN
}  // namespace isa_scalar

// ------------------------------------------------------------------------------------------------
// AVX2: 8 lanes; masks are all-ones float lanes.
// ------------------------------------------------------------------------------------------------
namespace isa_avx2 {
#define QX_FN __attribute__((target("avx2,fma,f16c"))) inline
constexpr int W = 8;
using V = __m256;
using M = __m256;
using I = __m256i;
QX_FN V set1(float x) { return _mm256_set1_ps(x); }
QX_FN V add(V a, V b) { return _mm256_add_ps(a, b); }
QX_FN V sub(V a, V b) { return _mm256_sub_ps(a, b); }
QX_FN V mul(V a, V b) { return _mm256_mul_ps(a, b); }
QX_FN V div(V a, V b) { return _mm256_div_ps(a, b); }
QX_FN V vsqrt(V a) { return _mm256_sqrt_ps(a); }
QX_FN V vabs(V a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
QX_FN V vmax(V a, V b) { return _mm256_max_ps(a, b); }
QX_FN M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
QX_FN M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
QX_FN M le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
QX_FN M mand(M a, M b) { return _mm256_and_ps(a, b); }
QX_FN M finite(V a) { return lt(vabs(a), set1(std::numeric_limits<float>::infinity())); }
QX_FN V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
QX_FN I iset1(int x) { return _mm256_set1_epi32(x); }
QX_FN I iadd(I a, int b) { return _mm256_add_epi32(a, _mm256_set1_epi32(b)); }
QX_FN I iselect(M m, I a, I b) {
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a), m));
}
QX_FN V gather(const float* t, I i) { return _mm256_i32gather_ps(t, i, 4); }
QX_FN I load_idx(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
QX_FN void store_idx(uint8_t* p, I i) {  // indices are 0..255: two saturating packs keep them exactly
  __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}
QX_FN V load(const float* p) { return _mm256_loadu_ps(p); }
QX_FN void store(float* p, V v) { _mm256_storeu_ps(p, v); }
QX_FN float hmax(V v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
template <DType D>
QX_FN V load_p(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (D == DType::kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <DType D>
QX_FN void store_p(void* p, int64_t i, V v) {
  if constexpr (D == DType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
    return;
  }
  __m128i h;
  if constexpr (D == DType::kFloat16) {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {  // round to nearest even, NaN kept quiet: float_to_bf16 (convert.h) per lane
    const __m256i u = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
    r = _mm256_srli_epi32(r, 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
}
QX_FN I nearest(const Encoder& e, V x) {  // the scalar rule per lane, one gather
  const I b = _mm256_castps_si256(x), low = _mm256_set1_epi32(0xffff);
  const I ent = _mm256_i32gather_epi32(reinterpret_cast<const int*>(e.lut), _mm256_srli_epi32(b, 16), 4);
  const I pos = _mm256_xor_si256(_mm256_and_si256(b, low), _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 16));
  // base + 1 - (t > pos); positions and t are below 2^17, so the signed compare is exact
  I idx = _mm256_add_epi32(_mm256_and_si256(ent, _mm256_set1_epi32(0xff)), _mm256_set1_epi32(1));
  idx = _mm256_add_epi32(idx, _mm256_cmpgt_epi32(_mm256_srli_epi32(ent, 8), pos));
  return _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)), idx);  // NaN -> 0
}
#include "optim_cpu_body.inc"
#undef QX_FN
}  // namespace isa_avx2

// ------------------------------------------------------------------------------------------------
// AVX-512: 16 lanes; masks are __mmask16.
// ------------------------------------------------------------------------------------------------
namespace isa_avx512 {
#define QX_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) inline
constexpr int W = 16;
using V = __m512;
using M = __mmask16;
using I = __m512i;
QX_FN V set1(float x) { return _mm512_set1_ps(x); }
QX_FN V add(V a, V b) { return _mm512_add_ps(a, b); }
QX_FN V sub(V a, V b) { return _mm512_sub_ps(a, b); }
QX_FN V mul(V a, V b) { return _mm512_mul_ps(a, b); }
QX_FN V div(V a, V b) { return _mm512_div_ps(a, b); }
QX_FN V vsqrt(V a) { return _mm512_sqrt_ps(a); }
QX_FN V vabs(V a) { return _mm512_abs_ps(a); }
QX_FN V vmax(V a, V b) { return _mm512_max_ps(a, b); }
QX_FN M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
QX_FN M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
QX_FN M le(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
QX_FN M mand(M a, M b) { return static_cast<M>(a & b); }
QX_FN M finite(V a) { return lt(vabs(a), set1(std::numeric_limits<float>::infinity())); }
QX_FN V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
QX_FN I iset1(int x) { return _mm512_set1_epi32(x); }
QX_FN I iadd(I a, int b) { return _mm512_add_epi32(a, _mm512_set1_epi32(b)); }
QX_FN I iselect(M m, I a, I b) { return _mm512_mask_blend_epi32(m, b, a); }
QX_FN V gather(const float* t, I i) { return _mm512_i32gather_ps(i, t, 4); }
QX_FN I load_idx(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
QX_FN void store_idx(uint8_t* p, I i) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(i)); }
QX_FN V load(const float* p) { return _mm512_loadu_ps(p); }
QX_FN void store(float* p, V v) { _mm512_storeu_ps(p, v); }
QX_FN float hmax(V v) { return _mm512_reduce_max_ps(v); }
template <DType D>
QX_FN V load_p(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (D == DType::kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <DType D>
QX_FN void store_p(void* p, int64_t i, V v) {
  if constexpr (D == DType::kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(p) + i, v);
    return;
  }
  __m256i h;
  if constexpr (D == DType::kFloat16) {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {  // round to nearest even, NaN kept quiet: float_to_bf16 (convert.h) per lane
    const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    h = _mm512_cvtepi32_epi16(r);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), h);
}
QX_FN I nearest(const Encoder& e, V x) {  // the scalar rule per lane, one gather
  const I b = _mm512_castps_si512(x), low = _mm512_set1_epi32(0xffff);
  const I ent = _mm512_i32gather_epi32(_mm512_srli_epi32(b, 16), e.lut, 4);
  const I pos = _mm512_xor_si512(_mm512_and_si512(b, low), _mm512_srli_epi32(_mm512_srai_epi32(b, 31), 16));
  I idx = _mm512_and_si512(ent, _mm512_set1_epi32(0xff));
  idx = _mm512_mask_add_epi32(idx, _mm512_cmpge_epi32_mask(pos, _mm512_srli_epi32(ent, 8)), idx, _mm512_set1_epi32(1));
  return _mm512_mask_mov_epi32(idx, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_setzero_si512());  // NaN -> 0
}
#include "optim_cpu_body.inc"
#undef QX_FN
}  // namespace isa_avx512

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Float32 state: tasks are runs of 64 elements (so every thread's range starts on a cache line when the
// tensors do); ~256 KiB of traffic per task at least, so small tensors stay on one thread.
constexpr int64_t kUnit = 64;
constexpr int64_t kGrainUnits = 128;
constexpr int64_t kGrainBlocks = 32;  // 8-bit state: 8192 elements per task at least

}  // namespace

namespace detail {
void encode8_cpu(bool is_signed, const float* x, int64_t n, uint8_t* q) {
  const Encoder& e = is_signed ? maps().enc_s : maps().enc_u;
  switch (isa_level()) {
    case 2: isa_avx512::encode_values(x, n, e, q); break;
    case 1: isa_avx2::encode_values(x, n, e, q); break;
    default: isa_scalar::encode_values(x, n, e, q); break;
  }
}
}  // namespace detail

Status optim_hyper(OptimKind kind, double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step, OptimHyper* out) {
  const bool ok = out && step >= 1 && lr >= 0 && eps >= 0 && weight_decay >= 0 && beta1 >= 0 && beta1 < 1 &&
                  beta2 >= 0 && beta2 < 1 && std::isfinite(lr) && std::isfinite(eps) && std::isfinite(weight_decay);
  if (!ok) return Status::kInvalidArgument;
  OptimHyper h;
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  if (kind == OptimKind::kAdamW) {
    // As torch.optim.AdamW computes them (Python floats): lr / (1 - beta1^t) and sqrt(1 - beta2^t).
    const double t = static_cast<double>(step);
    h.neg_step = static_cast<float>(-(lr / (1.0 - std::pow(beta1, t))));
    h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  } else {
    h.neg_step = static_cast<float>(-lr);
    h.bc2_sqrt = 1.0f;
  }
  *out = h;
  return Status::kOk;
}

Status optim_step_cpu(OptimKind kind, void* param, const void* grad, DType dtype, int64_t n, const OptimState& s,
                      const OptimHyper& h) {
  if (n < 0 || (kind != OptimKind::kAdamW && kind != OptimKind::kLion)) return Status::kInvalidArgument;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16)
    return Status::kUnsupported;
  if (n == 0) return Status::kOk;
  const bool adam = kind == OptimKind::kAdamW;
  if (!param || !grad) return Status::kInvalidArgument;
  if (s.eight_bit() ? (!s.absmax_m || (adam && (!s.qv || !s.absmax_v))) : (!s.m || (adam && !s.v)))
    return Status::kInvalidArgument;
  const int level = detail::isa_level();
  if (!s.eight_bit()) {
    parallel_for(ceil_div(n, kUnit), kGrainUnits, [&](int64_t u0, int64_t u1) {
      const int64_t e0 = u0 * kUnit, e1 = std::min(n, u1 * kUnit);
      if (level == 2) isa_avx512::run32(kind, dtype, param, grad, s, e0, e1, h);
      else if (level == 1) isa_avx2::run32(kind, dtype, param, grad, s, e0, e1, h);
      else isa_scalar::run32(kind, dtype, param, grad, s, e0, e1, h);
    });
  } else {
    const Maps& mp = maps();
    if (!mp.ok) return Status::kUnsupported;
    parallel_for(ceil_div(n, kOptimBlock), kGrainBlocks, [&](int64_t b0, int64_t b1) {
      if (level == 2) isa_avx512::run8(kind, dtype, param, grad, s, n, b0, b1, mp, h);
      else if (level == 1) isa_avx2::run8(kind, dtype, param, grad, s, n, b0, b1, mp, h);
      else isa_scalar::run8(kind, dtype, param, grad, s, n, b0, b1, mp, h);
    });
  }
  return Status::kOk;
}

}  // namespace qx

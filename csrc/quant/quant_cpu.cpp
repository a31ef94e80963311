// CPU kernels for blockwise 4-bit and 8-bit quantization: scalar reference semantics, with AVX2 and
// AVX-512 dequantize paths picked at run time. Bit-exact with the CUDA kernels on finite data (see quant_cuda.cu).
// Built with -ffp-contract=off: a fused multiply-add would change the last bit of the double-quantized
// scale (map * nested + offset must be two roundings, as in bitsandbytes).
// GCC 12 reports the intrinsics' internal "undefined" registers as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../common/convert.h"
#include "../common/parallel.h"
#include "codes.h"
#include "quant.h"
#include "quant_cpu_detail.h"

namespace qx {
namespace {

using detail::block_scale;

struct Tables {
  float nf4[16], fp4[16], dyn_signed[256], dyn_unsigned[256];
  float nf4_thr[15];     // decision thresholds between adjacent NF4 codes
  float fp4_mag_thr[7];  // thresholds between adjacent sorted FP4 magnitudes
  uint8_t fp4_mag_index[8];  // sorted magnitude rank -> low 3 bits of the FP4 code
  Tables() {
    for (int i = 0; i < 16; ++i) nf4[i] = bits_to_float(kNF4Bits[i]), fp4[i] = bits_to_float(kFP4Bits[i]);
    for (int i = 0; i < 256; ++i) {
      dyn_signed[i] = bits_to_float(kDynSignedBits[i]);
      dyn_unsigned[i] = bits_to_float(kDynUnsignedBits[i]);
    }
    // The spec: midpoints computed in double, compared in float32.
    for (int i = 0; i < 15; ++i) nf4_thr[i] = static_cast<float>((double(nf4[i]) + double(nf4[i + 1])) / 2.0);
    uint8_t order[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    std::sort(order, order + 8, [&](uint8_t a, uint8_t b) { return fp4[a] < fp4[b]; });
    for (int i = 0; i < 8; ++i) fp4_mag_index[i] = order[i];
    for (int i = 0; i < 7; ++i)
      fp4_mag_thr[i] = static_cast<float>((double(fp4[order[i]]) + double(fp4[order[i + 1]])) / 2.0);
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // no overflow for huge b

constexpr int64_t kStreamBytes = int64_t(32) << 20;

// Non-temporal stores need the vector's natural alignment; a misaligned segment uses ordinary stores.
inline bool can_stream(bool stream, const void* out, DType ot, int64_t i, int vec_elems) {
  uintptr_t addr = reinterpret_cast<uintptr_t>(out) + uintptr_t(i) * dtype_size(ot);
  return stream && addr % (uintptr_t(vec_elems) * dtype_size(ot)) == 0;
}


// ---- dequantize one block range, per ISA ----
// Each kernel handles blocks [b0, b1); elements of a block are [b*bs, min(n, (b+1)*bs)).

// Each kernel writes elements [e0, e1) of the flat tensor to out[0 .. e1 - e0), one block segment at a time.
void dequant4_scalar(const uint8_t* packed, const AbsmaxView& s, int64_t bs, const float* code, void* out, DType ot,
                     int64_t e0, int64_t e1) {
  for (int64_t seg = e0; seg < e1;) {
    const int64_t b = seg / bs, seg_end = std::min(e1, (b + 1) * bs);
    const float a = block_scale(s, b);
    for (int64_t i = seg; i < seg_end; ++i) {
      uint8_t byte = packed[i >> 1];
      store_elem(out, ot, i - e0, code[(i & 1) ? (byte & 0xf) : (byte >> 4)] * a);
    }
    seg = seg_end;
  }
}

#define QX_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

// 8 packed bytes -> 16 floats (two __m256): element 2j is the high nibble of byte j.
QX_AVX2 inline void avx2_unpack16(const uint8_t* p, __m256 lut_lo, __m256 lut_hi, __m256 va, __m256* v0,
                                  __m256* v1) {
  const __m256i dup0 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i dup1 = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i mask = _mm256_set1_epi32(0xf);
  __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  __m256i n0 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(w, dup0), shifts), mask);
  __m256i n1 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(w, dup1), shifts), mask);
  // 16-entry lookup from two 8-entry permutes; bit 3 of the nibble (moved to the sign bit) picks the half.
  __m256 r0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, n0), _mm256_permutevar8x32_ps(lut_hi, n0),
                               _mm256_castsi256_ps(_mm256_slli_epi32(n0, 28)));
  __m256 r1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, n1), _mm256_permutevar8x32_ps(lut_hi, n1),
                               _mm256_castsi256_ps(_mm256_slli_epi32(n1, 28)));
  *v0 = _mm256_mul_ps(r0, va);
  *v1 = _mm256_mul_ps(r1, va);
}

QX_AVX2 inline __m128i avx2_to_bf16(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                   _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  r = _mm256_srli_epi32(r, 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, qnan, nan);
  r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(r);
}

// `stream`: non-temporal store (the caller checked alignment); used for outputs far larger than the caches,
// where skipping the read-for-ownership of each destination line saves a third of the memory traffic.
QX_AVX2 inline void avx2_store8(void* out, DType ot, int64_t i, __m256 v, bool stream) {
  if (ot == DType::kFloat32) {
    float* p = static_cast<float*>(out) + i;
    stream ? _mm256_stream_ps(p, v) : _mm256_storeu_ps(p, v);
    return;
  }
  __m128i h = ot == DType::kFloat16 ? _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : avx2_to_bf16(v);
  __m128i* p = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i);
  stream ? _mm_stream_si128(p, h) : _mm_storeu_si128(p, h);
}

QX_AVX2 void dequant4_avx2(const uint8_t* packed, const AbsmaxView& s, int64_t bs, const float* code, void* out,
                           DType ot, int64_t e0, int64_t e1, bool stream) {
  const __m256 lut_lo = _mm256_loadu_ps(code), lut_hi = _mm256_loadu_ps(code + 8);
  const detail::Avx2Code4 tables = detail::avx2_code4(code);
  const int bs_shift = __builtin_ctzll(static_cast<unsigned long long>(bs));  // block sizes are powers of two
  for (int64_t seg = e0; seg < e1;) {
    const int64_t b = seg >> bs_shift, seg_end = std::min(e1, (b + 1) << bs_shift);
    const float a = block_scale(s, b);
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = seg;
    if (i & 1) {  // a segment starting mid-byte (odd row length): one element to reach a byte boundary
      store_elem(out, ot, i - e0, code[packed[i >> 1] & 0xf] * a);
      ++i;
    }
    const bool nt = can_stream(stream, out, ot, i - e0, 8);
    for (; i + 32 <= seg_end; i += 32) {  // the GEMV's byte-plane decode: ~3x the permute path's rate
      __m256 v[4];
      detail::avx2_decode32(packed + (i >> 1), tables, va, v);
      for (int j = 0; j < 4; ++j) avx2_store8(out, ot, i - e0 + 8 * j, v[j], nt);
    }
    for (; i + 16 <= seg_end; i += 16) {
      __m256 v0, v1;
      avx2_unpack16(packed + (i >> 1), lut_lo, lut_hi, va, &v0, &v1);
      avx2_store8(out, ot, i - e0, v0, nt);
      avx2_store8(out, ot, i - e0 + 8, v1, nt);
    }
    for (; i < seg_end; ++i) {
      uint8_t byte = packed[i >> 1];
      store_elem(out, ot, i - e0, code[(i & 1) ? (byte & 0xf) : (byte >> 4)] * a);
    }
    seg = seg_end;
  }
}

QX_AVX512 inline __m256i avx512_to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                   _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  r = _mm512_srli_epi32(r, 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

QX_AVX512 inline void avx512_store16(void* out, DType ot, int64_t i, __m512 v, bool stream) {
  if (ot == DType::kFloat32) {
    float* p = static_cast<float*>(out) + i;
    stream ? _mm512_stream_ps(p, v) : _mm512_storeu_ps(p, v);
    return;
  }
  __m256i h = ot == DType::kFloat16 ? _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                    : avx512_to_bf16(v);
  __m256i* p = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i);
  stream ? _mm256_stream_si256(p, h) : _mm256_storeu_si256(p, h);
}



QX_AVX512 void dequant4_avx512(const uint8_t* packed, const AbsmaxView& s, int64_t bs, const float* code,
                               void* out, DType ot, int64_t e0, int64_t e1, bool stream) {
  const __m512 lut = _mm512_loadu_ps(code);  // the whole 16-entry code fits one register
  const __m512i dup0 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i dup1 = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  // 16-bit outputs: an element depends only on its nibble and its block's scale, so each block gets a table
  // of its 16 values, rounded once (exactly as the element-wise path would round them, NaN and Inf
  // included), held twice over in the 32 words of one register. Then 32 elements are one word permute:
  // dword j of the index holds byte j >> 4 (element 2j) in its low word and byte j in its high word
  // (element 2j + 1), whose bit 4 (the high nibble's lowest bit) only selects the table's second copy.
  const bool half_out = ot != DType::kFloat32;
  for (int64_t seg = e0; seg < e1;) {
    const int64_t b = seg / bs, seg_end = std::min(e1, (b + 1) * bs);
    const float a = block_scale(s, b);
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = seg;
    if (i & 1) {  // a segment starting mid-byte (odd row length): one element to reach a byte boundary
      store_elem(out, ot, i - e0, code[packed[i >> 1] & 0xf] * a);
      ++i;
    }
    const bool nt = can_stream(stream, out, ot, i - e0, ot == DType::kFloat32 ? 16 : 32);
    if (half_out) {
      const __m512 vals = _mm512_mul_ps(lut, va);
      const __m256i h = ot == DType::kFloat16 ? _mm512_cvtps_ph(vals, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                              : avx512_to_bf16(vals);
      const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
      for (; i + 32 <= seg_end; i += 32) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (i >> 1))));
        const __m512i r = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi32(q, 4), _mm512_slli_epi32(q, 16)),
                                                   table);
        __m512i* p = reinterpret_cast<__m512i*>(static_cast<uint16_t*>(out) + (i - e0));
        nt ? _mm512_stream_si512(p, r) : _mm512_storeu_si512(p, r);
      }
    }
    for (; i + 32 <= seg_end; i += 32) {
      __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (i >> 1))));
      // vpermps reads only the low 4 bits of each index, so the nibbles need no masking after the shift
      __m512i n0 = _mm512_srlv_epi32(_mm512_permutexvar_epi32(dup0, w), shifts);
      __m512i n1 = _mm512_srlv_epi32(_mm512_permutexvar_epi32(dup1, w), shifts);
      avx512_store16(out, ot, i - e0, _mm512_mul_ps(_mm512_permutexvar_ps(n0, lut), va), nt);
      avx512_store16(out, ot, i - e0 + 16, _mm512_mul_ps(_mm512_permutexvar_ps(n1, lut), va), nt);
    }
    for (; i < seg_end; ++i) {
      uint8_t byte = packed[i >> 1];
      store_elem(out, ot, i - e0, code[(i & 1) ? (byte & 0xf) : (byte >> 4)] * a);
    }
    seg = seg_end;
  }
}

enum class Isa { kScalar, kAvx2, kAvx512 };
Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
  return Isa::kScalar;
}
Isa isa() {
  static const Isa v = [] {
    // QLORA_EXT_CPU_ISA=scalar|avx2|avx512 caps the choice (tests use it to cover every path on one machine;
    // avx512 keeps AVX-512 and turns off the bfloat16 GEMM, cpu_bf16_gemm).
    Isa best = detect_isa();
    if (const char* cap = std::getenv("QLORA_EXT_CPU_ISA")) {
      if (!std::strcmp(cap, "scalar")) return Isa::kScalar;
      if (!std::strcmp(cap, "avx2") && best != Isa::kScalar) return Isa::kAvx2;
    }
    return best;
  }();
  return v;
}

}  // namespace

namespace detail {
void dequantize_4bit_range(const uint8_t* packed, const AbsmaxView& scales, int64_t bs, const float* code, void* out,
                           DType ot, int64_t e0, int64_t e1, bool stream) {
  switch (isa()) {
    case Isa::kAvx512: dequant4_avx512(packed, scales, bs, code, out, ot, e0, e1, stream); break;
    case Isa::kAvx2: dequant4_avx2(packed, scales, bs, code, out, ot, e0, e1, stream); break;
    default: dequant4_scalar(packed, scales, bs, code, out, ot, e0, e1); break;
  }
  if (stream) _mm_sfence();  // make the non-temporal stores visible before the caller's join
}
int isa_level() { return static_cast<int>(isa()); }
}  // namespace detail

bool valid_blocksize_4bit(int64_t bs) {
  for (int64_t v = 32; v <= 4096; v *= 2)
    if (bs == v) return true;
  return false;
}
bool valid_blocksize_8bit(int64_t bs) { return bs >= 64 && valid_blocksize_4bit(bs); }

const float* code4(QuantType qt) { return qt == QuantType::kNF4 ? tables().nf4 : tables().fp4; }
const float* dynamic_map(bool is_signed) { return is_signed ? tables().dyn_signed : tables().dyn_unsigned; }

uint8_t quantize_nibble(QuantType qt, float s) {
  const Tables& t = tables();
  if (s != s) s = 0.0f;
  s = std::min(1.0f, std::max(-1.0f, s));
  if (qt == QuantType::kNF4) {
    uint8_t idx = 0;
    for (int i = 0; i < 15; ++i) idx += (s > t.nf4_thr[i]);
    return idx;
  }
  uint8_t sign = s < 0.0f ? 8 : 0;
  float m = std::fabs(s);
  int rank = 0;
  for (int i = 0; i < 7; ++i) rank += (m > t.fp4_mag_thr[i]);
  return uint8_t(sign | t.fp4_mag_index[rank]);
}

namespace {
// The grid rule of quantize_grid8 (quant.h), shared by the scalar helper and the table.
inline float grid8_value(int u) { return -1.0f + (2.0f * static_cast<float>(u)) / 65535.0f; }
inline int grid8_point(float v) {
  v = std::min(1.0f, std::max(-1.0f, v));
  return static_cast<int>(((v + 1.0f) * 0.5f) * 65535.0f + 0.5f);
}
void grid8_midpoints(const float* code, float* mid) {
  for (int j = 0; j < 255; ++j) mid[j] = 0.5f * (code[j] + code[j + 1]);
}
// number of midpoints below `val` (midpoints of a sorted map are sorted)
inline int grid8_count(const float* mid, float val) {
  int c = 0;
  for (int step = 128; step > 0; step >>= 1)
    if (c + step <= 255 && mid[c + step - 1] < val) c += step;
  return c;
}
}  // namespace

uint8_t quantize_nearest8(const float* code, float x) {
  // last index with code[i] <= x (0 when x is below the map), then the nearer of i and i + 1
  int lo = 0, hi = 255;
  if (!(x >= code[0])) return 0;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (code[mid] <= x) lo = mid; else hi = mid - 1;
  }
  if (lo < 255) {
    float dl = std::fabs(x - code[lo]), dr = std::fabs(x - code[lo + 1]);
    if (dr < dl) ++lo;
  }
  return uint8_t(lo);
}

uint8_t quantize_grid8(const float* code, float normed) {
  float mid[255];
  grid8_midpoints(code, mid);
  return static_cast<uint8_t>(grid8_count(mid, grid8_value(grid8_point(normed))));
}

void cpu_set_num_threads(int n) { set_num_threads(n); }
int cpu_num_threads() { return num_threads(); }
// AVX512-BF16 present and not capped away (QLORA_EXT_CPU_ISA below avx512bf16).
static bool bf16_dot() {
  static const bool v = [] {
    const char* cap = std::getenv("QLORA_EXT_CPU_ISA");
    return isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16") &&
           (!cap || !std::strcmp(cap, "avx512bf16"));
  }();
  return v;
}
bool cpu_bf16_gemm() {
  static const bool v = [] {
    const char* f = std::getenv("QLORA_EXT_CPU_BF16_GEMM");
    return f && (!std::strcmp(f, "0") || !std::strcmp(f, "1")) ? f[0] == '1' : bf16_dot();
  }();
  return v;
}
const char* cpu_isa() {
  switch (isa()) {
    case Isa::kAvx512: return bf16_dot() && cpu_bf16_gemm() ? "avx512bf16" : "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

Status quantize_4bit_cpu(const void* A, DType dtype, int64_t n, int64_t bs, QuantType qt, uint8_t* packed,
                         float* absmax) {
  if (n < 0 || !valid_blocksize_4bit(bs)) return Status::kInvalidArgument;
  if (n == 0) return Status::kOk;
  if (!A || !packed || !absmax) return Status::kInvalidArgument;
  const Tables& t = tables();
  std::atomic<bool> nonfinite{false};
  int64_t nblocks = ceil_div(n, bs);
  parallel_for(nblocks, std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    float s[4096 + 2];
    uint8_t nib[4096 + 2];
    bool bad = false;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * bs;
      const int len = static_cast<int>(std::min(n - e0, bs));  // 1..4096
      if (len <= 0) continue;
      float amax = 0.0f;
      for (int j = 0; j < len; ++j) {
        float x = load_elem(A, dtype, e0 + j);
        s[j] = x;
        bad |= !std::isfinite(x);
        amax = std::max(amax, std::fabs(x));
      }
      absmax[b] = amax;
      float r = 1.0f / amax;
      if (qt == QuantType::kNF4) {
        for (int j = 0; j < len; ++j) {
          float v = s[j] * r;
          v = (v != v || amax == 0.0f) ? 0.0f : v;
          v = std::min(1.0f, std::max(-1.0f, v));
          uint8_t idx = 0;
          for (int i = 0; i < 15; ++i) idx += (v > t.nf4_thr[i]);
          nib[j] = idx;
        }
      } else {
        for (int j = 0; j < len; ++j) {
          float v = s[j] * r;
          nib[j] = quantize_nibble(qt, amax == 0.0f ? 0.0f : v);
        }
      }
      // An odd element count: the element past the end is quantized as 0.0 with this block's scale, as
      // bitsandbytes' CUDA kernels load it (NF4: 0b0111, FP4: 0b0000).
      if (len & 1) nib[len] = quantize_nibble(qt, 0.0f);
      // blocks are even-sized so every block starts on a byte boundary
      for (int j = 0; j < len; j += 2) packed[(e0 + j) >> 1] = uint8_t((nib[j] << 4) | nib[j + 1]);
    }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
  });
  return nonfinite.load() ? Status::kNonFinite : Status::kOk;
}

Status dequantize_4bit_cpu(const uint8_t* packed, const AbsmaxView& scales, int64_t n, int64_t bs, QuantType qt,
                           void* out, DType ot) {
  if (n < 0 || !valid_blocksize_4bit(bs)) return Status::kInvalidArgument;
  if (n == 0) return Status::kOk;
  if (!packed || !out) return Status::kInvalidArgument;
  if (scales.double_quant() ? (!scales.nested_absmax || !scales.nested_code || scales.nested_blocksize <= 0)
                            : !scales.absmax)
    return Status::kInvalidArgument;
  const float* code = code4(qt);
  // Outputs well beyond the last-level cache go around it (non-temporal stores); smaller ones stay cached
  // for the consumer that reads them next.
  const bool stream = n * dtype_size(ot) >= kStreamBytes;
  // ~64 KiB of output per task keeps the two cores busy without splitting tiny tensors
  parallel_for(ceil_div(n, bs), std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    const int64_t e0 = b0 * bs, e1 = std::min(n, b1 * bs);
    char* o = static_cast<char*>(out) + e0 * dtype_size(ot);
    detail::dequantize_4bit_range(packed, scales, bs, code, o, ot, e0, e1, stream);
  });
  return Status::kOk;
}

Status quantize_8bit_cpu(const float* A, int64_t n, int64_t bs, const float* code, uint8_t* out, float* absmax) {
  if (n < 0 || bs <= 0) return Status::kInvalidArgument;
  if (n == 0) return Status::kOk;
  if (!A || !code || !out || !absmax) return Status::kInvalidArgument;
  // the 65536-entry table of grid point -> code (one sweep), then one lookup per element
  std::vector<uint8_t> table(65536);
  {
    float mid[255];
    grid8_midpoints(code, mid);
    int c = 0;
    for (int u = 0; u < 65536; ++u) {
      const float val = grid8_value(u);
      while (c < 255 && mid[c] < val) ++c;
      table[u] = static_cast<uint8_t>(c);
    }
  }
  std::atomic<bool> nonfinite{false};
  parallel_for(ceil_div(n, bs), std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    bool bad = false;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t e0 = b * bs, e1 = std::min(n, e0 + bs);
      float amax = 0.0f;
      for (int64_t i = e0; i < e1; ++i) {
        bad |= !std::isfinite(A[i]);
        amax = std::max(amax, std::fabs(A[i]));
      }
      absmax[b] = amax;
      const float r = 1.0f / amax;
      for (int64_t i = e0; i < e1; ++i) out[i] = amax == 0.0f ? 0 : table[grid8_point(A[i] * r)];
    }
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
  });
  return nonfinite.load() ? Status::kNonFinite : Status::kOk;
}

Status dequantize_8bit_cpu(const uint8_t* A, const float* absmax, const float* code, int64_t n, int64_t bs,
                           void* out, DType ot) {
  if (n < 0 || bs <= 0) return Status::kInvalidArgument;
  if (n == 0) return Status::kOk;
  if (!A || !absmax || !code || !out) return Status::kInvalidArgument;
  parallel_for(ceil_div(n, bs), std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float a = absmax[b];
      int64_t e0 = b * bs, e1 = std::min(n, e0 + bs);
      for (int64_t i = e0; i < e1; ++i) store_elem(out, ot, i, code[A[i]] * a);
    }
  });
  return Status::kOk;
}

}  // namespace qx

// Internals of the CPU quantization kernels shared with the CPU matmul (same library, not public API).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "quant.h"

namespace qx {
namespace detail {

// Writes elements [e0, e1) of the dequantized flat tensor to out[0 .. e1 - e0) (single-threaded, the
// instruction set chosen at run time). Ranges need not be block- or byte-aligned. `stream`: write with
// non-temporal stores where aligned (for outputs much larger than the caches).
void dequantize_4bit_range(const uint8_t* packed, const AbsmaxView& scales, int64_t blocksize, const float* code,
                           void* out, DType out_dtype, int64_t e0, int64_t e1, bool stream = false);

// The float32 scale of block b, decoding double quantization as map * nested + offset: two roundings, as
// in bitsandbytes (the library is built with -ffp-contract=off so no FMA merges them). The nested group is
// a shift for power-of-two nested block sizes (bitsandbytes always uses 256): a 64-bit division per block
// of 64 weights cost as much as decoding the block.
inline float block_scale(const AbsmaxView& s, int64_t b) {
  if (!s.double_quant()) return s.absmax[b];
  const int64_t nb = s.nested_blocksize;
  const int64_t g = (nb & (nb - 1)) == 0 ? (b >> __builtin_ctzll(static_cast<unsigned long long>(nb))) : b / nb;
  float a = s.nested_code[s.qabsmax[b]] * s.nested_absmax[g];
  return a + s.offset;
}

// 0 = scalar, 1 = AVX2, 2 = AVX-512 (the same choice the quantize kernels made).
int isa_level();

#if defined(__x86_64__) || defined(_M_X64)
// AVX2 decode of 32 weights in element order, shared by the dequantize kernel and the GEMV. AVX2 has no
// 16-entry float permute, so the 16-entry code is looked up a byte at a time: vpshufb over the code's four
// byte planes (byte b of every code value, one 16-byte table per plane, held twice in a register) gives four
// byte vectors, and two rounds of in-lane unpacks reassemble the float32 values. The index bytes are laid out
// so that the four vectors come out as weights 0-7, 8-15, 16-23, 24-31: lane 0 holds weights {0-3, 8-11,
// 16-19, 24-27} (packed bytes 0, 1, 4, 5, 8, 9, 12, 13), lane 1 the others; element 2j is the high nibble of
// byte j. Each value is code * scale, one float32 rounding, as the scalar kernels compute it.
struct Avx2Code4 {
  __m256i t0, t1, t2, t3;
};

__attribute__((target("avx2,fma"))) inline Avx2Code4 avx2_code4(const float* code) {
  alignas(32) uint8_t planes[4][32];
  for (int i = 0; i < 16; ++i) {
    uint32_t u;
    std::memcpy(&u, code + i, 4);
    for (int b = 0; b < 4; ++b) planes[b][i] = planes[b][i + 16] = static_cast<uint8_t>(u >> (8 * b));
  }
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(planes[0])),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(planes[1])),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(planes[2])),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(planes[3]))};
}

// p: 16 packed bytes (32 weights); v[0..3] = weights 0-7, 8-15, 16-23, 24-31, each times va.
__attribute__((target("avx2,fma"))) inline void avx2_decode32(const uint8_t* p, const Avx2Code4& T, __m256 va,
                                                              __m256* v) {
  // each packed byte twice (one 16-bit word per byte, one byte per nibble)
  const __m256i dup = _mm256_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13,  //
                                       2, 2, 3, 3, 6, 6, 7, 7, 10, 10, 11, 11, 14, 14, 15, 15);
  const __m256i q = _mm256_shuffle_epi8(
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), dup);
  // word = byte | byte << 8: low byte <- high nibble (element 2j), high byte <- low nibble (2j + 1)
  const __m256i idx = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi16(0x000f)),
                                      _mm256_and_si256(q, _mm256_set1_epi16(0x0f00)));
  const __m256i b0 = _mm256_shuffle_epi8(T.t0, idx), b1 = _mm256_shuffle_epi8(T.t1, idx);
  const __m256i b2 = _mm256_shuffle_epi8(T.t2, idx), b3 = _mm256_shuffle_epi8(T.t3, idx);
  const __m256i l0 = _mm256_unpacklo_epi8(b0, b1), l1 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i h0 = _mm256_unpacklo_epi8(b2, b3), h1 = _mm256_unpackhi_epi8(b2, b3);
  v[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(l0, h0)), va);
  v[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(l0, h0)), va);
  v[2] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(l1, h1)), va);
  v[3] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(l1, h1)), va);
}
#endif

}  // namespace detail
}  // namespace qx

// Scalar element conversions shared by the CPU kernels: float32 <-> float16 / bfloat16 with round to
// nearest even and quiet NaNs, matching torch's own conversions bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "status.h"

namespace qx {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// ---- element conversions (round to nearest even, NaN kept quiet, as torch does) ----
inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000 | (man << 13));
  if (exp == 0) {
    float f = std::ldexp(float(man), -24);  // subnormal: exact in float32
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f), sign = (x >> 16) & 0x8000;
  uint32_t ax = x & 0x7fffffff;
  if (ax >= 0x7f800000) return uint16_t(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
  if (ax >= 0x477ff000) return uint16_t(sign | 0x7c00);  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000) {                                  // below the smallest normal half
    // add a magic number so the FPU does the round-to-nearest-even of the subnormal mantissa
    float r = bits_to_float(ax) + 0.5f;
    return uint16_t(sign | (float_to_bits(r) - 0x3f000000));
  }
  uint32_t mant_odd = (ax >> 13) & 1;
  ax += 0xc8000fff + mant_odd;  // rebias exponent (-112 << 23) and round
  return uint16_t(sign | (ax >> 13));
}
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffff) > 0x7f800000) return uint16_t((x >> 16) | 0x40);
  return uint16_t((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

inline float load_elem(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store_elem(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kFloat16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
  }
}

}  // namespace qx

// Internals of the CPU quantization kernels shared with the CPU matmul (same library, not public API).
#pragma once
#include <cstdint>

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

}  // namespace detail
}  // namespace qx

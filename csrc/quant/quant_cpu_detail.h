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

// 0 = scalar, 1 = AVX2, 2 = AVX-512 (the same choice the quantize kernels made).
int isa_level();

}  // namespace detail
}  // namespace qx

// Internals of the CPU optimizer kernels exposed to the C++ tests (not public API).
#pragma once
#include <cstdint>

namespace qx {
namespace detail {

// The 8-bit state encoder on its own: q[i] = nearest code of the signed (or unsigned) dynamic map to x[i], with
// the instruction set the kernels use. Must equal quantize_nearest8 for every float, NaN and Inf included.
void encode8_cpu(bool is_signed, const float* x, int64_t n, uint8_t* q);

}  // namespace detail
}  // namespace qx

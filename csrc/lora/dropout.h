// Torch-free launcher of the CPU LoRA dropout: out = x * keep / (1 - p), the keep mask drawn from a
// counter-based generator (Philox4x32-10, Salmon et al., SC'11) so that it is a pure function of (seed,
// element index). Nothing is stored for backward: applying the same call to the gradient applies the same mask,
// and recomputing a checkpointed forward with the same seed gives the same output.
//
// The stream: elements are taken in chunks of 64; element 64 * k + 16 * j + l (j < 4, l < 16) is kept iff word
// j of philox4x32_10(counter = {k mod 2^32, k / 2^32, l, 0}, key = {seed mod 2^32, seed / 2^32}) is >= threshold,
// so P(drop) = threshold / 2^32 exactly. Every instruction set (AVX-512: 16 lanes, AVX2: 8, scalar) produces
// the same mask; python_tests/test_dropout.py checks it against a pure-Python Philox.
#pragma once
#include <cstdint>

#include "../common/status.h"

namespace qx {

// One Philox4x32-10 block: ctr (4 words) is replaced by the output.
void philox4x32_10(uint32_t ctr[4], uint64_t key);

// The threshold that makes P(drop) the nearest multiple of 2^-32 to p (p in [0, 1); 0 keeps everything).
uint32_t dropout_threshold(double p);

// out[i] = keep(i) ? x[i] * scale : 0 for i < n (x, out: float32, may alias). kInvalidArgument for n < 0 or a
// null pointer with n > 0. Multithreaded over qx::parallel_for.
Status dropout_cpu(const float* x, float* out, int64_t n, uint64_t seed, uint32_t threshold, float scale);

}  // namespace qx

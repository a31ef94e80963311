// A small persistent thread pool for the torch-free CPU kernels: parallel_for over [0, n) in contiguous chunks.
#pragma once
#include <cstdint>
#include <functional>

namespace qx {

// Splits [0, n) into at most num_threads contiguous chunks of at least `grain` items and runs
// fn(begin, end) on each, the caller taking the first chunk. Nested calls run inline. Exceptions
// must not escape fn (the kernels report errors through return values).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

void set_num_threads(int n);  // <= 0 means hardware concurrency
int num_threads();

// Replaces the built-in pool, e.g. by the host framework's own (the torch layer installs at::parallel_for:
// on a 2-core machine torch's OpenMP workers keep spinning for milliseconds after each torch op, and a
// second pool competing with them for the cores ran our kernels up to 2x slower). nullptr restores ours.
using ParallelBackend = void (*)(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
void set_parallel_backend(ParallelBackend backend);

}  // namespace qx

#!/usr/bin/env bash
# CI job: the torch-free CPU kernels and their googletest suite built with AddressSanitizer + UBSan, then
# ctest under them (every instruction set the machine has: native, AVX2, scalar). Any out-of-bounds access,
# use after free, leak, signed overflow, misaligned load or other undefined behaviour fails the job.
# Usage: bash tools/ci_sanitize.sh   (needs cmake, a C++ compiler with -fsanitize, googletest)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=build/sanitize
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQLORA_EXT_SANITIZE=ON -DQX_WITH_CUDA=OFF >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_init_order=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$BUILD" --output-on-failure

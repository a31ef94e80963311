// Torch-free launchers for the fused optimizer steps (AdamW, Lion; float32 or blockwise 8-bit state) and for
// the paged (CUDA managed) memory that holds optimizer state. Contract: raw contiguous pointers, element
// counts, a cudaStream_t passed as void*; every launcher validates its arguments and returns a Status
// (never throws, never exits). CPU and CUDA updates agree bit for bit on finite data (same float32 operations in the same
// order, no FMA contraction: the CPU sources build with -ffp-contract=off, the CUDA ones with --fmad=false).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../common/status.h"

namespace qx {

enum class OptimKind : int { kAdamW = 0, kLion = 1 };

// Elements per float32 absmax of 8-bit state (signed dynamic map for the first moment, unsigned for the second).
constexpr int64_t kOptimBlock = 256;

// The per-step scalars of one update, computed once on the host in double and rounded to float32.
struct OptimHyper {
  float beta1 = 0, beta2 = 0;
  float one_minus_beta1 = 0, one_minus_beta2 = 0;
  float eps = 0;
  float decay = 1;      // 1 - lr * weight_decay (decoupled weight decay, applied first as torch's AdamW does)
  float neg_step = 0;   // AdamW: -lr / (1 - beta1^t); Lion: -lr
  float bc2_sqrt = 1;   // AdamW: sqrt(1 - beta2^t)
};

// Returns kInvalidArgument for a step < 1, a negative lr / eps / weight decay, or betas outside [0, 1).
Status optim_hyper(OptimKind kind, double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step, OptimHyper* out);

// State of one parameter tensor of n elements. Float32 state: m (and v for AdamW), n floats each. 8-bit state:
// qm (and qv), n bytes each, with absmax_m (absmax_v), ceil(n / kOptimBlock) floats each. Lion has no v.
struct OptimState {
  float* m = nullptr;
  float* v = nullptr;
  uint8_t* qm = nullptr;
  uint8_t* qv = nullptr;
  float* absmax_m = nullptr;
  float* absmax_v = nullptr;
  bool eight_bit() const { return qm != nullptr; }
};

// One update of param (and state) in place from grad; param and grad have the same dtype.
//   AdamW: p = p * decay;  m += (1 - b1) * (g - m);  v = v * b2 + ((1 - b2) * g) * g;
//          p += (neg_step * m) / (sqrt(v) / bc2_sqrt + eps)
//   Lion:  c = m * b1 + g * (1 - b1);  p = p * decay + neg_step * sign(c);  m = m * b2 + g * (1 - b2)
// 8-bit state is decoded (code[q] * absmax), updated in float32 and re-encoded per block of kOptimBlock with
// the block's new absmax and nearest rounding (ties to the lower code), all in one pass.
// Non-finite policy: an element whose gradient is NaN or +-Inf (AdamW: or whose squared gradient overflows)
// is skipped - its parameter and state keep their values; every other element is updated.
Status optim_step_cpu(OptimKind kind, void* param, const void* grad, DType dtype, int64_t n,
                      const OptimState& state, const OptimHyper& hyper);

// CUDA twin (device pointers; one kernel launch on `stream`, no synchronization).
Status optim_step_cuda(OptimKind kind, void* param, const void* grad, DType dtype, int64_t n,
                       const OptimState& state, const OptimHyper& hyper, void* stream);

// ---------------------------------------------------------------------------------------------
// Paged memory (CUDA managed memory; compiled with the CUDA kernels)
// ---------------------------------------------------------------------------------------------
// Free and total memory of `device` (cudaMemGetInfo).
Status cuda_mem_info(int device, size_t* free_bytes, size_t* total_bytes);
// cudaMallocManaged of `bytes` for `device`, refused with kOutOfMemory (nothing allocated) when `bytes` exceeds
// the device's free memory: oversubscribed managed memory can stall the whole machine. kUnsupported when the
// device cannot prefetch managed memory (no concurrent managed access). `free_bytes` receives the free memory
// seen by the check.
Status paged_alloc(int device, size_t bytes, void** ptr, size_t* free_bytes);
Status paged_free(void* ptr);
// Asynchronous migration of [ptr, ptr + bytes) to `device` (device < 0: host memory), ordered on `stream`.
Status paged_prefetch(const void* ptr, size_t bytes, int device, void* stream);

}  // namespace qx

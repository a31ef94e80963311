// CUDA error handling shared by every CUDA launcher: a failed CUDA call becomes Status::kCudaError right
// where it happened, and its cudaError_t (name and text) is kept for the torch layer's message
// (last_cuda_error() in status.h). The runtime's per-thread "last error" slot is always left empty, so no
// later op inherits or swallows the failure.
#pragma once
#include <cuda_runtime.h>

#include "status.h"

namespace qx {

// Records `e` (with `what`, the call or kernel that failed) as the calling thread's last CUDA failure,
// clears it from the runtime's last-error slot (a failed API call also parks it there) and returns
// kCudaError.
Status cuda_failed(cudaError_t e, const char* what);

inline Status cuda_ok(cudaError_t e, const char* what) { return e == cudaSuccess ? Status::kOk : cuda_failed(e, what); }

// Call at a launcher's entry, before the first launch: an error some earlier CUDA call left pending is
// reported now, as such, instead of being blamed on (or swallowed by) this op's launch check.
inline Status cuda_no_pending() {
  const cudaError_t e = cudaPeekAtLastError();
  return e == cudaSuccess ? Status::kOk : cuda_failed(e, "an earlier CUDA call (pending before this op)");
}

// Right after a <<<...>>> launch (cuda_no_pending() ran first): the launch's own configuration error.
// Faults inside the kernel are asynchronous and surface at the next synchronizing call.
inline Status launch_status(const char* kernel) { return cuda_ok(cudaGetLastError(), kernel); }

}  // namespace qx

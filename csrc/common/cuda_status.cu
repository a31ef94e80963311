// See cuda_status.cuh.
#include <string>

#include "cuda_status.cuh"

namespace qx {
namespace {
thread_local std::string t_last_cuda_error;
}

Status cuda_failed(cudaError_t e, const char* what) {
  cudaGetLastError();  // clear the slot (a failed API call sets it too); sticky errors stay in the context
  t_last_cuda_error = std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ") in " + what;
  return Status::kCudaError;
}

const char* last_cuda_error() { return t_last_cuda_error.c_str(); }

}  // namespace qx

// Status codes returned by every torch-free launcher; the torch layer turns a bad one into a Python error.
#pragma once

namespace qx {

enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // a size, block size or pointer that the kernel cannot work with
  kNonFinite = 2,        // NaN or Inf in an input that must be finite (quantize)
  kUnsupported = 3,      // a dtype / quant type combination that has no kernel
  kCudaError = 4,        // a CUDA runtime error (launch failure, bad device pointer, ...)
  kOutOfMemory = 5,      // a request larger than the free device memory (refused before allocating)
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kNonFinite: return "input contains NaN or Inf";
    case Status::kUnsupported: return "unsupported dtype or quant type";
    case Status::kCudaError: return "CUDA error";
    case Status::kOutOfMemory: return "request exceeds the free device memory";
  }
  return "unknown status";
}

// The CUDA error behind the calling thread's last kCudaError: "cudaErrorName (text) in <call>"; defined in
// cuda_status.cu (CUDA builds only).
const char* last_cuda_error();

// Element types the kernels read and write (float32 compute everywhere).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace qx

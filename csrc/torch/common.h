// Shared host-side pieces of the torch layer: short checks that raise errors naming shapes, dtype and
// quant-type conversions, and the one validation of a 4-bit weight's tensors (before any kernel reads them).
#pragma once
#include <torch/extension.h>

#include <sstream>
#include <string>

#ifdef QX_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../matmul/matmul.h"
#include "../quant/quant.h"

namespace qx_torch {

using qx::DType;
using qx::QuantType;
using qx::Status;

#define QX_CHECK(cond, ...) TORCH_CHECK(cond, "qlora_ext: ", __VA_ARGS__)

inline DType to_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: QX_CHECK(false, what, " must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;
}

inline QuantType to_quant_type(c10::string_view s) {
  if (s == "nf4") return QuantType::kNF4;
  if (s == "fp4") return QuantType::kFP4;
  QX_CHECK(false, "quant_type must be 'nf4' or 'fp4', got '", std::string(s), "'");
  return QuantType::kNF4;
}

inline void check_status(Status st, const std::string& context) {
#ifdef QX_WITH_CUDA
  // A CUDA failure names the CUDA error (cudaGetErrorName + cudaGetErrorString) and the call that failed.
  QX_CHECK(st != Status::kCudaError, context, ": CUDA error ", qx::last_cuda_error());
#endif
  QX_CHECK(st == Status::kOk, context, ": ", qx::status_string(st));
}

inline void check_blocksize_4bit(int64_t bs) {
  QX_CHECK(qx::valid_blocksize_4bit(bs), "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ",
           bs);
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  QX_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the packed weight is on ", ref.device());
}

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " " << t.scalar_type();
  return os.str();
}

#ifdef QX_WITH_CUDA
inline void* stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
#endif

// 8-bit block sizes above this are refused (they would only overflow the block-count arithmetic).
constexpr int64_t kMaxBlocksize8 = int64_t(1) << 31;

inline int64_t checked_numel(at::IntArrayRef shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    QX_CHECK(d >= 0, "shape ", shape, " has a negative dimension");
    QX_CHECK(d == 0 || n <= (int64_t(1) << 62) / d, "shape ", shape, " is too large");
    n *= d;
  }
  return n;
}

// A new contiguous tensor for an op's result: on CPU, outputs of at least kLargeOutputBytes come from
// 2 MiB-aligned mappings advised for transparent huge pages (large_alloc.cpp), elsewhere at::empty.
constexpr size_t kLargeOutputBytes = size_t(32) << 20;
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opts);

// Torch's CPU allocator with a cache of mapped blocks (large_alloc.cpp).
void cpu_block_cache(bool on, int64_t limit_bytes, int64_t min_bytes);
std::vector<int64_t> cpu_block_cache_stats();

struct WeightArgs {
  at::Tensor packed;  // viewed as bytes
  qx::AbsmaxView view;
  QuantType qt;
  int64_t blocksize;
};

// Validates a 4-bit weight of n elements given as the dequantize / matmul ops receive it.
inline WeightArgs weight_args(const at::Tensor& packed_in, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_code, double offset, int64_t nested_blocksize,
                              int64_t blocksize, c10::string_view quant_type, int64_t n) {
  WeightArgs wa;
  wa.qt = to_quant_type(quant_type);
  check_blocksize_4bit(blocksize);
  wa.blocksize = blocksize;
  // Any quant_storage dtype is the same bytes (FSDP stores them as bfloat16 / float32).
  wa.packed = packed_in.scalar_type() == at::kByte ? packed_in : packed_in.view(at::kByte);
  const at::Tensor& packed = wa.packed;
  QX_CHECK(packed.is_contiguous(), "the packed weight must be contiguous");
  QX_CHECK(packed.numel() == (n + 1) / 2, "packed weight has ", packed.numel(), " bytes but ", n,
           " elements need ", (n + 1) / 2);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  check_same_device(packed, absmax, "absmax");
  QX_CHECK(absmax.numel() == nblocks && absmax.is_contiguous(), "absmax has ", absmax.numel(), " entries but ", n,
           " elements with blocksize ", blocksize, " have ", nblocks, " blocks");
  const bool dq = nested_absmax.has_value();
  QX_CHECK(dq == nested_code.has_value(), "nested_absmax and nested_code must be given together");
  if (dq) {
    QX_CHECK(absmax.scalar_type() == at::kByte, "double-quantized absmax must be uint8, got ", absmax.scalar_type());
    QX_CHECK(nested_blocksize > 0 && nested_blocksize <= kMaxBlocksize8, "nested_blocksize must be in [1, 2**31], got ",
             nested_blocksize);
    const at::Tensor& na = *nested_absmax;
    const at::Tensor& nc = *nested_code;
    check_same_device(packed, na, "nested_absmax");
    check_same_device(packed, nc, "nested_code");
    const int64_t nnested = (nblocks + nested_blocksize - 1) / nested_blocksize;
    QX_CHECK(na.scalar_type() == at::kFloat && na.numel() == nnested && na.is_contiguous(),
             "nested_absmax must be float32 with ", nnested, " entries, got ", shape_str(na));
    QX_CHECK(nc.scalar_type() == at::kFloat && nc.numel() == 256 && nc.is_contiguous(),
             "nested_code must be 256 float32 values, got ", shape_str(nc));
    wa.view.qabsmax = absmax.data_ptr<uint8_t>();
    wa.view.nested_absmax = na.data_ptr<float>();
    wa.view.nested_code = nc.data_ptr<float>();
    wa.view.offset = static_cast<float>(offset);
    wa.view.nested_blocksize = nested_blocksize;
  } else {
    QX_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type());
    wa.view.absmax = absmax.data_ptr<float>();
  }
  return wa;
}

}  // namespace qx_torch

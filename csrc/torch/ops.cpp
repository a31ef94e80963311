// The torch layer: one schema registry (TORCH_LIBRARY) for every qlora_ext op, host-side argument checks
// that run before any kernel reads memory, and CPU / CUDA dispatch onto the torch-free launchers.
#include <torch/library.h>

#include "common.h"
#include "../common/parallel.h"
#include <ATen/Parallel.h>

namespace {

using namespace qx_torch;
// ------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A_in, int64_t blocksize,
                                                 c10::string_view quant_type) {
  QuantType qt = to_quant_type(quant_type);
  check_blocksize_4bit(blocksize);
  DType dt = to_dtype(A_in.scalar_type(), "the weight to quantize");
  QX_CHECK(A_in.numel() > 0, "cannot quantize an empty tensor (shape ", A_in.sizes(), ")");
  // Non-contiguous weights are handled by quantizing a contiguous copy (blocks follow row-major order).
  at::Tensor A = A_in.contiguous();
  const int64_t n = A.numel(), nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, A.options().dtype(at::kFloat));
  Status st;
  if (A.is_cpu()) {
    st = qx::quantize_4bit_cpu(A.data_ptr(), dt, n, blocksize, qt, packed.data_ptr<uint8_t>(),
                               absmax.data_ptr<float>());
  } else {
#ifdef QX_WITH_CUDA
    QX_CHECK(A.is_cuda(), "tensors must be on CPU or CUDA, got ", A.device());
    const c10::cuda::CUDAGuard guard(A.device());
    at::Tensor flag = at::zeros({1}, A.options().dtype(at::kInt));
    st = qx::quantize_4bit_cuda(A.data_ptr(), dt, n, blocksize, qt, packed.data_ptr<uint8_t>(),
                                absmax.data_ptr<float>(), flag.data_ptr<int>(), stream_of(A));
    if (st == Status::kOk && flag.item<int>() != 0) st = Status::kNonFinite;  // one sync: quantizing is rare
#else
    QX_CHECK(false, "this build of qlora_ext has no CUDA kernels; got a tensor on ", A.device());
    st = Status::kUnsupported;
#endif
  }
  QX_CHECK(st != Status::kNonFinite, "the weight of shape ", A.sizes(),
           " contains NaN or Inf; 4-bit quantization needs finite values");
  check_status(st, "quantize_4bit(" + shape_str(A) + ", blocksize=" + std::to_string(blocksize) + ")");
  return {packed, absmax};
}

void dequantize_4bit_out(const at::Tensor& packed_in, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                         double offset, int64_t nested_blocksize, int64_t blocksize, c10::string_view quant_type,
                         at::IntArrayRef shape, at::Tensor& out) {
  DType ot = to_dtype(out.scalar_type(), "the output dtype");
  const int64_t n = checked_numel(shape);
  WeightArgs wa = weight_args(packed_in, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize,
                              quant_type, n);
  const at::Tensor& packed = wa.packed;
  const qx::AbsmaxView& view = wa.view;
  const QuantType qt = wa.qt;
  QX_CHECK(out.numel() == n && out.is_contiguous(), "out must be a contiguous tensor of ", n, " elements, got ",
           out.sizes());
  check_same_device(packed, out, "out");
  if (n == 0) return;
  Status st;
  if (packed.is_cpu()) {
    st = qx::dequantize_4bit_cpu(packed.data_ptr<uint8_t>(), view, n, blocksize, qt, out.data_ptr(), ot);
  } else {
#ifdef QX_WITH_CUDA
    QX_CHECK(packed.is_cuda(), "tensors must be on CPU or CUDA, got ", packed.device());
    const c10::cuda::CUDAGuard guard(packed.device());
    st = qx::dequantize_4bit_cuda(packed.data_ptr<uint8_t>(), view, n, blocksize, qt, out.data_ptr(), ot,
                                  stream_of(packed));
#else
    QX_CHECK(false, "this build of qlora_ext has no CUDA kernels; got a tensor on ", packed.device());
    st = Status::kUnsupported;
#endif
  }
  check_status(st, "dequantize_4bit(packed " + shape_str(packed) + ", shape " + c10::str(shape) + ")");
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                           const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                           double offset, int64_t nested_blocksize, int64_t blocksize, c10::string_view quant_type,
                           at::IntArrayRef shape, at::ScalarType dtype) {
  to_dtype(dtype, "the output dtype");
  // Validate the buffers against the shape before allocating from it: a state claiming a huge shape over
  // small buffers is a bad checkpoint, not an allocation failure.
  weight_args(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize, quant_type,
              checked_numel(shape));
  at::Tensor out = empty_output(shape, packed.options().dtype(dtype));
  dequantize_4bit_out(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize, quant_type,
                      shape, out);
  return out;
}

void check_code256(const at::Tensor& code, const at::Tensor& ref) {
  check_same_device(ref, code, "code");
  QX_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256 && code.is_contiguous(),
           "code must be 256 contiguous float32 values, got ", shape_str(code));
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit(const at::Tensor& A_in, const at::Tensor& code, int64_t blocksize) {
  to_dtype(A_in.scalar_type(), "the input to 8-bit quantization");
  QX_CHECK(blocksize > 0 && blocksize <= kMaxBlocksize8, "blocksize must be in [1, 2**31], got ", blocksize);
  check_code256(code, A_in);
  // float16 / bfloat16 input (accepted, as bitsandbytes does) widens exactly to float32: same codes.
  at::Tensor A = A_in.to(at::kFloat).contiguous();
  const int64_t n = A.numel();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, A.options().dtype(at::kFloat));
  if (n == 0) return {out, absmax};
  Status st;
  if (A.is_cpu()) {
    st = qx::quantize_8bit_cpu(A.data_ptr<float>(), n, blocksize, code.data_ptr<float>(), out.data_ptr<uint8_t>(),
                               absmax.data_ptr<float>());
  } else {
#ifdef QX_WITH_CUDA
    const c10::cuda::CUDAGuard guard(A.device());
    at::Tensor flag = at::zeros({1}, A.options().dtype(at::kInt));
    st = qx::quantize_8bit_cuda(A.data_ptr<float>(), n, blocksize, code.data_ptr<float>(), out.data_ptr<uint8_t>(),
                                absmax.data_ptr<float>(), flag.data_ptr<int>(), stream_of(A));
    if (st == Status::kOk && flag.item<int>() != 0) st = Status::kNonFinite;  // one sync, as in quantize_4bit
#else
    QX_CHECK(false, "this build of qlora_ext has no CUDA kernels; got a tensor on ", A.device());
    st = Status::kUnsupported;
#endif
  }
  QX_CHECK(st != Status::kNonFinite, "the input of shape ", A.sizes(), " contains NaN or Inf");
  check_status(st, "quantize_8bit(" + shape_str(A) + ")");
  return {out, absmax};
}

at::Tensor dequantize_8bit(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                           at::ScalarType dtype) {
  DType ot = to_dtype(dtype, "the output dtype");
  QX_CHECK(A.scalar_type() == at::kByte && A.is_contiguous(), "A must be contiguous uint8, got ", shape_str(A));
  QX_CHECK(blocksize > 0 && blocksize <= kMaxBlocksize8, "blocksize must be in [1, 2**31], got ", blocksize);
  check_code256(code, A);
  check_same_device(A, absmax, "absmax");
  const int64_t n = A.numel(), nblocks = (n + blocksize - 1) / blocksize;
  QX_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == nblocks && absmax.is_contiguous(),
           "absmax must be float32 with ", nblocks, " entries for ", n, " elements in blocks of ", blocksize, ", got ",
           shape_str(absmax));
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  if (n == 0) return out;
  Status st;
  if (A.is_cpu()) {
    st = qx::dequantize_8bit_cpu(A.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(), n,
                                 blocksize, out.data_ptr(), ot);
  } else {
#ifdef QX_WITH_CUDA
    const c10::cuda::CUDAGuard guard(A.device());
    st = qx::dequantize_8bit_cuda(A.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(), n,
                                  blocksize, out.data_ptr(), ot, stream_of(A));
#else
    QX_CHECK(false, "this build of qlora_ext has no CUDA kernels; got a tensor on ", A.device());
    st = Status::kUnsupported;
#endif
  }
  check_status(st, "dequantize_8bit(" + shape_str(A) + ")");
  return out;
}

at::Tensor code_table(c10::string_view name) {
  const float* p = nullptr;
  int64_t len = 256;
  if (name == "nf4") p = qx::code4(QuantType::kNF4), len = 16;
  else if (name == "fp4") p = qx::code4(QuantType::kFP4), len = 16;
  else if (name == "dynamic_signed") p = qx::dynamic_map(true);
  else if (name == "dynamic_unsigned") p = qx::dynamic_map(false);
  QX_CHECK(p != nullptr, "unknown code table '", std::string(name),
           "' (nf4, fp4, dynamic_signed, dynamic_unsigned)");
  return at::from_blob(const_cast<float*>(p), {len}, at::kFloat).clone();
}

}  // namespace

TORCH_LIBRARY(qlora_ext, m) {
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)");
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
      "int nested_blocksize, int blocksize, str quant_type, int[] shape, ScalarType dtype) -> Tensor");
  m.def(
      "dequantize_4bit.out(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
      "int nested_blocksize, int blocksize, str quant_type, int[] shape, *, Tensor(a!) out) -> ()");
  m.def("quantize_8bit(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("dequantize_8bit(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor");
  m.def("code_table(str name) -> Tensor");
  m.def(
      "matmul_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
      "int nested_blocksize, int blocksize, str quant_type, int[] shape) -> Tensor");
  m.def(
      "matmul_4bit_t(Tensor grad, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float offset, int nested_blocksize, int blocksize, str quant_type, int[] shape) -> Tensor");
  // Optimizers (optim_ops.cpp): one fused update in place; paged (CUDA managed) state memory.
  m.def(
      "optimizer_step(Tensor(a!) param, Tensor grad, Tensor(b!) state1, Tensor(c!)? state2, Tensor(d!)? absmax1, "
      "Tensor(e!)? absmax2, str optimizer, int step, float lr, float beta1, float beta2, float eps, "
      "float weight_decay) -> ()");
  m.def("paged_empty(int nbytes, Device device) -> Tensor");
  m.def("paged_prefetch(Tensor t, bool to_host) -> ()");
  // LoRA dropout (lora_ops.cpp, CPU only: CUDA uses torch's fused dropout): x * Philox keep mask / (1 - p).
  m.def("lora_dropout(Tensor x, float p, int seed) -> Tensor");
  m.impl("code_table", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(code_table));
}

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("quantize_4bit", TORCH_FN(quantize_4bit));
  m.impl("dequantize_4bit", TORCH_FN(dequantize_4bit));
  m.impl("dequantize_4bit.out", TORCH_FN(dequantize_4bit_out));
  m.impl("quantize_8bit", TORCH_FN(quantize_8bit));
  m.impl("dequantize_8bit", TORCH_FN(dequantize_8bit));
}

#ifdef QX_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("quantize_4bit", TORCH_FN(quantize_4bit));
  m.impl("dequantize_4bit", TORCH_FN(dequantize_4bit));
  m.impl("dequantize_4bit.out", TORCH_FN(dequantize_4bit_out));
  m.impl("quantize_8bit", TORCH_FN(quantize_8bit));
  m.impl("dequantize_8bit", TORCH_FN(dequantize_8bit));
}
#endif

namespace {
// The CPU kernels run on torch's intra-op pool (see parallel.h for why).
void torch_parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(b, e); });
}
const bool g_backend_installed = (qx::set_parallel_backend(torch_parallel_for), true);
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "qlora_ext native kernels (ops are registered under torch.ops.qlora_ext)";
  mod.def("cpu_block_cache", &qx_torch::cpu_block_cache, "turn torch's CPU block cache on or off");
  mod.def("cpu_block_cache_stats", &qx_torch::cpu_block_cache_stats,
          "[on, live bytes, cached bytes, peak live bytes, reuses, new mappings]");
  mod.def("cpu_isa", [] { return std::string(qx::cpu_isa()); }, "instruction set the CPU kernels use");
  mod.def("cpu_bf16_gemm", &qx::cpu_bf16_gemm, "whether the 4-bit matmul multiplies bfloat16 inputs in bfloat16 on CPU");
  mod.def("cpu_fused_gemm", &qx::gemm_4bit_cpu_fused,
          "whether the 4-bit matmul's large-M float32 CPU path decodes W straight into its own GEMM (AVX2)");
#ifdef QX_WITH_CUDA
  mod.attr("with_cuda") = true;
#else
  mod.attr("with_cuda") = false;
#endif
}

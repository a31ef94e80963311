// Torch layer of the optimizers: the fused step op (argument checks, device guard, stream) over the optim.h
// launchers, and the paged-memory ops (managed allocation with a free-memory check, prefetch). Schemas are in
// ops.cpp's TORCH_LIBRARY block.
#include <torch/library.h>

#include "../optim/optim.h"
#include "common.h"

namespace {

using namespace qx_torch;
using qx::OptimKind;

OptimKind to_kind(c10::string_view s) {
  if (s == "adamw") return OptimKind::kAdamW;
  if (s == "lion") return OptimKind::kLion;
  QX_CHECK(false, "optimizer must be 'adamw' or 'lion', got '", std::string(s), "'");
  return OptimKind::kAdamW;
}

void check_buffer(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, int64_t numel,
                  const char* name) {
  QX_CHECK(t.device() == param.device(), name, " is on ", t.device(), " but the parameter is on ", param.device());
  QX_CHECK(t.scalar_type() == dtype && t.numel() == numel && t.is_contiguous(), name, " must be a contiguous ",
           dtype, " tensor of ", numel, " elements, got ", shape_str(t));
}

// One fused optimizer update of `param` (and its state) in place. State layout by state1's dtype:
// float32 -> float32 state (state1 = exp_avg, state2 = exp_avg_sq for AdamW); uint8 -> 8-bit blockwise state
// (state1 / state2 codes, absmax1 / absmax2 one float32 per 256 elements).
void optimizer_step(at::Tensor& param, const at::Tensor& grad_in, at::Tensor& state1,
                    const c10::optional<at::Tensor>& state2, const c10::optional<at::Tensor>& absmax1,
                    const c10::optional<at::Tensor>& absmax2, c10::string_view optimizer, int64_t step, double lr,
                    double beta1, double beta2, double eps, double weight_decay) {
  const OptimKind kind = to_kind(optimizer);
  const bool adam = kind == OptimKind::kAdamW;
  QX_CHECK(param.layout() == at::kStrided && grad_in.layout() == at::kStrided,
           "sparse parameters or gradients are not supported (got ", param.layout(), " / ", grad_in.layout(), ")");
  const DType dt = to_dtype(param.scalar_type(), "the parameter");
  QX_CHECK(param.is_contiguous(), "the parameter must be contiguous, got shape ", param.sizes(), " strides ",
           param.strides());
  QX_CHECK(grad_in.scalar_type() == param.scalar_type(), "the gradient is ", grad_in.scalar_type(),
           " but the parameter is ", param.scalar_type());
  QX_CHECK(grad_in.sizes() == param.sizes(), "the gradient of shape ", grad_in.sizes(),
           " does not match the parameter of shape ", param.sizes());
  QX_CHECK(grad_in.device() == param.device(), "the gradient is on ", grad_in.device(), " but the parameter is on ",
           param.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = param.numel(), nblocks = (n + qx::kOptimBlock - 1) / qx::kOptimBlock;

  qx::OptimState s;
  if (state1.scalar_type() == at::kFloat) {
    QX_CHECK(!absmax1.has_value() && !absmax2.has_value(), "float32 state takes no absmax");
    check_buffer(state1, param, at::kFloat, n, "state1 (exp_avg)");
    s.m = state1.data_ptr<float>();
    QX_CHECK(state2.has_value() == adam, adam ? "AdamW needs state2 (exp_avg_sq)" : "Lion takes no state2");
    if (adam) {
      check_buffer(*state2, param, at::kFloat, n, "state2 (exp_avg_sq)");
      s.v = state2->data_ptr<float>();
    }
  } else {
    QX_CHECK(state1.scalar_type() == at::kByte, "state1 must be float32 (32-bit state) or uint8 (8-bit state), got ",
             state1.scalar_type());
    check_buffer(state1, param, at::kByte, n, "state1 (8-bit exp_avg)");
    QX_CHECK(absmax1.has_value(), "8-bit state needs absmax1");
    check_buffer(*absmax1, param, at::kFloat, nblocks, "absmax1");
    s.qm = state1.data_ptr<uint8_t>();
    s.absmax_m = absmax1->data_ptr<float>();
    QX_CHECK(state2.has_value() == adam && absmax2.has_value() == adam,
             adam ? "8-bit AdamW needs state2 and absmax2" : "Lion takes no state2 / absmax2");
    if (adam) {
      check_buffer(*state2, param, at::kByte, n, "state2 (8-bit exp_avg_sq)");
      check_buffer(*absmax2, param, at::kFloat, nblocks, "absmax2");
      s.qv = state2->data_ptr<uint8_t>();
      s.absmax_v = absmax2->data_ptr<float>();
    }
  }
  qx::OptimHyper h;
  QX_CHECK(qx::optim_hyper(kind, lr, beta1, beta2, eps, weight_decay, step, &h) == Status::kOk,
           "invalid hyperparameters: need step >= 1, lr, eps, weight_decay >= 0 and finite, betas in [0, 1); got step=",
           step, " lr=", lr, " betas=(", beta1, ", ", beta2, ") eps=", eps, " weight_decay=", weight_decay);
  if (n == 0) return;
  Status st;
  if (param.is_cpu()) {
    st = qx::optim_step_cpu(kind, param.data_ptr(), grad.data_ptr(), dt, n, s, h);
  } else {
#ifdef QX_WITH_CUDA
    QX_CHECK(param.is_cuda(), "tensors must be on CPU or CUDA, got ", param.device());
    const c10::cuda::CUDAGuard guard(param.device());
    st = qx::optim_step_cuda(kind, param.data_ptr(), grad.data_ptr(), dt, n, s, h, stream_of(param));
#else
    QX_CHECK(false, "this build of qlora_ext has no CUDA kernels; got a tensor on ", param.device());
    st = Status::kUnsupported;
#endif
  }
  check_status(st, std::string("optimizer_step(") + std::string(optimizer) + ", " + shape_str(param) + ")");
}

// A flat uint8 tensor of `nbytes` in CUDA managed memory on `device`, freed (cudaFree) with its storage.
at::Tensor paged_empty(int64_t nbytes, at::Device device) {
  QX_CHECK(device.is_cuda(), "paged memory is CUDA managed memory; got device ", device,
           " (on CPU the optimizers keep their state in ordinary tensors)");
  QX_CHECK(nbytes > 0, "paged_empty needs a positive size, got ", nbytes);
#ifdef QX_WITH_CUDA
  const int dev = device.has_index() ? device.index() : c10::cuda::current_device();
  void* ptr = nullptr;
  size_t free = 0;
  const Status st = qx::paged_alloc(dev, static_cast<size_t>(nbytes), &ptr, &free);
  QX_CHECK(st != Status::kOutOfMemory, "refusing a paged allocation of ", nbytes, " bytes: only ", free,
           " bytes are free on cuda:", dev,
           " (oversubscribed managed memory can stall the machine); free GPU memory or use an 8-bit optimizer");
  QX_CHECK(st != Status::kUnsupported, "cuda:", dev,
           " has no concurrent managed access, which paged optimizers need; use the non-paged optimizers");
  check_status(st, "paged_empty(" + std::to_string(nbytes) + " bytes on cuda:" + std::to_string(dev) + ")");
  return at::from_blob(
      ptr, {nbytes}, [](void* p) { qx::paged_free(p); }, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, dev));
#else
  QX_CHECK(false, "this build of qlora_ext has no CUDA kernels, so no paged memory");
  return at::Tensor();
#endif
}

// Migrates a paged tensor's pages to its GPU (to_host=false) or to host memory, ordered on the current stream.
void paged_prefetch(const at::Tensor& t, bool to_host) {
  QX_CHECK(t.is_cuda(), "paged_prefetch takes a tensor from paged_empty, got one on ", t.device());
  QX_CHECK(t.is_contiguous(), "paged_prefetch needs a contiguous tensor");
  if (t.numel() == 0) return;
#ifdef QX_WITH_CUDA
  const c10::cuda::CUDAGuard guard(t.device());
  const Status st = qx::paged_prefetch(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size(),
                                       to_host ? -1 : t.device().index(), stream_of(t));
  check_status(st, "paged_prefetch(" + shape_str(t) + ") (is it memory from paged_empty?)");
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) { m.impl("optimizer_step", TORCH_FN(optimizer_step)); }

#ifdef QX_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("optimizer_step", TORCH_FN(optimizer_step)); }
#endif

TORCH_LIBRARY_IMPL(qlora_ext, CompositeExplicitAutograd, m) {
  m.impl("paged_empty", TORCH_FN(paged_empty));
  m.impl("paged_prefetch", TORCH_FN(paged_prefetch));
}

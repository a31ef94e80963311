// Torch layer of the CPU LoRA dropout (csrc/lora/dropout.h): argument checks, then the Philox kernel. The
// schema is in ops.cpp's TORCH_LIBRARY block; autograd lives in Python (qlora_ext/nn.py, LoraDropout): the
// backward of this op is the op itself applied to the gradient with the same seed.
#include <torch/library.h>

#include "../lora/dropout.h"
#include "common.h"

namespace {

using namespace qx_torch;

at::Tensor lora_dropout(const at::Tensor& x_in, double p, int64_t seed) {
  QX_CHECK(x_in.scalar_type() == at::kFloat, "lora_dropout takes float32 input, got ", x_in.scalar_type());
  QX_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1), got ", p);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  check_status(qx::dropout_cpu(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), static_cast<uint64_t>(seed),
                               qx::dropout_threshold(p), scale),
               "lora_dropout(" + shape_str(x) + ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) { m.impl("lora_dropout", TORCH_FN(lora_dropout)); }

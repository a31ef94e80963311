"""qlora_ext: QLoRA for PyTorch — NF4 / FP4 4-bit kernels on CPU and CUDA, in the bitsandbytes format."""
from . import functional, optim, reference
from ._ops import cpu_isa, with_cuda
from .functional import QuantState, dequantize_4bit, matmul_4bit, quantize_4bit

__version__ = "0.1.0"
__all__ = ["functional", "optim", "reference", "QuantState", "quantize_4bit", "dequantize_4bit", "matmul_4bit", "cpu_isa", "with_cuda"]

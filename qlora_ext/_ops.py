"""Loads the native ops (torch.ops.qlora_ext.*) and registers their fake kernels for torch.compile / opcheck.

Each fake kernel applies the same shape rules as the C++ checks in csrc/torch/ops.cpp.
"""
import math

import torch

try:
    from . import _C  # noqa: F401  (registers the ops)
except ImportError as exc:  # pragma: no cover - depends on the install
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    hint = (" You are importing the source tree (" + here + "), which has no compiled _C: run from another "
            "directory, use `pytest` rather than `python -m pytest`, or build in place with "
            "`pip install --no-build-isolation -e .`.") if os.path.exists(os.path.join(here, "..", "setup.py")) else ""
    raise ImportError(
        "qlora_ext's native extension failed to load. It must be compiled against the installed torch "
        f"({torch.__version__}); reinstall with `pip install --no-build-isolation .`.{hint} Cause: {exc}") from exc

ops = torch.ops.qlora_ext
VALID_BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("qlora_ext::quantize_4bit")
def _quantize_4bit_fake(A, blocksize, quant_type):
    torch._check(blocksize in VALID_BLOCKSIZES_4BIT, lambda: f"blocksize must be one of {VALID_BLOCKSIZES_4BIT}")
    torch._check(quant_type in ("nf4", "fp4"), lambda: f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    torch._check(A.dtype in FLOAT_DTYPES, lambda: f"A must be float32, float16 or bfloat16, got {A.dtype}")
    n = A.numel()
    return (A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            A.new_empty((-(-n // blocksize),), dtype=torch.float32))


def _dequantize_4bit_check(packed, absmax, nested_absmax, blocksize, quant_type, shape):
    torch._check(blocksize in VALID_BLOCKSIZES_4BIT, lambda: f"blocksize must be one of {VALID_BLOCKSIZES_4BIT}")
    torch._check(quant_type in ("nf4", "fp4"), lambda: f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    n = math.prod(shape)
    torch._check(packed.numel() * packed.element_size() == (n + 1) // 2,
                 lambda: f"packed weight has {packed.numel() * packed.element_size()} bytes, shape {list(shape)} "
                         f"needs {(n + 1) // 2}")
    torch._check(absmax.numel() == -(-n // blocksize), lambda: "absmax length does not match shape and blocksize")
    torch._check((absmax.dtype == torch.uint8) == (nested_absmax is not None),
                 lambda: "absmax must be uint8 exactly when double-quantized")


@torch.library.register_fake("qlora_ext::dequantize_4bit")
def _dequantize_4bit_fake(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize,
                          quant_type, shape, dtype):
    _dequantize_4bit_check(packed, absmax, nested_absmax, blocksize, quant_type, shape)
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("qlora_ext::dequantize_4bit.out")
def _dequantize_4bit_out_fake(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize,
                              quant_type, shape, *, out):
    _dequantize_4bit_check(packed, absmax, nested_absmax, blocksize, quant_type, shape)
    torch._check(out.numel() == math.prod(shape), lambda: "out has the wrong number of elements")


@torch.library.register_fake("qlora_ext::quantize_8bit")
def _quantize_8bit_fake(A, code, blocksize):
    torch._check(A.dtype in FLOAT_DTYPES, lambda: f"8-bit quantization takes float32, float16 or bfloat16, "
                                                  f"got {A.dtype}")
    torch._check(blocksize > 0, lambda: "blocksize must be positive")
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((-(-A.numel() // blocksize),), dtype=torch.float32)


@torch.library.register_fake("qlora_ext::dequantize_8bit")
def _dequantize_8bit_fake(A, absmax, code, blocksize, dtype):
    torch._check(A.dtype == torch.uint8, lambda: f"A must be uint8, got {A.dtype}")
    torch._check(absmax.numel() == -(-A.numel() // blocksize), lambda: "absmax length does not match A")
    return A.new_empty(A.shape, dtype=dtype)


def cpu_isa() -> str:
    """The instruction set the CPU kernels chose at run time: 'avx512bf16' (AVX-512 with AVX512-BF16: the 4-bit
    matmul multiplies bfloat16 inputs in bfloat16), 'avx512', 'avx2' or 'scalar'. QLORA_EXT_CPU_ISA=scalar|avx2|
    avx512 caps it; QLORA_EXT_CPU_BF16_GEMM=0|1 turns the bfloat16 GEMM off or on (read once per process)."""
    return _C.cpu_isa()


def with_cuda() -> bool:
    """Whether this build has the CUDA kernels."""
    return bool(_C.with_cuda)


def _matmul_check(x_last, packed, absmax, nested_absmax, blocksize, quant_type, shape, what):
    torch._check(len(shape) == 2, lambda: f"the 4-bit weight must be 2-D [N, K], got shape {list(shape)}")
    _dequantize_4bit_check(packed, absmax, nested_absmax, blocksize, quant_type, shape)
    torch._check(x_last == shape[what], lambda: f"last dimension {x_last} does not match weight shape {list(shape)}")


@torch.library.register_fake("qlora_ext::matmul_4bit")
def _matmul_4bit_fake(x, packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize, quant_type,
                      shape):
    _matmul_check(x.shape[-1], packed, absmax, nested_absmax, blocksize, quant_type, shape, 1)
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("qlora_ext::matmul_4bit_t")
def _matmul_4bit_t_fake(grad, packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize,
                        quant_type, shape):
    _matmul_check(grad.shape[-1], packed, absmax, nested_absmax, blocksize, quant_type, shape, 0)
    return grad.new_empty((*grad.shape[:-1], shape[1]))


def _matmul_setup(ctx, inputs, output):
    _, packed, absmax, nested_absmax, nested_code, *meta = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code)
    ctx.meta = meta


def _matmul_backward(ctx, grad):
    # The 4-bit weight is frozen: only x gets a gradient, grad @ W through the dequantized weight.
    packed, absmax, nested_absmax, nested_code = ctx.saved_tensors
    gx = ops.matmul_4bit_t(grad, packed, absmax, nested_absmax, nested_code, *ctx.meta) \
        if ctx.needs_input_grad[0] else None
    return (gx,) + (None,) * 9


torch.library.register_autograd("qlora_ext::matmul_4bit", _matmul_backward, setup_context=_matmul_setup)


# ---- optimizers (csrc/torch/optim_ops.cpp) ----
OPTIM_BLOCK = 256  # elements per float32 absmax of 8-bit optimizer state


@torch.library.register_fake("qlora_ext::optimizer_step")
def _optimizer_step_fake(param, grad, state1, state2, absmax1, absmax2, optimizer, step, lr, beta1, beta2, eps,
                         weight_decay):
    torch._check(optimizer in ("adamw", "lion"), lambda: f"optimizer must be 'adamw' or 'lion', got {optimizer!r}")
    torch._check(param.dtype in FLOAT_DTYPES, lambda: f"the parameter must be a float dtype, got {param.dtype}")
    torch._check(grad.dtype == param.dtype and grad.shape == param.shape, lambda: "the gradient does not match")
    torch._check(state1.dtype in (torch.float32, torch.uint8) and state1.numel() == param.numel(),
                 lambda: "state1 does not match the parameter")
    torch._check((absmax1 is not None) == (state1.dtype == torch.uint8), lambda: "absmax1 goes with 8-bit state")


@torch.library.register_fake("qlora_ext::paged_empty")
def _paged_empty_fake(nbytes, device):
    torch._check(nbytes > 0, lambda: f"paged_empty needs a positive size, got {nbytes}")
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


@torch.library.register_fake("qlora_ext::paged_prefetch")
def _paged_prefetch_fake(t, to_host):
    return None


# ---- LoRA dropout (csrc/torch/lora_ops.cpp, CPU float32) ----
@torch.library.register_fake("qlora_ext::lora_dropout")
def _lora_dropout_fake(x, p, seed):
    torch._check(x.dtype == torch.float32, lambda: f"lora_dropout takes float32 input, got {x.dtype}")
    torch._check(0.0 <= p < 1.0, lambda: f"dropout probability must be in [0, 1), got {p}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _lora_dropout_setup(ctx, inputs, output):
    _, ctx.p, ctx.seed = inputs


def _lora_dropout_backward(ctx, grad):
    # d(x * keep * scale)/dx = keep * scale: the same op, same seed, applied to the gradient (no mask stored)
    return ops.lora_dropout(grad, ctx.p, ctx.seed), None, None


torch.library.register_autograd("qlora_ext::lora_dropout", _lora_dropout_backward, setup_context=_lora_dropout_setup)

// Torch-free launchers for y = x @ W^T with W a 4-bit [N, K] weight (NF4/FP4, plain or double-quantized
// scales, any block size, K need not be a multiple of the block size). Same conventions as quant.h.
#pragma once
#include <cstdint>

#include "../quant/quant.h"

namespace qx {

struct Weight4 {
  const uint8_t* packed = nullptr;  // (N*K + 1) / 2 bytes, row-major blocks over the flat weight
  AbsmaxView scales;
  int64_t N = 0, K = 0, blocksize = 64;
  QuantType qt = QuantType::kNF4;
};

// Largest M the fused CPU kernel takes (it depends on the instruction set chosen at run time); larger
// batches go through dequantized row tiles and a GEMM. kGemvMaxM: the scalar path's limit, and the rows of x
// one SIMD pass keeps in registers; AVX-512 and AVX2 take up to kGemvMaxMSimd rows, in groups of 8 over
// L2-resident tiles of W (bench/results/bench_matmul_cpu.md, bench_matmul_cpu_avx2.md).
constexpr int64_t kGemvMaxM = 8;
constexpr int64_t kGemvMaxMSimd = 32;
int64_t gemv_4bit_cpu_max_m();

// out[M, N] = x[M, K] @ W^T, x and out contiguous. Reads only the packed bytes and scales (never a float
// copy of W); float32 accumulation with FMA; multithreaded over N. M <= gemv_4bit_cpu_max_m().
Status gemv_4bit_cpu(const void* x, DType xdt, int64_t M, const Weight4& w, void* out, DType odt);

// Rows [n0, n1) x columns [k0, k1) of the dequantized W into out ([n1 - n0, k1 - k0] of odt, contiguous):
// row tiles for the large-M forward (y[:, n0:n1] = x @ tile^T), column tiles for the backward
// (grad_x[:, k0:k1] = grad_y @ tile), so that every output element is written by one GEMM.
Status dequantize_4bit_tile_cpu(const Weight4& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, void* out,
                                DType odt);

// out[M, N] = a[M, K] @ W^T (w_transposed: the forward) or out[M, K] = a[M, N] @ W (the gradient for x), float32,
// by a packed GEMM whose panels of W are decoded straight from the 4-bit codes: no float tile of W beyond one
// 256 x 2048 slice per thread, and no second packing of it inside a platform GEMM. AVX2 + FMA only
// (gemm_4bit_cpu_fused(); elsewhere kUnsupported): AVX-512 machines keep the platform GEMM, whose kernels are
// twice as wide as this one.
bool gemm_4bit_cpu_fused();
Status gemm_4bit_cpu(const float* a, int64_t M, const Weight4& w, bool w_transposed, float* out);

// CUDA: the GEMV for small M (16-byte loads of packed weight, scales decoded in-kernel) and a tensor-core
// kernel for small batches; larger M is dequantize + cuBLAS in the torch layer.
constexpr int64_t kCudaGemvMaxM = 4;
constexpr int64_t kCudaSmallMaxM = 64;
Status gemv_4bit_cuda(const void* x, DType xdt, int64_t M, const Weight4& w, void* out, DType odt, void* stream);
Status gemm_4bit_small_cuda(const void* x, DType xdt, int64_t M, const Weight4& w, void* out, DType odt,
                            void* stream);

}  // namespace qx

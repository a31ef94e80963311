// Torch-free launchers for blockwise 4-bit (NF4/FP4) and 8-bit (dynamic map) quantization, CPU and CUDA.
// Contract: pointers are contiguous, sizes are element counts, every launcher validates its scalar
// arguments and returns a Status (never throws, never exits). The CUDA twins take a cudaStream_t as void*.
#pragma once
#include <cstdint>

#include "../common/status.h"

namespace qx {

enum class QuantType : int { kNF4 = 0, kFP4 = 1 };

// The per-block scales of a 4-bit tensor: either plain float32 absmax, or double-quantized
// (uint8 index into `nested_code` times nested_absmax[block / nested_blocksize], plus `offset`).
struct AbsmaxView {
  const float* absmax = nullptr;          // plain: [nblocks] float32; null when double-quantized
  const uint8_t* qabsmax = nullptr;       // double-quantized: [nblocks] uint8
  const float* nested_absmax = nullptr;   // [ceil(nblocks / nested_blocksize)]
  const float* nested_code = nullptr;     // [256] sorted map
  float offset = 0.0f;
  int64_t nested_blocksize = 256;
  bool double_quant() const { return qabsmax != nullptr; }
};

bool valid_blocksize_4bit(int64_t blocksize);  // 32, 64, ..., 4096
bool valid_blocksize_8bit(int64_t blocksize);  // 64, ..., 4096 (and 256 for nested absmax)

// Code tables (float32) by type; `code4` returns the 16 values of NF4 or FP4.
const float* code4(QuantType qt);
const float* dynamic_map(bool is_signed);

// Scalar helpers shared by every backend (CPU kernels, CUDA host checks, tests).
uint8_t quantize_nibble(QuantType qt, float scaled);   // scaled = x * (1 / absmax), already finite
// 8-bit blockwise codes follow bitsandbytes' CPU rule, which made the checkpoints we must reproduce byte for
// byte: the normalized value v = x * (1 / absmax), clamped to [-1, 1], picks one of 65536 grid points,
// u = trunc(((v + 1) * 0.5) * 65535 + 0.5); the code is the number of map midpoints 0.5 * (map[j] + map[j+1])
// that lie below the grid value -1 + (2 * u) / 65535 (every operation a float32 rounding). That is the
// nearest map value except within half a grid step (1.5e-5) of a midpoint. An all-zero block codes 0.
uint8_t quantize_grid8(const float* code256, float normed);
// Plain nearest map value, ties to the lower index: the 8-bit optimizer state's rounding.
uint8_t quantize_nearest8(const float* code256, float normed);

// ---------------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------------
// Number of worker threads the CPU kernels may use (the torch layer forwards torch.get_num_threads()).
void cpu_set_num_threads(int n);
int cpu_num_threads();
// "avx512bf16", "avx512", "avx2" or "scalar": the instruction set the CPU kernels picked at run time
// (QLORA_EXT_CPU_ISA=scalar|avx2|avx512 caps it).
const char* cpu_isa();
// Whether the 4-bit matmul multiplies bfloat16 inputs in bfloat16 (dequantized bfloat16 tiles and the platform's
// bfloat16 GEMM, float32 accumulation) rather than widening them to float32: where the CPU has AVX512-BF16
// (vdpbf16ps) and the cap allows it. QLORA_EXT_CPU_BF16_GEMM=0 turns it off, =1 on even without the instruction
// (torch's bfloat16 GEMM then runs without it, many times slower than float32: for tests). Read once.
bool cpu_bf16_gemm();

// out: packed [(n + 1) / 2] bytes, element 2j in the high nibble; absmax: [ceil(n / blocksize)].
// Returns kNonFinite (after writing everything) if A holds NaN or Inf.
Status quantize_4bit_cpu(const void* A, DType dtype, int64_t n, int64_t blocksize, QuantType qt,
                         uint8_t* packed, float* absmax);
// out: n elements of out_dtype. Reads double-quantized absmax directly (no float32 absmax pass).
Status dequantize_4bit_cpu(const uint8_t* packed, const AbsmaxView& scales, int64_t n, int64_t blocksize,
                           QuantType qt, void* out, DType out_dtype);
// 8-bit blockwise with a sorted 256-entry map: out[i] = nearest(code, A[i] / absmax[block]).
Status quantize_8bit_cpu(const float* A, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                         float* absmax);
Status dequantize_8bit_cpu(const uint8_t* A, const float* absmax, const float* code, int64_t n,
                           int64_t blocksize, void* out, DType out_dtype);

// ---------------------------------------------------------------------------------------------
// CUDA (compiled when nvcc is present; all pointers are device pointers, `stream` a cudaStream_t)
// ---------------------------------------------------------------------------------------------
// `error_flag` is a device int32 the kernel sets to 1 when A holds NaN or Inf (the caller checks it).
Status quantize_4bit_cuda(const void* A, DType dtype, int64_t n, int64_t blocksize, QuantType qt,
                          uint8_t* packed, float* absmax, int* error_flag, void* stream);
Status dequantize_4bit_cuda(const uint8_t* packed, const AbsmaxView& scales, int64_t n, int64_t blocksize,
                            QuantType qt, void* out, DType out_dtype, void* stream);
// `error_flag` as for quantize_4bit_cuda: set to 1 when A holds NaN or Inf.
Status quantize_8bit_cuda(const float* A, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                          float* absmax, int* error_flag, void* stream);
Status dequantize_8bit_cuda(const uint8_t* A, const float* absmax, const float* code, int64_t n,
                            int64_t blocksize, void* out, DType out_dtype, void* stream);

}  // namespace qx

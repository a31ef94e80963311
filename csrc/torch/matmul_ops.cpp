// Torch layer of the 4-bit matmul: y = x @ W^T (forward) and g @ W (the gradient for x), with the dispatch
// between the fused small-M kernels and, for large M, the packed GEMM that decodes W into its own panels (CPU
// with AVX2, float32) or dequantized tiles + the platform GEMM (other CPUs and bfloat16 GEMMs: tiles of a few MiB,
// so the whole float weight is never materialized; CUDA: the whole weight, then cuBLAS).
#include <torch/library.h>

#include "common.h"

namespace {

using namespace qx_torch;

// Rows of W dequantized per tile on CPU: ~8 MiB (of float32; half that in bfloat16) keeps the GEMM efficient
// (few passes over x) while the float weight never exists whole.
int64_t tile_rows(int64_t N, int64_t K) {
  int64_t rows = (int64_t(8) << 20) / (4 * K);
  rows = std::max<int64_t>(16, rows - rows % 16);
  return std::min(rows, N);
}

// The scratch for those tiles (float32 words, viewed as the tile's dtype): one buffer per calling thread, grown
// as needed and kept (~8 MiB), so a training step's thousands of tiles neither fault fresh pages in on every call
// nor leave the freed tiles between long-lived activations, where they fragment glibc's heap and stay resident.
at::Tensor tile_scratch(int64_t numel, at::ScalarType dtype = at::kFloat) {
  thread_local at::Tensor buf;
  const int64_t words = (numel * int64_t(c10::elementSize(dtype)) + 3) / 4;
  if (!buf.defined() || buf.numel() < words) {
    buf = at::Tensor();  // release the old one first
    buf = at::empty({words}, at::TensorOptions().dtype(at::kFloat));
  }
  return buf.narrow(0, 0, words).view(dtype).narrow(0, 0, numel);
}

// The dtype the large-M CPU path multiplies in: bfloat16 inputs stay bfloat16 where the CPU multiplies them
// natively (qx::cpu_bf16_gemm: AVX512-BF16, through the platform's bfloat16 GEMM, float32 accumulation, each
// output rounded once); everything else is widened to float32 (AVX2 has no bfloat16 arithmetic).
at::ScalarType gemm_dtype(at::ScalarType in) {
  return in == at::kBFloat16 && qx::cpu_bf16_gemm() ? at::kBFloat16 : at::kFloat;
}

struct MatmulArgs {
  WeightArgs wa;
  qx::Weight4 w;
};

MatmulArgs matmul_args(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                       const c10::optional<at::Tensor>& nested_code, double offset, int64_t nested_blocksize,
                       int64_t blocksize, c10::string_view quant_type, at::IntArrayRef shape) {
  QX_CHECK(shape.size() == 2, "the 4-bit weight must be 2-D [N, K] for a matmul, got shape ", shape);
  QX_CHECK(shape[0] > 0 && shape[1] > 0, "the 4-bit weight shape ", shape, " must have positive dimensions");
  MatmulArgs a;
  a.wa = weight_args(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize, quant_type,
                     checked_numel(shape));
  a.w.packed = a.wa.packed.data_ptr<uint8_t>();
  a.w.scales = a.wa.view;
  a.w.N = shape[0];
  a.w.K = shape[1];
  a.w.blocksize = blocksize;
  a.w.qt = a.wa.qt;
  return a;
}

// The whole dequantized weight in `dtype` (CUDA large-M path; small tensors).
at::Tensor dequantized(const MatmulArgs& a, at::ScalarType dtype) {
  at::Tensor W = at::empty({a.w.N, a.w.K}, a.wa.packed.options().dtype(dtype));
  Status st;
  if (W.is_cpu()) {
    st = qx::dequantize_4bit_tile_cpu(a.w, 0, a.w.N, 0, a.w.K, W.data_ptr(), to_dtype(dtype, "dtype"));
  } else {
#ifdef QX_WITH_CUDA
    st = qx::dequantize_4bit_cuda(a.w.packed, a.w.scales, a.w.N * a.w.K, a.w.blocksize, a.w.qt, W.data_ptr(),
                                  to_dtype(dtype, "dtype"), stream_of(W));
#else
    st = Status::kUnsupported;
#endif
  }
  check_status(st, "dequantize for matmul_4bit");
  return W;
}

at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                       double offset, int64_t nested_blocksize, int64_t blocksize, c10::string_view quant_type,
                       at::IntArrayRef shape) {
  MatmulArgs a = matmul_args(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize,
                             quant_type, shape);
  const int64_t N = a.w.N, K = a.w.K;
  DType xdt = to_dtype(x.scalar_type(), "x");
  QX_CHECK(x.dim() >= 1 && x.size(-1) == K, "x of shape ", x.sizes(), " cannot multiply a 4-bit weight of shape ",
           shape, " (x's last dimension must be ", K, ")");
  check_same_device(a.wa.packed, x, "x");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = x.numel() / K;
  at::Tensor x2 = x.reshape({M, K}).contiguous();
  if (M == 0) return at::empty(out_shape, x.options());

  if (x.is_cpu()) {
    if (M <= qx::gemv_4bit_cpu_max_m()) {
      at::Tensor out = empty_output({M, N}, x.options());
      check_status(qx::gemv_4bit_cpu(x2.data_ptr(), xdt, M, a.w, out.data_ptr(), xdt),
                   "matmul_4bit(x " + shape_str(x) + ", W " + c10::str(shape) + ")");
      return out.view(out_shape);
    }
    const at::ScalarType cd = gemm_dtype(x.scalar_type());
    at::Tensor xf = x2.to(cd);
    if (cd == at::kFloat && qx::gemm_4bit_cpu_fused()) {  // AVX2: W decoded straight into the GEMM's panels
      at::Tensor out = empty_output({M, N}, x.options().dtype(at::kFloat));
      check_status(qx::gemm_4bit_cpu(xf.data_ptr<float>(), M, a.w, true, out.data_ptr<float>()),
                   "matmul_4bit(x " + shape_str(x) + ", W " + c10::str(shape) + ")");
      return out.to(x.scalar_type()).view(out_shape);
    }
    // Large M elsewhere: dequantized row tiles, each multiplied by the platform GEMM (each output column complete
    // in one).
    at::Tensor out = empty_output({M, N}, x.options().dtype(cd));
    const int64_t tn = tile_rows(N, K);
    at::Tensor tile = tile_scratch(tn * K, cd).view({tn, K});
    for (int64_t n0 = 0; n0 < N; n0 += tn) {
      const int64_t rows = std::min(tn, N - n0);
      at::Tensor t = tile.narrow(0, 0, rows);
      check_status(qx::dequantize_4bit_tile_cpu(a.w, n0, n0 + rows, 0, K, t.data_ptr(), to_dtype(cd, "tile")),
                   "matmul_4bit tile");
      at::Tensor o = out.narrow(1, n0, rows);  // strides (N, 1): the GEMM writes it in place
      at::mm_out(o, xf, t.t());
    }
    return out.to(x.scalar_type()).view(out_shape);
  }
#ifdef QX_WITH_CUDA
  QX_CHECK(x.is_cuda(), "tensors must be on CPU or CUDA, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  if (M <= qx::kCudaSmallMaxM) {
    at::Tensor out = at::empty({M, N}, x.options());
    Status st = M <= qx::kCudaGemvMaxM
                    ? qx::gemv_4bit_cuda(x2.data_ptr(), xdt, M, a.w, out.data_ptr(), xdt, stream_of(x))
                    : qx::gemm_4bit_small_cuda(x2.data_ptr(), xdt, M, a.w, out.data_ptr(), xdt, stream_of(x));
    check_status(st, "matmul_4bit(x " + shape_str(x) + ", W " + c10::str(shape) + ")");
    return out.view(out_shape);
  }
  return at::mm(x2, dequantized(a, x.scalar_type()).t()).view(out_shape);
#else
  QX_CHECK(false, "this build of qlora_ext has no CUDA kernels; got a tensor on ", x.device());
  return at::Tensor();
#endif
}

// grad[..., N] @ W -> [..., K]: the gradient of matmul_4bit with respect to x.
at::Tensor matmul_4bit_t(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                         double offset, int64_t nested_blocksize, int64_t blocksize, c10::string_view quant_type,
                         at::IntArrayRef shape) {
  MatmulArgs a = matmul_args(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize,
                             quant_type, shape);
  const int64_t N = a.w.N, K = a.w.K;
  to_dtype(grad.scalar_type(), "grad");
  QX_CHECK(grad.dim() >= 1 && grad.size(-1) == N, "grad of shape ", grad.sizes(), " does not match a weight of shape ",
           shape);
  check_same_device(a.wa.packed, grad, "grad");
  std::vector<int64_t> out_shape(grad.sizes().begin(), grad.sizes().end());
  out_shape.back() = K;
  const int64_t M = grad.numel() / N;
  at::Tensor g = grad.reshape({M, N});
  if (grad.is_cpu()) {
    const at::ScalarType cd = gemm_dtype(grad.scalar_type());
    at::Tensor gf = g.to(cd).contiguous();
    if (cd == at::kFloat && qx::gemm_4bit_cpu_fused()) {  // AVX2: W decoded straight into the GEMM's panels
      at::Tensor out = empty_output({M, K}, grad.options().dtype(at::kFloat));
      check_status(qx::gemm_4bit_cpu(gf.data_ptr<float>(), M, a.w, false, out.data_ptr<float>()),
                   "matmul_4bit_t(grad " + shape_str(grad) + ", W " + c10::str(shape) + ")");
      return out.to(grad.scalar_type()).view(out_shape);
    }
    // Elsewhere ~8 MiB tiles of W in one of two shapes, whichever moves fewer bytes around the GEMMs: column tiles
    // (all N rows) re-read grad [M, N] once per tile; row tiles read and rewrite grad_x [M, K] once per
    // tile. Per tile count that is M*N*(K/tk) against 2*M*K*(N/tn) with tk*N = tn*K: columns win when
    // N < 2K (4096x4096, M=1024: 0.83x dense g @ W by columns, 1.03x by rows; 11008x4096, M=256: rows).
    // In bfloat16 always columns: each output complete in one GEMM, never summed over tiles in bfloat16.
    if (N < 2 * K || cd != at::kFloat) {
      at::Tensor out = empty_output({M, K}, grad.options().dtype(cd));
      const int64_t tk = tile_rows(K, N);
      at::Tensor buf = tile_scratch(N * tk, cd);
      for (int64_t k0 = 0; k0 < K; k0 += tk) {
        const int64_t cols = std::min(tk, K - k0);
        at::Tensor t = buf.narrow(0, 0, N * cols).view({N, cols});
        check_status(qx::dequantize_4bit_tile_cpu(a.w, 0, N, k0, k0 + cols, t.data_ptr(), to_dtype(cd, "tile")),
                     "matmul_4bit backward tile");
        at::Tensor o = out.narrow(1, k0, cols);  // strides (K, 1): the GEMM writes it in place
        at::mm_out(o, gf, t);
      }
      return out.to(grad.scalar_type()).view(out_shape);
    }
    at::Tensor out = empty_output({M, K}, grad.options().dtype(at::kFloat)).zero_();
    const int64_t tn = tile_rows(N, K);
    at::Tensor tile = tile_scratch(tn * K).view({tn, K});
    for (int64_t n0 = 0; n0 < N; n0 += tn) {
      const int64_t rows = std::min(tn, N - n0);
      at::Tensor t = tile.narrow(0, 0, rows);
      check_status(qx::dequantize_4bit_tile_cpu(a.w, n0, n0 + rows, 0, K, t.data_ptr(), DType::kFloat32),
                   "matmul_4bit backward tile");
      out.addmm_(gf.narrow(1, n0, rows), t);
    }
    return out.to(grad.scalar_type()).view(out_shape);
  }
#ifdef QX_WITH_CUDA
  const c10::cuda::CUDAGuard guard(grad.device());
  return at::mm(g, dequantized(a, grad.scalar_type())).view(out_shape);
#else
  QX_CHECK(false, "this build of qlora_ext has no CUDA kernels; got a tensor on ", grad.device());
  return at::Tensor();
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_ext, CPU, m) {
  m.impl("matmul_4bit", TORCH_FN(matmul_4bit));
  m.impl("matmul_4bit_t", TORCH_FN(matmul_4bit_t));
}

#ifdef QX_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("matmul_4bit", TORCH_FN(matmul_4bit));
  m.impl("matmul_4bit_t", TORCH_FN(matmul_4bit_t));
}
#endif

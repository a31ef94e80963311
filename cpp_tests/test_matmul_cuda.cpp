// GoogleTest: the CUDA 4-bit matmul launchers (gemv_4bit_cuda, gemm_4bit_small_cuda) against a float64
// reference built from dequantize_4bit_tile_cpu and against gemv_4bit_cpu. Every test skips without a GPU.
//
// Error bound per output: |ours - ref64| <= 2 * |naive - ref64| + eps (+ the output rounding for 16-bit
// outputs), where naive is a plain float32 loop over x as stored and Wdq (rounded to x's dtype when x is
// 16-bit, as the tensor-core path rounds it) and eps = 2^-24 * sum_k |x_k * w_k| * (4 sqrt(K) + 16), a few
// times the typical float32 accumulation error and far below the size of any single wrong term.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../csrc/common/convert.h"
#include "../csrc/matmul/matmul.h"
#include "cuda_test_util.h"

namespace {

using qx_test::DevBuf;
using qx_test::upload;

using qx::AbsmaxView;
using qx::DType;
using qx::QuantType;
using qx::Status;
using qx::Weight4;

const DType kXTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
const QuantType kQuantTypes[] = {QuantType::kNF4, QuantType::kFP4};
const int64_t kBlocks[] = {32, 64, 128};

const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "float32" : t == DType::kFloat16 ? "float16" : "bfloat16";
}
const char* qt_name(QuantType q) { return q == QuantType::kNF4 ? "nf4" : "fp4"; }

// The value a float takes when stored as `t` (RNE).
float round_to(DType t, float v) {
  switch (t) {
    case DType::kFloat16: return qx::half_to_float(qx::float_to_half(v));
    case DType::kBFloat16: return qx::bf16_to_float(qx::float_to_bf16(v));
    default: return v;
  }
}

// ---- device memory (cudaMalloc only) ----

// ---- quantized weights ----
struct HostWeight {
  int64_t N = 0, K = 0, bs = 64, nested_bs = 256;
  QuantType qt = QuantType::kNF4;
  bool dq = false;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  std::vector<uint8_t> qabsmax;
  std::vector<float> nested_absmax;
  float offset = 0.0f;
  std::vector<float> wdq;  // [N, K] float32, exactly what dequantize_4bit gives

  Weight4 view() const {
    Weight4 w;
    w.packed = packed.data();
    w.N = N;
    w.K = K;
    w.blocksize = bs;
    w.qt = qt;
    if (dq) {
      w.scales.qabsmax = qabsmax.data();
      w.scales.nested_absmax = nested_absmax.data();
      w.scales.nested_code = qx::dynamic_map(true);
      w.scales.offset = offset;
      w.scales.nested_blocksize = nested_bs;
    } else {
      w.scales.absmax = absmax.data();
    }
    return w;
  }
};

// Normal weights with rows of different magnitude, an all-zero stretch, then quantized on the CPU;
// double quant as bitsandbytes does it (absmax - mean, 8-bit signed dynamic map, nested blocks).
std::unique_ptr<HostWeight> make_weight(int64_t N, int64_t K, int64_t bs, QuantType qt, bool dq, int64_t nested_bs,
                                        uint32_t seed) {
  auto hw = std::make_unique<HostWeight>();
  hw->N = N, hw->K = K, hw->bs = bs, hw->qt = qt, hw->dq = dq, hw->nested_bs = nested_bs;
  const int64_t n = N * K, nblocks = (n + bs - 1) / bs;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) w[i] = normal(rng) * (1.0f + static_cast<float>((i / K) % 3));
  if (n > 3 * bs)
    for (int64_t i = bs; i < 2 * bs; ++i) w[i] = 0.0f;  // one all-zero block
  hw->packed.resize(static_cast<size_t>((n + 1) / 2));
  hw->absmax.resize(static_cast<size_t>(nblocks));
  if (qx::quantize_4bit_cpu(w.data(), DType::kFloat32, n, bs, qt, hw->packed.data(), hw->absmax.data()) !=
      Status::kOk)
    return nullptr;
  if (dq) {
    double mean = 0.0;
    for (float a : hw->absmax) mean += a;
    hw->offset = static_cast<float>(mean / static_cast<double>(nblocks));
    std::vector<float> shifted(hw->absmax.size());
    for (size_t i = 0; i < shifted.size(); ++i) shifted[i] = hw->absmax[i] - hw->offset;
    hw->qabsmax.resize(shifted.size());
    hw->nested_absmax.resize(static_cast<size_t>((nblocks + nested_bs - 1) / nested_bs));
    if (qx::quantize_8bit_cpu(shifted.data(), nblocks, nested_bs, qx::dynamic_map(true), hw->qabsmax.data(),
                              hw->nested_absmax.data()) != Status::kOk)
      return nullptr;
  }
  hw->wdq.resize(static_cast<size_t>(n));
  if (qx::dequantize_4bit_tile_cpu(hw->view(), 0, N, 0, K, hw->wdq.data(), DType::kFloat32) != Status::kOk) return nullptr;
  return hw;
}

// The same weight in device memory; `packed_offset` shifts the packed bytes off their 256-byte alignment.
struct DevWeight {
  std::unique_ptr<DevBuf> packed, absmax, qabsmax, nested_absmax, nested_code;
  size_t packed_offset = 0;
  Weight4 view;
};

::testing::AssertionResult to_device(const HostWeight& hw, size_t packed_offset, DevWeight* d) {
  d->packed = std::make_unique<DevBuf>(hw.packed.size() + packed_offset);
  d->packed_offset = packed_offset;
  auto r = upload(*d->packed, hw.packed.data(), hw.packed.size(), packed_offset);
  if (!r) return r;
  d->view = hw.view();
  d->view.packed = d->packed->get<uint8_t>(packed_offset);
  if (hw.dq) {
    d->qabsmax = std::make_unique<DevBuf>(hw.qabsmax.size());
    d->nested_absmax = std::make_unique<DevBuf>(hw.nested_absmax.size() * 4);
    d->nested_code = std::make_unique<DevBuf>(256 * 4);
    if (!(r = upload(*d->qabsmax, hw.qabsmax.data(), hw.qabsmax.size()))) return r;
    if (!(r = upload(*d->nested_absmax, hw.nested_absmax.data(), hw.nested_absmax.size() * 4))) return r;
    if (!(r = upload(*d->nested_code, qx::dynamic_map(true), 256 * 4))) return r;
    d->view.scales.qabsmax = d->qabsmax->get<uint8_t>();
    d->view.scales.nested_absmax = d->nested_absmax->get<float>();
    d->view.scales.nested_code = d->nested_code->get<float>();
  } else {
    d->absmax = std::make_unique<DevBuf>(hw.absmax.size() * 4);
    if (!(r = upload(*d->absmax, hw.absmax.data(), hw.absmax.size() * 4))) return r;
    d->view.scales.absmax = d->absmax->get<float>();
  }
  return ::testing::AssertionSuccess();
}

// ---- activations ----
struct HostX {
  DType dt;
  std::vector<uint8_t> bytes;  // as stored
  std::vector<float> f;        // the stored values
};

HostX make_x(int64_t M, int64_t K, DType dt, uint32_t seed) {
  HostX x;
  x.dt = dt;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = static_cast<size_t>(M * K);
  x.bytes.resize(n * static_cast<size_t>(qx::dtype_size(dt)));
  x.f.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t m = static_cast<int64_t>(i) / K;
    const float scale = m % 4 == 1 ? 0.01f : m % 4 == 2 ? 10.0f : 1.0f;
    qx::store_elem(x.bytes.data(), dt, static_cast<int64_t>(i), normal(rng) * scale);
    x.f[i] = qx::load_elem(x.bytes.data(), dt, static_cast<int64_t>(i));
  }
  return x;
}

// ---- references ----
struct Reference {
  std::vector<double> ref;        // float64 dot products of x (as stored) and Wdq
  std::vector<double> naive_err;  // |naive float32 loop - ref|
  std::vector<double> eps;
};

Reference make_reference(const HostX& x, const HostWeight& w, int64_t M) {
  const int64_t N = w.N, K = w.K;
  Reference r;
  r.ref.resize(static_cast<size_t>(M * N));
  r.naive_err.resize(r.ref.size());
  r.eps.resize(r.ref.size());
  std::vector<float> wq(w.wdq.size());  // Wdq as the naive loop (and the tensor cores) see it
  for (size_t i = 0; i < wq.size(); ++i) wq[i] = round_to(x.dt, w.wdq[i]);
  const double eps_scale = std::ldexp(1.0, -24) * (4.0 * std::sqrt(static_cast<double>(K)) + 16.0);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x.f.data() + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const float* wr = w.wdq.data() + n * K;
      const float* qr = wq.data() + n * K;
      double s = 0.0, mag = 0.0;
      float naive = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const double p = static_cast<double>(xr[k]) * static_cast<double>(wr[k]);
        s += p;
        mag += std::fabs(p);
        const float prod = xr[k] * qr[k];
        naive = naive + prod;
      }
      const size_t i = static_cast<size_t>(m * N + n);
      r.ref[i] = s;
      r.naive_err[i] = std::fabs(static_cast<double>(naive) - s);
      r.eps[i] = mag * eps_scale + 1e-30;
    }
  }
  return r;
}

// Half-ulp-ish allowance for rounding the result to a 16-bit output.
double out_rounding(DType odt, double v) {
  const double a = std::fabs(v);
  switch (odt) {
    case DType::kFloat16: return a * std::ldexp(1.0, -10) + std::ldexp(1.0, -24);
    case DType::kBFloat16: return a * std::ldexp(1.0, -7) + 1e-38;
    default: return 0.0;
  }
}

::testing::AssertionResult within_bound(const std::vector<float>& got, const Reference& r, int64_t M, int64_t N,
                                        DType odt) {
  int bad = 0;
  auto fail = ::testing::AssertionFailure();
  double worst = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const size_t i = static_cast<size_t>(m * N + n);
      const double err = std::fabs(static_cast<double>(got[i]) - r.ref[i]);
      const double bound = 2.0 * r.naive_err[i] + r.eps[i] + out_rounding(odt, r.ref[i]);
      if (!(err <= bound)) {  // NaN fails too
        if (bad < 8)
          fail << "\n  out[" << m << ", " << n << "] = " << got[i] << ", ref " << r.ref[i] << ", |err| " << err
               << " > bound " << bound << " (naive err " << r.naive_err[i] << ", eps " << r.eps[i] << ")";
        ++bad;
      }
      if (bound > 0) worst = std::max(worst, err / bound);
    }
  }
  if (bad) return fail << "\n  " << bad << " of " << M * N << " outputs out of bounds";
  return ::testing::AssertionSuccess() << "worst err/bound " << worst;
}

// ---- running the launchers ----
using Launcher = Status (*)(const void*, DType, int64_t, const Weight4&, void*, DType, void*);

// Runs `fn` over the rows of x in chunks of at most `chunk_m` (pointer offsets into x and out), then returns
// the output as float. `x_offset` shifts x off its allocation's alignment. The output buffer starts as NaN.
::testing::AssertionResult run_launcher(Launcher fn, int64_t chunk_m, const DevWeight& w, const HostX& x, int64_t M,
                                        DType odt, size_t x_offset, cudaStream_t stream, std::vector<float>* out) {
  const int64_t N = w.view.N, K = w.view.K;
  const size_t xs = static_cast<size_t>(qx::dtype_size(x.dt)), os = static_cast<size_t>(qx::dtype_size(odt));
  DevBuf dx(x.bytes.size() + x_offset), dout(static_cast<size_t>(M * N) * os);
  auto r = upload(dx, x.bytes.data(), x.bytes.size(), x_offset);
  if (!r) return r;
  if (!dout.ok()) return ::testing::AssertionFailure() << "cudaMalloc failed";
  if (cudaMemset(dout.get(), 0xff, dout.bytes()) != cudaSuccess) return ::testing::AssertionFailure() << "memset";
  for (int64_t m0 = 0; m0 < M; m0 += chunk_m) {
    const int64_t mm = std::min(chunk_m, M - m0);
    const Status s = fn(dx.get(x_offset + static_cast<size_t>(m0 * K) * xs), x.dt, mm, w.view,
                        dout.get(static_cast<size_t>(m0 * N) * os), odt, stream);
    if (s != Status::kOk)
      return ::testing::AssertionFailure() << "launcher returned " << qx::status_string(s) << " at rows " << m0;
  }
  const cudaError_t e = stream ? cudaStreamSynchronize(stream) : cudaDeviceSynchronize();
  if (e != cudaSuccess) return ::testing::AssertionFailure() << "kernel: " << cudaGetErrorString(e);
  std::vector<uint8_t> raw(dout.bytes());
  if (cudaMemcpy(raw.data(), dout.get(), raw.size(), cudaMemcpyDeviceToHost) != cudaSuccess)
    return ::testing::AssertionFailure() << "download failed";
  out->resize(static_cast<size_t>(M * N));
  for (int64_t i = 0; i < M * N; ++i) (*out)[static_cast<size_t>(i)] = qx::load_elem(raw.data(), odt, i);
  return ::testing::AssertionSuccess();
}

struct CaseOptions {
  DType odt = DType::kFloat32;
  size_t packed_offset = 0;
  size_t x_offset = 0;
  int64_t nested_bs = 256;
  bool gemv = true;
  bool gemm = true;
  cudaStream_t stream = nullptr;
};

// One weight, every x dtype: gemv (in chunks of kCudaGemvMaxM rows) and the small GEMM against the float64
// reference; gemv also against gemv_4bit_cpu when M <= kGemvMaxM.
void check_weight(int64_t M, int64_t N, int64_t K, int64_t bs, QuantType qt, bool dq, uint32_t seed,
                  const CaseOptions& opt = CaseOptions()) {
  const std::string desc = "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                           " blocksize=" + std::to_string(bs) + " " + qt_name(qt) +
                           (dq ? " double-quant(nested " + std::to_string(opt.nested_bs) + ")" : " plain") +
                           " out=" + dtype_name(opt.odt) + " packed_offset=" + std::to_string(opt.packed_offset) +
                           " x_offset=" + std::to_string(opt.x_offset);
  SCOPED_TRACE(desc);
  const std::unique_ptr<HostWeight> hw = make_weight(N, K, bs, qt, dq, opt.nested_bs, seed);
  ASSERT_TRUE(hw != nullptr) << "CPU quantization failed";
  DevWeight dw;
  ASSERT_TRUE(to_device(*hw, opt.packed_offset, &dw));
  for (DType xdt : kXTypes) {
    SCOPED_TRACE(std::string("x=") + dtype_name(xdt));
    const HostX x = make_x(M, K, xdt, seed * 7 + static_cast<uint32_t>(xdt));
    const Reference ref = make_reference(x, *hw, M);
    if (opt.gemv) {
      std::vector<float> got;
      ASSERT_TRUE(run_launcher(qx::gemv_4bit_cuda, qx::kCudaGemvMaxM, dw, x, M, opt.odt, opt.x_offset, opt.stream,
                               &got));
      EXPECT_TRUE(within_bound(got, ref, M, N, opt.odt)) << "gemv_4bit_cuda";
      if (M <= qx::kGemvMaxM && opt.odt == DType::kFloat32) {
        std::vector<float> cpu(static_cast<size_t>(M * N));
        ASSERT_EQ(qx::gemv_4bit_cpu(x.bytes.data(), xdt, M, hw->view(), cpu.data(), DType::kFloat32), Status::kOk);
        int bad = 0;
        for (size_t i = 0; i < cpu.size() && bad < 8; ++i) {
          const double cpu_err = std::fabs(static_cast<double>(cpu[i]) - ref.ref[i]);
          const double tol = cpu_err + 2.0 * ref.naive_err[i] + 2.0 * ref.eps[i];
          const double diff = std::fabs(static_cast<double>(got[i]) - static_cast<double>(cpu[i]));
          if (!(diff <= tol)) {
            ADD_FAILURE() << "gemv_4bit_cuda vs gemv_4bit_cpu at " << i << ": " << got[i] << " vs " << cpu[i]
                          << " (tol " << tol << ")";
            ++bad;
          }
        }
      }
    }
    if (opt.gemm && M <= qx::kCudaSmallMaxM) {
      std::vector<float> got;
      ASSERT_TRUE(run_launcher(qx::gemm_4bit_small_cuda, qx::kCudaSmallMaxM, dw, x, M, opt.odt, opt.x_offset,
                               opt.stream, &got));
      EXPECT_TRUE(within_bound(got, ref, M, N, opt.odt)) << "gemm_4bit_small_cuda";
    }
  }
}

// ---------------------------------------------------------------------------------------------

struct Shape {
  int64_t M, N, K;
};

class MatmulCudaShapes : public ::testing::TestWithParam<Shape> {};

// Awkward shapes: single element, rows starting mid-byte (odd K), blocks straddling rows (K not a multiple
// of the block size), ragged tiles in every dimension, and one full-size decode shape.
const Shape kShapes[] = {{1, 1, 1},      {1, 7, 33},    {3, 129, 97},    {4, 4096, 4096},
                         {17, 300, 130}, {64, 256, 512}, {33, 1000, 1000}};

TEST_P(MatmulCudaShapes, MatchesReference) {
  REQUIRE_GPU();
  const Shape s = GetParam();
  uint32_t seed = static_cast<uint32_t>(s.M * 1000003 + s.N * 1009 + s.K);
  for (int64_t bs : kBlocks)
    for (QuantType qt : kQuantTypes)
      for (bool dq : {false, true}) check_weight(s.M, s.N, s.K, bs, qt, dq, seed++);
}

INSTANTIATE_TEST_SUITE_P(Shapes, MatmulCudaShapes, ::testing::ValuesIn(kShapes),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           return "M" + std::to_string(info.param.M) + "_N" + std::to_string(info.param.N) + "_K" +
                                  std::to_string(info.param.K);
                         });

TEST(MatmulCuda, LargeBlockSizes) {  // blocks longer than a row, and the largest block size
  REQUIRE_GPU();
  check_weight(2, 50, 256, 1024, QuantType::kNF4, true, 11);
  check_weight(5, 33, 96, 4096, QuantType::kFP4, false, 12);
  check_weight(1, 9, 4096, 4096, QuantType::kNF4, false, 13);
}

TEST(MatmulCuda, HalfOutputs) {
  REQUIRE_GPU();
  for (DType odt : {DType::kFloat16, DType::kBFloat16}) {
    CaseOptions opt;
    opt.odt = odt;
    check_weight(3, 200, 256, 64, QuantType::kNF4, true, 21, opt);
    check_weight(20, 130, 96, 32, QuantType::kFP4, false, 22, opt);
    check_weight(2, 77, 45, 64, QuantType::kNF4, false, 23, opt);
  }
}

TEST(MatmulCuda, MisalignedPointers) {  // the element-wise paths for packed bytes and x
  REQUIRE_GPU();
  for (size_t packed_offset : {size_t{1}, size_t{8}}) {
    CaseOptions opt;
    opt.packed_offset = packed_offset;
    check_weight(2, 64, 256, 64, QuantType::kNF4, true, 31, opt);
    check_weight(17, 70, 512, 128, QuantType::kFP4, false, 32, opt);
  }
  for (size_t x_offset : {size_t{2}, size_t{4}, size_t{8}}) {
    CaseOptions opt;
    opt.x_offset = x_offset;
    check_weight(4, 64, 256, 64, QuantType::kNF4, false, 33, opt);
    check_weight(40, 96, 512, 32, QuantType::kNF4, true, 34, opt);
  }
}

TEST(MatmulCuda, NonPowerOfTwoNestedBlocksize) {
  REQUIRE_GPU();
  for (int64_t nested : {int64_t{100}, int64_t{3}}) {
    CaseOptions opt;
    opt.nested_bs = nested;
    check_weight(3, 100, 512, 64, QuantType::kNF4, true, 41, opt);
    check_weight(24, 70, 130, 32, QuantType::kFP4, true, 42, opt);
  }
}

TEST(MatmulCuda, SplitK) {  // few rows, long K: the gemv splits K over the warps of a CTA
  REQUIRE_GPU();
  check_weight(1, 3, 32768, 64, QuantType::kNF4, true, 51);
  check_weight(2, 40, 8192, 64, QuantType::kNF4, false, 52);
  check_weight(4, 1, 1024, 32, QuantType::kFP4, true, 53);
  check_weight(3, 8, 1056, 64, QuantType::kNF4, false, 54);  // a last, partial warp step
}

TEST(MatmulCuda, LargeShapes) {
  REQUIRE_GPU();
  CaseOptions gemv_only;
  gemv_only.gemm = false;
  check_weight(1, 14336, 4096, 64, QuantType::kNF4, true, 61, gemv_only);
  // float32 x of 4 x 16384 (256 KiB) exceeds the shared-memory opt-in limit: x is read from global memory
  check_weight(4, 4096, 16384, 64, QuantType::kNF4, true, 62, gemv_only);
  CaseOptions gemm_only;
  gemm_only.gemv = false;
  check_weight(48, 1024, 4096, 64, QuantType::kNF4, true, 63, gemm_only);
}

TEST(MatmulCuda, NonDefaultStream) {
  REQUIRE_GPU();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  CaseOptions opt;
  opt.stream = stream;
  check_weight(4, 300, 1024, 64, QuantType::kNF4, true, 71, opt);
  check_weight(9, 300, 1024, 64, QuantType::kNF4, true, 72, opt);
  cudaStreamDestroy(stream);
}

TEST(MatmulCuda, ZeroRowsIsNoop) {
  REQUIRE_GPU();
  const std::unique_ptr<HostWeight> hw = make_weight(16, 64, 64, QuantType::kNF4, false, 256, 81);
  ASSERT_TRUE(hw != nullptr);
  DevWeight dw;
  ASSERT_TRUE(to_device(*hw, 0, &dw));
  DevBuf dx(64 * 4), dout(16 * 4);
  ASSERT_TRUE(dx.ok() && dout.ok());
  ASSERT_EQ(cudaMemset(dout.get(), 0x7f, 16 * 4), cudaSuccess);
  EXPECT_EQ(qx::gemv_4bit_cuda(dx.get(), DType::kFloat32, 0, dw.view, dout.get(), DType::kFloat32, nullptr),
            Status::kOk);
  EXPECT_EQ(qx::gemm_4bit_small_cuda(dx.get(), DType::kFloat32, 0, dw.view, dout.get(), DType::kFloat32, nullptr),
            Status::kOk);
  EXPECT_EQ(qx::gemv_4bit_cuda(nullptr, DType::kFloat32, 0, dw.view, nullptr, DType::kFloat32, nullptr), Status::kOk);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> raw(16 * 4);
  ASSERT_EQ(cudaMemcpy(raw.data(), dout.get(), raw.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (uint8_t b : raw) EXPECT_EQ(b, 0x7f);
}

TEST(MatmulCuda, InvalidArguments) {
  REQUIRE_GPU();
  const std::unique_ptr<HostWeight> hw = make_weight(16, 64, 64, QuantType::kNF4, true, 256, 91);
  ASSERT_TRUE(hw != nullptr);
  DevWeight dw;
  ASSERT_TRUE(to_device(*hw, 0, &dw));
  DevBuf dabsmax(hw->absmax.size() * 4), dx(static_cast<size_t>(qx::kCudaSmallMaxM + 1) * 64 * 4),
      dout(static_cast<size_t>(qx::kCudaSmallMaxM + 1) * 16 * 4);
  ASSERT_TRUE(upload(dabsmax, hw->absmax.data(), hw->absmax.size() * 4));
  ASSERT_TRUE(dx.ok() && dout.ok());
  ASSERT_EQ(cudaMemset(dx.get(), 0, dx.bytes()), cudaSuccess);
  const Weight4 good = dw.view;
  Weight4 plain = good;
  plain.scales = AbsmaxView();
  plain.scales.absmax = dabsmax.get<float>();

  const Launcher launchers[] = {qx::gemv_4bit_cuda, qx::gemm_4bit_small_cuda};
  const int64_t max_m[] = {qx::kCudaGemvMaxM, qx::kCudaSmallMaxM};
  for (int li = 0; li < 2; ++li) {
    SCOPED_TRACE(li == 0 ? "gemv_4bit_cuda" : "gemm_4bit_small_cuda");
    const Launcher fn = launchers[li];
    auto call = [&](const Weight4& w, int64_t M, const void* x = nullptr, void* out = nullptr,
                    DType xdt = DType::kFloat32, DType odt = DType::kFloat32) {
      return fn(x ? x : dx.get(), xdt, M, w, out ? out : dout.get(), odt, nullptr);
    };
    auto bad = [&](auto mutate) {
      Weight4 w = good;
      mutate(w);
      return call(w, 1);
    };
    EXPECT_EQ(call(good, 1), Status::kOk);
    EXPECT_EQ(call(plain, 1), Status::kOk);
    EXPECT_EQ(bad([](Weight4& w) { w.packed = nullptr; }), Status::kInvalidArgument);
    EXPECT_EQ(bad([](Weight4& w) { w.N = 0; }), Status::kInvalidArgument);
    EXPECT_EQ(bad([](Weight4& w) { w.N = -3; }), Status::kInvalidArgument);
    EXPECT_EQ(bad([](Weight4& w) { w.K = 0; }), Status::kInvalidArgument);
    EXPECT_EQ(bad([](Weight4& w) { w.K = -64; }), Status::kInvalidArgument);
    for (int64_t b : {int64_t{0}, int64_t{16}, int64_t{48}, int64_t{100}, int64_t{8192}})
      EXPECT_EQ(bad([b](Weight4& w) { w.blocksize = b; }), Status::kInvalidArgument) << "blocksize " << b;
    EXPECT_EQ(bad([](Weight4& w) { w.qt = static_cast<QuantType>(7); }), Status::kInvalidArgument);
    EXPECT_EQ(bad([](Weight4& w) { w.scales.nested_absmax = nullptr; }), Status::kInvalidArgument);
    EXPECT_EQ(bad([](Weight4& w) { w.scales.nested_code = nullptr; }), Status::kInvalidArgument);
    EXPECT_EQ(bad([](Weight4& w) { w.scales.nested_blocksize = 0; }), Status::kInvalidArgument);
    EXPECT_EQ(bad([](Weight4& w) { w.scales = AbsmaxView(); }), Status::kInvalidArgument);  // no scales at all
    EXPECT_EQ(call(good, -1), Status::kInvalidArgument);
    EXPECT_EQ(call(good, max_m[li] + 1), Status::kInvalidArgument);
    EXPECT_EQ(call(good, max_m[li]), Status::kOk);
    EXPECT_EQ(fn(nullptr, DType::kFloat32, 1, good, dout.get(), DType::kFloat32, nullptr), Status::kInvalidArgument);
    EXPECT_EQ(fn(dx.get(), DType::kFloat32, 1, good, nullptr, DType::kFloat32, nullptr), Status::kInvalidArgument);
    EXPECT_EQ(call(good, 1, nullptr, nullptr, static_cast<DType>(9)), Status::kUnsupported);
    EXPECT_EQ(call(good, 1, nullptr, nullptr, DType::kFloat32, static_cast<DType>(9)), Status::kUnsupported);
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace

// CPU 4-bit matmul kernels: row tiles equal the matching slice of the full dequantize (bit for bit), and the
// fused GEMV and packed GEMM (every ISA the machine runs: CTest repeats the suite under QLORA_EXT_CPU_ISA) are
// within 2x the error of a plain float32 dot product against a float64 reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "matmul/matmul.h"

using namespace qx;

namespace {

struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  Weight4 w;
};

Quantized make_weight(int64_t N, int64_t K, int64_t bs, QuantType qt, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  std::vector<float> x(N * K);
  for (auto& v : x) v = dist(gen);
  Quantized q{std::vector<uint8_t>((N * K + 1) / 2), std::vector<float>((N * K + bs - 1) / bs), {}};
  EXPECT_EQ(quantize_4bit_cpu(x.data(), DType::kFloat32, N * K, bs, qt, q.packed.data(), q.absmax.data()), Status::kOk);
  q.w.packed = q.packed.data();
  q.w.scales.absmax = q.absmax.data();
  q.w.N = N, q.w.K = K, q.w.blocksize = bs, q.w.qt = qt;
  return q;
}

// Largest errors against a float64 reference of a kernel's output and of a naive float32 sum, and the largest
// reference magnitude: the kernels must stay within 2x the naive sum's error (+ one rounding of the output).
struct Errors {
  double ours = 0, naive = 0, scale = 0;
  void add(float got, float naive_sum, double ref) {
    ours = std::max(ours, std::fabs(got - ref));
    naive = std::max(naive, std::fabs(naive_sum - ref));
    scale = std::max(scale, std::fabs(ref));
  }
  double bound() const { return 2 * naive + 1.2e-7 * scale; }
};

}  // namespace

TEST(MatmulCpu, RowTilesMatchFullDequantize) {
  for (auto [N, K] : {std::pair<int64_t, int64_t>{7, 33}, {31, 77}, {64, 4096}, {100, 130}}) {
    Quantized q = make_weight(N, K, 32, QuantType::kNF4, uint32_t(N + K));
    std::vector<float> full(N * K);
    ASSERT_EQ(dequantize_4bit_cpu(q.packed.data(), q.w.scales, N * K, 32, QuantType::kNF4, full.data(), DType::kFloat32),
              Status::kOk);
    for (int64_t n0 = 0; n0 < N; n0 += 5) {
      int64_t n1 = std::min(N, n0 + 3);
      std::vector<float> tile((n1 - n0) * K);
      ASSERT_EQ(dequantize_4bit_tile_cpu(q.w, n0, n1, 0, K, tile.data(), DType::kFloat32), Status::kOk);
      ASSERT_EQ(0, std::memcmp(tile.data(), full.data() + n0 * K, tile.size() * 4)) << N << "x" << K << " n0=" << n0;
    }
  }
}

TEST(MatmulCpu, ColumnTilesMatchFullDequantize) {
  // odd K: rows start mid-byte and blocks straddle rows; tiles start anywhere, also mid-block
  for (auto [N, K] : {std::pair<int64_t, int64_t>{7, 33}, {31, 77}, {9, 4096}, {100, 130}}) {
    Quantized q = make_weight(N, K, 32, QuantType::kFP4, uint32_t(3 * N + K));
    std::vector<float> full(N * K);
    ASSERT_EQ(dequantize_4bit_cpu(q.packed.data(), q.w.scales, N * K, 32, QuantType::kFP4, full.data(), DType::kFloat32),
              Status::kOk);
    for (int64_t k0 : {int64_t(0), int64_t(1), int64_t(17), K / 2})
      for (int64_t k1 : {k0 + 1, std::min(K, k0 + 40), K}) {
        if (k1 > K) continue;
        const int64_t n0 = N / 3, n1 = N, kc = k1 - k0;
        std::vector<float> tile((n1 - n0) * kc);
        ASSERT_EQ(dequantize_4bit_tile_cpu(q.w, n0, n1, k0, k1, tile.data(), DType::kFloat32), Status::kOk);
        for (int64_t r = n0; r < n1; ++r)
          ASSERT_EQ(0, std::memcmp(tile.data() + (r - n0) * kc, full.data() + r * K + k0, kc * 4))
              << N << "x" << K << " row " << r << " cols [" << k0 << ", " << k1 << ")";
      }
  }
}

TEST(MatmulCpu, GemvErrorWithinTwiceNaiveFloat32) {
  std::mt19937 gen(3);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  // odd K (rows start mid-byte), blocks straddling rows, K below one vector, tails of every length
  for (auto [N, K] : {std::pair<int64_t, int64_t>{1, 1}, {7, 33}, {31, 77}, {129, 97}, {300, 1000}, {64, 4096},
                      {5, 4099}})
    for (QuantType qt : {QuantType::kNF4, QuantType::kFP4})
      for (int64_t M : {1, 2, 3, 4, 7, 8, 9, 17, 40, 64}) {
        if (M > gemv_4bit_cpu_max_m()) continue;  // the ISA's limit (8 scalar, 32 on AVX2 / AVX-512)
        const int64_t bs = (N + M) % 3 == 0 ? 32 : (N + M) % 3 == 1 ? 64 : 256;
        Quantized q = make_weight(N, K, bs, qt, uint32_t(N * K + M));
        std::vector<float> W(N * K), x(M * K), y(M * N);
        ASSERT_EQ(dequantize_4bit_tile_cpu(q.w, 0, N, 0, K, W.data(), DType::kFloat32), Status::kOk);
        for (auto& v : x) v = dist(gen);
        ASSERT_EQ(gemv_4bit_cpu(x.data(), DType::kFloat32, M, q.w, y.data(), DType::kFloat32), Status::kOk);
        Errors e;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double ref = 0;
            float naive = 0;
            for (int64_t k = 0; k < K; ++k) {
              ref += double(x[m * K + k]) * W[n * K + k];
              naive += x[m * K + k] * W[n * K + k];
            }
            e.add(y[m * N + n], naive, ref);
          }
        EXPECT_LE(e.ours, e.bound()) << "M=" << M << " N=" << N << " K=" << K << " bs=" << bs;
      }
}

TEST(MatmulCpu, FusedGemmErrorWithinTwiceNaiveFloat32) {
  // a @ W^T (forward) and a @ W (the gradient for x): the inner dimension over several 256-deep slices (the last
  // partial), output columns over more than one 2048-column block and under one 16-column panel, odd K (rows
  // start mid-byte), M over partial and whole 6-row panels and two 144-row blocks
  std::mt19937 gen(5);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto [N, K, M] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {77, 129, 7}, {77, 129, 33}, {600, 2100, 150},
                         {520, 5, 13}, {300, 4200, 6}, {2100, 600, 40}})
    for (QuantType qt : {QuantType::kNF4, QuantType::kFP4})
      for (bool fwd : {true, false}) {
        Quantized q = make_weight(N, K, 64, qt, uint32_t(N + K + M));
        const int64_t inner = fwd ? K : N, cols = fwd ? N : K;
        std::vector<float> W(N * K), a(M * inner), y(M * cols);
        for (auto& v : a) v = dist(gen);
        const Status st = gemm_4bit_cpu(a.data(), M, q.w, fwd, y.data());
        if (!gemm_4bit_cpu_fused()) {  // scalar and AVX-512 take dequantized tiles and the platform GEMM
          EXPECT_EQ(st, Status::kUnsupported);
          continue;
        }
        ASSERT_EQ(st, Status::kOk);
        ASSERT_EQ(dequantize_4bit_tile_cpu(q.w, 0, N, 0, K, W.data(), DType::kFloat32), Status::kOk);
        Errors e;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t c = 0; c < cols; ++c) {
            double ref = 0;
            float naive = 0;
            for (int64_t i = 0; i < inner; ++i) {
              const float wv = fwd ? W[c * K + i] : W[i * K + c];
              ref += double(a[m * inner + i]) * wv;
              naive += a[m * inner + i] * wv;
            }
            e.add(y[m * cols + c], naive, ref);
          }
        EXPECT_LE(e.ours, e.bound()) << (fwd ? "a @ W^T" : "a @ W") << " M=" << M << " N=" << N << " K=" << K;
      }
}

TEST(MatmulCpu, BadArguments) {
  Quantized q = make_weight(8, 64, 64, QuantType::kNF4, 1);
  const int64_t too_many = gemv_4bit_cpu_max_m() + 1;
  std::vector<float> x(too_many * 64), y(too_many * 8);
  EXPECT_EQ(gemv_4bit_cpu(x.data(), DType::kFloat32, too_many, q.w, y.data(), DType::kFloat32),
            Status::kInvalidArgument);
  EXPECT_EQ(dequantize_4bit_tile_cpu(q.w, 3, 9, 0, 64, y.data(), DType::kFloat32), Status::kInvalidArgument);
  EXPECT_EQ(dequantize_4bit_tile_cpu(q.w, 0, 8, 10, 65, y.data(), DType::kFloat32), Status::kInvalidArgument);
  EXPECT_EQ(dequantize_4bit_tile_cpu(q.w, 0, 8, 10, 9, y.data(), DType::kFloat32), Status::kInvalidArgument);
  Weight4 bad = q.w;
  bad.blocksize = 48;
  EXPECT_EQ(gemv_4bit_cpu(x.data(), DType::kFloat32, 1, bad, y.data(), DType::kFloat32), Status::kInvalidArgument);
  bad = q.w;
  bad.scales.absmax = nullptr;
  EXPECT_EQ(gemv_4bit_cpu(x.data(), DType::kFloat32, 1, bad, y.data(), DType::kFloat32), Status::kInvalidArgument);
  EXPECT_EQ(gemm_4bit_cpu(x.data(), 1, bad, true, y.data()), Status::kInvalidArgument);
  EXPECT_EQ(gemm_4bit_cpu(x.data(), -1, q.w, false, y.data()), Status::kInvalidArgument);
  EXPECT_EQ(gemm_4bit_cpu(nullptr, 1, q.w, true, y.data()), Status::kInvalidArgument);
}

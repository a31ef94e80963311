// CPU optimizer steps against two references written from optim.h: a float32 scalar model of the documented
// operation order (bit-exact: every ISA must produce these bits, and so must CUDA) and a double-precision
// model of the math (tolerance). Run by CTest once per instruction set (QLORA_EXT_CPU_ISA).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/convert.h"
#include "optim/optim.h"
#include "optim/optim_cpu_detail.h"
#include "quant/quant.h"

using namespace qx;

namespace {

const int64_t kSizes[] = {1, 7, 15, 16, 17, 255, 256, 257, 1000, 4097, 70001};
const DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
const OptimKind kKinds[] = {OptimKind::kAdamW, OptimKind::kLion};
constexpr float kInf = std::numeric_limits<float>::infinity();

const char* name(DType t) { return t == DType::kFloat32 ? "f32" : t == DType::kFloat16 ? "f16" : "bf16"; }
const char* name(OptimKind k) { return k == OptimKind::kAdamW ? "adamw" : "lion"; }

// Parameters / gradients stored in `dt` (as raw bytes) plus their float values.
struct Tensor {
  DType dt;
  std::vector<uint16_t> h;
  std::vector<float> f;
  void* data() { return dt == DType::kFloat32 ? static_cast<void*>(f.data()) : static_cast<void*>(h.data()); }
  float get(int64_t i) const {
    return load_elem(dt == DType::kFloat32 ? static_cast<const void*>(f.data()) : h.data(), dt, i);
  }
  void set(int64_t i, float v) { store_elem(data(), dt, i, v); }
};

Tensor random_tensor(DType dt, int64_t n, float scale, std::mt19937& gen) {
  Tensor t{dt, std::vector<uint16_t>(dt == DType::kFloat32 ? 0 : n), std::vector<float>(dt == DType::kFloat32 ? n : 0)};
  std::normal_distribution<float> d(0.0f, scale);
  for (int64_t i = 0; i < n; ++i) t.set(i, d(gen));
  return t;
}

OptimHyper hyper(OptimKind k, int64_t step, double wd = 0.01) {
  OptimHyper h;
  const double lr = k == OptimKind::kAdamW ? 1e-3 : 1e-4;
  EXPECT_EQ(optim_hyper(k, lr, 0.9, k == OptimKind::kAdamW ? 0.999 : 0.99, 1e-8, wd, step, &h), Status::kOk);
  return h;
}

// The documented float32 operation order (optim.h), one element. Returns false when the element is skipped.
bool ref_update(OptimKind k, const OptimHyper& h, float& p, float g, float& m, float& v) {
  if (k == OptimKind::kAdamW) {
    const float m1 = m + h.one_minus_beta1 * (g - m);
    const float v1 = v * h.beta2 + (h.one_minus_beta2 * g) * g;
    const float den = std::sqrt(v1) / h.bc2_sqrt + h.eps;
    const float p1 = p * h.decay + (h.neg_step * m1) / den;
    if (!std::isfinite(g) || !std::isfinite(v1)) return false;
    p = p1, m = m1, v = v1;
  } else {
    const float c = m * h.beta1 + g * h.one_minus_beta1;
    const float sgn = c > 0 ? 1.0f : c < 0 ? -1.0f : 0.0f;
    const float p1 = p * h.decay + h.neg_step * sgn;
    const float m1 = m * h.beta2 + g * h.one_minus_beta2;
    if (!std::isfinite(g)) return false;
    p = p1, m = m1;
  }
  return true;
}

// The same update in double from the spec (bias-corrected AdamW with decoupled decay; Lion).
void ref_update64(OptimKind k, double lr, double b1, double b2, double eps, double wd, int64_t t, double& p, double g,
                  double& m, double& v) {
  p *= 1 - lr * wd;
  if (k == OptimKind::kAdamW) {
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    p -= lr / (1 - std::pow(b1, double(t))) * m / (std::sqrt(v / (1 - std::pow(b2, double(t)))) + eps);
  } else {
    const double c = b1 * m + (1 - b1) * g;
    p -= lr * (c > 0 ? 1 : c < 0 ? -1 : 0);
    m = b2 * m + (1 - b2) * g;
  }
}

struct State32 {
  std::vector<float> m, v;
  OptimState view() { return OptimState{m.data(), v.empty() ? nullptr : v.data()}; }
};

struct State8 {
  std::vector<uint8_t> qm, qv;
  std::vector<float> am, av;
  OptimState view() {
    OptimState s;
    s.qm = qm.data(), s.absmax_m = am.data();
    if (!qv.empty()) s.qv = qv.data(), s.absmax_v = av.data();
    return s;
  }
};

// Random non-trivial 8-bit state (as if after some steps): random codes, positive absmax, one all-zero block.
State8 random_state8(OptimKind k, int64_t n, std::mt19937& gen) {
  const int64_t nb = (n + kOptimBlock - 1) / kOptimBlock;
  State8 s{std::vector<uint8_t>(n), {}, std::vector<float>(nb), {}};
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(1e-4f, 1e-2f);
  for (auto& q : s.qm) q = uint8_t(byte(gen));
  for (auto& a : s.am) a = scale(gen);
  if (k == OptimKind::kAdamW) {
    s.qv.resize(n), s.av.resize(nb);
    for (auto& q : s.qv) q = uint8_t(byte(gen));
    for (auto& a : s.av) a = scale(gen) * 1e-3f;
  }
  if (nb > 2) s.am[1] = 0.0f;  // a block whose first moment decodes to zero
  return s;
}

}  // namespace

TEST(OptimCpu, HyperMatchesTorchFormulas) {
  OptimHyper h;
  ASSERT_EQ(optim_hyper(OptimKind::kAdamW, 1e-3, 0.9, 0.999, 1e-8, 0.1, 3, &h), Status::kOk);
  EXPECT_EQ(h.neg_step, float(-(1e-3 / (1 - std::pow(0.9, 3.0)))));
  EXPECT_EQ(h.bc2_sqrt, float(std::sqrt(1 - std::pow(0.999, 3.0))));
  EXPECT_EQ(h.decay, float(1 - 1e-3 * 0.1));
  EXPECT_EQ(h.one_minus_beta1, float(1 - 0.9));
  ASSERT_EQ(optim_hyper(OptimKind::kLion, 1e-4, 0.9, 0.99, 0, 0, 1, &h), Status::kOk);
  EXPECT_EQ(h.neg_step, -1e-4f);
  for (auto bad : {std::vector<double>{-1e-3, 0.9, 0.999, 1e-8, 0, 1}, {1e-3, 1.0, 0.999, 1e-8, 0, 1},
                   {1e-3, 0.9, -0.1, 1e-8, 0, 1}, {1e-3, 0.9, 0.999, -1, 0, 1}, {1e-3, 0.9, 0.999, 1e-8, -1, 1},
                   {1e-3, 0.9, 0.999, 1e-8, 0, 0}, {NAN, 0.9, 0.999, 1e-8, 0, 1}})
    EXPECT_EQ(optim_hyper(OptimKind::kAdamW, bad[0], bad[1], bad[2], bad[3], bad[4], int64_t(bad[5]), &h),
              Status::kInvalidArgument);
}

TEST(OptimCpu, Float32StateIsBitExactWithTheDocumentedOrder) {
  std::mt19937 gen(1);
  for (OptimKind k : kKinds)
    for (DType dt : kDTypes)
      for (int64_t n : kSizes) {
        Tensor p = random_tensor(dt, n, 1.0f, gen);
        State32 s{std::vector<float>(n), k == OptimKind::kAdamW ? std::vector<float>(n) : std::vector<float>()};
        Tensor rp = p;
        State32 rs = s;
        for (int64_t step = 1; step <= 3; ++step) {
          Tensor g = random_tensor(dt, n, 0.1f, gen);
          const OptimHyper h = hyper(k, step);
          ASSERT_EQ(optim_step_cpu(k, p.data(), g.data(), dt, n, s.view(), h), Status::kOk);
          for (int64_t i = 0; i < n; ++i) {
            float pf = rp.get(i), dummy = 0;
            ref_update(k, h, pf, g.get(i), rs.m[i], k == OptimKind::kAdamW ? rs.v[i] : dummy);
            rp.set(i, pf);
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(float_to_bits(p.get(i)), float_to_bits(rp.get(i)))
              << name(k) << " " << name(dt) << " n=" << n << " i=" << i;
          ASSERT_EQ(float_to_bits(s.m[i]), float_to_bits(rs.m[i])) << name(k) << " " << name(dt) << " n=" << n;
          if (k == OptimKind::kAdamW) {
            ASSERT_EQ(float_to_bits(s.v[i]), float_to_bits(rs.v[i]));
          }
        }
      }
}

TEST(OptimCpu, Float32StateTracksDoublePrecisionMath) {
  // 20 steps of float32 stay within a few float32 roundings of the exact update.
  std::mt19937 gen(2);
  const int64_t n = 4099;
  for (OptimKind k : kKinds) {
    const double lr = k == OptimKind::kAdamW ? 1e-3 : 1e-4, b2 = k == OptimKind::kAdamW ? 0.999 : 0.99, wd = 0.05;
    Tensor p = random_tensor(DType::kFloat32, n, 1.0f, gen);
    State32 s{std::vector<float>(n), std::vector<float>(n)};
    std::vector<double> p64(p.f.begin(), p.f.end()), m64(n), v64(n);
    for (int64_t t = 1; t <= 20; ++t) {
      Tensor g = random_tensor(DType::kFloat32, n, 0.1f, gen);
      for (int64_t i = 0; i < n; i += 97) g.f[i] = 0.25f;  // keep Lion's sign away from 0 on some lanes
      OptimHyper h;
      ASSERT_EQ(optim_hyper(k, lr, 0.9, b2, 1e-8, wd, t, &h), Status::kOk);
      if (k == OptimKind::kLion) s.v.clear();
      ASSERT_EQ(optim_step_cpu(k, p.f.data(), g.f.data(), DType::kFloat32, n, s.view(), h), Status::kOk);
      for (int64_t i = 0; i < n; ++i) ref_update64(k, lr, 0.9, b2, 1e-8, wd, t, p64[i], g.f[i], m64[i], v64[i]);
    }
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (k == OptimKind::kLion && std::fabs(m64[i]) < 1e-6) continue;  // sign of a value at rounding level
      worst = std::max(worst, std::fabs(p.f[i] - p64[i]) / std::max(1.0, std::fabs(p64[i])));
    }
    EXPECT_LT(worst, 2e-6) << name(k);
  }
}

TEST(OptimCpu, EightBitStateIsBitExactWithDecodeUpdateEncode) {
  std::mt19937 gen(3);
  const float* cs = dynamic_map(true);
  const float* cu = dynamic_map(false);
  for (OptimKind k : kKinds)
    for (DType dt : kDTypes)
      for (int64_t n : kSizes) {
        Tensor p = random_tensor(dt, n, 1.0f, gen);
        Tensor g = random_tensor(dt, n, 0.01f, gen);
        if (n > 300) g.set(300, NAN), g.set(n - 1, -kInf);  // skipped elements inside a block
        State8 s = random_state8(k, n, gen);
        Tensor rp = p;
        State8 rs = s;
        const OptimHyper h = hyper(k, 7);
        ASSERT_EQ(optim_step_cpu(k, p.data(), g.data(), dt, n, s.view(), h), Status::kOk);
        // reference: decode every block, update in float32, absmax of the new values, nearest code
        const int64_t nb = (n + kOptimBlock - 1) / kOptimBlock;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t e0 = b * kOptimBlock, e1 = std::min(n, e0 + kOptimBlock);
          std::vector<float> m(e1 - e0), v(e1 - e0);
          float am = 0, av = 0;
          for (int64_t i = e0; i < e1; ++i) {
            float pf = rp.get(i);
            m[i - e0] = cs[rs.qm[i]] * rs.am[b];
            v[i - e0] = k == OptimKind::kAdamW ? cu[rs.qv[i]] * rs.av[b] : 0.0f;
            ref_update(k, h, pf, g.get(i), m[i - e0], v[i - e0]);
            rp.set(i, pf);
            am = std::max(am, std::fabs(m[i - e0]));
            av = std::max(av, std::fabs(v[i - e0]));
          }
          ASSERT_EQ(float_to_bits(s.am[b]), float_to_bits(am))
              << name(k) << " " << name(dt) << " n=" << n << " b=" << b;
          if (k == OptimKind::kAdamW) {
            ASSERT_EQ(float_to_bits(s.av[b]), float_to_bits(av));
          }
          for (int64_t i = e0; i < e1; ++i) {
            ASSERT_EQ(s.qm[i], quantize_nearest8(cs, am == 0 ? 0.0f : m[i - e0] / am))
                << name(k) << " n=" << n << " i=" << i;
            if (k == OptimKind::kAdamW) {
              ASSERT_EQ(s.qv[i], quantize_nearest8(cu, av == 0 ? 0.0f : v[i - e0] / av));
            }
            ASSERT_EQ(float_to_bits(p.get(i)), float_to_bits(rp.get(i))) << name(k) << " " << name(dt) << " i=" << i;
          }
        }
      }
}

TEST(OptimCpu, NonFiniteGradientsSkipOnlyTheirElements) {
  std::mt19937 gen(4);
  const int64_t n = 1000;
  for (OptimKind k : kKinds)
    for (DType dt : kDTypes) {
      Tensor p = random_tensor(dt, n, 1.0f, gen), g = random_tensor(dt, n, 0.1f, gen);
      const int64_t bad[] = {0, 17, 500, 999};
      const float vals[] = {NAN, kInf, -kInf, NAN};
      for (int j = 0; j < 4; ++j) g.set(bad[j], vals[j]);
      if (k == OptimKind::kAdamW && dt == DType::kFloat32) g.f[3] = 1e30f;  // squared gradient overflows
      State32 s{std::vector<float>(n, 0.5f),
                k == OptimKind::kAdamW ? std::vector<float>(n, 0.25f) : std::vector<float>()};
      const Tensor p0 = p;
      ASSERT_EQ(optim_step_cpu(k, p.data(), g.data(), dt, n, s.view(), hyper(k, 5, 0.5)), Status::kOk);
      for (int64_t i = 0; i < n; ++i) {
        const bool skipped = std::find(std::begin(bad), std::end(bad), i) != std::end(bad) ||
                             (k == OptimKind::kAdamW && dt == DType::kFloat32 && i == 3);
        // (a float16 / bfloat16 parameter may round back to its old value, so only skipping is certain there)
        if (skipped || dt == DType::kFloat32) {
          ASSERT_EQ(float_to_bits(p.get(i)) == float_to_bits(p0.get(i)), skipped)
              << name(k) << " " << name(dt) << " i=" << i;
        }
        ASSERT_EQ(s.m[i] == 0.5f, skipped) << i;
        ASSERT_TRUE(std::isfinite(p.get(i)) && std::isfinite(s.m[i]));
        if (k == OptimKind::kAdamW) {
          ASSERT_TRUE(std::isfinite(s.v[i]));
        }
      }
    }
}

TEST(OptimCpu, EightBitZeroStateAndZeroGradientStayZero) {
  const int64_t n = 600;
  const float* cs = dynamic_map(true);
  const uint8_t z = quantize_nearest8(cs, 0.0f);
  ASSERT_EQ(cs[z], 0.0f);
  State8 s{std::vector<uint8_t>(n, z), std::vector<uint8_t>(n, 0), std::vector<float>(3, 0.0f),
           std::vector<float>(3, 0.0f)};
  std::vector<float> p(n, 1.0f), g(n, 0.0f);
  ASSERT_EQ(optim_step_cpu(OptimKind::kAdamW, p.data(), g.data(), DType::kFloat32, n, s.view(),
                           hyper(OptimKind::kAdamW, 1, 0.0)), Status::kOk);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(p[i], 1.0f) << i;
  for (float a : s.am) EXPECT_EQ(a, 0.0f);
  for (uint8_t q : s.qm) EXPECT_EQ(q, z);
}

TEST(OptimCpu, ThreadCountDoesNotChangeResults) {
  std::mt19937 gen(5);
  const int64_t n = 300001;
  for (bool eight : {false, true}) {
    Tensor p = random_tensor(DType::kBFloat16, n, 1.0f, gen), g = random_tensor(DType::kBFloat16, n, 0.1f, gen);
    State8 s8 = random_state8(OptimKind::kAdamW, n, gen);
    State32 s32{std::vector<float>(n, 0.01f), std::vector<float>(n, 1e-4f)};
    Tensor p1 = p;
    State8 s8b = s8;
    State32 s32b = s32;
    cpu_set_num_threads(1);
    const OptimHyper h = hyper(OptimKind::kAdamW, 2);
    ASSERT_EQ(optim_step_cpu(OptimKind::kAdamW, p1.data(), g.data(), DType::kBFloat16, n,
                             eight ? s8b.view() : s32b.view(), h),
              Status::kOk);
    cpu_set_num_threads(3);
    ASSERT_EQ(optim_step_cpu(OptimKind::kAdamW, p.data(), g.data(), DType::kBFloat16, n,
                             eight ? s8.view() : s32.view(), h),
              Status::kOk);
    cpu_set_num_threads(0);
    EXPECT_EQ(p.h, p1.h);
    EXPECT_EQ(s8.qm, s8b.qm);
    EXPECT_EQ(s8.av, s8b.av);
    EXPECT_EQ(s32.v, s32b.v);
  }
}

TEST(OptimCpu, BadArgumentsAreRejected) {
  std::vector<float> p(10), g(10), m(10), v(10);
  const OptimHyper h = hyper(OptimKind::kAdamW, 1);
  OptimState s{m.data(), v.data()};
  EXPECT_EQ(optim_step_cpu(OptimKind::kAdamW, p.data(), g.data(), DType::kFloat32, -1, s, h), Status::kInvalidArgument);
  EXPECT_EQ(optim_step_cpu(OptimKind::kAdamW, nullptr, g.data(), DType::kFloat32, 10, s, h), Status::kInvalidArgument);
  EXPECT_EQ(optim_step_cpu(OptimKind::kAdamW, p.data(), g.data(), DType::kFloat32, 10, OptimState{m.data()}, h),
            Status::kInvalidArgument);  // AdamW needs v
  EXPECT_EQ(optim_step_cpu(OptimKind::kLion, p.data(), g.data(), DType::kFloat32, 10, OptimState{m.data()}, h),
            Status::kOk);
  OptimState s8;
  std::vector<uint8_t> q(10);
  s8.qm = q.data();  // 8-bit without absmax
  EXPECT_EQ(optim_step_cpu(OptimKind::kLion, p.data(), g.data(), DType::kFloat32, 10, s8, h), Status::kInvalidArgument);
  EXPECT_EQ(optim_step_cpu(OptimKind(7), p.data(), g.data(), DType::kFloat32, 10, s, h), Status::kInvalidArgument);
  EXPECT_EQ(optim_step_cpu(OptimKind::kAdamW, p.data(), g.data(), DType(9), 10, s, h), Status::kUnsupported);
  EXPECT_EQ(optim_step_cpu(OptimKind::kAdamW, nullptr, nullptr, DType::kFloat32, 0, OptimState{}, h), Status::kOk);
}

TEST(OptimCpu, EncoderEqualsNearestCodeForEveryKindOfFloat) {
  // The kernels encode by counting precomputed decision thresholds; this must pick exactly the code
  // quantize_nearest8 picks (nearest, ties to the lower index), including right at and around every
  // decision point, at the codes themselves, outside [-1, 1], and for zeros, infinities and NaN.
  std::mt19937 gen(6);
  for (bool is_signed : {true, false}) {
    const float* code = dynamic_map(is_signed);
    std::vector<float> x = {0.0f, -0.0f, 1.0f, -1.0f, 2.0f, -2.0f, kInf, -kInf, NAN, -NAN, 1e-30f, -1e-30f,
                            std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::denorm_min()};
    for (int j = 0; j < 256; ++j) {
      float c = code[j];
      for (int k = 0; k < 3; ++k) c = std::nextafter(c, -kInf);
      for (int k = 0; k < 7; ++k, c = std::nextafter(c, kInf)) x.push_back(c);
      if (j == 255) break;
      const double mid = (double(code[j]) + double(code[j + 1])) / 2;  // around the decision midpoint
      float m = float(mid);
      for (int k = 0; k < 4; ++k) m = std::nextafter(m, -kInf);
      for (int k = 0; k < 9; ++k, m = std::nextafter(m, kInf)) x.push_back(m);
    }
    std::uniform_real_distribution<float> u(-1.1f, 1.1f);
    std::uniform_int_distribution<uint32_t> bits;
    for (int i = 0; i < 200000; ++i) x.push_back(u(gen));
    for (int i = 0; i < 50000; ++i) x.push_back(bits_to_float(bits(gen)));
    std::vector<uint8_t> q(x.size());
    detail::encode8_cpu(is_signed, x.data(), int64_t(x.size()), q.data());
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_EQ(q[i], quantize_nearest8(code, x[i])) << (is_signed ? "signed" : "unsigned") << " x=" << x[i]
                                                      << " bits=" << std::hex << float_to_bits(x[i]);
  }
}

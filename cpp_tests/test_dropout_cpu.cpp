// CPU LoRA dropout (lora/dropout.h): Philox4x32-10 against Random123's published known-answer vectors, and
// the kernel's output against a scalar model of the documented stream (exact: every ISA must give these bits).
// Run by CTest once per instruction set (QLORA_EXT_CPU_ISA).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "lora/dropout.h"

using namespace qx;

namespace {

TEST(Philox, KnownAnswers) {
  struct Kat { uint32_t ctr[4]; uint64_t key; uint32_t out[4]; };
  const Kat kats[] = {
      {{0, 0, 0, 0}, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffffffffffull,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0x299f31d0a4093822ull,  // key = {lo, hi}
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    uint32_t c[4] = {k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]};
    philox4x32_10(c, k.key);
    for (int j = 0; j < 4; ++j) EXPECT_EQ(c[j], k.out[j]) << "word " << j;
  }
}

// The stream as dropout.h documents it, one element at a time.
bool keep_model(int64_t e, uint64_t seed, uint32_t thr) {
  const int64_t k = e / 64, j = (e % 64) / 16, l = e % 16;
  uint32_t c[4] = {static_cast<uint32_t>(k), static_cast<uint32_t>(static_cast<uint64_t>(k) >> 32),
                   static_cast<uint32_t>(l), 0};
  philox4x32_10(c, seed);
  return c[j] >= thr;
}

TEST(Dropout, MatchesTheStreamModelAtAwkwardSizes) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd;
  for (int64_t n : {1, 15, 16, 17, 63, 64, 65, 127, 1000, 4097, 70001}) {
    for (double p : {0.05, 0.5, 0.9}) {
      const uint64_t seed = rng();
      const uint32_t thr = dropout_threshold(p);
      const float scale = static_cast<float>(1.0 / (1.0 - p));
      std::vector<float> x(n), out(n, -1.0f);
      for (auto& v : x) v = nd(rng);
      ASSERT_EQ(dropout_cpu(x.data(), out.data(), n, seed, thr, scale), Status::kOk);
      int64_t kept = 0;
      for (int64_t e = 0; e < n; ++e) {
        const bool keep = keep_model(e, seed, thr);
        kept += keep;
        ASSERT_EQ(out[e], keep ? x[e] * scale : 0.0f) << "n=" << n << " p=" << p << " element " << e;
      }
      if (n >= 4097) {  // binomial: mean n(1-p), sd sqrt(n p (1-p)); 6 sd
        const double mean = n * (1 - p), sd = std::sqrt(n * p * (1 - p));
        EXPECT_NEAR(static_cast<double>(kept), mean, 6 * sd) << "n=" << n << " p=" << p;
      }
    }
  }
}

TEST(Dropout, InPlaceNonFiniteAndEdgeProbabilities) {
  const int64_t n = 333;
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(i) - 100.0f;
  x[5] = std::numeric_limits<float>::quiet_NaN();
  x[6] = std::numeric_limits<float>::infinity();
  std::vector<float> ref(n), alias = x;
  ASSERT_EQ(dropout_cpu(x.data(), ref.data(), n, 99, dropout_threshold(0.3), 1.0f / 0.7f), Status::kOk);
  ASSERT_EQ(dropout_cpu(alias.data(), alias.data(), n, 99, dropout_threshold(0.3), 1.0f / 0.7f), Status::kOk);
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(ref[i])) EXPECT_TRUE(std::isnan(alias[i]));
    else EXPECT_EQ(ref[i], alias[i]);
  }
  // like x * mask / (1 - p): NaN stays NaN whether dropped or not, Inf becomes NaN when dropped
  EXPECT_TRUE(std::isnan(ref[5]));
  EXPECT_TRUE(std::isnan(ref[6]) || std::isinf(ref[6]));
  // p = 0 keeps everything
  std::vector<float> all(n);
  ASSERT_EQ(dropout_cpu(x.data(), all.data(), n, 1, dropout_threshold(0.0), 1.0f), Status::kOk);
  for (int64_t i = 7; i < n; ++i) EXPECT_EQ(all[i], x[i]);
  EXPECT_EQ(dropout_threshold(0.0), 0u);
  EXPECT_EQ(dropout_threshold(0.5), 0x80000000u);
  EXPECT_EQ(dropout_threshold(1.0 - 1e-12), 0xffffffffu);
}

TEST(Dropout, RejectsBadArguments) {
  float v = 1.0f;
  EXPECT_EQ(dropout_cpu(&v, &v, -1, 0, 0, 1.0f), Status::kInvalidArgument);
  EXPECT_EQ(dropout_cpu(nullptr, &v, 4, 0, 0, 1.0f), Status::kInvalidArgument);
  EXPECT_EQ(dropout_cpu(&v, nullptr, 4, 0, 0, 1.0f), Status::kInvalidArgument);
  EXPECT_EQ(dropout_cpu(nullptr, nullptr, 0, 0, 0, 1.0f), Status::kOk);
}

}  // namespace

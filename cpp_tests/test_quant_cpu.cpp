// CPU kernels against a scalar reference written straight from the spec, on random awkward sizes.
// Run by CTest once per instruction set (QLORA_EXT_CPU_ISA), so the AVX-512, AVX2 and scalar paths all
// face the same cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "quant/quant.h"

using namespace qx;

namespace {

float from_bits(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
uint32_t to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

uint16_t ref_bf16(float f) {  // round to nearest even; quiet NaN
  uint32_t x = to_bits(f);
  if (std::isnan(f)) return uint16_t((x >> 16) | 0x40);
  return uint16_t((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}
// float -> half by nearest search over a table of every finite half value (ties to the even code):
// slower than a bit trick but obviously right.
uint16_t ref_half(float f) {
  static const std::vector<double> table = [] {
    std::vector<double> t(0x7c00);
    for (uint32_t h = 0; h < 0x7c00; ++h) {
      int e = h >> 10, m = h & 0x3ff;
      t[h] = e ? std::ldexp(1.0 + m / 1024.0, e - 15) : std::ldexp(m / 1024.0, -14);
    }
    return t;
  }();
  if (std::isnan(f)) return 0x7e00;
  uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  double a = std::fabs(double(f));
  if (a >= 65520.0) return sign | 0x7c00;  // at or beyond the rounding point of the largest half
  size_t hi = std::lower_bound(table.begin(), table.end(), a) - table.begin();
  if (hi == table.size()) return sign | 0x7bff;
  if (hi == 0 || table[hi] == a) return sign | uint16_t(hi);
  size_t lo = hi - 1;
  double dl = a - table[lo], dh = table[hi] - a;
  size_t best = dl < dh ? lo : dh < dl ? hi : ((lo & 1) == 0 ? lo : hi);
  return sign | uint16_t(best);
}

struct Ref4 {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
};

uint8_t ref_nibble(QuantType qt, float s) {
  const float* c = code4(qt);
  if (qt == QuantType::kNF4) {  // count of midpoints (double, compared as float32) strictly below s
    int idx = 0;
    for (int i = 0; i < 15; ++i) idx += s > float((double(c[i]) + double(c[i + 1])) / 2);
    return uint8_t(idx);
  }
  // FP4: nearest magnitude; on a tie the smaller one
  float m = std::fabs(s);
  int best = 0;
  for (int i = 1; i < 8; ++i) {
    float mid = float((double(c[best]) + double(c[i])) / 2);
    bool closer = c[i] > c[best] ? m > mid : m <= mid;
    if (closer) best = i;
  }
  return uint8_t((s < 0 ? 8 : 0) | best);
}

Ref4 ref_quantize4(const std::vector<float>& x, int64_t bs, QuantType qt) {
  int64_t n = x.size(), nb = (n + bs - 1) / bs;
  Ref4 r{std::vector<uint8_t>((n + 1) / 2, 0), std::vector<float>(nb)};
  for (int64_t b = 0; b < nb; ++b) {
    float amax = 0;
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) amax = std::max(amax, std::fabs(x[i]));
    r.absmax[b] = amax;
    float rc = 1.0f / amax;
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) {
      float s = amax == 0 ? 0.0f : x[i] * rc;
      s = std::min(1.0f, std::max(-1.0f, s));
      uint8_t nib = ref_nibble(qt, s);
      r.packed[i / 2] |= (i % 2 == 0) ? uint8_t(nib << 4) : nib;
    }
  }
  if (n % 2) r.packed[n / 2] |= ref_nibble(qt, 0.0f);  // the element past the end is 0.0 (bitsandbytes' CUDA)
  return r;
}

std::vector<float> random_weights(int64_t n, uint32_t seed, bool zero_block = true) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(gen);
  if (zero_block && n > 200)
    for (int64_t i = 64; i < 192; ++i) x[i] = 0.0f;  // whole zero blocks at the small block sizes
  if (n > 7) x[n / 2] = 0.5f * code4(QuantType::kNF4)[13];  // values near decision points
  return x;
}

const int64_t kSizes[] = {1, 2, 31, 63, 64, 65, 1000, 4097, 123457};
const int64_t kBlocks[] = {32, 64, 128, 256, 4096};

}  // namespace

TEST(QuantCpu, ReportsIsa) {
  std::string isa = cpu_isa();
  EXPECT_TRUE(isa == "avx512" || isa == "avx2" || isa == "scalar") << isa;
  std::printf("cpu_isa = %s, threads = %d\n", isa.c_str(), cpu_num_threads());
}

TEST(QuantCpu, Quantize4bitMatchesReference) {
  for (QuantType qt : {QuantType::kNF4, QuantType::kFP4})
    for (int64_t n : kSizes)
      for (int64_t bs : kBlocks) {
        auto x = random_weights(n, uint32_t(n * 7 + bs));
        Ref4 ref = ref_quantize4(x, bs, qt);
        std::vector<uint8_t> packed((n + 1) / 2, 0xAA);
        std::vector<float> absmax(ref.absmax.size());
        ASSERT_EQ(quantize_4bit_cpu(x.data(), DType::kFloat32, n, bs, qt, packed.data(), absmax.data()), Status::kOk);
        ASSERT_EQ(packed, ref.packed) << "n=" << n << " bs=" << bs << " qt=" << int(qt);
        ASSERT_EQ(absmax, ref.absmax);
      }
}

TEST(QuantCpu, Quantize4bitHalfInputsMatchFloat) {
  // A float16 / bfloat16 weight quantizes exactly like the float32 tensor holding the same values.
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    int64_t n = 4097;
    auto x = random_weights(n, 3);
    std::vector<uint16_t> h(n);
    std::vector<float> xf(n);
    for (int64_t i = 0; i < n; ++i) {
      h[i] = dt == DType::kFloat16 ? ref_half(x[i]) : ref_bf16(x[i]);
      xf[i] = dt == DType::kBFloat16 ? from_bits(uint32_t(h[i]) << 16) : 0.0f;
    }
    if (dt == DType::kFloat16)  // decode via the exact half -> float definition
      for (int64_t i = 0; i < n; ++i) {
        int e = (h[i] >> 10) & 0x1f, m = h[i] & 0x3ff;
        double v = e ? std::ldexp(1.0 + m / 1024.0, e - 15) : std::ldexp(m / 1024.0, -14);
        xf[i] = float((h[i] & 0x8000) ? -v : v);
      }
    Ref4 ref = ref_quantize4(xf, 64, QuantType::kNF4);
    std::vector<uint8_t> packed((n + 1) / 2);
    std::vector<float> absmax(ref.absmax.size());
    ASSERT_EQ(quantize_4bit_cpu(h.data(), dt, n, 64, QuantType::kNF4, packed.data(), absmax.data()), Status::kOk);
    EXPECT_EQ(packed, ref.packed);
    EXPECT_EQ(absmax, ref.absmax);
  }
}

TEST(QuantCpu, Dequantize4bitMatchesReferenceAllDtypes) {
  std::mt19937 gen(11);
  for (QuantType qt : {QuantType::kNF4, QuantType::kFP4})
    for (int64_t n : kSizes)
      for (int64_t bs : {32, 64, 4096}) {
        int64_t nb = (n + bs - 1) / bs;
        std::vector<uint8_t> packed((n + 1) / 2);
        for (auto& p : packed) p = uint8_t(gen());
        std::vector<float> absmax(nb);
        for (auto& a : absmax) a = std::uniform_real_distribution<float>(0.001f, 2.0f)(gen);
        // tiny scales give subnormal outputs: the bfloat16 path must not flush them
        absmax[0] = 1e-38f;
        if (nb > 2) absmax[nb - 1] = 3e-37f;
        // double-quantized scales for the same blocks
        std::vector<uint8_t> q(nb);
        for (auto& v : q) v = uint8_t(gen());
        std::vector<float> nested((nb + 255) / 256);
        for (auto& v : nested) v = std::uniform_real_distribution<float>(0.01f, 0.1f)(gen);
        const float offset = 0.0521f;
        const float* map = dynamic_map(true);
        for (bool dq : {false, true}) {
          AbsmaxView view;
          if (dq) view.qabsmax = q.data(), view.nested_absmax = nested.data(), view.nested_code = map,
                  view.offset = offset, view.nested_blocksize = 256;
          else view.absmax = absmax.data();
          std::vector<float> ref(n);
          for (int64_t i = 0; i < n; ++i) {
            int64_t b = i / bs;
            float a = absmax[b];
            if (dq) {
              volatile float prod = map[q[b]] * nested[b / 256];  // volatile: two separate roundings
              a = prod + offset;
            }
            uint8_t nib = (i % 2 == 0) ? packed[i / 2] >> 4 : packed[i / 2] & 0xf;
            ref[i] = code4(qt)[nib] * a;
          }
          std::vector<float> o32(n);
          std::vector<uint16_t> o16(n), obf(n);
          ASSERT_EQ(dequantize_4bit_cpu(packed.data(), view, n, bs, qt, o32.data(), DType::kFloat32), Status::kOk);
          ASSERT_EQ(dequantize_4bit_cpu(packed.data(), view, n, bs, qt, o16.data(), DType::kFloat16), Status::kOk);
          ASSERT_EQ(dequantize_4bit_cpu(packed.data(), view, n, bs, qt, obf.data(), DType::kBFloat16), Status::kOk);
          for (int64_t i = 0; i < n; ++i) {
            ASSERT_EQ(to_bits(o32[i]), to_bits(ref[i])) << "i=" << i << " n=" << n << " bs=" << bs << " dq=" << dq;
            ASSERT_EQ(obf[i], ref_bf16(ref[i])) << "bf16 i=" << i;
            ASSERT_EQ(o16[i], ref_half(ref[i])) << "fp16 i=" << i << " v=" << ref[i];
          }
        }
      }
}

TEST(QuantCpu, Quantize8bitFollowsTheGridRule) {
  // quantize_grid8's rule (bitsandbytes' CPU quantizer), recomputed here by a linear scan over the map's
  // midpoints; and the result is the nearest map value up to one grid step (2 / 65535).
  const float* map = dynamic_map(true);
  for (int64_t n : kSizes) {
    auto x = random_weights(n, uint32_t(n));
    std::vector<uint8_t> out(n);
    std::vector<float> absmax((n + 255) / 256);
    ASSERT_EQ(quantize_8bit_cpu(x.data(), n, 256, map, out.data(), absmax.data()), Status::kOk);
    for (int64_t i = 0; i < n; ++i) {
      const float a = absmax[i / 256];
      const float v = std::min(1.0f, std::max(-1.0f, x[i] * (1.0f / a)));
      const int u = static_cast<int>(((v + 1.0f) * 0.5f) * 65535.0f + 0.5f);
      const float g = -1.0f + (2.0f * float(u)) / 65535.0f;
      int below = 0;
      for (int j = 0; j < 255; ++j) below += (0.5f * (map[j] + map[j + 1]) < g);
      ASSERT_EQ(out[i], below) << "i=" << i << " v=" << v;
      ASSERT_EQ(quantize_grid8(map, x[i] * (1.0f / a)), out[i]);
      for (int j = 0; j < 256; ++j) ASSERT_LE(std::fabs(v - map[out[i]]), std::fabs(v - map[j]) + 2.0f / 65535.0f);
    }
    std::vector<float> back(n);
    ASSERT_EQ(dequantize_8bit_cpu(out.data(), absmax.data(), map, n, 256, back.data(), DType::kFloat32), Status::kOk);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(to_bits(back[i]), to_bits(map[out[i]] * absmax[i / 256]));
  }
  // the two ends of the grid, and an all-zero block
  EXPECT_EQ(quantize_grid8(map, -1.0f), 0);
  EXPECT_EQ(quantize_grid8(map, 1.0f), 255);
  std::vector<float> zeros(300, 0.0f), am(2);
  std::vector<uint8_t> q(300, 7);
  ASSERT_EQ(quantize_8bit_cpu(zeros.data(), 300, 256, map, q.data(), am.data()), Status::kOk);
  for (uint8_t b : q) EXPECT_EQ(b, 0);
}

TEST(QuantCpu, NonFiniteInputIsReported) {
  std::vector<float> x = random_weights(1000, 5);
  std::vector<uint8_t> packed(500);
  std::vector<float> absmax(16);
  for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
    x[777] = bad;
    EXPECT_EQ(quantize_4bit_cpu(x.data(), DType::kFloat32, 1000, 64, QuantType::kNF4, packed.data(), absmax.data()),
              Status::kNonFinite);
    std::vector<uint8_t> q(1000);
    std::vector<float> am(4);
    EXPECT_EQ(quantize_8bit_cpu(x.data(), 1000, 256, dynamic_map(true), q.data(), am.data()), Status::kNonFinite);
  }
}

TEST(QuantCpu, BadArgumentsAreRejected) {
  std::vector<float> x(128, 1.0f), absmax(4);
  std::vector<uint8_t> packed(64);
  for (int64_t bs : {0, 16, 48, 100, 8192, -64})
    EXPECT_EQ(quantize_4bit_cpu(x.data(), DType::kFloat32, 128, bs, QuantType::kNF4, packed.data(), absmax.data()),
              Status::kInvalidArgument) << bs;
  EXPECT_EQ(quantize_4bit_cpu(nullptr, DType::kFloat32, 128, 64, QuantType::kNF4, packed.data(), absmax.data()),
            Status::kInvalidArgument);
  EXPECT_EQ(quantize_4bit_cpu(x.data(), DType::kFloat32, -1, 64, QuantType::kNF4, packed.data(), absmax.data()),
            Status::kInvalidArgument);
  EXPECT_EQ(quantize_4bit_cpu(nullptr, DType::kFloat32, 0, 64, QuantType::kNF4, nullptr, nullptr), Status::kOk);
  AbsmaxView missing;  // neither plain nor nested scales
  EXPECT_EQ(dequantize_4bit_cpu(packed.data(), missing, 128, 64, QuantType::kNF4, x.data(), DType::kFloat32),
            Status::kInvalidArgument);
}

TEST(QuantCpu, ThreadCountDoesNotChangeResults) {
  auto x = random_weights(123457, 9);
  std::vector<uint8_t> p1((x.size() + 1) / 2), p4(p1.size());
  std::vector<float> a1((x.size() + 63) / 64), a4(a1.size());
  int saved = cpu_num_threads();
  cpu_set_num_threads(1);
  ASSERT_EQ(quantize_4bit_cpu(x.data(), DType::kFloat32, x.size(), 64, QuantType::kNF4, p1.data(), a1.data()),
            Status::kOk);
  cpu_set_num_threads(4);
  ASSERT_EQ(quantize_4bit_cpu(x.data(), DType::kFloat32, x.size(), 64, QuantType::kNF4, p4.data(), a4.data()),
            Status::kOk);
  cpu_set_num_threads(saved);
  EXPECT_EQ(p1, p4);
  EXPECT_EQ(a1, a4);
}

// GoogleTest: the CUDA quant.h launchers match the CPU reference bit-for-bit on finite data (every test skips without a GPU).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../csrc/quant/quant.h"
#include "cuda_test_util.h"

namespace {

using qx_test::DevBuf;
using qx_test::upload;

using qx::AbsmaxView;
using qx::DType;
using qx::QuantType;
using qx::Status;

const int64_t kSizes[] = {1, 63, 64, 65, 1000, 4097, 123457};
// 512-2048: one quantization block spans several warps (the cross-warp reduction in shared memory).
const int64_t kBlocks4[] = {32, 64, 128, 512, 1024, 2048, 4096};
const DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
const QuantType kQuantTypes[] = {QuantType::kNF4, QuantType::kFP4};

const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "float32" : t == DType::kFloat16 ? "float16" : "bfloat16";
}
const char* qt_name(QuantType q) { return q == QuantType::kNF4 ? "nf4" : "fp4"; }

// ---- host conversions, round to nearest even ----
uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

uint16_t to_half_bits(float f) {
  const uint16_t sign = static_cast<uint16_t>((f2u(f) >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a == 0.0f) return sign;
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);  // 65520 is the tie that rounds up to inf
  int e = 0;
  std::frexp(a, &e);                          // a = m * 2^e, m in [0.5, 1)
  const int ulp_exp = std::max(e - 1, -14) - 10;  // half has 10 stored mantissa bits, min normal 2^-14
  // Exact in double; nearbyint rounds half to even under the default rounding mode.
  const double q = std::nearbyint(std::ldexp(static_cast<double>(a), -ulp_exp));
  uint32_t bits;
  if (ulp_exp == -24) {
    bits = static_cast<uint32_t>(q);  // subnormal (q == 1024 is the smallest normal, same encoding)
  } else {
    bits = (static_cast<uint32_t>(ulp_exp + 10 + 15) << 10) + (static_cast<uint32_t>(q) - 1024u);  // carry ok
  }
  return static_cast<uint16_t>(sign | bits);
}

uint16_t to_bf16_bits(float f) {
  const uint32_t u = f2u(f);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Host bytes of `v` stored as `dt`.
std::vector<uint8_t> encode(const std::vector<float>& v, DType dt) {
  std::vector<uint8_t> out(v.size() * static_cast<size_t>(qx::dtype_size(dt)));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == DType::kFloat32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = dt == DType::kFloat16 ? to_half_bits(v[i]) : to_bf16_bits(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

// ---- device buffers ----

template <typename T>
::testing::AssertionResult download(std::vector<T>* dst, const DevBuf& d, size_t count, size_t offset = 0) {
  dst->resize(count);
  if (count == 0) return ::testing::AssertionSuccess();
  const cudaError_t s = cudaDeviceSynchronize();
  if (s != cudaSuccess) return ::testing::AssertionFailure() << "kernel: " << cudaGetErrorString(s);
  const cudaError_t e = cudaMemcpy(dst->data(), d.get(offset), count * sizeof(T), cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) return ::testing::AssertionFailure() << "download: " << cudaGetErrorString(e);
  return ::testing::AssertionSuccess();
}

// Bitwise equality of two byte ranges, reporting the first difference.
::testing::AssertionResult same_bytes(const void* expected, const void* actual, size_t bytes, size_t elem_size = 1) {
  const uint8_t* a = static_cast<const uint8_t*>(expected);
  const uint8_t* b = static_cast<const uint8_t*>(actual);
  for (size_t i = 0; i < bytes; ++i) {
    if (a[i] != b[i]) {
      const size_t e = i / elem_size;
      auto r = ::testing::AssertionFailure();
      r << "first difference in element " << e << " (byte " << i << "): expected 0x";
      char buf[8];
      for (size_t k = 0; k < elem_size; ++k) {
        std::snprintf(buf, sizeof(buf), "%02x", a[e * elem_size + elem_size - 1 - k]);
        r << buf;
      }
      r << ", got 0x";
      for (size_t k = 0; k < elem_size; ++k) {
        std::snprintf(buf, sizeof(buf), "%02x", b[e * elem_size + elem_size - 1 - k]);
        r << buf;
      }
      return r;
    }
  }
  return ::testing::AssertionSuccess();
}

// Decision thresholds as the spec defines them, to place inputs exactly on the ties.
std::vector<float> tie_values() {
  std::vector<float> t;
  const float* nf4 = qx::code4(QuantType::kNF4);
  for (int i = 0; i < 15; ++i) t.push_back(static_cast<float>((double(nf4[i]) + double(nf4[i + 1])) / 2.0));
  const float* fp4 = qx::code4(QuantType::kFP4);
  std::vector<float> mags(fp4, fp4 + 8);
  std::sort(mags.begin(), mags.end());
  for (int i = 0; i < 7; ++i) {
    const float m = static_cast<float>((double(mags[i]) + double(mags[i + 1])) / 2.0);
    t.push_back(m);
    t.push_back(-m);
  }
  for (int i = 0; i < 16; ++i) t.push_back(nf4[i]);
  t.push_back(-0.0f);
  return t;
}

// Random normal data with awkward blocks: all-zero, exact ties (absmax 1), tiny (subnormal absmax), huge.
std::vector<float> make_data(int64_t n, int64_t bs, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = normal(rng);
  auto block = [&](int64_t b, auto fn) {
    const int64_t e0 = b * bs, e1 = std::min(n, e0 + bs);
    for (int64_t i = e0; i < e1; ++i) fn(i, i - e0);
  };
  const int64_t nblocks = (n + bs - 1) / bs;
  if (nblocks > 1) block(1, [&](int64_t i, int64_t) { v[i] = 0.0f; });
  if (nblocks > 2) {
    const std::vector<float> ties = tie_values();
    block(2, [&](int64_t i, int64_t j) {
      if (j == 0) v[i] = 1.0f;
      else if (j <= static_cast<int64_t>(ties.size())) v[i] = ties[j - 1];
      else v[i] = std::max(-1.0f, std::min(1.0f, v[i]));
    });
  }
  if (nblocks > 3) block(3, [&](int64_t i, int64_t) { v[i] *= 1e-39f; });
  if (nblocks > 4) block(4, [&](int64_t i, int64_t) { v[i] *= 1e30f; });
  if (nblocks > 5) block(nblocks - 1, [&](int64_t i, int64_t) { v[i] = 0.0f; });  // a zero (maybe partial) tail
  if (n == 1) v[0] = 0.0f;  // the single-element case doubles as a one-element all-zero block
  return v;
}

struct Quant4Result {
  Status status;
  int flag = 0;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
};

// Runs quantize_4bit_cuda with the input and output pointers shifted by the given byte offsets.
::testing::AssertionResult run_quantize4_cuda(const std::vector<uint8_t>& host_in, DType dt, int64_t n, int64_t bs,
                                              QuantType qt, size_t in_offset, size_t out_offset, Quant4Result* r) {
  const int64_t nbytes = (n + 1) / 2, nblocks = (n + bs - 1) / bs;
  DevBuf din(host_in.size() + in_offset), dpacked(static_cast<size_t>(nbytes) + out_offset),
      dabsmax(static_cast<size_t>(nblocks) * 4), dflag(sizeof(int));
  auto up = upload(din, host_in.data(), host_in.size(), in_offset);
  if (!up) return up;
  if (!dpacked.ok() || !dabsmax.ok() || !dflag.ok()) return ::testing::AssertionFailure() << "cudaMalloc failed";
  if (cudaMemset(dflag.get(), 0, sizeof(int)) != cudaSuccess) return ::testing::AssertionFailure() << "memset";
  r->status = qx::quantize_4bit_cuda(din.get(in_offset), dt, n, bs, qt, dpacked.get<uint8_t>(out_offset),
                                     dabsmax.get<float>(), dflag.get<int>(), nullptr);
  auto d1 = download(&r->packed, dpacked, static_cast<size_t>(nbytes), out_offset);
  if (!d1) return d1;
  auto d2 = download(&r->absmax, dabsmax, static_cast<size_t>(nblocks));
  if (!d2) return d2;
  std::vector<int> flag;
  auto d3 = download(&flag, dflag, 1);
  if (!d3) return d3;
  r->flag = flag[0];
  return ::testing::AssertionSuccess();
}

void check_quantize4(DType dt, int64_t n, int64_t bs, QuantType qt, uint32_t seed, size_t in_offset = 0,
                     size_t out_offset = 0) {
  SCOPED_TRACE(std::string(qt_name(qt)) + " " + dtype_name(dt) + " n=" + std::to_string(n) +
               " blocksize=" + std::to_string(bs) + " in_offset=" + std::to_string(in_offset) +
               " out_offset=" + std::to_string(out_offset));
  const std::vector<uint8_t> host = encode(make_data(n, bs, seed), dt);
  const int64_t nbytes = (n + 1) / 2, nblocks = (n + bs - 1) / bs;
  std::vector<uint8_t> ref_packed(static_cast<size_t>(nbytes));
  std::vector<float> ref_absmax(static_cast<size_t>(nblocks));
  ASSERT_EQ(qx::quantize_4bit_cpu(host.data(), dt, n, bs, qt, ref_packed.data(), ref_absmax.data()), Status::kOk);
  Quant4Result r;
  ASSERT_TRUE(run_quantize4_cuda(host, dt, n, bs, qt, in_offset, out_offset, &r));
  ASSERT_EQ(r.status, Status::kOk);
  EXPECT_EQ(r.flag, 0);
  EXPECT_TRUE(same_bytes(ref_absmax.data(), r.absmax.data(), ref_absmax.size() * 4, 4)) << "absmax";
  EXPECT_TRUE(same_bytes(ref_packed.data(), r.packed.data(), ref_packed.size())) << "packed";
}

// Random scales for dequantize tests: positive normals with some zero and some large blocks.
std::vector<float> make_scales(int64_t count, std::mt19937* rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> s(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    s[i] = std::fabs(normal(*rng)) * 3.0f;
    if (i % 7 == 3) s[i] = 0.0f;
    if (i % 11 == 5) s[i] *= 1e4f;  // overflows float16 for some codes: inf must match too
  }
  return s;
}

std::vector<uint8_t> random_bytes(int64_t count, std::mt19937* rng) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> b(static_cast<size_t>(count));
  for (uint8_t& x : b) x = static_cast<uint8_t>(byte(*rng));
  return b;
}

// Dequantizes random packed data on both backends and compares bitwise. With `dq` the scales are
// double-quantized (signed dynamic map, nested block size `nested_bs`).
void check_dequantize4(DType ot, int64_t n, int64_t bs, QuantType qt, bool dq, int64_t nested_bs, uint32_t seed,
                       size_t packed_offset = 0, size_t out_offset = 0) {
  SCOPED_TRACE(std::string(qt_name(qt)) + " out=" + dtype_name(ot) + " n=" + std::to_string(n) +
               " blocksize=" + std::to_string(bs) + (dq ? " double-quant nested=" + std::to_string(nested_bs) : "") +
               " packed_offset=" + std::to_string(packed_offset) + " out_offset=" + std::to_string(out_offset));
  std::mt19937 rng(seed);
  const int64_t nbytes = (n + 1) / 2, nblocks = (n + bs - 1) / bs;
  const std::vector<uint8_t> packed = random_bytes(nbytes, &rng);
  const std::vector<float> absmax = make_scales(nblocks, &rng);
  const std::vector<uint8_t> qabsmax = random_bytes(nblocks, &rng);
  const std::vector<float> nested_absmax = make_scales((nblocks + nested_bs - 1) / nested_bs, &rng);
  const float* nested_code = qx::dynamic_map(true);
  const float offset = 0.0371f;

  AbsmaxView host_view;
  if (dq) {
    host_view.qabsmax = qabsmax.data();
    host_view.nested_absmax = nested_absmax.data();
    host_view.nested_code = nested_code;
    host_view.offset = offset;
    host_view.nested_blocksize = nested_bs;
  } else {
    host_view.absmax = absmax.data();
  }
  const size_t esize = static_cast<size_t>(qx::dtype_size(ot));
  std::vector<uint8_t> ref(static_cast<size_t>(n) * esize);
  ASSERT_EQ(qx::dequantize_4bit_cpu(packed.data(), host_view, n, bs, qt, ref.data(), ot), Status::kOk);

  DevBuf dpacked(packed.size() + packed_offset), dabsmax(absmax.size() * 4), dq_q(qabsmax.size()),
      dq_nested(nested_absmax.size() * 4), dq_code(256 * 4), dout(ref.size() + out_offset);
  ASSERT_TRUE(upload(dpacked, packed.data(), packed.size(), packed_offset));
  ASSERT_TRUE(upload(dabsmax, absmax.data(), absmax.size() * 4));
  ASSERT_TRUE(upload(dq_q, qabsmax.data(), qabsmax.size()));
  ASSERT_TRUE(upload(dq_nested, nested_absmax.data(), nested_absmax.size() * 4));
  ASSERT_TRUE(upload(dq_code, nested_code, 256 * 4));
  ASSERT_TRUE(dout.ok());
  AbsmaxView dev_view;
  if (dq) {
    dev_view.qabsmax = dq_q.get<uint8_t>();
    dev_view.nested_absmax = dq_nested.get<float>();
    dev_view.nested_code = dq_code.get<float>();
    dev_view.offset = offset;
    dev_view.nested_blocksize = nested_bs;
  } else {
    dev_view.absmax = dabsmax.get<float>();
  }
  ASSERT_EQ(qx::dequantize_4bit_cuda(dpacked.get<uint8_t>(packed_offset), dev_view, n, bs, qt, dout.get(out_offset),
                                     ot, nullptr),
            Status::kOk);
  std::vector<uint8_t> got;
  ASSERT_TRUE(download(&got, dout, ref.size(), out_offset));
  EXPECT_TRUE(same_bytes(ref.data(), got.data(), ref.size(), esize));
}

void check_quantize8(int64_t n, int64_t bs, bool is_signed, uint32_t seed) {
  SCOPED_TRACE(std::string(is_signed ? "signed" : "unsigned") + " map n=" + std::to_string(n) +
               " blocksize=" + std::to_string(bs));
  std::vector<float> data = make_data(n, bs, seed);
  if (!is_signed)
    for (float& x : data) x = std::fabs(x);
  // Exact map values (absmax 1 in block 0) exercise the distance comparisons at zero distance.
  const float* code = qx::dynamic_map(is_signed);
  if (n > 2) {
    data[0] = 1.0f;
    for (int64_t i = 1; i < std::min<int64_t>(bs, n); ++i) data[i] = code[(i * 37) % 256];
  }
  const int64_t nblocks = (n + bs - 1) / bs;
  std::vector<uint8_t> ref(static_cast<size_t>(n));
  std::vector<float> ref_absmax(static_cast<size_t>(nblocks));
  ASSERT_EQ(qx::quantize_8bit_cpu(data.data(), n, bs, code, ref.data(), ref_absmax.data()), Status::kOk);

  DevBuf din(data.size() * 4), dcode(256 * 4), dout(ref.size()), dabsmax(ref_absmax.size() * 4);
  ASSERT_TRUE(upload(din, data.data(), data.size() * 4));
  ASSERT_TRUE(upload(dcode, code, 256 * 4));
  ASSERT_TRUE(dout.ok() && dabsmax.ok());
  DevBuf dflag(4);
  ASSERT_EQ(cudaMemset(dflag.get(), 0, 4), cudaSuccess);
  ASSERT_EQ(qx::quantize_8bit_cuda(din.get<float>(), n, bs, dcode.get<float>(), dout.get<uint8_t>(),
                                   dabsmax.get<float>(), dflag.get<int>(), nullptr),
            Status::kOk);
  int flag = -1;
  ASSERT_EQ(cudaMemcpy(&flag, dflag.get(), 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(flag, 0) << "finite input flagged as NaN/Inf";
  std::vector<uint8_t> got;
  std::vector<float> got_absmax;
  ASSERT_TRUE(download(&got, dout, ref.size()));
  ASSERT_TRUE(download(&got_absmax, dabsmax, ref_absmax.size()));
  EXPECT_TRUE(same_bytes(ref_absmax.data(), got_absmax.data(), ref_absmax.size() * 4, 4)) << "absmax";
  EXPECT_TRUE(same_bytes(ref.data(), got.data(), ref.size())) << "codes";
}

void check_dequantize8(DType ot, int64_t n, int64_t bs, uint32_t seed, size_t in_offset = 0, size_t out_offset = 0) {
  SCOPED_TRACE(std::string("out=") + dtype_name(ot) + " n=" + std::to_string(n) + " blocksize=" + std::to_string(bs) +
               " in_offset=" + std::to_string(in_offset) + " out_offset=" + std::to_string(out_offset));
  std::mt19937 rng(seed);
  const int64_t nblocks = (n + bs - 1) / bs;
  const std::vector<uint8_t> A = random_bytes(n, &rng);
  const std::vector<float> absmax = make_scales(nblocks, &rng);
  const float* code = qx::dynamic_map(true);
  const size_t esize = static_cast<size_t>(qx::dtype_size(ot));
  std::vector<uint8_t> ref(static_cast<size_t>(n) * esize);
  ASSERT_EQ(qx::dequantize_8bit_cpu(A.data(), absmax.data(), code, n, bs, ref.data(), ot), Status::kOk);

  DevBuf dA(A.size() + in_offset), dabsmax(absmax.size() * 4), dcode(256 * 4), dout(ref.size() + out_offset);
  ASSERT_TRUE(upload(dA, A.data(), A.size(), in_offset));
  ASSERT_TRUE(upload(dabsmax, absmax.data(), absmax.size() * 4));
  ASSERT_TRUE(upload(dcode, code, 256 * 4));
  ASSERT_TRUE(dout.ok());
  ASSERT_EQ(qx::dequantize_8bit_cuda(dA.get<uint8_t>(in_offset), dabsmax.get<float>(), dcode.get<float>(), n, bs,
                                     dout.get(out_offset), ot, nullptr),
            Status::kOk);
  std::vector<uint8_t> got;
  ASSERT_TRUE(download(&got, dout, ref.size(), out_offset));
  EXPECT_TRUE(same_bytes(ref.data(), got.data(), ref.size(), esize));
}

// ---------------------------------------------------------------------------------------------

TEST(QuantCuda, Quantize4MatchesCpu) {
  REQUIRE_GPU();
  uint32_t seed = 1;
  for (QuantType qt : kQuantTypes)
    for (DType dt : kDTypes)
      for (int64_t bs : kBlocks4)
        for (int64_t n : kSizes) check_quantize4(dt, n, bs, qt, seed++);
}

TEST(QuantCuda, Quantize4AllZero) {
  REQUIRE_GPU();
  for (QuantType qt : kQuantTypes) {
    for (DType dt : kDTypes) {
      const int64_t n = 4097, bs = 64;
      const std::vector<uint8_t> host = encode(std::vector<float>(n, 0.0f), dt);
      Quant4Result r;
      ASSERT_TRUE(run_quantize4_cuda(host, dt, n, bs, qt, 0, 0, &r));
      ASSERT_EQ(r.status, Status::kOk);
      EXPECT_EQ(r.flag, 0);
      const uint8_t zero_byte = qt == QuantType::kNF4 ? 0x77 : 0x00;  // the nibble of s = 0
      for (int64_t j = 0; j < n / 2; ++j) ASSERT_EQ(r.packed[j], zero_byte) << "byte " << j;
      EXPECT_EQ(r.packed[n / 2], zero_byte) << "the odd tail's low nibble is the code of 0.0";
      for (float a : r.absmax) EXPECT_EQ(f2u(a), 0u);
    }
  }
}

TEST(QuantCuda, Quantize4Misaligned) {
  REQUIRE_GPU();
  for (DType dt : kDTypes) {
    const size_t es = static_cast<size_t>(qx::dtype_size(dt));
    check_quantize4(dt, 4097, 64, QuantType::kNF4, 101, es, 0);  // input one element off 16-byte alignment
    check_quantize4(dt, 4097, 64, QuantType::kFP4, 102, 0, 1);   // packed output one byte off
    check_quantize4(dt, 123457, 4096, QuantType::kNF4, 103, 3 * es, 3);
  }
}

TEST(QuantCuda, Dequantize4MatchesCpu) {
  REQUIRE_GPU();
  uint32_t seed = 1000;
  for (QuantType qt : kQuantTypes)
    for (DType ot : kDTypes)
      for (int64_t bs : kBlocks4)
        for (int64_t n : kSizes) check_dequantize4(ot, n, bs, qt, false, 256, seed++);
}

TEST(QuantCuda, Dequantize4DoubleQuantMatchesCpu) {
  REQUIRE_GPU();
  uint32_t seed = 2000;
  for (QuantType qt : kQuantTypes)
    for (DType ot : kDTypes)
      for (int64_t bs : kBlocks4)
        for (int64_t n : kSizes) {
          check_dequantize4(ot, n, bs, qt, true, 256, seed++);
          // A nested block size that is not a power of two takes the division path.
          if (n >= 1000) check_dequantize4(ot, n, bs, qt, true, 3, seed++);
        }
}

TEST(QuantCuda, Dequantize4Misaligned) {
  REQUIRE_GPU();
  for (DType ot : kDTypes) {
    const size_t es = static_cast<size_t>(qx::dtype_size(ot));
    check_dequantize4(ot, 123457, 64, QuantType::kNF4, false, 256, 301, 1, 0);   // packed off: byte loads
    check_dequantize4(ot, 123457, 64, QuantType::kNF4, true, 256, 302, 0, es);   // out off: scalar path
    check_dequantize4(ot, 4097, 32, QuantType::kFP4, false, 256, 303, 5, 3 * es);
  }
}

// Enough segments that every warp of the capped grid loops several times (prefetch path).
TEST(QuantCuda, LargeTensor) {
  REQUIRE_GPU();
  const int64_t n = 20000003;
  check_quantize4(DType::kBFloat16, n, 64, QuantType::kNF4, 401);
  check_dequantize4(DType::kBFloat16, n, 64, QuantType::kNF4, false, 256, 402);
  check_dequantize4(DType::kFloat32, n, 64, QuantType::kNF4, true, 256, 403);
  check_dequantize8(DType::kFloat16, n, 256, 404);
}

TEST(QuantCuda, Quantize8MatchesCpu) {
  REQUIRE_GPU();
  uint32_t seed = 3000;
  const int64_t blocks[] = {64, 256, 512, 1024, 2048, 4096, 100};  // 100: the generic (non power of two) kernel
  for (bool is_signed : {true, false})
    for (int64_t bs : blocks)
      for (int64_t n : kSizes) check_quantize8(n, bs, is_signed, seed++);
}

TEST(QuantCuda, Dequantize8MatchesCpu) {
  REQUIRE_GPU();
  uint32_t seed = 4000;
  const int64_t blocks[] = {64, 256, 4096, 100};
  for (DType ot : kDTypes)
    for (int64_t bs : blocks)
      for (int64_t n : kSizes) check_dequantize8(ot, n, bs, seed++);
  for (DType ot : kDTypes) check_dequantize8(ot, 123457, 256, seed++, 1, 2);  // misaligned: scalar path
}

TEST(QuantCuda, NonFiniteSetsFlag) {
  REQUIRE_GPU();
  const int64_t n = 1000, bs = 64;
  struct Case {
    DType dt;
    float bad;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const Case cases[] = {{DType::kFloat32, nan}, {DType::kFloat32, -inf}, {DType::kFloat16, inf},
                        {DType::kFloat16, nan}, {DType::kBFloat16, nan}, {DType::kBFloat16, inf}};
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(dtype_name(c.dt)) + " bad=" + std::to_string(c.bad));
    std::vector<float> v = make_data(n, bs, 7);
    v[517] = c.bad;
    const std::vector<uint8_t> host = encode(v, c.dt);
    Quant4Result r;
    ASSERT_TRUE(run_quantize4_cuda(host, c.dt, n, bs, QuantType::kNF4, 0, 0, &r));
    EXPECT_EQ(r.status, Status::kOk);  // the launcher reports through the flag; the caller turns it into kNonFinite
    EXPECT_EQ(r.flag, 1);
    // Outputs are still written, with the CPU's treatment of the bad element (NaN scale -> code of 0).
    std::vector<uint8_t> ref_packed((n + 1) / 2);
    std::vector<float> ref_absmax((n + bs - 1) / bs);
    EXPECT_EQ(qx::quantize_4bit_cpu(host.data(), c.dt, n, bs, QuantType::kNF4, ref_packed.data(), ref_absmax.data()),
              Status::kNonFinite);
    EXPECT_TRUE(same_bytes(ref_absmax.data(), r.absmax.data(), ref_absmax.size() * 4, 4)) << "absmax";
    EXPECT_TRUE(same_bytes(ref_packed.data(), r.packed.data(), ref_packed.size())) << "packed";
  }
}

// quantize_8bit on CUDA reports NaN / Inf through its flag (tiled and generic kernels), like the CPU's
// kNonFinite, and still writes the CPU's bytes.
TEST(QuantCuda, NonFinite8SetsFlag) {
  REQUIRE_GPU();
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float* code = qx::dynamic_map(true);
  for (int64_t bs : {int64_t{256}, int64_t{2048}, int64_t{100}}) {
    for (float bad : {nan, inf, -inf}) {
      SCOPED_TRACE("blocksize=" + std::to_string(bs) + " bad=" + std::to_string(bad));
      const int64_t n = 5000;
      std::vector<float> v = make_data(n, bs, 11);
      v[4321] = bad;
      std::vector<uint8_t> ref(n);
      std::vector<float> ref_absmax((n + bs - 1) / bs);
      EXPECT_EQ(qx::quantize_8bit_cpu(v.data(), n, bs, code, ref.data(), ref_absmax.data()), Status::kNonFinite);
      DevBuf din(n * 4), dcode(256 * 4), dout(n), dabsmax(ref_absmax.size() * 4), dflag(4);
      ASSERT_TRUE(upload(din, v.data(), n * 4));
      ASSERT_TRUE(upload(dcode, code, 256 * 4));
      ASSERT_EQ(cudaMemset(dflag.get(), 0, 4), cudaSuccess);
      ASSERT_EQ(qx::quantize_8bit_cuda(din.get<float>(), n, bs, dcode.get<float>(), dout.get<uint8_t>(),
                                       dabsmax.get<float>(), dflag.get<int>(), nullptr),
                Status::kOk);
      int flag = 0;
      ASSERT_EQ(cudaMemcpy(&flag, dflag.get(), 4, cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_EQ(flag, 1);
    }
  }
}

// Double quantization on CUDA gives the CPU's bytes: 4-bit codes and absmax from quantize_4bit, then the
// nested 8-bit codes and nested absmax of (absmax - offset) in blocks of 256 with the signed map. The offset
// is computed once on the host (the Python layer's canonical mean), so only the kernels can differ.
TEST(QuantCuda, DoubleQuantBytesMatchCpu) {
  REQUIRE_GPU();
  for (QuantType qt : kQuantTypes) {
    const int64_t n = 64 * 256 * 3 + 64 * 5 + 7, bs = 64, nb = (n + bs - 1) / bs;
    const std::vector<float> w = make_data(n, bs, 77);
    const std::vector<uint8_t> host = encode(w, DType::kFloat32);
    Quant4Result r;
    ASSERT_TRUE(run_quantize4_cuda(host, DType::kFloat32, n, bs, qt, 0, 0, &r));
    ASSERT_EQ(r.status, Status::kOk);
    std::vector<uint8_t> ref_packed((n + 1) / 2);
    std::vector<float> ref_absmax(nb);
    ASSERT_EQ(qx::quantize_4bit_cpu(w.data(), DType::kFloat32, n, bs, qt, ref_packed.data(), ref_absmax.data()),
              Status::kOk);
    EXPECT_TRUE(same_bytes(ref_packed.data(), r.packed.data(), ref_packed.size())) << "packed";
    ASSERT_TRUE(same_bytes(ref_absmax.data(), r.absmax.data(), ref_absmax.size() * 4, 4)) << "absmax";
    float sum = 0.0f;  // any fixed host value: both devices get the same one
    for (float a : ref_absmax) sum += a;
    const float offset = sum / static_cast<float>(nb);
    std::vector<float> shifted(nb);
    for (int64_t i = 0; i < nb; ++i) shifted[i] = ref_absmax[i] - offset;
    const float* code = qx::dynamic_map(true);
    const int64_t nn = (nb + 255) / 256;
    std::vector<uint8_t> ref_q(nb), got_q;
    std::vector<float> ref_nested(nn), got_nested;
    ASSERT_EQ(qx::quantize_8bit_cpu(shifted.data(), nb, 256, code, ref_q.data(), ref_nested.data()), Status::kOk);
    DevBuf din(nb * 4), dcode(256 * 4), dq(nb), dnested(nn * 4), dflag(4);
    ASSERT_TRUE(upload(din, shifted.data(), nb * 4));
    ASSERT_TRUE(upload(dcode, code, 256 * 4));
    ASSERT_EQ(cudaMemset(dflag.get(), 0, 4), cudaSuccess);
    ASSERT_EQ(qx::quantize_8bit_cuda(din.get<float>(), nb, 256, dcode.get<float>(), dq.get<uint8_t>(),
                                     dnested.get<float>(), dflag.get<int>(), nullptr),
              Status::kOk);
    ASSERT_TRUE(download(&got_q, dq, ref_q.size()));
    ASSERT_TRUE(download(&got_nested, dnested, ref_nested.size()));
    EXPECT_TRUE(same_bytes(ref_q.data(), got_q.data(), ref_q.size())) << "double-quantized absmax";
    EXPECT_TRUE(same_bytes(ref_nested.data(), got_nested.data(), ref_nested.size() * 4, 4)) << "nested absmax";
  }
}

// An error an earlier CUDA call left pending is reported by the next launcher as such (name and text), is
// cleared, and the launcher after that succeeds: nothing is swallowed, nothing is inherited.
TEST(QuantCuda, PendingErrorIsReportedThenCleared) {
  REQUIRE_GPU();
  const int64_t n = 4096;
  DevBuf dpacked(n / 2), dabsmax(n / 64 * 4), dout(n * 4);
  ASSERT_TRUE(dpacked.ok() && dabsmax.ok() && dout.ok());
  ASSERT_EQ(cudaMemset(dpacked.get(), 0x5a, n / 2), cudaSuccess);
  std::vector<float> ones(n / 64, 1.0f);
  ASSERT_TRUE(upload(dabsmax, ones.data(), ones.size() * 4));
  AbsmaxView view;
  view.absmax = dabsmax.get<float>();
  int count = 0;
  ASSERT_EQ(cudaGetDeviceCount(&count), cudaSuccess);
  ASSERT_NE(cudaSetDevice(count + 7), cudaSuccess);  // leaves cudaErrorInvalidDevice pending
  EXPECT_EQ(qx::dequantize_4bit_cuda(dpacked.get<uint8_t>(), view, n, 64, QuantType::kNF4, dout.get(),
                                     DType::kFloat32, nullptr),
            Status::kCudaError);
  const std::string msg = qx::last_cuda_error();
  EXPECT_NE(msg.find("cudaErrorInvalidDevice"), std::string::npos) << msg;
  EXPECT_NE(msg.find("pending"), std::string::npos) << msg;
  EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess);
  EXPECT_EQ(qx::dequantize_4bit_cuda(dpacked.get<uint8_t>(), view, n, 64, QuantType::kNF4, dout.get(),
                                     DType::kFloat32, nullptr),
            Status::kOk);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(QuantCuda, InvalidArguments) {
  REQUIRE_GPU();
  DevBuf din(4096 * 4), dpacked(2048), dabsmax(4096), dflag(4), dout(4096 * 4), dcode(256 * 4);
  ASSERT_TRUE(din.ok() && dpacked.ok() && dabsmax.ok() && dflag.ok() && dout.ok() && dcode.ok());
  const void* A = din.get();
  uint8_t* packed = dpacked.get<uint8_t>();
  float* absmax = dabsmax.get<float>();
  int* flag = dflag.get<int>();
  const int64_t n = 1000;

  for (int64_t bs : {0, 16, 48, 100, 8192, -64}) {
    EXPECT_EQ(qx::quantize_4bit_cuda(A, DType::kFloat32, n, bs, QuantType::kNF4, packed, absmax, flag, nullptr),
              Status::kInvalidArgument)
        << "blocksize " << bs;
    AbsmaxView view;
    view.absmax = absmax;
    EXPECT_EQ(qx::dequantize_4bit_cuda(packed, view, n, bs, QuantType::kNF4, dout.get(), DType::kFloat32, nullptr),
              Status::kInvalidArgument)
        << "blocksize " << bs;
  }
  EXPECT_EQ(qx::quantize_4bit_cuda(A, DType::kFloat32, -1, 64, QuantType::kNF4, packed, absmax, flag, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::quantize_4bit_cuda(nullptr, DType::kFloat32, n, 64, QuantType::kNF4, packed, absmax, flag, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::quantize_4bit_cuda(A, DType::kFloat32, n, 64, QuantType::kNF4, nullptr, absmax, flag, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::quantize_4bit_cuda(A, DType::kFloat32, n, 64, QuantType::kNF4, packed, nullptr, flag, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::quantize_4bit_cuda(A, DType::kFloat32, n, 64, QuantType::kNF4, packed, absmax, nullptr, nullptr),
            Status::kInvalidArgument);
  // n == 0 launches nothing and needs no pointers.
  EXPECT_EQ(qx::quantize_4bit_cuda(nullptr, DType::kFloat32, 0, 64, QuantType::kNF4, nullptr, nullptr, nullptr,
                                   nullptr),
            Status::kOk);

  AbsmaxView none;
  EXPECT_EQ(qx::dequantize_4bit_cuda(packed, none, n, 64, QuantType::kNF4, dout.get(), DType::kFloat32, nullptr),
            Status::kInvalidArgument);
  AbsmaxView partial_dq;
  partial_dq.qabsmax = packed;  // double-quantized without nested tensors
  EXPECT_EQ(qx::dequantize_4bit_cuda(packed, partial_dq, n, 64, QuantType::kNF4, dout.get(), DType::kFloat32, nullptr),
            Status::kInvalidArgument);
  AbsmaxView plain;
  plain.absmax = absmax;
  EXPECT_EQ(qx::dequantize_4bit_cuda(packed, plain, -5, 64, QuantType::kNF4, dout.get(), DType::kFloat32, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::dequantize_4bit_cuda(packed, plain, n, 64, QuantType::kNF4, nullptr, DType::kFloat32, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::dequantize_4bit_cuda(nullptr, none, 0, 64, QuantType::kNF4, nullptr, DType::kFloat32, nullptr),
            Status::kOk);

  const float* code = dcode.get<float>();
  EXPECT_EQ(qx::quantize_8bit_cuda(din.get<float>(), n, 0, code, packed, absmax, flag, nullptr), Status::kInvalidArgument);
  EXPECT_EQ(qx::quantize_8bit_cuda(din.get<float>(), -1, 256, code, packed, absmax, flag, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::quantize_8bit_cuda(din.get<float>(), n, 256, nullptr, packed, absmax, flag, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::quantize_8bit_cuda(nullptr, 0, 256, nullptr, nullptr, nullptr, nullptr, nullptr), Status::kOk);
  EXPECT_EQ(qx::dequantize_8bit_cuda(packed, absmax, code, n, -256, dout.get(), DType::kFloat32, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::dequantize_8bit_cuda(packed, nullptr, code, n, 256, dout.get(), DType::kFloat32, nullptr),
            Status::kInvalidArgument);
  EXPECT_EQ(qx::dequantize_8bit_cuda(nullptr, nullptr, nullptr, 0, 256, nullptr, DType::kFloat32, nullptr),
            Status::kOk);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace

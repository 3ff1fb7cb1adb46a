// lowbit CPU quantizer: the fast paths (AVX-512 where the CPU has it, and the portable OpenMP path)
// against the scalar reference bitwise; the reference against hand-computed codes (ties to even, NaN,
// infinities, true division); argument validation. Also the fp16 / bf16 conversions of float_convert.h
// against known bit patterns and, where the CPU has F16C, against the hardware converter.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/kernels/cpu/quantize_internal.h"
#include "lowbit/kernels/float_convert.h"
#include "lowbit/kernels/quantize.h"
#include "test_util.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

using lowbit::bf16_to_float;
using lowbit::bits_to_float;
using lowbit::DType;
using lowbit::float_to_bf16;
using lowbit::float_to_bits;
using lowbit::float_to_half;
using lowbit::half_to_float;
using lowbit::Status;
using lowbit_test::expect_invalid;

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Storage for x in any dtype, built from fp32 values (fp16 / bf16 rounded to nearest even).
struct XBuf {
  DType t;
  std::vector<float> f32;
  std::vector<uint16_t> u16;
  const void* data() const { return t == DType::kFloat32 ? static_cast<const void*>(f32.data()) : u16.data(); }
};

XBuf make_x(DType t, const std::vector<float>& v) {
  XBuf b{t, {}, {}};
  if (t == DType::kFloat32) {
    b.f32 = v;
  } else {
    b.u16.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) b.u16[i] = t == DType::kFloat16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
  }
  return b;
}

std::vector<int8_t> run_ref(const XBuf& x, int64_t M, int64_t K, int64_t ldx, const float* shift, float scale,
                            int qmin, int qmax) {
  std::vector<int8_t> q(size_t(M * K), 99);
  const Status s = lowbit::cpu::quantize_s8_ref(x.t, x.data(), M, K, ldx, shift, &scale, qmin, qmax, q.data());
  EXPECT_TRUE(s.is_ok()) << s.message;
  return q;
}

std::vector<bool> fast_paths() {
  std::vector<bool> v{false};
  if (lowbit::cpu::detail::quantize_avx512_supported()) v.push_back(true);
  return v;
}

// Random values spread over [-range, range], with specials and exact half-integers (after division by
// `scale`) sprinkled in.
std::vector<float> random_values(size_t n, float range, float scale, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(-range, range);
  std::uniform_int_distribution<int> pick(0, 15), half(-300, 300);
  const float specials[] = {kNaN, -kNaN, kInf, -kInf, 0.0f, -0.0f, 1e-40f, -1e-40f, 3.4e38f, -3.4e38f};
  std::vector<float> v(n);
  for (auto& x : v) {
    const int p = pick(g);
    if (p == 0)
      x = specials[g() % 10];
    else if (p <= 3)
      x = (float(half(g)) + 0.5f) * scale;  // a tie after division whenever the product is exact
    else
      x = d(g);
  }
  return v;
}

TEST(QuantizeS8, FastMatchesRefBitwise) {
  const int64_t Ms[] = {1, 3, 17, 64, 65, 257};
  const int64_t Ks[] = {1, 3, 15, 16, 17, 31, 64, 65, 1000, 8193};
  const int qr[][2] = {{-128, 127}, {-8, 7}, {-127, 127}, {0, 15}, {-3, -3}};
  uint32_t seed = 1;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (int64_t M : Ms)
      for (int64_t K : Ks) {
        if (M * K > 300000) continue;
        const int64_t ldx = K + int64_t(seed % 5);
        const auto& r = qr[seed % 5];
        const float scale = (seed % 3 == 0) ? 0.0625f : (seed % 3 == 1 ? 0.37f : 3.0f);
        const XBuf x = make_x(t, random_values(size_t(M * ldx), 140.0f * scale, scale, seed));
        std::vector<float> shift(static_cast<size_t>(K));
        std::mt19937 g(seed * 31u);
        for (auto& s : shift) s = std::uniform_real_distribution<float>(-2.0f, 2.0f)(g) * scale;
        for (bool use_shift : {false, true}) {
          const float* sh = use_shift ? shift.data() : nullptr;
          const std::vector<int8_t> want = run_ref(x, M, K, ldx, sh, scale, r[0], r[1]);
          for (bool avx512 : fast_paths())
            for (int nt : {0, 1, 3}) {
              std::vector<int8_t> got(size_t(M * K), 99);
              const Status s = lowbit::cpu::detail::quantize_s8_path(avx512, t, x.data(), M, K, ldx, sh, &scale, r[0],
                                                                     r[1], got.data(), nt);
              ASSERT_TRUE(s.is_ok()) << s.message;
              ASSERT_EQ(got, want) << (avx512 ? "avx512" : "portable") << " " << lowbit::dtype_name(t) << " M=" << M
                                   << " K=" << K << " shift=" << use_shift << " threads=" << nt;
            }
          // the public entry point as well
          std::vector<int8_t> got(size_t(M * K), 99);
          ASSERT_TRUE(lowbit::cpu::quantize_s8(t, x.data(), M, K, ldx, sh, &scale, r[0], r[1], got.data()).is_ok());
          ASSERT_EQ(got, want);
        }
        ++seed;
      }
}

// Hand-computed codes, checked on the reference and every fast path.
void expect_codes(DType t, const std::vector<float>& x, const float* shift, float scale, int qmin, int qmax,
                  const std::vector<int8_t>& want) {
  const XBuf xb = make_x(t, x);
  const int64_t K = int64_t(x.size());
  EXPECT_EQ(run_ref(xb, 1, K, K, shift, scale, qmin, qmax), want) << "ref " << lowbit::dtype_name(t);
  for (bool avx512 : fast_paths()) {
    std::vector<int8_t> got(x.size(), 99);
    ASSERT_TRUE(lowbit::cpu::detail::quantize_s8_path(avx512, t, xb.data(), 1, K, K, shift, &scale, qmin, qmax,
                                                      got.data())
                    .is_ok());
    EXPECT_EQ(got, want) << (avx512 ? "avx512 " : "portable ") << lowbit::dtype_name(t);
  }
}

TEST(QuantizeS8, RoundHalfToEven) {
  const std::vector<float> x = {2.5f, -2.5f, 3.5f, -3.5f, 0.5f, -0.5f, 1.5f, -1.5f, 2.4999998f, 2.5000002f, 126.5f,
                                -127.5f};
  const std::vector<int8_t> want = {2, -2, 4, -4, 0, 0, 2, -2, 2, 3, 126, -128};
  expect_codes(DType::kFloat32, x, nullptr, 1.0f, -128, 127, want);
  // the same ties, exactly representable in fp16 and bf16 (the two near-ties are not: skip them)
  const std::vector<float> xs = {2.5f, -2.5f, 3.5f, -3.5f, 0.5f, -0.5f, 1.5f, -1.5f, 126.5f, -127.5f};
  const std::vector<int8_t> ws = {2, -2, 4, -4, 0, 0, 2, -2, 126, -128};
  expect_codes(DType::kFloat16, xs, nullptr, 1.0f, -128, 127, ws);
  expect_codes(DType::kBFloat16, xs, nullptr, 1.0f, -128, 127, ws);
  // ties produced by the division: 5 / 2 = 2.5 -> 2, 7 / 2 = 3.5 -> 4
  expect_codes(DType::kFloat32, {5.0f, 7.0f, -5.0f}, nullptr, 2.0f, -128, 127, {2, 4, -2});
}

TEST(QuantizeS8, TrueDivisionNotReciprocal) {
  // 45.5 / 7 = 6.5 exactly -> 6, but 45.5 * fp32(1/7) = 6.5000005 -> 7
  volatile float seven = 7.0f;
  ASSERT_EQ(std::nearbyint(45.5f * (1.0f / seven)), 7.0f);
  expect_codes(DType::kFloat32, {45.5f, -45.5f}, nullptr, 7.0f, -128, 127, {6, -6});
}

TEST(QuantizeS8, ShiftAddedBeforeDivision) {
  const std::vector<float> shift = {1.0f, -1.0f, 0.5f, 0.25f};
  // (x + shift) / 0.5
  expect_codes(DType::kFloat32, {0.25f, 0.25f, 0.75f, 1.0f}, shift.data(), 0.5f, -128, 127, {2, -2, 2, 2});
}

TEST(QuantizeS8, NaNAndInfinities) {
  // NaN -> 0, then the clamp: a range without 0 clamps it too
  expect_codes(DType::kFloat32, {kNaN, 1.0f}, nullptr, 1.0f, 2, 5, {2, 2});
  expect_codes(DType::kFloat32, {kNaN}, nullptr, 1.0f, -3, -3, {-3});
  // 8 bit and 4 bit ranges
  expect_codes(DType::kFloat32, {kNaN, -kNaN, kInf, -kInf, 1e30f, -1e30f}, nullptr, 0.1f, -128, 127,
               {0, 0, 127, -128, 127, -128});
  expect_codes(DType::kFloat32, {kNaN, kInf, -kInf, 7.6f, -8.6f, 6.5f}, nullptr, 1.0f, -8, 7, {0, 7, -8, 7, -8, 6});
  for (DType t : {DType::kFloat16, DType::kBFloat16})
    expect_codes(t, {kNaN, kInf, -kInf, 100.0f, -100.0f}, nullptr, 1.0f, -8, 7, {0, 7, -8, 7, -8});
  // NaN produced by the shift: inf + (-inf)
  const std::vector<float> shift = {-kInf, kInf, 1.0f};
  expect_codes(DType::kFloat32, {kInf, kInf, kNaN}, shift.data(), 1.0f, -128, 127, {0, 127, 0});
  // a finite value that overflows to inf in the division still clamps
  expect_codes(DType::kFloat32, {3.0e38f, -3.0e38f}, nullptr, 1e-3f, -128, 127, {127, -128});
}

// With eps the kernel takes the step max(scale, eps) itself (NaN if either is NaN): the codes equal the
// reference's with that step, on both the fast and the scalar path.
TEST(QuantizeS8, StepFromScaleAndEps) {
  const std::vector<float> x = {0.05f, -0.3f, 1.0f, 2.5f, -7.0f, 0.75f, kNaN, 100.0f, 0.001f, -0.02f};
  const int64_t n = int64_t(x.size());
  struct Pair { float scale, eps, step; };
  const Pair pairs[] = {{0.25f, 1e-5f, 0.25f}, {1e-7f, 0.125f, 0.125f}, {0.5f, 0.5f, 0.5f},
                        {kNaN, 0.1f, kNaN}, {0.1f, kNaN, kNaN}, {0.0f, 0.2f, 0.2f}};
  for (const Pair& p : pairs) {
    std::vector<int8_t> want(x.size()), got(x.size(), int8_t(99));
    ASSERT_TRUE(lowbit::cpu::quantize_s8_ref(DType::kFloat32, x.data(), 1, n, n, nullptr, &p.step, -8, 7,
                                             want.data()).is_ok());
    ASSERT_TRUE(lowbit::cpu::quantize_s8(DType::kFloat32, x.data(), 1, n, n, nullptr, &p.scale, -8, 7, got.data(),
                                         &p.eps).is_ok());
    EXPECT_EQ(got, want) << "scale " << p.scale << " eps " << p.eps;
    EXPECT_EQ(lowbit::qat_step(p.scale, p.eps) == p.step || (p.step != p.step), true);
  }
}

TEST(QuantizeS8, HalfAndBf16Inputs) {
  // raw bit patterns: 1.0, -2.5, 65504 (max half), 2^-24 (smallest subnormal), NaN, -inf
  const std::vector<uint16_t> h = {0x3C00, 0xC100, 0x7BFF, 0x0001, 0x7E00, 0xFC00};
  const float scale = 1.0f;
  std::vector<int8_t> q(h.size(), 99);
  for (bool avx512 : fast_paths()) {
    ASSERT_TRUE(lowbit::cpu::detail::quantize_s8_path(avx512, DType::kFloat16, h.data(), 1, 6, 6, nullptr, &scale,
                                                      -128, 127, q.data())
                    .is_ok());
    EXPECT_EQ(q, (std::vector<int8_t>{1, -2, 127, 0, 0, -128}));
  }
  ASSERT_TRUE(
      lowbit::cpu::quantize_s8_ref(DType::kFloat16, h.data(), 1, 6, 6, nullptr, &scale, -128, 127, q.data()).is_ok());
  EXPECT_EQ(q, (std::vector<int8_t>{1, -2, 127, 0, 0, -128}));
  // subnormal half times a tiny scale: 2^-24 / 2^-25 = 2 exactly
  const float tiny = std::ldexp(1.0f, -25);
  ASSERT_TRUE(
      lowbit::cpu::quantize_s8_ref(DType::kFloat16, h.data(), 1, 6, 6, nullptr, &tiny, -128, 127, q.data()).is_ok());
  EXPECT_EQ(q[3], 2);
  // bf16: 1.0, -3.5, 0x3FC0 = 1.5, NaN, +inf
  const std::vector<uint16_t> b = {0x3F80, 0xC060, 0x3FC0, 0x7FC0, 0x7F80};
  for (bool avx512 : fast_paths()) {
    std::vector<int8_t> qb(b.size(), 99);
    ASSERT_TRUE(lowbit::cpu::detail::quantize_s8_path(avx512, DType::kBFloat16, b.data(), 1, 5, 5, nullptr, &scale,
                                                      -8, 7, qb.data())
                    .is_ok());
    EXPECT_EQ(qb, (std::vector<int8_t>{1, -4, 2, 0, 7}));
  }
}

TEST(QuantizeS8, EmptyIsNoOp) {
  std::vector<int8_t> q(4, 42);
  const float scale = 1.0f;
  const float x[4] = {1, 2, 3, 4};
  EXPECT_TRUE(lowbit::cpu::quantize_s8(DType::kFloat32, x, 0, 4, 4, nullptr, &scale, -128, 127, q.data()).is_ok());
  EXPECT_TRUE(lowbit::cpu::quantize_s8(DType::kFloat32, x, 4, 0, 0, nullptr, &scale, -128, 127, q.data()).is_ok());
  EXPECT_TRUE(lowbit::cpu::quantize_s8_ref(DType::kFloat32, nullptr, 0, 4, 4, nullptr, nullptr, -128, 127, nullptr).is_ok());
  for (int8_t v : q) EXPECT_EQ(v, 42);
}

TEST(QuantizeS8, InvalidArguments) {
  const float x[16] = {};
  std::vector<int8_t> q(16);
  const float one = 1.0f, zero = 0.0f, neg = -1.0f, inf = kInf, nan = kNaN;
  using Fn = Status (*)(DType, const void*, int64_t, int64_t, int64_t, const float*, const float*, int32_t, int32_t,
                        int8_t*);
  for (Fn f : {Fn(&lowbit::cpu::quantize_s8), Fn(&lowbit::cpu::quantize_s8_ref)}) {
    const DType f32 = DType::kFloat32;
    int8_t* o = q.data();
    expect_invalid(f(f32, nullptr, 2, 2, 2, nullptr, &one, -128, 127, o), "x null", "x");
    expect_invalid(f(f32, x, 2, 2, 2, nullptr, &one, -128, 127, nullptr), "q null", "q");
    expect_invalid(f(f32, x, 2, 2, 2, nullptr, nullptr, -128, 127, o), "scale null", "scale");
    expect_invalid(f(f32, x, -1, 2, 2, nullptr, &one, -128, 127, o), "M < 0", "-1");
    expect_invalid(f(f32, x, 2, -3, 2, nullptr, &one, -128, 127, o), "K < 0", "-3");
    expect_invalid(f(f32, x, 2, 4, 3, nullptr, &one, -128, 127, o), "ldx < K", "ldx");
    expect_invalid(f(f32, x, 2, 2, 2, nullptr, &one, 5, 4, o), "qmin > qmax", "qmin");
    expect_invalid(f(f32, x, 2, 2, 2, nullptr, &one, -129, 127, o), "qmin < -128", "-129");
    expect_invalid(f(f32, x, 2, 2, 2, nullptr, &one, -128, 128, o), "qmax > 127", "128");
    // Any step value is computed, not refused (the CUDA kernel never reads it on the host; the op layer
    // checks it when asked, and the QAT layers turn an invalid step into a NaN output): IEEE division,
    // NaN -> 0, +-inf clamp. x = {1, -1, 0, 3}:
    const float xs[4] = {1.f, -1.f, 0.f, 3.f};
    struct Special { float s; int8_t want[4]; };
    const Special specials[] = {{zero, {127, -128, 0, 127}}, {neg, {-1, 1, 0, -3}}, {inf, {0, 0, 0, 0}},
                                {nan, {0, 0, 0, 0}}};
    for (const auto& sp : specials) {
      ASSERT_TRUE(f(f32, xs, 1, 4, 4, nullptr, &sp.s, -128, 127, o).is_ok()) << sp.s;
      for (int e = 0; e < 4; ++e) EXPECT_EQ(q[e], sp.want[e]) << "scale " << sp.s << " element " << e;
    }
    expect_invalid(f(DType(9), x, 2, 2, 2, nullptr, &one, -128, 127, o), "bad dtype", "xtype");
  }
}

// ---------------------------------------------------------------------------------------------------
// float_convert.h

TEST(FloatConvert, HalfKnownPatterns) {
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  EXPECT_EQ(float_to_half(0.0f), 0x0000);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(65519.996f), 0x7BFF);  // just below the tie: rounds down
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);    // tie between 65504 and 2^16 -> even -> inf
  EXPECT_EQ(float_to_half(-65520.0f), 0xFC00);
  EXPECT_EQ(float_to_half(1e10f), 0x7C00);
  EXPECT_EQ(float_to_half(kInf), 0x7C00);
  EXPECT_EQ(float_to_half(-kInf), 0xFC00);
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // tie -> even (down)
  EXPECT_EQ(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie -> even (up)
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14)), 0x0400);             // smallest normal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);             // smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);             // tie -> even (0)
  EXPECT_EQ(float_to_half(3 * std::ldexp(1.0f, -26)), 0x0001);         // above the tie
  EXPECT_EQ(float_to_half(3 * std::ldexp(1.0f, -25)), 0x0002);         // 1.5 ulp tie -> even (2)
  EXPECT_EQ(float_to_half(1023.5f * std::ldexp(1.0f, -24)), 0x0400);   // largest-subnormal tie -> normal
  EXPECT_EQ(float_to_half(-std::ldexp(1.0f, -24)), 0x8001);
  EXPECT_EQ(float_to_half(1e-40f), 0x0000);                            // fp32 subnormal
  const uint16_t n = float_to_half(kNaN);
  EXPECT_EQ(n & 0x7C00, 0x7C00);
  EXPECT_NE(n & 0x03FF, 0);
  const uint16_t sn = float_to_half(bits_to_float(0x7F800001u));  // signalling NaN stays NaN
  EXPECT_EQ(sn & 0x7C00, 0x7C00);
  EXPECT_NE(sn & 0x03FF, 0);
}

TEST(FloatConvert, HalfToFloat) {
  EXPECT_EQ(half_to_float(0x3C00), 1.0f);
  EXPECT_EQ(half_to_float(0xC100), -2.5f);
  EXPECT_EQ(half_to_float(0x7BFF), 65504.0f);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x03FF), 1023.0f * std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(half_to_float(0x7C00), kInf);
  EXPECT_EQ(half_to_float(0xFC00), -kInf);
  EXPECT_EQ(float_to_bits(half_to_float(0x8000)), 0x80000000u);
  EXPECT_TRUE(std::isnan(half_to_float(0x7E00)));
  EXPECT_TRUE(std::isnan(half_to_float(0x7C01)));
  // every half survives the round trip; NaNs stay NaN
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_to_float(uint16_t(h));
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(half_to_float(float_to_half(f)))) << std::hex << h;
    } else {
      ASSERT_EQ(float_to_half(f), h) << std::hex << h;
    }
  }
}

TEST(FloatConvert, Bf16KnownPatterns) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3F808000u)), 0x3F80);  // tie, even below
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3F818000u)), 0x3F82);  // tie, even above
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3F808001u)), 0x3F81);  // just above the tie
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3F807FFFu)), 0x3F80);  // just below
  EXPECT_EQ(float_to_bf16(bits_to_float(0x7F7FFFFFu)), 0x7F80);  // max float rounds to inf
  EXPECT_EQ(float_to_bf16(-kInf), 0xFF80);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x00018000u)), 0x0002);  // subnormal tie -> even
  EXPECT_EQ(float_to_bf16(bits_to_float(0x00008000u)), 0x0000);
  EXPECT_EQ(float_to_bf16(kNaN), 0x7FC0);
  const uint16_t sn = float_to_bf16(bits_to_float(0x7F800001u));  // payload below bit 16: must not become inf
  EXPECT_EQ(sn & 0x7F80, 0x7F80);
  EXPECT_NE(sn & 0x007F, 0);
  const uint16_t nn = float_to_bf16(bits_to_float(0xFFFFFFFFu));  // must not carry into the sign
  EXPECT_EQ(nn & 0x7F80, 0x7F80);
  EXPECT_NE(nn & 0x007F, 0);
  EXPECT_EQ(bf16_to_float(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_float(0xC060), -3.5f);
  EXPECT_TRUE(std::isnan(bf16_to_float(0x7FC0)));
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("f16c"))) uint16_t hw_half(float f) {
  return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The scalar conversion against the F16C instruction over a sweep of the fp32 bit space (every bit
// pattern with a stride, plus dense windows around the fp16 overflow, normal/subnormal and zero edges).
TEST(FloatConvert, HalfMatchesF16C) {
  if (!__builtin_cpu_supports("f16c")) GTEST_SKIP() << "no F16C";
  auto check = [](uint32_t u) {
    const float f = bits_to_float(u);
    const uint16_t want = hw_half(f), got = float_to_half(f);
    if (std::isnan(f)) {
      ASSERT_EQ(got & 0x7C00, 0x7C00) << std::hex << u;
      ASSERT_NE(got & 0x03FF, 0) << std::hex << u;
      ASSERT_EQ(got & 0x8000, want & 0x8000) << std::hex << u;
    } else {
      ASSERT_EQ(got, want) << std::hex << u;
    }
  };
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 1237) check(uint32_t(u));
  for (uint32_t base : {0x477FE000u, 0x38800000u, 0x33000000u, 0x00000000u})
    for (uint32_t d = 0; d < 0x20000; ++d) {
      check(base + d);
      check((base + d) | 0x80000000u);
      check(base - d);
    }
}
#endif

}  // namespace

// qat_prepare: every operand converted exactly from its own dtype, alpha as qat_alpha_value, the two steps
// max(scale, eps) (NaN-propagating); bad arguments.
TEST(QatPrepare, ConvertsAndFormsAlpha) {
  using lowbit::DType;
  using lowbit::ScalarArg;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 3.f);
  constexpr int64_t P = lowbit::kQatPreparedScalars;
  for (int64_t n : {0, 1, 33}) {
   for (const float s2 : {0.0071f, 0.f, std::nanf("")}) {
    std::vector<uint16_t> shift(n);
    std::vector<float> want(n + P);
    for (int64_t i = 0; i < n; ++i) {
      shift[i] = lowbit::float_to_bf16(nd(rng));
      want[i] = lowbit::bf16_to_float(shift[i]);
    }
    const uint16_t s1 = lowbit::float_to_half(0.0213f);
    const uint16_t e = lowbit::float_to_bf16(1e-5f);
    want[n] = lowbit::half_to_float(s1);
    want[n + 1] = s2;
    want[n + 2] = lowbit::bf16_to_float(e);
    want[n + 3] = lowbit::qat_alpha_value(want[n], want[n + 1], want[n + 2]);
    // The steps, written out: max(scale, eps), NaN when the scale is NaN.
    want[n + 4] = std::max(want[n], want[n + 2]);
    want[n + 5] = std::isnan(s2) ? std::nanf("") : std::max(s2, want[n + 2]);
    std::vector<float> out(n + P + 1, -1.f);
    ASSERT_TRUE(lowbit::cpu::qat_prepare({n ? shift.data() : nullptr, DType::kBFloat16}, n, {&s1, DType::kFloat16},
                                         {&s2, DType::kFloat32}, {&e, DType::kBFloat16}, out.data())
                    .is_ok());
    for (int64_t i = 0; i < n + P; ++i) {
      if (std::isnan(want[i])) EXPECT_TRUE(std::isnan(out[i])) << "n=" << n << " i=" << i;
      else EXPECT_EQ(std::memcmp(&out[i], &want[i], 4), 0) << "n=" << n << " i=" << i;
    }
    EXPECT_EQ(out[n + P], -1.f) << "wrote past n + kQatPreparedScalars";
   }
  }
  const float one = 1.f;
  float out[8];
  const ScalarArg f{&one, DType::kFloat32};
  expect_invalid(lowbit::cpu::qat_prepare({nullptr, DType::kFloat32}, 3, f, f, f, out), "null shift", "shift is null");
  expect_invalid(lowbit::cpu::qat_prepare({&one, DType::kFloat32}, -1, f, f, f, out), "n < 0", "n must be");
  expect_invalid(lowbit::cpu::qat_prepare({nullptr, DType::kFloat32}, 0, {&one, static_cast<DType>(9)}, f, f, out),
                 "bad dtype", "scale1 dtype");
  expect_invalid(lowbit::cpu::qat_prepare({nullptr, DType::kFloat32}, 0, f, {nullptr, DType::kFloat32}, f, out),
                 "null scale2", "must not be null");
  expect_invalid(lowbit::cpu::qat_prepare({nullptr, DType::kFloat32}, 0, f, f, f, nullptr), "null out", "out is null");
}

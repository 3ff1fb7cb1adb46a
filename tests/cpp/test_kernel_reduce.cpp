// cpu::sum_abs_f64 (reduce.h) against the float64 reference, on odd sizes across the chunk boundaries,
// each dtype; NaN / inf propagation; determinism across thread counts; bad arguments.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <random>

#include "lowbit/kernels/reduce.h"
#include "reduce_test_util.h"
#include "test_util.h"

namespace {

using lowbit::DType;
using namespace lowbit_test;

// Tolerance: float64 sums of n terms of one sign: relative error below n * 2^-53; 1e-12 covers n <= 2^30.
constexpr double kRel = 1e-12;

TEST(SumAbs, MatchesReference) {
  std::mt19937 rng(7);
  const int64_t sizes[] = {0, 1, 7, 255, 4095, 4096, 4097, 100003, 1 << 20, (1 << 22) + 13};
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int64_t n : sizes) {
      const AbsInput in = random_abs_input(t, n, rng);
      double got = -1.0;
      ASSERT_TRUE(lowbit::cpu::sum_abs_f64(t, in.bytes.data(), n, &got).is_ok());
      const double want = abs_sum_reference(in.values);
      EXPECT_NEAR(got, want, kRel * want + 1e-300) << lowbit::dtype_name(t) << " n=" << n;
    }
  }
}

TEST(SumAbs, DeterministicAcrossThreadCounts) {
  std::mt19937 rng(8);
  const AbsInput in = random_abs_input(DType::kFloat32, 3000001, rng, 1e3);
  const int saved = omp_get_max_threads();
  double first = 0.0;
  for (int threads : {1, 2, 3, 8}) {
    omp_set_num_threads(threads);
    double got = 0.0;
    ASSERT_TRUE(lowbit::cpu::sum_abs_f64(DType::kFloat32, in.bytes.data(), 3000001, &got).is_ok());
    if (threads == 1) first = got;
    EXPECT_EQ(got, first) << threads << " threads";
  }
  omp_set_num_threads(saved);
}

TEST(SumAbs, NanAndInf) {
  std::vector<float> x(10000, -1.5f);
  double got = 0.0;
  x[9000] = std::numeric_limits<float>::infinity();
  ASSERT_TRUE(lowbit::cpu::sum_abs_f64(DType::kFloat32, x.data(), 10000, &got).is_ok());
  EXPECT_TRUE(std::isinf(got) && got > 0);
  x[17] = std::nanf("");
  ASSERT_TRUE(lowbit::cpu::sum_abs_f64(DType::kFloat32, x.data(), 10000, &got).is_ok());
  EXPECT_TRUE(std::isnan(got));
}

TEST(SumAbs, RejectsBadArguments) {
  float x[4] = {1, 2, 3, 4};
  double out = 0.0;
  expect_invalid(lowbit::cpu::sum_abs_f64(DType::kFloat32, x, 4, nullptr), "out null", "out");
  expect_invalid(lowbit::cpu::sum_abs_f64(DType::kFloat32, nullptr, 4, &out), "x null", "x");
  expect_invalid(lowbit::cpu::sum_abs_f64(DType::kFloat32, x, -1, &out), "n < 0", "-1");
  expect_invalid(lowbit::cpu::sum_abs_f64(static_cast<DType>(9), x, 4, &out), "bad dtype", "xtype");
  ASSERT_TRUE(lowbit::cpu::sum_abs_f64(DType::kFloat32, nullptr, 0, &out).is_ok());
  EXPECT_EQ(out, 0.0);
}

// lsq_step: the fp32 step within one fp32 rounding (plus the float64 sum's error) of the long-double
// definition, for 8-bit and 4-bit qmax, with and without eps in each dtype; eps wins where it is larger
// (exactly eps); NaN propagates from x and from eps; bad arguments.
TEST(LsqStep, MatchesDefinition) {
  std::mt19937 rng(11);
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int64_t n : {1, 7, 4097, 100003}) {
      const AbsInput in = random_abs_input(t, n, rng);
      for (double qmax : {127.0, 7.0}) {
        float got = -1.f;
        ASSERT_TRUE(lowbit::cpu::lsq_step(t, in.bytes.data(), n, qmax, {nullptr, DType::kFloat32}, &got).is_ok());
        const double want = lsq_step_reference(in.values, qmax, 0.0);
        EXPECT_NEAR(got, want, want * (std::ldexp(1.0, -24) + 1e-12)) << lowbit::dtype_name(t) << " n=" << n;
        // eps below the step changes nothing; above it, the step is eps's value exactly.
        const float small = 1e-7f, big = float(want) * 4.f;
        const uint16_t big_bf16 = lowbit::float_to_bf16(big);
        float with_small = -1.f, with_big = -1.f;
        ASSERT_TRUE(lowbit::cpu::lsq_step(t, in.bytes.data(), n, qmax, {&small, DType::kFloat32}, &with_small).is_ok());
        ASSERT_TRUE(lowbit::cpu::lsq_step(t, in.bytes.data(), n, qmax, {&big_bf16, DType::kBFloat16}, &with_big).is_ok());
        EXPECT_EQ(with_small, got);
        EXPECT_EQ(with_big, lowbit::bf16_to_float(big_bf16));
      }
    }
  }
}

TEST(LsqStep, NanAndBadArguments) {
  std::vector<float> x(5000, 0.25f);
  float out = 0.f;
  const float eps = 1e-5f, nan = std::nanf("");
  ASSERT_TRUE(lowbit::cpu::lsq_step(DType::kFloat32, x.data(), 5000, 127.0, {&nan, DType::kFloat32}, &out).is_ok());
  EXPECT_TRUE(std::isnan(out));
  x[4321] = nan;
  ASSERT_TRUE(lowbit::cpu::lsq_step(DType::kFloat32, x.data(), 5000, 127.0, {&eps, DType::kFloat32}, &out).is_ok());
  EXPECT_TRUE(std::isnan(out));
  expect_invalid(lowbit::cpu::lsq_step(DType::kFloat32, x.data(), 0, 127.0, {&eps, DType::kFloat32}, &out), "n = 0", "n must be");
  expect_invalid(lowbit::cpu::lsq_step(DType::kFloat32, x.data(), 5, 0.0, {&eps, DType::kFloat32}, &out), "qmax 0", "qmax");
  expect_invalid(lowbit::cpu::lsq_step(DType::kFloat32, x.data(), 5, 127.0, {&eps, DType::kFloat32}, nullptr), "out null", "out");
  expect_invalid(lowbit::cpu::lsq_step(DType::kFloat32, x.data(), 5, 127.0, {&eps, static_cast<DType>(7)}, &out),
                 "eps dtype", "eps dtype");
  expect_invalid(lowbit::cpu::lsq_step(static_cast<DType>(9), x.data(), 5, 127.0, {&eps, DType::kFloat32}, &out),
                 "x dtype", "xtype");
}

}  // namespace

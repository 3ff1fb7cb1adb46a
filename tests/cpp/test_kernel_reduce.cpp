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

}  // namespace

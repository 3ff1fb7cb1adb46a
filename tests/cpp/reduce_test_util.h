// Shared by the CPU and CUDA tests of sum_abs_f64 (reduce.h): random inputs of each dtype as raw bits,
// and the float64 reference written from the definition (sum of |x| of the widened values, summed in
// long double so its own rounding is far below the tolerance).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/float_convert.h"

namespace lowbit_test {

struct AbsInput {
  lowbit::DType type;
  std::vector<uint8_t> bytes;
  std::vector<double> values;  // the widened values
};

inline AbsInput random_abs_input(lowbit::DType t, int64_t n, std::mt19937& rng, double scale = 3.0) {
  AbsInput in{t, {}, {}};
  std::normal_distribution<float> d(0.5f, float(scale));
  const size_t es = t == lowbit::DType::kFloat32 ? 4 : 2;
  in.bytes.resize(size_t(n) * es);
  in.values.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    const float f = d(rng);
    if (t == lowbit::DType::kFloat32) {
      std::memcpy(&in.bytes[size_t(i) * 4], &f, 4);
      in.values[size_t(i)] = f;
    } else {
      const uint16_t h = t == lowbit::DType::kFloat16 ? lowbit::float_to_half(f) : lowbit::float_to_bf16(f);
      std::memcpy(&in.bytes[size_t(i) * 2], &h, 2);
      in.values[size_t(i)] = t == lowbit::DType::kFloat16 ? lowbit::half_to_float(h) : lowbit::bf16_to_float(h);
    }
  }
  return in;
}

inline double abs_sum_reference(const std::vector<double>& v) {
  long double s = 0;
  for (double x : v) s += std::fabs(static_cast<long double>(x));
  return double(s);
}

// The LSQ step written from its definition, max(2 * mean|x| / sqrt(qmax), eps), in long double (eps <= 0: none).
inline double lsq_step_reference(const std::vector<double>& v, double qmax, double eps) {
  const long double s = static_cast<long double>(abs_sum_reference(v)) / static_cast<long double>(v.size()) * 2.0L /
                        std::sqrt(static_cast<long double>(qmax));
  return eps > 0 && static_cast<long double>(eps) > s ? eps : double(s);
}

}  // namespace lowbit_test

// cpu::sum_abs_f64 (reduce.h): fixed chunks, 8 interleaved float64 accumulators per chunk (a fixed order
// the compiler may vectorise), chunk sums added in chunk order.
#include "lowbit/kernels/reduce.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "lowbit/kernels/float_convert.h"

namespace lowbit {
namespace cpu {
namespace {

template <typename Load>
double chunk_sum(Load load, int64_t begin, int64_t end) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 8 <= end; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += std::fabs(double(load(i + j)));
  for (int j = 0; i < end; ++i, ++j) acc[j] += std::fabs(double(load(i)));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

Status sum_abs_f64(DType xtype, const void* x, int64_t n, double* out) {
  if (out == nullptr) return Status::invalid("lowbit::cpu::sum_abs_f64: out must not be null");
  if (n < 0) return Status::invalid("lowbit::cpu::sum_abs_f64: n must be >= 0, got " + std::to_string(n));
  if (n > 0 && x == nullptr) return Status::invalid("lowbit::cpu::sum_abs_f64: x must not be null");
  if (xtype != DType::kFloat32 && xtype != DType::kFloat16 && xtype != DType::kBFloat16)
    return Status::invalid("lowbit::cpu::sum_abs_f64: xtype must be float32, float16 or bfloat16");
  const int64_t chunk = sum_abs_chunk(n);
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<double> part(size_t(chunks > 0 ? chunks : 1), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * chunk, e = b + chunk < n ? b + chunk : n;
    switch (xtype) {
      case DType::kFloat32: {
        const float* p = static_cast<const float*>(x);
        part[size_t(c)] = chunk_sum([p](int64_t i) { return p[i]; }, b, e);
        break;
      }
      case DType::kFloat16: {
        const uint16_t* p = static_cast<const uint16_t*>(x);
        part[size_t(c)] = chunk_sum([p](int64_t i) { return half_to_float(p[i]); }, b, e);
        break;
      }
      case DType::kBFloat16: {
        const uint16_t* p = static_cast<const uint16_t*>(x);
        part[size_t(c)] = chunk_sum([p](int64_t i) { return bf16_to_float(p[i]); }, b, e);
        break;
      }
    }
  }
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += part[size_t(c)];
  *out = s;
  return Status::ok();
}

Status lsq_step(DType xtype, const void* x, int64_t n, double qmax, ScalarArg eps, float* out) {
  const char* fn = "lowbit::cpu::lsq_step: ";
  if (out == nullptr) return Status::invalid(std::string(fn) + "out must not be null");
  if (n < 1) return Status::invalid(std::string(fn) + "n must be >= 1, got " + std::to_string(n));
  if (!(qmax > 0) || !std::isfinite(qmax)) return Status::invalid(std::string(fn) + "qmax must be positive and finite");
  if (eps.p != nullptr && static_cast<uint32_t>(eps.dtype) > 2u)
    return Status::invalid(std::string(fn) + "eps dtype must be float32, float16 or bfloat16");
  double sum = 0.0;
  const Status st = sum_abs_f64(xtype, x, n, &sum);
  if (!st.is_ok()) return st;
  const float s = lsq_step_value(sum, n, lsq_step_factor(qmax));
  if (eps.p == nullptr) {
    *out = s;
    return Status::ok();
  }
  const uint16_t* e16 = static_cast<const uint16_t*>(eps.p);
  const float e = eps.dtype == DType::kFloat32   ? *static_cast<const float*>(eps.p)
                  : eps.dtype == DType::kFloat16 ? half_to_float(*e16)
                                                 : bf16_to_float(*e16);
  *out = qat_step(s, e);
  return Status::ok();
}

}  // namespace cpu
}  // namespace lowbit

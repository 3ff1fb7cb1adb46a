// Per-tensor int8 quantizer, generic translation unit: validation, the scalar reference, the portable
// OpenMP path, and dispatch to quantize_avx512.cpp.
//
// Contract (quantize.h): q[i*K + k] = clamp(rne((float(x[i*ldx + k]) + shift[k]) / scale), qmin, qmax),
// all in fp32 in that order; a NaN quotient is taken as 0 before the clamp (so it gives 0 whenever the
// range holds 0). The reference rounds with std::nearbyint (default rounding mode: half to even). The
// portable fast path clamps first and then rounds with the 1.5 * 2^23 trick: qmin and qmax are integers,
// so clamp(rne(v)) == rne(clamp(v)), and |clamp(v)| <= 128 is far inside the trick's exact range, which
// matches the reference bitwise without a libm call per element.
// Work split: (row, column chunk) units, static schedule; units are independent, so results do not
// depend on the thread count.
#include "lowbit/kernels/quantize.h"

#include <omp.h>

#include <cmath>
#include <string>

#include "../validate.h"
#include "lowbit/kernels/float_convert.h"
#include "quantize_internal.h"
#include "cpu_features.h"

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

constexpr int64_t kChunk = 8192;            // columns per work unit
constexpr int64_t kParallelMinElems = 1 << 16;  // below this a parallel region costs more than it saves

// validate::quantize_s8. The value of *scale is not checked (as on CUDA): any value gives the IEEE
// result of the formula (the op layer checks the step when asked to).
Status check(const char* fn, DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* scale,
             int32_t qmin, int32_t qmax, const int8_t* q) {
  return validate::quantize_s8(fn, xtype, x, M, K, ldx, scale, qmin, qmax, q);
}

inline float load_x(DType t, const void* x, int64_t idx) {
  switch (t) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(x)[idx]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(x)[idx]);
    default: return static_cast<const float*>(x)[idx];
  }
}

// The definition.
// NaN becomes 0 before the clamp, so a range that excludes 0 clamps it like any other value.
inline int8_t quant_ref(float t, float scale, int32_t qmin, int32_t qmax) {
  float r = std::nearbyint(t / scale);
  if (std::isnan(r)) r = 0.0f;
  if (r < float(qmin)) return int8_t(qmin);
  if (r > float(qmax)) return int8_t(qmax);
  return int8_t(int32_t(r));
}

template <DType T, bool SHIFT>
void scalar_range(const QuantizeArgs& a, int64_t i, int64_t k0, int64_t k1) {
  const float lo = float(a.qmin), hi = float(a.qmax);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer (RNE)
  const int64_t base = i * a.ldx;
  int8_t* q = a.q + i * a.K;
  for (int64_t k = k0; k < k1; ++k) {
    float t = load_x(T, a.x, base + k);
    if (SHIFT) t += a.shift[k];
    float v = t / a.scale;
    if (v != v) v = 0.0f;
    const float c = v < lo ? lo : (v > hi ? hi : v);
    q[k] = int8_t(int32_t((c + magic) - magic));
  }
}

void scalar_range_any(const QuantizeArgs& a, int64_t i, int64_t k0, int64_t k1) {
  const bool sh = a.shift != nullptr;
  switch (a.xtype) {
    case DType::kFloat32: sh ? scalar_range<DType::kFloat32, true>(a, i, k0, k1)
                             : scalar_range<DType::kFloat32, false>(a, i, k0, k1); break;
    case DType::kFloat16: sh ? scalar_range<DType::kFloat16, true>(a, i, k0, k1)
                             : scalar_range<DType::kFloat16, false>(a, i, k0, k1); break;
    case DType::kBFloat16: sh ? scalar_range<DType::kBFloat16, true>(a, i, k0, k1)
                              : scalar_range<DType::kBFloat16, false>(a, i, k0, k1); break;
  }
}

}  // namespace

bool quantize_avx512_supported() {
  static const bool ok = cpu_has_avx512_set();
  return ok;
}

Status quantize_s8_path(bool use_avx512, DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx,
                        const float* shift, const float* scale, int32_t qmin, int32_t qmax, int8_t* q,
                        int nthreads) {
  const char* fn = "quantize_s8";
  Status s = check(fn, xtype, x, M, K, ldx, scale, qmin, qmax, q);
  if (!s.is_ok()) return s;
  if (M == 0 || K == 0) return Status::ok();
  if (use_avx512 && !quantize_avx512_supported())
    return Status::invalid(validate::err(fn, "AVX-512 path requested but not supported by this CPU"));

  const QuantizeArgs a{xtype, x, M, K, ldx, shift, *scale, qmin, qmax, q};
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  const int64_t units = M * chunks;
  int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
  if (M * K < kParallelMinElems) nt = 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t i = u / chunks, k0 = (u % chunks) * kChunk;
    const int64_t k1 = k0 + kChunk < K ? k0 + kChunk : K;
    if (use_avx512)
      quantize_s8_avx512_range(a, i, k0, k1);
    else
      scalar_range_any(a, i, k0, k1);
  }
  return Status::ok();
}

}  // namespace detail

Status quantize_s8(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                   const float* scale, int32_t qmin, int32_t qmax, int8_t* q, const float* eps) {
  float step = 0.0f;
  if (eps != nullptr && scale != nullptr) {
    step = lowbit::qat_step(*scale, *eps);
    scale = &step;
  }
  return detail::quantize_s8_path(detail::quantize_avx512_supported(), xtype, x, M, K, ldx, shift, scale, qmin,
                                  qmax, q);
}

Status quantize_s8_ref(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                       const float* scale, int32_t qmin, int32_t qmax, int8_t* q) {
  Status s = detail::check("quantize_s8_ref", xtype, x, M, K, ldx, scale, qmin, qmax, q);
  if (!s.is_ok()) return s;
  if (M == 0 || K == 0) return Status::ok();
  const float sc = *scale;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) {
      float t = detail::load_x(xtype, x, i * ldx + k);
      if (shift) t += shift[k];
      q[i * K + k] = detail::quant_ref(t, sc, qmin, qmax);
    }
  return Status::ok();
}

Status qat_alpha(const float* scale1, const float* scale2, const float* eps, float* alpha) {
  if (scale1 == nullptr || scale2 == nullptr || eps == nullptr || alpha == nullptr)
    return Status::invalid("lowbit::cpu::qat_alpha: scale1, scale2, eps and alpha must not be null");
  alpha[0] = qat_alpha_value(scale1[0], scale2[0], eps[0]);
  return Status::ok();
}

Status qat_prepare(ScalarArg shift, int64_t n, ScalarArg scale1, ScalarArg scale2, ScalarArg eps, float* out) {
  const char* fn = "lowbit::cpu::qat_prepare";
  const Status st = validate::qat_prepare(fn, shift, n, scale1, scale2, eps, out);
  if (!st.is_ok()) return st;
  for (int64_t i = 0; i < n; ++i) out[i] = detail::load_x(shift.dtype, shift.p, i);
  const float s1 = detail::load_x(scale1.dtype, scale1.p, 0), s2 = detail::load_x(scale2.dtype, scale2.p, 0),
              e = detail::load_x(eps.dtype, eps.p, 0);
  out[n] = s1;
  out[n + 1] = s2;
  out[n + 2] = e;
  out[n + 3] = qat_alpha_value(s1, s2, e);
  out[n + 4] = qat_step(s1, e);
  out[n + 5] = qat_step(s2, e);
  return Status::ok();
}

Status qat_quantize(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, ScalarArg shift, ScalarArg scale1,
                    ScalarArg scale2, ScalarArg eps, int32_t qmin, int32_t qmax, int8_t* q, float* prepared) {
  const char* fn = "lowbit::cpu::qat_quantize";
  const int64_t n = shift.p != nullptr ? K : 0;
  Status st = validate::qat_prepare(fn, shift, n, scale1, scale2, eps, prepared);
  if (st.is_ok()) st = validate::quantize_s8(fn, xtype, x, M, K, ldx, static_cast<const float*>(scale1.p), qmin, qmax, q);
  if (!st.is_ok()) return st;
  st = qat_prepare(shift, n, scale1, scale2, eps, prepared);
  if (!st.is_ok() || M == 0 || K == 0) return st;
  return quantize_s8(xtype, x, M, K, ldx, n > 0 ? prepared : nullptr, prepared + n, qmin, qmax, q, prepared + n + 2);
}

}  // namespace cpu
}  // namespace lowbit

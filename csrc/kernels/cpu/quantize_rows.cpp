// Per-row symmetric int8 quantizer (SwitchBack's gradient quantizer), generic translation unit: argument
// checks (shared with quantize_rows.cu), the scalar reference, the per-row decision, the portable OpenMP
// path, and dispatch to quantize_rows_avx512.cpp.
//
// Contract (quantize_rows.h), per row: amax = max |float(x)|; a row holding NaN / inf gets scale NaN and
// codes 0; an all-zero row scale 0 and codes 0; otherwise scale = amax / qmax (one fp32 division) and
// q = clamp(rne(x / scale), -qmax, qmax) (IEEE fp32 division; a NaN quotient, only 0 / 0 after the scale
// underflowed, gives 0).
//
// The reference is written from the contract: widen, fabs, isfinite, a float max, nearbyint (default
// rounding mode: half to even). The fast paths get the same bits another way:
//   * amax through integer maxima of magnitude keys in x's own format (quantize_rows_internal.h): exact,
//     order-free, and it folds the NaN / inf test into the same max;
//   * the portable path clamps before rounding, with the 1.5 * 2^23 trick: -qmax and qmax are integers,
//     so clamp(rne(v)) == rne(clamp(v)), and |clamp(v)| <= 127 is far inside the trick's exact range.
// Every row is one work unit with no state shared between rows, so results cannot depend on the thread
// count. Built without -ffast-math (CMakeLists.txt: -O3 -Wall -Wextra), so nothing is reassociated: a
// division stays a division and the magic add / subtract is not folded. (-std=gnu++17 leaves GCC's
// -ffp-contract=fast on, but no product feeds an add anywhere here, so there is nothing to fuse.)
#include "lowbit/kernels/quantize_rows.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "../validate.h"
#include "cpu_features.h"
#include "lowbit/kernels/float_convert.h"
#include "quantize_rows_internal.h"

namespace lowbit {
namespace cpu {
namespace detail {

Status quantize_rows_s8_check(const char* fn, DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx,
                              int32_t qmax, const int8_t* q, int64_t ldq, const float* row_scale) {
  using validate::err;
  using validate::invalid_got;
  const int32_t xt = static_cast<int32_t>(xtype);
  if (xt < 0 || xt > 2) return invalid_got(fn, "xtype must be float32 (0), float16 (1) or bfloat16 (2)", xt);
  if (M < 0) return invalid_got(fn, "M must be >= 0", M);
  if (N < 0) return invalid_got(fn, "N must be >= 0", N);
  if (ldx < 0) return invalid_got(fn, "ldx must be >= 0", ldx);
  if (ldq < 0) return invalid_got(fn, "ldq must be >= 0", ldq);
  if (M > 0 && ldx < N) return invalid_got(fn, "ldx must be >= N (" + std::to_string(N) + ")", ldx);
  if (M > 0 && ldq < N) return invalid_got(fn, "ldq must be >= N (" + std::to_string(N) + ")", ldq);
  if (qmax < 1 || qmax > 127) return invalid_got(fn, "qmax must be in [1, 127]", qmax);
  if (M == 0 || N == 0) return Status::ok();  // nothing to read or write: null pointers are fine
  if (x == nullptr) return Status::invalid(err(fn, "x must not be null when M * N > 0 (M=" + std::to_string(M) +
                                                       ", N=" + std::to_string(N) + "), got null"));
  if (q == nullptr) return Status::invalid(err(fn, "q must not be null when M * N > 0 (M=" + std::to_string(M) +
                                                       ", N=" + std::to_string(N) + "), got null"));
  if (row_scale == nullptr)
    return Status::invalid(err(fn, "row_scale must not be null when M * N > 0 (M=" + std::to_string(M) +
                                       ", N=" + std::to_string(N) + "), got null"));
  // Every element index formed is below M * max(N, ld) (ld >= N here, so max(N, ld) == ld).
  const int64_t big = std::numeric_limits<int64_t>::max();
  if (M > big / ldx)
    return Status::invalid(
        err(fn, "M * ldx must fit int64, got M=" + std::to_string(M) + " ldx=" + std::to_string(ldx)));
  if (M > big / ldq)
    return Status::invalid(
        err(fn, "M * ldq must fit int64, got M=" + std::to_string(M) + " ldq=" + std::to_string(ldq)));
  return Status::ok();
}

namespace {

constexpr int64_t kParallelMinElems = 1 << 16;  // below this a parallel region costs more than it saves

inline float load_x(DType t, const void* x, int64_t idx) {
  switch (t) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(x)[idx]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(x)[idx]);
    default: return static_cast<const float*>(x)[idx];
  }
}

// The definition of one code.
inline int8_t quant_ref(float t, float scale, int32_t qmax) {
  float r = std::nearbyint(t / scale);
  if (std::isnan(r)) r = 0.0f;  // 0 / 0 (scale underflowed to 0)
  if (r < float(-qmax)) return int8_t(-qmax);
  if (r > float(qmax)) return int8_t(qmax);
  return int8_t(int32_t(r));
}

// |amax| as fp32 from the largest magnitude key of the row (see quantize_rows_internal.h). Widening is
// monotone and exact, so the widened max is the max of the widened values; a NaN / inf key stays NaN / inf.
inline float amax_from_key(DType t, uint32_t key) {
  switch (t) {
    case DType::kFloat16: return half_to_float(uint16_t(key));
    case DType::kBFloat16: return bf16_to_float(uint16_t(key));
    default: return bits_to_float(key);
  }
}

// Portable pass 1 (plain loops the compiler can vectorise: an AND and an unsigned max per element).
uint32_t absmax_key_portable(DType t, const void* x, int64_t off, int64_t N) {
  uint32_t m = 0;
  if (t == DType::kFloat32) {
    const float* row = static_cast<const float*>(x) + off;
    for (int64_t j = 0; j < N; ++j) {
      const uint32_t k = float_to_bits(row[j]) & 0x7fffffffu;
      m = k > m ? k : m;
    }
  } else {
    const uint16_t* row = static_cast<const uint16_t*>(x) + off;
    uint16_t m16 = 0;
    for (int64_t j = 0; j < N; ++j) {
      const uint16_t k = uint16_t(row[j] & 0x7fffu);
      m16 = k > m16 ? k : m16;
    }
    m = m16;
  }
  return m;
}

// Portable pass 2.
template <DType T>
void codes_portable(const QuantizeRowsArgs& a, int64_t i, float s) {
  const float lo = float(-a.qmax), hi = float(a.qmax);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer (RNE)
  const int64_t base = i * a.ldx;
  int8_t* q = a.q + i * a.ldq;
  for (int64_t j = 0; j < a.N; ++j) {
    float v = load_x(T, a.x, base + j) / s;
    if (v != v) v = 0.0f;
    const float c = v < lo ? lo : (v > hi ? hi : v);
    q[j] = int8_t(int32_t((c + magic) - magic));
  }
}

void codes_portable_any(const QuantizeRowsArgs& a, int64_t i, float s) {
  switch (a.xtype) {
    case DType::kFloat32: codes_portable<DType::kFloat32>(a, i, s); break;
    case DType::kFloat16: codes_portable<DType::kFloat16>(a, i, s); break;
    case DType::kBFloat16: codes_portable<DType::kBFloat16>(a, i, s); break;
  }
}

// One row of a fast path: pass 1, the contract's decision, pass 2.
void row_fast(bool use_avx512, const QuantizeRowsArgs& a, int64_t i, float* row_scale) {
  const uint32_t key = use_avx512 ? quantize_rows_avx512_absmax_key(a, i)
                                  : absmax_key_portable(a.xtype, a.x, i * a.ldx, a.N);
  const float amax = amax_from_key(a.xtype, key);
  if (!(amax <= std::numeric_limits<float>::max()) || amax == 0.0f) {  // NaN / inf, or all zeros
    row_scale[i] = amax == 0.0f ? 0.0f : std::numeric_limits<float>::quiet_NaN();
    std::memset(a.q + i * a.ldq, 0, size_t(a.N));
    return;
  }
  const float s = amax / float(a.qmax);
  row_scale[i] = s;
  if (use_avx512)
    quantize_rows_avx512_codes(a, i, s);
  else
    codes_portable_any(a, i, s);
}

}  // namespace

bool quantize_rows_avx512_supported() {
  static const bool ok = cpu_has_avx512_set();
  return ok;
}

Status quantize_rows_s8_path(bool use_avx512, DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx,
                             int32_t qmax, int8_t* q, int64_t ldq, float* row_scale, int nthreads) {
  const char* fn = "lowbit::cpu::quantize_rows_s8";
  Status s = quantize_rows_s8_check(fn, xtype, x, M, N, ldx, qmax, q, ldq, row_scale);
  if (!s.is_ok() || M == 0 || N == 0) return s;
  if (use_avx512 && !quantize_rows_avx512_supported())
    return Status::invalid(validate::err(fn, "AVX-512 path requested but not supported by this CPU"));
  const QuantizeRowsArgs a{xtype, x, N, ldx, qmax, q, ldq};
  int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
  if (M * N < kParallelMinElems || M == 1) nt = 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < M; ++i) row_fast(use_avx512, a, i, row_scale);
  return Status::ok();
}

}  // namespace detail

Status quantize_rows_s8(DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx, int32_t qmax, int8_t* q,
                        int64_t ldq, float* row_scale) {
  return detail::quantize_rows_s8_path(detail::quantize_rows_avx512_supported(), xtype, x, M, N, ldx, qmax, q, ldq,
                                       row_scale);
}

Status quantize_rows_s8_ref(DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx, int32_t qmax, int8_t* q,
                            int64_t ldq, float* row_scale) {
  Status s = detail::quantize_rows_s8_check("lowbit::cpu::quantize_rows_s8_ref", xtype, x, M, N, ldx, qmax, q, ldq,
                                            row_scale);
  if (!s.is_ok() || M == 0 || N == 0) return s;
  for (int64_t i = 0; i < M; ++i) {
    float amax = 0.0f;
    bool finite = true;
    for (int64_t j = 0; j < N; ++j) {
      const float a = std::fabs(detail::load_x(xtype, x, i * ldx + j));
      if (!std::isfinite(a))
        finite = false;
      else if (a > amax)
        amax = a;
    }
    int8_t* qi = q + i * ldq;
    if (!finite || amax == 0.0f) {
      row_scale[i] = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      for (int64_t j = 0; j < N; ++j) qi[j] = 0;
      continue;
    }
    const float sc = amax / float(qmax);
    row_scale[i] = sc;
    for (int64_t j = 0; j < N; ++j) qi[j] = detail::quant_ref(detail::load_x(xtype, x, i * ldx + j), sc, qmax);
  }
  return Status::ok();
}

}  // namespace cpu
}  // namespace lowbit

// Shared rules of the weight-only matrices (include/lowbit/kernels/wq.h): the segment description and the
// argument checks every CPU and CUDA entry point runs first (same rules, same messages on both sides).
#include <limits>
#include <string>

#include "lowbit/kernels/wq.h"
#include "../validate.h"

namespace lowbit {

namespace {

// Segment checks without the pointer ones; *packed gets the word rows used.
Status check_segments(const char* fn, const WqWeight& w, int64_t* packed) {
  using validate::err;
  using validate::invalid_got;
  if (w.K < 1) return invalid_got(fn, "K must be >= 1", w.K);
  if (w.N < 0) return invalid_got(fn, "N must be >= 0", w.N);
  if (w.nseg < 1 || w.nseg > kWqMaxSegments)
    return invalid_got(fn, "nseg must be in [1, " + std::to_string(kWqMaxSegments) + "]", w.nseg);
  int64_t start = 0, rows = 0;
  for (int32_t s = 0; s < w.nseg; ++s) {
    const std::string seg = "segment " + std::to_string(s);
    if (!wq_bits_supported(w.bits[s]))
      return invalid_got(fn, seg + ": bits must be 1, 2, 3, 4, 5, 6 or 8", w.bits[s]);
    const int64_t len = w.row_end[s] - start;
    if (len < 1)
      return invalid_got(fn, seg + ": row_end must exceed the previous end (" + std::to_string(start) + ")",
                         w.row_end[s]);
    if (s + 1 < w.nseg && len % 32 != 0)
      return invalid_got(fn, seg + ": every segment but the last must have a multiple of 32 rows", len);
    rows += (len + 31) / 32 * w.bits[s];
    start = w.row_end[s];
  }
  if (start != w.K)
    return invalid_got(fn, "the last segment must end at K (" + std::to_string(w.K) + ")", start);
  *packed = rows;
  return Status::ok();
}

}  // namespace

int64_t wq_packed_rows(const WqWeight& w) {
  int64_t rows = 0;
  return check_segments("wq_packed_rows", w, &rows).is_ok() ? rows : 0;
}

Status wq_validate(const char* fn, const WqWeight& w) {
  using validate::err;
  using validate::invalid_got;
  int64_t packed = 0;
  Status st = check_segments(fn, w, &packed);
  if (!st.is_ok()) return st;
  const int32_t sd = static_cast<int32_t>(w.sdtype);
  if (sd < 0 || sd > 2) return invalid_got(fn, "sdtype must be float32, float16 or bfloat16", sd);
  if (w.qrows < packed)
    return invalid_got(fn, "qrows must be >= the " + std::to_string(packed) + " word rows the segments use",
                       w.qrows);
  if (w.groups < 1) return invalid_got(fn, "groups must be >= 1", w.groups);
  int64_t tmp = 0;
  if (!validate::mul(w.qrows, w.N, &tmp) || !validate::mul(w.groups, w.N, &tmp) ||
      !validate::mul(w.K, w.N, &tmp))
    return Status::invalid(err(fn, "qrows, groups or K times N overflows int64 (N=" + std::to_string(w.N) + ")"));
  if (w.N == 0) return Status::ok();
  if (w.qweight == nullptr) return Status::invalid(err(fn, "qweight is null"));
  if (w.g_idx == nullptr) return Status::invalid(err(fn, "g_idx is null"));
  if (w.scales == nullptr) return Status::invalid(err(fn, "scales is null"));
  if (w.zeros == nullptr) return Status::invalid(err(fn, "zeros is null"));
  return Status::ok();
}

Status wq_validate_matmul(const char* fn, const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx,
                          const void* out, int64_t ldo) {
  using validate::err;
  using validate::invalid_got;
  Status st = wq_validate(fn, w);
  if (!st.is_ok()) return st;
  const int32_t xt = static_cast<int32_t>(xtype);
  if (xt < 0 || xt > 2) return invalid_got(fn, "xtype must be float32, float16 or bfloat16", xt);
  if (M < 0) return invalid_got(fn, "M must be >= 0", M);
  if (M == 0 || w.N == 0) return Status::ok();
  if (ldx < w.K) return invalid_got(fn, "ldx must be >= K (" + std::to_string(w.K) + ")", ldx);
  if (ldo < w.N) return invalid_got(fn, "ldo must be >= N (" + std::to_string(w.N) + ")", ldo);
  if (x == nullptr) return Status::invalid(err(fn, "x is null"));
  if (out == nullptr) return Status::invalid(err(fn, "out is null"));
  int64_t tmp = 0;
  if (!validate::mul(M, ldx, &tmp) || !validate::mul(M, ldo, &tmp))
    return Status::invalid(err(fn, "M * ldx or M * ldo overflows int64 (M=" + std::to_string(M) + ")"));
  return Status::ok();
}

Status wq_validate_dequantize(const char* fn, const WqWeight& w, int64_t n0, int64_t n1, DType otype,
                              const void* out, int64_t ldo) {
  using validate::err;
  using validate::invalid_got;
  Status st = wq_validate(fn, w);
  if (!st.is_ok()) return st;
  const int32_t ot = static_cast<int32_t>(otype);
  if (ot < 0 || ot > 2) return invalid_got(fn, "otype must be float32, float16 or bfloat16", ot);
  if (n0 < 0 || n0 > w.N) return invalid_got(fn, "n0 must be in [0, N=" + std::to_string(w.N) + "]", n0);
  if (n1 < n0 || n1 > w.N)
    return invalid_got(fn, "n1 must be in [n0=" + std::to_string(n0) + ", N=" + std::to_string(w.N) + "]", n1);
  if (n1 == n0) return Status::ok();
  if (ldo < n1 - n0) return invalid_got(fn, "ldo must be >= n1 - n0 (" + std::to_string(n1 - n0) + ")", ldo);
  if (out == nullptr) return Status::invalid(err(fn, "out is null"));
  int64_t tmp = 0;
  if (!validate::mul(w.K, ldo, &tmp))
    return Status::invalid(err(fn, "K * ldo overflows int64 (ldo=" + std::to_string(ldo) + ")"));
  return Status::ok();
}

}  // namespace lowbit

// im2col for int8 NHWC on the CPU. Contract: include/lowbit/kernels/im2col.h.
//
// In NHWC the Cg channels of one group at one pixel are contiguous in x, and in cols they are contiguous
// too (columns in (a, b, c) order), so each (output row, kernel tap) is one memcpy of Cg bytes from an
// in-image pixel, or a memset of Cg zeros for a tap in the padding. Pure data movement; OpenMP over
// output rows (n, p, q), each row written by one thread.
#include "lowbit/kernels/im2col.h"

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kParallelMinBytes = 1 << 18;  // below this much output a parallel region costs more than it saves

std::string err(const char* fn, const std::string& what) { return std::string(fn) + ": " + what; }

// a * b, or false when it overflows int64 (only called with a, b >= 0).
bool mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

// The contract's checks, plus int64 overflow of every size the kernel forms. Ho and Wo are computed
// here from a non-negative numerator: Conv2dShape::out_h() divides a possibly negative numerator, which
// C++ truncates toward zero (H=2, kh=3, sh=2 gives (2-3)/2+1 = 1), so it is only valid after this check.
Status check(const char* fn, const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* cols,
             int64_t* Ho, int64_t* Wo) {
  const std::pair<const char*, int64_t> positive[] = {{"N", s.N}, {"H", s.H}, {"W", s.W}, {"C", s.C},
                                                      {"kh", s.kh}, {"kw", s.kw}, {"sh", s.sh}, {"sw", s.sw},
                                                      {"dh", s.dh}, {"dw", s.dw}, {"Cg", Cg}};
  for (const auto& v : positive)
    if (v.second < 1) return Status::invalid(err(fn, std::string(v.first) + " must be >= 1, got " + std::to_string(v.second)));
  if (s.ph < 0) return Status::invalid(err(fn, "ph must be >= 0, got " + std::to_string(s.ph)));
  if (s.pw < 0) return Status::invalid(err(fn, "pw must be >= 0, got " + std::to_string(s.pw)));
  if (c0 < 0) return Status::invalid(err(fn, "c0 must be >= 0, got " + std::to_string(c0)));
  if (c0 > s.C - Cg)
    return Status::invalid(err(fn, "c0 + Cg must be <= C (" + std::to_string(s.C) + "), got c0=" +
                                       std::to_string(c0) + " Cg=" + std::to_string(Cg)));
  // Extent of the padded image and of the dilated kernel, per axis.
  const int64_t ext_in[2] = {s.H, s.W}, pad[2] = {s.ph, s.pw}, k[2] = {s.kh, s.kw}, d[2] = {s.dh, s.dw},
                st[2] = {s.sh, s.sw};
  int64_t out[2];
  for (int i = 0; i < 2; ++i) {
    const char* ax = i == 0 ? "H" : "W";
    int64_t padded = 0, span = 0;
    // Every tap coordinate the kernel forms (p*stride - pad + a*dilation) lies in [-pad, padded), so
    // these two not overflowing keeps all index arithmetic in range.
    if (!mul(pad[i], 2, &padded) || __builtin_add_overflow(padded, ext_in[i], &padded) ||
        !mul(d[i], k[i] - 1, &span))
      return Status::invalid(err(fn, std::string("the padded ") + ax + " extent or the dilated kernel overflows int64"));
    if (padded - span - 1 < 0)
      return Status::invalid(err(fn, std::string("the dilated kernel (") + std::to_string(span + 1) +
                                         ") is larger than the padded input (" + std::to_string(padded) + ") along " +
                                         ax + ": no output (" + (i == 0 ? "Ho" : "Wo") + " < 1)"));
    out[i] = (padded - span - 1) / st[i] + 1;
  }
  int64_t x_len = 0, rows = 0, row_len = 0, cols_len = 0;
  if (!mul(s.N, s.H, &x_len) || !mul(x_len, s.W, &x_len) || !mul(x_len, s.C, &x_len))
    return Status::invalid(err(fn, "N*H*W*C overflows int64"));
  if (!mul(s.N, out[0], &rows) || !mul(rows, out[1], &rows) || !mul(s.kh, s.kw, &row_len) ||
      !mul(row_len, Cg, &row_len) || !mul(rows, row_len, &cols_len))
    return Status::invalid(err(fn, "N*Ho*Wo*kh*kw*Cg overflows int64"));
  if (x == nullptr) return Status::invalid(err(fn, "x is null"));
  if (cols == nullptr) return Status::invalid(err(fn, "cols is null"));
  *Ho = out[0];
  *Wo = out[1];
  return Status::ok();
}

}  // namespace

Status im2col_s8_nhwc(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, int8_t* cols) {
  int64_t Ho = 0, Wo = 0;
  Status st = check("lowbit::cpu::im2col_s8_nhwc", x, s, c0, Cg, cols, &Ho, &Wo);
  if (!st.is_ok()) return st;

  const int64_t H = s.H, W = s.W, C = s.C, kh = s.kh, kw = s.kw;
  const int64_t row_len = kh * kw * Cg;  // bytes per cols row
  const int64_t rows = s.N * Ho * Wo;
  const int nt = rows * row_len < kParallelMinBytes ? 1 : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t q = row % Wo, t = row / Wo;
    const int64_t p = t % Ho, n = t / Ho;
    int8_t* dst = cols + row * row_len;
    for (int64_t a = 0; a < kh; ++a) {
      const int64_t ih = p * s.sh - s.ph + a * s.dh;
      const bool row_in = ih >= 0 && ih < H;
      for (int64_t b = 0; b < kw; ++b, dst += Cg) {
        const int64_t iw = q * s.sw - s.pw + b * s.dw;
        if (row_in && iw >= 0 && iw < W)
          std::memcpy(dst, x + ((n * H + ih) * W + iw) * C + c0, size_t(Cg));
        else
          std::memset(dst, 0, size_t(Cg));  // zero padding: code 0
      }
    }
  }
  return Status::ok();
}

}  // namespace cpu
}  // namespace lowbit

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

#include "../validate.h"

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kParallelMinBytes = 1 << 18;  // below this much output a parallel region costs more than it saves

}  // namespace

Status im2col_s8_nhwc(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, int8_t* cols) {
  validate::Im2colDims dims;
  Status st = validate::im2col_s8_nhwc("lowbit::cpu::im2col_s8_nhwc", x, s, c0, Cg, cols, &dims);
  if (!st.is_ok()) return st;
  const int64_t Ho = dims.Ho, Wo = dims.Wo;

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

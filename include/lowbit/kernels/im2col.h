// im2col for int8 codes in NHWC (channels-last) layout: the A operand of a convolution as a GEMM.
//
//   cols[(n, p, q), (a, b, c)] = x[n, p*sh - ph + a*dh, q*sw - pw + b*dw, c0 + c]     (0 outside the image)
//
// x: (N, H, W, C) int8, contiguous. One group at a time: channels c0 .. c0+Cg-1.
// cols: (N*Ho*Wo, kh*kw*Cg) int8, contiguous, rows in (n, p, q) order, columns in (a, b, c) order, which
// is the flattened OHWI weight layout, so conv = cols . W_ohwi^T. Ho = floor((H + 2ph - dh(kh-1) - 1)/sh) + 1,
// likewise Wo. Zero padding is code 0 (the quantized value of an input of 0).
#pragma once
#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {

struct Conv2dShape {
  int64_t N, H, W, C;     // input, NHWC
  int64_t kh, kw;         // kernel
  int64_t sh, sw;         // stride (>= 1)
  int64_t ph, pw;         // zero padding (>= 0)
  int64_t dh, dw;         // dilation (>= 1)
  // Output size; 0 when the dilated kernel does not fit the padded input (the numerator is negative,
  // and C++ division would round it toward zero, to a spurious 1).
  int64_t out_h() const { return out_size(H, kh, sh, ph, dh); }
  int64_t out_w() const { return out_size(W, kw, sw, pw, dw); }
  static int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
    const int64_t span = in + 2 * pad - dil * (k - 1) - 1;
    return span < 0 ? 0 : span / stride + 1;
  }
};

namespace cpu {
// Checks the shape (positive sizes, Ho, Wo >= 1, 0 <= c0, c0 + Cg <= C). OpenMP over output rows.
Status im2col_s8_nhwc(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, int8_t* cols);
}  // namespace cpu

namespace cuda {
Status im2col_s8_nhwc(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, int8_t* cols, CUstream_st* stream);
}  // namespace cuda
}  // namespace lowbit

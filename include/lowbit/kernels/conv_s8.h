// Implicit-GEMM convolution of int8 codes in NHWC layout (CUDA): the convolution im2col_s8_nhwc +
// gemm_s8_scaled compute, without materialising the im2col matrix.
//
//   out[(n, p, q) * ldo + o] = to_otype(float(acc) * alpha[0]),
//   acc = sum over (a, b, c) of x[n, p*sh - ph + a*dh, q*sw - pw + b*dw, c0 + c] * w[o, (a * kw + b) * Cg + c]
//
// (0 outside the image), rows (n, p, q) in order, o = 0 .. Og-1: exactly im2col_s8_nhwc's cols times w^T
// through gemm_s8_scaled, bit for bit (the int32 sums are exact, the epilogue is the GEMM's).
//
// x: (N, H, W, C) int8, contiguous; one group: channels c0 .. c0+Cg-1. w: (Og, kh, kw, Cg) int8, contiguous
// (the OHWI layout, rows kh*kw*Cg bytes apart). out: N*Ho*Wo rows of Og values of otype, rows ldo >= Og
// elements apart (a group writes at its column offset of the full output). alpha: one fp32 on the device.
//
// The kernel gathers the A operand 16 bytes at a time, so it needs C, c0 and Cg multiples of 16, x and w
// 16-byte aligned, and kh*kw*Cg <= kMaxGemmS8K: conv2d_s8_nhwc_supported says whether a call qualifies;
// conv2d_s8_nhwc returns an invalid Status for one that does not, and for the shape errors im2col_s8_nhwc
// reports. On the current stream (no host sync), deterministic, usable under CUDA graphs.
#pragma once
#include "lowbit/kernels/common.h"
#include "lowbit/kernels/im2col.h"

struct CUstream_st;

namespace lowbit {
namespace cuda {

bool conv2d_s8_nhwc_supported(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* w);

// Whether the implicit GEMM is the faster way to run this call on the current device: it is supported,
// and either the output has at most 128 channels or the GEMM over a materialised im2col matrix would not
// take the sm_90a wgmma kernel (whose 128 x 256 tiles outrun the implicit GEMM's mma.sync ones once the
// channels fill them: H100, ResNet-50 3x3 layers at batch 64, docs/PERFORMANCE.md). Argument errors give
// false (the fallback reports them).
bool conv2d_s8_nhwc_preferred(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* w,
                              int64_t Og);

Status conv2d_s8_nhwc(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* w, int64_t Og,
                      const float* alpha, DType otype, void* out, int64_t ldo, CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit

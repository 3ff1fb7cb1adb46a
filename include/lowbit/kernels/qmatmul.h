// Quantize-on-load batched matmul for a short reduction (attention scores, Q4MatMul): both operands are
// quantized inside the GEMM kernel, so neither float operand makes a round trip through int8 codes in
// global memory.
//
//   out[b, i, j] = to_T( float(acc) * alpha ),   acc = sum_k Qx[b, i, k] * Qy[b, j, k]   (exact int32)
//   Qx = quantize_s8(x[b]; step sx),  Qy = quantize_s8(y[b]; step sy)   (lowbit/kernels/quantize.h, no shift)
//   sx = qat_step(*x_scale, *eps),  sy = qat_step(*y_scale, *eps),  alpha = qat_alpha_value(*x_scale, *y_scale, *eps)
//
// It is, bit for bit, cpu/cuda quantize_s8 of each operand (with eps), qat_alpha and gemm_s8_scaled_batched
// with otype = dtype: the same codes, the same int32 sums, the same epilogue rounding. It only skips the
// codes' trip through memory (and, on attention-score shapes, the separate quantizer passes).
//
// * x: (M, K) per batch, element (i, k) of batch b at x[b * strideX + i * ldx + k]; y: (N, K) likewise;
//   out: (M, N) per batch at out[b * strideO + i * ldo + j]. x, y and out share `dtype`; strides are in
//   elements. A batch stride of 0 broadcasts that operand; strideO must be > 0 when batch > 1.
// * 1 <= K <= kQMatmulMaxK (both operands' rows of one tile stay in shared memory); larger K: compose
//   quantize_s8 and gemm_s8_scaled_batched.
// * x_scale, y_scale, eps: one value each of `scale_dtype`, on the device (no host read). Any values are
//   accepted (an invalid step gives NaN outputs through alpha, as qat_alpha).
// * qx, qy: optional outputs of the codes, contiguous (batch, M, K) and (batch, N, K) int8, for a backward
//   pass; nullptr skips them.
// * Deterministic (one thread per output, fixed k order, no atomics); runs on `stream`, allocates nothing.
// * Two kernels, bitwise alike: wgmma on a compute capability 9.0 device with an sm_90a build, mma.sync
//   elsewhere; LOWBIT_GEMM_S8_KERNEL=mma | wgmma | auto forces the choice as for gemm_s8 (wgmma where it
//   cannot run: an error).
#pragma once
#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {

constexpr int64_t kQMatmulMaxK = 256;

namespace cuda {

Status qmatmul_s8(DType dtype, const void* x, int64_t ldx, int64_t strideX, const void* y, int64_t ldy,
                  int64_t strideY, int64_t M, int64_t N, int64_t K, int64_t batch, DType scale_dtype,
                  const void* x_scale, const void* y_scale, const void* eps, int32_t qmin, int32_t qmax, void* out,
                  int64_t ldo, int64_t strideO, int8_t* qx, int8_t* qy, CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit

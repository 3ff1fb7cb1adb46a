// Per-tensor symmetric quantizer with a fused input shift (LSQ activations, Q8/Q4 weights).
//
//   q[i, k] = clamp( rne( (float(x[i, k]) + shift[k]) / scale ), qmin, qmax )      (int8 out)
//
// * All arithmetic in fp32, in this order: convert x to fp32, add shift (fp32), IEEE fp32 division by
//   `scale` (not a multiply by its reciprocal), round half to even, clamp. The same on CPU and CUDA,
//   so both give bitwise equal codes.
// * `scale` points to ONE fp32 value; with `eps` (one fp32 value, optional) the step is
//   qat_step(*scale, *eps) = max(scale, eps) (NaN if either is NaN), computed inside the kernel so that a
//   layer's forward needs no separate clamp op; without it, *scale itself (normally already clamped by
//   the caller). Both live on the device of x (host memory for the CPU kernels), so no host sync is
//   needed on CUDA. The step is not checked by either kernel: any value gives the IEEE result of the
//   formula (step 0: +-inf clamp; inf or NaN: 0 before the clamp), identically on both.
// * A NaN input gives 0 before the clamp (so code 0 whenever qmin <= 0 <= qmax); +-inf clamp to qmax / qmin.
// * qmin/qmax: -128/127 for 8 bits, -8/7 for 4 bits (codes are stored one per int8 here; packing is a
//   separate step).
#pragma once
#include <cmath>

#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {

// The GEMM scale of a quantization-aware layer from its two step parameters, without a host check:
//   s1 = max(scale1, eps), s2 = max(scale2, eps)   (NaN if an operand is NaN)
//   alpha = s1 * s2 (one fp32 multiply) if both steps are finite and > 0, else NaN,
// so a diverged or corrupt step turns the layer's output into NaN (as a NaN weight does in nn.Linear)
// instead of stopping the device every call to test it. Written once here for both devices.
// The quantizer step max(scale, eps) of a QAT layer, NaN if either is NaN (as torch.maximum).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline float qat_step(float scale, float eps) {
  return (scale != scale || eps != eps) ? __builtin_nanf("") : (scale > eps ? scale : eps);
}
#if defined(__CUDACC__)
__host__ __device__
#endif
inline float qat_alpha_value(float scale1, float scale2, float eps) {
  const float nan = __builtin_nanf("");
  const float s1 = qat_step(scale1, eps), s2 = qat_step(scale2, eps);
  const bool ok = s1 > 0.f && s2 > 0.f && s1 <= 3.402823466e38f && s2 <= 3.402823466e38f;  // > 0, finite
  return ok ? s1 * s2 : nan;
}

// Floats after the shift in qat_prepare's output: scale1, scale2, eps, alpha, step1, step2.
constexpr int64_t kQatPreparedScalars = 6;

namespace cpu {

// alpha[0] = qat_alpha_value(scale1[0], scale2[0], eps[0]); host pointers.
Status qat_alpha(const float* scale1, const float* scale2, const float* eps, float* alpha);

// A QAT forward's fp32 operands in one step (instead of a conversion per operand and qat_alpha):
//   out[0 .. n)  = shift[0 .. n) converted to fp32 (n = 0: no shift; shift.p may then be null),
//   out[n], out[n + 1], out[n + 2] = scale1, scale2, eps converted to fp32,
//   out[n + 3]   = qat_alpha_value(out[n], out[n + 1], out[n + 2]),
//   out[n + 4], out[n + 5] = qat_step(out[n], out[n + 2]), qat_step(out[n + 1], out[n + 2]) (the two steps a
//   QAT backward scales by; n + kQatPreparedScalars floats in all).
// Each operand in its own dtype (fp32 / fp16 / bf16; the conversions are exact). Host pointers.
Status qat_prepare(ScalarArg shift, int64_t n, ScalarArg scale1, ScalarArg scale2, ScalarArg eps, float* out);

// x: (M, K), element (i, k) at x[i * ldx + k], dtype `xtype`. shift: (K,) fp32, or nullptr for none.
// q: (M, K) int8, contiguous (row stride K). OpenMP-parallel, AVX-512 where the CPU has it.
Status quantize_s8(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                   const float* scale, int32_t qmin, int32_t qmax, int8_t* q, const float* eps = nullptr);

// Scalar reference of the above (single thread, no SIMD): the definition the fast paths must match bitwise.
Status quantize_s8_ref(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                       const float* scale, int32_t qmin, int32_t qmax, int8_t* q);

// A QAT forward's input quantizer and its qat_prepare in one step (CUDA: one launch):
//   prepared = qat_prepare(shift, n, scale1, scale2, eps) with n = K when shift.p is set, else 0;
//   q = quantize_s8(x, prepared shift, &prepared[n], ..., eps = &prepared[n + 2]),
// i.e. the codes with step qat_step(scale1, eps), each operand read in its own dtype (fp32 / fp16 / bf16)
// rather than from `prepared`: the same bits as the two calls. prepared holds n + kQatPreparedScalars floats.
Status qat_quantize(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, ScalarArg shift, ScalarArg scale1,
                    ScalarArg scale2, ScalarArg eps, int32_t qmin, int32_t qmax, int8_t* q, float* prepared);

}  // namespace cpu

namespace cuda {

// alpha[0] = qat_alpha_value(scale1[0], scale2[0], eps[0]); device pointers, one thread, on `stream`.
Status qat_alpha(const float* scale1, const float* scale2, const float* eps, float* alpha, CUstream_st* stream);

// cpu::qat_prepare's contract; device pointers, one launch on `stream`, the same bits as the CPU.
Status qat_prepare(ScalarArg shift, int64_t n, ScalarArg scale1, ScalarArg scale2, ScalarArg eps, float* out,
                   CUstream_st* stream);

// cpu::qat_quantize's contract in one launch (device pointers, on `stream`).
Status qat_quantize(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, ScalarArg shift, ScalarArg scale1,
                    ScalarArg scale2, ScalarArg eps, int32_t qmin, int32_t qmax, int8_t* q, float* prepared,
                    CUstream_st* stream);
// Same contract; x, shift, scale and q are device pointers; runs on `stream`, allocates nothing.
Status quantize_s8(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                   const float* scale, int32_t qmin, int32_t qmax, int8_t* q, CUstream_st* stream,
                   const float* eps = nullptr);

}  // namespace cuda
}  // namespace lowbit

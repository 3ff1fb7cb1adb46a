// Per-tensor symmetric quantizer with a fused input shift (LSQ activations, Q8/Q4 weights).
//
//   q[i, k] = clamp( rne( (float(x[i, k]) + shift[k]) / scale ), qmin, qmax )      (int8 out)
//
// * All arithmetic in fp32, in this order: convert x to fp32, add shift (fp32), IEEE fp32 division by
//   `scale` (not a multiply by its reciprocal), round half to even, clamp. The same on CPU and CUDA,
//   so both give bitwise equal codes.
// * `scale` points to ONE fp32 value, already clamped below by eps by the caller (> 0, finite). It lives
//   on the device of x (host memory for the CPU kernels), so no host sync is needed on CUDA.
// * A NaN input gives 0 before the clamp (so code 0 whenever qmin <= 0 <= qmax); +-inf clamp to qmax / qmin.
// * qmin/qmax: -128/127 for 8 bits, -8/7 for 4 bits (codes are stored one per int8 here; packing is a
//   separate step).
#pragma once
#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {
namespace cpu {

// x: (M, K), element (i, k) at x[i * ldx + k], dtype `xtype`. shift: (K,) fp32, or nullptr for none.
// q: (M, K) int8, contiguous (row stride K). OpenMP-parallel, AVX-512 where the CPU has it.
Status quantize_s8(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                   const float* scale, int32_t qmin, int32_t qmax, int8_t* q);

// Scalar reference of the above (single thread, no SIMD): the definition the fast paths must match bitwise.
Status quantize_s8_ref(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                       const float* scale, int32_t qmin, int32_t qmax, int8_t* q);

}  // namespace cpu

namespace cuda {

// Same contract; x, shift, scale and q are device pointers; runs on `stream`, allocates nothing.
Status quantize_s8(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                   const float* scale, int32_t qmin, int32_t qmax, int8_t* q, CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit

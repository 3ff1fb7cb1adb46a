// Per-row symmetric int8 quantizer with a per-row scale computed on the fly (SwitchBack's gradient
// quantizer: the output gradient of a linear layer, one scale per token row, feeding an int8 GEMM that
// multiplies each output row by row_scale[i]).
//
//   x: (M, N), dtype `xtype` (float32 / float16 / bfloat16), element (i, j) at x[i * ldx + j], ldx >= N.
//   q: (M, N) int8, element (i, j) at q[i * ldq + j], ldq >= N.      row_scale: (M,) fp32.
//   qmax: integer in [1, 127]; codes are symmetric, in [-qmax, qmax].
//
// For each row i, all arithmetic in fp32:
//   amax = max_j |float(x[i, j])|      (exact: widening to fp32 is exact, and a max does not round)
//   The row is "non-finite" if it holds any NaN or +-inf.
//   * finite row, amax > 0:
//       row_scale[i] = amax / float(qmax)                            (one IEEE fp32 division, RNE)
//       q[i, j]      = clamp(rne(float(x[i, j]) / row_scale[i]), -qmax, qmax)
//     The division is the IEEE quotient (not a multiply by a reciprocal), rounded to an integer half to
//     even. |x| / row_scale can round to slightly above qmax (row_scale is itself rounded), which the
//     clamp absorbs. If amax is so small (a few fp32 subnormals) that amax / qmax underflows to 0, the
//     formula still applies with IEEE semantics: row_scale[i] = +0, x / 0 = +-inf clamps to +-qmax, and
//     the NaN quotient 0 / 0 is taken as code 0.
//   * finite row, amax == 0 (all +0 / -0): row_scale[i] = +0, q[i, :] = 0.
//   * non-finite row: row_scale[i] = NaN (always the quiet NaN 0x7fc00000), q[i, :] = 0. A GEMM that
//     multiplies the row by row_scale then gives NaN for it: a bad gradient propagates instead of being
//     silently clipped.
// Only q[i, 0 .. N) of each row and row_scale[0 .. M) are written (row padding of q is left as it was);
// x's padding columns are never read. x must not overlap q or row_scale.
// M == 0 or N == 0: nothing is read or written, and the pointers may be null.
//
// Bitwise the same on the CPU (reference and fast paths) and CUDA, whatever the thread count, grid or
// alignment; deterministic (every value is a function of its row alone, and the max is exact).
// Subnormal inputs are kept (no flush to zero on either side).
//
// Bad arguments (xtype not one of the three, negative sizes or strides, ldx < N or ldq < N when M > 0,
// qmax outside [1, 127], null x / q / row_scale when M * N > 0, M * max(N, ld) overflowing int64) give
// Status::invalid with a message naming the argument, the expected range and the value given.
#pragma once
#include <cstdint>

#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {
namespace cpu {

// Host pointers. OpenMP over rows (one row per work unit, so the thread count cannot change a bit),
// AVX-512 where the CPU has it, a portable path otherwise.
Status quantize_rows_s8(DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx, int32_t qmax, int8_t* q,
                        int64_t ldq, float* row_scale);

// Scalar reference of the above (single thread, no SIMD, written straight from the contract): the
// definition every fast path must match bitwise.
Status quantize_rows_s8_ref(DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx, int32_t qmax, int8_t* q,
                            int64_t ldq, float* row_scale);

}  // namespace cpu

namespace cuda {

// Same contract; x, q and row_scale are device pointers. Runs on `stream`, allocates nothing, does not
// synchronise. Launch failures come back as Status::device.
Status quantize_rows_s8(DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx, int32_t qmax, int8_t* q,
                        int64_t ldq, float* row_scale, CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit

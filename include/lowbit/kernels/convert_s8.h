// Layout / type conversions of int8 codes for the QAT layers' backward: the saved activation codes widened
// to a float type for a float GEMM (cast_s8), and the weight codes transposed for an int8 GEMM that wants
// the other operand layout (transpose_s8). Both are pure data movement, bound by memory bandwidth.
//
//   cast_s8:       out[i, j] = (otype) q[i, j]     q (M, N) int8  -> out (M, N) float32 / float16 / bfloat16
//                  with scale: out[i, j] = (otype)(float(q[i, j]) * scale[0])  (one fp32 multiply, one rounding)
//   transpose_s8:  out[j, i] = q[i, j]             q (M, N) int8  -> out (N, M) int8
//
// * Exact: every int8 value (|q| <= 128) is representable in fp16, bf16 and fp32, so the cast has no
//   rounding; 0 gives +0. CPU and CUDA give the same bits.
// * scale (optional, one fp32 on the data's device; nullptr = none): the dequantized operand s * q of a
//   float GEMM in the same pass. float(q) * s is one IEEE fp32 multiply (never fused), then one
//   round-to-nearest-even conversion to otype; any s is accepted (IEEE results: 0 * inf = NaN, etc.; a
//   NaN result may carry a different NaN payload on the two devices). Same bits on CPU and CUDA otherwise.
// * Row-major with row strides in elements of each tensor's own type: q[i, j] at q[i * ldq + j];
//   cast out[i, j] at out[i * ldo + j] (elements of otype); transposed out[j, i] at out[j * ldo + i].
//   ldq >= N when M > 0; ldo >= N (cast) when M > 0, ldo >= M (transpose) when N > 0.
// * Only the (M, N) (cast) / (N, M) (transpose) window of out is written: row padding is left as it was.
// * M == 0 or N == 0: nothing is read or written, null pointers are fine.
// * out must not overlap q (not checked). The cast's out must be aligned to its element size (checked:
//   the GPU faults on a misaligned 2- or 4-byte store). Any other alignment of the bases and any stride
//   are fine; the fast paths need 16-byte aligned rows (see the .cpp / .cu files), other calls take
//   narrower accesses to the same result.
// * Bad arguments (negative sizes or strides, a stride below its row length, a null pointer with work to
//   do, an unknown otype, M * ldq or the output's rows * ldo overflowing int64, a misaligned cast out)
//   give kInvalidArgument with "<fn>: <what>, got <value>"; nothing is written then.
#pragma once
#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {
namespace cpu {

// Host pointers. OpenMP over (row, column span) items (cast) / 64 x 64 blocks (transpose).
Status cast_s8(const int8_t* q, int64_t M, int64_t N, int64_t ldq, DType otype, void* out, int64_t ldo,
               const float* scale = nullptr);
Status transpose_s8(const int8_t* q, int64_t M, int64_t N, int64_t ldq, int8_t* out, int64_t ldo);

namespace detail {
// The argument rules above, worded "<fn>: <what>, got <value>". Defined in csrc/kernels/cpu/convert_s8.cpp
// and called by the CUDA entry points too, so both sides accept the same calls with the same messages.
Status cast_s8_check(const char* fn, const int8_t* q, int64_t M, int64_t N, int64_t ldq, DType otype,
                     const void* out, int64_t ldo);
Status transpose_s8_check(const char* fn, const int8_t* q, int64_t M, int64_t N, int64_t ldq, const int8_t* out,
                          int64_t ldo);
}  // namespace detail

}  // namespace cpu

namespace cuda {

// Same contracts on device pointers; runs on `stream`, allocates nothing, no host sync.
Status cast_s8(const int8_t* q, int64_t M, int64_t N, int64_t ldq, DType otype, void* out, int64_t ldo,
               CUstream_st* stream, const float* scale = nullptr);
Status transpose_s8(const int8_t* q, int64_t M, int64_t N, int64_t ldq, int8_t* out, int64_t ldo,
                    CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit

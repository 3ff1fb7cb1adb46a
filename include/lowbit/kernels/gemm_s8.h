// int8 x int8 GEMM with int32 accumulation and a fused dequantizing epilogue.
//
//   out[i, j] = to_otype( float(acc[i, j]) * alpha ),   acc[i, j] = sum_k A[i, k] * B[j, k]   (exact int32)
//
// * A: (M, K) int8, row-major, row stride lda (activations). B: (N, K) int8, row-major, row stride ldb
//   (weights in nn.Linear layout: each output feature is a row). out: (M, N), row stride ldo, dtype otype.
// * alpha points to ONE fp32 (e.g. s_a * s_w), on the device of the data: no host sync on CUDA.
// * float(acc) is round-to-nearest-even int32 -> fp32, the multiply is one fp32 multiply, and the final
//   conversion to fp16/bf16 is round-to-nearest-even: bitwise the same on CPU and CUDA.
// * Every M, N, K >= 1 is valid (tails handled); K <= kMaxGemmS8K so that int32 cannot overflow.
// * Deterministic: each output is reduced by one thread in a fixed order (no split-K, no atomics).
#pragma once
#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {
namespace cpu {

// Fast path: AVX-512 VNNI / AVX-512BW / AVX2 picked at run time from the CPU's features, OpenMP over tiles.
Status gemm_s8_scaled(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                      int64_t K, const float* alpha, DType otype, void* out, int64_t ldo);

// Scalar reference (single thread, no SIMD).
Status gemm_s8_scaled_ref(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                          int64_t K, const float* alpha, DType otype, void* out, int64_t ldo);

// Plain int32 result (C = A * B^T), scalar reference, for tests of the integer part.
Status gemm_s8s8s32_ref(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                        int64_t K, int32_t* C, int64_t ldc);

// Name of the instruction set the fast path uses on this CPU ("avx512_vnni", "avx512bw", "avx2", "scalar").
const char* gemm_s8_isa();

}  // namespace cpu

namespace cuda {

// Tensor-core (mma.sync s8) GEMM; device pointers; runs on `stream`; allocates nothing.
Status gemm_s8_scaled(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                      int64_t K, const float* alpha, DType otype, void* out, int64_t ldo, CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit

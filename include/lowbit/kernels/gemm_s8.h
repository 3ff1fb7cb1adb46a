// int8 x int8 GEMM with int32 accumulation and a fused dequantizing epilogue.
//
//   out[i, j] = to_otype( float(acc[i, j]) * alpha ),   acc[i, j] = sum_k A[i, k] * B[j, k]   (exact int32)
//
// * A: (M, K) int8, row-major, row stride lda (activations). B: (N, K) int8, row-major, row stride ldb
//   (weights in nn.Linear layout: each output feature is a row). out: (M, N), row stride ldo, dtype otype.
// * alpha points to ONE fp32 (e.g. s_a * s_w), on the device of the data: no host sync on CUDA. Any value
//   is accepted: an inf / NaN alpha gives the IEEE products (inf, NaN) on both devices.
// * float(acc) is round-to-nearest-even int32 -> fp32, the multiply is one fp32 multiply, and the final
//   conversion to fp16/bf16 is round-to-nearest-even: bitwise the same on CPU and CUDA.
// * Every M, N, K >= 1 is valid (tails handled); K <= kMaxGemmS8K so that int32 cannot overflow.
// * Deterministic: each output is reduced by one thread in a fixed order (no split-K, no atomics).
// * Per-row scale form (gemm_s8_scaled_rows): row_scale points to M fp32 values on the data's device and
//   row i's multiplier becomes alpha_i = alpha * row_scale[i] (one fp32 multiply, formed once per row),
//   i.e. out[i, j] = to_otype(float(acc[i, j]) * alpha_i): the epilogue of a GEMM whose A was quantized
//   per row (SwitchBack's int8 input gradient). Any value is accepted (IEEE results; a NaN row_scale or
//   alpha gives NaN outputs on both devices, whose NaN bit pattern may differ: the GPU's multiply returns
//   the canonical NaN). row_scale == nullptr is exactly gemm_s8_scaled.
//
// Batched form (gemm_s8_scaled_batched): `batch` independent GEMMs of the same M, N, K, strides, alpha and
// otype. Batch b reads A + b*strideA and B + b*strideB and writes out + b*strideO; strideA / strideB are
// in int8 elements (bytes), strideO in elements of otype. Each batch is exactly gemm_s8_scaled on those
// pointers (same rounding, bitwise the same result, on CPU and CUDA alike).
// * batch >= 0 (0: nothing to do). Strides >= 0. A stride of 0 broadcasts that operand to every batch
//   (e.g. one B for all); strideO == 0 is allowed only when batch == 1 (or the output is empty).
// * Outputs of different batches must not overlap (only the trivial strideO == 0 case is diagnosed;
//   interleaved layouts such as out (M, batch, N) with ldo = batch*N, strideO = N are fine).
// * (batch - 1) * stride must fit in int64 for each operand.
//
// int4-weight form (gemm_s8s4_scaled): B's codes arrive as int4 pairs (pack_int4.h: Bp is (N, ceil(K/2))
// bytes, row stride ldbp >= ceil(K/2), the first code of each byte in the high nibble; with odd K the low
// nibble of a row's last byte is padding and is ignored, whatever it holds). Exactly gemm_s8_scaled on
// unpack_s4(Bp): bitwise the same outputs, CPU and CUDA alike.
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

// Per-row scale form (see the top of this file), fast path and scalar reference.
Status gemm_s8_scaled_rows(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                           int64_t K, const float* alpha, const float* row_scale, DType otype, void* out,
                           int64_t ldo);
Status gemm_s8_scaled_rows_ref(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                               int64_t K, const float* alpha, const float* row_scale, DType otype, void* out,
                               int64_t ldo);

// Batched (see the top of this file). Small per-batch problems run one batch per thread (OpenMP over
// the batch); larger ones run one after the other, each on all threads. Bitwise equal, batch by batch,
// to gemm_s8_scaled_ref.
Status gemm_s8_scaled_batched(const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B, int64_t ldb,
                              int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch, const float* alpha,
                              DType otype, void* out, int64_t ldo, int64_t strideO);

// Scalar reference of the batched form: gemm_s8_scaled_ref batch by batch (single thread).
Status gemm_s8_scaled_batched_ref(const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B, int64_t ldb,
                                  int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch,
                                  const float* alpha, DType otype, void* out, int64_t ldo, int64_t strideO);

// Plain int32 result (C = A * B^T), scalar reference, for tests of the integer part.
Status gemm_s8s8s32_ref(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                        int64_t K, int32_t* C, int64_t ldc);

// int4-weight form (see the top of this file): unpacks Bp into a temporary and runs gemm_s8_scaled.
Status gemm_s8s4_scaled(const int8_t* A, int64_t lda, const int8_t* Bp, int64_t ldbp, int64_t M, int64_t N,
                        int64_t K, const float* alpha, DType otype, void* out, int64_t ldo);

// Name of the instruction set the fast path uses on this CPU ("avx512_vnni", "avx512bw", "avx2", "scalar").
const char* gemm_s8_isa();

}  // namespace cpu

namespace cuda {

// Tensor-core GEMM; device pointers; runs on `stream`; allocates nothing. On a compute capability 9.0
// device (sm_90a build) calls whose A and B bases and row / batch strides are multiples of 16 bytes run on
// the wgmma + TMA kernel, all others on the mma.sync kernel; both give bitwise the same outputs.
// LOWBIT_GEMM_S8_KERNEL=mma | wgmma | auto (default) forces the choice (wgmma where it cannot run: an error).
Status gemm_s8_scaled(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                      int64_t K, const float* alpha, DType otype, void* out, int64_t ldo, CUstream_st* stream);

// Per-row scale form (see the top of this file); row_scale is a device pointer (M fp32 values).
Status gemm_s8_scaled_rows(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                           int64_t K, const float* alpha, const float* row_scale, DType otype, void* out,
                           int64_t ldo, CUstream_st* stream);

// Batched (see the top of this file): all batches in one kernel launch (several only past 65535
// batches, the grid's z limit); gemm_s8_scaled is its batch == 1 case. Allocates nothing.
Status gemm_s8_scaled_batched(const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B, int64_t ldb,
                              int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch, const float* alpha,
                              DType otype, void* out, int64_t ldo, int64_t strideO, CUstream_st* stream);

// int4-weight form (see the top of this file) on the sm_90a kernel that unpacks the int4 pairs in
// registers: the weights are wgmma's register operand (no int8 copy of B in memory). Runs only where
// gemm_s8s4_fused_supported holds (else kInvalidArgument, nothing launched); callers then unpack
// (unpack_s4) and call gemm_s8_scaled, which gives the same bits. Allocates nothing.
Status gemm_s8s4_scaled(const int8_t* A, int64_t lda, const int8_t* Bp, int64_t ldbp, int64_t M, int64_t N,
                        int64_t K, const float* alpha, DType otype, void* out, int64_t ldo, CUstream_st* stream);

// Up to this many rows (M) the int4-weight kernel is the faster way; beyond, unpack_s4 + gemm_s8_scaled
// (H100, N = K = 8192: M = 16 24 vs 93 us, M = 2048 210-216 vs 216-228 us, M = 8192 800-820 vs 700-714
// us; the register-sourced wgmma runs below the int8 kernel's rate, which the unpack pass's bytes
// outweigh only up to about this many rows).
constexpr int64_t kGemmS8S4FusedMaxRows = 2048;

// The current device can run gemm_s8s4_scaled on these operands: compute capability 9.0 with the sm_90a
// kernel loaded, 1 <= K <= kMaxGemmS8K, M and N below 2^31, A and Bp 16-byte aligned with lda and ldbp
// multiples of 16 (TMA's rules). Cheap (device facts cached). LOWBIT_GEMM_S8_KERNEL=mma makes it false.
bool gemm_s8s4_fused_supported(const int8_t* A, int64_t lda, const int8_t* Bp, int64_t ldbp, int64_t M, int64_t N,
                               int64_t K);

}  // namespace cuda
}  // namespace lowbit

// Internal to the int8 GEMMs (gemm_s8.cu, gemm_s8_sm90.cu, qmatmul.cu): the epilogue's conversions, shared so
// that every kernel rounds exactly alike, the mma.sync / ldmatrix wrappers and the lane-quad transpose of
// the 16-byte row stores, and the Hopper kernel's host entry.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit/kernels/common.h"

namespace lowbit {
namespace cuda {
namespace gemm_s8_detail {

// acc -> fp32 (round to nearest even), then one fp32 multiply by alpha (__fmul_rn: never fused).
__device__ __forceinline__ float dequant(int32_t acc, float alpha) {
  return __fmul_rn(__int2float_rn(acc), alpha);
}
// dequant for |acc| <= 2^22 (short reductions: K * 128 * 128 <= 2^22 for K <= 256), without the int -> float
// conversion instruction (quarter rate): acc + 0x4B400000 read as a float is 1.5 * 2^23 + acc exactly
// (floats in [2^23, 2^24] are spaced 1 apart), and subtracting 1.5 * 2^23 is exact. Same bits as dequant.
__device__ __forceinline__ float dequant_small(int32_t acc, float alpha) {
  return __fmul_rn(__fsub_rn(__int_as_float(acc + 0x4B400000), 12582912.0f), alpha);
}
// Row i's multiplier: alpha, or alpha * row_scale[i] (one fp32 multiply, as the CPU forms it).
__device__ __forceinline__ float row_alpha(float alpha, const float* __restrict__ row_scale, int64_t row) {
  return row_scale ? __fmul_rn(alpha, __ldg(row_scale + row)) : alpha;
}
// fp32 -> output type, round to nearest even. Pairs of adjacent columns go out as one 4- or 8-byte store.
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store2(float* p, float v0, float v1) {
  *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
}
// Two 16-bit outputs as one word, v0 in the low half (the lower address).
__device__ __forceinline__ uint32_t pack2(__half*, float v0, float v1) {
  return uint32_t(__half_as_ushort(__float2half_rn(v0))) | (uint32_t(__half_as_ushort(__float2half_rn(v1))) << 16);
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16*, float v0, float v1) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(v0))) |
         (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(v1))) << 16);
}
__device__ __forceinline__ void store2(__half* p, float v0, float v1) {
  *reinterpret_cast<uint32_t*>(p) = pack2(p, v0, v1);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float v0, float v1) {
  *reinterpret_cast<uint32_t*>(p) = pack2(p, v0, v1);
}

// mma.sync m16n8k32 s8 and its ldmatrix operand loads (fragment layouts: gemm_s8.cu). Both clobber
// "memory" where they touch shared memory, so the compiler keeps them ordered with plain shared stores.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One 32-wide k-step of a warp's kFM x kFN block of m16n8k32 tiles: the A fragment of tile row i by one
// ldmatrix.x4 at a_addr + i * a_step, the B fragments of tile columns 2p, 2p + 1 by one at
// b_addr + p * b_step (its 4 matrices: {b0, b1} of column 2p, then of 2p + 1), then the kFM * kFN mma.
template <int kFM, int kFN>
__device__ __forceinline__ void mma_block_s8(int32_t (&acc)[kFM][kFN][4], uint32_t a_addr, uint32_t a_step,
                                             uint32_t b_addr, uint32_t b_step) {
  static_assert(kFN % 2 == 0, "B fragments come in pairs of 8-column tiles");
  uint32_t af[kFM][4], bf[kFN][2];
#pragma unroll
  for (int i = 0; i < kFM; ++i) ldmatrix_x4(af[i], a_addr + uint32_t(i) * a_step);
#pragma unroll
  for (int p = 0; p < kFN / 2; ++p) {
    uint32_t r[4];
    ldmatrix_x4(r, b_addr + uint32_t(p) * b_step);
    bf[2 * p][0] = r[0];
    bf[2 * p][1] = r[1];
    bf[2 * p + 1][0] = r[2];
    bf[2 * p + 1][1] = r[3];
  }
#pragma unroll
  for (int i = 0; i < kFM; ++i)
#pragma unroll
    for (int j = 0; j < kFN; ++j) mma_s8(acc[i][j], af[i], bf[j]);
}

// x[r] of quad lane t (t = lane % 4) -> x[r] = (the old x[t] of lane r): a 4 x 4 transpose across the
// 4 lanes of a quad, as two butterfly stages (lane bit 0 <-> register bit 0, then lane bit 1 <-> register
// bit 1), each one exchange of two words with the partner lane and selects on the lane's own bit (no
// dynamic register indexing). All 32 lanes must call it.
__device__ __forceinline__ void quad_transpose(uint32_t (&x)[4], int t) {
  const bool t0 = (t & 1) != 0, t1 = (t & 2) != 0;
#pragma unroll
  for (int r1 = 0; r1 < 2; ++r1) {  // partner t ^ 1 needs my register (r1, 1 - t0), I need its (r1, t0)
    const uint32_t recv = __shfl_xor_sync(0xffffffffu, t0 ? x[2 * r1] : x[2 * r1 + 1], 1);
    if (t0) x[2 * r1] = recv;
    else x[2 * r1 + 1] = recv;
  }
#pragma unroll
  for (int r0 = 0; r0 < 2; ++r0) {  // partner t ^ 2: my register (1 - t1, r0) for its (t1, r0)
    const uint32_t recv = __shfl_xor_sync(0xffffffffu, t1 ? x[r0] : x[2 + r0], 2);
    if (t1) x[r0] = recv;
    else x[2 + r0] = recv;
  }
}

// Eight 16-bit outputs of one row, columns col .. col + 7, as 4 packed words (x[0]'s low half is column
// col; the layout quad_transpose leaves): one 16-byte store when vec_ok (row base 16-byte aligned) and all
// eight are inside N, else the in-range ones one by one. kStreaming: the 16-byte store carries the
// evict-first hint (st.global.cs) for outputs no later kernel of the call reads back.
template <bool kStreaming = false>
__device__ __forceinline__ void store8_16(uint16_t* out_row, int64_t col, int64_t N, bool vec_ok,
                                          const uint32_t (&x)[4]) {
  if (vec_ok && col + 7 < N) {
    if constexpr (kStreaming)
      __stcs(reinterpret_cast<uint4*>(out_row + col), make_uint4(x[0], x[1], x[2], x[3]));
    else
      *reinterpret_cast<uint4*>(out_row + col) = make_uint4(x[0], x[1], x[2], x[3]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (col + e < N) out_row[col + e] = static_cast<uint16_t>(x[e / 2] >> (16 * (e % 2)));
  }
}

// One validated GEMM call as both kernels see it; `fn` is the public name it arrived through (for
// messages, without the ": ").
struct GemmCall {
  const char* fn;
  const int8_t* A;
  int64_t lda, strideA;
  const int8_t* B;
  int64_t ldb, strideB;
  int64_t M, N, K, batch;
  const float* alpha;
  void* out;
  int64_t ldo, strideO;
  DType otype;
  cudaStream_t stream;
  const float* row_scale;  // M per-row multipliers (unbatched calls only) or nullptr
};

// The sm_90a wgmma + TMA kernel can take this call: the current device is compute capability 9.0, this
// build carries sm_90a code for the kernel, K >= 1, and both operands meet TMA's rules (base and row
// stride multiples of 16 bytes; batch stride too, or 0 to broadcast). Cheap: the device facts are
// cached per device.
bool sm90_eligible(const GemmCall& g);

// Runs the call on the sm_90a kernel (sm90_eligible must hold).
Status launch_sm90(const GemmCall& g);

// Few activation rows (one batch, no row scales; M <= 64, or M <= kFewRowsMax while launch_sm90 would run
// fewer tiles than SMs): the register-weight kernel of gemm_s8s4 on int8 weights, whose 64-row weight tiles
// (and, with 16- or 64-row activation tiles, in-CTA k-split) fill the SMs that the 128 x 256 tiles of
// launch_sm90 leave idle (N / 256 CTAs per 128 rows). Same bits. launch_sm90_few_rows needs few_rows_eligible.
constexpr int64_t kFewRowsMax = 256;
bool few_rows_eligible(const GemmCall& g);
Status launch_sm90_few_rows(const GemmCall& g);

}  // namespace gemm_s8_detail
}  // namespace cuda
}  // namespace lowbit

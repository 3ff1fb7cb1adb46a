// Internal to the int8 GEMM (gemm_s8.cu, gemm_s8_sm90.cu): the epilogue's conversions, shared so that
// both kernels round exactly alike, and the Hopper kernel's host entry.
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

}  // namespace gemm_s8_detail
}  // namespace cuda
}  // namespace lowbit

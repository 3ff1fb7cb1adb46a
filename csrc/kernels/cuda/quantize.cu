// Fused shift + per-tensor symmetric quantization to int8 codes, on CUDA.
//
//   q[i, k] = clamp( rne( (float(x[i, k]) + shift[k]) / scale ), qmin, qmax ),   NaN -> 0
//
// The operation is purely memory-bound (a few flops per element against 2-4 bytes read and 1 written),
// so the kernel is shaped only by memory traffic:
//   * Vector path: each thread handles 8 consecutive elements of one row per step: one 16-byte load
//     (fp16/bf16) or two (fp32), 8-byte code store, shift read as two 16-byte loads (it is K floats,
//     L1/L2-resident). Taken when every access it makes is naturally aligned: K % 8 == 0, the row stride
//     in bytes a multiple of 16, x 16-byte, q 8-byte and shift 16-byte aligned.
//   * Scalar path: one element per thread per step, for every other shape. Still coalesced (consecutive
//     threads take consecutive elements), just more instructions per byte.
//   Both are grid-stride loops over int64 indices, with a grid of a few waves of the machine, so any
//   M * K fits and no launch dimension can overflow.
//
// Bitwise agreement with the CPU reference rests on doing the same fp32 operations in the same order:
// exact widening of x to fp32, one fp32 add (__fadd_rn), one IEEE-correct fp32 division (__fdiv_rn;
// the file refuses to build with --use_fast_math, whose flush-to-zero would change codes), then
// round-half-even to an integer (cvt.rni, which also saturates at the int32 range) and an integer clamp.
// Denormals are kept (default -ftz=false), as on the CPU.
//
// Resources observed (nvcc 13.0, -O3, sm_80 .. sm_90a): vector kernel 31-33 registers, scalar kernel 18,
// no stack, no spills. SASS: LDG.E.128 (x, shift) and STG.E.64 (codes) on the vector path; each division
// is MUFU.RCP + FFMA refinement with FCHK guarding a call to the exact slow path (inf, NaN, subnormals).
#include "lowbit/kernels/quantize.h"

#ifdef __USE_FAST_MATH__
#error "quantize.cu must not be built with --use_fast_math: it flushes subnormals and breaks bitwise CPU parity"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../validate.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps: enough memory parallelism per block, many blocks per SM
constexpr int kVec = 8;        // elements per thread-step on the vector path (16 bytes of fp16/bf16)

// Raw storage unit of each input dtype, and its exact widening to fp32.
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// One code from one fp32 input. Division, not a reciprocal multiply: the contract fixes the rounding.
// __fdiv_rn is the IEEE round-to-nearest quotient whatever -prec-div says.
__device__ __forceinline__ int8_t quantize_one(float t, float s, int qmin, int qmax) {
  const float v = __fdiv_rn(t, s);
  if (v != v) return 0;          // NaN (from a NaN input or shift): code 0 by contract
  int r = __float2int_rn(v);     // round half to even; +-inf and huge values saturate to INT_MIN/MAX
  r = min(max(r, qmin), qmax);
  return static_cast<int8_t>(r);
}

// Eight consecutive elements of row i starting at column k (k % 8 == 0), widened to fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    const float4 lo = __ldg(reinterpret_cast<const float4*>(p));
    const float4 hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
    f[0] = lo.x; f[1] = lo.y; f[2] = lo.z; f[3] = lo.w;
    f[4] = hi.x; f[5] = hi.y; f[6] = hi.z; f[7] = hi.w;
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      T lo, hi;
      const unsigned short lo_bits = static_cast<unsigned short>(w[j] & 0xffffu);
      const unsigned short hi_bits = static_cast<unsigned short>(w[j] >> 16);
      if constexpr (std::is_same_v<T, __half>) {
        lo = __ushort_as_half(lo_bits);
        hi = __ushort_as_half(hi_bits);
      } else {
        lo = __ushort_as_bfloat16(lo_bits);
        hi = __ushort_as_bfloat16(hi_bits);
      }
      f[2 * j] = widen(lo);
      f[2 * j + 1] = widen(hi);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_vec_kernel(
    const T* __restrict__ x,          // (M, K), row stride ldx elements; 16-byte aligned rows
    int64_t M,                        // rows
    int64_t K,                        // columns, a multiple of kVec
    int64_t ldx,                      // row stride of x in elements
    const float* __restrict__ shift,  // (K,) 16-byte aligned, or nullptr
    const float* __restrict__ scale,  // one fp32 on the device
    int qmin, int qmax,               // clamp range of the codes
    int8_t* __restrict__ q) {         // (M, K) contiguous, 8-byte aligned
  const float s = __ldg(scale);
  const int64_t vecs_per_row = K / kVec;
  const int64_t total = M * vecs_per_row;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < total; v += stride) {
    const int64_t i = v / vecs_per_row;
    const int64_t k = (v - i * vecs_per_row) * kVec;
    float f[kVec];
    load8(x + i * ldx + k, f);
    if (shift != nullptr) {
      const float4 s0 = __ldg(reinterpret_cast<const float4*>(shift + k));
      const float4 s1 = __ldg(reinterpret_cast<const float4*>(shift + k) + 1);
      const float sv[kVec] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = __fadd_rn(f[j], sv[j]);
    }
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const uint32_t code = static_cast<uint8_t>(quantize_one(f[j], s, qmin, qmax));
      packed[j / 4] |= code << (8 * (j % 4));
    }
    *reinterpret_cast<uint2*>(q + i * K + k) = make_uint2(packed[0], packed[1]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_scalar_kernel(
    const T* __restrict__ x,          // (M, K), row stride ldx elements; any alignment of T
    int64_t M,                        // rows
    int64_t K,                        // columns
    int64_t ldx,                      // row stride of x in elements
    const float* __restrict__ shift,  // (K,) or nullptr
    const float* __restrict__ scale,  // one fp32 on the device
    int qmin, int qmax,               // clamp range of the codes
    int8_t* __restrict__ q) {         // (M, K) contiguous
  const float s = __ldg(scale);
  const int64_t total = M * K;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / K;
    const int64_t k = e - i * K;
    float t = widen(x[i * ldx + k]);
    if (shift != nullptr) t = __fadd_rn(t, __ldg(shift + k));
    q[e] = quantize_one(t, s, qmin, qmax);
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks for `work` thread-steps: enough to cover it, capped at a few waves (the loops are grid-stride).
Status grid_for(int64_t work, int* blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return Status::device(std::string("quantize_s8: ") + cudaGetErrorString(err));
  const int64_t needed = (work + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sms > 0 ? sms : 1) * (2048 / kThreads) * 4;
  *blocks = static_cast<int>(needed < cap ? needed : cap);
  return Status::ok();
}

template <typename T>
Status launch(const void* x_raw, int64_t M, int64_t K, int64_t ldx, const float* shift, const float* scale,
              int32_t qmin, int32_t qmax, int8_t* q, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_raw);
  const bool vec = K % kVec == 0 && (ldx * int64_t(sizeof(T))) % 16 == 0 && aligned(x, 16) && aligned(q, 8) &&
                   (shift == nullptr || aligned(shift, 16));
  const int64_t work = vec ? M * (K / kVec) : M * K;
  int blocks = 0;
  Status st = grid_for(work, &blocks);
  if (!st.is_ok()) return st;
  if (vec) {
    quantize_vec_kernel<T><<<blocks, kThreads, 0, stream>>>(x, M, K, ldx, shift, scale, qmin, qmax, q);
  } else {
    quantize_scalar_kernel<T><<<blocks, kThreads, 0, stream>>>(x, M, K, ldx, shift, scale, qmin, qmax, q);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(std::string("quantize_s8: kernel launch failed: ") + cudaGetErrorString(err));
  return Status::ok();
}

__global__ void qat_alpha_kernel(const float* scale1, const float* scale2, const float* eps, float* alpha) {
  alpha[0] = qat_alpha_value(scale1[0], scale2[0], eps[0]);
}

}  // namespace

Status qat_alpha(const float* scale1, const float* scale2, const float* eps, float* alpha, CUstream_st* stream) {
  if (scale1 == nullptr || scale2 == nullptr || eps == nullptr || alpha == nullptr)
    return Status::invalid("lowbit::cuda::qat_alpha: scale1, scale2, eps and alpha must not be null");
  qat_alpha_kernel<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(scale1, scale2, eps, alpha);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(std::string("qat_alpha: kernel launch failed: ") + cudaGetErrorString(err));
  return Status::ok();
}

Status quantize_s8(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                   const float* scale, int32_t qmin, int32_t qmax, int8_t* q, CUstream_st* stream) {
  const char* fn = "lowbit::cuda::quantize_s8";
  const Status st = validate::quantize_s8(fn, xtype, x, M, K, ldx, scale, qmin, qmax, q);
  if (!st.is_ok() || M == 0 || K == 0) return st;  // invalid, or nothing to read or write
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (xtype) {
    case DType::kFloat32: return launch<float>(x, M, K, ldx, shift, scale, qmin, qmax, q, s);
    case DType::kFloat16: return launch<__half>(x, M, K, ldx, shift, scale, qmin, qmax, q, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(x, M, K, ldx, shift, scale, qmin, qmax, q, s);
  }
  return Status::invalid(validate::err(fn, "unreachable dtype"));
}

}  // namespace cuda
}  // namespace lowbit

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
// The division is __fdiv_rn's own fast path with the step's reciprocal hoisted (StepDiv): three FFMA per
// element, bit-identical to __fdiv_rn; steps outside [2^-30, 2^30] use __fdiv_rn itself.
// SASS: LDG.E.128 (x, shift) and STG.E.64 (codes) on the vector path.
#include "lowbit/kernels/quantize.h"

#ifdef __USE_FAST_MATH__
#error "quantize.cu must not be built with --use_fast_math: it flushes subnormals and breaks bitwise CPU parity"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../validate.h"
#include "quantize_internal.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps: enough memory parallelism per block, many blocks per SM
using quantize_detail::code_of;
using quantize_detail::kVec;
using quantize_detail::load8;
using quantize_detail::step_of;
using quantize_detail::StepDiv;
using quantize_detail::load_as_float;
using quantize_detail::widen;

// The scalars of one quantizer launch, and what it writes of qat_prepare's output (qat_quantize).
struct LaunchScalars {
  ScalarArg scale, eps;  // the step: qat_step(scale, eps), or scale itself when eps.p is null
  ScalarArg shift;       // the shift (for `prepared`; the loops read it through a typed pointer)
  ScalarArg scale2;      // the other step, for alpha
  float* prepared;       // null: none; else qat_prepare's [shift (n) | scale, scale2, eps, alpha, steps]
  int64_t n;             // shift values in `prepared`
};

__device__ __forceinline__ float step_value(const LaunchScalars& sc) {
  const float s = load_as_float(sc.scale, 0);
  return sc.eps.p != nullptr ? lowbit::qat_step(s, load_as_float(sc.eps, 0)) : s;
}

// qat_prepare's output, by every thread of the grid (a grid-stride loop over the shift; the first thread
// of the grid the three scalars and alpha). Shared by qat_prepare_kernel and the fused quantizers.
__device__ __forceinline__ void write_prepared(const LaunchScalars& sc) {
  if (sc.prepared == nullptr) return;
  const int64_t t0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = t0; i < sc.n; i += int64_t(gridDim.x) * blockDim.x) sc.prepared[i] = load_as_float(sc.shift, i);
  if (t0 == 0) {
    const float s1 = load_as_float(sc.scale, 0), s2 = load_as_float(sc.scale2, 0), e = load_as_float(sc.eps, 0);
    sc.prepared[sc.n] = s1;
    sc.prepared[sc.n + 1] = s2;
    sc.prepared[sc.n + 2] = e;
    sc.prepared[sc.n + 3] = qat_alpha_value(s1, s2, e);
    sc.prepared[sc.n + 4] = qat_step(s1, e);
    sc.prepared[sc.n + 5] = qat_step(s2, e);
  }
}

// S: the shift's dtype (fp32, fp16 or bf16; read as it is, widened exactly).
template <typename T, typename S, bool kFast>
__device__ __forceinline__ void quantize_vec_loop(const T* __restrict__ x, int64_t M, int64_t K, int64_t ldx,
                                                  const S* __restrict__ shift, const StepDiv& div, int qmin,
                                                  int qmax, int8_t* __restrict__ q) {
  const int64_t vecs_per_row = K / kVec;
  const int64_t total = M * vecs_per_row;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t v0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v0 >= total) return;
  // (row, vector) of v, divided out once and then carried along by the fixed stride.
  int64_t i = v0 / vecs_per_row, c = v0 - i * vecs_per_row;
  const int64_t di = stride / vecs_per_row, dc = stride - di * vecs_per_row;
  for (int64_t v = v0; v < total; v += stride, i += di, c += dc) {
    if (c >= vecs_per_row) {
      c -= vecs_per_row;
      ++i;
    }
    const int64_t k = c * kVec;
    float f[kVec];
    load8(x + i * ldx + k, f);
    if (shift != nullptr) {
      float sv[kVec];
      load8(shift + k, sv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = __fadd_rn(f[j], sv[j]);
    }
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const uint32_t code = static_cast<uint8_t>(code_of(div.apply<kFast>(f[j]), qmin, qmax));
      packed[j / 4] |= code << (8 * (j % 4));
    }
    *reinterpret_cast<uint2*>(q + i * K + k) = make_uint2(packed[0], packed[1]);
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) quantize_vec_kernel(
    const T* __restrict__ x,      // (M, K), row stride ldx elements; 16-byte aligned rows
    int64_t M,                    // rows
    int64_t K,                    // columns, a multiple of kVec
    int64_t ldx,                  // row stride of x in elements
    const S* __restrict__ shift,  // (K,) 16-byte aligned, or nullptr
    LaunchScalars sc,             // the step; qat_prepare's output when sc.prepared is set
    int qmin, int qmax,           // clamp range of the codes
    int8_t* __restrict__ q) {     // (M, K) contiguous, 8-byte aligned
  write_prepared(sc);
  const StepDiv div(step_value(sc));
  if (div.fast)
    quantize_vec_loop<T, S, true>(x, M, K, ldx, shift, div, qmin, qmax, q);
  else
    quantize_vec_loop<T, S, false>(x, M, K, ldx, shift, div, qmin, qmax, q);
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) quantize_scalar_kernel(
    const T* __restrict__ x,      // (M, K), row stride ldx elements; any alignment of T
    int64_t M,                    // rows
    int64_t K,                    // columns
    int64_t ldx,                  // row stride of x in elements
    const S* __restrict__ shift,  // (K,) or nullptr
    LaunchScalars sc,             // the step; qat_prepare's output when sc.prepared is set
    int qmin, int qmax,           // clamp range of the codes
    int8_t* __restrict__ q) {     // (M, K) contiguous
  write_prepared(sc);
  const StepDiv div(step_value(sc));
  const int64_t total = M * K;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / K;
    const int64_t k = e - i * K;
    float t = widen(x[i * ldx + k]);
    if (shift != nullptr) t = __fadd_rn(t, widen(shift[k]));
    q[e] = code_of(div(t), qmin, qmax);
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

template <typename T, typename S>
Status launch(const void* x_raw, int64_t M, int64_t K, int64_t ldx, const LaunchScalars& sc, int32_t qmin,
              int32_t qmax, int8_t* q, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_raw);
  const S* shift = static_cast<const S*>(sc.shift.p);
  const bool vec = K % kVec == 0 && (ldx * int64_t(sizeof(T))) % 16 == 0 && aligned(x, 16) && aligned(q, 8) &&
                   (shift == nullptr || aligned(shift, 16));
  const int64_t work = vec ? M * (K / kVec) : M * K;
  int blocks = 0;
  Status st = grid_for(work, &blocks);
  if (!st.is_ok()) return st;
  if (vec) {
    quantize_vec_kernel<T, S><<<blocks, kThreads, 0, stream>>>(x, M, K, ldx, shift, sc, qmin, qmax, q);
  } else {
    quantize_scalar_kernel<T, S><<<blocks, kThreads, 0, stream>>>(x, M, K, ldx, shift, sc, qmin, qmax, q);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(std::string("quantize_s8: kernel launch failed: ") + cudaGetErrorString(err));
  return Status::ok();
}

// x's dtype T, then the shift's (fp32 when there is none).
template <typename T>
Status launch_shift(const void* x, int64_t M, int64_t K, int64_t ldx, const LaunchScalars& sc, int32_t qmin,
                    int32_t qmax, int8_t* q, cudaStream_t stream) {
  switch (sc.shift.p != nullptr ? sc.shift.dtype : DType::kFloat32) {
    case DType::kFloat16: return launch<T, __half>(x, M, K, ldx, sc, qmin, qmax, q, stream);
    case DType::kBFloat16: return launch<T, __nv_bfloat16>(x, M, K, ldx, sc, qmin, qmax, q, stream);
    default: return launch<T, float>(x, M, K, ldx, sc, qmin, qmax, q, stream);
  }
}
Status launch_any(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const LaunchScalars& sc,
                  int32_t qmin, int32_t qmax, int8_t* q, cudaStream_t stream) {
  switch (xtype) {
    case DType::kFloat16: return launch_shift<__half>(x, M, K, ldx, sc, qmin, qmax, q, stream);
    case DType::kBFloat16: return launch_shift<__nv_bfloat16>(x, M, K, ldx, sc, qmin, qmax, q, stream);
    default: return launch_shift<float>(x, M, K, ldx, sc, qmin, qmax, q, stream);
  }
}

__global__ void qat_alpha_kernel(const float* scale1, const float* scale2, const float* eps, float* alpha) {
  alpha[0] = qat_alpha_value(scale1[0], scale2[0], eps[0]);
}

// qat_prepare alone: the quantizers' write_prepared over a grid sized for the shift.
__global__ void qat_prepare_kernel(LaunchScalars sc) { write_prepared(sc); }

}  // namespace

Status qat_alpha(const float* scale1, const float* scale2, const float* eps, float* alpha, CUstream_st* stream) {
  if (scale1 == nullptr || scale2 == nullptr || eps == nullptr || alpha == nullptr)
    return Status::invalid("lowbit::cuda::qat_alpha: scale1, scale2, eps and alpha must not be null");
  qat_alpha_kernel<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(scale1, scale2, eps, alpha);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(std::string("qat_alpha: kernel launch failed: ") + cudaGetErrorString(err));
  return Status::ok();
}

Status qat_prepare(ScalarArg shift, int64_t n, ScalarArg scale1, ScalarArg scale2, ScalarArg eps, float* out,
                   CUstream_st* stream) {
  const char* fn = "lowbit::cuda::qat_prepare";
  const Status st = validate::qat_prepare(fn, shift, n, scale1, scale2, eps, out);
  if (!st.is_ok()) return st;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 1024);
  qat_prepare_kernel<<<static_cast<unsigned>(blocks < 1 ? 1 : blocks), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      LaunchScalars{scale1, eps, shift, scale2, out, n});
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(validate::err(fn, std::string("kernel launch failed: ") + cudaGetErrorString(err)));
  return Status::ok();
}

Status quantize_s8(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, const float* shift,
                   const float* scale, int32_t qmin, int32_t qmax, int8_t* q, CUstream_st* stream,
                   const float* eps) {
  const char* fn = "lowbit::cuda::quantize_s8";
  const Status st = validate::quantize_s8(fn, xtype, x, M, K, ldx, scale, qmin, qmax, q);
  if (!st.is_ok() || M == 0 || K == 0) return st;  // invalid, or nothing to read or write
  const LaunchScalars sc{{scale, DType::kFloat32}, {eps, DType::kFloat32}, {shift, DType::kFloat32},
                         {nullptr, DType::kFloat32}, nullptr, 0};
  return launch_any(xtype, x, M, K, ldx, sc, qmin, qmax, q, reinterpret_cast<cudaStream_t>(stream));
}

Status qat_quantize(DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx, ScalarArg shift, ScalarArg scale1,
                    ScalarArg scale2, ScalarArg eps, int32_t qmin, int32_t qmax, int8_t* q, float* prepared,
                    CUstream_st* stream) {
  const char* fn = "lowbit::cuda::qat_quantize";
  const int64_t n = shift.p != nullptr ? K : 0;
  Status st = validate::qat_prepare(fn, shift, n, scale1, scale2, eps, prepared);
  if (st.is_ok()) st = validate::quantize_s8(fn, xtype, x, M, K, ldx, static_cast<const float*>(scale1.p), qmin, qmax, q);
  if (!st.is_ok()) return st;
  const LaunchScalars sc{scale1, eps, shift, scale2, prepared, n};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (M == 0 || K == 0) {  // no codes to make: qat_prepare's output alone
    qat_prepare_kernel<<<1, 256, 0, s>>>(sc);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? Status::ok()
                              : Status::device(validate::err(fn, std::string("kernel launch failed: ") + cudaGetErrorString(err)));
  }
  return launch_any(xtype, x, M, K, ldx, sc, qmin, qmax, q, s);
}

}  // namespace cuda
}  // namespace lowbit

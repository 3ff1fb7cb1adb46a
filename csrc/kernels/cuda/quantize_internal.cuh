// Internal to the CUDA quantizers (quantize.cu, qmatmul.cu): the per-element arithmetic of quantize_s8,
// written once so that every kernel that makes codes rounds exactly as the CPU reference does.
//
//   code = clamp( rne( float(x) [+ shift] / step ), qmin, qmax ),   NaN -> 0
//
// All fp32, in this order: exact widening of x, one fp32 add (__fadd_rn), one IEEE-correct division
// (StepDiv: __fdiv_rn's own fast path with the step's reciprocal hoisted), round-half-even to an integer
// (cvt.rni, saturating at the int32 range), an integer clamp. Files that include this must not be built
// with --use_fast_math (flush-to-zero would change codes); they say so with an #error of their own.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "lowbit/kernels/quantize.h"

namespace lowbit {
namespace cuda {
namespace quantize_detail {

constexpr int kVec = 8;  // elements per vector step (16 bytes of fp16/bf16, 32 of fp32)

// Exact widening of each input dtype to fp32.
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// Element i of an operand in its own dtype, widened exactly.
__device__ __forceinline__ float load_as_float(ScalarArg a, int64_t i) {
  switch (a.dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(a.p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(a.p)[i]);
    default: return static_cast<const float*>(a.p)[i];
  }
}

// t / s rounded as IEEE division (__fdiv_rn) rounds it, for one step s shared by every element. __fdiv_rn
// compiles (sm_80 .. sm_90a) to a fast path -- y = MUFU.RCP(s) refined once, q0 = t * y, q1 = q0 + (t - s
// q0) y, all FFMA -- and FCHK, which sends inputs near the exponent limits to an exact slow routine. With
// s in [2^-30, 2^30] (checked once; otherwise every element takes __fdiv_rn) this computes the same fast
// path with y hoisted out of the loop: the same instructions on the same operands, hence the same bits,
// wherever FCHK cannot fire -- every t whose code can be nonzero (|t / s| >= 1/2, so |t| >= 2^-31 and
// all intermediates are normal and far from overflow). Where |q0| >= 2^40 (huge t, +-inf, NaN: the code
// saturates or is 0 either way) q0 is returned; tiny t give tiny quotients (code 0) on both paths. The
// MUFU and FCHK per element were what kept the quantizer below memory speed.
struct StepDiv {
  float s, y;
  bool fast;
  __device__ explicit StepDiv(float step) : s(step) {
    fast = fabsf(step) >= 0x1p-30f && fabsf(step) <= 0x1p30f;  // false for NaN
    float y0;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y0) : "f"(step));
    y = __fmaf_rn(y0, __fmaf_rn(-step, y0, 1.0f), y0);
  }
  // kFast: the caller has branched on `fast` once (outside its loop).
  template <bool kFast>
  __device__ __forceinline__ float apply(float t) const {
    if (!kFast) return __fdiv_rn(t, s);
    const float q0 = __fmaf_rn(t, y, 0.0f);
    const float q1 = __fmaf_rn(y, __fmaf_rn(-s, q0, t), q0);
    return fabsf(q0) < 0x1p40f ? q1 : q0;
  }
  __device__ __forceinline__ float operator()(float t) const { return fast ? apply<true>(t) : apply<false>(t); }
};

// The step of a launch: *scale, or qat_step(*scale, *eps) (quantize.h).
__device__ __forceinline__ float step_of(const float* scale, const float* eps) {
  return eps != nullptr ? lowbit::qat_step(__ldg(scale), __ldg(eps)) : __ldg(scale);
}

// One code from one fp32 quotient. Division, not a reciprocal multiply, made the quotient: the contract
// fixes the rounding (StepDiv gives the bits of __fdiv_rn, the IEEE round-to-nearest quotient).
__device__ __forceinline__ int8_t code_of(float v, int qmin, int qmax) {
  if (v != v) return 0;          // NaN (from a NaN input or shift): code 0 by contract
  int r = __float2int_rn(v);     // round half to even; +-inf and huge values saturate to INT_MIN/MAX
  r = min(max(r, qmin), qmax);
  return static_cast<int8_t>(r);
}

// code_of's value as the low byte of a word (the rest is garbage), for qmin / qmax given as floats, without
// the float -> int conversion (a quarter-rate instruction): clamp in fp32, then round half to even by adding
// 1.5 * 2^23, whose sum's low mantissa bits hold the integer in two's complement. Equal to code_of for
// every input: with integer bounds, clamping before rounding gives what rounding before clamping gives
// (+-inf included), and NaN is tested first (fmaxf would turn it into qmin).
__device__ __forceinline__ uint32_t code_byte(float v, float fqmin, float fqmax) {
  const float c = fminf(fmaxf(v, fqmin), fqmax);
  const uint32_t bits = __float_as_uint(__fadd_rn(c, 12582912.0f));
  return v != v ? 0u : bits;
}
// Four code_byte results packed into one word, the first in the lowest byte.
__device__ __forceinline__ uint32_t pack_codes(uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
  return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
}

// Eight consecutive elements as raw 16-byte words (one for fp16 / bf16, two for fp32), read with one or
// two 16-byte loads from a 16-byte aligned p: raw8 issues the loads, widen8 turns them into fp32, so a
// caller can put several vectors' loads in flight before it converts the first.
template <typename T>
struct Raw8 {
  static constexpr int kWords = sizeof(T) == 4 ? 2 : 1;
  uint4 w[kWords];
};
template <typename T>
__device__ __forceinline__ Raw8<T> raw8(const T* p) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < Raw8<T>::kWords; ++i) r.w[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  return r;
}
template <typename T>
__device__ __forceinline__ void widen8(const Raw8<T>& r, float (&f)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    const uint32_t w[8] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w, r.w[1].x, r.w[1].y, r.w[1].z, r.w[1].w};
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = __uint_as_float(w[j]);
  } else {
    const uint32_t w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
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
// Eight consecutive elements starting at a 16-byte aligned p, widened to fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[kVec]) {
  widen8(raw8(p), f);
}

}  // namespace quantize_detail
}  // namespace cuda
}  // namespace lowbit

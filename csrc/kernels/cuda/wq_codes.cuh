// The 16-bit code decoding shared by the tensor-core weight-only kernels (wq_tc.cu, wq_wg.cu): the
// fp16 / bf16 traits and PairCode, which turns two codes of a packed word into two 16-bit numbers
// c_P + q with one LOP3 (see wq_tc.cu's header for the scheme). Device code only; nothing here is public.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace lowbit {
namespace cuda {
namespace wq_detail {

template <typename T>
struct Tc;
template <>
struct Tc<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024 in both halves: 1024 + q*2^p exact for q*2^p < 1024
  static constexpr int kMant = 10;                 // mantissa bits
  static constexpr uint32_t kOne2 = 0x3C003C00u;   // (1, 1)
  // Bits of 2^e.
  static constexpr uint32_t pow2(int e) { return uint32_t(15 + e) << 10; }
  static constexpr int kMagicExp = 10;
};
template <>
struct Tc<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128 in both halves
  static constexpr int kMant = 7;
  static constexpr uint32_t kOne2 = 0x3F803F80u;
  static constexpr uint32_t pow2(int e) { return uint32_t(127 + e) << 7; }
  static constexpr int kMagicExp = 7;
};

template <typename T2>
__device__ __forceinline__ T2 bits_as(uint32_t u) {
  T2 v;
  static_assert(sizeof(T2) == 4, "16-bit pair");
  memcpy(&v, &u, 4);
  return v;
}
template <typename T2>
__device__ __forceinline__ uint32_t as_bits(T2 v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// Pair I of a word (codes I and I + C/2) as 16-bit magic + q * 2^P in both halves. Pairs that fit the
// mantissa together share one shift (kPer of them); the mask-and-or is one LOP3 (`magic` comes from a
// register, see TcArgs::magic).
template <int B, typename T, int I>
struct PairCode {
  static constexpr int kPer = Tc<T>::kMant / B;
  static constexpr int kShift = (I / kPer) * kPer * B;
  static constexpr int kPos = B * I - kShift;
  static constexpr uint32_t kMask = (((1u << B) - 1u) << kPos) * 0x00010001u;
  static_assert(kPos + B <= Tc<T>::kMant, "the code must stay inside the mantissa");
  __device__ static __forceinline__ uint32_t raw(uint32_t w, uint32_t magic) {
    return ((w >> kShift) & kMask) | magic;
  }
  // (c_P + q_I, c_P + q_{I+C/2}) with c_P = 2^(kMagicExp - P): the same mask, OR'd with mg[P / 2], the
  // magic of exponent kMagicExp - P (tc_body), so that the code's lowest bit weighs exactly 1. One LOP3
  // (plus the shared shift); the fast path multiplies these and subtracts c_P * sum x' per group.
  __device__ static __forceinline__ uint32_t unit(uint32_t w, const uint32_t (&mg)[5]) {
    return ((w >> kShift) & kMask) | mg[kPos / 2];
  }
  // The exact integers (q_I, q_{I+C/2}): (magic + q*2^P) * 2^-P - magic * 2^-P, one exact FMA.
  __device__ static __forceinline__ typename Tc<T>::T2 exact(uint32_t w, uint32_t magic) {
    using T2 = typename Tc<T>::T2;
    constexpr uint32_t kScale = Tc<T>::pow2(-kPos) * 0x00010001u;
    constexpr uint32_t kNeg = (0x8000u | Tc<T>::pow2(Tc<T>::kMagicExp - kPos)) * 0x00010001u;
    return __hfma2(bits_as<T2>(raw(w, magic)), bits_as<T2>(kScale), bits_as<T2>(kNeg));
  }
};

// PairCode<B, T, i> for an index that is a constant once the loops are unrolled.
template <int B, typename T>
struct PairCodeSel {
  __device__ static constexpr int pos(int i) { return B * i - (i / (Tc<T>::kMant / B)) * (Tc<T>::kMant / B) * B; }
  // f(PairCode<B, T, i>{}) for the runtime index i (a constant after unrolling, so the switch folds away).
  template <typename F>
  __device__ static __forceinline__ auto at(int i, F f) {
    switch (i) {
      case 0: return f(PairCode<B, T, 0>{});
      case 1: return f(PairCode<B, T, 1>{});
      case 2: return f(PairCode<B, T, 2>{});
      case 3: return f(PairCode<B, T, 3>{});
      case 4: return f(PairCode<B, T, 4>{});
      case 5: return f(PairCode<B, T, 5>{});
      case 6: return f(PairCode<B, T, 6>{});
      default: return f(PairCode<B, T, 7>{});
    }
  }
  __device__ static __forceinline__ uint32_t unit(uint32_t w, int i, const uint32_t (&mg)[5]) {
    return at(i, [&](auto pc) { return decltype(pc)::unit(w, mg); });
  }
  __device__ static __forceinline__ typename Tc<T>::T2 exact(uint32_t w, int i, uint32_t magic) {
    return at(i, [&](auto pc) { return decltype(pc)::exact(w, magic); });
  }
};

// The weights of one column at a pair of k-slots by the tensor-core permission's per-row formula (wq.h),
// in the 16-bit type: v = the pair as c_P + q (PairCode::unit), sub = (c_P, c_P), s2 = (s, s) and z2 =
// (z, z) of the rows' group, or (-z, -z) for sym. sym: fma(q, s, -z) (one rounding); asym: s * (q - z).
// wq_wg.cu and wq_wgt.cu.
template <typename T, bool kAsym>
__device__ __forceinline__ uint32_t pair_weight(uint32_t v, uint32_t sub, uint32_t s2, uint32_t z2) {
  using T2 = typename Tc<T>::T2;
  const T2 q = __hsub2(bits_as<T2>(v), bits_as<T2>(sub));
  if constexpr (kAsym)
    return as_bits(__hmul2(bits_as<T2>(s2), __hsub2(q, bits_as<T2>(z2))));
  else
    return as_bits(__hfma2(q, bits_as<T2>(s2), bits_as<T2>(z2)));
}

}  // namespace wq_detail
}  // namespace cuda
}  // namespace lowbit

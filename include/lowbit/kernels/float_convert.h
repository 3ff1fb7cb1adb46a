// Scalar fp16 / bf16 <-> fp32 conversions for the torch-free CPU kernels.
// float -> half / bfloat16 round to nearest even (as CUDA's __float2half_rn / __float2bfloat16_rn and
// torch's .to()); NaN stays NaN (quiet). Header-only, usable from any translation unit.
#pragma once
#include <cstdint>
#include <cstring>

namespace lowbit {

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                              // round half to even
  return uint16_t(u >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint16_t(sign | 0x7e00u);        // NaN
  if (u >= 0x477ff000u) return uint16_t(sign | 0x7c00u);       // rounds to >= 65520: inf
  if (u < 0x38800000u) {                                       // below 2^-14: subnormal or zero
    // value * 2^24, rounded half to even, is the subnormal mantissa (0..1024; 1024 = smallest normal)
    const float scaled = bits_to_float(u) * 16777216.0f;       // exact (power-of-two scale)
    float r = scaled;                                          // round half to even by hand
    float fl = float(int32_t(r));
    float diff = r - fl;
    int32_t m = int32_t(fl);
    if (diff > 0.5f || (diff == 0.5f && (m & 1))) m += 1;
    return uint16_t(sign | uint16_t(m));
  }
  // normal: rebias exponent (127 -> 15), round mantissa 23 -> 10 bits half to even
  uint32_t r = u - 0x38000000u;                                // exponent - 112
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | uint16_t(r >> 13));
}

}  // namespace lowbit

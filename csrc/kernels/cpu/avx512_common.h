// AVX-512 helpers shared by the *_avx512.cpp kernels (and only by them: they are built with the AVX-512
// flags and entered after run-time CPU detection). Everything here has internal linkage (an unnamed
// namespace), so no AVX-512 code can be merged by the linker into a caller built for a lesser ISA.
#pragma once

// GCC 12's AVX-512 headers self-initialise their "undefined" pass-through operand (_mm512_undefined_ps),
// which -W(maybe-)uninitialized reports at every use (GCC PR 105593, fixed in 12.3/13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

#include "lowbit/kernels/common.h"

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

// The first n (<= 16) lanes.
inline __mmask16 lane_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// 16 elements of type T from p + idx (masked lanes read nothing, give 0), widened exactly to fp32.
template <DType T>
inline __m512 load16(const void* p, int64_t idx, __mmask16 m) {
  if (T == DType::kFloat32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + idx);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + idx);
  if (T == DType::kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

}  // namespace
}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

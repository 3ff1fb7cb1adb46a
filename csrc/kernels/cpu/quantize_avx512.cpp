// Per-tensor int8 quantizer, AVX-512 body: 16 elements per step, masked loads/stores for the row tail.
// Contract: quantize.h (bitwise equal to quantize_s8_ref). Built with -mavx512*, entered only after run-time
// CPU detection; the OpenMP split over rows and column chunks lives in quantize.cpp.
//
// Per lane, in fp32 and in the reference's order: convert (vcvtph2ps is exact; bf16 is a 16-bit shift),
// add shift, IEEE division by scale (vdivps, never a reciprocal), round half to even (vrndscaleps imm 8:
// nearest, exceptions suppressed, same as nearbyint in the default rounding mode), NaN -> 0, clamp
// (+-inf saturate through min/max), then the already-integral value to int8.

#include "avx512_common.h"
#include "quantize_internal.h"

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

template <DType T, bool SHIFT>
void run(const QuantizeArgs& a, int64_t i, int64_t k0, int64_t k1) {
  const int64_t es = T == DType::kFloat32 ? 4 : 2;
  const void* row = static_cast<const char*>(a.x) + i * a.ldx * es;
  int8_t* q = a.q + i * a.K;
  const __m512 scale = _mm512_set1_ps(a.scale);
  const __m512 lo = _mm512_set1_ps(float(a.qmin));
  const __m512 hi = _mm512_set1_ps(float(a.qmax));
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = lane_mask(k1 - k);
    __m512 t = load16<T>(row, k, m);
    if (SHIFT) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, a.shift + k));
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(t, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);  // NaN -> 0, then clamped like any value
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    const __m128i c = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));
    if (k1 - k >= 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), c);  // vpmovdb straight to memory is slow on Zen 4
    else
      _mm_mask_storeu_epi8(q + k, m, c);
  }
}

template <DType T>
void run_shift(const QuantizeArgs& a, int64_t i, int64_t k0, int64_t k1) {
  if (a.shift)
    run<T, true>(a, i, k0, k1);
  else
    run<T, false>(a, i, k0, k1);
}

}  // namespace

void quantize_s8_avx512_range(const QuantizeArgs& a, int64_t i, int64_t k0, int64_t k1) {
  switch (a.xtype) {
    case DType::kFloat32: run_shift<DType::kFloat32>(a, i, k0, k1); break;
    case DType::kFloat16: run_shift<DType::kFloat16>(a, i, k0, k1); break;
    case DType::kBFloat16: run_shift<DType::kBFloat16>(a, i, k0, k1); break;
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

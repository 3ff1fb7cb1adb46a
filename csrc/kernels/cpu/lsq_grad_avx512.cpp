// LSQ / straight-through input gradients, AVX-512 span body: 16 elements a step, masked loads and stores
// for the tail. Contract: lsq_grad.h (grad_x bitwise equal to lsq_grad_ref). Built with -mavx512*,
// entered only after run-time CPU detection; the work partition and the final sums live in lsq_grad.cpp.
//
// Per lane, in fp32 and in the reference's order: widen (vcvtph2ps is exact; bf16 is a 16-bit shift),
// g * gscale, x + shift, IEEE division (vdivps, never a reciprocal), the masks by ordered compares, grad_x
// as a real multiply by 0 or 1, R by blends with rne from vrndscaleps (imm 8: nearest even, exceptions
// suppressed; NaN stays NaN), R * g. Narrowing grad_x: fp16 by vcvtps2ph (round to nearest even), bf16
// by the integer round-half-even of float_convert.h; NaN lanes of every dtype are then replaced by the
// canonical NaN. Sums: the span's lanes accumulate in float64 vectors (low and high 8 lanes apart),
// folded once at the end in a fixed order.

#include "avx512_common.h"
#include "lsq_grad_internal.h"

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

// NaN lanes become the canonical quiet NaN of each dtype (lsq_grad.h): 0x7fc00000, 0x7e00, 0x7fc0.
template <DType T>
inline void store16(void* p, int64_t idx, __m512 v, __mmask16 m) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  if (T == DType::kFloat32) {
    v = _mm512_mask_mov_ps(v, nan, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000)));
    _mm512_mask_storeu_ps(static_cast<float*>(p) + idx, m, v);
    return;
  }
  __m256i h;
  if (T == DType::kFloat16) {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    h = _mm256_mask_mov_epi16(h, nan, _mm256_set1_epi16(0x7e00));
  } else {
    // float_to_bf16: upper half of u + 0x7fff + ((u >> 16) & 1)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    h = _mm512_cvtepi32_epi16(r);
  }
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + idx, m, h);
}

inline __m512d lo8(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d hi8(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

template <DType G, DType X>
void run(const LsqArgs& a, const LsqSpan& s) {
  const __m512 step = _mm512_set1_ps(a.step);
  const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
  const __m512 gscale = _mm512_set1_ps(a.gscale);
  const __m512 shift_one = _mm512_set1_ps(s.shift_one);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  __m512d one_lo = _mm512_setzero_pd(), one_hi = _mm512_setzero_pd();
  __m512d sc_lo = _mm512_setzero_pd(), sc_hi = _mm512_setzero_pd();
  for (int64_t k = 0; k < s.n; k += 16) {
    const __mmask16 m = lane_mask(s.n - k);
    const int64_t e = s.base + k;
    __m512 g = load16<G>(a.g, e, m);
    if (a.has_gscale) g = _mm512_mul_ps(g, gscale);
    __m512 t = load16<X>(a.x, e, m);
    if (s.shift_vec != nullptr)
      t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, s.shift_vec + k));
    else if (s.has_shift_one)
      t = _mm512_add_ps(t, shift_one);
    const __m512 v = _mm512_div_ps(t, step);
    const __mmask16 below = _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ);
    const __mmask16 above = _mm512_cmp_ps_mask(v, hi, _CMP_GT_OQ);
    const __mmask16 inside = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q) & __mmask16(~(below | above));
    // Lanes past the tail hold g = 0, so gx = 0 there; the mask keeps them out of the sums anyway.
    const __m512 gx = _mm512_maskz_mul_ps(m, g, _mm512_mask_blend_ps(inside, zero, one));
    if (a.grad_x != nullptr) store16<X>(a.grad_x, e, gx, m);
    if (s.acc_vec != nullptr) {
      const __mmask8 m_lo = __mmask8(m & 0xFF), m_hi = __mmask8(m >> 8);
      double* acc = s.acc_vec + k;
      _mm512_mask_storeu_pd(acc, m_lo, _mm512_add_pd(_mm512_maskz_loadu_pd(m_lo, acc), lo8(gx)));
      _mm512_mask_storeu_pd(acc + 8, m_hi, _mm512_add_pd(_mm512_maskz_loadu_pd(m_hi, acc + 8), hi8(gx)));
    }
    if (s.acc_one != nullptr) {
      one_lo = _mm512_add_pd(one_lo, lo8(gx));
      one_hi = _mm512_add_pd(one_hi, hi8(gx));
    }
    if (s.acc_scale != nullptr) {
      const __m512 rr = _mm512_sub_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), v);
      const __m512 r = _mm512_mask_blend_ps(below, _mm512_mask_blend_ps(above, rr, hi), lo);
      const __m512 rg = _mm512_maskz_mul_ps(m, r, g);  // tail lanes: 0 (their v may be NaN)
      sc_lo = _mm512_add_pd(sc_lo, lo8(rg));
      sc_hi = _mm512_add_pd(sc_hi, hi8(rg));
    }
  }
  if (s.acc_one != nullptr) *s.acc_one += _mm512_reduce_add_pd(_mm512_add_pd(one_lo, one_hi));
  if (s.acc_scale != nullptr) *s.acc_scale += _mm512_reduce_add_pd(_mm512_add_pd(sc_lo, sc_hi));
}

template <DType G>
void run_x(const LsqArgs& a, const LsqSpan& s) {
  switch (a.x_type) {
    case DType::kFloat32: run<G, DType::kFloat32>(a, s); break;
    case DType::kFloat16: run<G, DType::kFloat16>(a, s); break;
    case DType::kBFloat16: run<G, DType::kBFloat16>(a, s); break;
  }
}

}  // namespace

void lsq_span_avx512(const LsqArgs& a, const LsqSpan& s) {
  switch (a.g_type) {
    case DType::kFloat32: run_x<DType::kFloat32>(a, s); break;
    case DType::kFloat16: run_x<DType::kFloat16>(a, s); break;
    case DType::kBFloat16: run_x<DType::kBFloat16>(a, s); break;
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

// Per-row int8 quantizer, AVX-512 passes of one row. Contract: quantize_rows.h (bitwise equal to
// quantize_rows_s8_ref). Built with -mavx512*, entered only after run-time CPU detection; the OpenMP split
// over rows and the per-row decision (finite / zero / scale) live in quantize_rows.cpp.
//
// Pass 1 works on magnitude keys in the storage format (quantize_rows_internal.h): an AND and an unsigned
// max per lane, 32 lanes per zmm for fp16 / bf16 and 16 for fp32, two accumulators. A max is exact and
// order-free, so any lane split gives the reference's result.
// Pass 2 does per lane what the reference does, in the same order: exact widening to fp32 (vcvtph2ps;
// bf16 is a 16-bit shift), IEEE division by the row scale (vdivps, never a reciprocal), round half to even
// (vrndscaleps imm 8: nearest, exceptions suppressed, as nearbyint in the default rounding mode), NaN -> 0
// (only 0 / 0 when the scale underflowed), clamp to [-qmax, qmax], then the integral value to int8.

#include "avx512_common.h"
#include "quantize_rows_internal.h"

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

inline __mmask32 lane_mask32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1); }

uint32_t absmax_key_f32(const float* row, int64_t N) {
  const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
  __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 32 <= N; j += 32) {
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(row + j), abs_bits));
    m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(row + j + 16), abs_bits));
  }
  for (; j < N; j += 16)  // masked-off lanes load 0, the identity of the max
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_maskz_loadu_epi32(lane_mask(N - j), row + j), abs_bits));
  return _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
}

uint32_t absmax_key_16(const uint16_t* row, int64_t N) {
  const __m512i abs_bits = _mm512_set1_epi16(0x7fff);
  __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) {
    m0 = _mm512_max_epu16(m0, _mm512_and_si512(_mm512_loadu_si512(row + j), abs_bits));
    m1 = _mm512_max_epu16(m1, _mm512_and_si512(_mm512_loadu_si512(row + j + 32), abs_bits));
  }
  for (; j < N; j += 32)
    m0 = _mm512_max_epu16(m0, _mm512_and_si512(_mm512_maskz_loadu_epi16(lane_mask32(N - j), row + j), abs_bits));
  const __m512i m = _mm512_max_epu16(m0, m1);
  // Fold the two 16-bit keys of each dword into one 32-bit lane, then reduce the dwords.
  const __m512i folded = _mm512_max_epu32(_mm512_and_si512(m, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(m, 16));
  return _mm512_reduce_max_epu32(folded);
}

template <DType T>
void codes(const QuantizeRowsArgs& a, int64_t i, float s) {
  const int64_t es = T == DType::kFloat32 ? 4 : 2;
  const void* row = static_cast<const char*>(a.x) + i * a.ldx * es;
  int8_t* q = a.q + i * a.ldq;
  const __m512 scale = _mm512_set1_ps(s);
  const __m512 lo = _mm512_set1_ps(float(-a.qmax));
  const __m512 hi = _mm512_set1_ps(float(a.qmax));
  for (int64_t j = 0; j < a.N; j += 16) {
    const __mmask16 m = lane_mask(a.N - j);
    const __m512 t = load16<T>(row, j, m);
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(t, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);  // NaN (0 / 0) -> 0
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    const __m128i c = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));
    if (a.N - j >= 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), c);  // vpmovdb straight to memory is slow on Zen 4
    else
      _mm_mask_storeu_epi8(q + j, m, c);
  }
}

}  // namespace

uint32_t quantize_rows_avx512_absmax_key(const QuantizeRowsArgs& a, int64_t i) {
  if (a.xtype == DType::kFloat32) return absmax_key_f32(static_cast<const float*>(a.x) + i * a.ldx, a.N);
  return absmax_key_16(static_cast<const uint16_t*>(a.x) + i * a.ldx, a.N);
}

void quantize_rows_avx512_codes(const QuantizeRowsArgs& a, int64_t i, float scale) {
  switch (a.xtype) {
    case DType::kFloat32: codes<DType::kFloat32>(a, i, scale); break;
    case DType::kFloat16: codes<DType::kFloat16>(a, i, scale); break;
    case DType::kBFloat16: codes<DType::kBFloat16>(a, i, scale); break;
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

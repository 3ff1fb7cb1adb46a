// Weight-only quantized matmul (wq.h), AVX2 column-tile kernel.
//
// Contract: wq_internal.h (wq_tile_avx2: ncols a multiple of 8; the caller runs the last N % 8 columns on
// the portable kernel). Built with -mavx2 -mfma -mf16c, entered only after run-time CPU detection, hence
// nothing with external inline linkage here.
//
// The same scheme as wq_matmul_avx512.cpp (read its header comment), with one ymm = 8 consecutive columns,
// two column vectors at a time for MT <= 2 and one for MT >= 4 (16 ymm registers: MT * NV sums, B * NV
// words, NV scales and zeros, temporaries; where that does not fit GCC spills words, which only costs a
// reload from L1 per use, never the sums):
//   per 32-row chunk whose rows share a group, for each 8 columns: load the B word rows, the group's scale
//   and zero, the MT sums; for row j = 0..31 (unrolled, width B a template parameter) extract bits
//   [j*B, j*B + B) of the little-endian concatenation of the words (shift, funnel from the next word when
//   the code straddles), w = fmaf(s, q, -z) or s * (q - z), sum[m] = fma(x'[r][m], w, sum[m]); store.
//   Other chunks (several groups, or the partial last chunk): per-row kernel, run-time width.
//   While it computes a chunk, it prefetches the same columns two chunks ahead.
#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "wq_internal.h"

#define WQ_UNROLL _Pragma("GCC unroll 16")
#define WQ_INLINE inline __attribute__((always_inline))

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

// 8 scales / zeros at element idx of a (groups, N) array of dtype sdtype, as fp32 (exact conversions).
WQ_INLINE __m256 load_sd(int32_t sdtype, const void* base, int64_t idx) {
  if (sdtype == 0) return _mm256_loadu_ps(static_cast<const float*>(base) + idx);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + idx));
  if (sdtype == 1) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int B, int J>
WQ_INLINE __m256i extract(const __m256i* w) {
  constexpr int bit = J * B, i = bit / 32, sh = bit % 32;
  __m256i q = w[i];
  if constexpr (sh != 0) q = _mm256_srli_epi32(q, sh);
  if constexpr (sh + B > 32) q = _mm256_or_si256(q, _mm256_slli_epi32(w[i + 1], 32 - sh));
  if constexpr (sh + B != 32) q = _mm256_and_si256(q, _mm256_set1_epi32((1 << B) - 1));
  return q;
}

// NV column vectors of 8 share each row's x' broadcasts and give NV independent FMA chains per x row: with
// one or two rows of x a single chain per vector would leave the loop waiting on FMA latency.
template <int B, int MT, int NV, bool ASYM>
struct FullChunk {
  template <int J>
  static WQ_INLINE void row(const __m256i (&w)[NV][B], const __m256 (&s)[NV], const __m256 (&z)[NV],
                            const float* xr, __m256 (&a)[MT][NV]) {
    WQ_UNROLL
    for (int v = 0; v < NV; ++v) {
      const __m256 qf = _mm256_cvtepi32_ps(extract<B, J>(w[v]));
      const __m256 wv = ASYM ? _mm256_mul_ps(s[v], _mm256_sub_ps(qf, z[v])) : _mm256_fmsub_ps(s[v], qf, z[v]);
      WQ_UNROLL
      for (int m = 0; m < MT; ++m) a[m][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + J * MT + m), wv, a[m][v]);
    }
  }

  template <int... J>
  static WQ_INLINE void rows(std::integer_sequence<int, J...>, const __m256i (&w)[NV][B], const __m256 (&s)[NV],
                             const __m256 (&z)[NV], const float* xr, __m256 (&a)[MT][NV]) {
    (row<J>(w, s, z, xr, a), ...);
  }

  // Columns [n, n + 8 NV) of the chunk at word row pointer qrow, group g; next: word rows to prefetch (the
  // same columns two chunks ahead), or null.
  static void run(const WqTileArgs& A, const uint32_t* qrow, const uint32_t* next, int64_t g, const float* xr,
                  int64_t n, float* ac, int64_t ldacc) {
    const int64_t N = A.N;
    __m256i w[NV][B];
    __m256 s[NV], z[NV], a[MT][NV];
    WQ_UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t c = n + 8 * v;
      WQ_UNROLL
      for (int i = 0; i < B; ++i) w[v][i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + i * N + c));
      s[v] = load_sd(A.sdtype, A.scales, g * N + c);
      z[v] = load_sd(A.sdtype, A.zeros, g * N + c);
      WQ_UNROLL
      for (int m = 0; m < MT; ++m) a[m][v] = _mm256_loadu_ps(ac + m * ldacc + 8 * v);
    }
    if (next != nullptr) {  // one 64-byte line per 16 columns
      WQ_UNROLL
      for (int v = 0; v < NV; v += 2) {
        WQ_UNROLL
        for (int i = 0; i < B; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(next + i * N + n + 8 * v), _MM_HINT_T0);
      }
    }
    rows(std::make_integer_sequence<int, 32>(), w, s, z, xr, a);
    WQ_UNROLL
    for (int v = 0; v < NV; ++v) {
      WQ_UNROLL
      for (int m = 0; m < MT; ++m) _mm256_storeu_ps(ac + m * ldacc + 8 * v, a[m][v]);
    }
  }
};

// Any chunk, 8 columns: rows [r0, r0 + rows), run-time width b, groups from g_idx unless g >= 0. The words
// sit in a stack buffer followed by a zero word; vpsrlvd / vpsllvd give 0 for shift counts >= 32, so
// (w[i] >> sh) | (w[i + 1] << (32 - sh)) is the code's 64-bit window whether or not it straddles.
template <int MT, bool ASYM>
void chunk_rows(const WqTileArgs& A, const uint32_t* qrow, int b, int64_t r0, int rows, int64_t g, const float* xs,
                int64_t n, float* ac, int64_t ldacc) {
  const int64_t N = A.N;
  alignas(32) uint32_t wb[9][8];
  for (int i = 0; i < b; ++i)
    _mm256_store_si256(reinterpret_cast<__m256i*>(wb[i]),
                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + i * N + n)));
  _mm256_store_si256(reinterpret_cast<__m256i*>(wb[b]), _mm256_setzero_si256());
  __m256 a[MT];
  WQ_UNROLL
  for (int m = 0; m < MT; ++m) a[m] = _mm256_loadu_ps(ac + m * ldacc);
  const __m256i mask = _mm256_set1_epi32(int32_t((1u << b) - 1));
  int64_t gcur = -1;
  __m256 s = _mm256_setzero_ps(), z = _mm256_setzero_ps();
  for (int j = 0; j < rows; ++j) {
    const int64_t r = r0 + j;
    const int64_t gr = g >= 0 ? g : int64_t(A.g_idx[r]);
    if (gr != gcur) {
      gcur = gr;
      s = load_sd(A.sdtype, A.scales, gr * N + n);
      z = load_sd(A.sdtype, A.zeros, gr * N + n);
    }
    const int bit = j * b, i = bit >> 5, sh = bit & 31;
    const __m256i lo = _mm256_srlv_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(wb[i])),
                                         _mm256_set1_epi32(sh));
    const __m256i hi = _mm256_sllv_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(wb[i + 1])),
                                         _mm256_set1_epi32(32 - sh));
    const __m256 qf = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_or_si256(lo, hi), mask));
    const __m256 wv = ASYM ? _mm256_mul_ps(s, _mm256_sub_ps(qf, z)) : _mm256_fmsub_ps(s, qf, z);
    const float* xr = xs + r * MT;
    WQ_UNROLL
    for (int m = 0; m < MT; ++m) a[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(xr + m), wv, a[m]);
  }
  WQ_UNROLL
  for (int m = 0; m < MT; ++m) _mm256_storeu_ps(ac + m * ldacc, a[m]);
}

template <int B, int MT, bool ASYM>
void run_segment(const WqTileArgs& A, int s, const float* xs, int64_t n0, int64_t ncols, float* acc,
                 int64_t ldacc) {
  const int64_t N = A.N, nend = n0 + ncols;
  const int64_t start = A.row_start[s], end = A.row_end[s];
  const int64_t chunks = (end - start + 31) / 32;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = start + 32 * c;
    const int rows = end - r0 >= 32 ? 32 : int(end - r0);
    const int64_t g = A.chunk_group[A.chunk0[s] + c];
    const uint32_t* qrow = A.qweight + (A.qrow0[s] + c * B) * N;
    if (rows == 32 && g >= 0) {
      // Two vectors (16 columns) at a time for one or two rows of x, then the odd 8 columns.
      constexpr int NV = MT <= 2 ? 2 : 1;
      const uint32_t* next = c + 2 < chunks ? qrow + 2 * B * N : nullptr;
      int64_t n = n0;
      for (; n + 8 * NV <= nend; n += 8 * NV)
        FullChunk<B, MT, NV, ASYM>::run(A, qrow, next, g, xs + r0 * MT, n, acc + (n - n0), ldacc);
      if (n < nend) FullChunk<B, MT, 1, ASYM>::run(A, qrow, next, g, xs + r0 * MT, n, acc + (n - n0), ldacc);
    } else {
      for (int64_t n = n0; n < nend; n += 8)
        chunk_rows<MT, ASYM>(A, qrow, B, r0, rows, g, xs, n, acc + (n - n0), ldacc);
    }
  }
}

template <int B, int MT>
void segment_asym(const WqTileArgs& A, int s, const float* xs, int64_t n0, int64_t ncols, float* acc,
                  int64_t ldacc) {
  if (A.asym)
    run_segment<B, MT, true>(A, s, xs, n0, ncols, acc, ldacc);
  else
    run_segment<B, MT, false>(A, s, xs, n0, ncols, acc, ldacc);
}

template <int B>
void segment_mt(const WqTileArgs& A, int s, const float* xs, int MT, int64_t n0, int64_t ncols, float* acc,
                int64_t ldacc) {
  switch (MT) {
    case 1: segment_asym<B, 1>(A, s, xs, n0, ncols, acc, ldacc); break;
    case 2: segment_asym<B, 2>(A, s, xs, n0, ncols, acc, ldacc); break;
    case 4: segment_asym<B, 4>(A, s, xs, n0, ncols, acc, ldacc); break;
    default: segment_asym<B, 8>(A, s, xs, n0, ncols, acc, ldacc); break;
  }
}

}  // namespace

void wq_tile_avx2(const WqTileArgs& A, const float* xs, int MT, int64_t n0, int64_t ncols, float* acc,
                  int64_t ldacc) {
  for (int m = 0; m < MT; ++m)
    for (int64_t n = 0; n < ncols; n += 8) _mm256_storeu_ps(acc + m * ldacc + n, _mm256_setzero_ps());
  for (int s = 0; s < A.nseg; ++s) {
    switch (A.bits[s]) {
      case 1: segment_mt<1>(A, s, xs, MT, n0, ncols, acc, ldacc); break;
      case 2: segment_mt<2>(A, s, xs, MT, n0, ncols, acc, ldacc); break;
      case 3: segment_mt<3>(A, s, xs, MT, n0, ncols, acc, ldacc); break;
      case 4: segment_mt<4>(A, s, xs, MT, n0, ncols, acc, ldacc); break;
      case 5: segment_mt<5>(A, s, xs, MT, n0, ncols, acc, ldacc); break;
      case 6: segment_mt<6>(A, s, xs, MT, n0, ncols, acc, ldacc); break;
      default: segment_mt<8>(A, s, xs, MT, n0, ncols, acc, ldacc); break;
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

// Weight-only quantized matmul (wq.h), AVX-512 column-tile kernel.
//
// Contract: wq_internal.h (wq_tile_avx512). Built with -mavx512*, entered only after run-time CPU
// detection (wq_matmul.cpp), hence nothing with external inline linkage here (no std:: functions, no
// float_convert.h): plain data in, fp32 sums out.
//
// Work of one call: the fp32 sums acc[m][n] = FMA chain over stored rows r = 0..K-1 of x'[r][m] * w(r, n)
// for MT rows of x' and the columns [n0, n0 + ncols).
//
// Register layout. One zmm holds 16 consecutive COLUMNS n: the qweight words of a word row, the scales /
// zeros of a group, the dequantized weights of a stored row, the sums of one x row. The kernel walks the
// weight chunk by chunk (32 stored rows = B word rows), and inside a chunk over the block's columns in
// groups of NV zmm (NV * 16 columns):
//   words  w[v][i], i < B: the chunk's B word rows for those columns (B * NV zmm, loaded once)
//   s[v], z[v]:            the group's scale / zero, when the whole chunk lies in one group (loaded once
//                          per chunk; otherwise the per-row kernel below reloads them for each row)
//   acc    a[m][v]:        MT * NV sums, loaded from / stored to the acc buffer once per chunk
// and for each row j = 0..31 of the chunk (compile-time unrolled, template on the width B):
//   code   = bits [j*B, j*B + B) of the little-endian concatenation of the B words: word i = j*B / 32,
//            shift sh = j*B % 32; when sh + B > 32 the code straddles words i and i + 1 (B = 3, 5, 6) and
//            the high part is funneled in with a left shift of word i + 1. Mask unless the code ends at
//            bit 31 of its word.
//   w      = fmsub(s, float(code), z) = fmaf(s, q, -z)   (sym)   or   s * (float(code) - z)   (asym)
//   a[m]   = fma(x'[r][m] (broadcast), w, a[m])              for m < MT.
// Registers: B*NV + 2*NV + MT*NV + temporaries <= 32: NV = 4 at MT = 1 with B <= 4 (the broadcast of
// x'[r] is shared by more vectors), NV = 1 at MT = 8 and at MT = 4 with B >= 6, else NV = 2.
//
// Throughput (Zen 4, which runs a zmm op as two 256-bit halves: about 2 zmm ops per cycle over all vector
// pipes): per 16 weights and x row, shift + mask + convert + dequantize + FMA is ~5 zmm ops, ~2.6 cycles.
// The fp32 w of wq.h needs its own rounding (fmsub), so folding the scale out of the row sum is not an
// option: it would change the result.
//
// Memory order: chunk-major, so each chunk reads B word rows of the block's columns, contiguous runs of
// ncols * 4 bytes (1 KiB for a 256-column block), and prefetches the same columns two chunks ahead while
// it computes this one (the B runs of one chunk are N * 4 bytes apart, too short for the hardware
// prefetchers alone; one core's DRAM stream needs the extra requests in flight). Column tails are masked loads (never read past N, masked lanes fault nothing); the
// acc buffer is padded to 64 columns so tails need no masked stores.
//
// Rows that do not fill a 32-row chunk (the last chunk of the last segment, whose padding rows past K
// must not contribute even a 0 * w) and chunks that span several groups go through a per-row kernel with
// run-time row count and width: words staged in a small stack buffer, variable shifts.

// GCC 12's AVX-512 headers self-initialise their "undefined" pass-through operand (_mm512_undefined_ps),
// which -W(maybe-)uninitialized reports at every use (GCC PR 105593, fixed in 12.3/13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <utility>

#include "wq_internal.h"

// Full unrolling of the register-array loops must happen before scalar replacement, or GCC keeps the
// arrays in memory.
#define WQ_UNROLL _Pragma("GCC unroll 16")
#define WQ_INLINE inline __attribute__((always_inline))

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// 16 scales / zeros (columns idx..idx+15 of a (groups, N) array of dtype sdtype) as fp32; masked lanes 0.
// fp16 -> fp32 (vcvtph2ps) and bf16 -> fp32 (shift into the high half) are exact.
WQ_INLINE __m512 load_sd(int32_t sdtype, const void* base, int64_t idx, __mmask16 k) {
  if (sdtype == 0) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + idx);
  const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + idx);
  if (sdtype == 1) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Code of row J of a B-bit chunk whose words are w[0..B-1] (see the top of the file).
template <int B, int J>
WQ_INLINE __m512i extract(const __m512i* w) {
  constexpr int bit = J * B, i = bit / 32, sh = bit % 32;
  __m512i q = w[i];
  if constexpr (sh != 0) q = _mm512_srli_epi32(q, sh);
  if constexpr (sh + B > 32) q = _mm512_or_si512(q, _mm512_slli_epi32(w[i + 1], 32 - sh));
  if constexpr (sh + B != 32) q = _mm512_and_si512(q, _mm512_set1_epi32((1 << B) - 1));
  return q;
}

// Column vectors per group of the unrolled kernel (see the register budget at the top).
// MT = 1: the x' broadcast of a row is shared by NV vectors, so NV = 4 where the words fit (B <= 4).
constexpr int nv_for(int B, int MT) {
  return MT >= 8 ? 1 : (MT == 4 && B >= 6) ? 1 : (MT == 1 && B <= 4) ? 4 : 2;
}

// A full 32-row chunk whose rows share one group: the unrolled kernel.
template <int B, int MT, bool ASYM>
struct FullChunk {
  static constexpr int NV = nv_for(B, MT);

  template <int J>
  static WQ_INLINE void row(const __m512i (&w)[NV][B], const __m512 (&s)[NV], const __m512 (&z)[NV],
                            const float* xr, __m512 (&a)[MT][NV]) {
    WQ_UNROLL
    for (int v = 0; v < NV; ++v) {
      const __m512 qf = _mm512_cvtepi32_ps(extract<B, J>(w[v]));
      const __m512 wv = ASYM ? _mm512_mul_ps(s[v], _mm512_sub_ps(qf, z[v])) : _mm512_fmsub_ps(s[v], qf, z[v]);
      WQ_UNROLL
      for (int m = 0; m < MT; ++m) a[m][v] = _mm512_fmadd_ps(_mm512_set1_ps(xr[J * MT + m]), wv, a[m][v]);
    }
  }

  template <int... J>
  static WQ_INLINE void rows(std::integer_sequence<int, J...>, const __m512i (&w)[NV][B], const __m512 (&s)[NV],
                             const __m512 (&z)[NV], const float* xr, __m512 (&a)[MT][NV]) {
    (row<J>(w, s, z, xr, a), ...);
  }

  // Columns [n, n + 16 NV) (masked at nend) of the chunk at word row pointer qrow, group g; xr: x' of the
  // chunk's first row; ac: the acc buffer at column n; next: word rows to prefetch, or null.
  static void run(const WqTileArgs& A, const uint32_t* qrow, const uint32_t* next, int64_t g, const float* xr,
                  int64_t n, int64_t nend, float* ac, int64_t ldacc) {
    const int64_t N = A.N;
    __mmask16 mk[NV];
    int64_t off[NV];
    WQ_UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t c = n + 16 * v;
      mk[v] = lane_mask(nend - c);
      off[v] = c < nend ? c : 0;  // a fully masked vector reads nothing; keep its address in range
    }
    __m512i w[NV][B];
    __m512 s[NV], z[NV], a[MT][NV];
    WQ_UNROLL
    for (int v = 0; v < NV; ++v) {
      WQ_UNROLL
      for (int i = 0; i < B; ++i) w[v][i] = _mm512_maskz_loadu_epi32(mk[v], qrow + i * N + off[v]);
      s[v] = load_sd(A.sdtype, A.scales, g * N + off[v], mk[v]);
      z[v] = load_sd(A.sdtype, A.zeros, g * N + off[v], mk[v]);
      WQ_UNROLL
      for (int m = 0; m < MT; ++m) a[m][v] = _mm512_load_ps(ac + m * ldacc + 16 * v);
    }
    // The same columns two chunks ahead (same segment): B word rows of NV cache lines.
    if (next != nullptr) {
      WQ_UNROLL
      for (int v = 0; v < NV; ++v) {
        WQ_UNROLL
        for (int i = 0; i < B; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(next + i * N + off[v]), _MM_HINT_T0);
      }
    }
    rows(std::make_integer_sequence<int, 32>(), w, s, z, xr, a);
    WQ_UNROLL
    for (int v = 0; v < NV; ++v) {
      WQ_UNROLL
      for (int m = 0; m < MT; ++m) _mm512_store_ps(ac + m * ldacc + 16 * v, a[m][v]);
    }
  }
};

// Any chunk, one column vector: rows [r0, r0 + rows) of a chunk of width b at word row pointer qrow,
// each row's group read from g_idx (or g when g >= 0). Run-time width: the words go to a stack buffer
// with a zero word after them, so word i + 1 is always readable and a shift by 32 yields 0 (vpsrlvd /
// vpsllvd give 0 for counts >= 32), which makes the straddling and the non-straddling case one formula.
template <int MT, bool ASYM>
void chunk_rows(const WqTileArgs& A, const uint32_t* qrow, int b, int64_t r0, int rows, int64_t g,
                const float* xs, int64_t n, int64_t nend, float* ac, int64_t ldacc) {
  const int64_t N = A.N;
  const __mmask16 mk = lane_mask(nend - n);
  alignas(64) uint32_t wb[9][16];
  for (int i = 0; i < b; ++i) _mm512_store_si512(wb[i], _mm512_maskz_loadu_epi32(mk, qrow + i * N + n));
  _mm512_store_si512(wb[b], _mm512_setzero_si512());
  __m512 a[MT];
  WQ_UNROLL
  for (int m = 0; m < MT; ++m) a[m] = _mm512_load_ps(ac + m * ldacc);
  const __m512i mask = _mm512_set1_epi32(int32_t((1u << b) - 1));
  int64_t gcur = -1;
  __m512 s = _mm512_setzero_ps(), z = _mm512_setzero_ps();
  for (int j = 0; j < rows; ++j) {
    const int64_t r = r0 + j;
    const int64_t gr = g >= 0 ? g : int64_t(A.g_idx[r]);
    if (gr != gcur) {
      gcur = gr;
      s = load_sd(A.sdtype, A.scales, gr * N + n, mk);
      z = load_sd(A.sdtype, A.zeros, gr * N + n, mk);
    }
    const int bit = j * b, i = bit >> 5, sh = bit & 31;
    const __m512i lo = _mm512_srlv_epi32(_mm512_load_si512(wb[i]), _mm512_set1_epi32(sh));
    const __m512i hi = _mm512_sllv_epi32(_mm512_load_si512(wb[i + 1]), _mm512_set1_epi32(32 - sh));
    const __m512 qf = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_or_si512(lo, hi), mask));
    const __m512 wv = ASYM ? _mm512_mul_ps(s, _mm512_sub_ps(qf, z)) : _mm512_fmsub_ps(s, qf, z);
    const float* xr = xs + r * MT;
    WQ_UNROLL
    for (int m = 0; m < MT; ++m) a[m] = _mm512_fmadd_ps(_mm512_set1_ps(xr[m]), wv, a[m]);
  }
  WQ_UNROLL
  for (int m = 0; m < MT; ++m) _mm512_store_ps(ac + m * ldacc, a[m]);
}

// Segment s on the block: full uniform chunks through FullChunk, the rest through chunk_rows.
template <int B, int MT, bool ASYM>
void run_segment(const WqTileArgs& A, int s, const float* xs, int64_t n0, int64_t ncols, float* acc,
                 int64_t ldacc) {
  using FC = FullChunk<B, MT, ASYM>;
  constexpr int64_t VW = 16 * FC::NV;  // columns per vector group
  const int64_t N = A.N, nend = n0 + ncols;
  const int64_t start = A.row_start[s], end = A.row_end[s];
  const int64_t chunks = (end - start + 31) / 32;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = start + 32 * c;
    const int rows = end - r0 >= 32 ? 32 : int(end - r0);
    const int64_t g = A.chunk_group[A.chunk0[s] + c];
    const uint32_t* qrow = A.qweight + (A.qrow0[s] + c * B) * N;
    if (rows == 32 && g >= 0) {
      const uint32_t* next = c + 2 < chunks ? qrow + 2 * B * N : nullptr;
      for (int64_t n = n0; n < nend; n += VW)
        FC::run(A, qrow, next, g, xs + r0 * MT, n, nend, acc + (n - n0), ldacc);
    } else {
      for (int64_t n = n0; n < nend; n += 16)
        chunk_rows<MT, ASYM>(A, qrow, B, r0, rows, g, xs, n, nend, acc + (n - n0), ldacc);
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

void wq_tile_avx512(const WqTileArgs& A, const float* xs, int MT, int64_t n0, int64_t ncols, float* acc,
                    int64_t ldacc) {
  const int64_t padded = (ncols + 63) & ~int64_t(63);
  for (int m = 0; m < MT; ++m)
    for (int64_t n = 0; n < padded; n += 16) _mm512_store_ps(acc + m * ldacc + n, _mm512_setzero_ps());
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

// int8 x int8 -> int32 GEMM with dequantizing epilogue, AVX-512 (VNNI, or BW-only) microkernels.
//
// Contract: gemm_s8.h; arguments arrive validated (gemm_s8_internal.h). Built with -mavx512*, entered
// only after run-time CPU detection, and therefore uses nothing with external inline linkage.
//
// Layout. K is cut into groups that fill one 32-bit lane:
//   VNNI: 4 k per group. vpdpbusd multiplies u8 x s8, so the packed B panel holds B + 128 (as u8) and A
//         is the signed broadcast operand. sum_k A (B + 128) = A.B + 128 rowsum(A); the epilogue
//         subtracts 128 rowsum(A[i]). All int32 arithmetic wraps mod 2^32, so the difference is exact
//         whenever the true sum fits int32, which K <= kMaxGemmS8K guarantees.
//   BW:   2 k per group, both sides sign-extended to int16, vpmaddwd + vpaddd. vpmaddubsw is avoided on
//         purpose: (B + 128) * A pairs reach 2 * 255 * 128 and saturate int16.
// Packed A: per strip of kMR rows, [G][kMR] dwords, so a strip is one sequential stream of broadcasts.
// Packed B panel: [G][kNR] dwords, kNR = 16 * kNV output features; zero past K and past N (a zero dword
//   contributes 0 in both schemes whatever A holds there).
// Register tile: kMR rows x kNV zmm of 16 features = 24 int32 accumulators, held over the whole K.
// Threads: units = (panel, strip) in panel-major order, one contiguous range per thread. A thread packs
//   each panel it reaches into its own L2-sized buffer once and sweeps its strips over it. Every output is
//   produced by one thread, in a fixed order.
// Few rows (VNNI, M <= kSmallM): no packing at all, B streamed in place; see small_m below.

// GCC 12's AVX-512 headers self-initialise their "undefined" pass-through operand (_mm512_undefined_ps),
// which -W(maybe-)uninitialized reports at every use (GCC PR 105593, fixed in 12.3/13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <omp.h>

#include <cstring>

#include "gemm_s8_internal.h"

// Full unrolling of the register-tile loops must happen before scalar replacement, or GCC 12 keeps the
// accumulator array in memory (a store and reload around every vpdpbusd).
#define LOWBIT_UNROLL _Pragma("GCC unroll 16")

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

constexpr int kMR = 8;
constexpr int kNV = 3;
constexpr int kNR = 16 * kNV;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

struct Layout {
  int64_t kpg;  // k per 32-bit group
  int64_t G;    // groups along K
  int64_t n_strips, n_panels;
  size_t ap_bytes, corr_bytes, bp_bytes;  // bp_bytes: one thread's panel buffer
};

Layout make_layout(const GemmS8Args& a, bool vnni) {
  Layout L;
  L.kpg = vnni ? 4 : 2;
  L.G = ceil_div(a.K, L.kpg);
  L.n_strips = ceil_div(a.M, kMR);
  L.n_panels = ceil_div(a.N, kNR);
  L.ap_bytes = align64(size_t(L.n_strips) * size_t(L.G) * kMR * 4);
  L.corr_bytes = align64(size_t(a.M) * 4);
  L.bp_bytes = align64(size_t(L.G) * kNR * 4);
  return L;
}

// More threads than (panel, strip) units would only allocate panel buffers that stay idle.
int useful_threads(const Layout& L, int nthreads) {
  const int64_t units = L.n_panels * L.n_strips;
  return int(units < nthreads ? units : nthreads);
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __mmask64 byte_mask(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }

// 128 * sum_k row[k], the term vpdpbusd's u8 bias adds to every output of this row. The sum is exact
// (|sum| <= 128 K <= 2^24); the product wraps mod 2^32 like the accumulators it is subtracted from.
int32_t bias_correction(const int8_t* row, int64_t K) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64)
    acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(byte_mask(K - k), row + k));
  return int32_t(uint32_t(_mm512_reduce_add_epi32(acc)) * 128u);
}

// One strip of A into [G][kMR] dwords; for VNNI also corr[i].
void pack_a_strip(const GemmS8Args& a, bool vnni, int64_t s, int32_t* ap, int32_t* corr) {
  const int64_t K = a.K;
  for (int r = 0; r < kMR; ++r) {
    const int64_t i = s * kMR + r;
    if (i >= a.M) break;
    const int8_t* row = a.A + i * a.lda;
    if (vnni) {
      const int64_t full = K / 4;
      for (int64_t g = 0; g < full; ++g) ap[g * kMR + r] = load_i32(row + 4 * g);
      if (K % 4) {
        int32_t t = 0;  // bytes past K: the panel has zeros there, any value works; 0 keeps it tidy
        std::memcpy(&t, row + 4 * full, size_t(K % 4));
        ap[full * kMR + r] = t;
      }
      corr[i] = bias_correction(row, K);
    } else {
      const int64_t full = K / 2;
      for (int64_t g = 0; g < full; ++g) {
        const uint32_t lo = uint16_t(int16_t(row[2 * g]));
        const uint32_t hi = uint16_t(int16_t(row[2 * g + 1]));
        ap[g * kMR + r] = int32_t(lo | (hi << 16));
      }
      if (K % 2) ap[full * kMR + r] = int32_t(uint32_t(uint16_t(int16_t(row[K - 1]))));
    }
  }
}

// In-register transpose of a 16x16 dword matrix: r[row] lane col -> r[col] lane row.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane L = column 4L + c of rows 4i .. 4i+3
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[0 + c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// Panel jp of B (features jp*kNR ..) into [G][kNR] dwords, 16 groups x 16 features per transpose.
void pack_b_panel(const GemmS8Args& a, const Layout& L, bool vnni, int64_t jp, int32_t* bp) {
  const int64_t j0 = jp * kNR;
  const int64_t kchunk = 16 * L.kpg;  // k covered by one transpose
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  for (int sb = 0; sb < kNV; ++sb) {
    const int64_t jb = j0 + 16 * sb;
    if (jb >= a.N) break;  // the microkernel never reads sub-blocks wholly past N
    for (int64_t c0 = 0; c0 < L.G; c0 += 16) {
      const int64_t k0 = c0 * L.kpg;
      const __mmask64 m = byte_mask(a.K - k0 < kchunk ? a.K - k0 : kchunk);
      __m512i r[16];
      for (int x = 0; x < 16; ++x) {
        if (jb + x >= a.N) {
          r[x] = _mm512_setzero_si512();
          continue;
        }
        const int8_t* src = a.B + (jb + x) * a.ldb + k0;
        if (vnni) {
          const __m512i v = _mm512_maskz_loadu_epi8(m, src);
          r[x] = _mm512_mask_add_epi8(v, m, v, bias);  // s8 -> u8 (b + 128); the K padding stays 0
        } else {
          r[x] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(__mmask32(m), src));
        }
      }
      transpose16(r);
      const int64_t gc = L.G - c0 < 16 ? L.G - c0 : 16;
      for (int64_t c = 0; c < gc; ++c) _mm512_store_si512(bp + (c0 + c) * kNR + 16 * sb, r[c]);
    }
  }
}

inline __mmask16 lane_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// Round-to-nearest-even fp32 -> bf16 on the bit pattern (as float_to_bf16); NaN -> quiet NaN. Done by
// hand because vcvtneps2bf16 treats subnormals as zero.
inline __m256i f32_to_bf16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

inline void store16(DType t, void* row, int64_t j, __m512 f, __mmask16 m) {
  switch (t) {
    case DType::kFloat32:
      _mm512_mask_storeu_ps(static_cast<float*>(row) + j, m, f);
      break;
    case DType::kFloat16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(row) + j, m,
                               _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case DType::kBFloat16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(row) + j, m, f32_to_bf16(f));
      break;
  }
}

inline int64_t esize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

struct TileArgs {
  const int32_t* ap;  // strip: [G][kMR]
  const int32_t* bp;  // panel: [G][kNR]
  int64_t G;
  const int32_t* corr;  // rows of this strip (VNNI) or nullptr
  float alpha;
  const float* row_scale;  // this strip's rows, or nullptr
  DType otype;
  char* out;  // (i0, j0)
  int64_t ldo_bytes;
  int64_t n_valid;  // features of this panel below N
};

template <int MR, int NV, bool VNNI>
void tile(const TileArgs& t) {
  __m512i acc[MR][NV];
  LOWBIT_UNROLL for (int r = 0; r < MR; ++r)
    LOWBIT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  const int32_t* ap = t.ap;
  const int32_t* bp = t.bp;
  for (int64_t g = 0; g < t.G; ++g, ap += kMR, bp += kNR) {
    __m512i b[NV];
    LOWBIT_UNROLL for (int v = 0; v < NV; ++v) b[v] = _mm512_load_si512(bp + 16 * v);
    LOWBIT_UNROLL for (int r = 0; r < MR; ++r) {
      if (VNNI) {
        // vpdpbusd acc, b(u8), [ap]{1to16}(s8). Written as asm: with the intrinsic GCC 12 spills and
        // copies every accumulator around each instruction once the epilogue is attached (2x slower).
        LOWBIT_UNROLL for (int v = 0; v < NV; ++v)
          __asm__("vpdpbusd %[x]%{1to16%}, %[b], %[acc]" : [acc] "+v"(acc[r][v]) : [b] "v"(b[v]), [x] "m"(ap[r]));
      } else {
        const __m512i x = _mm512_set1_epi32(ap[r]);
        LOWBIT_UNROLL for (int v = 0; v < NV; ++v) {
          __m512i p;  // asm for the same register-allocation reason
          __asm__("vpmaddwd %[x], %[b], %[p]\n\tvpaddd %[p], %[acc], %[acc]"
                  : [acc] "+v"(acc[r][v]), [p] "=&v"(p)
                  : [b] "v"(b[v]), [x] "v"(x));
        }
      }
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < MR; ++r) {
    const __m512 alpha = _mm512_set1_ps(row_alpha(t.alpha, t.row_scale, r));
    const __m512i c = VNNI ? _mm512_set1_epi32(t.corr[r]) : _mm512_setzero_si512();
    char* row = t.out + r * t.ldo_bytes;
    LOWBIT_UNROLL for (int v = 0; v < NV; ++v) {
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], c)), alpha);
      store16(t.otype, row, 16 * v, f, lane_mask(t.n_valid - 16 * v));
    }
  }
}

template <int MR, bool VNNI>
void tile_nv(const TileArgs& t, int nv) {
  switch (nv) {
    case 1: tile<MR, 1, VNNI>(t); break;
    case 2: tile<MR, 2, VNNI>(t); break;
    default: tile<MR, 3, VNNI>(t); break;
  }
}

template <bool VNNI>
void tile_dispatch(const TileArgs& t, int mr, int nv) {
  static_assert(kMR == 8 && kNV == 3, "tile_dispatch enumerates kMR x kNV");
  switch (mr) {
    case 1: tile_nv<1, VNNI>(t, nv); break;
    case 2: tile_nv<2, VNNI>(t, nv); break;
    case 3: tile_nv<3, VNNI>(t, nv); break;
    case 4: tile_nv<4, VNNI>(t, nv); break;
    case 5: tile_nv<5, VNNI>(t, nv); break;
    case 6: tile_nv<6, VNNI>(t, nv); break;
    case 7: tile_nv<7, VNNI>(t, nv); break;
    default: tile_nv<8, VNNI>(t, nv); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Few rows (decode-style M): packing B would cost more than the whole product, so B is streamed in its
// own layout and the dot products run along K instead: 64 k per vpdpbusd, B flipped to u8 on the fly
// (b ^ 0x80 = b + 128), A the signed operand, the same 128 rowsum(A) correction. Bytes past K come in as
// 0 from masked loads: the flipped B byte is then 128 but the A byte is 0, so they add nothing.
// Work unit: 16 output features (one thread each, static split). Within it, rows of A in groups of up to
// 4: per 64-k step kSmallJ rows of B x the group's rows of A accumulators, reduced across lanes at the
// end; later groups re-read the unit's 16 rows of B from L1/L2. The 16 results per row then go through
// the same vector epilogue as the tiled path.
constexpr int64_t kSmallM = 12;  // measured crossover with the packed path on Zen 4 is ~12-16 rows
constexpr int kSmallJ = 4;

// Lane sums of four accumulators: returns {sum a0, sum a1, sum a2, sum a3}.
inline __m128i reduce4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

template <int MM>
void small_m_block(const GemmS8Args& a, const int8_t* A, const int32_t* corr, int64_t j0, int32_t (*res)[16]) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int q = 0; q < 16 / kSmallJ; ++q) {
    const int8_t* brow[kSmallJ];
    for (int jj = 0; jj < kSmallJ; ++jj) {
      int64_t j = j0 + q * kSmallJ + jj;
      if (j >= a.N) j = a.N - 1;  // duplicate a valid row; its result is masked off at the store
      brow[jj] = a.B + j * a.ldb;
    }
    __m512i acc[MM][kSmallJ];
    LOWBIT_UNROLL for (int i = 0; i < MM; ++i)
      LOWBIT_UNROLL for (int jj = 0; jj < kSmallJ; ++jj) acc[i][jj] = _mm512_setzero_si512();
    for (int64_t k = 0; k < a.K; k += 64) {
      const __mmask64 m = byte_mask(a.K - k);
      __m512i b[kSmallJ];
      LOWBIT_UNROLL for (int jj = 0; jj < kSmallJ; ++jj)
        b[jj] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, brow[jj] + k), flip);
      LOWBIT_UNROLL for (int i = 0; i < MM; ++i) {
        const __m512i x = _mm512_maskz_loadu_epi8(m, A + i * a.lda + k);
        LOWBIT_UNROLL for (int jj = 0; jj < kSmallJ; ++jj)
          __asm__("vpdpbusd %[x], %[b], %[acc]" : [acc] "+v"(acc[i][jj]) : [b] "v"(b[jj]), [x] "v"(x));
      }
    }
    LOWBIT_UNROLL for (int i = 0; i < MM; ++i) {
      const __m128i r = _mm_sub_epi32(reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), _mm_set1_epi32(corr[i]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(res[i] + q * kSmallJ), r);
    }
  }
}

void small_m(const GemmS8Args& a, int nthreads) {
  static_assert(kSmallJ == 4, "reduce4 handles four rows of B");
  int32_t corr[kSmallM];
  for (int64_t i = 0; i < a.M; ++i) corr[i] = bias_correction(a.A + i * a.lda, a.K);
  const int64_t blocks = ceil_div(a.N, 16);
  const int64_t es = esize(a.otype);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = blk * 16;
    int32_t res[kSmallM][16];
    // groups of up to 4 rows; later groups re-read this block's 16 rows of B from L1/L2
    for (int64_t i0 = 0; i0 < a.M; i0 += 4) {
      const int8_t* A = a.A + i0 * a.lda;
      switch (a.M - i0 < 4 ? a.M - i0 : 4) {
        case 1: small_m_block<1>(a, A, corr + i0, j0, res + i0); break;
        case 2: small_m_block<2>(a, A, corr + i0, j0, res + i0); break;
        case 3: small_m_block<3>(a, A, corr + i0, j0, res + i0); break;
        default: small_m_block<4>(a, A, corr + i0, j0, res + i0); break;
      }
    }
    for (int64_t i = 0; i < a.M; ++i) {
      const __m512 alpha = _mm512_set1_ps(row_alpha(a.alpha, a.row_scale, i));
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(res[i])), alpha);
      store16(a.otype, static_cast<char*>(a.out) + i * a.ldo * es, j0, f, lane_mask(a.N - j0));
    }
  }
}

}  // namespace

size_t gemm_s8_avx512_workspace_bytes(const GemmS8Args& a, bool vnni, int nthreads) {
  if (vnni && a.M <= kSmallM) return 0;
  const Layout L = make_layout(a, vnni);
  return L.ap_bytes + L.corr_bytes + size_t(useful_threads(L, nthreads)) * L.bp_bytes;
}

void gemm_s8_avx512(const GemmS8Args& a, bool vnni, void* workspace, int nthreads) {
  if (vnni && a.M <= kSmallM) {
    small_m(a, nthreads);
    return;
  }
  const Layout L = make_layout(a, vnni);
  nthreads = useful_threads(L, nthreads);
  char* ws = static_cast<char*>(workspace);
  int32_t* ap_all = reinterpret_cast<int32_t*>(ws);
  int32_t* corr = reinterpret_cast<int32_t*>(ws + L.ap_bytes);
  char* bp_all = ws + L.ap_bytes + L.corr_bytes;
  const int64_t units = L.n_panels * L.n_strips;
  const int64_t es = esize(a.otype);

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < L.n_strips; ++s)
      pack_a_strip(a, vnni, s, ap_all + s * L.G * kMR, corr);

    const int64_t tid = omp_get_thread_num();
    const int64_t nt = omp_get_num_threads();
    const int64_t u0 = units * tid / nt, u1 = units * (tid + 1) / nt;
    int32_t* bp = reinterpret_cast<int32_t*>(bp_all + size_t(tid) * L.bp_bytes);
    int64_t packed = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t jp = u / L.n_strips, s = u % L.n_strips;
      if (jp != packed) {
        pack_b_panel(a, L, vnni, jp, bp);
        packed = jp;
      }
      const int64_t i0 = s * kMR, j0 = jp * kNR;
      const int64_t n_valid = a.N - j0 < kNR ? a.N - j0 : kNR;
      const int mr = int(a.M - i0 < kMR ? a.M - i0 : kMR);
      const int nv = int(ceil_div(n_valid, 16));
      TileArgs t;
      t.ap = ap_all + s * L.G * kMR;
      t.bp = bp;
      t.G = L.G;
      t.corr = corr + i0;
      t.alpha = a.alpha;
      t.row_scale = a.row_scale ? a.row_scale + i0 : nullptr;
      t.otype = a.otype;
      t.out = static_cast<char*>(a.out) + (i0 * a.ldo + j0) * es;
      t.ldo_bytes = a.ldo * es;
      t.n_valid = n_valid;
      if (vnni)
        tile_dispatch<true>(t, mr, nv);
      else
        tile_dispatch<false>(t, mr, nv);
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

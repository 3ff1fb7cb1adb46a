// int8 x int8 -> int32 GEMM with dequantizing epilogue, AVX2 microkernel (fallback for CPUs without
// AVX-512). Contract: gemm_s8.h; arguments arrive validated (gemm_s8_internal.h). Built with
// -mavx2 -mfma -mf16c, entered only after run-time CPU detection, so it uses nothing with external
// inline linkage.
//
// Layout: K in groups of 2, both operands sign-extended to int16 pairs in one dword, vpmaddwd + vpaddd
// (exact; vpmaddubsw would saturate int16). Packed A: per strip of kMR rows, [G][kMR] dwords. Packed B
// panel: [G][16] dwords, zero past K and past N. Register tile: 6 rows x 2 ymm = 12 accumulators, which
// with the two B vectors and one broadcast fills the 16 ymm registers. Threads as in the AVX-512 file:
// (panel, strip) units in panel-major order, one contiguous range per thread, panel packed once per thread.
#include <immintrin.h>
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

constexpr int kMR = 6;
constexpr int kNR = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align64(size_t n) { return (n + 63) & ~size_t(63); }

struct Layout {
  int64_t G, n_strips, n_panels;
  size_t ap_bytes, bp_bytes;
};

Layout make_layout(const GemmS8Args& a) {
  Layout L;
  L.G = ceil_div(a.K, 2);
  L.n_strips = ceil_div(a.M, kMR);
  L.n_panels = ceil_div(a.N, kNR);
  L.ap_bytes = align64(size_t(L.n_strips) * size_t(L.G) * kMR * 4);
  L.bp_bytes = align64(size_t(L.G) * kNR * 4);
  return L;
}

// More threads than (panel, strip) units would only allocate panel buffers that stay idle.
int useful_threads(const Layout& L, int nthreads) {
  const int64_t units = L.n_panels * L.n_strips;
  return int(units < nthreads ? units : nthreads);
}

inline int32_t pair16(int8_t lo, int8_t hi) {
  return int32_t(uint32_t(uint16_t(int16_t(lo))) | (uint32_t(uint16_t(int16_t(hi))) << 16));
}

void pack_a_strip(const GemmS8Args& a, const Layout& L, int64_t s, int32_t* ap) {
  for (int r = 0; r < kMR; ++r) {
    const int64_t i = s * kMR + r;
    if (i >= a.M) break;
    const int8_t* row = a.A + i * a.lda;
    const int64_t full = a.K / 2;
    for (int64_t g = 0; g < full; ++g) ap[g * kMR + r] = pair16(row[2 * g], row[2 * g + 1]);
    if (a.K % 2) ap[full * kMR + r] = pair16(row[a.K - 1], 0);
    (void)L;
  }
}

// 8x8 dword transpose: r[row] lane col -> r[col] lane row.
inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4h + c], 128-bit lane L = column 4L + c of rows 4h .. 4h+3
  for (int h = 0; h < 2; ++h) {
    u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
  }
}

void pack_b_panel(const GemmS8Args& a, const Layout& L, int64_t jp, int32_t* bp) {
  const int64_t j0 = jp * kNR;
  for (int sb = 0; sb < 2; ++sb) {
    const int64_t jb = j0 + 8 * sb;
    if (jb >= a.N) break;  // never read by the microkernel
    for (int64_t c0 = 0; c0 < L.G; c0 += 8) {
      const int64_t k0 = 2 * c0;
      __m256i r[8];
      for (int x = 0; x < 8; ++x) {
        if (jb + x >= a.N) {
          r[x] = _mm256_setzero_si256();
          continue;
        }
        const int8_t* src = a.B + (jb + x) * a.ldb + k0;
        __m128i v;
        if (k0 + 16 <= a.K) {
          v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
        } else {  // no masked byte loads in AVX2: stage the tail, zero past K
          alignas(16) int8_t tmp[16] = {};
          std::memcpy(tmp, src, size_t(a.K - k0));
          v = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
        }
        r[x] = _mm256_cvtepi8_epi16(v);
      }
      transpose8(r);
      const int64_t gc = L.G - c0 < 8 ? L.G - c0 : 8;
      for (int64_t c = 0; c < gc; ++c)
        _mm256_store_si256(reinterpret_cast<__m256i*>(bp + (c0 + c) * kNR + 8 * sb), r[c]);
    }
  }
}

// RNE fp32 -> bf16 on the bit pattern, NaN -> quiet NaN (same rule as float_to_bf16).
inline __m128i f32_to_bf16(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // values <= 0xffff
}

inline void store8(DType t, void* row, int64_t j, __m256 f, int64_t n) {
  if (n <= 0) return;
  if (t == DType::kFloat32) {
    float* p = static_cast<float*>(row) + j;
    if (n >= 8) {
      _mm256_storeu_ps(p, f);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, f);
      for (int64_t x = 0; x < n; ++x) p[x] = tmp[x];
    }
    return;
  }
  const __m128i h = t == DType::kFloat16 ? _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                         : f32_to_bf16(f);
  uint16_t* p = static_cast<uint16_t*>(row) + j;
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    for (int64_t x = 0; x < n; ++x) p[x] = tmp[x];
  }
}

struct TileArgs {
  const int32_t* ap;
  const int32_t* bp;
  int64_t G;
  float alpha;
  const float* row_scale;  // this strip's rows, or nullptr
  DType otype;
  char* out;
  int64_t ldo_bytes;
  int64_t n_valid;
};

template <int MR>
void tile(const TileArgs& t) {
  __m256i acc[MR][2];
  LOWBIT_UNROLL for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const int32_t* ap = t.ap;
  const int32_t* bp = t.bp;
  for (int64_t g = 0; g < t.G; ++g, ap += kMR, bp += kNR) {
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp + 8));
    LOWBIT_UNROLL for (int r = 0; r < MR; ++r) {
      // 12 accumulators + 2 B + broadcast + product = all 16 ymm registers; with intrinsics GCC 12 spills
      // three accumulators to the stack inside this loop, so the row step is written as asm.
      __m256i x, p;
      __asm__(
          "vpbroadcastd %[m], %[x]\n\t"
          "vpmaddwd %[x], %[b0], %[p]\n\t"
          "vpaddd %[p], %[a0], %[a0]\n\t"
          "vpmaddwd %[x], %[b1], %[p]\n\t"
          "vpaddd %[p], %[a1], %[a1]"
          : [a0] "+x"(acc[r][0]), [a1] "+x"(acc[r][1]), [x] "=&x"(x), [p] "=&x"(p)
          : [b0] "x"(b0), [b1] "x"(b1), [m] "m"(ap[r]));
    }
  }
  LOWBIT_UNROLL for (int r = 0; r < MR; ++r) {
    const __m256 alpha = _mm256_set1_ps(row_alpha(t.alpha, t.row_scale, r));
    char* row = t.out + r * t.ldo_bytes;
    LOWBIT_UNROLL for (int v = 0; v < 2; ++v)
      store8(t.otype, row, 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][v]), alpha), t.n_valid - 8 * v);
  }
}

void tile_dispatch(const TileArgs& t, int mr) {
  static_assert(kMR == 6, "tile_dispatch enumerates kMR");
  switch (mr) {
    case 1: tile<1>(t); break;
    case 2: tile<2>(t); break;
    case 3: tile<3>(t); break;
    case 4: tile<4>(t); break;
    case 5: tile<5>(t); break;
    default: tile<6>(t); break;
  }
}

}  // namespace

size_t gemm_s8_avx2_workspace_bytes(const GemmS8Args& a, int nthreads) {
  const Layout L = make_layout(a);
  return L.ap_bytes + size_t(useful_threads(L, nthreads)) * L.bp_bytes;
}

void gemm_s8_avx2(const GemmS8Args& a, void* workspace, int nthreads) {
  const Layout L = make_layout(a);
  nthreads = useful_threads(L, nthreads);
  char* ws = static_cast<char*>(workspace);
  int32_t* ap_all = reinterpret_cast<int32_t*>(ws);
  char* bp_all = ws + L.ap_bytes;
  const int64_t units = L.n_panels * L.n_strips;
  const int64_t es = a.otype == DType::kFloat32 ? 4 : 2;

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < L.n_strips; ++s) pack_a_strip(a, L, s, ap_all + s * L.G * kMR);

    const int64_t tid = omp_get_thread_num();
    const int64_t nt = omp_get_num_threads();
    const int64_t u0 = units * tid / nt, u1 = units * (tid + 1) / nt;
    int32_t* bp = reinterpret_cast<int32_t*>(bp_all + size_t(tid) * L.bp_bytes);
    int64_t packed = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t jp = u / L.n_strips, s = u % L.n_strips;
      if (jp != packed) {
        pack_b_panel(a, L, jp, bp);
        packed = jp;
      }
      const int64_t i0 = s * kMR, j0 = jp * kNR;
      TileArgs t;
      t.ap = ap_all + s * L.G * kMR;
      t.bp = bp;
      t.G = L.G;
      t.alpha = a.alpha;
      t.row_scale = a.row_scale ? a.row_scale + i0 : nullptr;
      t.otype = a.otype;
      t.out = static_cast<char*>(a.out) + (i0 * a.ldo + j0) * es;
      t.ldo_bytes = a.ldo * es;
      t.n_valid = a.N - j0 < kNR ? a.N - j0 : kNR;
      tile_dispatch(t, int(a.M - i0 < kMR ? a.M - i0 : kMR));
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

// Weight-only quantized matmul and dequantize (include/lowbit/kernels/wq.h), generic translation unit:
// argument and index checks, the scalar reference, the portable tile kernel, x' preparation, threading,
// the epilogue, CPU-feature dispatch, and wq_dequantize. Built without ISA flags: runs on any x86-64.
//
// wq_matmul, every path (wq_internal.h explains the split with the ISA files):
//   1. wq_validate_matmul, then every g_idx entry in [0, groups) and perm a permutation of 0..K-1, before
//      anything is written.
//   2. x' = x[m, perm[r]] * channel_scale[perm[r]] in fp32, gathered into STORED row order, once per
//      call, in row tiles of MT = 1, 2, 4 or 8 rows of x: tile layout (K, MT), x'[r][m] at r * MT + m, so
//      the kernels broadcast x'[r][m] from one short contiguous line per stored row.
//   3. chunk_group[c]: the group every row (below K) of 32-row chunk c shares, or -1.
//   4. Units = (column block, row tile), block-major, spread over OpenMP threads (static). A unit runs a
//      tile kernel (AVX-512, AVX2 + portable tail columns, or portable) into the thread's fp32 acc
//      buffer, then the epilogue here: out = to_otype(acc + bias), one rounding.
// Reduction order of every output: stored rows 0..K-1, acc = fma(x', w, acc) from acc = +0 -- the
// definition wq_matmul_ref runs, so all paths are bitwise equal to it for every thread count.
#include "lowbit/kernels/wq.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "../validate.h"
#include "lowbit/kernels/float_convert.h"
#include "wq_internal.h"
#include "cpu_features.h"

namespace lowbit {
namespace cpu {
namespace detail {
namespace {

using validate::err;
using validate::invalid_got;

inline float load_f(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.0f;
}

inline void store_f(DType t, void* p, int64_t i, float v) {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(p)[i] = v; break;
    case DType::kFloat16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
  }
}

// The dequantized value of wq.h, in fp32.
inline float dequant(float s, float z, uint32_t q, bool asym) {
  const float qf = float(q);
  return asym ? s * (qf - z) : std::fma(s, qf, -z);
}

// Every g_idx entry in [0, groups); perm (when given) a permutation of 0..K-1. Reads only the index
// arrays (N > 0: validation guarantees g_idx is not null).
Status check_indices(const char* fn, const WqWeight& w) {
  // A vectorizable min / max pass (this runs on every call), then the search for the culprit.
  int32_t lo = w.g_idx[0], hi = w.g_idx[0];
  for (int64_t r = 1; r < w.K; ++r) {
    lo = w.g_idx[r] < lo ? w.g_idx[r] : lo;
    hi = w.g_idx[r] > hi ? w.g_idx[r] : hi;
  }
  if (lo < 0 || hi >= w.groups) {
    for (int64_t r = 0; r < w.K; ++r) {
      const int32_t g = w.g_idx[r];
      if (g < 0 || g >= w.groups)
        return invalid_got(fn,
                           "g_idx[" + std::to_string(r) + "] must be in [0, groups=" + std::to_string(w.groups) + ")",
                           g);
    }
  }
  if (w.perm != nullptr) {
    std::unique_ptr<int64_t[]> seen(new (std::nothrow) int64_t[size_t(w.K)]);
    if (!seen) return Status::invalid(err(fn, "cannot allocate the permutation check"));
    for (int64_t k = 0; k < w.K; ++k) seen[k] = -1;
    for (int64_t r = 0; r < w.K; ++r) {
      const int32_t p = w.perm[r];
      if (p < 0 || p >= w.K)
        return invalid_got(fn, "perm[" + std::to_string(r) + "] must be in [0, K=" + std::to_string(w.K) + ")", p);
      if (seen[p] >= 0)
        return invalid_got(fn,
                           "perm must be a permutation: perm[" + std::to_string(r) + "] repeats perm[" +
                               std::to_string(seen[p]) + "]",
                           p);
      seen[p] = r;
    }
  }
  return Status::ok();
}

// Segment geometry of a validated weight; chunk_group filled by the caller.
WqTileArgs make_args(const WqWeight& w) {
  WqTileArgs a{};
  a.K = w.K;
  a.N = w.N;
  a.qweight = w.qweight;
  a.nseg = w.nseg;
  int64_t start = 0, q0 = 0, c0 = 0;
  for (int32_t s = 0; s < w.nseg; ++s) {
    a.bits[s] = w.bits[s];
    a.row_start[s] = start;
    a.row_end[s] = w.row_end[s];
    a.qrow0[s] = q0;
    a.chunk0[s] = c0;
    const int64_t chunks = (w.row_end[s] - start + 31) / 32;
    q0 += chunks * w.bits[s];
    c0 += chunks;
    start = w.row_end[s];
  }
  a.g_idx = w.g_idx;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.sdtype = int32_t(w.sdtype);
  a.asym = w.asym;
  a.chunk_group = nullptr;
  return a;
}

int64_t total_chunks(const WqTileArgs& a) {
  return a.chunk0[a.nseg - 1] + (a.row_end[a.nseg - 1] - a.row_start[a.nseg - 1] + 31) / 32;
}

// Code of stored row j (0..31) of a chunk of width b whose words for this column are wv[0..b-1], with
// wv[b] = 0: the 64 bits starting at word i = j*b / 32 hold the whole code (it spans at most two words).
inline uint32_t code_of(const uint32_t* wv, int b, int j) {
  const int bit = j * b, i = bit >> 5, sh = bit & 31;
  const uint64_t pair = uint64_t(wv[i]) | (uint64_t(wv[i + 1]) << 32);
  return uint32_t(pair >> sh) & ((1u << b) - 1u);
}

// Portable tile kernel: same contract as wq_tile_avx512 (any ncols, ldacc >= ncols), scalar.
void tile_portable(const WqTileArgs& A, const float* xs, int MT, int64_t n0, int64_t ncols, float* acc,
                   int64_t ldacc) {
  const int64_t N = A.N;
  const DType sd = DType(A.sdtype);
  for (int m = 0; m < MT; ++m)
    for (int64_t n = 0; n < ncols; ++n) acc[m * ldacc + n] = 0.0f;
  for (int s = 0; s < A.nseg; ++s) {
    const int b = A.bits[s];
    const int64_t chunks = (A.row_end[s] - A.row_start[s] + 31) / 32;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = A.row_start[s] + 32 * c;
      const int rows = A.row_end[s] - r0 >= 32 ? 32 : int(A.row_end[s] - r0);
      const int64_t g = A.chunk_group[A.chunk0[s] + c];
      const uint32_t* qrow = A.qweight + (A.qrow0[s] + c * b) * N;
      for (int64_t n = n0; n < n0 + ncols; ++n) {
        uint32_t wv[9] = {};
        for (int i = 0; i < b; ++i) wv[i] = qrow[i * N + n];
        float a[8];
        for (int m = 0; m < MT; ++m) a[m] = acc[m * ldacc + (n - n0)];
        int64_t gcur = -1;
        float sv = 0.0f, zv = 0.0f;
        for (int j = 0; j < rows; ++j) {
          const int64_t r = r0 + j;
          const int64_t gr = g >= 0 ? g : int64_t(A.g_idx[r]);
          if (gr != gcur) {
            gcur = gr;
            sv = load_f(sd, A.scales, gr * N + n);
            zv = load_f(sd, A.zeros, gr * N + n);
          }
          const float wq = dequant(sv, zv, code_of(wv, b, j), A.asym);
          const float* xr = xs + r * MT;
          for (int m = 0; m < MT; ++m) a[m] = std::fma(xr[m], wq, a[m]);
        }
        for (int m = 0; m < MT; ++m) acc[m * ldacc + (n - n0)] = a[m];
      }
    }
  }
}

WqIsa detect_isa() {
  // Every flag an ISA file is compiled with that the compiler could use for its code (CMake adds
  // avx512vnni too; that file has no integer dot products, the only thing it would be used for).
  const bool avx2 = cpu_has_avx2_set();
  const bool avx512 = cpu_has_avx512_set();
  return avx512 ? WqIsa::kAvx512 : avx2 ? WqIsa::kAvx2 : WqIsa::kScalar;
}

// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kParallelMinMacs = int64_t(1) << 18;

struct RowTile {
  int64_t m0;    // first row of x
  int mt;        // rows of x in the tile
  int MT;        // kernel tile height (1, 2, 4, 8), >= mt; rows past mt are zero in x'
  int64_t xoff;  // offset of the tile's (K, MT) block in the x' buffer
};

// M = 8q + rest; rest 1, 2, 4 exact, 3 -> one padded 4, 5 -> 4 + 1, 6 -> 4 + 2, 7 -> one padded 8.
std::vector<RowTile> make_tiles(int64_t M, int64_t K) {
  std::vector<RowTile> t;
  int64_t m = 0, off = 0;
  auto add = [&](int mt, int MT) {
    t.push_back({m, mt, MT, off});
    m += mt;
    off += K * MT;
  };
  while (M - m >= 8) add(8, 8);
  switch (M - m) {
    case 1: add(1, 1); break;
    case 2: add(2, 2); break;
    case 3: add(3, 4); break;
    case 4: add(4, 4); break;
    case 5: add(4, 4); add(1, 1); break;
    case 6: add(4, 4); add(2, 2); break;
    case 7: add(7, 8); break;
    default: break;
  }
  return t;
}

template <class T>
T* alloc_aligned(std::unique_ptr<char[]>& owner, size_t n) {
  owner.reset(new (std::nothrow) char[n * sizeof(T) + 64]);
  if (!owner) return nullptr;
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(owner.get()) + 63) & ~uintptr_t(63));
}

}  // namespace

WqIsa wq_best_isa() {
  static const WqIsa isa = detect_isa();
  return isa;
}

const char* wq_isa_name(WqIsa isa) {
  switch (isa) {
    case WqIsa::kAvx512: return "avx512";
    case WqIsa::kAvx2: return "avx2";
    case WqIsa::kScalar: return "scalar";
  }
  return "scalar";
}

Status wq_matmul_isa(WqIsa isa, const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx,
                     const void* bias, void* out, int64_t ldo, int nthreads, int64_t block_cols) {
  const char* fn = "wq_matmul";
  Status st = wq_validate_matmul(fn, w, x, xtype, M, ldx, out, ldo);
  if (!st.is_ok()) return st;
  if (w.N == 0) return Status::ok();
  st = check_indices(fn, w);
  if (!st.is_ok()) return st;
  if (M == 0) return Status::ok();
  if (int32_t(isa) < 0 || int32_t(isa) > int32_t(wq_best_isa()))
    return Status::invalid(err(fn, std::string("ISA ") + wq_isa_name(isa) + " not supported by this CPU"));

  const int64_t K = w.K, N = w.N;
  WqTileArgs args = make_args(w);
  const DType sd = w.sdtype;

  // Chunk groups.
  const int64_t nchunks = total_chunks(args);
  std::unique_ptr<char[]> cg_owner;
  int32_t* cg = alloc_aligned<int32_t>(cg_owner, size_t(nchunks));
  if (cg == nullptr) return Status::invalid(err(fn, "cannot allocate the chunk table"));
  for (int32_t s = 0; s < args.nseg; ++s) {
    const int64_t chunks = (args.row_end[s] - args.row_start[s] + 31) / 32;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = args.row_start[s] + 32 * c;
      const int64_t r1 = r0 + 32 < args.row_end[s] ? r0 + 32 : args.row_end[s];
      const int32_t g = w.g_idx[r0];
      bool same = true;
      for (int64_t r = r0 + 1; r < r1; ++r) same &= w.g_idx[r] == g;
      cg[args.chunk0[s] + c] = same ? g : -1;
    }
  }
  args.chunk_group = cg;

  // Threads and blocks.
  const std::vector<RowTile> tiles = make_tiles(M, K);
  const int64_t ntiles = int64_t(tiles.size());
  int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
  if (nthreads <= 0 && double(M) * double(N) * double(K) < double(kParallelMinMacs)) nt = 1;
  int64_t nb = 256;
  if (block_cols > 0) {
    nb = (block_cols + 31) / 32 * 32;
  } else {
    // Several row tiles re-read the block's words: keep them within ~512 KiB (L2) when possible.
    if (ntiles > 1) {
      const int64_t qbytes = int64_t(4) * (args.qrow0[args.nseg - 1] +
                                           (args.row_end[args.nseg - 1] - args.row_start[args.nseg - 1] + 31) / 32 *
                                               args.bits[args.nseg - 1]);
      while (nb > 32 && qbytes * nb > (int64_t(512) << 10)) nb /= 2;
    }
    // Enough units for every thread (two each), down to 32-column blocks.
    while (nb > 32 && (N + nb - 1) / nb * ntiles < 2 * int64_t(nt)) nb /= 2;
  }
  const int64_t nblocks = (N + nb - 1) / nb;
  const int64_t units = nblocks * ntiles;
  if (units < nt) nt = int(units);

  // x' tiles and the bias in fp32.
  std::unique_ptr<char[]> xs_owner, cs_owner, bias_owner, acc_owner;
  float* xs = alloc_aligned<float>(xs_owner, size_t(tiles.back().xoff + K * tiles.back().MT));
  float* csf = w.channel_scale != nullptr ? alloc_aligned<float>(cs_owner, size_t(K)) : nullptr;
  float* bf = bias != nullptr ? alloc_aligned<float>(bias_owner, size_t(N)) : nullptr;
  const int64_t ldacc = (nb + 63) / 64 * 64;  // the AVX-512 kernel's padding (wq_internal.h)
  float* accs = alloc_aligned<float>(acc_owner, size_t(nt) * 8 * size_t(ldacc));
  if (xs == nullptr || accs == nullptr || (w.channel_scale != nullptr && csf == nullptr) ||
      (bias != nullptr && bf == nullptr))
    return Status::invalid(err(fn, "cannot allocate the workspace (M=" + std::to_string(M) + ")"));
  if (csf != nullptr)
    for (int64_t k = 0; k < K; ++k) csf[k] = load_f(sd, w.channel_scale, k);
  if (bf != nullptr)
    for (int64_t n = 0; n < N; ++n) bf[n] = load_f(sd, bias, n);

  const int prep_nt = double(M) * double(K) >= double(1 << 16) ? nt : 1;
#pragma omp parallel for schedule(static) num_threads(prep_nt) if (prep_nt > 1)
  for (int64_t r = 0; r < K; ++r) {
    const int64_t k = w.perm != nullptr ? int64_t(w.perm[r]) : r;
    for (const RowTile& t : tiles) {
      float* dst = xs + t.xoff + r * t.MT;
      for (int m = 0; m < t.MT; ++m) {
        if (m >= t.mt) {
          dst[m] = 0.0f;
          continue;
        }
        const float xv = load_f(xtype, x, (t.m0 + m) * ldx + k);
        dst[m] = csf != nullptr ? xv * csf[k] : xv;
      }
    }
  }

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* acc = accs + size_t(omp_get_thread_num()) * 8 * size_t(ldacc);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n0 = (u / ntiles) * nb;
      const RowTile& t = tiles[size_t(u % ntiles)];
      const int64_t ncols = N - n0 < nb ? N - n0 : nb;
      const float* xt = xs + t.xoff;
      if (isa == WqIsa::kAvx512) {
        wq_tile_avx512(args, xt, t.MT, n0, ncols, acc, ldacc);
      } else if (isa == WqIsa::kAvx2) {
        const int64_t nv = ncols & ~int64_t(7);
        if (nv > 0) wq_tile_avx2(args, xt, t.MT, n0, nv, acc, ldacc);
        if (nv < ncols) tile_portable(args, xt, t.MT, n0 + nv, ncols - nv, acc + nv, ldacc);
      } else {
        tile_portable(args, xt, t.MT, n0, ncols, acc, ldacc);
      }
      // Epilogue: bias, one rounding to the output dtype.
      for (int m = 0; m < t.mt; ++m) {
        const float* a = acc + m * ldacc;
        const int64_t o = (t.m0 + m) * ldo + n0;
        for (int64_t n = 0; n < ncols; ++n) store_f(xtype, out, o + n, bf != nullptr ? a[n] + bf[n0 + n] : a[n]);
      }
    }
  }
  return Status::ok();
}

}  // namespace detail

Status wq_matmul(const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx, const void* bias, void* out,
                 int64_t ldo) {
  return detail::wq_matmul_isa(detail::wq_best_isa(), w, x, xtype, M, ldx, bias, out, ldo);
}

// The definition: one thread, for each output the stored rows in increasing order, acc = fmaf(x', w, acc)
// from +0, then + bias, one rounding. The code is read bit by bit (bit j*b + t of the chunk's words).
Status wq_matmul_ref(const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx, const void* bias,
                     void* out, int64_t ldo) {
  const char* fn = "wq_matmul_ref";
  Status st = wq_validate_matmul(fn, w, x, xtype, M, ldx, out, ldo);
  if (!st.is_ok()) return st;
  if (w.N == 0) return Status::ok();
  st = detail::check_indices(fn, w);
  if (!st.is_ok()) return st;
  const int64_t N = w.N;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      int64_t start = 0, q0 = 0;
      for (int32_t s = 0; s < w.nseg; ++s) {
        const int b = w.bits[s];
        for (int64_t r = start; r < w.row_end[s]; ++r) {
          const int64_t local = r - start, c = local / 32, j = local % 32;
          const uint32_t* words = w.qweight + (q0 + c * b) * N + n;  // word i of the chunk at words[i * N]
          uint32_t q = 0;
          for (int t = 0; t < b; ++t) {
            const int64_t pos = j * b + t;
            q |= ((words[(pos / 32) * N] >> (pos % 32)) & 1u) << t;
          }
          const int64_t g = w.g_idx[r];
          const float wv = detail::dequant(detail::load_f(w.sdtype, w.scales, g * N + n),
                                           detail::load_f(w.sdtype, w.zeros, g * N + n), q, w.asym);
          const int64_t k = w.perm != nullptr ? int64_t(w.perm[r]) : r;
          float xv = detail::load_f(xtype, x, m * ldx + k);
          if (w.channel_scale != nullptr) xv = xv * detail::load_f(w.sdtype, w.channel_scale, k);
          acc = std::fma(xv, wv, acc);
        }
        q0 += (w.row_end[s] - start + 31) / 32 * b;
        start = w.row_end[s];
      }
      if (bias != nullptr) acc = acc + detail::load_f(w.sdtype, bias, n);
      detail::store_f(xtype, out, m * ldo + n, acc);
    }
  return Status::ok();
}

namespace {

// Stored row r into out row perm[r], columns [n0, n1): code from (at most) two word rows, the fp32
// formula, one rounding. Templated on the dtypes so the inner loop has no switches.
template <DType SD, DType OT>
void dequant_row(const WqWeight& w, const detail::WqTileArgs& a, int64_t r, int64_t n0, int64_t n1, void* out,
                 int64_t ldo) {
  int s = 0;
  while (r >= a.row_end[s]) ++s;
  const int b = a.bits[s];
  const int64_t local = r - a.row_start[s], c = local / 32, j = local % 32;
  const int bit = int(j) * b, i = bit >> 5, sh = bit & 31;
  const bool straddle = sh + b > 32;
  const int64_t N = a.N;
  const uint32_t* w0 = a.qweight + (a.qrow0[s] + c * b + i) * N;
  const uint32_t* w1 = straddle ? w0 + N : w0;  // word i + 1 is inside the chunk whenever the code straddles
  const uint32_t mask = (1u << b) - 1u;
  const int64_t g = w.g_idx[r];
  const int64_t k = w.perm != nullptr ? int64_t(w.perm[r]) : r;
  for (int64_t n = n0; n < n1; ++n) {
    uint32_t v = w0[n] >> sh;
    if (straddle) v |= w1[n] << (32 - sh);
    const float wv = detail::dequant(detail::load_f(SD, w.scales, g * N + n), detail::load_f(SD, w.zeros, g * N + n),
                                     v & mask, w.asym);
    detail::store_f(OT, out, k * ldo + (n - n0), wv);
  }
}

template <DType SD>
void dequant_rows_sd(const WqWeight& w, const detail::WqTileArgs& a, int64_t n0, int64_t n1, DType otype, void* out,
                     int64_t ldo, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < w.K; ++r) {
    switch (otype) {
      case DType::kFloat32: dequant_row<SD, DType::kFloat32>(w, a, r, n0, n1, out, ldo); break;
      case DType::kFloat16: dequant_row<SD, DType::kFloat16>(w, a, r, n0, n1, out, ldo); break;
      case DType::kBFloat16: dequant_row<SD, DType::kBFloat16>(w, a, r, n0, n1, out, ldo); break;
    }
  }
}

}  // namespace

Status wq_dequantize(const WqWeight& w, int64_t n0, int64_t n1, DType otype, void* out, int64_t ldo) {
  const char* fn = "wq_dequantize";
  Status st = wq_validate_dequantize(fn, w, n0, n1, otype, out, ldo);
  if (!st.is_ok()) return st;
  if (n1 == n0) return Status::ok();
  st = detail::check_indices(fn, w);
  if (!st.is_ok()) return st;
  const detail::WqTileArgs a = detail::make_args(w);
  int nt = omp_get_max_threads();
  if (double(w.K) * double(n1 - n0) < double(1 << 16)) nt = 1;
  switch (w.sdtype) {
    case DType::kFloat32: dequant_rows_sd<DType::kFloat32>(w, a, n0, n1, otype, out, ldo, nt); break;
    case DType::kFloat16: dequant_rows_sd<DType::kFloat16>(w, a, n0, n1, otype, out, ldo, nt); break;
    case DType::kBFloat16: dequant_rows_sd<DType::kBFloat16>(w, a, n0, n1, otype, out, ldo, nt); break;
  }
  return Status::ok();
}

}  // namespace cpu
}  // namespace lowbit

// Weight-only quantized matmul and dequantize on CUDA (sm_80 .. sm_90a). Contract, stored form and the
// exact dequantization formula: include/lowbit/kernels/wq.h.
//
//   out (M, N) = x' W (+ bias),   x'[m, k] = x[m, k] * channel_scale[k],   W[perm[r], n] = w(stored row r, n)
//
// This is the kernel LLM decode runs on (M = 1 .. 32): it must stream qweight (plus scales / zeros) at HBM
// bandwidth. Everything below is shaped by that.
//
// Work decomposition (wq_matmul_kernel<B, MT>)
// --------------------------------------------
//   * One launch per segment (B = the segment's width, a template parameter, so each width gets its own
//     register allocation: an 8-bit chunk needs 4x the word registers of a 2-bit one).
//   * A thread owns kCols = 4 columns. Vector mode (N % 4 == 0 and qweight 16-byte aligned): the 4 are
//     ADJACENT and each word row of a chunk is one 16-byte ld.global.nc.L1::no_allocate (the weights are
//     read exactly once). Scalar mode (any other N or base): the thread's columns are lane, lane + 32,
//     lane + 64, lane + 96 of the tile, so that every 4-byte load instruction of the warp still reads one
//     contiguous 128-byte line; columns past N are masked. Same code, a run-time flag picks the mapping;
//     both sum every column in the same order, so they give the same bits.
//   * A warp covers a 128-column tile; a block has kWarps = 4 warps on the SAME 128 columns that split the
//     block's range of 32-row chunks into 4 contiguous pieces (contiguous, so that consecutive chunks of a
//     warp usually share their group and its scales / zeros stay in registers). At the end the 4 warps'
//     accumulators are summed through shared memory in warp order (fixed: deterministic).
//   * grid.x = M-tiles x N-tiles with the M-tile fastest: the blocks that read the same weights for
//     different rows of x are dispatched together, so for M > 8 the weights come from DRAM once and from
//     L2 for the other M-tiles. MT (rows of x per block) is the smallest of 1, 2, 4, 8 >= min(M, 8).
//   * grid.y = split-K: the segment's chunks are cut into `splits` ranges so that the launch has about as
//     many blocks as the SMs hold at once (min_blocks(B, MT) per SM: one wave, rounded down so that no
//     small second wave forms a tail), but never fewer than kMinChunksPerWarp chunks per warp. With one
//     segment and one split the block writes out itself (bias added, one rounding). Otherwise each
//     (segment, split) writes its fp32 partial sums to its own slot of the caller's workspace
//     ([slots][M][N]) and wq_reduce_kernel sums the slots in slot order, adds the bias and rounds once.
//     No float atomics anywhere: the result depends only on the shape and the SM count (which fix the
//     plan), never on timing. On sm_90 the reduce kernel is a programmatic dependent launch (the main
//     kernel triggers at block start, the reduce kernel waits in griddepcontrol.wait), which hides its
//     launch latency behind the main kernel; a driver that refuses the attribute gets a plain launch.
//     Examples (132 SMs, 4-bit, M = 1): K = N = 4096: 32 tiles x 16 splits, 2 chunks per warp, 256 KB of
//     workspace; K = 8192, N = 28672: 224 tiles x 2 splits, 32 chunks per warp.
//
// Per chunk (32 stored rows), per warp; a software pipeline one chunk deep:
//   1. x' of the chunk (loaded one iteration earlier as raw bits) is converted to fp32, multiplied by the
//      channel scale and stored into the warp's shared tile: lane j holds stored row r0 + j, i.e. original
//      channel perm[r0 + j]; rows past K and rows past M are 0. The inner loop reads the tile with
//      broadcast float4 loads, so perm and channel_scale cost nothing there.
//   2. Prefetch: g_idx / perm of chunk c + 2, and x, channel_scale and (when the group changes) scales /
//      zeros of chunk c + 1, whose g_idx / perm arrived during the previous chunk.
//   3. Decode + FMA of the chunk: acc[m][c] += x'[m][j] * w in fp32, rows j = 0..31 in order.
//   4. The words of chunk c + 1 (issued one iteration ago) become current; issue those of chunk c + 2.
//   Nothing that is loaded is used in the iteration that loads it, so the loads overlap the decode; the
//   prologue issues the words of the first two chunks before anything else.
//
// Groups: lane j reads g_idx[r0 + j] (clamped into [0, groups); rows past K take lane 0's group). When all
// 32 rows have one group (__all_sync) the scales / zeros of the thread's 4 columns are loaded once and kept
// in registers while the group stays the same; otherwise (act-order without a sorting perm) the chunk
// takes a compact row-by-row loop that fetches s and z for every row (correct, slow).
//
// Decode cost is what limits M = 1 on H100 (at 75% of HBM bandwidth there are about 6 issue slots per
// 4-bit weight, 3 per 2-bit weight), so the uniform-group path spends ~2.4 instructions per weight plus
// the FMA into the accumulator:
//   * Extraction puts the code q straight into the mantissa of a float whose exponent field is that of
//     2^23: F = 2^23 + q * 2^P, exact (P + B <= 23). For B in {1, 2, 4, 8} the code bytes are isolated by
//     one shift + mask per word and bit offset (shared by the 4 codes at that offset), and each code is
//     moved into place by one PRMT (__byte_perm) that also supplies the exponent byte; for B in {3, 5, 6}
//     it is one (funnel) shift plus one LOP3 per code. Code positions are compile-time constants (the
//     chunk is fully unrolled).
//   * Fast dequantization: w = fma(S, F, -C) with S = s * 2^-P and C = s * 2^(23-P) + z (sym) or
//     s * 2^(23-P) + s * z (asym). Mathematically S*F - C = s*q - z (sym) resp. s*(q - z) (asym), and an
//     FMA rounds once, so w has exactly the bits of the wq.h expression PROVIDED C (and, asym, s*z and
//     q - z) are exact in fp32. That is checked once per group and column (TwoSum-style: c - T == u and
//     c - u == T; fails on inf / NaN too), with |s| >= 2^-100 so that S is exact; it holds for the fp16 /
//     bf16 scales and zeros of real checkpoints. A thread whose 4 columns do not all pass uses the generic
//     form for that group: F built at P = 0, q = F - 2^23 (exact), w = fma(s, q - D, E) with
//     (D, E) = (0, -z) for sym (= the wq.h fmaf(s, q, -z)) or (z, -0) for asym (= s * (q - z), one
//     rounding). Either way the dequantized value is the one wq.h defines; only the speed differs.
//     P = 16 for B <= 6 and 8 for B = 8 (C = s*128 + z resp. s*32768 + z).
//   SASS (sm_90a) of the fast chunk body, per thread, 32 rows x 4 columns = 128 weights, M = 1:
//     4-bit: 256 FFMA, 128 PRMT, ~28 LOP3, ~14 SHF, 8 LDS.128;  2-bit / 1-bit: the same plus ~10 SHF;
//     8-bit: 256 FFMA, 128 PRMT;  3/5/6-bit: 256 FFMA, ~128 LOP3, ~65-90 SHF / IMAD.SHL.  M = 8 adds 7 FFMA
//     per weight and 2 LDS.128 per row. The generic body adds 2 FADD per weight. No local memory.
//
// Indices: g_idx and perm are clamped into range (wq.h): a corrupted index cannot read or write out of
// bounds. Rows of a partial last chunk past K get x' = 0 and lane 0's group, so their (ignored) padding
// bits dequantize to finite values that add exact zeros.
//
// wq_dequantize_kernel<B>: one thread per (column, chunk) in a grid-stride loop over chunks; it decodes
// the column's B words and writes the 32 rows to out[perm[r], n - n0] with the literal wq.h expression,
// rounded once to otype. Consecutive threads take consecutive columns, so loads and stores coalesce.
//
// No host sync, no allocation, only the given stream; capturable in a CUDA graph (PDL edge included).
// Never build with --use_fast_math (the fast path relies on IEEE FMA / add semantics and no FTZ).
//
// Resources (nvcc 13.0, -O3, -Xptxas -v; 0 spills and 0 stack on sm_80, 86, 89 and 90a), registers on
// sm_90a (the __launch_bounds__ caps are min_blocks below):
//   wq_matmul_kernel  MT=1: B=1..4 124-128, B=5/6 168, B=8 241;  MT=2: B<=4 128, B=5/6 167-168, B=8 250;
//                     MT=4: 158-168, B=8 247;  MT=8: 168, B=8 253.  Shared memory 2.5 KB x MT.
//   wq_dequantize_kernel 32-44, wq_reduce_kernel 32. sm_80 .. sm_89: within a few registers of these.
//   Compile time of this file for 80;86;89;90a: ~72 s on one core (28 matmul variants x 2 unrolled
//   bodies; x, scale and output dtypes are run-time switches outside the inner loop).
#include "lowbit/kernels/wq.h"
#include "pdl.cuh"
#include "wq_internal.cuh"

#ifdef __USE_FAST_MATH__
#error "wq_matmul.cu must not be built with --use_fast_math: its exact dequantization needs IEEE fp32"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "../validate.h"

namespace lowbit {
namespace cuda {
namespace {

using namespace wq_detail;

// ---------------------------------------------------------------------------------------------------
// Geometry and tuning.
constexpr int64_t kWgFusedMaxRows = 256;    // wq_matmul_fused_max_rows with the warpgroup kernel
constexpr int64_t kWgtFusedMaxRows = 1024;  // ... with the TMA-fed one on layers with K >= 8192
constexpr int kWarps = 4;                 // warps per block, splitting the block's chunks
constexpr int kThreads = 32 * kWarps;     // 128
constexpr int kCols = 4;                  // columns per thread
constexpr int kTileN = 32 * kCols;        // 128 columns per block
constexpr int kMinChunksPerWarp = 2;      // ... but never fewer chunks than this per warp and split
constexpr int64_t kMaxGridY = 65535;
constexpr int kReduceThreads = 256;
constexpr int kDequantThreads = 256;
constexpr uint32_t kMagic = 0x4B000000u;  // bits of 2^23; its byte 2 is 0, bit 23 (exponent LSB) is 0
constexpr float kTwo23 = 8388608.0f;

// Mantissa position of the code in the fast path's F = 2^23 + q * 2^P (P + B <= 23).
__host__ __device__ constexpr int fast_pos(int B) { return B == 8 ? 8 : 16; }

// ---------------------------------------------------------------------------------------------------
// Loads, conversions, stores. dt: 0 fp32, 1 fp16, 2 bf16 (the DType values).

// c ? a : b through inline PTX: the optimizer cannot turn a chain of these over a register array into a
// dynamically indexed load, which would move the array to local memory.
__device__ __forceinline__ uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  uint32_t r;
  asm("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %3, 0;\n\tselp.b32 %0, %1, %2, p;\n\t}"
      : "=r"(r)
      : "r"(a), "r"(b), "r"(uint32_t(c)));
  return r;
}


// ---------------------------------------------------------------------------------------------------
// Code extraction. w[i][c]: word i of the chunk (0..B-1), column c. Returns the bits of
// F = 2^23 + q_j * 2^T for code j (0..31) of column c. j, T and B are compile-time constants once the
// chunk loop is unrolled, so every shift, mask and selector folds to an immediate.

// __byte_perm selector: byte k of the first operand into output byte tb, byte 3 of the second (0x4B)
// into output byte 3, byte 0 of the second (0x00) everywhere else.
__host__ __device__ constexpr uint32_t prmt_sel(int tb, int k) {
  uint32_t s = 0;
  for (int n = 0; n < 4; ++n) s |= uint32_t(n == tb ? k : (n == 3 ? 7 : 4)) << (4 * n);
  return s;
}

// `magic` is kMagic, but handed in from a kernel parameter: were it a literal, ptxas would encode it as the
// PRMT immediate and materialize the (varying) selector in a register before every PRMT, and split
// (t & mask) | magic into two LOP3s (one immediate each).
template <int B, int T>
__device__ __forceinline__ uint32_t code_bits(const uint32_t (&w)[B][kCols], int c, int j, uint32_t magic) {
  static_assert(T + B <= 23, "the code must stay inside the mantissa");
  const int pos = j * B;
  const int i = pos >> 5, sh = pos & 31;
  if constexpr (B == 1 || B == 2 || B == 4 || B == 8) {
    // Byte-aligned groups of codes: isolate the codes at offset r of every byte (shared by the 4 codes
    // of the word that sit at that offset), then move byte (sh / 8) into output byte T / 8.
    static_assert(T % 8 == 0, "PRMT moves whole bytes");
    constexpr uint32_t kMask = B == 8 ? 0xFFFFFFFFu : ((1u << B) - 1u) * 0x01010101u;
    const uint32_t m = (w[i][c] >> (sh & 7)) & kMask;
    return __byte_perm(m, magic, prmt_sel(T / 8, sh >> 3));
  } else {
    // 3, 5, 6 bits: codes may straddle two words (funnel shift); move to bit T, mask, add the exponent.
    uint32_t t;
    if (sh + B > 32)
      t = __funnelshift_r(w[i][c], w[i + 1 < B ? i + 1 : i][c], sh - T);  // straddling: sh >= 27 > T
    else if (sh >= T)
      t = w[i][c] >> (sh - T);
    else
      t = w[i][c] << (T - sh);
    return (t & (((1u << B) - 1u) << T)) | magic;  // one LOP3 (a literal magic would make it two)
  }
}

// ---------------------------------------------------------------------------------------------------
// The main kernel.

struct MainArgs {
  const uint32_t* qweight;  // word row 0 of THIS segment; row stride N
  int64_t N, K;
  int64_t row0;     // first stored row of the segment
  int64_t chunks;   // 32-row chunks of the segment
  int64_t cps;      // chunks per split (blockIdx.y)
  int64_t mtiles;   // M-tiles (blockIdx.x % mtiles)
  const int32_t* g_idx;
  int64_t groups;
  const void* scales;
  const void* zeros;
  const int32_t* perm;  // null: identity
  const void* cs;       // channel_scale or null
  const void* x;
  int64_t M, ldx;
  const void* bias;  // null: none
  void* out;
  int64_t ldo;
  float* partial;  // null: write out; else this segment's slots, [splits][M][N]
  uint32_t magic;  // kMagic (see code_bits)
  int sdt, xdt;    // dtypes (0 fp32, 1 fp16, 2 bf16); out has xdt
  int asym;
  int vec;  // vector mode (see the header)
};

// Column of the tile that column slot c of this lane is (vector: adjacent; scalar: strided by 32).
__device__ __forceinline__ int tile_col(bool vec, int lane, int c) { return vec ? lane * kCols + c : c * 32 + lane; }

// g_idx / perm entry of this lane's row of one chunk (raw; clamped where used).
struct Meta {
  int32_t g = 0, k = 0;
};

// Data of one chunk loaded one iteration before it is used: raw bits only.
template <int MT>
struct Pending {
  uint32_t x[MT];       // x[m0 + m][channel of this lane's row]
  uint32_t cs;          // channel_scale of that channel
  uint32_t s[kCols];    // scales of the chunk's group (when sz_new)
  uint32_t z[kCols];    // zeros of the chunk's group (when sz_new)
  int gl;               // this lane's row's group (clamped)
  bool uni;             // all 32 rows of the chunk share group gl (warp-uniform)
  bool sz_new;          // s / z were loaded for this chunk (warp-uniform)
};

__device__ __forceinline__ Meta load_meta(const MainArgs& a, int64_t chunk, int lane) {
  const int64_t r = a.row0 + chunk * 32 + lane;
  Meta m;
  if (r < a.K) {
    m.g = __ldg(a.g_idx + r);
    if (a.perm != nullptr) m.k = __ldg(a.perm + r);
  }
  return m;
}

template <int B>
__device__ __forceinline__ void load_words(const MainArgs& a, int64_t chunk, int lane, int64_t tile0,
                                           uint32_t (&w)[B][kCols]) {
  const uint32_t* q = a.qweight + chunk * B * a.N;
  if (a.vec) {
    const int64_t n = tile0 + lane * kCols;
    if (n < a.N) {
#pragma unroll
      for (int i = 0; i < B; ++i) {
        const uint4 v = ld_stream_v4(q + i * a.N + n);
        w[i][0] = v.x;
        w[i][1] = v.y;
        w[i][2] = v.z;
        w[i][3] = v.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < B; ++i)
#pragma unroll
        for (int c = 0; c < kCols; ++c) w[i][c] = 0;
    }
  } else {
#pragma unroll
    for (int i = 0; i < B; ++i)
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int64_t n = tile0 + c * 32 + lane;
        w[i][c] = n < a.N ? ld_stream(q + i * a.N + n) : 0u;
      }
  }
}

// Issues the loads of chunk `chunk`'s x, channel scale and (if its group is uniform and new) scales and
// zeros, from its meta. Contains warp collectives: call with the whole warp.
template <int MT>
__device__ __forceinline__ void issue_data(const MainArgs& a, int64_t chunk, const Meta& meta, int lane,
                                           int64_t tile0, int64_t m0, int& g_last, Pending<MT>& p) {
  const int64_t r = a.row0 + chunk * 32 + lane;
  const bool valid = r < a.K;
  int64_t k = r;
  if (a.perm != nullptr) k = min(max(int64_t(meta.k), int64_t(0)), a.K - 1);
#pragma unroll
  for (int m = 0; m < MT; ++m)
    p.x[m] = (valid && m0 + m < a.M) ? load_raw(a.x, (m0 + m) * a.ldx + k, a.xdt) : 0u;
  p.cs = (valid && a.cs != nullptr) ? load_raw(a.cs, k, a.sdt) : 0u;
  int g = int(min(max(int64_t(meta.g), int64_t(0)), a.groups - 1));
  const int g0 = __shfl_sync(0xFFFFFFFFu, g, 0);  // lane 0's row is always < K
  if (!valid) g = g0;
  p.gl = g;
  p.uni = __all_sync(0xFFFFFFFFu, g == g0) != 0;
  p.sz_new = p.uni && g0 != g_last;
  if (p.sz_new) {
    g_last = g0;
    const bool vec = a.vec != 0;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t n = tile0 + tile_col(vec, lane, c);
      p.s[c] = n < a.N ? load_raw(a.scales, int64_t(g0) * a.N + n, a.sdt) : 0u;
      p.z[c] = n < a.N ? load_raw(a.zeros, int64_t(g0) * a.N + n, a.sdt) : 0u;
    }
  }
}

// x' of the chunk into the warp's tile: MT < 4: xs[m * 32 + j] (float4 = 4 rows of one m);
// MT >= 4: xs[j * MT + m] (float4 = 4 m of one row).
template <int MT>
__device__ __forceinline__ void stage_x(const MainArgs& a, const Pending<MT>& p, int lane, float* xs) {
  float v[MT];
  const bool has_cs = a.cs != nullptr;
  const float c = has_cs ? raw_to_float(p.cs, a.sdt) : 1.0f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    v[m] = raw_to_float(p.x[m], a.xdt);
    if (has_cs) v[m] = v[m] * c;  // x' = x * c, one fp32 rounding
  }
  if constexpr (MT < 4) {
#pragma unroll
    for (int m = 0; m < MT; ++m) xs[m * 32 + lane] = v[m];
  } else {
#pragma unroll
    for (int q = 0; q < MT / 4; ++q)
      reinterpret_cast<float4*>(xs)[lane * (MT / 4) + q] =
          make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
}

// Per-column constants of a uniform group. Fast: k0 = S, k1 = -C (see the header), usable iff every
// column passes the exactness checks. Generic: k0 = s, k1 = E, k2 = D.
template <int B>
__device__ __forceinline__ void group_consts(const MainArgs& a, const uint32_t (&sr)[kCols],
                                             const uint32_t (&zr)[kCols], float (&k0)[kCols], float (&k1)[kCols],
                                             float (&k2)[kCols], bool& fast) {
  constexpr int P = fast_pos(B);
  constexpr float kDown = P == 8 ? 0x1p-8f : 0x1p-16f;  // 2^-P
  constexpr float kUp = P == 8 ? 0x1p15f : 0x1p7f;      // 2^(23-P)
  const bool asym = a.asym != 0;
  bool ok = true;
  float fs[kCols], fc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const float s = raw_to_float(sr[c], a.sdt);
    const float z = raw_to_float(zr[c], a.sdt);
    k0[c] = s;
    k1[c] = asym ? -0.0f : -z;
    k2[c] = asym ? z : 0.0f;
    // Fast form: C = T + u exactly, T = s * 2^(23-P) (exact scaling), u = z (sym) or s * z (asym, exact).
    const float T = s * kUp;
    float u = z;
    bool okc = fabsf(s) >= 0x1p-100f || s == 0.0f;  // S = s * 2^-P stays normal (exact)
    if (asym) {
      u = s * z;
      okc = okc && fmaf(s, z, -u) == 0.0f && z == rintf(z) && fabsf(z) <= 65536.0f;  // s*z and q - z exact
    }
    const float cc = T + u;
    okc = okc && (cc - T == u) && (cc - u == T);  // the sum was exact (also fails on inf / NaN)
    ok = ok && okc;
    fs[c] = s * kDown;
    fc[c] = -cc;
  }
  fast = ok;
  if (ok) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      k0[c] = fs[c];
      k1[c] = fc[c];
    }
  }
}

// Decode + FMA of one chunk whose 32 rows share one group. kFast: w = fma(S, F_P, -C); else
// w = fma(s, (F_0 - 2^23) - D, E).
template <int B, int MT, bool kFast>
__device__ __forceinline__ void chunk_uniform(const uint32_t (&w)[B][kCols], const float* xs, const float (&k0)[kCols],
                                              const float (&k1)[kCols], const float (&k2)[kCols], uint32_t magic,
                                              float (&acc)[MT][kCols]) {
  const float4* xs4 = reinterpret_cast<const float4*>(xs);
#pragma unroll
  for (int j4 = 0; j4 < 8; ++j4) {
    float xv[4][MT];
    if constexpr (MT < 4) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float4 t = xs4[m * 8 + j4];
        xv[0][m] = t.x;
        xv[1][m] = t.y;
        xv[2][m] = t.z;
        xv[3][m] = t.w;
      }
    }
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * j4 + jj;
      if constexpr (MT >= 4) {
#pragma unroll
        for (int q = 0; q < MT / 4; ++q) {
          const float4 t = xs4[j * (MT / 4) + q];
          xv[jj][4 * q] = t.x;
          xv[jj][4 * q + 1] = t.y;
          xv[jj][4 * q + 2] = t.z;
          xv[jj][4 * q + 3] = t.w;
        }
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        float wv;
        if constexpr (kFast) {
          wv = fmaf(k0[c], __uint_as_float(code_bits<B, fast_pos(B)>(w, c, j, magic)), k1[c]);
        } else {
          const float q = __uint_as_float(code_bits<B, 0>(w, c, j, magic)) - kTwo23;  // exact
          wv = fmaf(k0[c], q - k2[c], k1[c]);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m][c] = fmaf(xv[jj][m], wv, acc[m][c]);
      }
    }
  }
}

// Decode + FMA of one chunk whose rows have different groups: row by row (not unrolled), s and z fetched
// for every row with the literal wq.h expression. Warp collectives: call with the whole warp.
template <int B, int MT>
__device__ __forceinline__ void chunk_rows(const MainArgs& a, const uint32_t (&w)[B][kCols], const float* xs, int gl,
                                           int lane, int64_t tile0, float (&acc)[MT][kCols]) {
  const bool vec = a.vec != 0;
  const bool asym = a.asym != 0;
#pragma unroll 1
  for (int j = 0; j < 32; ++j) {
    const int g = __shfl_sync(0xFFFFFFFFu, gl, j);
    float xv[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) xv[m] = MT < 4 ? xs[m * 32 + j] : xs[j * MT + m];
    const int pos = j * B, i = pos >> 5, sh = pos & 31;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t n = tile0 + tile_col(vec, lane, c);
      float s = 0.0f, z = 0.0f;
      if (n < a.N) {
        s = raw_to_float(load_raw(a.scales, int64_t(g) * a.N + n, a.sdt), a.sdt);
        z = raw_to_float(load_raw(a.zeros, int64_t(g) * a.N + n, a.sdt), a.sdt);
      }
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int t = 0; t < B; ++t) {
        lo = select_u32(t == i, w[t][c], lo);
        hi = select_u32(t == i + 1, w[t][c], hi);
      }
      const uint32_t q = __funnelshift_r(lo, hi, sh) & ((1u << B) - 1u);
      const float qf = __uint2float_rn(q);
      const float wv = asym ? s * (qf - z) : fmaf(s, qf, -z);
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m][c] = fmaf(xv[m], wv, acc[m][c]);
    }
  }
}

// One warp's contiguous range [cb, ce) of the segment's chunks (non-empty, warp-uniform).
//
// Words are double-buffered: wc holds chunk c (being decoded), wn chunk c + 1, whose loads were issued
// at the end of iteration c - 1, so one chunk of decode covers their latency; the prologue issues the
// first two chunks at once, before the g_idx -> x / scales chain of the first chunk. (A deeper ring would
// need the loop unrolled by its depth: rotating registers by copies waits on the newest loads.)
template <int B, int MT>
__device__ __forceinline__ void warp_chunks(const MainArgs& a, int64_t cb, int64_t ce, int lane, int64_t tile0,
                                            int64_t m0, float* xs, float (&acc)[MT][kCols]) {
  uint32_t wc[B][kCols], wn[B][kCols];
#pragma unroll
  for (int i = 0; i < B; ++i)
#pragma unroll
    for (int c = 0; c < kCols; ++c) wc[i][c] = wn[i][c] = 0;

  // Prologue: words of the first two chunks, meta of the first two, data of the first.
  load_words<B>(a, cb, lane, tile0, wc);
  if (cb + 1 < ce) load_words<B>(a, cb + 1, lane, tile0, wn);
  int g_last = -1;
  Pending<MT> p;
  {
    const Meta m = load_meta(a, cb, lane);
    issue_data<MT>(a, cb, m, lane, tile0, m0, g_last, p);
  }
  Meta next = cb + 1 < ce ? load_meta(a, cb + 1, lane) : Meta{};
  float k0[kCols] = {}, k1[kCols] = {}, k2[kCols] = {};
  bool fast = false;

#pragma unroll 1
  for (int64_t c = cb; c < ce; ++c) {
    // 1. This chunk's x' into the tile; this chunk's group constants when its group is new.
    stage_x<MT>(a, p, lane, xs);
    if (p.sz_new) group_consts<B>(a, p.s, p.z, k0, k1, k2, fast);
    const bool uni = p.uni;
    const int gl = p.gl;
    // 2. Prefetch the small things (nothing loaded here is used before the next iteration).
    // (`next` is dead once chunk c + 1's data is issued, so chunk c + 2's meta loads straight into it: a
    // copy from a separate register at the back edge would wait for those loads every iteration.)
    if (c + 1 < ce) issue_data<MT>(a, c + 1, next, lane, tile0, m0, g_last, p);
    next = c + 2 < ce ? load_meta(a, c + 2, lane) : Meta{};
    __syncwarp();
    // 3. Decode + FMA.
    if (uni) {
      if (fast)
        chunk_uniform<B, MT, true>(wc, xs, k0, k1, k2, a.magic, acc);
      else
        chunk_uniform<B, MT, false>(wc, xs, k0, k1, k2, a.magic, acc);
    } else {
      chunk_rows<B, MT>(a, wc, xs, gl, lane, tile0, acc);
    }
    __syncwarp();  // the tile is rewritten next iteration
    // 4. Next chunk's words become current; issue the loads of the one after.
#pragma unroll
    for (int i = 0; i < B; ++i)
#pragma unroll
      for (int cc = 0; cc < kCols; ++cc) wc[i][cc] = wn[i][cc];
    if (c + 2 < ce) load_words<B>(a, c + 2, lane, tile0, wn);
  }
}

// Blocks per SM the register allocation must allow (__launch_bounds__): 4 (<= 128 registers) for the
// memory-bound M <= 2 tiles of widths <= 4, 3 (<= 168) for 5 and 6 bits and for M-tiles of 4 and 8, 2 for
// 8 bits (64 word registers in the double buffer). Chosen so that no variant spills; ptxas for sm_80 ..
// sm_89 needs a little more room for two of them. The host (split-K target) sees the sm_90 values.
__host__ __device__ constexpr int min_blocks(int B, int MT) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if (B == 4 && MT == 2) return 3;
  if (B == 6 && MT == 8) return 2;
#endif
  return B == 8 ? 2 : (MT <= 2 && B <= 4 ? 4 : 3);
}

template <int B, int MT>
__global__ void __launch_bounds__(kThreads, min_blocks(B, MT)) wq_matmul_kernel(const MainArgs a) {
  __shared__ __align__(16) float xs_all[kWarps][32 * MT];  // per-warp x' tile of one chunk
  __shared__ __align__(16) float red[kWarps][MT][kTileN];  // per-warp sums for the block reduction
  pdl_trigger();  // let the reduce kernel (if any) be scheduled as soon as every block has started

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t bx = blockIdx.x;
  const int64_t m0 = (bx % a.mtiles) * MT;
  const int64_t tile0 = (bx / a.mtiles) * kTileN;
  const int64_t c0 = int64_t(blockIdx.y) * a.cps;
  const int64_t c1 = min(a.chunks, c0 + a.cps);
  const int64_t per = (c1 - c0 + kWarps - 1) / kWarps;
  const int64_t cb = c0 + warp * per;
  const int64_t ce = min(c1, cb + per);

  float acc[MT][kCols];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[m][c] = 0.0f;
  if (cb < ce) warp_chunks<B, MT>(a, cb, ce, lane, tile0, m0, xs_all[warp], acc);

  // Block reduction over the warps, in warp order.
  const bool vec = a.vec != 0;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (vec) {
      *reinterpret_cast<float4*>(&red[warp][m][lane * kCols]) = make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    } else {
#pragma unroll
      for (int c = 0; c < kCols; ++c) red[warp][m][c * 32 + lane] = acc[m][c];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < MT * kTileN; idx += kThreads) {
    const int m = idx / kTileN, t = idx % kTileN;
    const int64_t n = tile0 + t, row = m0 + m;
    if (n >= a.N || row >= a.M) continue;
    float v = red[0][m][t];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v += red[w][m][t];
    if (a.partial != nullptr) {
      a.partial[(int64_t(blockIdx.y) * a.M + row) * a.N + n] = v;
    } else {
      if (a.bias != nullptr) v += raw_to_float(load_raw(a.bias, n, a.sdt), a.sdt);
      store_out(a.out, row * a.ldo + n, a.xdt, v);
    }
  }
}

// Sums the workspace slots in slot order, adds the bias, rounds once to the output dtype.
__global__ void __launch_bounds__(kReduceThreads) wq_reduce_kernel(const float* __restrict__ ws, int64_t slots,
                                                                  int64_t M, int64_t N, const void* bias, int sdt,
                                                                  void* out, int odt, int64_t ldo) {
  // Lets the next kernel, when it is a programmatic dependent (a tensor-core wq kernel: wq_tc.cu), start its
  // weight prefetch now; it waits for this kernel before it touches anything this one writes.
  pdl_trigger();
  pdl_wait();  // the main kernels' partial sums are complete and visible past this point
  const int64_t total = M * N;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    float v = ws[e];
#pragma unroll 16
    for (int64_t s = 1; s < slots; ++s) v += ws[s * total + e];  // in slot order; the loads overlap
    const int64_t m = e / N, n = e - m * N;
    if (bias != nullptr) v += raw_to_float(load_raw(bias, n, sdt), sdt);
    store_out(out, m * ldo + n, odt, v);
  }
}

// ---------------------------------------------------------------------------------------------------
// Dequantize.

struct DeqArgs {
  const uint32_t* qweight;  // word row 0 of the segment
  int64_t N, K, row0, chunks, n0, n1, ldo;
  const int32_t* g_idx;
  int64_t groups;
  const void* scales;
  const void* zeros;
  const int32_t* perm;
  void* out;
  int sdt, odt, asym;
};

template <int B>
__global__ void __launch_bounds__(kDequantThreads, 4) wq_dequantize_kernel(const DeqArgs a) {
  const int64_t n = a.n0 + int64_t(blockIdx.x) * kDequantThreads + threadIdx.x;
  if (n >= a.n1) return;
  const bool asym = a.asym != 0;
  for (int64_t ch = blockIdx.y; ch < a.chunks; ch += gridDim.y) {
    uint32_t w[B];
    const uint32_t* q = a.qweight + ch * B * a.N + n;
#pragma unroll
    for (int i = 0; i < B; ++i) w[i] = __ldg(q + i * a.N);
    const int64_t r0 = a.row0 + ch * 32;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int64_t r = r0 + j;
      if (r >= a.K) break;
      const int pos = j * B, i = pos >> 5, sh = pos & 31;
      const uint32_t hi = i + 1 < B ? w[i + 1 < B ? i + 1 : i] : 0u;
      const uint32_t code = __funnelshift_r(w[i], hi, sh) & ((1u << B) - 1u);
      const int64_t g = min(max(int64_t(__ldg(a.g_idx + r)), int64_t(0)), a.groups - 1);
      const float s = raw_to_float(load_raw(a.scales, g * a.N + n, a.sdt), a.sdt);
      const float z = raw_to_float(load_raw(a.zeros, g * a.N + n, a.sdt), a.sdt);
      const float qf = __uint2float_rn(code);
      const float v = asym ? s * (qf - z) : fmaf(s, qf, -z);
      const int64_t k = a.perm != nullptr ? min(max(int64_t(__ldg(a.perm + r)), int64_t(0)), a.K - 1) : r;
      store_out(a.out, k * a.ldo + (n - a.n0), a.odt, v);
    }
  }
}

// The same with 4 adjacent columns per thread (N, n0, n1, ldo multiples of 4; qweight 16-byte and out 8-byte
// aligned): one 16-byte load per word row and one 8-byte (16-bit types) or 16-byte (fp32) store per row, so a
// warp writes 256 / 512 contiguous bytes of a row; scales / zeros are reloaded only when the group changes.
// Same expression and rounding as wq_dequantize_kernel, so the two give the same bits.
template <int B>
__global__ void __launch_bounds__(kDequantThreads) wq_dequantize4_kernel(const DeqArgs a) {
  const int64_t n = a.n0 + (int64_t(blockIdx.x) * kDequantThreads + threadIdx.x) * 4;
  if (n >= a.n1) return;
  const bool asym = a.asym != 0;
  for (int64_t ch = blockIdx.y; ch < a.chunks; ch += gridDim.y) {
    uint32_t w[B][4];
    const uint32_t* q = a.qweight + ch * B * a.N + n;
#pragma unroll
    for (int i = 0; i < B; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(q + i * a.N));
      w[i][0] = v.x;
      w[i][1] = v.y;
      w[i][2] = v.z;
      w[i][3] = v.w;
    }
    const int64_t r0 = a.row0 + ch * 32;
    int64_t g_prev = -1;
    float s[4] = {}, z[4] = {};
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int64_t r = r0 + j;
      if (r >= a.K) break;
      const int64_t g = min(max(int64_t(__ldg(a.g_idx + r)), int64_t(0)), a.groups - 1);
      if (g != g_prev) {
        g_prev = g;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          s[c] = raw_to_float(load_raw(a.scales, g * a.N + n + c, a.sdt), a.sdt);
          z[c] = raw_to_float(load_raw(a.zeros, g * a.N + n + c, a.sdt), a.sdt);
        }
      }
      const int pos = j * B, i = pos >> 5, sh = pos & 31;
      float v[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint32_t hi = i + 1 < B ? w[i + 1 < B ? i + 1 : i][c] : 0u;
        const uint32_t code = __funnelshift_r(w[i][c], hi, sh) & ((1u << B) - 1u);
        const float qf = __uint2float_rn(code);
        v[c] = asym ? s[c] * (qf - z[c]) : fmaf(s[c], qf, -z[c]);
      }
      const int64_t k = a.perm != nullptr ? min(max(int64_t(__ldg(a.perm + r)), int64_t(0)), a.K - 1) : r;
      const int64_t o = k * a.ldo + (n - a.n0);
      if (a.odt == 0) {
        *reinterpret_cast<float4*>(static_cast<float*>(a.out) + o) = make_float4(v[0], v[1], v[2], v[3]);
      } else if (a.odt == 1) {
        const __half2 h0 = __floats2half2_rn(v[0], v[1]), h1 = __floats2half2_rn(v[2], v[3]);
        uint2 u;
        u.x = *reinterpret_cast<const uint32_t*>(&h0);
        u.y = *reinterpret_cast<const uint32_t*>(&h1);
        *reinterpret_cast<uint2*>(static_cast<__half*>(a.out) + o) = u;
      } else {
        const __nv_bfloat162 h0 = __floats2bfloat162_rn(v[0], v[1]), h1 = __floats2bfloat162_rn(v[2], v[3]);
        uint2 u;
        u.x = *reinterpret_cast<const uint32_t*>(&h0);
        u.y = *reinterpret_cast<const uint32_t*>(&h1);
        *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(a.out) + o) = u;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

struct SegPlan {
  int bits;
  int64_t row0, qrow0, chunks, splits, cps, slot0;
};

struct Plan {
  int mt = 1;
  int64_t mtiles = 0, ntiles = 0, slots = 0;
  int nseg = 0;
  SegPlan seg[kWqMaxSegments] = {};
  size_t ws_bytes = 0;
};

int pick_mt(int64_t M) {
  const int64_t m = std::min<int64_t>(M, 8);
  return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8;
}

// The launch plan of a validated weight and M >= 1, N >= 1: a pure function of (w's shape, M, SM count),
// shared by wq_matmul_workspace and wq_matmul so both see the same workspace size.
Status make_plan(const char* fn, const WqWeight& w, int64_t M, int sms, Plan* p) {
  p->mt = pick_mt(M);
  p->mtiles = (M + p->mt - 1) / p->mt;
  p->ntiles = (w.N + kTileN - 1) / kTileN;
  int64_t base = 0;
  if (!validate::mul(p->mtiles, p->ntiles, &base) || base > int64_t(std::numeric_limits<int>::max()))
    return Status::invalid(validate::err(fn, "M and N need more than 2^31 - 1 blocks of " + std::to_string(p->mt) +
                                                 " x " + std::to_string(kTileN) + " (M=" + std::to_string(M) +
                                                 ", N=" + std::to_string(w.N) + ")"));
  int64_t start = 0, q0 = 0, slots = 0;
  p->nseg = w.nseg;
  for (int s = 0; s < w.nseg; ++s) {
    SegPlan& sp = p->seg[s];
    sp.bits = w.bits[s];
    sp.row0 = start;
    sp.qrow0 = q0;
    sp.chunks = (w.row_end[s] - start + 31) / 32;
    const int64_t target = int64_t(min_blocks(sp.bits, p->mt)) * sms;  // one full wave
    const int64_t want = std::max<int64_t>(1, target / base);  // round down: a partial 2nd wave is a tail
    const int64_t cap = std::max<int64_t>(1, sp.chunks / (int64_t(kWarps) * kMinChunksPerWarp));
    int64_t splits = std::min(std::min(want, cap), kMaxGridY);
    sp.cps = (sp.chunks + splits - 1) / splits;
    splits = (sp.chunks + sp.cps - 1) / sp.cps;  // no empty split
    sp.splits = splits;
    sp.slot0 = slots;
    slots += splits;
    q0 += sp.chunks * sp.bits;
    start = w.row_end[s];
  }
  p->slots = slots;
  p->ws_bytes = 0;
  if (slots > 1) {
    int64_t elems = 0, bytes = 0;
    if (!validate::mul(M, w.N, &elems) || !validate::mul(elems, slots, &elems) || !validate::mul(elems, 4, &bytes))
      return Status::invalid(validate::err(fn, "the split-K workspace size overflows int64 (M=" + std::to_string(M) +
                                                   ", N=" + std::to_string(w.N) + ")"));
    p->ws_bytes = size_t(bytes);
  }
  return Status::ok();
}


template <int MT>
void launch_main_mt(int bits, dim3 grid, cudaStream_t stream, const MainArgs& a) {
  switch (bits) {
    case 1: wq_matmul_kernel<1, MT><<<grid, kThreads, 0, stream>>>(a); break;
    case 2: wq_matmul_kernel<2, MT><<<grid, kThreads, 0, stream>>>(a); break;
    case 3: wq_matmul_kernel<3, MT><<<grid, kThreads, 0, stream>>>(a); break;
    case 4: wq_matmul_kernel<4, MT><<<grid, kThreads, 0, stream>>>(a); break;
    case 5: wq_matmul_kernel<5, MT><<<grid, kThreads, 0, stream>>>(a); break;
    case 6: wq_matmul_kernel<6, MT><<<grid, kThreads, 0, stream>>>(a); break;
    default: wq_matmul_kernel<8, MT><<<grid, kThreads, 0, stream>>>(a); break;
  }
}

void launch_main(int mt, int bits, dim3 grid, cudaStream_t stream, const MainArgs& a) {
  switch (mt) {
    case 1: launch_main_mt<1>(bits, grid, stream, a); break;
    case 2: launch_main_mt<2>(bits, grid, stream, a); break;
    case 4: launch_main_mt<4>(bits, grid, stream, a); break;
    default: launch_main_mt<8>(bits, grid, stream, a); break;
  }
}

// The call's fields of MainArgs.
void fill_common(MainArgs& a, const WqWeight& w, const void* x, int64_t M, int64_t ldx, const void* bias, void* out,
                 int64_t ldo) {
  a.g_idx = w.g_idx;
  a.groups = w.groups;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.perm = w.perm;
  a.cs = w.channel_scale;
  a.x = x;
  a.M = M;
  a.ldx = ldx;
  a.bias = bias;
  a.out = out;
  a.ldo = ldo;
}

}  // namespace

namespace wq_detail {

Status launch_error(const char* fn, const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::ok();
  return Status::device(validate::err(fn, std::string(what) + ": " + cudaGetErrorString(err)));
}

// Multiprocessor count and compute capability of the current device, cached per device (attribute
// queries do not sync, but they are not free either).
Status device_info(const char* fn, DeviceInfo* info) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached_sms[kMaxDevices];
  static std::atomic<int> cached_major[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess)
    return Status::device(validate::err(fn, std::string("cudaGetDevice failed: ") + cudaGetErrorString(err)));
  if (dev >= 0 && dev < kMaxDevices) {
    const int s = cached_sms[dev].load(std::memory_order_acquire);
    if (s > 0) {
      info->sms = s;
      info->major = cached_major[dev].load(std::memory_order_acquire);
      return Status::ok();
    }
  }
  int sms = 0, major = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess)
    return Status::device(validate::err(fn, std::string("cudaDeviceGetAttribute failed: ") + cudaGetErrorString(err)));
  info->sms = sms > 0 ? sms : 1;
  info->major = major;
  if (dev >= 0 && dev < kMaxDevices) {
    cached_major[dev].store(major, std::memory_order_release);
    cached_sms[dev].store(info->sms, std::memory_order_release);
  }
  return Status::ok();
}

Status check_workspace(const char* fn, const void* workspace, size_t workspace_bytes, size_t need) {
  if (workspace == nullptr || workspace_bytes < need)
    return Status::invalid(validate::err(fn, "workspace_bytes must be >= " + std::to_string(need) +
                                                 " (wq_matmul_workspace), got " +
                                                 (workspace == nullptr ? std::string("a null workspace")
                                                                       : std::to_string(workspace_bytes))));
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return Status::invalid(validate::err(fn, "workspace must be 16-byte aligned"));
  return Status::ok();
}

// The reduce kernel, as a programmatic dependent launch where the device supports it (sm_90+).
Status launch_reduce(const char* fn, const DeviceInfo& dev, cudaStream_t stream, const float* ws, int64_t slots,
                     int64_t M, int64_t N, const void* bias, int sdt, void* out, int odt, int64_t ldo) {
  const int64_t total = M * N;
  const int64_t blocks = std::min<int64_t>((total + kReduceThreads - 1) / kReduceThreads, int64_t(dev.sms) * 16);
  const cudaError_t err = launch_pdl(wq_reduce_kernel, dim3(static_cast<unsigned>(blocks)), dim3(kReduceThreads), 0,
                                     stream, dev.major >= 9, ws, slots, M, N, bias, sdt, out, odt, ldo);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status::device(validate::err(fn, std::string("reduce kernel launch failed: ") + cudaGetErrorString(err)));
  }
  return launch_error(fn, "reduce kernel launch failed");
}

}  // namespace wq_detail

bool wq_matmul_uses_tensor_cores(const WqWeight& w, DType xtype, int64_t M) {
  return wq_detail::wg_eligible(w, M, &xtype) || wq_detail::tc_eligible(w, M, &xtype);
}

int64_t wq_matmul_fused_max_rows(const WqWeight& w, DType xtype) {
  // H100, 4-bit group 128, CUDA graph, against tiles + cuBLAS (docs/PERFORMANCE.md): the warpgroup kernel
  // wins at every measured M up to 256 (4096^2 M = 256: 37.8 vs 40.7 us; 8192 x 28672: 386 vs 542 us);
  // the mma.sync kernel up to M = 32, and 64 on layers above 32 Mi weights (8192 x 28672 M = 64: 353 vs
  // 508 us; 4096^2: 35.5 vs 33.7 us).
  // With the TMA-fed kernel (wq_wgt.cu, M >= 65; bench/wq_linear.py, 4-bit g128, fused vs tiles): layers
  // with K >= 8192 win at M = 512 and 1024 (28672 x 8192 M = 1024: 875 vs 1441 us; 8192^2: 242 vs 259;
  // 11008 x 4096: 177 vs 227), M = 2048 is mixed (8192^2: 521 vs 472); with K = 4096 the tiles are as fast
  // or faster from M = 512 (4096 x 11008: 142 vs 133 us).
  if (wq_detail::wg_eligible(w, wq_detail::wg_min_rows(), &xtype)) {
    WqWeight v = w;  // the TMA kernel's shape and alignment rules, on the first segment's width
    v.nseg = 1;
    v.row_end[0] = w.K;
    if (wq_detail::wgt_usable(v, wq_detail::wgt_min_rows())) return w.K >= 8192 ? kWgtFusedMaxRows : kWgFusedMaxRows;
    return kWgFusedMaxRows;
  }
  if (wq_detail::tc_eligible(w, 1, &xtype)) return w.K * w.N > (int64_t(32) << 20) ? 64 : 32;
  return 0;
}

Status wq_matmul_workspace(const WqWeight& w, int64_t M, size_t* bytes) {
  const char* fn = "lowbit::cuda::wq_matmul_workspace";
  if (bytes == nullptr) return Status::invalid(validate::err(fn, "bytes is null"));
  *bytes = 0;
  Status st = wq_validate(fn, w);
  if (!st.is_ok()) return st;
  if (M < 0) return validate::invalid_got(fn, "M must be >= 0", M);
  if (M == 0 || w.N == 0) return Status::ok();
  DeviceInfo dev;
  st = device_info(fn, &dev);
  if (!st.is_ok()) return st;
  Plan plan;
  st = make_plan(fn, w, M, dev.sms, &plan);
  if (!st.is_ok()) return st;
  *bytes = plan.ws_bytes;
  // The x dtype is not known here: enough for whichever path wq_matmul takes.
  if (wq_detail::tc_eligible(w, M, nullptr)) {
    size_t tc = 0;
    st = wq_detail::tc_workspace(fn, w, M, dev.sms, &tc);
    if (!st.is_ok()) return st;
    *bytes = std::max(*bytes, tc);
  }
  if (wq_detail::wg_eligible(w, M, nullptr)) {
    size_t wg = 0;
    st = wq_detail::wg_workspace(fn, w, M, dev.sms, &wg);
    if (!st.is_ok()) return st;
    *bytes = std::max(*bytes, wg);
  }
  return Status::ok();
}

Status wq_matmul(const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx, const void* bias, void* out,
                 int64_t ldo, void* workspace, size_t workspace_bytes, CUstream_st* stream) {
  const char* fn = "lowbit::cuda::wq_matmul";
  Status st = wq_validate_matmul(fn, w, x, xtype, M, ldx, out, ldo);
  if (!st.is_ok()) return st;
  if (M == 0 || w.N == 0) return Status::ok();
  DeviceInfo dev;
  st = device_info(fn, &dev);
  if (!st.is_ok()) return st;
  Plan plan;
  st = make_plan(fn, w, M, dev.sms, &plan);
  if (!st.is_ok()) return st;
  const cudaStream_t cs = reinterpret_cast<cudaStream_t>(stream);
  if (wq_detail::wg_eligible(w, M, &xtype))
    return wq_detail::wg_matmul(fn, w, x, M, ldx, bias, out, ldo, workspace, workspace_bytes, dev, cs);
  if (wq_detail::tc_eligible(w, M, &xtype))
    return wq_detail::tc_matmul(fn, w, x, M, ldx, bias, out, ldo, workspace, workspace_bytes, dev, cs);
  if (plan.ws_bytes > 0) {
    if (workspace_bytes < plan.ws_bytes)
      return Status::invalid(validate::err(fn, "workspace_bytes must be >= " + std::to_string(plan.ws_bytes) +
                                                   " (wq_matmul_workspace), got " + std::to_string(workspace_bytes)));
    if (workspace == nullptr) return Status::invalid(validate::err(fn, "workspace is null"));
  }
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool vec = w.N % 4 == 0 && reinterpret_cast<uintptr_t>(w.qweight) % 16 == 0;
  float* ws = static_cast<float*>(workspace);

  MainArgs a = {};
  a.N = w.N;
  a.K = w.K;
  a.mtiles = plan.mtiles;
  fill_common(a, w, x, M, ldx, bias, out, ldo);
  a.sdt = static_cast<int>(w.sdtype);
  a.xdt = static_cast<int>(xtype);
  a.asym = w.asym ? 1 : 0;
  a.vec = vec ? 1 : 0;
  a.magic = kMagic;
  for (int s_i = 0; s_i < plan.nseg; ++s_i) {
    const SegPlan& sp = plan.seg[s_i];
    a.qweight = w.qweight + sp.qrow0 * w.N;
    a.row0 = sp.row0;
    a.chunks = sp.chunks;
    a.cps = sp.cps;
    a.partial = plan.slots > 1 ? ws + sp.slot0 * M * w.N : nullptr;
    const dim3 grid(static_cast<unsigned>(plan.mtiles * plan.ntiles), static_cast<unsigned>(sp.splits));
    launch_main(plan.mt, sp.bits, grid, s, a);
    st = launch_error(fn, "kernel launch failed");
    if (!st.is_ok()) return st;
  }
  if (plan.slots > 1)
    return launch_reduce(fn, dev, s, ws, plan.slots, M, w.N, bias, a.sdt, out, a.xdt, ldo);
  return Status::ok();
}

namespace {

// The dequantize kernel for a segment width, 4 columns per thread or 1.
using DeqKernel = void (*)(const DeqArgs);
template <int B>
DeqKernel dequant_kernel_b(bool vec4) {
  return vec4 ? &wq_dequantize4_kernel<B> : &wq_dequantize_kernel<B>;
}
DeqKernel dequant_kernel(int bits, bool vec4) {
  switch (bits) {
    case 1: return dequant_kernel_b<1>(vec4);
    case 2: return dequant_kernel_b<2>(vec4);
    case 3: return dequant_kernel_b<3>(vec4);
    case 4: return dequant_kernel_b<4>(vec4);
    case 5: return dequant_kernel_b<5>(vec4);
    case 6: return dequant_kernel_b<6>(vec4);
    default: return dequant_kernel_b<8>(vec4);
  }
}

}  // namespace

Status wq_dequantize(const WqWeight& w, int64_t n0, int64_t n1, DType otype, void* out, int64_t ldo,
                     CUstream_st* stream) {
  const char* fn = "lowbit::cuda::wq_dequantize";
  Status st = wq_validate_dequantize(fn, w, n0, n1, otype, out, ldo);
  if (!st.is_ok()) return st;
  if (n1 == n0) return Status::ok();
  // Four columns per thread when every column group of 4 is aligned (the common case: N % 4 == 0).
  const int64_t oalign = otype == DType::kFloat32 ? 16 : 8;
  const bool vec4 = w.N % 4 == 0 && n0 % 4 == 0 && (n1 - n0) % 4 == 0 && ldo % 4 == 0 &&
                    reinterpret_cast<uintptr_t>(w.qweight) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % oalign == 0;
  const int64_t cols_per_thread = vec4 ? 4 : 1;
  const int64_t xblocks = ((n1 - n0) / cols_per_thread + kDequantThreads - 1) / kDequantThreads;
  if (xblocks > int64_t(std::numeric_limits<int>::max()))
    return Status::invalid(validate::err(fn, "n1 - n0 needs more than 2^31 - 1 blocks"));
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  DeqArgs a = {};
  a.N = w.N;
  a.K = w.K;
  a.n0 = n0;
  a.n1 = n1;
  a.ldo = ldo;
  a.g_idx = w.g_idx;
  a.groups = w.groups;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.perm = w.perm;
  a.out = out;
  a.sdt = static_cast<int>(w.sdtype);
  a.odt = static_cast<int>(otype);
  a.asym = w.asym ? 1 : 0;
  int64_t start = 0, q0 = 0;
  for (int sgi = 0; sgi < w.nseg; ++sgi) {
    const int bits = w.bits[sgi];
    a.row0 = start;
    a.chunks = (w.row_end[sgi] - start + 31) / 32;
    a.qweight = w.qweight + q0 * w.N;
    const dim3 grid(static_cast<unsigned>(xblocks), static_cast<unsigned>(std::min(a.chunks, kMaxGridY)));
    dequant_kernel(bits, vec4)<<<grid, kDequantThreads, 0, s>>>(a);
    st = launch_error(fn, "kernel launch failed");
    if (!st.is_ok()) return st;
    q0 += a.chunks * bits;
    start = w.row_end[sgi];
  }
  return Status::ok();
}

}  // namespace cuda
}  // namespace lowbit

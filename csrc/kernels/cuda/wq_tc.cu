// Tensor-core weight-only matmul (include/lowbit/kernels/wq.h, WqWeight::allow_half): x of the scales'
// 16-bit dtype (fp16 / bf16), segments of 2 or 4 bits, 1 <= M <= 64. This is the LLM decode kernel
// (M = 1 .. 16): it has to stream the packed words at HBM bandwidth, so it is built around how few
// instructions a weight can cost and how many bytes a warp keeps in flight.
//
// Orientation. out^T = W^T x'^T: the WEIGHTS are the A operand of mma.sync.m16n8k16 (16 output columns
// x 16 k) and x' the B operand (16 k x 8 rows of x), so M = 1 pads 8 rows of x, not 16, and each lane
// dequantizes only the codes of its own A fragment.
//
// A free k order. The dot product does not care in which order k runs as long as A and B agree, so the
// 16 k-slots of an mma step are mapped onto the rows that the packed words hand out most cheaply. A
// k-block is the 4 word rows t = 0..3 of a column (4 * 32/B stored rows: 32 for 4-bit, 64 for 2-bit);
// lane (g = lane / 4, t = lane % 4) owns word row t of its columns. A word holds C = 32/B codes, code i
// at bits [B*i, B*i + B); PAIR i (i < C/2) is codes (i, i + C/2), i.e. the bits at B*i of both 16-bit
// halves. The pair sits at bit p of its halves after a shift shared by the pairs that fit the mantissa
// together; one LOP3 (mask, OR the exponent of c_p = 2^(10 - p) (fp16) / 2^(7 - p) (bf16)) yields two
// 16-bit numbers c_p + q, exactly: the code's lowest bit then weighs 1. (The slow path below turns them
// into q with one more HFMA2.) mma step s takes pair 2s as its k-slots (2t, 2t+1) and pair 2s+1 as (2t+8, 2t+9):
//   slot 2t   <- row C*t + 2s          slot 2t+8 <- row C*t + 2s + 1
//   slot 2t+1 <- row C*t + 2s + C/2    slot 2t+9 <- row C*t + 2s + 1 + C/2      (rows within the k-block)
// The B fragment of lane (g, t) is then rows C*t .. C*t + C-1 of x' row g: one (4-bit) or two (2-bit)
// 16-byte loads, re-paired by one PRMT per register.
//
// Columns. A warp covers 64 columns; lane group g owns columns n0 + 4g + {0..3} (its "A" quad) and
// n0 + 32 + 4g + {0..3} (its "B" quad), so each word row is two 16-byte loads per lane and every warp load
// instruction reads 4 full 128-byte lines. m-tile mt of the mma takes column 2mt of the lane's 8 as its
// row g and column 2mt + 1 as its row g + 8.
//
// Scales in fp32, per group. The fast path does not dequantize: it multiplies the codes c_p + q by x'
// (exact products), accumulating A_g = sum_{k in g} x'_k (c_k + q_k) in fp32 over the k-blocks of one
// group, and with one more mma per step whose A operand is 1 in rows 0..7 and c_p in rows 8..15 both
// X_g = sum_{k in g} x'_k and O_g = sum_{k in g} c_k x'_k. It folds the group in when it ends:
//   sym  (w = s*q - z):   acc += s*(A_g - O_g) - z*X_g     asym (w = s*(q - z)):   acc += s*(A_g - O_g) - (s*z)*X_g
// (three flops per output and group; bf16 4-bit has p = 0 everywhere, O_g = 128 X_g, folded into z's
// factor). Per 8 codes (4-bit) that is 2 LOP3 + 1/4 shift plus 5/8 of an mma per x row tile. Subtracting
// O_g costs a few fp32 ulps of c * sum |x'| per group (c <= 1024 fp16 / 128 bf16), within the documented
// tolerance (wq.h) for any weights whose sum |x'| |w| is not itself that small; the products are exact
// and the only 16-bit rounding is x' (allow_half).
// A k-block whose rows do not all share one group (act-order without the layers' sort, groups smaller
// than a k-block) takes the exact per-row path: w = rne16(s*q - z) (sym) or rne16(s*(q - z)) (asym) with
// each row's own (s, z), one HFMA2 / HSUB2+HMUL2 per pair, into the same fp32 accumulators.
//
// Pipeline. Each warp streams its k-blocks through a ring of S slots in shared memory (cp.async, one
// commit group per k-block, S - 1 in flight while one is consumed): the words (cp.async.cg: L2 only, read
// once), x' (cp.async.ca: every warp of the SM reads it), the g_idx of the k-block's rows and, for a
// k-block that starts a new expected group (row / gs_guess, gs_guess = ceil(K / groups) rounded up to a
// whole k-block), that group's (s, z). The consumer checks the actual groups of every k-block (one
// compare and vote against the expected group; shuffle + vote otherwise): a wrong guess costs a direct
// load of (s, z), never a wrong result. The words are copied in line order (8 lanes per 128-byte line)
// into the slots of the lanes that read them, and the (s, z) of the warp's 64 columns are copied once by
// the whole warp and read by every lane of a column quad, so the consumer passes a __syncwarp after its
// wait (and one at the end of each k-block before the slot is refilled); x' and g_idx each lane copies
// and reads back itself. A slot is 1 KB of words plus ~1 KB of the rest (TcRing), so the 18 KB of each
// warp keep 8 (4-bit, one row tile) k-blocks in flight. Addresses are 32-bit shared-window addresses
// advanced per slot; the global side is a base per stream plus a 32-bit offset. Every copy has an
// in-range source (no zero-fill): columns past N, rows past the segment and x' rows past xrows read an
// in-range neighbour whose value only reaches unwritten outputs or rows that the consumer masks to x' = 0.
//
// Work decomposition: a warp owns one 64-column tile and one split-K range of k-blocks (long ranges keep
// the ring in its steady state); a block is kTcWarps warps on consecutive column tiles (they share x' in
// L1). grid.x = groups of column tiles x row tiles of x (row tile fastest, so the blocks that read the
// same words run together and the re-reads come from L2), grid.y = split-K, chosen so that the blocks fill
// the resident slots in whole waves. One split: each warp writes out its columns (bias, one rounding);
// several (or several segments: all in one launch below 64 Mi weights, a launch each above): fp32
// partials per slot, then launch_reduce (wq_matmul.cu) sums the slots in order. No float atomics: the
// result depends on the shape and SM count only.
//
// x' = x * channel_scale gathered into stored-row order (perm) and rounded once to the 16-bit type: a
// small prep kernel writes it to the workspace when there is a perm or channel scale, or x cannot be read
// with aligned 16-byte loads; otherwise the main kernel reads x itself. Rows past the segment are
// zeroed in registers (their padding code bits then multiply zero).
//
// Indices: g_idx entries are clamped into [0, groups) (wq.h). Word rows past the segment's words are
// never read; columns past N are never written.
//
// Measured (H100, docs/PERFORMANCE.md): 8192 x 28672 4-bit M = 1 ~54 us per forward (~52 us inside a
// CUDA graph) = 2.3-2.4 TB/s, ~80 % of the copy bandwidth; ~160 instructions per warp and k-block on the
// fast path (SASS: ~50 of them dequantization and mma), 12 warps per SM.
#include "wq_internal.cuh"
#include "wq_codes.cuh"

#include "pdl.cuh"

#ifdef __USE_FAST_MATH__
#error "wq_tc.cu must not be built with --use_fast_math: the code conversions rely on exact FMA"
#endif

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>

#include "../validate.h"

namespace lowbit {
namespace cuda {
namespace wq_detail {
namespace {

constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcCols = 64;            // columns per block (and per warp)
constexpr int kPrepThreads = 256;
constexpr int64_t kXAlignRows = 64;    // rows of the prepared x' are padded to a multiple of this (zeros)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Shared-memory operands are 32-bit shared-window addresses (no generic-to-shared conversion per copy).
// 16 bytes global -> shared, L2 only (the words are read once).
__device__ __forceinline__ void cp_async_16_stream(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
// 16 bytes through L1 (x' is read by every warp of the SM).
__device__ __forceinline__ void cp_async_16_cached(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

template <int NT, int kXr, int kGr>
struct SlowIn {
  uint4 w[2];
  uint32_t xv[NT][kXr];
  int gv[kGr];
};
template <int NT>
struct SlowOut {
  float v[4][NT][4];
};

// One k-block whose rows span several groups: w = rne16(s*q - z) (sym) or rne16(s*(q - z)) (asym) with
// each row's own (s, z), multiplied on the tensor cores; returns the k-block's contribution to acc.
// Rows past the segment (group -1) take group G; their x' is zero.
template <int B, int NT, typename T>
__device__ __noinline__ SlowOut<NT> slow_kblock(const SlowIn<NT, 16 / B, 4 * (32 / B) / 32> in, int G,
                                                const void* scales, const void* zeros, int64_t N, int64_t nqa,
                                                int64_t nqb, int asym, uint32_t magic) {
  using T2 = typename Tc<T>::T2;
  constexpr int kCpw = 32 / B, kPairs = kCpw / 2, kSteps = kCpw / 4, kGr = 4 * kCpw / 32;
  const int t = threadIdx.x & 3;
  const int64_t nq[2] = {nqa, nqb};
  SlowOut<NT> o;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o.v[mt][nt][e] = 0.0f;
  auto word = [&](int j) -> uint32_t {
    const uint4& q = in.w[j >> 2];
    return (j & 3) == 0 ? q.x : (j & 3) == 1 ? q.y : (j & 3) == 2 ? q.z : q.w;
  };
  const unsigned short* sc = static_cast<const unsigned short*>(scales);
  const unsigned short* zr = static_cast<const unsigned short*>(zeros);
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    uint32_t b0[NT], b1[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      b0[nt] = __byte_perm(in.xv[nt][s], in.xv[nt][s + kPairs / 2], 0x5410);
      b1[nt] = __byte_perm(in.xv[nt][s], in.xv[nt][s + kPairs / 2], 0x7632);
    }
    // Groups of the 4 rows this lane's pairs 2s (lo) and 2s + 1 (hi) hold: lo (ra, rb), hi (rc, rd).
    int grp[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int r = kCpw * t + 2 * s + (q & 1 ? kPairs : 0) + (q >> 1);
      int v = __shfl_sync(0xFFFFFFFFu, in.gv[0], r & 31);
      if constexpr (kGr > 1) {
        const int v1 = __shfl_sync(0xFFFFFFFFu, in.gv[1], r & 31);
        if (r >= 32) v = v1;
      }
      grp[q] = v < 0 ? G : v;
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      uint32_t wlo[2], whi[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int j = 2 * mt + hr;
        const int64_t n = nq[j >> 2] + (j & 3);
        const bool ok = n < N;
        uint32_t sv[4], zv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          sv[q] = ok ? __ldg(sc + int64_t(grp[q]) * N + n) : 0u;
          zv[q] = ok ? __ldg(zr + int64_t(grp[q]) * N + n) : 0u;
        }
        const T2 s_lo = bits_as<T2>(sv[0] | (sv[1] << 16)), z_lo = bits_as<T2>(zv[0] | (zv[1] << 16));
        const T2 s_hi = bits_as<T2>(sv[2] | (sv[3] << 16)), z_hi = bits_as<T2>(zv[2] | (zv[3] << 16));
        const uint32_t wj = word(j);
        const T2 q_lo = PairCodeSel<B, T>::exact(wj, 2 * s, magic);
        const T2 q_hi = PairCodeSel<B, T>::exact(wj, 2 * s + 1, magic);
        if (asym) {
          wlo[hr] = as_bits(__hmul2(s_lo, __hsub2(q_lo, z_lo)));
          whi[hr] = as_bits(__hmul2(s_hi, __hsub2(q_hi, z_hi)));
        } else {
          wlo[hr] = as_bits(__hfma2(q_lo, s_lo, __hneg2(z_lo)));
          whi[hr] = as_bits(__hfma2(q_hi, s_hi, __hneg2(z_hi)));
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        mma_16816<T>(o.v[mt][nt], wlo[0], wlo[1], whi[0], whi[1], b0[nt], b1[nt]);
    }
  }
  return o;
}

// One segment's rows, words and split-K (host: make_tc_plan).
struct TcSegArgs {
  const uint32_t* qweight;  // word row 0 of this segment
  int64_t qrows;            // word rows of this segment that may be read
  int64_t row0, row_end;    // stored rows [row0, row_end) of this segment
  int64_t nkb, kps;         // k-blocks of the segment; per split
  int64_t gs_guess;         // g_idx[r] is expected to be r / gs_guess (only speed depends on it)
  float* partial;           // this segment's first slot of [slot][M][N], or null: write out
  int bits;                 // 2 or 4
  int splits;               // grid.y blocks of this segment
};

struct TcArgs {
  int64_t N;
  const int32_t* g_idx;
  int64_t groups;
  const void* scales;
  const void* zeros;
  const void* x;            // x' in stored-row order (or x itself when there is no perm / channel scale)
  int64_t ldx, xrows;       // row stride; rows >= xrows are read as 0 (xrows % 8 == 0)
  int64_t M;
  int64_t mtiles, ntiles;
  const void* bias;
  void* out;
  int64_t ldo;
  int asym;
  int vec;                  // N % 4 == 0 and 16-byte aligned words: 16-byte word loads, 8-byte scale loads
  uint32_t magic;           // Tc<T>::kMagic, from a parameter so that ptxas keeps it in a register
  int nseg;                 // segments, in grid.y order (all of them run in one launch)
  // Programmatic-dependent-launch role (sm_90+; no-ops otherwise): 0 the only launch: trigger at the
  // start, wait before the first read of x' / g_idx / scales; 1 the first of several segment launches:
  // wait, then trigger (so that a dependent may start only once the kernels before this one are done);
  // 2 a later segment launch: no wait before its work (everything it reads was complete when launch 1
  // triggered), a wait before it exits (so that its completion implies its predecessor's, which the
  // reduce kernel behind it relies on). The segments' launches then overlap instead of each waiting
  // for the previous one's tail.
  int pdl_mode;
  TcSegArgs seg[kWqMaxSegments];
};

// (s, z) of the lane's 8 columns for one group, raw 16-bit pairs: s[0..1] = A quad, s[2..3] = B quad.
struct GroupSZ {
  uint32_t s[4], z[4];
};

// Ring geometry of one kernel variant, per warp and slot (one k-block). First 16-byte vectors per lane
// (vector v of lane l at 512 v + 16 l): the two word quads, then the x' vectors of each row tile of 8.
// Then the pieces that are smaller than a vector per lane, packed so that a slot carries little besides
// its 1 KB of words (the ring's depth, i.e. the bytes each warp keeps in flight, is what the 18 KB per warp
// buys): the g_idx entries (entry i of lane l at kGOff + 128 i + 4 l) and the (s, z) of the warp's 64
// columns (only for k-blocks that start a group; every lane of a column quad reads the same 16 bytes).
template <int B, int NT>
struct TcRing {
  static constexpr int kXv = NT * (16 / B) / 4 > 0 ? NT * (16 / B) / 4 : 1;  // x' vectors
  static constexpr int kGr = 4 * (32 / B) / 32;                              // g_idx entries per lane
  static constexpr int kW = 0, kX = 2, kLaneVecs = 2 + kXv;
  static constexpr int kGOff = kLaneVecs * 512;
  // (s, z): 8 bytes per column quad q (0..15 over the warp's 64 columns) at kSzOff + 8 ((q % 8) 2 + q / 8),
  // z 128 bytes further, so that quads g and g + 8 (a lane's two) are one 16-byte load.
  static constexpr int kSzOff = kGOff + 128 * kGr;
  static constexpr int kSlotBytes = kSzOff + 256;
  static constexpr int kStages = 18432 / kSlotBytes > 10 ? 10 : 18432 / kSlotBytes;  // <= 72 KB per block
  static constexpr int kBytes = 4 * kStages * kSlotBytes;  // kTcWarps rings
  static_assert(kSlotBytes % 128 == 0, "slots stay 128-byte aligned");
};

// The work of one block on one segment of B-bit words: split `split` of its k-blocks.
template <int B, int NT, typename T, bool kVec>
__device__ __forceinline__ void tc_body(const TcArgs& a, const TcSegArgs& sg, int split, unsigned char* smem) {
  using H = Tc<T>;
  using R = TcRing<B, NT>;
  constexpr int S = R::kStages;
  constexpr int kCpw = 32 / B;         // codes per word
  constexpr int kPairs = kCpw / 2;     // pairs per word
  constexpr int kSteps = kCpw / 4;     // mma k-steps per k-block
  constexpr int kRows = 4 * kCpw;      // stored rows per k-block
  constexpr int kXr = kCpw / 2;        // x' registers per lane, k-block and row tile of 8
  constexpr int kGr = kRows / 32;      // g_idx entries per lane and k-block
  constexpr int kBatch = 8 * NT;       // rows of x per block

  // Row and k-block indices are 32-bit (tc_eligible: K < 2^30); pointers advance by fixed steps.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // Each warp owns one column tile (kTcWarps consecutive tiles per block) and the block's whole split.
  const int64_t mtile = int64_t(blockIdx.x) % a.mtiles;
  const int64_t ntile = (int64_t(blockIdx.x) / a.mtiles) * kTcWarps + warp;
  const int64_t n0 = min(ntile, a.ntiles - 1) * kTcCols, m0 = mtile * kBatch;
  const int64_t nq[2] = {n0 + 4 * g, n0 + 32 + 4 * g};  // the lane's two column quads
  const int nkb = int(sg.nkb), kps = int(sg.kps);
  const int s0 = split * kps, s1 = min(nkb, s0 + kps);
  const int kb0 = s0, kb1 = ntile < a.ntiles ? s1 : s0;  // a warp past the last tile has nothing to do
  const int tail = nkb - 1;            // the segment's last k-block: the only one with rows to clamp / mask
  const int row0 = int(sg.row0), row_end = int(sg.row_end), gs = int(sg.gs_guess), groups = int(a.groups);
  const uint32_t magic = a.magic;
  // The fast path's codes enter the mma as c_P + q (PairCode::unit): mg[P / 2] = the magic of value
  // c_P = 2^(kMagicExp - P), derived from the parameter so that ptxas keeps them in registers. Its sums
  // then carry the offset sum c_P x', which the fold subtracts. One mma per step gives both group sums
  // of x': its A operand is 1 in rows 0..7 and c_P in rows 8..15, so accx[nt][0..1] = sum x' (row g) and
  // accx[nt][2..3] = sum c_P x' (row g + 8). Where every pair sits at P = 0 (bf16 4-bit) that offset is
  // c_0 sum x' and the fold takes it through zz.
  constexpr bool kUni = Tc<T>::kMant / B == 1;
  constexpr float kC0 = float(1 << H::kMagicExp);
  uint32_t mg[5];
#pragma unroll
  for (int j = 0; j < 5; ++j) mg[j] = magic - (uint32_t(2 * j) << H::kMant) * 0x00010001u;

  float acc[4][NT][4], accg[4][NT][4], accx[NT][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = accg[mt][nt][e] = 0.0f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) accx[nt][e] = 0.0f;

  // Word j (0..7) of the lane's columns for one k-block: quad j / 4, component j % 4.
  auto word = [](const uint4 (&w)[2], int j) -> uint32_t {
    const uint4& q = w[j >> 2];
    return (j & 3) == 0 ? q.x : (j & 3) == 1 ? q.y : (j & 3) == 2 ? q.z : q.w;
  };
  const unsigned short* sc16 = static_cast<const unsigned short*>(a.scales);
  const unsigned short* zr16 = static_cast<const unsigned short*>(a.zeros);
  // (s, z) of group grp, loaded now (the fallback when the ring does not hold them).
  auto load_sz = [&](int grp) {
    GroupSZ r;
    const unsigned short* sc = sc16 + int64_t(grp) * a.N;
    const unsigned short* zr = zr16 + int64_t(grp) * a.N;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t sv[4], zv[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool ok = nq[h] + c < a.N;
        sv[c] = ok ? __ldg(sc + nq[h] + c) : 0u;
        zv[c] = ok ? __ldg(zr + nq[h] + c) : 0u;
      }
      r.s[2 * h] = sv[0] | (sv[1] << 16);
      r.s[2 * h + 1] = sv[2] | (sv[3] << 16);
      r.z[2 * h] = zv[0] | (zv[1] << 16);
      r.z[2 * h + 1] = zv[2] | (zv[3] << 16);
    }
    return r;
  };
  // The fp32 value of column j's entry of a GroupSZ array.
  auto sz_at = [](const uint32_t (&v)[4], int j) -> float {
    const uint32_t u = v[j >> 1] >> (16 * (j & 1));
    if constexpr (std::is_same<T, __half>::value)
      return __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xFFFFu)));
    else
      return __uint_as_float(u << 16);
  };

  int gcur = -1;  // the group accumulating in accg / accx
  GroupSZ scur = {};
  // Folds the running group into acc (see the header) and clears its accumulators.
  // One form for both: acc += s*(A_g - O_g) + zz*X_g with zz = -z (sym) or -(s*z) (asym) and O_g the
  // offset sum of the unit codes (accx[nt][2..3]; kUni: c_0 X_g, folded into zz), no per-output select.
  const bool asym = a.asym != 0;
  auto flush = [&]() {
    if (gcur < 0) return;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int j = 2 * mt + hr;
        const float sv = sz_at(scur.s, j), zv = sz_at(scur.z, j);
        const float zz = (asym ? -(sv * zv) : -zv) - (kUni ? kC0 * sv : 0.0f);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            const int e = 2 * hr + e2;
            const float ag = kUni ? accg[mt][nt][e] : accg[mt][nt][e] - accx[nt][2 + e2];
            acc[mt][nt][e] = fmaf(zz, accx[nt][e2], fmaf(sv, ag, acc[mt][nt][e]));
            accg[mt][nt][e] = 0.0f;
          }
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) accx[nt][e] = 0.0f;
  };

  // The group each k-block is expected to lie in, walked by the issuing side and by the consuming side
  // alike: the ring carries (s, z) for the warp's first k-block and for every k-block whose expected group
  // differs from its predecessor's ("fresh"). gs is a multiple of kRows (tc_matmul), so the expectation
  // advances by one group every gs / kRows k-blocks: a countdown, not a division or a loop.
  // A k-block is fresh when left == per (it starts its expected group) or it is the warp's first.
  struct GroupWalk {
    int grp, left, per;
    __device__ void start(int row, int gsz) {
      grp = row / gsz;
      per = gsz / kRows;
      left = per - (row - grp * gsz) / kRows;  // k-blocks of the expected group from this one on
    }
    __device__ bool starts_group() const { return left == per; }
    __device__ void step() {  // to the next k-block
      if (--left == 0) {
        ++grp;
        left = per;
      }
    }
  };
  GroupWalk walk_issue, walk_use;
  walk_issue.start(row0 + kb0 * kRows, gs);
  walk_use = walk_issue;

  // The shared-memory ring of this warp: S slots of R::kSlotBytes (TcRing), every access conflict-free.
  // Slot addresses below are this lane's (slot start + 16 lane); the packed pieces subtract 16 lane.
  constexpr uint32_t kVs = 32 * 16;                 // bytes from one of a lane's vectors to the next
  constexpr uint32_t kSlotStride = R::kSlotBytes;   // bytes per slot
  const uint32_t ring_base = smem_addr(smem) + uint32_t(warp * S * R::kSlotBytes + lane * 16);
  const uint32_t ring_end = ring_base + S * kSlotStride;
  uint32_t issue_addr = ring_base, use_addr = ring_base;  // this lane's slot of the next k-block to issue / use
  // Issue-side cursors, advanced by one k-block per issue(). Every copy has a valid source: columns past
  // N read column N - 1 (or the last quad), and in the tail k-block word rows past the segment, x' rows
  // past xrows and g_idx rows past the segment read the last valid one. Their values only reach outputs
  // that are never written or rows that the consumer masks, so no copy is predicated or zero-filled.
  // The words are copied in line order, not fragment order: copy lane c takes word row c / 8 and column
  // quad c % 8 of each half, so every 8 consecutive lanes read one whole 128-byte line (fragment order,
  // 4 rows per 8 lanes, cost each 16-byte piece a sector of its own: ncu, twice the L2 sectors and requests
  // of the line order). The piece lands where its fragment lane (g = quad, t = row) reads it: 16-byte unit
  // 8 row + (quad ^ 2 row) of the half, conflict-free both for the copies (one row, 8 quads) and for the
  // reads (quads 2q, 2q + 1 of 4 rows).
  auto word_unit = [](int row, int quad) { return 8 * row + (quad ^ (2 * row)); };
  const int crow = lane >> 3, cquad = lane & 7;  // this lane's copy: word row and column quad
  const uint32_t wdst = uint32_t(word_unit(crow, cquad) - lane) * 16u;  // from this lane's ring vectors
  const uint32_t wsrc = uint32_t(word_unit(t, g) - lane) * 16u;
  const int64_t qlast = sg.qrows - 1;
  // Issue-side addresses are a fixed 64-bit base per stream plus a 32-bit offset that advances by one
  // k-block per issue (one IMAD.WIDE per copy; tc_eligible keeps the offsets below 2^32):
  //   words:  qw + woff + wcol[h], woff = (4 kb + crow) N: word row 4 kb + crow, this lane's copy quad of half h
  //           (vector mode: quad start clamped to N - 4); in the tail k-block that row may lie past the
  //           segment and is pulled back to qlast;
  // x' and g_idx: pointers to the next k-block's pieces, advanced by kRows per issue.
  //   (the column of half h is a 32-bit offset from the segment's words, so that the compiler can keep or
  //   cheaply recompute it; tc_eligible: N < 2^31)
  const uint32_t* const qw = sg.qweight;  // dereferenced only at rows <= qlast
  uint32_t wcol[2];
  int clast[2];           // scalar mode: offset of column N - 1 from the copy quad (columns past it read it)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int cq = int(n0) + 32 * h + 4 * cquad, n32 = int(a.N);
    const int base = kVec ? min(cq, n32 - 4) : min(cq, n32 - 1);
    wcol[h] = uint32_t(base);
    clast[h] = n32 - 1 - base;
  }
  const uint32_t wstep = uint32_t(4 * a.N);
  uint32_t woff = uint32_t((int64_t(kb0) * 4 + crow) * a.N);
  // (s, z) copy of a fresh k-block: lane l copies the 8 bytes of column quad q = l % 16 (start clamped to
  // N - 4) of s (l < 16) or z into its TcRing place; gofs: this lane's g_idx entries from its slot address.
  const int szq = lane & 15;
  const unsigned short* szp = (lane < 16 ? sc16 : zr16) + max(min(n0 + 4 * szq, a.N - 4), int64_t(0));
  const uint32_t szdst = uint32_t(R::kSzOff + 128 * (lane >> 4) + 8 * ((szq & 7) * 2 + (szq >> 3)) - 16 * lane);
  const uint32_t gofs = uint32_t(R::kGOff - 12 * lane);
  const T* xp[NT];  // this lane's x' piece of the next k-block, per row tile
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    xp[nt] = static_cast<const T*>(a.x) + min(m0 + 8 * nt + g, a.M - 1) * a.ldx + row0 + kb0 * kRows + kCpw * t;
  const int32_t* gp = a.g_idx + row0 + kb0 * kRows + lane;  // this lane's g_idx rows of the next k-block

  auto issue = [&](int kb) {
    if (kb < kb1) {
      const uint32_t dst = issue_addr;
      issue_addr = issue_addr + kSlotStride == ring_end ? ring_base : issue_addr + kSlotStride;
      if (kb != tail) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if constexpr (kVec) {
            cp_async_16_stream(dst + (R::kW + h) * kVs + wdst, qw + (woff + wcol[h]));
          } else {
#pragma unroll
            for (int c = 0; c < 4; ++c)
              cp_async_4(dst + (R::kW + h) * kVs + wdst + 4 * c, qw + (woff + wcol[h] + min(c, clast[h])));
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int v = 0; v < kXr / 4; ++v)
            cp_async_16_cached(dst + (R::kX + nt * (kXr / 4) + v) * kVs, xp[nt] + 8 * v);
#pragma unroll
        for (int i = 0; i < kGr; ++i) cp_async_4(dst + gofs + 128 * i, gp + 32 * i);
      } else {
        const int64_t wrow = int64_t(kb) * 4 + crow;
        const uint32_t wt = woff - uint32_t(wrow > qlast ? (wrow - qlast) * a.N : 0);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if constexpr (kVec) {
            cp_async_16_stream(dst + (R::kW + h) * kVs + wdst, qw + (wt + wcol[h]));
          } else {
#pragma unroll
            for (int c = 0; c < 4; ++c)
              cp_async_4(dst + (R::kW + h) * kVs + wdst + 4 * c, qw + (wt + wcol[h] + min(c, clast[h])));
          }
        }
        const int64_t xrow = row0 + int64_t(kb) * kRows + kCpw * t;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int v = 0; v < kXr / 4; ++v) {
            const int64_t r = xrow + 8 * v;
            cp_async_16_cached(dst + (R::kX + nt * (kXr / 4) + v) * kVs,
                               xp[nt] + 8 * v - (r + 8 <= a.xrows ? 0 : r + 8 - a.xrows));
          }
        const int grow = row0 + kb * kRows + lane;
#pragma unroll
        for (int i = 0; i < kGr; ++i)
          cp_async_4(dst + gofs + 128 * i,
                     grow + 32 * i < row_end ? gp + 32 * i : a.g_idx + row_end - 1);
      }
      if constexpr (kVec) {  // scalar mode: the consumer loads (s, z) itself
        if (walk_issue.starts_group() || kb == kb0) {
          cp_async_8(dst + szdst, szp + int64_t(min(walk_issue.grp, groups - 1)) * a.N);
        }
      }
      walk_issue.step();
      woff += wstep;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xp[nt] += kRows;
      gp += kRows;
    }
    cp_async_commit();  // one group per k-block, empty past the end: the wait count stays uniform
  };

  // The kernel is a programmatic dependent of the kernel before it (sm_90+, TcKernel::launch): the words
  // of the first k-blocks are requested into L2 (a prefetch has no visible effect, so it is safe before the
  // wait), and everything else -- x, g_idx, scales, the outputs and the workspace -- is touched only after
  // the kernels before this one have completed. Consecutive projections of one input (q / k / v, gate /
  // up) then overlap the next layer's DRAM latency with the last one's tail.
#pragma unroll
  for (int st = 0; st < S - 1; ++st)
    if (kb0 + st < kb1 && kb0 + st != tail)
#pragma unroll
      for (int h = 0; h < 2; ++h) prefetch_l2(qw + (woff + uint32_t(st) * wstep + wcol[h]));
  if (a.pdl_mode != 2) pdl_wait();
  if (a.pdl_mode == 1) pdl_trigger();
  // Prologue: S - 1 k-blocks in flight; each step issues one more and consumes the oldest.
#pragma unroll
  for (int st = 0; st < S - 1; ++st) issue(kb0 + st);
#pragma unroll 1
  for (int kb = kb0; kb < kb1; ++kb) {
    issue(kb + S - 1);
    cp_async_wait<S - 1>();  // this lane's copies of this k-block have landed
    __syncwarp();            // ... and every lane's (the words of a fragment lane were copied by another)
    const uint32_t src = use_addr;
    use_addr = use_addr + kSlotStride == ring_end ? ring_base : use_addr + kSlotStride;
    const uint4 w[2] = {lds128(src + R::kW * kVs + wsrc), lds128(src + (R::kW + 1) * kVs + wsrc)};
    uint32_t xv[NT][kXr];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int v = 0; v < kXr / 4; ++v) {
        const uint4 q = lds128(src + (R::kX + nt * (kXr / 4) + v) * kVs);
        xv[nt][4 * v] = q.x;
        xv[nt][4 * v + 1] = q.y;
        xv[nt][4 * v + 2] = q.z;
        xv[nt][4 * v + 3] = q.w;
      }
    int graw[kGr];
#pragma unroll
    for (int i = 0; i < kGr; ++i) graw[i] = static_cast<int>(lds32(src + gofs + 128 * i));
    const int krow = row0 + kb * kRows;  // first stored row of the k-block
    // The common case first: a k-block before the tail whose rows all lie in the expected group (checked
    // unclamped against a value in [0, groups), so equality also proves the entries in range).
    const int expect = walk_use.grp;
    bool hit = kb != tail && expect < groups;
#pragma unroll
    for (int i = 0; i < kGr; ++i) hit = hit && graw[i] == expect;
    int gv[kGr];
    int G = expect;
    bool uni = __all_sync(0xFFFFFFFFu, hit) != 0;
    if (!uni) {
      // Groups of this lane's rows (lane + 32 i), clamped; in the tail k-block, -1 past the segment and
      // x' = 0 for those rows.
#pragma unroll
      for (int i = 0; i < kGr; ++i) gv[i] = min(max(graw[i], 0), groups - 1);
      if (kb == tail) {
        const int rg = krow + lane;
#pragma unroll
        for (int i = 0; i < kGr; ++i)
          if (rg + 32 * i >= row_end) gv[i] = -1;
        const int xrow = krow + kCpw * t;
#pragma unroll
        for (int i = 0; i < kXr; ++i) {
          const uint32_t keep = (xrow + 2 * i < row_end ? 0x0000FFFFu : 0u) | (xrow + 2 * i + 1 < row_end ? 0xFFFF0000u : 0u);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) xv[nt][i] &= keep;
        }
      }
      G = __shfl_sync(0xFFFFFFFFu, gv[0], 0);  // row 0 of the k-block: always inside the segment
      bool mine = true;
#pragma unroll
      for (int i = 0; i < kGr; ++i) mine = mine && (gv[i] == G || gv[i] < 0);
      uni = __all_sync(0xFFFFFFFFu, mine) != 0;
    }
    if (uni) {
      if (G != gcur) {
        flush();
        gcur = G;
        bool in_ring = false;
        if constexpr (kVec) in_ring = (walk_use.starts_group() || kb == kb0) && G == min(walk_use.grp, groups - 1);
        if (in_ring) {
          const uint32_t sza = src - 16 * lane + R::kSzOff + 16 * g;
          const uint4 sv = lds128(sza), zv = lds128(sza + 128);
          scur.s[0] = sv.x; scur.s[1] = sv.y; scur.s[2] = sv.z; scur.s[3] = sv.w;
          scur.z[0] = zv.x; scur.z[1] = zv.y; scur.z[2] = zv.z; scur.z[3] = zv.w;
        } else {
          scur = load_sz(G);
        }
      }
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        uint32_t b0[NT], b1[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          b0[nt] = __byte_perm(xv[nt][s], xv[nt][s + kPairs / 2], 0x5410);
          b1[nt] = __byte_perm(xv[nt][s], xv[nt][s + kPairs / 2], 0x7632);
        }
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          const uint32_t wa = word(w, 2 * mt), wb = word(w, 2 * mt + 1);
          const uint32_t a0 = PairCodeSel<B, T>::unit(wa, 2 * s, mg);
          const uint32_t a1 = PairCodeSel<B, T>::unit(wb, 2 * s, mg);
          const uint32_t a2 = PairCodeSel<B, T>::unit(wa, 2 * s + 1, mg);
          const uint32_t a3 = PairCodeSel<B, T>::unit(wb, 2 * s + 1, mg);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816<T>(accg[mt][nt], a0, a1, a2, a3, b0[nt], b1[nt]);
        }
        const uint32_t clo = kUni ? H::kOne2 : mg[PairCodeSel<B, T>::pos(2 * s) / 2];
        const uint32_t chi = kUni ? H::kOne2 : mg[PairCodeSel<B, T>::pos(2 * s + 1) / 2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_16816<T>(accx[nt], H::kOne2, clo, H::kOne2, chi, b0[nt], b1[nt]);
      }
    } else {
      // Rows of several groups: the exact per-row path, out of line (it is rare, and its temporaries
      // would otherwise count against the fast path's registers).
      flush();
      gcur = -1;
      SlowIn<NT, kXr, kGr> in;
      in.w[0] = w[0];
      in.w[1] = w[1];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < kXr; ++i) in.xv[nt][i] = xv[nt][i];
#pragma unroll
      for (int i = 0; i < kGr; ++i) in.gv[i] = gv[i];
      const SlowOut<NT> o = slow_kblock<B, NT, T>(in, G, a.scales, a.zeros, a.N, nq[0], nq[1], a.asym, magic);
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] += o.v[mt][nt][e];
    }
    walk_use.step();
    __syncwarp();
  }
  cp_async_wait<0>();
  flush();
  if (kb0 >= kb1) return;

  // The warp's results. acc[mt][nt][e]: column j = 2mt + e/2 of the lane group, x row 8nt + 2t + e%2 of
  // the block's rows.
  const int dt = std::is_same<T, __half>::value ? 1 : 2;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = 2 * mt + (e >> 1);
        const int64_t n = n0 + 4 * g + (j & 3) + 32 * (j >> 2), m = m0 + 8 * nt + 2 * t + (e & 1);
        if (m >= a.M || n >= a.N) continue;
        float v = acc[mt][nt][e];
        if (sg.partial != nullptr) {
          sg.partial[(int64_t(split) * a.M + m) * a.N + n] = v;
        } else {
          if (a.bias != nullptr) v += raw_to_float(load_raw(a.bias, n, dt), dt);
          store_out(a.out, m * a.ldo + n, dt, v);
        }
      }
}

// Kernel variants by the segments of one launch: 1 = one 2-bit segment, 2 = one 4-bit segment, 3 = several
// segments of either width (a channel-mix layer in one launch).
constexpr int width_mask(int bits) { return bits == 4 ? 2 : 1; }

// Shared memory of a kernel variant: the largest ring among its widths.
template <int kMask, int NT>
constexpr int tc_smem_bytes() {
  return kMask == 1 ? TcRing<2, NT>::kBytes
         : kMask == 2 ? TcRing<4, NT>::kBytes
                      : (TcRing<2, NT>::kBytes > TcRing<4, NT>::kBytes ? TcRing<2, NT>::kBytes : TcRing<4, NT>::kBytes);
}

// kMask 1 / 2: segment a.seg[0], split blockIdx.y. kMask 3: every segment of a weight in one launch,
// grid.y enumerating the segments' splits in order, so that a channel-mix layer's 2- and 4-bit rows
// stream concurrently (the small layers, where a launch per segment costs its latency twice). The
// 16-byte-load variants of one row tile are held to 3 blocks per SM (168 registers): ptxas otherwise
// takes 176-190 for one width and ~230 for both, i.e. 2 blocks; no spills for one width, ~220 bytes for
// both (measured faster than two launches on the small layers nonetheless).
template <int kMask, int NT, typename T, bool kVec>
__global__ void __launch_bounds__(kTcThreads, NT == 1 && kVec ? 3 : 1) wq_tc_kernel(const TcArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  if (a.pdl_mode != 1) pdl_trigger();
  if constexpr (kMask == 3) {
    int split = int(blockIdx.y), s = 0;
    while (s + 1 < a.nseg && split >= a.seg[s].splits) {
      split -= a.seg[s].splits;
      ++s;
    }
    const TcSegArgs sg = a.seg[s];
    if (sg.bits == 4)
      tc_body<4, NT, T, kVec>(a, sg, split, smem);
    else
      tc_body<2, NT, T, kVec>(a, sg, split, smem);
  } else {
    tc_body<kMask == 2 ? 4 : 2, NT, T, kVec>(a, a.seg[0], int(blockIdx.y), smem);
  }
  if (a.pdl_mode == 2) pdl_wait();
}

// x' = x * channel_scale in stored-row order, rounded once to T, rows [K, Kp) zero: xs (M, Kp). order 0:
// column p holds stored row p; order 2 / 4: the warpgroup kernel's k-slot order for that width (wg_slot_row
// in wq_internal.cuh; Kp a multiple of 64).
template <typename T>
__global__ void __launch_bounds__(kPrepThreads) wq_tc_prep_kernel(const T* __restrict__ x, int64_t ldx, int64_t M,
                                                                  int64_t K, int64_t Kp, const int32_t* perm,
                                                                  const T* cs, T* __restrict__ xs, int order,
                                                                  int64_t k_in) {
  // The main kernel behind this one is a programmatic dependent: let it launch and prefetch its words now
  // (it waits for this kernel's completion before it reads x'). This kernel is itself launched as a
  // programmatic dependent of whatever produced x (sm_90+), so it waits for that before reading x.
  pdl_trigger();
  pdl_wait();
  const int64_t pieces = Kp / 8, total = M * pieces;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = e / pieces, r0 = (e - m * pieces) * 8;
    uint32_t h[4];
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
      T v[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int64_t p = r0 + i + u;
        const int64_t r = order == 0 ? p : (p & ~int64_t(63)) + wg_slot_row(order, int(p & 63));
        float f = 0.0f;
        if (r < K) {
          const int64_t k = perm != nullptr ? min(max(int64_t(__ldg(perm + r)), int64_t(0)), k_in - 1) : r;
          f = float(x[m * ldx + k]);
          if (cs != nullptr) f *= float(cs[k]);
        }
        if constexpr (std::is_same<T, __half>::value) v[u] = __float2half_rn(f); else v[u] = __float2bfloat16_rn(f);
      }
      unsigned short lo, hi;
      memcpy(&lo, &v[0], 2);
      memcpy(&hi, &v[1], 2);
      h[i / 2] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    *reinterpret_cast<uint4*>(xs + m * Kp + r0) = make_uint4(h[0], h[1], h[2], h[3]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// The kernel of one (widths present, row tiles, type) and its resident blocks per SM (queried once).
template <int kMask, int NT, typename T, bool kVec>
struct TcKernel {
  static constexpr int kSmem = tc_smem_bytes<kMask, NT>();
  // Opts the kernel into more than 48 KB of dynamic shared memory (once); false if the device refuses.
  static bool prepare() {
    static const bool ok = [] {
      if (cudaFuncSetAttribute(wq_tc_kernel<kMask, NT, T, kVec>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess) {
        cudaGetLastError();
        return false;
      }
      return true;
    }();
    return ok;
  }
  // A programmatic dependent launch on sm_90+ (the kernel waits for its predecessors itself, see the
  // prefetch in wq_tc_kernel); a plain launch elsewhere or if the driver refuses the attribute.
  static cudaError_t launch(dim3 grid, cudaStream_t stream, const TcArgs& a, bool pdl) {
    return launch_pdl(wq_tc_kernel<kMask, NT, T, kVec>, grid, dim3(kTcThreads), kSmem, stream, pdl, a);
  }
  static int blocks_per_sm() {
    static const int v = [] {
      int n = 0;
      if (!prepare() ||
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, wq_tc_kernel<kMask, NT, T, kVec>, kTcThreads, kSmem) != cudaSuccess) {
        cudaGetLastError();
        n = 1;
      }
      return std::max(n, 1);
    }();
    return v;
  }
};
template <typename T, bool V, int kMask, class F>
auto with_tc_kernel(int nt, F&& f) {
  return nt == 1 ? f(TcKernel<kMask, 1, T, V>{}) : f(TcKernel<kMask, 2, T, V>{});
}
template <typename T, bool V, class F>
auto with_tc_kernel(int mask, int nt, F&& f) {
  if (mask == 1) return with_tc_kernel<T, V, 1>(nt, f);
  if (mask == 2) return with_tc_kernel<T, V, 2>(nt, f);
  return with_tc_kernel<T, V, 3>(nt, f);
}
// mask: width_mask of every segment or'ed together.
template <class F>
auto with_tc_kernel(bool fp16, bool vec, int mask, int nt, F&& f) {
  if (fp16) return vec ? with_tc_kernel<__half, true>(mask, nt, f) : with_tc_kernel<__half, false>(mask, nt, f);
  return vec ? with_tc_kernel<__nv_bfloat16, true>(mask, nt, f) : with_tc_kernel<__nv_bfloat16, false>(mask, nt, f);
}

struct TcSeg {
  int bits;
  int64_t row0, row_end, qrow0, qrows, nkb, splits, kps, slot0;
};
struct TcPlan {
  int nt = 1;
  bool one_launch = false;  // several segments in one kMask = 3 launch (else one launch per segment)
  int64_t mtiles = 0, ntiles = 0, slots = 0, kp = 0;
  size_t x_bytes = 0, ws_bytes = 0;
  int nseg = 0;
  TcSeg seg[kWqMaxSegments] = {};
};

constexpr size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

// The plan of a validated weight and 1 <= M <= 64: a pure function of (w's shape, M, SM count), shared by
// the workspace query and the call.
Status make_tc_plan(const char* fn, const WqWeight& w, int64_t M, int sms, TcPlan* p) {
  p->nt = M <= 8 ? 1 : 2;
  p->mtiles = (M + 8 * p->nt - 1) / (8 * p->nt);
  p->ntiles = (w.N + kTcCols - 1) / kTcCols;
  const int64_t base = p->mtiles * ((p->ntiles + kTcWarps - 1) / kTcWarps);  // blocks per split
  if (base > int64_t(std::numeric_limits<int>::max()))
    return Status::invalid(validate::err(fn, "N needs more than 2^31 - 1 blocks of " + std::to_string(kTcCols) +
                                                 " columns (N=" + std::to_string(w.N) + ")"));
  p->kp = (w.K + kXAlignRows - 1) / kXAlignRows * kXAlignRows;
  p->nseg = w.nseg;
  // Channel-mix in one launch on layers below 64 Mi weights (H100, 2/4 mix M = 1: 11008 x 4096 31.3 ->
  // 25.9 us, 4096 x 11008 26.8 -> 23.7); on larger ones the capped registers of the two-width kernel cost
  // more than a second launch (8192 x 28672: 65 -> 79 us).
  p->one_launch = w.nseg > 1 && w.K * w.N < (int64_t(64) << 20);
  const bool fp16 = w.sdtype == DType::kFloat16;
  auto resident_of = [&](int mask) {
    return int64_t(with_tc_kernel(fp16, true, mask, p->nt, [](auto k) { return k.blocks_per_sm(); })) * sms;
  };
  int64_t start = 0, q0 = 0;
  for (int s = 0; s < w.nseg; ++s) {
    TcSeg& sg = p->seg[s];
    sg.bits = w.bits[s];
    sg.row0 = start;
    sg.row_end = w.row_end[s];
    const int64_t chunks = (sg.row_end - start + 31) / 32;
    sg.qrow0 = q0;
    sg.qrows = chunks * sg.bits;
    const int64_t rows_per_kb = 4 * (32 / sg.bits);
    sg.nkb = (sg.row_end - start + rows_per_kb - 1) / rows_per_kb;
    q0 += sg.qrows;
    start = sg.row_end;
  }
  // Split-K, at least 4 k-blocks per warp.
  auto cap_of = [](const TcSeg& sg) { return std::min<int64_t>(std::max<int64_t>(1, sg.nkb / 4), 64); };
  if (p->one_launch) {
    const int64_t resident = resident_of(3);
    // Several segments share one launch, and every k-block moves the same 1 KB of words per warp whatever
    // its width: pick the longest per-warp run T (k-blocks) that minimises waves x T, each segment split
    // into ceil(nkb / T) pieces; a small premium on fewer splits (each adds a partial-sum slot).
    int64_t nkb_max = 1;
    for (int s = 0; s < w.nseg; ++s) nkb_max = std::max(nkb_max, p->seg[s].nkb);
    double best = -1.0;
    int64_t best_c[kWqMaxSegments] = {};
    for (int64_t c = 1; c <= 64 * int64_t(w.nseg); ++c) {
      const int64_t target = (nkb_max + c - 1) / c;
      int64_t blocks = 0, run = 0, cs[kWqMaxSegments], nsplit = 0;
      for (int s = 0; s < w.nseg; ++s) {
        const TcSeg& sg = p->seg[s];
        cs[s] = std::min(cap_of(sg), (sg.nkb + target - 1) / target);
        const int64_t kps = (sg.nkb + cs[s] - 1) / cs[s];
        run = std::max(run, kps);
        blocks += base * cs[s];
        nsplit += cs[s];
      }
      const int64_t waves = (blocks + resident - 1) / resident;
      const double cost = double(waves) * double(run) * (1.0 + 0.002 * double(nsplit));
      if (best < 0.0 || cost < best) {
        best = cost;
        for (int s = 0; s < w.nseg; ++s) best_c[s] = cs[s];
      }
    }
    for (int s = 0; s < w.nseg; ++s) p->seg[s].splits = best_c[s];
  } else {
    // A launch per segment: the count whose blocks fill the resident slots best (wave quantization: 448
    // blocks on 396 slots run as two waves), a small premium on fewer splits.
    for (int s = 0; s < w.nseg; ++s) {
      TcSeg& sg = p->seg[s];
      const int64_t resident = resident_of(width_mask(sg.bits)), cap = cap_of(sg);
      int64_t splits = 1;
      double best = -1.0;
      for (int64_t c = 1; c <= cap; ++c) {
        const int64_t blocks = base * c, waves = (blocks + resident - 1) / resident;
        const double score = double(blocks) / double(waves * resident) - 0.01 * double(c);
        if (score > best) {
          best = score;
          splits = c;
        }
      }
      sg.splits = splits;
    }
  }
  int64_t slots = 0;
  for (int s = 0; s < w.nseg; ++s) {
    TcSeg& sg = p->seg[s];
    sg.kps = (sg.nkb + sg.splits - 1) / sg.splits;
    sg.splits = (sg.nkb + sg.kps - 1) / sg.kps;  // no empty split
    sg.slot0 = slots;
    slots += sg.splits;
  }
  p->slots = slots;
  // x' scratch (reserved whatever x is: the workspace query does not see x's stride or alignment), then
  // the partial sums when there is more than one slot.
  p->x_bytes = round_up(size_t(M) * size_t(p->kp) * 2, 256);
  p->ws_bytes = p->x_bytes + (slots > 1 ? size_t(slots) * size_t(M) * size_t(w.N) * sizeof(float) : 0);
  return Status::ok();
}


}  // namespace

bool tc_eligible(const WqWeight& w, int64_t M, const DType* xtype) {
  if (!w.allow_half || (w.sdtype != DType::kFloat16 && w.sdtype != DType::kBFloat16)) return false;
  if (xtype != nullptr && *xtype != w.sdtype) return false;
  if (w.nseg < 1 || M < 1 || M > 64 || w.K >= (int64_t(1) << 30) || w.groups >= (int64_t(1) << 30)) return false;
  if (w.qrows * w.N >= (int64_t(1) << 32) || w.N >= (int64_t(1) << 31)) return false;  // 32-bit offsets (tc_body)
  for (int s = 0; s < w.nseg; ++s)
    if (w.bits[s] != 2 && w.bits[s] != 4) return false;
  return true;
}

Status tc_workspace(const char* fn, const WqWeight& w, int64_t M, int sms, size_t* bytes) {
  TcPlan plan;
  Status st = make_tc_plan(fn, w, M, sms, &plan);
  if (st.is_ok()) *bytes = plan.ws_bytes;
  return st;
}

Status tc_prep_x(const char* fn, const WqWeight& w, const void* x, int64_t M, int64_t ldx, int64_t kp, int order,
                 int64_t k_in, void* out, const DeviceInfo& dev, cudaStream_t stream) {
  const int64_t total = M * (kp / 8);
  const int64_t blocks = std::min<int64_t>((total + kPrepThreads - 1) / kPrepThreads, int64_t(dev.sms) * 8);
  // A programmatic dependent launch on sm_90+ (its launch overlaps the tail of the kernel that made x; the
  // kernel waits for it before reading x), a plain one elsewhere or if the driver refuses the attribute.
  auto launch = [&](auto kernel, auto xp, auto csp, auto outp) {
    return launch_pdl(kernel, dim3(unsigned(blocks)), dim3(kPrepThreads), 0, stream, dev.major >= 9, xp, ldx, M, w.K,
                      kp, w.perm, csp, outp, order, k_in);
  };
  const cudaError_t err =
      w.sdtype == DType::kFloat16
          ? launch(wq_tc_prep_kernel<__half>, static_cast<const __half*>(x),
                   static_cast<const __half*>(w.channel_scale), static_cast<__half*>(out))
          : launch(wq_tc_prep_kernel<__nv_bfloat16>, static_cast<const __nv_bfloat16*>(x),
                   static_cast<const __nv_bfloat16*>(w.channel_scale), static_cast<__nv_bfloat16*>(out));
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status::device(validate::err(fn, std::string("x' prep kernel launch failed: ") + cudaGetErrorString(err)));
  }
  return launch_error(fn, "x' prep kernel launch failed");
}

Status tc_matmul(const char* fn, const WqWeight& w, const void* x, int64_t M, int64_t ldx, const void* bias,
                 void* out, int64_t ldo, void* workspace, size_t workspace_bytes, const DeviceInfo& dev,
                 cudaStream_t stream) {
  TcPlan plan;
  Status st = make_tc_plan(fn, w, M, dev.sms, &plan);
  if (!st.is_ok()) return st;
  st = check_workspace(fn, workspace, workspace_bytes, plan.ws_bytes);
  if (!st.is_ok()) return st;
  const bool fp16 = w.sdtype == DType::kFloat16;
  char* wsb = static_cast<char*>(workspace);
  TcArgs a = {};
  a.N = w.N;
  a.g_idx = w.g_idx;
  a.groups = w.groups;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.M = M;
  a.mtiles = plan.mtiles;
  a.ntiles = plan.ntiles;
  a.bias = bias;
  a.out = out;
  a.ldo = ldo;
  a.asym = w.asym ? 1 : 0;
  a.magic = fp16 ? Tc<__half>::kMagic : Tc<__nv_bfloat16>::kMagic;
  // g_idx[r] == r / gs is what checkpoints (and the layers' act-order sort) produce; the kernel checks
  // every k-block's actual groups, so a wrong guess costs speed, never correctness.
  const int64_t gs_rows = (w.K + w.groups - 1) / w.groups;
  const bool direct = w.perm == nullptr && w.channel_scale == nullptr && w.K % 8 == 0 && ldx % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (direct) {
    a.x = x;
    a.ldx = ldx;
    a.xrows = w.K;
  } else {
    st = tc_prep_x(fn, w, x, M, ldx, plan.kp, 0, w.K, wsb, dev, stream);
    if (!st.is_ok()) return st;
    a.x = wsb;
    a.ldx = plan.kp;
    a.xrows = plan.kp;
  }
  float* partial = plan.slots > 1 ? reinterpret_cast<float*>(wsb + plan.x_bytes) : nullptr;
  // Every segment in one launch: 16-byte word loads when N % 4 == 0 and the words are 16-byte aligned
  // (then every segment's first word row is too).
  a.vec = (w.N % 4 == 0 && reinterpret_cast<uintptr_t>(w.qweight) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(w.scales) % 8 == 0 && reinterpret_cast<uintptr_t>(w.zeros) % 8 == 0)
              ? 1
              : 0;
  // Segment s's arguments.
  auto seg_args = [&](int s) {
    const TcSeg& sg = plan.seg[s];
    TcSegArgs d = {};
    d.qweight = w.qweight + sg.qrow0 * w.N;
    d.qrows = sg.qrows;
    d.row0 = sg.row0;
    d.row_end = sg.row_end;
    d.nkb = sg.nkb;
    d.kps = sg.kps;
    // A multiple of the k-block (the kernel's group walk counts whole k-blocks); when groups are smaller
    // than a k-block, every k-block takes the per-row path whatever the guess.
    const int64_t kb_rows = 4 * (32 / sg.bits);
    d.gs_guess = std::max<int64_t>(kb_rows, (gs_rows + kb_rows - 1) / kb_rows * kb_rows);
    d.partial = partial != nullptr ? partial + sg.slot0 * M * w.N : nullptr;
    d.bits = sg.bits;
    d.splits = static_cast<int>(sg.splits);
    return d;
  };
  const unsigned grid_x = static_cast<unsigned>(plan.mtiles * ((plan.ntiles + kTcWarps - 1) / kTcWarps));
  auto launch = [&](int mask, int64_t grid_y) -> Status {
    const cudaError_t err = with_tc_kernel(fp16, a.vec != 0, mask, plan.nt, [&](auto k) {
      k.prepare();  // a refusal shows as the launch error below
      return k.launch(dim3(grid_x, static_cast<unsigned>(grid_y)), stream, a, dev.major >= 9);
    });
    if (err != cudaSuccess) {
      cudaGetLastError();
      return Status::device(validate::err(fn, std::string("tensor-core kernel launch failed: ") + cudaGetErrorString(err)));
    }
    return launch_error(fn, "tensor-core kernel launch failed");
  };
  if (plan.one_launch) {
    a.pdl_mode = 0;
    a.nseg = plan.nseg;
    int64_t grid_y = 0;
    for (int s = 0; s < plan.nseg; ++s) {
      a.seg[s] = seg_args(s);
      grid_y += plan.seg[s].splits;
    }
    st = launch(3, grid_y);
    if (!st.is_ok()) return st;
  } else {
    a.nseg = 1;
    for (int s = 0; s < plan.nseg; ++s) {
      a.pdl_mode = plan.nseg == 1 ? 0 : s == 0 ? 1 : 2;
      a.seg[0] = seg_args(s);
      st = launch(width_mask(plan.seg[s].bits), plan.seg[s].splits);
      if (!st.is_ok()) return st;
    }
  }
  if (plan.slots == 1) return Status::ok();
  const int dt = static_cast<int>(w.sdtype);
  return launch_reduce(fn, dev, stream, partial, plan.slots, M, w.N, bias, dt, out, dt, ldo);
}

}  // namespace wq_detail
}  // namespace cuda
}  // namespace lowbit

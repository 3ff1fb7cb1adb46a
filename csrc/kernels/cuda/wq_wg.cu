// Warpgroup (wgmma) weight-only matmul for Hopper (sm_90a): the medium- and large-M path of wq_matmul
// (include/lowbit/kernels/wq.h, WqWeight::allow_half): segments of 2 or 4 bits (one prep pass and one launch
// per segment, partial sums over all of them when there are several), x of the scales' 16-bit dtype, M >= 17. The decode kernel (wq_tc.cu) keeps M <= 16; from M = 17 the work per weight grows with M
// and mma.sync's issue rate, not the bytes, becomes the limit: wgmma takes a 64 x n x 16 product per
// instruction and runs asynchronously beside the dequantization.
//
// Orientation. out^T = W^T x'^T, as in wq_tc.cu: the WEIGHTS are wgmma's A operand (64 output columns x 16
// k per instruction), fed from REGISTERS, so they are dequantized straight into the A fragment and never
// pass through shared memory as 16-bit values; x' is the B operand (rows of x x 16 k), read by wgmma from
// shared memory through a descriptor (K-major, 128-byte swizzle: x' row r's 16-byte chunk c of a 64-slot
// k-block sits at chunk c ^ (r % 8) of its 128-byte line, written so by cp.async).
//
// A free k order. The A fragment (mma.m16n8k16's layout, warp w of the warpgroup taking rows 16w .. 16w +
// 15) gives lane (g = lane / 4, t = lane % 4) columns c0 = 16w + g and c1 = c0 + 8 at k-slots 2t + 8h + e
// (h, e in {0, 1}) of each 16-slot k-step s. The dot product does not care which stored row a k-slot
// holds as long as A and B agree, so the prep kernel writes x' in the order wg_slot_row (wq_internal.cuh)
// defines: lane t then decodes whole words of its own. 4-bit: words 2t and 2t + 1 of the column's 64-row
// k-block (8 rows each); step s, half h takes pair s of word 2t + h (rows s and s + 4 of the word).
// 2-bit: word t (16 rows); step s, half h takes pair 2s + h (rows 2s + h and 2s + h + 8). A pair is one
// LOP3 (PairCode::unit, wq_codes.cuh: the two codes masked in place and OR'd with the exponent of
// c_P = 2^(m - P), m the mantissa bits, so that each half is exactly c_P + q), one HSUB2 leaves q, and the
// weight is the tensor-core permission's per-row formula (wq.h):
//   sym:  w16 = fma(q, s, -z)            (HFMA2, one rounding)
//   asym: w16 = s * (q - z)              (HSUB2 + HMUL2)
// with the (s, z) of the row's group. When all 64 rows of a k-block share one group (one vote over its
// g_idx), a lane's (s, z) are one pair per column: read from the stage when the group is the expected one
// (row / gs_guess, its rows copied with the stage), else loaded directly (once per group change);
// otherwise each row pair looks up its own groups (act-order without the layers' sort, groups of fewer
// than 64 rows) in a rolled loop through a per-warp scratch in shared memory (unrolled, it kept every
// pair's loads live and made the fast path spill). Same arithmetic either way.
//
// Pipeline. A CTA is two warpgroups on 128 WT consecutive columns (WT tiles of 64 each; WT = 2 only for 32-row tiles
// on large layers) and one tile of MT rows of x (MT = 32, 64, 128 or 256: wgmma n = 32, or MT / 64 of n = 64), over
// one split-K range of 64-row k-blocks. Every thread copies its share of each k-block (x' tile, words, g_idx, the
// expected group's (s, z)) into a ring of S stages with cp.async (words zero-filled past N and past the segment,
// g_idx past K; rows of x past M read row M - 1 and are never stored). Iteration i: wait for stage i;
// wgmma.wait_group 1 (this warpgroup's k-block i - 2 has retired); barrier (so every warpgroup's has: stage i - 2 is
// free); refill it with k-block i + S - 2; dequantize k-block i into the A registers of parity i % 2; fence; the
// wgmmas; commit. The dequantization of k-block i thus overlaps the wgmmas of k-block i - 1 (WT = 2 has one register
// set: it waits for them first). The first wgmma starts the accumulators with scale-d = 0: zeroing them with moves
// made ptxas serialize every wgmma (its C7515 warning).
//
// Rows past K in the tail k-block are zeroed in the A fragment (their padding codes may be anything) and
// x' is zero there. Output: one split writes out[m, n] (+ bias, one rounding); several write fp32
// partials per split and launch_reduce (wq_matmul.cu) sums them in split order. Deterministic; no atomics.
//
// Measured (H100, 4-bit g128, CUDA graph, docs/PERFORMANCE.md): 8192 x 28672 M = 32 113 us, M = 64 147 us,
// M = 256 ~400 us (fp16 F.linear 166 / 172 / 199 us); ~200 instructions per warp and k-block, a third of
// them the dequantization, the rest copies, the group vote and the loop: issue-bound, not at the bytes.
#include "wq_internal.cuh"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "../validate.h"
#include "pdl.cuh"
#include "wq_codes.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LOWBIT_WG_DEVICE 1
#endif

namespace lowbit {
namespace cuda {
namespace wq_detail {
namespace {

constexpr int kWgThreads = 256;  // two warpgroups
constexpr int kWgRows = 64;      // k rows per k-block: 4 wgmma k-steps, one 128-byte line of x'
// WT: 64-column wgmma tiles per warpgroup, so 128 WT columns per CTA. Two (32-row tiles of x on large
// layers only, see make_wg_plan) spread the per-k-block overhead of copies, group vote and barrier over
// twice the weights; the register budget allows it only with the 16 accumulators of a 32-row tile.
template <int B, int MT, int WT>
struct WgShape {
  static constexpr int kXBytes = MT * 128;                 // x' tile: MT rows x 64 k, 16-bit
  static constexpr int kWordRows = kWgRows * B / 32;        // 8 (4-bit) / 4 (2-bit)
  static constexpr int kCols = 128 * WT;
  static constexpr int kWBytes = kWordRows * kCols * 4;     // words: [word row][CTA columns]
  static constexpr int kGBytes = kWgRows * 4;               // g_idx of the 64 rows
  static constexpr int kSzBytes = 2 * kCols * 2;            // (s, z) rows of the expected group
  static constexpr int kStage = (kXBytes + kWBytes + kGBytes + kSzBytes + 1023) / 1024 * 1024;
  static constexpr int kStages = MT >= 128 ? 4 : (MT == 32 ? 5 : 6);
  // The per-row path's scratch: 8 warps x the lane's 16 fragment registers per tile x 32 lanes x 4 bytes.
  static constexpr int kScratch = 8 * WT * 16 * 128;
  static constexpr int kSmem = 1024 + kStages * kStage + kScratch;  // + slack to align the base to 1024
  static_assert(kStages >= 3, "the ring refills stage i - 2");
  static_assert(MT > 64 || 2 * kSmem <= 228 * 1024, "two CTAs per SM up to MT = 64");
  static_assert(kSmem <= 227 * 1024, "sm_90 allows 227 KB of shared memory per block");
};

struct WgArgs : WqSegArgs {
  const void* x;            // x' from the prep kernel in k-slot order (wg_slot_row): M rows of ldx = Kp
  int64_t ldx;
  int sz_vec;               // 1: the expected group's (s, z) rows come with the stage (16-byte copies)
};

#ifdef LOWBIT_WG_DEVICE
__device__ __forceinline__ uint32_t wg_smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, L2 only; src_bytes 0 writes zeros (the source is not read).
__device__ __forceinline__ void wg_cp16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void wg_cp4(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void wg_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint32_t wg_lds(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t wg_lds16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void wg_sts(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_mma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_mma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps registers that an in-flight wgmma reads (A) or writes (accumulators) alive and unmoved up to here.
template <int N>
__device__ __forceinline__ void wg_pin(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void wg_pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// K-major, 128-byte swizzle (as gemm_s8_sm90.cu): start >> 4, LBO 1 (unused), SBO 1024 B, mode 1.
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// d (64 x 32 fp32 per warpgroup, 16 per thread) += A (registers) * B (descriptor), scale-d = 1.
template <typename T>
__device__ __forceinline__ void wg_mma_n32(float (&d)[16], const uint32_t (&a)[4], uint64_t db, uint32_t accumulate) {
#define LOWBIT_WG_N32(TY)                                                                                          \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %21, 0;\n"                                                       \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                                        \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "                         \
               "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                                     \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),        \
                 "+f"(d[15])                                                                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate))
  if constexpr (std::is_same<T, __half>::value)
    LOWBIT_WG_N32("f16");
  else
    LOWBIT_WG_N32("bf16");
#undef LOWBIT_WG_N32
}
template <typename T>
__device__ __forceinline__ void wg_mma_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db, uint32_t accumulate) {
#define LOWBIT_WG_N64(TY)                                                                                          \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"                                                       \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                        \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                          \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                \
               "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                                     \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),        \
                 "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),      \
                 "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),      \
                 "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate))
  if constexpr (std::is_same<T, __half>::value)
    LOWBIT_WG_N64("f16");
  else
    LOWBIT_WG_N64("bf16");
#undef LOWBIT_WG_N64
}

// (v, v) of 16-bit element i as a pair.
__device__ __forceinline__ uint32_t wg_pair_of(const void* p, int64_t i) {
  const uint32_t h = __ldg(static_cast<const unsigned short*>(p) + i);
  return h | (h << 16);
}
#endif  // LOWBIT_WG_DEVICE

// Accumulators per thread: MT / 2 (a 64 x MT fp32 tile over 128 threads), as n = 32 (MT = 32) or MT / 64
// tiles of n = 64.
template <int MT>
struct WgAcc {
  static constexpr int kTiles = MT == 32 ? 1 : MT / 64;
  static constexpr int kPer = MT == 32 ? 16 : 32;
};

// Two CTAs per SM up to MT = 64 (<= 128 registers), one for MT = 128 / 256 (64 / 128 accumulators per
// thread).
template <typename T, int B, int MT, int WT, bool kAsym>
__global__ void __launch_bounds__(kWgThreads, MT <= 64 ? 2 : 1) wq_wg_kernel(const WgArgs a) {
#ifdef LOWBIT_WG_DEVICE
  using S = WgShape<B, MT, WT>;
  using Acc = WgAcc<MT>;
  using Sel = PairCodeSel<B, T>;
  constexpr int kCols = S::kCols;
  constexpr int kParities = WT == 1 ? 2 : 1;                  // A register sets (registers allowing)
  constexpr int kXCopies = MT * 8 / kWgThreads;               // 16-byte copies of x' per thread
  constexpr int kWChunks = S::kWordRows * (kCols / 4);        // 16-byte word chunks per k-block
  constexpr int kWCopies = (kWChunks + kWgThreads - 1) / kWgThreads;
  static_assert(kXCopies >= 1 && 2 * (kCols / 8) <= kWgThreads - kWgRows, "copy split");
  extern __shared__ __align__(1024) uint8_t wg_smem[];
  const uint32_t base = (wg_smem_addr(wg_smem) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t mt = int64_t(blockIdx.x) % a.mtiles, nt = int64_t(blockIdx.x) / a.mtiles;
  const int64_t m0 = mt * MT;
  const int n0 = int(nt) * kCols;
  const int kb0 = int(blockIdx.y) * a.kps, nk = min(a.nkb - kb0, a.kps);
  const int K = int(a.K), N = int(a.N);  // wg_eligible: K < 2^30, N < 2^31

  // Copy plan, fixed per thread; k-block kb reads source + kb * step. x' (prepared: Kp columns, every
  // chunk in range): kXCopies chunks, rows past M read row M - 1 (never stored). Words: one chunk of 4
  // columns (zero-filled past N and past the segment's word rows). g_idx: one entry (zero past K). The
  // expected group's (s, z): one chunk of 8 columns (sz_vec).
  // Copy j of x' is row r = tid / 8 + 32 j, chunk tid % 8 (its swizzled place: the same chunk ^ (r % 8)
  // for every j, as 32 j % 8 == 0).
  const int xch = tid & 7, xr0 = tid >> 3;
  const T* const xsrc0 = static_cast<const T*>(a.x) + xch * 8;
  const uint32_t xdst0 = uint32_t(xr0) * 128u + uint32_t((xch ^ (xr0 & 7)) << 4);
  const int64_t wstep = int64_t(S::kWordRows) * N;
  const int qrows = int(a.qrows_used);
  const int szc = tid - kWgRows, szwhich = szc / (kCols / 8), szch = szc % (kCols / 8);
  const bool sz_thread = a.sz_vec != 0 && szc >= 0 && szc < 2 * (kCols / 8) && n0 + szch * 8 < N;
  const uint16_t* const szsrc =
      static_cast<const uint16_t*>(szwhich ? a.zeros : a.scales) + (sz_thread ? n0 + szch * 8 : 0);
  const uint32_t szdst = S::kXBytes + S::kWBytes + S::kGBytes + uint32_t(szwhich * kCols * 2 + szch * 16);
  const int groups = int(a.groups);
  // The group a k-block is expected to lie in: row0 / gs_guess, in float (a guess: producer and consumer
  // compute the same value, and a wrong one only costs the direct loads below).
  auto guess = [&](int row0) { return min(int((float(a.row_base + row0) + 0.5f) * a.inv_gs), groups - 1); };

  auto load = [&](int kb, int st) {
    const uint32_t sb = base + uint32_t(st) * S::kStage;
    if (kb < kb0 + nk) {
      const int col0 = kb * kWgRows;
#pragma unroll
      for (int j = 0; j < kXCopies; ++j)
        wg_cp16(sb + xdst0 + uint32_t(j) * (32u * 128u), xsrc0 + min(m0 + xr0 + 32 * j, a.M - 1) * a.ldx + col0, 16u);
#pragma unroll
      for (int j = 0; j < kWCopies; ++j) {
        const int c = tid + j * kWgThreads, wj = c / (kCols / 4), wch = c % (kCols / 4);
        if (kWChunks % kWgThreads == 0 || c < kWChunks) {
          const bool ok = n0 + wch * 4 < N && kb * S::kWordRows + wj < qrows;
          wg_cp16(sb + S::kXBytes + uint32_t(wj * kCols + wch * 4) * 4u,
                  a.qweight + (ok ? int64_t(kb) * wstep + int64_t(wj) * N + n0 + wch * 4 : 0), ok ? 16u : 0u);
        }
      }
      if (tid < kWgRows) {
        const bool ok = col0 + tid < K;
        wg_cp4(sb + S::kXBytes + S::kWBytes + uint32_t(tid) * 4u, a.g_idx + (ok ? col0 + tid : 0), ok ? 4u : 0u);
      } else if (sz_thread) {
        wg_cp16(sb + szdst, szsrc + int64_t(guess(col0)) * N, 16u);
      }
    }
    wg_commit();
  };

  // This lane's two columns per 64-column tile u of its warpgroup (A rows g and g + 8 of its warp): tile
  // u's columns are colw0 + 64 u (+ 8); word addresses: 4-bit word rows 2t and 2t + 1, 2-bit word row t.
  const int colw0 = (warp >> 2) * 64 * WT + (warp & 3) * 16 + g;
  constexpr int kLaneWords = B == 4 ? 2 : 1;
  const uint32_t wrow0 = uint32_t(kLaneWords * t) * (kCols * 4u) + uint32_t(colw0) * 4u;
  auto col_of = [&](int u, int ci) { return n0 + colw0 + 64 * u + 8 * ci; };
  auto cclamp = [&](int u, int ci) { return int64_t(min(col_of(u, ci), N - 1)); };
  // mg[P / 2]: the magic of value 2^(m - P) (m the mantissa bits) that makes a code at bit P weigh 1
  // (PairCode::unit), from a register so that mask-and-or stays one LOP3.
  uint32_t mg[5];
#pragma unroll
  for (int j = 0; j < 5; ++j) mg[j] = a.magic - (uint32_t(2 * j) << Tc<T>::kMant) * 0x00010001u;

  float acc[WT][Acc::kTiles][Acc::kPer];  // the first wgmma (scale-d 0) writes them; nk >= 1 (the plan)
  uint32_t areg[kParities][WT][4][4];     // [k-block parity][tile][k-step][fragment register]

  int cur_g = -1;
  uint32_t sp[WT][2] = {}, zp[WT][2] = {};  // (s, s) and (z, z) (sym: (-z, -z)) of each tile's 2 columns

  pdl_wait();  // x' comes from the prep kernel just before this one (a programmatic dependent launch)
  for (int i = 0; i < S::kStages - 2; ++i) load(kb0 + i, i);

  // k-block i: dequantized into areg[i % 2] while this warpgroup's wgmmas of k-block i - 1 run.
  auto step = [&](const int i, auto parity) {
    constexpr int P = decltype(parity)::value % kParities;
    const int st = i % S::kStages;
    wg_cp_wait<S::kStages - 3>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    wg_mma_wait<kParities - 1>();  // k-block i - kParities has retired: areg[P] is free
    __syncthreads();   // stage i is complete; every warpgroup has retired k-block i - 2, so its stage is free
    load(kb0 + i + S::kStages - 2, (i + S::kStages - 2) % S::kStages);

    const uint32_t sb = base + uint32_t(st) * S::kStage;
    const uint32_t sw = sb + S::kXBytes, sgi = sw + S::kWBytes;
    const int row0 = (kb0 + i) * kWgRows;
    // Groups: one vote over the 64 rows (rows past K count as matching).
    const int32_t gfirst = int32_t(wg_lds(sgi));
    const int32_t ga = int32_t(wg_lds(sgi + uint32_t(lane) * 4u));
    const int32_t gb = int32_t(wg_lds(sgi + uint32_t(lane + 32) * 4u));
    const bool uniform =
        __all_sync(0xFFFFFFFFu, (ga == gfirst || row0 + lane >= K) && (gb == gfirst || row0 + lane + 32 >= K));
    if (uniform && a.sz_vec && gfirst == guess(row0)) {
      // The staged rows: (s, s), (z, z) of columns colw, colw + 8.
      const uint32_t ssz = sgi + S::kGBytes;
#pragma unroll
      for (int u = 0; u < WT; ++u)
#pragma unroll
        for (int ci = 0; ci < 2; ++ci) {
          const uint32_t off = uint32_t(colw0 + 64 * u + 8 * ci) * 2u;
          sp[u][ci] = __byte_perm(wg_lds16(ssz + off), 0u, 0x1010);
          zp[u][ci] = __byte_perm(wg_lds16(ssz + kCols * 2u + off), 0u, 0x1010);
          if constexpr (!kAsym) zp[u][ci] ^= 0x80008000u;  // -z
        }
      cur_g = -1;
    } else if (uniform && gfirst != cur_g) {
      cur_g = gfirst;
      const int64_t gg = min(max(gfirst, 0), groups - 1);
#pragma unroll
      for (int u = 0; u < WT; ++u)
#pragma unroll
        for (int ci = 0; ci < 2; ++ci) {
          sp[u][ci] = wg_pair_of(a.scales, gg * N + cclamp(u, ci));
          zp[u][ci] = wg_pair_of(a.zeros, gg * N + cclamp(u, ci));
          if constexpr (!kAsym) zp[u][ci] ^= 0x80008000u;
        }
    }
    uint32_t wv[WT][kLaneWords][2];
#pragma unroll
    for (int u = 0; u < WT; ++u)
#pragma unroll
      for (int h = 0; h < kLaneWords; ++h)
#pragma unroll
        for (int ci = 0; ci < 2; ++ci)
          wv[u][h][ci] = wg_lds(sw + wrow0 + uint32_t(h) * (kCols * 4u) + uint32_t(64 * u + 8 * ci) * 4u);

    // Fragment register 2h + ci of k-step s: column c_ci, k-slots 16 s + 2t + 8h (+1): pair s of word
    // 2t + h (4-bit) or pair 2s + h of word t (2-bit), as c_P + q, minus c_P, then the per-row formula.
    auto weight = [&](uint32_t v, uint32_t sub, uint32_t s2, uint32_t z2) -> uint32_t {
      return pair_weight<T, kAsym>(v, sub, s2, z2);
    };
    if (uniform) {
#pragma unroll
      for (int u = 0; u < WT; ++u)
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int ci = 0; ci < 2; ++ci)
              areg[P][u][s][2 * h + ci] =
                  weight(Sel::unit(wv[u][B == 4 ? h : 0][ci], B == 4 ? s : 2 * s + h, mg),
                         mg[Sel::pos(B == 4 ? s : 2 * s + h) / 2], sp[u][ci], zp[u][ci]);
    } else {
      // Rows of one pair may lie in different groups: each row's own (s, z). A rolled loop over the
      // lane's pairs (the unrolled form kept every pair's loads live and spilled the fast path), through
      // this lane's column of a per-warp scratch in shared memory, then into the A registers.
      const uint32_t scr =
          base + S::kStages * S::kStage + uint32_t(warp) * uint32_t(WT * 16 * 128) + uint32_t(lane) * 4u;
#pragma unroll 1
      for (int idx = 0; idx < WT * 16; ++idx) {
        const int ci = idx & 1, h = (idx >> 1) & 1, s = (idx >> 2) & 3, u = idx >> 4;
        const int k = 16 * s + 2 * t + 8 * h;
        uint32_t s2, z2;
        wg_row_pair_sz<kAsym>(a.scales, a.zeros, groups, N, int32_t(wg_lds(sgi + uint32_t(wg_slot_row(B, k)) * 4u)),
                              int32_t(wg_lds(sgi + uint32_t(wg_slot_row(B, k + 1)) * 4u)), cclamp(u, ci), &s2, &z2);
        const int pi = B == 4 ? s : 2 * s + h;
        const uint32_t w =
            wg_lds(sw + wrow0 + uint32_t(B == 4 ? h : 0) * (kCols * 4u) + uint32_t(64 * u + 8 * ci) * 4u);
        const uint32_t sub = a.magic - (uint32_t(Sel::pos(pi)) << Tc<T>::kMant) * 0x00010001u;
        wg_sts(scr + uint32_t(idx) * 128u, weight(Sel::unit(w, pi, mg), sub, s2, z2));
      }
#pragma unroll
      for (int u = 0; u < WT; ++u)
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int ci = 0; ci < 2; ++ci)
              areg[P][u][s][2 * h + ci] = wg_lds(scr + uint32_t(((u * 4 + s) * 2 + h) * 2 + ci) * 128u);
    }
    if (row0 + kWgRows > K) {  // tail k-block: rows past K weigh 0 whatever their padding codes
#pragma unroll
      for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t keep = wg_tail_keep(B, row0, 16 * s + 2 * t + 8 * h, K);
#pragma unroll
          for (int u = 0; u < WT; ++u) {
            areg[P][u][s][2 * h] &= keep;
            areg[P][u][s][2 * h + 1] &= keep;
          }
        }
    }
#pragma unroll
    for (int u = 0; u < WT; ++u)
#pragma unroll
      for (int j = 0; j < Acc::kTiles; ++j) wg_pin(acc[u][j]);
    wg_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int u = 0; u < WT; ++u)
#pragma unroll
        for (int j = 0; j < Acc::kTiles; ++j) {
          const uint64_t db = wg_desc(sb + uint32_t(j) * (64u * 128u) + uint32_t(s) * 32u);
          if constexpr (MT == 32)
            wg_mma_n32<T>(acc[u][j], areg[P][u][s], db, i > 0 || s > 0 ? 1u : 0u);
          else
            wg_mma_n64<T>(acc[u][j], areg[P][u][s], db, i > 0 || s > 0 ? 1u : 0u);
        }
    wg_mma_commit();
#pragma unroll
    for (int u = 0; u < WT; ++u)
#pragma unroll
      for (int j = 0; j < Acc::kTiles; ++j) wg_pin(acc[u][j]);
  };
  for (int i = 0; i < nk; i += 2) {
    step(i, std::integral_constant<int, 0>{});
    if (i + 1 < nk) step(i + 1, std::integral_constant<int, 1>{});
  }
  wg_mma_wait<0>();
#pragma unroll
  for (int u = 0; u < WT; ++u)
#pragma unroll
    for (int j = 0; j < Acc::kTiles; ++j) wg_pin(acc[u][j]);
  wg_cp_wait<0>();  // the empty trailing groups
  pdl_trigger();

  // Fragment element e of tile j: column c0 (e % 4 < 2) or c1, row of x m0 + 64 j + 8 (e / 4) + 2 t + e % 2.
#pragma unroll
  for (int u = 0; u < WT; ++u)
#pragma unroll
  for (int j = 0; j < Acc::kTiles; ++j) {
#pragma unroll
    for (int e = 0; e < Acc::kPer; ++e) {
      const int n = col_of(u, (e >> 1) & 1);
      const int64_t m = m0 + 64 * j + 8 * (e >> 2) + 2 * t + (e & 1);
      if (n >= N || m >= a.M) continue;
      const float v = acc[u][j][e];
      if (a.partial != nullptr) {
        a.partial[(int64_t(blockIdx.y) * a.M + m) * N + n] = v;
      } else {
        const float b = a.bias != nullptr ? float(__ldg(static_cast<const T*>(a.bias) + n)) : 0.0f;
        static_cast<T*>(a.out)[m * a.ldo + n] = T(v + b);
      }
    }
  }
#else
  __trap();  // never launched: the host checks that the sm_90a code was loaded (wg_ready)
#endif
}

// Calls f(kernel, smem bytes) with the instantiation for (dtype, bits, MT, WT, asym); WT = 2 exists for
// MT = 32 only.
template <typename F>
decltype(auto) with_wg_kernel(bool fp16, int bits, int mt, int wt, bool asym, F&& f) {
  auto by_t = [&](auto tag) -> decltype(auto) {
    using T = typename decltype(tag)::type;
    auto by_b = [&](auto bt) -> decltype(auto) {
      constexpr int B = decltype(bt)::value;
      auto by_m = [&](auto mtag) -> decltype(auto) {
        constexpr int MT = decltype(mtag)::value;
        if constexpr (MT == 32) {
          if (wt == 2) {
            if (asym) return f(wq_wg_kernel<T, B, MT, 2, true>, WgShape<B, MT, 2>::kSmem);
            return f(wq_wg_kernel<T, B, MT, 2, false>, WgShape<B, MT, 2>::kSmem);
          }
        }
        if (asym) return f(wq_wg_kernel<T, B, MT, 1, true>, WgShape<B, MT, 1>::kSmem);
        return f(wq_wg_kernel<T, B, MT, 1, false>, WgShape<B, MT, 1>::kSmem);
      };
      if (mt == 32) return by_m(std::integral_constant<int, 32>{});
      if (mt == 64) return by_m(std::integral_constant<int, 64>{});
      if (mt == 128) return by_m(std::integral_constant<int, 128>{});
      return by_m(std::integral_constant<int, 256>{});
    };
    if (bits == 2) return by_b(std::integral_constant<int, 2>{});
    return by_b(std::integral_constant<int, 4>{});
  };
  struct H { using type = __half; };
  struct BF { using type = __nv_bfloat16; };
  if (fp16) return by_t(H{});
  return by_t(BF{});
}

// Per device: cc 9.0 with the sm_90a code of every instantiation loaded and its shared memory granted.
bool wg_ready(int device) {
  static std::atomic<int> state[64];  // 0 unknown, 1 ready, 2 not
  if (device < 0 || device >= 64) return false;
  const int st = state[device].load(std::memory_order_acquire);
  if (st != 0) return st == 1;
  cudaDeviceProp prop{};
  bool ok = cudaGetDeviceProperties(&prop, device) == cudaSuccess && prop.major == 9 && prop.minor == 0;
  for (int f = 0; f < 2 && ok; ++f)
    for (int b : {2, 4})
      for (int mt : {32, 64, 128, 256})
        for (int wt = 1; wt <= (mt == 32 ? 2 : 1); ++wt)
          for (int as = 0; as < 2; ++as)
            ok = ok && with_wg_kernel(f == 0, b, mt, wt, as == 1,
                                      [&](auto kernel, int smem) { return sm90a_kernel_ready(kernel, smem, prop); });
  cudaGetLastError();
  state[device].store(ok ? 1 : 2, std::memory_order_release);
  return ok;
}

struct WgPlan {
  bool tma = false;  // the TMA-fed kernel (wq_wgt.cu) takes this segment
  int mt = 64, wt = 1;
  int64_t mtiles = 0, ntiles = 0, nkb = 0, splits = 1, kps = 0, kp = 0;
  size_t x_bytes = 0, ws_bytes = 0;
};

// Rows of x per CTA tile: the smallest of 32, 64, 128, 256 that holds M (256 for more), at most
// LOWBIT_WQ_WG_TILE (read once; for tuning). One tile over all of M decodes each weight once, but a
// 256-row CTA runs alone on its SM: on layers of fewer than 64 column tiles it then needs more split-K
// partials, and two 128-row tiles were faster (H100, M = 256, CUDA graph: 4096^2 40.1 vs 53.1 us;
// 4096 x 11008 104.9 vs 107.1, 8192 x 28672 400.8 vs 408.7, 28672 x 8192 305.2 vs 364.0 with 256).
int wg_tile_rows(int64_t M, int64_t ntiles) {
  static const int cap = [] {
    const char* e = std::getenv("LOWBIT_WQ_WG_TILE");
    const int v = e != nullptr ? std::atoi(e) : 256;
    return v >= 256 ? 256 : (v >= 128 ? 128 : (v >= 64 ? 64 : 32));
  }();
  return std::min(cap, M <= 32 ? 32 : (M <= 64 ? 64 : (M <= 128 || ntiles < 64 ? 128 : 256)));
}

// A pure function of (w's shape, M, SM count), shared by the workspace query and the call.
Status make_wg_plan(const char* fn, const WqWeight& w, int64_t M, int sms, WgPlan* p) {
  p->nkb = (w.K + kWgRows - 1) / kWgRows;
  p->kp = p->nkb * kWgRows;
  p->x_bytes = (size_t(M) * size_t(p->kp) * 2 + 255) / 256 * 256;
  if (wgt_usable(w, M)) {
    p->tma = true;
    wgt_plan(w, M, sms, &p->mtiles, &p->ntiles, &p->splits, &p->kps);
    p->ws_bytes = p->x_bytes + (p->splits > 1 ? size_t(p->splits) * size_t(M) * size_t(w.N) * sizeof(float) : 0);
    return Status::ok();
  }
  const int64_t tiles128 = (w.N + 127) / 128;
  p->mt = wg_tile_rows(M, tiles128);
  // Two 64-column tiles per warpgroup with 32-row tiles on layers of >= 64 column tiles (H100, kernel time,
  // 4-bit: 8192 x 28672 M = 32 98 -> 90 us, 28672 x 8192 86 -> 80); on smaller ones the halved CTA count
  // needs more split-K partials (4096^2 M = 17: 9.6 -> 12.0 us).
  p->wt = p->mt == 32 && tiles128 >= 64 ? 2 : 1;
  p->ntiles = (w.N + 128 * p->wt - 1) / (128 * p->wt);
  p->mtiles = (M + p->mt - 1) / p->mt;
  const int64_t base = p->mtiles * p->ntiles;
  if (base > int64_t(std::numeric_limits<int>::max()))
    return Status::invalid(validate::err(fn, "too many tiles for one launch (M=" + std::to_string(M) +
                                                 ", N=" + std::to_string(w.N) + ")"));
  // Split-K: the count whose CTAs fill the
  // resident slots best, each split at least 8 k-blocks, a small premium on fewer splits (each adds a
  // partial-sum slot and the reduce pass).
  int per_sm = 0;
  with_wg_kernel(w.sdtype == DType::kFloat16, w.bits[0], p->mt, p->wt, w.asym, [&](auto kernel, int smem) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWgThreads, smem) != cudaSuccess) {
      cudaGetLastError();
      per_sm = 1;
    }
    return 0;
  });
  const int64_t resident = int64_t(std::max(per_sm, 1)) * sms;
  const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(p->nkb / 8, 32));
  double best = -1.0;
  for (int64_t c = 1; c <= cap; ++c) {
    const int64_t blocks = base * c, waves = (blocks + resident - 1) / resident;
    const double score = double(blocks) / double(waves * resident) - 0.02 * double(c - 1);
    if (score > best) {
      best = score;
      p->splits = c;
    }
  }
  p->kps = (p->nkb + p->splits - 1) / p->splits;
  p->splits = (p->nkb + p->kps - 1) / p->kps;
  p->ws_bytes = p->x_bytes + (p->splits > 1 ? size_t(p->splits) * size_t(M) * size_t(w.N) * sizeof(float) : 0);
  return Status::ok();
}

}  // namespace

WqSegArgs seg_args(const WqWeight& w, const WqWeight& v, int64_t M, int64_t row_base, const void* bias, void* out,
                   int64_t ldo, float* partial, int64_t mtiles, int64_t nkb, int64_t kps) {
  WqSegArgs a = {};
  a.qweight = v.qweight;
  a.qrows_used = v.qrows;
  a.N = w.N;
  a.K = v.K;
  a.groups = w.groups;
  a.M = M;
  a.g_idx = v.g_idx;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.bias = bias;
  a.out = out;
  a.ldo = ldo;
  a.partial = partial;
  a.mtiles = mtiles;
  a.inv_gs = 1.0f / float(std::max<int64_t>(1, (w.K + w.groups - 1) / w.groups));
  a.row_base = static_cast<int>(row_base);
  a.nkb = static_cast<int>(nkb);
  a.kps = static_cast<int>(kps);
  a.magic = w.sdtype == DType::kFloat16 ? Tc<__half>::kMagic : Tc<__nv_bfloat16>::kMagic;
  return a;
}

int64_t wg_min_rows() {
  static const int64_t v = [] {
    const char* e = std::getenv("LOWBIT_WQ_WG_MIN_ROWS");
    return e != nullptr ? int64_t(std::atoll(e)) : int64_t(17);
  }();
  return v;
}

bool wg_eligible(const WqWeight& w, int64_t M, const DType* xtype) {
  if (!w.allow_half || (w.sdtype != DType::kFloat16 && w.sdtype != DType::kBFloat16)) return false;
  if (xtype != nullptr && *xtype != w.sdtype) return false;
  if (M < wg_min_rows() || w.nseg < 1) return false;
  for (int s = 0; s < w.nseg; ++s)
    if (w.bits[s] != 2 && w.bits[s] != 4) return false;
  if (w.N % 4 != 0 || reinterpret_cast<uintptr_t>(w.qweight) % 16 != 0) return false;
  // 32-bit row, column and group indices in the kernel.
  if (w.K >= (int64_t(1) << 30) || w.N >= (int64_t(1) << 31) || w.groups >= (int64_t(1) << 30)) return false;
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return wg_ready(device);
}

namespace {

// Segment s of w as a one-segment weight of its own rows: its words (N % 4 == 0 keeps them 16-byte
// aligned), g_idx and perm from its first stored row; without perm, x and channel_scale are shifted by
// that row instead (wg_matmul). Groups, scales and zeros stay whole.
struct WgSegment {
  WqWeight view;
  int64_t row0 = 0;
  WgPlan plan;
  int64_t slot0 = 0;  // first partial-sum slot
};
struct WgLayout {
  int nseg = 0;
  WgSegment seg[kWqMaxSegments];
  int64_t slots = 0;  // partial-sum slots over all segments (1: the kernel writes out itself)
  size_t x_bytes = 0, ws_bytes = 0;
};

Status make_wg_layout(const char* fn, const WqWeight& w, int64_t M, int sms, WgLayout* L) {
  L->nseg = w.nseg;
  int64_t row0 = 0, q0 = 0, slots = 0;
  size_t x_bytes = 0;
  for (int s = 0; s < w.nseg; ++s) {
    WgSegment& g = L->seg[s];
    const int64_t len = w.row_end[s] - row0;
    g.row0 = row0;
    g.view = w;
    g.view.nseg = 1;
    g.view.K = len;
    g.view.bits[0] = w.bits[s];
    g.view.row_end[0] = len;
    g.view.qweight = w.qweight + q0 * w.N;
    g.view.qrows = (len + 31) / 32 * w.bits[s];
    g.view.g_idx = w.g_idx + row0;
    g.view.perm = w.perm != nullptr ? w.perm + row0 : nullptr;
    Status st = make_wg_plan(fn, g.view, M, sms, &g.plan);
    if (!st.is_ok()) return st;
    g.slot0 = slots;
    slots += g.plan.splits;
    x_bytes = std::max(x_bytes, g.plan.x_bytes);
    q0 += g.view.qrows;
    row0 = w.row_end[s];
  }
  L->slots = slots;
  L->x_bytes = x_bytes;
  L->ws_bytes = x_bytes + (slots > 1 ? size_t(slots) * size_t(M) * size_t(w.N) * sizeof(float) : 0);
  return Status::ok();
}

}  // namespace

Status wg_workspace(const char* fn, const WqWeight& w, int64_t M, int sms, size_t* bytes) {
  WgLayout L;
  Status st = make_wg_layout(fn, w, M, sms, &L);
  if (st.is_ok()) *bytes = L.ws_bytes;
  return st;
}

Status wg_matmul(const char* fn, const WqWeight& w, const void* x, int64_t M, int64_t ldx, const void* bias,
                 void* out, int64_t ldo, void* workspace, size_t workspace_bytes, const DeviceInfo& dev,
                 cudaStream_t stream) {
  WgLayout L;
  Status st = make_wg_layout(fn, w, M, dev.sms, &L);
  if (!st.is_ok()) return st;
  st = check_workspace(fn, workspace, workspace_bytes, L.ws_bytes);
  if (!st.is_ok()) return st;
  const bool fp16 = w.sdtype == DType::kFloat16;
  const size_t esz = 2;  // x and channel_scale are 16-bit (wg_eligible)
  char* wsb = static_cast<char*>(workspace);
  float* partial = L.slots > 1 ? reinterpret_cast<float*>(wsb + L.x_bytes) : nullptr;
  // One prep pass and one launch per segment, in order on the stream (so the x' buffer is reused); every
  // segment writes its own partial-sum slots when there is more than one slot, and one reduce sums them.
  for (int s = 0; s < L.nseg; ++s) {
    const WgSegment& g = L.seg[s];
    const WgPlan& plan = g.plan;
    WqWeight v = g.view;
    const void* xs = x;
    if (w.perm == nullptr) {  // stored row r of the segment is input channel row0 + r
      xs = static_cast<const char*>(x) + g.row0 * esz;
      if (w.channel_scale != nullptr) v.channel_scale = static_cast<const char*>(w.channel_scale) + g.row0 * esz;
    }
    WgArgs a = {};
    static_cast<WqSegArgs&>(a) = seg_args(w, v, M, g.row0, bias, out, ldo,
                                          partial != nullptr ? partial + g.slot0 * M * w.N : nullptr, plan.mtiles,
                                          plan.nkb, plan.kps);
    a.sz_vec = (w.N % 8 == 0 && reinterpret_cast<uintptr_t>(w.scales) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(w.zeros) % 16 == 0)
                   ? 1
                   : 0;
    // x' always goes through the prep kernel: the k-slot order (wg_slot_row) lets each lane decode whole
    // words, and the prep pass also applies perm and channel_scale and pads K to whole k-blocks.
    st = tc_prep_x(fn, v, xs, M, ldx, plan.kp, v.bits[0], w.K, wsb, dev, stream);
    if (!st.is_ok()) return st;
    a.x = wsb;
    a.ldx = plan.kp;
    if (plan.tma) {
      st = wgt_launch(fn, w, v, wsb, plan.kp, M, g.row0, bias, out, ldo, a.partial, dev.sms, stream);
      if (!st.is_ok()) return st;
      continue;
    }
    // A programmatic dependent of the prep kernel: its launch and prologue overlap the prep pass (the
    // kernel waits for it before its first copy).
    const cudaError_t err = with_wg_kernel(fp16, v.bits[0], plan.mt, plan.wt, w.asym, [&](auto kernel, int smem) {
      return launch_pdl(kernel, dim3(static_cast<unsigned>(plan.mtiles * plan.ntiles), static_cast<unsigned>(plan.splits)),
                        dim3(kWgThreads), static_cast<size_t>(smem), stream, /*pdl=*/true, a);
    });
    if (err != cudaSuccess)
      return Status::device(validate::err(fn, std::string("warpgroup kernel launch failed: ") + cudaGetErrorString(err)));
  }
  if (L.slots == 1) return Status::ok();
  const int dt = static_cast<int>(w.sdtype);
  return launch_reduce(fn, dev, stream, partial, L.slots, M, w.N, bias, dt, out, dt, ldo);
}

}  // namespace wq_detail
}  // namespace cuda
}  // namespace lowbit

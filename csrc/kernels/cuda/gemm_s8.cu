// int8 x int8 -> int32 tensor-core GEMM with a fused dequantizing epilogue (CUDA, sm_80 .. sm_90a).
//
//   out[i, j] = to_otype( float(acc[i, j]) * alpha ),   acc[i, j] = sum_k A[i, k] * B[j, k]
//
// A is (M, K) row-major, B is (N, K) row-major, i.e. B^T is column-major: exactly the "row.col" operand
// order of mma.sync, so neither operand is transposed anywhere.
//
// Shape of the computation
// ------------------------
//   * CTA tile 128 (M) x 128 (N), K consumed 64 bytes at a time. 8 warps in a 2 (M) x 4 (N) grid, each
//     owning a 64 x 32 block of out = 4 x 4 mma tiles of m16n8 -> 64 int32 accumulators per thread.
//     For N <= 64 a narrow 128 x 64 tile (kTileN = kNarrowBN): the 8 warps as 4 x 2 of 32 x 32, 48 KB
//     of shared memory, 90-96 registers; a 128-wide tile would spend half its mma work on zero columns
//     (a ResNet stage-1 convolution has 64 output channels).
//     Per 32-wide k-step a warp issues 4 + 2 ldmatrix.x4 for 16 mma, and the CTA reads 2 x 128 x 64 bytes
//     of global memory per 2 x 128 x 128 x 64 ops (128 ops per byte; the L2 and the grouped raster below
//     keep DRAM traffic far lower still), which is enough for mma.sync to be the limiter.
//   * mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (IMMA.16832.S8.S8 in SASS). Its A fragment is, byte
//     for byte, four 8x8 b16 matrices of (rows x 16 bytes) and its B fragment two such matrices of
//     (n x 16 bytes) of B's row-major tile, so ldmatrix (non-transposed) loads both straight from shared
//     memory.
//   * 4-stage cp.async pipeline global -> shared (16-byte cp.async.cg, bypassing L1): 3 tiles in flight
//     while the 4th is multiplied, which is what it takes to cover DRAM latency with 2 CTAs per SM.
//     Shared memory: 4 x (128 + 128) x 64 B = 64 KB per CTA (dynamic; raised above the 48 KB default once
//     per device). Two CTAs fit per SM on sm_80 / sm_90 (164 / 228 KB), one on sm_86 / sm_89 (100 KB).
//   * Shared layout: each tile row is 64 bytes = 4 chunks of 16 B; chunk c of row r is stored at chunk
//     slot c ^ ((r >> 1) & 3). One ldmatrix phase reads one 16-byte chunk from 8 consecutive rows; rows
//     r, r+1 share a 128-byte bank line, and the XOR spreads the 4 line pairs over the 4 chunk slots, so
//     the 8 addresses cover all 32 banks exactly once (conflict-free). cp.async writes a full row's 4
//     chunks per 4 threads, which stays a permutation within each row, so stores are conflict-free too.
//   * Tails: rows past M / N and bytes past K are zero-filled in shared memory (cp.async with a source
//     size below 16 fills the rest with zeros), so the mma needs no masking; zeros add nothing to acc.
//     Only in-bounds outputs are written.
//   * Alignment: the cp.async path needs 16-byte aligned chunk sources, i.e. base % 16 == 0 and
//     ld % 16 == 0. An operand that fails this is loaded with predicated byte loads and 16-byte shared
//     stores into the same swizzled layout (synchronous, slower, rarely used). Chosen per operand.
//   * Epilogue: acc -> fp32 (round to nearest even), one fp32 multiply by alpha (__fmul_rn: never fused),
//     -> fp16/bf16 round to nearest even; pairs of adjacent columns are stored together when ldo and out
//     allow it. Each output is reduced by exactly one thread in a fixed k order: deterministic.
//   * Implicit-GEMM convolution (conv2d_s8_nhwc, lowbit/kernels/conv_s8.h; kConv): the same kernel with
//     A gathered from an NHWC image of int8 codes. Row m of A is output pixel (n, p, q), column k is tap
//     (a, b) and channel c (k = (a * kw + b) * Cg + c, the OHWI weight order). With Cg % 16 == 0 a 16-byte
//     chunk lies in one tap: each thread keeps its rows' image base and window corner and its chunk's
//     (a, b, c), moved on by 64 bytes per k-tile (k-tiles are loaded in order), and a chunk outside the
//     image is a zero-fill cp.async. B is the weight codes as they are; epilogue and outputs unchanged.
//   * Grid: one CTA per output tile, in a grouped raster (8 tile-rows per group) so that CTAs resident at
//     the same time share A and B tiles in L2.
//   * Batched (gemm_s8_scaled_batched): blockIdx.z is the batch; a CTA offsets its A, B and out bases by
//     z * stride in int64 once, before the pipeline, so the main loop is the unbatched one. Blocks are
//     dispatched x-fastest, hence batch by batch, and the raster's L2 reuse holds within each batch.
//     gridDim.z is capped at 65535: the host launches larger batch counts in chunks of 65535 with moved
//     bases. gemm_s8_scaled is the batch == 1 launch of the same kernel. cp.async is chosen per operand
//     only if base, ld AND batch stride are multiples of 16 (every batch's chunks aligned); a stride of
//     0 (broadcast operand) qualifies. Pair stores in the epilogue test the batch's own out base. The
//     K == 0 fill kernel covers all batches in one flat grid-stride loop.
//
// Resources observed (nvcc 13.0, -O3, --resource-usage; sm_80 and sm_90a; the same before and after the
// batch index was added):
//   gemm_s8_kernel, all 12 instantiations: 122-124 registers on sm_80, 122-126 on sm_90a (cap 128 from
//   __launch_bounds__(256, 2)), 0 bytes stack frame, 0 spills, 1 barrier, 64 KB dynamic shared memory.
//   fill_k0_kernel (batched): 28-32 registers.
// SASS (cuobjdump -sass, sm_90a and sm_80; taken before batching, which left the main loop's source as
//   it was), fast path (both operands on cp.async): the main loop is 121 instructions per 64-byte k-tile:
//   32 IMMA.16832.S8.S8, 12 LDSM.16.M88.4, 4 LDGSTS.E.BYPASS.128.ZFILL, 1 LDGDEPBAR, 1 DEPBAR.LE SB0, 0x2,
//   1 BAR.SYNC, the rest address / predicate arithmetic. No local memory. The byte-load fallback has
//   16 LDG.E.U8 + 1 STS.128 per chunk instead of an LDGSTS.
//
// On Hopper (sm_90a builds on a 9.0 device) run() hands large enough calls whose operands suit TMA to the
// wgmma kernel of gemm_s8_sm90.cu (same contract, same epilogue, bitwise the same outputs); this kernel
// is the sm_80 / 86 / 89 path and every Hopper call that one does not take. LOWBIT_GEMM_S8_KERNEL=mma |
// wgmma | auto (default) overrides the choice (benchmarks and tests; wgmma on an ineligible call is an
// error, not a silent fallback).
#include "lowbit/kernels/gemm_s8.h"
#include "lowbit/kernels/conv_s8.h"

#ifdef __USE_FAST_MATH__
#error "gemm_s8.cu must not be built with --use_fast_math: the epilogue must round exactly as the CPU does"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "../validate.h"
#include "gemm_s8_internal.cuh"

namespace lowbit {
namespace cuda {
namespace {

using gemm_s8_detail::dequant;
using gemm_s8_detail::mma_block_s8;
using gemm_s8_detail::row_alpha;
using gemm_s8_detail::store1;
using gemm_s8_detail::store2;

// ---------------------------------------------------------------------------------------------------
// Tile geometry.
constexpr int kBM = 128;                          // CTA tile rows (M)
constexpr int kBN = 128;                          // CTA tile columns (N); kNarrowBN for N <= 64
constexpr int kNarrowBN = 64;                     // (half the 128-wide tile's mma work would hit zeros)
constexpr int kBK = 64;                           // K bytes per pipeline stage (2 mma k-steps)
constexpr int kStages = 4;                        // shared-memory pipeline depth
constexpr int kThreads = 256;                     // 8 warps: 2 (M) x 4 (N) of 64 x 32, or 4 x 2 of 32 x 32
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 32;  // mma.sync m16n8k32 (s8)
constexpr int kKSteps = kBK / kMmaK;              // 2 mma k-steps per stage
constexpr int kChunk = 16;                        // bytes per cp.async / ldmatrix row
constexpr int kChunksPerRow = kBK / kChunk;       // 4
constexpr int kTileBytesA = kBM * kBK;            // 8 KB
constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // 64 rows of a tile loaded per thread pass
constexpr int kLoadsA = kBM / kRowsPerPass;             // 2 chunks of A per thread per stage
constexpr int kGroupM = 8;                        // tile-rows per raster group (L2 reuse)

static_assert(kThreads % kChunksPerRow == 0 && kBM % kRowsPerPass == 0, "");
static_assert(kChunksPerRow == 4, "the swizzle below is written for 64-byte rows");
// Shared memory per CTA for a tile of `bn` columns: 64 KB (128) / 48 KB (64).
constexpr int smem_bytes(int bn) { return kStages * (kTileBytesA + bn * kBK); }

// Byte offset of 16-byte chunk c of row r inside a [rows][kBK] tile (see the header: conflict-free).
__host__ __device__ constexpr uint32_t swizzle(int r, int c) {
  return uint32_t(r * kBK + ((c ^ ((r >> 1) & 3)) << 4));
}

// ---------------------------------------------------------------------------------------------------
// PTX wrappers. The shared-memory ones clobber "memory" so the compiler keeps them ordered with the
// plain shared stores of the byte-load path and with __syncthreads.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  // src_bytes in [0, 16]; the remaining 16 - src_bytes destination bytes are zero-filled.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
// The A operand of an implicit-GEMM convolution (conv2d_s8_nhwc, lowbit/kernels/conv_s8.h): row m of A
// is output pixel (n, p, q) = m's position in (N, Ho, Wo), column k = (a * kw + b) * Cg + c is tap (a, b),
// channel c; A[m, k] = x[n, p*sh - ph + a*dh, q*sw - pw + b*dw, c] (x already offset to the group's first
// channel), 0 outside the image. Cg % 16 == 0, so a 16-byte chunk never straddles two taps.
struct ConvGather {
  int64_t HWC;         // bytes per image
  int H, W, C;         // input (C: bytes per pixel)
  int64_t HoWo;        // output pixels per image
  int Wo, kw, Cg;
  int sh, sw, ph, pw, dh, dw;
};

// ---------------------------------------------------------------------------------------------------
// The GEMM kernel. One CTA computes one kBM x kBN tile of out, of batch blockIdx.z (batch b of the launch
// reads A + b*strideA, B + b*strideB and writes out + b*strideO; the unbatched call is gridDim.z == 1).
// kConv: A is gathered from an NHWC image as ConvGather says (A = x, lda and strideA unused; one batch).
// kTileN: the tile's columns, kBN or kNarrowBN.
template <typename OutT,   // float, __half or __nv_bfloat16
          bool kAsyncA,    // A 16-byte aligned, lda % 16 == 0 (and strideA, if batched): cp.async, else bytes
          bool kAsyncB,    // same for B
          bool kConv = false, int kTileN = kBN>
__global__ void __launch_bounds__(kThreads, 2) gemm_s8_kernel(
    const int8_t* __restrict__ A,     // (M, K) row-major, batch 0 of this launch
    int64_t lda,                      // row stride of A in bytes (>= K)
    int64_t strideA,                  // bytes from one batch's A to the next (>= 0)
    const int8_t* __restrict__ B,     // (N, K) row-major, batch 0 of this launch
    int64_t ldb,                      // row stride of B in bytes (>= K)
    int64_t strideB,                  // bytes from one batch's B to the next (>= 0)
    int64_t M, int64_t N,             // output rows / columns (>= 1)
    int K,                            // reduction length, 1 .. kMaxGemmS8K
    const float* __restrict__ alpha,  // one fp32 on the device
    OutT* __restrict__ out,           // (M, N), row stride ldo elements, batch 0 of this launch
    int64_t ldo,                      // row stride of out (>= N)
    int64_t strideO,                  // elements from one batch's out to the next
    int64_t tiles_m, int64_t tiles_n,  // ceil(M / kBM), ceil(N / kBN)
    const float* __restrict__ row_scale,  // M per-row multipliers or nullptr
    ConvGather cv                         // kConv only
) {
  static_assert(!kConv || kAsyncA, "the gathered A operand is loaded with cp.async");
  // This instantiation's tile geometry (kBN hides the namespace-scope 128).
  static_assert(kTileN == kBN || kTileN == kNarrowBN, "128- or 64-column tiles");
  constexpr int kBN = kTileN;
  constexpr int kWarpsN = kTileN == kNarrowBN ? 2 : 4;
  constexpr int kWarpsM = (kThreads / 32) / kWarpsN;
  constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;
  constexpr int kFragsM = kWM / kMmaM, kFragsN = kWN / kMmaN;
  constexpr int kStageBytes = kTileBytesA + kBN * kBK;
  constexpr int kLoadsB = kBN / kRowsPerPass;
  static_assert(kWM % 16 == 0 && kWN % 16 == 0 && kBN % kRowsPerPass == 0, "tile geometry");
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / kWarpsN;  // 0 .. kWarpsM-1
  const int warp_n = warp % kWarpsN;  // 0 .. kWarpsN-1

  // --- Which tile: grouped raster. Consecutive CTAs walk down a group of kGroupM tile-rows before
  // moving one tile-column right, so the CTAs in flight together touch few distinct A and B tiles.
  int64_t tile_m, tile_n;
  {
    const int64_t pid = blockIdx.x;
    const int64_t group_tiles = int64_t(kGroupM) * tiles_n;
    const int64_t first_m = (pid / group_tiles) * kGroupM;
    const int64_t rows_here = (tiles_m - first_m) < kGroupM ? (tiles_m - first_m) : kGroupM;
    const int64_t in_group = pid % group_tiles;
    tile_m = first_m + in_group % rows_here;
    tile_n = in_group / rows_here;
  }
  const int64_t m0 = tile_m * kBM;
  const int64_t n0 = tile_n * kBN;
  // This CTA's batch. int64: batch * stride passes 2^32 for large batches of large matrices.
  const int64_t batch = blockIdx.z;
  const int8_t* const A_b = A + batch * strideA;
  const int8_t* const B_b = B + batch * strideB;

  // --- Loader state. Thread t copies chunk (t % 4) of rows t/4 + 64*i of each tile; the chunk column
  // and the swizzled shared offsets are the same for every stage.
  const int ld_chunk = tid % kChunksPerRow;
  const int ld_row = tid / kChunksPerRow;
  // Dense A: a_src = the row at k = chunk start (row clamped into range). kConv: a_src = the row's image,
  // a_ih0 / a_iw0 = its window's corner (p*sh - ph, q*sw - pw).
  const int8_t* a_src[kLoadsA];
  bool a_row_ok[kLoadsA];
  uint32_t a_dst[kLoadsA];
  int a_ih0[kLoadsA], a_iw0[kLoadsA];
#pragma unroll
  for (int i = 0; i < kLoadsA; ++i) {
    const int r = ld_row + i * kRowsPerPass;
    a_row_ok[i] = m0 + r < M;
    a_dst[i] = swizzle(r, ld_chunk);
    const int64_t m = a_row_ok[i] ? m0 + r : M - 1;
    if constexpr (kConv) {
      const int64_t n = m / cv.HoWo, pq = m - n * cv.HoWo;
      const int p = static_cast<int>(pq / cv.Wo), q = static_cast<int>(pq - int64_t(p) * cv.Wo);
      a_src[i] = A_b + n * cv.HWC;
      a_ih0[i] = p * cv.sh - cv.ph;
      a_iw0[i] = q * cv.sw - cv.pw;
    } else {
      a_src[i] = A_b + m * lda + ld_chunk * kChunk;
      a_ih0[i] = a_iw0[i] = 0;
    }
  }
  // kConv: tap (tap_a, tap_b) and channel tap_c of this thread's chunk in the next k-tile load_tile reads
  // (k-tiles are loaded in order 0, 1, 2, ...: each call moves the position on by kBK bytes).
  int tap_a = 0, tap_b = 0, tap_c = 0;
  if constexpr (kConv) {
    const int tap = (ld_chunk * kChunk) / cv.Cg;
    tap_c = ld_chunk * kChunk - tap * cv.Cg;
    tap_a = tap / cv.kw;
    tap_b = tap - tap_a * cv.kw;
  }
  const int8_t* b_src[kLoadsB];
  bool b_row_ok[kLoadsB];
  uint32_t b_dst[kLoadsB];
#pragma unroll
  for (int i = 0; i < kLoadsB; ++i) {
    const int r = ld_row + i * kRowsPerPass;
    b_row_ok[i] = n0 + r < N;
    b_src[i] = B_b + (b_row_ok[i] ? n0 + r : N - 1) * ldb + ld_chunk * kChunk;
    b_dst[i] = kTileBytesA + swizzle(r, ld_chunk);
  }

  // One 16-byte chunk: `valid` bytes from src (0 .. 16), zeros after them.
  auto copy_chunk = [&](auto async_tag, uint32_t dst, const int8_t* src, int valid, const int8_t* base) {
    if constexpr (decltype(async_tag)::value) {
      // A source is still named when nothing is read (valid == 0): the launch's operand base (batch 0
      // of the launch, always mapped). The kernel parameter rather than A_b / B_b, so the compiler may
      // re-read it from the constant bank instead of holding another address across the main loop.
      cp_async_16(smem_base + dst, valid > 0 ? src : base, valid);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int b = 0; b < kChunk; ++b)
        if (b < valid) w[b / 4] |= uint32_t(static_cast<uint8_t>(src[b])) << (8 * (b % 4));
      *reinterpret_cast<uint4*>(smem + dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  };

  // Phase 1 (per stage): bring k-tile kt of A and B into pipeline slot `stage`.
  auto load_tile = [&](int stage, int kt) {
    const int k = kt * kBK + ld_chunk * kChunk;  // first K byte of this thread's chunk
    const int left = K - k;
    const int in_k = left <= 0 ? 0 : (left < kChunk ? left : kChunk);
    const uint32_t slot = uint32_t(stage) * kStageBytes;
    if constexpr (kConv) {
      const int dy = tap_a * cv.dh, dx = tap_b * cv.dw;
#pragma unroll
      for (int i = 0; i < kLoadsA; ++i) {
        const int ih = a_ih0[i] + dy, iw = a_iw0[i] + dx;
        const bool in = a_row_ok[i] && in_k > 0 && unsigned(ih) < unsigned(cv.H) && unsigned(iw) < unsigned(cv.W);
        cp_async_16(smem_base + slot + a_dst[i], in ? a_src[i] + (int64_t(ih) * cv.W + iw) * cv.C + tap_c : A,
                    in ? kChunk : 0);
      }
      tap_c += kBK;
      while (tap_c >= cv.Cg) {
        tap_c -= cv.Cg;
        if (++tap_b == cv.kw) tap_b = 0, ++tap_a;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kLoadsA; ++i)
        copy_chunk(std::integral_constant<bool, kAsyncA>{}, slot + a_dst[i], a_src[i] + kt * kBK,
                   a_row_ok[i] ? in_k : 0, A);
    }
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i)
      copy_chunk(std::integral_constant<bool, kAsyncB>{}, slot + b_dst[i], b_src[i] + kt * kBK,
                 b_row_ok[i] ? in_k : 0, B);
  };

  // --- Fragment addressing. ldmatrix.x4: lanes 8j .. 8j+7 name the 8 rows of matrix j.
  // A (16 rows x 32 k-bytes): matrices (rows 0-7, k 0-15), (8-15, 0-15), (0-7, 16-31), (8-15, 16-31)
  //   = registers a0..a3 of the m16n8k32 A fragment.
  // B (16 n x 32 k-bytes):    matrices (n 0-7, k 0-15), (0-7, 16-31), (8-15, 0-15), (8-15, 16-31)
  //   = {b0, b1} of n-tile 0, then {b0, b1} of n-tile 1.
  // Warp and fragment row offsets are multiples of 16, so the swizzle term depends on the lane only.
  uint32_t a_frag_off[kKSteps], b_frag_off[kKSteps];
  {
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;
    const int a_chk = lane >> 4;
    const int b_row = (lane & 7) + (lane >> 4) * 8;
    const int b_chk = (lane >> 3) & 1;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      a_frag_off[ks] = swizzle(warp_m * kWM + a_row, ks * 2 + a_chk);
      b_frag_off[ks] = kTileBytesA + swizzle(warp_n * kWN + b_row, ks * 2 + b_chk);
    }
  }

  int32_t acc[kFragsM][kFragsN][4];
#pragma unroll
  for (int i = 0; i < kFragsM; ++i)
#pragma unroll
    for (int j = 0; j < kFragsN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  // Phase 2 (per stage): multiply the tiles in slot `stage` into the accumulators.
  auto mma_tile = [&](int stage) {
    const uint32_t slot = smem_base + uint32_t(stage) * kStageBytes;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks)
      mma_block_s8<kFragsM, kFragsN>(acc, slot + a_frag_off[ks], kMmaM * kBK, slot + b_frag_off[ks], 2 * kMmaN * kBK);
  };

  // --- Main loop. Slot s holds k-tile kt with kt % kStages == s. One commit group per k-tile (empty
  // past the end) keeps the group count in step, so wait_group<kStages-2> means "tile kt has landed".
  const int k_tiles = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    // The barrier publishes tile kt to all warps, and tells the loader that every warp is done with
    // the slot of tile kt-1, which is the one refilled next.
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_tile(next % kStages, next);
    cp_async_commit();
    mma_tile(kt % kStages);
  }
  cp_async_wait<0>();

  // Phase 3: epilogue. m16n8 accumulator layout: c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at row g+8.
  const float a = __ldg(alpha);
  OutT* const out_b = out + batch * strideO;
  // Pair stores need this batch's base aligned too (an odd strideO misaligns every other batch).
  const bool pairs_ok = (ldo % 2 == 0) && (reinterpret_cast<uintptr_t>(out_b) % (2 * sizeof(OutT)) == 0);
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + warp_m * kWM + i * kMmaM + h * 8 + g;
      if (row >= M) continue;
      OutT* out_row = out_b + row * ldo;
      const float ar = row_alpha(a, row_scale, row);
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        const int64_t col = n0 + warp_n * kWN + j * kMmaN + 2 * t;
        const float v0 = dequant(acc[i][j][2 * h], ar);
        const float v1 = dequant(acc[i][j][2 * h + 1], ar);
        if (pairs_ok && col + 1 < N) {
          store2(out_row + col, v0, v1);
        } else {
          if (col < N) store1(out_row + col, v0);
          if (col + 1 < N) store1(out_row + col + 1, v1);
        }
      }
    }
  }
}

// K == 0: every acc is 0, so every output is to_otype(0.0f * alpha) (NaN if alpha is inf/NaN, -0 if
// alpha < 0): the same value the GEMM epilogue would give. All batches in one flat grid-stride loop
// (the host checks that batch * M * N fits in int64).
template <typename OutT>
__global__ void __launch_bounds__(256) fill_k0_kernel(int64_t batch, int64_t M, int64_t N,
                                                     const float* __restrict__ alpha, OutT* __restrict__ out,
                                                     int64_t ldo, int64_t strideO,
                                                     const float* __restrict__ row_scale) {
  const float a = __ldg(alpha);
  const int64_t per_batch = M * N;
  const int64_t total = batch * per_batch;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / per_batch;
    const int64_t r = e - b * per_batch;
    const int64_t i = r / N;
    store1(out + b * strideO + i * ldo + (r - i * N), dequant(0, row_alpha(a, row_scale, i)));
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// gridDim.y / gridDim.z are limited to 65535: batches beyond that go to further launches.
constexpr int64_t kMaxBatchPerLaunch = 65535;

// One call as both kernels see it (gemm_s8_internal.cuh).
using GemmArgs = gemm_s8_detail::GemmCall;

Status launch_error(const char* fn, const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::ok();
  return Status::device(validate::err(fn, std::string(what) + ": " + cudaGetErrorString(err)));
}

// Raise the kernel's dynamic shared-memory limit to kSmemBytes, once per (kernel, device). The flag
// array is per template instantiation; a race only repeats an idempotent call.
template <typename OutT, bool kAsyncA, bool kAsyncB, bool kConv = false, int kTileN = kBN>
Status allow_smem(const char* fn, int device) {
  static std::atomic<bool> done[64];
  if (device >= 0 && device < 64 && done[device].load(std::memory_order_acquire)) return Status::ok();
  const cudaError_t err = cudaFuncSetAttribute(gemm_s8_kernel<OutT, kAsyncA, kAsyncB, kConv, kTileN>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes(kTileN));
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the error is returned, not left for the next caller
    return Status::device(std::string(fn) + ": cudaFuncSetAttribute(MaxDynamicSharedMemorySize=" +
                          std::to_string(smem_bytes(kTileN)) + ") failed: " + cudaGetErrorString(err));
  }
  if (device >= 0 && device < 64) done[device].store(true, std::memory_order_release);
  return Status::ok();
}

template <typename OutT, bool kAsyncA, bool kAsyncB, int kTileN>
Status launch_gemm_tiles(const GemmArgs& g) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return Status::device(std::string(g.fn) + ": cudaGetDevice failed: " + cudaGetErrorString(err));
  Status st = allow_smem<OutT, kAsyncA, kAsyncB, false, kTileN>(g.fn, device);
  if (!st.is_ok()) return st;
  const int64_t tiles_m = (g.M + kBM - 1) / kBM;
  const int64_t tiles_n = (g.N + kTileN - 1) / kTileN;
  // Batch on z, tiles on x: blocks are dispatched x-fastest, so the CTAs resident together belong to
  // one or two batches and the grouped raster's L2 reuse holds within each batch.
  for (int64_t b0 = 0; b0 < g.batch; b0 += kMaxBatchPerLaunch) {
    const int64_t nb = g.batch - b0 < kMaxBatchPerLaunch ? g.batch - b0 : kMaxBatchPerLaunch;
    const dim3 grid(static_cast<unsigned>(tiles_m * tiles_n), 1, static_cast<unsigned>(nb));
    gemm_s8_kernel<OutT, kAsyncA, kAsyncB, false, kTileN><<<grid, kThreads, smem_bytes(kTileN), g.stream>>>(
        g.A + b0 * g.strideA, g.lda, g.strideA, g.B + b0 * g.strideB, g.ldb, g.strideB, g.M, g.N,
        static_cast<int>(g.K), g.alpha, static_cast<OutT*>(g.out) + b0 * g.strideO, g.ldo, g.strideO, tiles_m,
        tiles_n, g.row_scale, ConvGather{});
    st = launch_error(g.fn, "gemm kernel launch failed");
    if (!st.is_ok()) return st;
  }
  return Status::ok();
}

// N <= 64: the narrow tile (no mma work on the zero columns of a 128-wide tile).
template <typename OutT, bool kAsyncA, bool kAsyncB>
Status launch_gemm(const GemmArgs& g) {
  return g.N <= kNarrowBN ? launch_gemm_tiles<OutT, kAsyncA, kAsyncB, kNarrowBN>(g)
                          : launch_gemm_tiles<OutT, kAsyncA, kAsyncB, kBN>(g);
}

// cp.async needs every 16-byte chunk source aligned in every batch: base, row stride and (when there
// is more than one batch) batch stride all multiples of 16.
bool async_ok(const int8_t* p, int64_t ld, int64_t stride, int64_t batch) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 16 == 0 && (batch == 1 || stride % 16 == 0);
}

template <typename OutT>
Status launch_by_alignment(const GemmArgs& g) {
  const bool async_a = async_ok(g.A, g.lda, g.strideA, g.batch);
  const bool async_b = async_ok(g.B, g.ldb, g.strideB, g.batch);
  if (async_a && async_b) return launch_gemm<OutT, true, true>(g);
  if (async_a) return launch_gemm<OutT, true, false>(g);
  if (async_b) return launch_gemm<OutT, false, true>(g);
  return launch_gemm<OutT, false, false>(g);
}

template <typename OutT>
Status launch_fill(const GemmArgs& g) {
  const int64_t total = g.batch * g.M * g.N;  // checked against int64 overflow by the caller
  const int64_t blocks = (total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096;
  fill_k0_kernel<OutT><<<static_cast<unsigned>(blocks), 256, 0, g.stream>>>(
      g.batch, g.M, g.N, g.alpha, static_cast<OutT*>(g.out), g.ldo, g.strideO, g.row_scale);
  return launch_error(g.fn, "K == 0 fill kernel launch failed");
}

// LOWBIT_GEMM_S8_KERNEL: auto (default), mma (always the mma.sync kernel), wgmma (always the sm_90a kernel;
// an error where it cannot run). Read at every call (a getenv is far cheaper than a launch), so tests and
// benchmarks can switch.
enum class KernelChoice { kAuto, kMma, kWgmma };
KernelChoice kernel_choice() {
  const char* v = std::getenv("LOWBIT_GEMM_S8_KERNEL");
  if (v == nullptr) return KernelChoice::kAuto;
  const std::string s(v);
  if (s == "mma") return KernelChoice::kMma;
  if (s == "wgmma") return KernelChoice::kWgmma;
  return KernelChoice::kAuto;
}
// From this many rows on, eligible calls take the wgmma kernel. Measured on an H200 (2026-11-22,
// bf16 out): wgmma faster at every M tried, 16 (47 vs 66 us at N = K = 8192) to 8192 (1490 vs 781 TOP/s).
constexpr int64_t kWgmmaMinRows = 1;

// Validation shared by both entry points, then the launch. gemm_s8_scaled arrives here with batch == 1
// and zero strides, which every batch rule accepts, so its behaviour and messages are as before. The
// argument rules are the CPU's (csrc/kernels/validate.h); the pointers are checked only when there is
// output, and alpha stays on the device (no host read).
Status run(GemmArgs g) {
  const DType otype = g.otype;
  const std::string fn = std::string(g.fn) + ": ";
  auto num = [](int64_t v) { return std::to_string(v); };
  const int64_t M = g.M, N = g.N, K = g.K, batch = g.batch;
  Status st = validate::gemm_otype(g.fn, otype);
  if (st.is_ok()) st = validate::gemm_shape(g.fn, g.lda, g.ldb, M, N, K);
  if (st.is_ok()) st = validate::gemm_ld(g.fn, "ldo", g.ldo, M, N, "N");
  if (st.is_ok()) st = validate::gemm_batch(g.fn, g.strideA, g.strideB, M, N, batch, otype, g.strideO);
  if (!st.is_ok()) return st;
  if (batch == 0 || M == 0 || N == 0) return Status::ok();  // empty output: no launch
  if (g.alpha == nullptr) return Status::invalid(fn + "alpha must not be null");
  if (g.out == nullptr) return Status::invalid(fn + "out must not be null");
  if (K > 0 && g.A == nullptr) return Status::invalid(fn + "A must not be null (K = " + num(K) + ")");
  if (K > 0 && g.B == nullptr) return Status::invalid(fn + "B must not be null (K = " + num(K) + ")");
  const int64_t tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  if (tiles > int64_t(0x7fffffff))
    return Status::invalid(fn + "M x N needs " + num(tiles) + " tiles of 128 x 128, more than a grid holds (2^31 - 1)");
  if (K == 0 && (M > std::numeric_limits<int64_t>::max() / N ||
                 batch > std::numeric_limits<int64_t>::max() / (M * N)))
    return Status::invalid(fn + "batch * M * N overflows int64 (batch=" + num(batch) + ", M=" + num(M) +
                           ", N=" + num(N) + ")");

  if (K == 0) {
    switch (otype) {
      case DType::kFloat32: return launch_fill<float>(g);
      case DType::kFloat16: return launch_fill<__half>(g);
      case DType::kBFloat16: return launch_fill<__nv_bfloat16>(g);
    }
  }
  // Kernel choice: wgmma (sm_90a) when eligible and M is past the size where its 128-row tiles pay off.
  const KernelChoice choice = kernel_choice();
  if (choice != KernelChoice::kMma) {
    const bool eligible = gemm_s8_detail::sm90_eligible(g);
    if (choice == KernelChoice::kWgmma && !eligible)
      return Status::invalid(fn + "LOWBIT_GEMM_S8_KERNEL=wgmma, but this call cannot run on the sm_90a kernel (needs "
                                  "a compute capability 9.0 device, an sm_90a build, and 16-byte aligned operands "
                                  "with row / batch strides that are multiples of 16)");
    if (eligible && (choice == KernelChoice::kWgmma || M >= kWgmmaMinRows)) {
      if (M <= gemm_s8_detail::kFewRowsMax && gemm_s8_detail::few_rows_eligible(g))
        return gemm_s8_detail::launch_sm90_few_rows(g);
      return gemm_s8_detail::launch_sm90(g);
    }
  }
  switch (otype) {
    case DType::kFloat32: return launch_by_alignment<float>(g);
    case DType::kFloat16: return launch_by_alignment<__half>(g);
    case DType::kBFloat16: return launch_by_alignment<__nv_bfloat16>(g);
  }
  return Status::invalid(fn + "unreachable otype");
}

template <typename OutT, int kTileN>
Status launch_conv_tiles(const char* fn, const int8_t* x, const int8_t* w, int64_t M, int64_t N, int64_t K,
                         const float* alpha, void* out, int64_t ldo, const ConvGather& cv, cudaStream_t stream) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return Status::device(validate::err(fn, std::string("cudaGetDevice failed: ") + cudaGetErrorString(err)));
  const Status st = allow_smem<OutT, true, true, true, kTileN>(fn, device);
  if (!st.is_ok()) return st;
  const int64_t tiles_m = (M + kBM - 1) / kBM, tiles_n = (N + kTileN - 1) / kTileN;
  gemm_s8_kernel<OutT, true, true, true, kTileN>
      <<<static_cast<unsigned>(tiles_m * tiles_n), kThreads, smem_bytes(kTileN), stream>>>(
          x, 0, 0, w, K, 0, M, N, static_cast<int>(K), alpha, static_cast<OutT*>(out), ldo, 0, tiles_m, tiles_n,
          nullptr, cv);
  return launch_error(fn, "conv kernel launch failed");
}
template <typename OutT>
Status launch_conv(const char* fn, const int8_t* x, const int8_t* w, int64_t M, int64_t N, int64_t K,
                   const float* alpha, void* out, int64_t ldo, const ConvGather& cv, cudaStream_t stream) {
  return N <= kNarrowBN ? launch_conv_tiles<OutT, kNarrowBN>(fn, x, w, M, N, K, alpha, out, ldo, cv, stream)
                        : launch_conv_tiles<OutT, kBN>(fn, x, w, M, N, K, alpha, out, ldo, cv, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// What the gathering loader needs beyond the shape rules: 16-byte chunks of one tap, aligned, and every
// index it forms in int32 (tap coordinates within the padded extent, which stays below 2^30).
const char* conv_unsupported(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* w) {
  constexpr int64_t kNarrow = int64_t(1) << 30;
  if (s.C % 16 != 0 || c0 % 16 != 0 || Cg % 16 != 0) return "C, c0 and Cg must be multiples of 16";
  if (!aligned16(x) || !aligned16(w)) return "x and w must be 16-byte aligned";
  if (s.kh > kMaxGemmS8K || s.kw > kMaxGemmS8K || Cg > kMaxGemmS8K || s.kh * s.kw * Cg > kMaxGemmS8K)
    return "kh * kw * Cg must be <= kMaxGemmS8K";
  if (s.H + 2 * s.ph >= kNarrow || s.W + 2 * s.pw >= kNarrow || s.C >= kNarrow ||
      std::max({s.sh, s.sw, s.dh, s.dw}) >= kNarrow)
    return "the padded input extents, C, strides and dilations must be below 2^30";
  return nullptr;
}

}  // namespace

bool conv2d_s8_nhwc_supported(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* w) {
  return s.ph >= 0 && s.pw >= 0 && s.ph < (int64_t(1) << 30) && s.pw < (int64_t(1) << 30) &&
         conv_unsupported(x, s, c0, Cg, w) == nullptr;
}

bool conv2d_s8_nhwc_preferred(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* w,
                              int64_t Og) {
  if (Og < 1 || !conv2d_s8_nhwc_supported(x, s, c0, Cg, w)) return false;
  if (Og <= kBN || kernel_choice() == KernelChoice::kMma) return true;
  // The GEMM over the im2col matrix as run() would launch it (cols: a fresh allocation, 16-byte aligned;
  // w stands in for its address): does it take the sm_90a kernel?
  const int64_t Ho = s.out_h(), Wo = s.out_w(), K = s.kh * s.kw * Cg;
  const GemmArgs probe{"lowbit::cuda::conv2d_s8_nhwc_preferred", w, K, 0, w, K, 0, s.N * Ho * Wo, Og, K, 1,
                       nullptr, nullptr, Og, 0, DType::kFloat32, nullptr, nullptr};
  return !gemm_s8_detail::sm90_eligible(probe);
}

Status conv2d_s8_nhwc(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, const int8_t* w, int64_t Og,
                      const float* alpha, DType otype, void* out, int64_t ldo, CUstream_st* stream) {
  const char* fn = "lowbit::cuda::conv2d_s8_nhwc";
  using validate::invalid_got;
  if (w == nullptr) return Status::invalid(validate::err(fn, "w is null"));
  validate::Im2colDims dims;  // the shape rules of im2col_s8_nhwc (w stands in for its non-null cols)
  Status st = validate::im2col_s8_nhwc(fn, x, s, c0, Cg, w, &dims);
  if (!st.is_ok()) return st;
  st = validate::gemm_otype(fn, otype);
  if (!st.is_ok()) return st;
  if (Og < 1) return invalid_got(fn, "Og must be >= 1", Og);
  if (ldo < Og) return invalid_got(fn, "ldo must be >= Og (" + std::to_string(Og) + ")", ldo);
  if (const char* why = conv_unsupported(x, s, c0, Cg, w)) return Status::invalid(validate::err(fn, why));
  if (alpha == nullptr) return Status::invalid(validate::err(fn, "alpha is null"));
  if (out == nullptr) return Status::invalid(validate::err(fn, "out is null"));
  const int64_t rows = s.N * dims.Ho * dims.Wo;  // <= cols_len, which the shape rules bound
  if (rows > std::numeric_limits<int64_t>::max() / ldo)
    return Status::invalid(validate::err(fn, "N*Ho*Wo * ldo overflows int64"));
  const int64_t tiles = ((rows + kBM - 1) / kBM) * ((Og + kBN - 1) / kBN);
  if (tiles > int64_t(0x7fffffff))
    return Status::invalid(validate::err(fn, "N*Ho*Wo x Og needs " + std::to_string(tiles) +
                                                 " tiles of 128 x 128, more than a grid holds (2^31 - 1)"));
  const int64_t K = s.kh * s.kw * Cg;
  const ConvGather cv{s.H * s.W * s.C, static_cast<int>(s.H), static_cast<int>(s.W), static_cast<int>(s.C),
                      dims.Ho * dims.Wo, static_cast<int>(dims.Wo), static_cast<int>(s.kw), static_cast<int>(Cg),
                      static_cast<int>(s.sh), static_cast<int>(s.sw), static_cast<int>(s.ph), static_cast<int>(s.pw),
                      static_cast<int>(s.dh), static_cast<int>(s.dw)};
  const cudaStream_t cs = reinterpret_cast<cudaStream_t>(stream);
  switch (otype) {
    case DType::kFloat32: return launch_conv<float>(fn, x + c0, w, rows, Og, K, alpha, out, ldo, cv, cs);
    case DType::kFloat16: return launch_conv<__half>(fn, x + c0, w, rows, Og, K, alpha, out, ldo, cv, cs);
    case DType::kBFloat16: return launch_conv<__nv_bfloat16>(fn, x + c0, w, rows, Og, K, alpha, out, ldo, cv, cs);
  }
  return Status::invalid(validate::err(fn, "unreachable otype"));
}

Status gemm_s8_scaled(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                      int64_t K, const float* alpha, DType otype, void* out, int64_t ldo, CUstream_st* stream) {
  return run({"lowbit::cuda::gemm_s8_scaled", A, lda, 0, B, ldb, 0, M, N, K, 1, alpha, out, ldo, 0, otype,
              reinterpret_cast<cudaStream_t>(stream), nullptr});
}

Status gemm_s8_scaled_rows(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t M, int64_t N,
                           int64_t K, const float* alpha, const float* row_scale, DType otype, void* out,
                           int64_t ldo, CUstream_st* stream) {
  return run({"lowbit::cuda::gemm_s8_scaled_rows", A, lda, 0, B, ldb, 0, M, N, K, 1, alpha, out, ldo, 0, otype,
              reinterpret_cast<cudaStream_t>(stream), row_scale});
}

Status gemm_s8_scaled_batched(const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B, int64_t ldb,
                              int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch, const float* alpha,
                              DType otype, void* out, int64_t ldo, int64_t strideO, CUstream_st* stream) {
  return run({"lowbit::cuda::gemm_s8_scaled_batched", A, lda, strideA, B, ldb, strideB, M, N, K, batch, alpha,
              out, ldo, strideO, otype, reinterpret_cast<cudaStream_t>(stream), nullptr});
}

}  // namespace cuda
}  // namespace lowbit

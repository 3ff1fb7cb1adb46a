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

#ifdef __USE_FAST_MATH__
#error "gemm_s8.cu must not be built with --use_fast_math: the epilogue must round exactly as the CPU does"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
using gemm_s8_detail::ldmatrix_x4;
using gemm_s8_detail::mma_s8;
using gemm_s8_detail::row_alpha;
using gemm_s8_detail::store1;
using gemm_s8_detail::store2;

// ---------------------------------------------------------------------------------------------------
// Tile geometry.
constexpr int kBM = 128;                          // CTA tile rows (M)
constexpr int kBN = 128;                          // CTA tile columns (N)
constexpr int kBK = 64;                           // K bytes per pipeline stage (2 mma k-steps)
constexpr int kStages = 4;                        // shared-memory pipeline depth
constexpr int kWarpsM = 2;                        // warp grid rows
constexpr int kWarpsN = 4;                        // warp grid columns
constexpr int kThreads = 32 * kWarpsM * kWarpsN;  // 256
constexpr int kWM = kBM / kWarpsM;                // 64 rows of out per warp
constexpr int kWN = kBN / kWarpsN;                // 32 columns of out per warp
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 32;  // mma.sync m16n8k32 (s8)
constexpr int kFragsM = kWM / kMmaM;              // 4 mma tiles down a warp's block
constexpr int kFragsN = kWN / kMmaN;              // 4 mma tiles across it
constexpr int kKSteps = kBK / kMmaK;              // 2 mma k-steps per stage
constexpr int kChunk = 16;                        // bytes per cp.async / ldmatrix row
constexpr int kChunksPerRow = kBK / kChunk;       // 4
constexpr int kTileBytesA = kBM * kBK;            // 8 KB
constexpr int kTileBytesB = kBN * kBK;            // 8 KB
constexpr int kStageBytes = kTileBytesA + kTileBytesB;
constexpr int kSmemBytes = kStages * kStageBytes;  // 64 KB
constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // 64 rows of a tile loaded per thread pass
constexpr int kLoadsA = kBM / kRowsPerPass;             // 2 chunks of A per thread per stage
constexpr int kLoadsB = kBN / kRowsPerPass;             // 2 chunks of B per thread per stage
constexpr int kGroupM = 8;                        // tile-rows per raster group (L2 reuse)

static_assert(kThreads % kChunksPerRow == 0 && kBM % kRowsPerPass == 0 && kBN % kRowsPerPass == 0, "");
static_assert(kChunksPerRow == 4, "the swizzle below is written for 64-byte rows");
static_assert(kWM % 16 == 0 && kWN % 16 == 0, "ldmatrix.x4 covers 16 rows of A / 16 columns of B");

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
// ---------------------------------------------------------------------------------------------------
// The GEMM kernel. One CTA computes one kBM x kBN tile of out, of batch blockIdx.z (batch b of the launch
// reads A + b*strideA, B + b*strideB and writes out + b*strideO; the unbatched call is gridDim.z == 1).
template <typename OutT,   // float, __half or __nv_bfloat16
          bool kAsyncA,    // A 16-byte aligned, lda % 16 == 0 (and strideA, if batched): cp.async, else bytes
          bool kAsyncB>    // same for B
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
    const float* __restrict__ row_scale  // M per-row multipliers or nullptr
) {
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
  const int8_t* a_src[kLoadsA];  // this thread's A rows at k = chunk start (row clamped into range)
  bool a_row_ok[kLoadsA];
  uint32_t a_dst[kLoadsA];
#pragma unroll
  for (int i = 0; i < kLoadsA; ++i) {
    const int r = ld_row + i * kRowsPerPass;
    a_row_ok[i] = m0 + r < M;
    a_src[i] = A_b + (a_row_ok[i] ? m0 + r : M - 1) * lda + ld_chunk * kChunk;
    a_dst[i] = swizzle(r, ld_chunk);
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
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i)
      copy_chunk(std::integral_constant<bool, kAsyncA>{}, slot + a_dst[i], a_src[i] + kt * kBK,
                 a_row_ok[i] ? in_k : 0, A);
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
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t af[kFragsM][4];
      uint32_t bf[kFragsN][2];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) ldmatrix_x4(af[i], slot + a_frag_off[ks] + i * kMmaM * kBK);
#pragma unroll
      for (int p = 0; p < kFragsN / 2; ++p) {
        uint32_t r[4];
        ldmatrix_x4(r, slot + b_frag_off[ks] + p * 2 * kMmaN * kBK);
        bf[2 * p][0] = r[0];
        bf[2 * p][1] = r[1];
        bf[2 * p + 1][0] = r[2];
        bf[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) mma_s8(acc[i][j], af[i], bf[j]);
    }
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
template <typename OutT, bool kAsyncA, bool kAsyncB>
Status allow_smem(const char* fn, int device) {
  static std::atomic<bool> done[64];
  if (device >= 0 && device < 64 && done[device].load(std::memory_order_acquire)) return Status::ok();
  const cudaError_t err = cudaFuncSetAttribute(gemm_s8_kernel<OutT, kAsyncA, kAsyncB>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the error is returned, not left for the next caller
    return Status::device(std::string(fn) + ": cudaFuncSetAttribute(MaxDynamicSharedMemorySize=" +
                          std::to_string(kSmemBytes) + ") failed: " + cudaGetErrorString(err));
  }
  if (device >= 0 && device < 64) done[device].store(true, std::memory_order_release);
  return Status::ok();
}

template <typename OutT, bool kAsyncA, bool kAsyncB>
Status launch_gemm(const GemmArgs& g) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return Status::device(std::string(g.fn) + ": cudaGetDevice failed: " + cudaGetErrorString(err));
  Status st = allow_smem<OutT, kAsyncA, kAsyncB>(g.fn, device);
  if (!st.is_ok()) return st;
  const int64_t tiles_m = (g.M + kBM - 1) / kBM;
  const int64_t tiles_n = (g.N + kBN - 1) / kBN;
  // Batch on z, tiles on x: blocks are dispatched x-fastest, so the CTAs resident together belong to
  // one or two batches and the grouped raster's L2 reuse holds within each batch.
  for (int64_t b0 = 0; b0 < g.batch; b0 += kMaxBatchPerLaunch) {
    const int64_t nb = g.batch - b0 < kMaxBatchPerLaunch ? g.batch - b0 : kMaxBatchPerLaunch;
    const dim3 grid(static_cast<unsigned>(tiles_m * tiles_n), 1, static_cast<unsigned>(nb));
    gemm_s8_kernel<OutT, kAsyncA, kAsyncB><<<grid, kThreads, kSmemBytes, g.stream>>>(
        g.A + b0 * g.strideA, g.lda, g.strideA, g.B + b0 * g.strideB, g.ldb, g.strideB, g.M, g.N,
        static_cast<int>(g.K), g.alpha, static_cast<OutT*>(g.out) + b0 * g.strideO, g.ldo, g.strideO, tiles_m,
        tiles_n, g.row_scale);
    st = launch_error(g.fn, "gemm kernel launch failed");
    if (!st.is_ok()) return st;
  }
  return Status::ok();
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
    if (eligible && (choice == KernelChoice::kWgmma || M >= kWgmmaMinRows)) return gemm_s8_detail::launch_sm90(g);
  }
  switch (otype) {
    case DType::kFloat32: return launch_by_alignment<float>(g);
    case DType::kFloat16: return launch_by_alignment<__half>(g);
    case DType::kBFloat16: return launch_by_alignment<__nv_bfloat16>(g);
  }
  return Status::invalid(fn + "unreachable otype");
}

}  // namespace

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

// int8 x int8 -> int32 GEMM for Hopper (sm_90a): TMA loads into a shared-memory ring, wgmma on the
// tensor cores, the dequantizing epilogue of gemm_s8.cu (same rounding, bitwise the same outputs).
//
//   out[i, j] = to_otype( float(acc[i, j]) * alpha ),   acc[i, j] = sum_k A[i, k] * B[j, k]
//
// Why a second kernel: mma.sync s8 (gemm_s8.cu) tops out near 1283 TOP/s on an H100 and our tiled
// kernel reached ~780; wgmma is the only way to the int8 peak (1979 TOP/s dense) on sm_90.
//
// Shape of the computation
// ------------------------
//   * CTA tile 128 (M) x 256 (N), K consumed 128 bytes per stage, 4 stages (4 x 48 KB of shared
//     memory, one CTA per SM). 3 warpgroups: warpgroup 0 is the producer (one thread issues the TMA
//     copies), warpgroups 1 and 2 are consumers, each owning 64 rows x 256 columns of the tile
//     (wgmma.m64n256k32.s32.s8.s8, 128 int32 accumulators per thread). setmaxnreg moves registers from
//     the producer (40) to the consumers (232).
//   * Both operands are K-major (A (M, K) row-major, B (N, K) row-major), the only layout wgmma takes
//     for 8-bit integers, and exactly the layout of nn.Linear's activations and weights.
//   * TMA boxes of 128 K-bytes x rows with the 128-byte swizzle: row r's 16-byte chunk c sits at chunk
//     c ^ (r % 8) of its 128-byte line, which is the layout the wgmma descriptor's "128B swizzle" mode
//     reads, bank-conflict free. Stage buffers are 1024-byte aligned (the swizzle pattern's period). The
//     4 k-steps of 32 bytes inside a stage advance the descriptor's start address by 32 bytes.
//   * Pipeline: full[s] (TMA transaction bytes) and empty[s] (one arrival per consumer warp) mbarriers.
//     A consumer releases stage s of k-tile kt-1 after wgmma.wait_group 1 says that group retired, so
//     one k-tile of wgmma stays in flight while the next waits for its data.
//   * Tails: TMA fills rows past M / N and bytes past K with zeros, so the tensor cores need no masking;
//     the epilogue writes in-bounds outputs only.
//   * Epilogue: the accumulator fragment (row 16*warp + lane/4 (+8), columns 8j + 2*(lane%4) (+1)) goes
//     through dequant / pack2 / store2 of gemm_s8_internal.cuh, so the rounding is the mma.sync kernel's.
//     16-bit outputs are regrouped across each lane quad (quad_transpose) into 16-byte row stores, whole
//     sectors per warp store (H200: 8192x4096x4096 1282 -> 1470 TOP/s, 8192^3 1468 -> 1591, K = 128
//     batched attention scores 1.3 -> 2.5 TB/s); fp32 outputs keep the pair stores.
//   * Grid: persistent, one CTA per SM, each looping over output tiles w = blockIdx.x, + gridDim.x, ...
//     (all batches' tiles in one sequence; grouped raster, 8 tile-rows per group, for L2 reuse). The
//     mbarrier ring runs on across tiles and a consumer frees its last slot before its epilogue, so the
//     producer loads the next tile while the epilogue stores this one (small-K calls, e.g. attention
//     scores with K = 128, are store-bound: there this is most of the gain). 3-D tensor maps (K, rows,
//     batch); a broadcast operand uses batch coordinate 0.
//   * Deterministic: each output is reduced by one thread in a fixed k order.
//
// Built for every architecture in the list; only the sm_90a pass has a body (the other passes trap),
// and the host launches it only on a 9.0 device whose loaded kernel came from compute_90a code.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>

#include "../validate.h"
#include "gemm_s8_internal.cuh"
#include "lowbit/kernels/gemm_s8.h"
#include "tma_internal.cuh"
#include "wgmma_internal.cuh"

#ifdef __USE_FAST_MATH__
#error "gemm_s8_sm90.cu must not be built with --use_fast_math: the epilogue must round exactly as the CPU does"
#endif

// wgmma_internal.cuh defines LOWBIT_SM90A_DEVICE in the sm_90a device pass.

namespace lowbit {
namespace cuda {
namespace gemm_s8_detail {
namespace {

#ifdef LOWBIT_SM90A_DEVICE
using wgmma_detail::smem_desc;
using wgmma_detail::wgmma_commit;
using wgmma_detail::wgmma_fence;
using wgmma_detail::wgmma_wait;
using tma_detail::mbar_arrive;
using tma_detail::mbar_expect_tx;
using tma_detail::mbar_wait;
using tma_detail::Ring;
using tma_detail::tma_load;
#endif
using tma_detail::device_sms;
using tma_detail::encode_fn;
using tma_detail::make_map;
using tma_detail::tma_ok;

constexpr int kBM = 128;                     // CTA tile rows
constexpr int kBN = 256;                     // CTA tile columns (= wgmma N)
constexpr int kBK = 128;                     // K bytes per stage (= the 128-byte swizzle line)
constexpr int kStages = 4;
constexpr int kConsumers = 2;                // consumer warpgroups, 64 rows each
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kTileA = kBM * kBK;            // 16 KB
constexpr int kTileB = kBN * kBK;            // 32 KB
constexpr int kStageBytes = kTileA + kTileB;  // 48 KB
constexpr int kAlignSlack = 1024;            // the dynamic shared base is aligned up to 1024 bytes
constexpr int kSmemBytes = kAlignSlack + kStages * kStageBytes + 2 * kStages * 8;
[[maybe_unused]] constexpr int kGroupM = 8;                   // tile-rows per raster group
[[maybe_unused]] constexpr int kAcc = kBN / 2;                // int32 accumulators per consumer thread (64 x 256 / 128)
[[maybe_unused]] constexpr int kMmaK = 32;                    // K bytes per wgmma
static_assert(kBM == 64 * kConsumers, "one 64-row wgmma block per consumer warpgroup");
static_assert(kSmemBytes <= 227 * 1024, "sm_90 allows 227 KB of shared memory per block");

#ifdef LOWBIT_SM90A_DEVICE
// Keeps the compiler from moving accumulator reads or writes across a wgmma fence / wait.
__device__ __forceinline__ void pin(int32_t (&d)[kAcc]) {
#pragma unroll
  for (int i = 0; i < kAcc; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// d += A (64 x 32, from descriptor da) * B^T (256 x 32, from db); scale-d = 1 (accumulate).
__device__ __forceinline__ void wgmma_s8_n256(int32_t (&d)[kAcc], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {" LOWBIT_WG_ACC_STR_128 "}, %128, %129, p;\n}\n"
      : LOWBIT_WG_ACC_OPS_128(d)
      : "l"(da), "l"(db));
}
#endif  // LOWBIT_SM90A_DEVICE

template <typename OutT>
__global__ void __launch_bounds__(kThreads, 1) gemm_s8_sm90_kernel(
    const __grid_constant__ CUtensorMap tm_a,  // A: (batch, M, K) int8, box 128 K x 128 rows, 128B swizzle
    const __grid_constant__ CUtensorMap tm_b,  // B: (batch, N, K) int8, box 128 K x 256 rows
    int a_batched, int b_batched,              // 0: the operand is shared by every batch (coordinate 0)
    int64_t M, int64_t N, int K, const float* __restrict__ alpha, OutT* __restrict__ out, int64_t ldo,
    int64_t strideO, int64_t tiles_m, int64_t tiles_n,
    int64_t work,                              // batches * tiles_m * tiles_n output tiles
    const float* __restrict__ row_scale) {  // M per-row multipliers or nullptr
#ifdef LOWBIT_SM90A_DEVICE
  extern __shared__ uint8_t smem_raw[];
  const Ring ring(smem_raw, kStages, kStageBytes);
  const uint32_t base = ring.base;
  auto full = [&](int s) { return ring.full(s); };
  auto empty = [&](int s) { return ring.empty(s); };

  // Work item w (a persistent CTA takes w = blockIdx.x, + gridDim.x, ...): batch w / tiles_per_batch, and
  // in it the grouped raster (kGroupM tile-rows per group) of pid = w % tiles_per_batch. Items run in
  // increasing w across the grid, so the CTAs resident together cover neighbouring tiles (L2 reuse).
  const int64_t tiles_per_batch = tiles_m * tiles_n;
  auto locate = [&](int64_t w, int* batch, int* m0, int* n0) {
    const int64_t b = w / tiles_per_batch;
    int64_t tm, tn;
    tma_detail::grouped_tile(w - b * tiles_per_batch, tiles_m, tiles_n, kGroupM, &tm, &tn);
    *batch = static_cast<int>(b);
    *m0 = static_cast<int>(tm * kBM);
    *n0 = static_cast<int>(tn * kBN);
  };
  const int k_tiles = (K + kBK - 1) / kBK;
  const int wg = threadIdx.x / 128;
  ring.init(4 * kConsumers);
  __syncthreads();

  if (wg == 0) {
    // Producer warpgroup: give registers away; one thread streams the k-tiles.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_b)) : "memory");
      // `it` counts k-tiles over all of this CTA's work items: slot it % kStages, round it / kStages. The
      // ring runs on across items, so the next tile's loads overlap this tile's last MMAs and epilogue.
      int64_t it = 0;
      for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
        int batch, m0, n0;
        locate(w, &batch, &m0, &n0);
        const int za = a_batched ? batch : 0, zb = b_batched ? batch : 0;
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
          const int s = static_cast<int>(it % kStages);
          if (it >= kStages) mbar_wait(empty(s), static_cast<uint32_t>((it / kStages) - 1) & 1u);  // round r-1 freed
          const uint32_t slot = base + uint32_t(s) * kStageBytes;
          mbar_expect_tx(full(s), kStageBytes);  // TMA credits the whole box, zero-filled parts included
          tma_load(slot, &tm_a, full(s), kt * kBK, m0, za);
          tma_load(slot + kTileA, &tm_b, full(s), kt * kBK, n0, zb);
        }
      }
    }
    return;
  }

  // Consumer warpgroups.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int cw = wg - 1;                 // rows 64*cw .. 64*cw+63 of the tile
  const int t = threadIdx.x % 128;
  const int warp = t / 32, lane = t % 32;
  const float a = __ldg(alpha);
  int32_t acc[kAcc];
  int64_t it = 0;  // as the producer's
  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    int batch, m0, n0;
    locate(w, &batch, &m0, &n0);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0;

    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      const int s = static_cast<int>(it % kStages);
      mbar_wait(full(s), static_cast<uint32_t>(it / kStages) & 1u);
      const uint32_t slot = base + uint32_t(s) * kStageBytes;
      const uint32_t a_tile = slot + uint32_t(cw) * 64 * kBK;
      const uint32_t b_tile = slot + kTileA;
      pin(acc);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kBK / kMmaK; ++k)
        wgmma_s8_n256(acc, smem_desc(a_tile + k * kMmaK), smem_desc(b_tile + k * kMmaK));
      wgmma_commit();
      pin(acc);
      wgmma_wait<1>();  // the group of the previous k-tile has retired: its slot may be refilled
      pin(acc);
      if (kt > 0 && lane == 0) mbar_arrive(empty(static_cast<int>((it - 1) % kStages)));
    }
    wgmma_wait<0>();
    pin(acc);
    // The last k-tile's slot is free too: the producer refills it while this tile's epilogue runs.
    if (lane == 0) mbar_arrive(empty(static_cast<int>((it - 1) % kStages)));

    // Epilogue.
    OutT* const out_b = out + int64_t(batch) * strideO;
    const int64_t row0 = int64_t(m0) + 64 * cw + 16 * warp + lane / 4;
    if constexpr (sizeof(OutT) == 2) {
      // 16-bit outputs: the 4 lanes of a quad hold, for each j, 2 adjacent columns of 8j..8j+7 of one row.
      // A 4 x 4 transpose of packed words across the quad (quad_transpose) gives lane qt the 8 columns
      // 8(4q + qt) .. + 7: one 16-byte store, and a warp's store covers 64 contiguous bytes of each of 8
      // rows (whole sectors; the fragment's own 4-byte stores leave every sector half written, which made
      // store-bound calls, K = 128 attention scores, run at ~1.3 TB/s). Same values, same rounding.
      const int qt = lane % 4;
      const bool vec_ok = (ldo % 8 == 0) && (reinterpret_cast<uintptr_t>(out_b) % 16 == 0);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + 8 * h;
        const bool row_ok = row < M;  // quad-uniform; the shuffles below still run on every lane
        const float ar = row_ok ? row_alpha(a, row_scale, row) : 0.0f;
        uint16_t* const out_row = reinterpret_cast<uint16_t*>(out_b + (row_ok ? row : 0) * ldo);
#pragma unroll
        for (int q = 0; q < kBN / 32; ++q) {
          uint32_t x[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int j = 4 * q + r;
            x[r] = pack2(static_cast<OutT*>(nullptr), dequant(acc[4 * j + 2 * h], ar), dequant(acc[4 * j + 2 * h + 1], ar));
          }
          quad_transpose(x, qt);
          if (!row_ok) continue;
          store8_16(out_row, int64_t(n0) + 32 * q + 8 * qt, N, vec_ok, x);
        }
      }
    } else {
      const bool pairs_ok = (ldo % 2 == 0) && (reinterpret_cast<uintptr_t>(out_b) % (2 * sizeof(OutT)) == 0);
      const int64_t col0 = int64_t(n0) + 2 * (lane % 4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + 8 * h;
        if (row >= M) continue;
        OutT* const out_row = out_b + row * ldo;
        const float ar = row_alpha(a, row_scale, row);
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) {
          const int64_t col = col0 + 8 * j;
          const float v0 = dequant(acc[4 * j + 2 * h], ar);
          const float v1 = dequant(acc[4 * j + 2 * h + 1], ar);
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
#else
  __trap();  // never launched: the host checks that the sm_90a code was loaded
#endif
}

// ---------------------------------------------------------------------------------------------------
// int8 activations x int4-pair weights (gemm_s8s4_scaled, gemm_s8.h): the weights are unpacked in
// registers, never stored as int8.
//
//   * Orientation out^T = W . A^T, as in wq_wg.cu: the WEIGHTS are wgmma's A operand (64 weight rows x 32 k
//     per instruction, from registers), the activations its B operand (BM rows x 32 k, from shared memory
//     through the 128B-swizzle descriptor, the tile the int8 kernel above uses for its B). 128 k per stage.
//   * Tile shapes (S4Cfg below; the host picks by M): BM activation rows = the wgmma N (256; 64 or 16 for
//     few rows, where a 256-wide instruction would spend its work on zero rows) x 64 CW weight rows (CW
//     consumer warpgroups: 2, or 1 when two would leave SMs idle), and KS consumer warpgroups per
//     weight-row block splitting the k-tiles (k-tile kt goes to consumer kt % KS; their int32 partial sums
//     are added exactly, in consumer order, through shared memory, so the result is the same integer
//     sum): with few rows the work per k-step is small and each consumer's chain of load -> unpack ->
//     wgmma -> wait is the limit, so several run side by side. M <= 16: (16, 1, 6); M <= 64: (64, 1, 3);
//     else (256, 2, 1) or (256, 1, 1).
//   * Stage: the activation tile by TMA (BM x 128 bytes, 128B swizzle) and the packed weight tile by TMA
//     without swizzle (64 CW rows x 64 bytes: row r at byte 64 r); 5 stages for BM = 256, else 8 or more
//     (>= 2 KS: every k-split consumer's next k-tile must fit while the others hold theirs).
//   * A fragment (mma.m16n8k32's 8-bit layout; warp w of the warpgroup takes weight rows 16w .. 16w + 15):
//     lane (g, t) = (lane / 4, lane % 4) holds, for k-step s (32 k), a0 = row g, k 4t .. 4t + 3; a1 = row
//     g + 8, same k; a2 = row g, k 16 + 4t .. 16 + 4t + 3; a3 = row g + 8, same k (lowest k in the lowest
//     byte). Packed, k 4t .. 4t + 3 are bytes 2t, 2t + 1 of the row's 16-byte chunk s and k 16 + 4t .. are
//     bytes 8 + 2t, 9 + 2t: one 16-byte load of chunk s per row, a select of the two words holding them,
//     one PRMT to gather the four bytes, and the nibbles are sign-extended bytewise
//     (((v ^ 0x08) + 0x78) ^ 0x80 on each byte of the masked nibbles: 0..7 -> 0..7, 8..15 -> -8..-1) and
//     interleaved (high nibble first, PRMT 0x5140 / 0x7362).
//   * K-step by k-step with two register sets: the fragment of step q + 1 is loaded and unpacked while
//     the wgmma of step q runs; wgmma.wait_group 1 after each issue retires step q - 1, whose registers
//     (and, at a stage's first step, the previous stage) are then free. A stage-wide variant (16 + 16
//     registers, one wait per 4 wgmmas) ran at the same speed with spills in the 16-bit epilogue.
//   * Speed (H100, bf16 out, N = K = 8192; int8 kernel on unpacked weights / unpack_s4 + it): M = 16
//     24 us (50 / 93 us), M = 64 27.5 us (50 / 93), M = 256 50-52 us (51 / 94), M = 2048 210-216 us
//     (176 / 216-228), M = 8192 800-820 us (657 / 700-714). At large M the tensor pipe is 71 % busy (the
//     int8 kernel is bound by the shared-memory pipe at 88 %): the register-sourced wgmma alone (no
//     unpacking: 751 us) and the unpacking (+58 us) both cost, so callers take this kernel up to
//     kGemmS8S4FusedMaxRows rows (gemm_s8.h) and unpack first beyond.
//   * Tails: TMA zero-fills activation bytes past K and rows past M, and packed bytes past ceil(K/2) and
//     rows past N: a weight nibble past K (odd K's padding nibble included) meets a zero activation, so
//     it adds 0 whatever it holds. The epilogue stores in-bounds outputs only.
//   * Epilogue: lane (g, t) holds out[m][n] for n = row 16w + g (+ 8) of the weight tile and m = 8j + 2t
//     (+ 1) of the activation tile: 16-bit outputs swap one value with lane g ^ 1 so each lane stores two
//     adjacent n as one word; fp32 outputs store singly (8 lanes cover 32 contiguous bytes). dequant of
//     gemm_s8_internal.cuh: bitwise the int8 kernels' outputs.
//   * W4 = false: the same kernel on int8 weights (gemm_s8_scaled with few activation rows, where the
//     128 x 256 tiles of the kernel above leave most SMs idle: N / 256 CTAs): the weight tile comes by TMA
//     with the 128B swizzle (64 CW rows x 128 bytes), and a lane's fragment is four 4-byte shared loads
//     per k-step (bytes 4t of the row's 16-byte chunks 2s and 2s + 1, at chunk ^ (row % 8): the eight rows
//     g of a load hit eight different chunks, no bank conflict), no unpacking.
template <int BM, int CW, int KS, bool W4 = true>
struct S4Cfg {
  static constexpr int kBM = BM;                    // activation rows per tile (= wgmma N)
  static constexpr int kCW = CW, kKS = KS;
  static constexpr int kRowsW = 64 * CW;            // weight rows per tile
  static constexpr int kConsumerThreads = 128 * CW * KS;
  static constexpr int kThreads = 128 + kConsumerThreads;  // producer warpgroup + consumers
  static constexpr int kTileX = BM * kBK;           // activation bytes per stage
  static constexpr int kWRowBytes = W4 ? kBK / 2 : kBK;  // weight bytes per row and k-tile
  static constexpr int kTileW = kRowsW * kWRowBytes;  // int4-pair (or int8) bytes per stage
  static constexpr int kStageBytes = kTileX + kTileW;
  // 5 for the wide tiles (4 ran 9 % slower at 8192^3), 8 for the streaming few-row tiles (>= 2 KS, so
  // that every consumer's next k-tile fits in the ring while the other consumers hold theirs).
  static constexpr int kStages = BM >= 256 ? 5 : (2 * KS > 8 ? 2 * KS : 8);
  static constexpr int kAcc = BM / 2;               // int32 accumulators per consumer thread
  // The k-split consumers' partial sums for the reduction: [KS - 1][kAcc][128 CW] int32.
  static constexpr int kScratchBytes = (KS - 1) * kAcc * 128 * CW * 4;
  static constexpr int kSmemBytes = kAlignSlack + kStages * kStageBytes + 2 * kStages * 8 + kScratchBytes;
  static_assert(kStageBytes % 1024 == 0, "stage buffers must stay 1024-byte aligned");
  static_assert(kStages >= 2 * KS, "each k-split consumer needs its current and next k-tile in the ring");
  static_assert(kSmemBytes <= 227 * 1024, "sm_90 allows 227 KB of shared memory per block");
};

#ifdef LOWBIT_SM90A_DEVICE
// d = A (64 x 32 int8, registers a[0..3]) * B^T (N x 32, descriptor db) + (accumulate ? d : 0), N = 16,
// 64 or 256 (N / 2 int32 accumulators per thread).
template <int N>
__device__ __forceinline__ void wgmma_s8_rs(int32_t (&d)[N / 2], const uint32_t (&a)[4], uint64_t db,
                                            uint32_t accumulate);
template <>
__device__ __forceinline__ void wgmma_s8_rs<16>(int32_t (&d)[8], const uint32_t (&a)[4], uint64_t db,
                                                uint32_t accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8 {" LOWBIT_WG_ACC_STR_8 "}, "
      "{%8, %9, %10, %11}, %12, p;\n}\n"
      : LOWBIT_WG_ACC_OPS_8(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}
template <>
__device__ __forceinline__ void wgmma_s8_rs<64>(int32_t (&d)[32], const uint32_t (&a)[4], uint64_t db,
                                                uint32_t accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {" LOWBIT_WG_ACC_STR_32 "}, "
      "{%32, %33, %34, %35}, %36, p;\n}\n"
      : LOWBIT_WG_ACC_OPS_32(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}
template <>
__device__ __forceinline__ void wgmma_s8_rs<256>(int32_t (&d)[128], const uint32_t (&a)[4], uint64_t db,
                                                uint32_t accumulate) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {" LOWBIT_WG_ACC_STR_128 "}, "
      "{%128, %129, %130, %131}, %132, p;\n}\n"
      : LOWBIT_WG_ACC_OPS_128(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}
template <int N>
__device__ __forceinline__ void pin_acc(int32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// Four 4-bit two's-complement codes per byte pair -> two registers of four int8 codes each. p holds the
// packed bytes [b0, b1, b2, b3] (b0 the lowest); lo4 gets the codes of b0, b1 (b0's high nibble first),
// hi4 those of b2, b3.
__device__ __forceinline__ void unpack_pairs(uint32_t p, uint32_t& lo4, uint32_t& hi4) {
  const uint32_t hi = (((((p >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u);
  const uint32_t lo = ((((p & 0x0F0F0F0Fu) ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u);
  lo4 = __byte_perm(hi, lo, 0x5140);
  hi4 = __byte_perm(hi, lo, 0x7362);
}
// The A fragment of k-step s (32 k) for weight rows `row` and `row + 8` (byte offsets of their 64-byte
// packed lines in shared memory).
__device__ __forceinline__ void load_a_step(uint32_t (&a)[4], uint32_t row_lo, uint32_t row_hi, int s,
                                            bool t_hi_word, uint32_t gather) {
  uint32_t c[2][4];
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(c[0][0]), "=r"(c[0][1]), "=r"(c[0][2]), "=r"(c[0][3])
               : "r"(row_lo + 16u * s)
               : "memory");
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(c[1][0]), "=r"(c[1][1]), "=r"(c[1][2]), "=r"(c[1][3])
               : "r"(row_hi + 16u * s)
               : "memory");
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint32_t x = t_hi_word ? c[r][1] : c[r][0];  // holds bytes 2t, 2t + 1
    const uint32_t y = t_hi_word ? c[r][3] : c[r][2];  // holds bytes 8 + 2t, 9 + 2t
    unpack_pairs(__byte_perm(x, y, gather), a[r], a[2 + r]);
  }
}
// The same fragment from int8 weights in the 128B-swizzled tile (W4 = false): rows `row_lo` and `row_lo +
// 8` (byte offsets of their 128-byte lines; both rows are g mod 8), bytes 4t of chunks 2s and 2s + 1.
__device__ __forceinline__ void load_a_step8(uint32_t (&a)[4], uint32_t row_lo, uint32_t row_hi, int s, int g,
                                             int t) {
  const uint32_t c0 = (uint32_t((2 * s) ^ g) << 4) | uint32_t(4 * t);
  const uint32_t c1 = (uint32_t((2 * s + 1) ^ g) << 4) | uint32_t(4 * t);
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(a[0]) : "r"(row_lo + c0) : "memory");
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(a[1]) : "r"(row_hi + c0) : "memory");
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(a[2]) : "r"(row_lo + c1) : "memory");
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(a[3]) : "r"(row_hi + c1) : "memory");
}
#endif  // LOWBIT_SM90A_DEVICE

template <typename OutT, int BM, int CW, int KS, bool W4>
__global__ void __launch_bounds__(S4Cfg<BM, CW, KS, W4>::kThreads, 1) gemm_s8s4_sm90_kernel(
    const __grid_constant__ CUtensorMap tm_x,  // activations (M, K) int8, box 128 K x BM rows, 128B swizzle
    const __grid_constant__ CUtensorMap tm_w,  // weights: (N, ceil(K/2)) int4 pairs, box 64 bytes x 64 CW rows;
                                               // W4 = false: (N, K) int8, box 128 bytes x 64 CW rows, 128B swizzle
    int64_t M, int64_t N, int K, const float* __restrict__ alpha, OutT* __restrict__ out, int64_t ldo,
    int64_t tiles_m, int64_t tiles_n) {
#ifdef LOWBIT_SM90A_DEVICE
  using C = S4Cfg<BM, CW, KS, W4>;
  constexpr int kS4Stages = C::kStages, kS4StageBytes = C::kStageBytes, kS4TileX = C::kTileX;
  extern __shared__ uint8_t smem_raw[];
  const Ring ring(smem_raw, kS4Stages, kS4StageBytes);
  const uint32_t base = ring.base, bars = ring.bars;
  auto full = [&](int s) { return ring.full(s); };
  auto empty = [&](int s) { return ring.empty(s); };
  const int64_t work = tiles_m * tiles_n;
  // Tile w: grouped raster over (activation tile-rows, weight tiles), kGroupM activation tile-rows per group.
  auto locate = [&](int64_t w, int* m0, int* n0) {
    int64_t tm, tn;
    tma_detail::grouped_tile(w, tiles_m, tiles_n, kGroupM, &tm, &tn);
    *m0 = static_cast<int>(tm * BM);
    *n0 = static_cast<int>(tn * C::kRowsW);
  };
  const int k_tiles = (K + kBK - 1) / kBK;
  const int wg = threadIdx.x / 128;
  ring.init(4 * CW);
  __syncthreads();

  // Two consumers: registers move from the producer (40) to them (232), as in the int8 kernel. One
  // consumer: the launch's 232 per thread already suffice (256 threads), no move.
  if (wg == 0) {
    if constexpr (CW == 2) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_x)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_w)) : "memory");
      // Ring position: stage s, phase parity ph (the consumers' it_tile counts the same positions). Round
      // 0's empty waits (parity 1) pass at once.
      int s = 0;
      uint32_t ph = 0;
      for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
        int m0, n0;
        locate(w, &m0, &n0);
        for (int kt = 0; kt < k_tiles; ++kt) {
          mbar_wait(empty(s), ph ^ 1u);
          const uint32_t slot = base + uint32_t(s) * kS4StageBytes;
          mbar_expect_tx(full(s), kS4StageBytes);
          tma_load(slot, &tm_x, full(s), kt * kBK, m0, 0);
          tma_load(slot + kS4TileX, &tm_w, full(s), kt * C::kWRowBytes, n0, 0);
          if (++s == kS4Stages) {
            s = 0;
            ph ^= 1u;
          }
        }
      }
    }
    return;
  }

  if constexpr (CW == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int cidx = wg - 1;
  const int cw = cidx % CW;  // weight rows 64*cw .. 64*cw+63 of the tile
  const int kc = cidx / CW;  // k-split lane: k-tiles kc, kc + KS, ...
  const int t = threadIdx.x % 128;
  const int warp = t / 32, lane = t % 32;
  const int g = lane / 4, tq = lane % 4;
  const bool t_hi_word = tq >= 2;
  const uint32_t gather = (tq & 1) ? 0x7632u : 0x5410u;
  const uint32_t row_off = uint32_t(64 * cw + 16 * warp + g) * uint32_t(C::kWRowBytes);
  // k-step ks's A fragment from the weight rows at wrow (this lane's row g) and wrow + 8 rows.
  auto load_step = [&](uint32_t (&a)[4], uint32_t wrow, int ks) {
    if constexpr (W4)
      load_a_step(a, wrow, wrow + 8 * (kBK / 2), ks, t_hi_word, gather);
    else
      load_a_step8(a, wrow, wrow + 8 * kBK, ks, g, tq);
  };
  const float a_scale = __ldg(alpha);
  const uint32_t scratch = bars + 2 * kS4Stages * 8;  // 16-byte aligned (bars is 1024-aligned)
  int32_t acc[C::kAcc];  // the tile's first wgmma (scale-d 0) writes them
  // Ring position of this consumer's current k-tile: stage s, phase parity ph, counted incrementally (a
  // division per k-tile on the consumers' critical path cost 10-14 % at 8192^3); its next k-tile is KS
  // positions on (KS <= kStages). Without k-split it runs on across tiles as the producer's does; with
  // it, each tile's start is recomputed from it_tile.
  int s = 0, prev_s = 0;
  uint32_t ph = 0;
  auto advance = [&] {
    prev_s = s;
    s += KS;
    if (s >= kS4Stages) {
      s -= kS4Stages;
      ph ^= 1u;
    }
  };
  uint32_t it_tile = 0;  // ring position of this tile's k-tile 0 (k-tiles the CTA streamed before it; 32 bits:
                         // tiles per CTA x k-tiles stays far below 2^32)
  for (int64_t w = blockIdx.x; w < work; w += gridDim.x, it_tile += uint32_t(k_tiles)) {
    int m0, n0;
    locate(w, &m0, &n0);
    const int my_tiles = KS == 1 ? k_tiles : (k_tiles > kc ? (k_tiles - kc + KS - 1) / KS : 0);
    // (Without k-split the branch is compiled out: around the wgmma pipeline it cost 7 % at 8192^3.)
    if (KS == 1 || my_tiles > 0) {
      if constexpr (KS > 1) {  // this consumer's first k-tile of the tile (one division per tile)
        const uint32_t p0 = it_tile + uint32_t(kc);
        s = static_cast<int>(p0 % kS4Stages);
        ph = (p0 / kS4Stages) & 1u;
      }
      auto wrow_of = [&](int st) { return base + uint32_t(st) * kS4StageBytes + kS4TileX + row_off; };
      // k-step by k-step: the fragment of step q + 1 is loaded and unpacked into the other register set
      // while the wgmma of step q runs (wgmma.wait_group 1 after each issue: step q - 1 has retired, its
      // registers are free, and at a k-tile's first step so is the previous k-tile's stage).
      uint32_t ra[2][4];
      mbar_wait(full(s), ph);
      load_step(ra[0], wrow_of(s), 0);
      for (int i = 0; i < my_tiles; ++i, advance()) {
        const uint32_t slot = base + uint32_t(s) * kS4StageBytes;
        const uint32_t wrow = slot + kS4TileX + row_off;
#pragma unroll
        for (int ks = 0; ks < kBK / kMmaK; ++ks) {
          const int P = ks & 1;
          pin_acc(acc);
          wgmma_fence();
          // The tile's first wgmma starts the sum (scale-d 0): zeroing the accumulators with moves would
          // make ptxas serialize the wgmmas.
          wgmma_s8_rs<BM>(acc, ra[P], smem_desc(slot + ks * kMmaK), i > 0 || ks > 0 ? 1u : 0u);
          wgmma_commit();
          pin_acc(acc);
          wgmma_wait<1>();
          pin_acc(acc);
          if (ks == 0 && i > 0) {
            __syncwarp();  // the warp's shared loads of that stage (A fragments) before lane 0's arrival
            if (lane == 0) mbar_arrive(empty(prev_s));
          }
          if (ks + 1 < kBK / kMmaK) {
            load_step(ra[1 - P], wrow, ks + 1);
          } else if (i + 1 < my_tiles) {
            const int sn = s + KS >= kS4Stages ? s + KS - kS4Stages : s + KS;
            mbar_wait(full(sn), s + KS >= kS4Stages ? ph ^ 1u : ph);
            load_step(ra[1 - P], wrow_of(sn), 0);
          }
        }
      }
      wgmma_wait<0>();
      pin_acc(acc);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(prev_s));
    }
    if constexpr (KS > 1) {
      // Exact int32 reduction of the k-split partial sums, in consumer order, by consumer 0 (kc == 0,
      // which always has k-tiles). Named barrier 1 over the consumer threads only.
      const uint32_t slot_of = uint32_t(cw * 128 + t) * 4u;
      if (kc > 0 && my_tiles > 0) {
#pragma unroll
        for (int r = 0; r < C::kAcc; ++r)
          asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(scratch + uint32_t(((kc - 1) * C::kAcc + r) * 128 * CW) * 4u +
                                                               slot_of),
                       "r"(acc[r])
                       : "memory");
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::kConsumerThreads) : "memory");
      if (kc == 0) {
        for (int q = 1; q < KS && q < k_tiles; ++q) {
#pragma unroll
          for (int r = 0; r < C::kAcc; ++r) {
            int32_t v;
            asm volatile("ld.shared.u32 %0, [%1];\n"
                         : "=r"(v)
                         : "r"(scratch + uint32_t(((q - 1) * C::kAcc + r) * 128 * CW) * 4u + slot_of)
                         : "memory");
            acc[r] += v;
          }
        }
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::kConsumerThreads) : "memory");  // scratch free again
      if (kc != 0) continue;
    }

    // Epilogue: acc[4j + 2h + e] is out[m0 + 8j + 2tq + e][n0 + 64cw + 16warp + g + 8h].
    const int64_t n_lane = int64_t(n0) + 64 * cw + 16 * warp + g;
    const int64_t m_lane = int64_t(m0) + 2 * tq;
    if constexpr (sizeof(OutT) == 2) {
      // Lanes g and g ^ 1 swap one value: the even lane keeps row m (columns n, n + 1), the odd one row
      // m + 1 (columns n - 1, n). One 4-byte store per lane and pair of outputs.
      const bool odd = (g & 1) != 0;
      const bool pairs_ok = (ldo % 2 == 0) && (reinterpret_cast<uintptr_t>(out) % 4 == 0);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t n_pair = n_lane + 8 * h - (odd ? 1 : 0);  // even
#pragma unroll
        for (int j = 0; j < BM / 8; ++j) {
          const float v0 = dequant(acc[4 * j + 2 * h], a_scale);
          const float v1 = dequant(acc[4 * j + 2 * h + 1], a_scale);
          const float recv = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
          const int64_t m = m_lane + 8 * j + (odd ? 1 : 0);
          if (m >= M) continue;
          const float lo = odd ? recv : v0, hi = odd ? v1 : recv;  // columns n_pair, n_pair + 1
          OutT* const p = out + m * ldo + n_pair;
          if (pairs_ok && n_pair + 1 < N) {
            store2(p, lo, hi);
          } else {
            if (n_pair < N) store1(p, lo);
            if (n_pair + 1 < N) store1(p + 1, hi);
          }
        }
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t n = n_lane + 8 * h;
        if (n >= N) continue;
#pragma unroll
        for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t m = m_lane + 8 * j + e;
            if (m < M) store1(out + m * ldo + n, dequant(acc[4 * j + 2 * h + e], a_scale));
          }
        }
      }
    }
  }
#else
  __trap();  // never launched: the host checks that the sm_90a code was loaded
#endif
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// Per device: usable (cc 9.0, sm_90a code loaded, 227 KB of shared memory granted) or not.
bool device_ready(int device) {
  static std::atomic<int> state[64];  // 0 unknown, 1 ready, 2 not
  if (device < 0 || device >= 64) return false;
  const int st = state[device].load(std::memory_order_acquire);
  if (st != 0) return st == 1;
  bool ok = encode_fn() != nullptr;
  cudaDeviceProp prop{};
  ok = ok && cudaGetDeviceProperties(&prop, device) == cudaSuccess && prop.major == 9 && prop.minor == 0 &&
       prop.sharedMemPerBlockOptin >= size_t(kSmemBytes);
  auto prepare = [&](auto kernel) {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 &&
           attr.binaryVersion == 90 &&
           cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes) == cudaSuccess;
  };
  ok = ok && prepare(gemm_s8_sm90_kernel<float>) && prepare(gemm_s8_sm90_kernel<__half>) &&
       prepare(gemm_s8_sm90_kernel<__nv_bfloat16>);
  cudaGetLastError();
  state[device].store(ok ? 1 : 2, std::memory_order_release);
  return ok;
}

// The int4-weight kernels: ready on this device (cc 9.0, sm_90a code, their shared memory granted) or not.
bool s4_device_ready(int device) {
  static std::atomic<int> state[64];  // 0 unknown, 1 ready, 2 not
  if (device < 0 || device >= 64) return false;
  const int st = state[device].load(std::memory_order_acquire);
  if (st != 0) return st == 1;
  bool ok = device_ready(device);  // cc 9.0, 227 KB of shared memory, the tensor-map encoder
  auto prepare = [&](auto kernel, int smem) {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 &&
           attr.binaryVersion == 90 &&
           cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess;
  };
  auto prepare_types = [&](auto cfg, auto w4) {
    using C = decltype(cfg);
    constexpr bool W4 = decltype(w4)::value;
    return prepare(gemm_s8s4_sm90_kernel<float, C::kBM, C::kCW, C::kKS, W4>, C::kSmemBytes) &&
           prepare(gemm_s8s4_sm90_kernel<__half, C::kBM, C::kCW, C::kKS, W4>, C::kSmemBytes) &&
           prepare(gemm_s8s4_sm90_kernel<__nv_bfloat16, C::kBM, C::kCW, C::kKS, W4>, C::kSmemBytes);
  };
  using S4 = std::true_type;
  using S8 = std::false_type;
  ok = ok && prepare_types(S4Cfg<256, 2, 1>{}, S4{}) && prepare_types(S4Cfg<256, 1, 1>{}, S4{}) &&
       prepare_types(S4Cfg<64, 1, 3>{}, S4{}) && prepare_types(S4Cfg<16, 1, 6>{}, S4{}) &&
       prepare_types(S4Cfg<64, 1, 3, false>{}, S8{}) && prepare_types(S4Cfg<16, 1, 6, false>{}, S8{}) &&
       prepare_types(S4Cfg<256, 1, 1, false>{}, S8{});
  cudaGetLastError();
  state[device].store(ok ? 1 : 2, std::memory_order_release);
  return ok;
}

// One register-weight call on tile shape (BM, CW, KS): tensor maps, persistent grid, launch. W4: Bp holds
// int4 pairs (row stride ldbp bytes); else int8 weights (N, K).
template <int BM, int CW, int KS, bool W4 = true>
Status launch_s4(const char* fn, const int8_t* A, int64_t lda, const int8_t* Bp, int64_t ldbp, int64_t M, int64_t N,
                 int64_t K, const float* alpha, DType otype, void* out, int64_t ldo, cudaStream_t stream, int sms) {
  using C = S4Cfg<BM, CW, KS, W4>;
  CUtensorMap mx, mw;
  const bool w_ok = W4 ? make_map(&mw, Bp, (K + 1) / 2, N, ldbp, 0, 1, C::kRowsW, kBK / 2, CU_TENSOR_MAP_SWIZZLE_NONE)
                       : make_map(&mw, Bp, K, N, ldbp, 0, 1, C::kRowsW);
  if (!make_map(&mx, A, K, M, lda, 0, 1, BM) || !w_ok)
    return Status::device(validate::err(fn, "cuTensorMapEncodeTiled rejected the operands (lda=" +
                                                std::to_string(lda) + ", ldbp=" + std::to_string(ldbp) + ")"));
  const int64_t tiles_m = (M + BM - 1) / BM, tiles_n = (N + C::kRowsW - 1) / C::kRowsW;
  const int64_t work = tiles_m * tiles_n;
  const unsigned grid = static_cast<unsigned>(work < sms ? work : sms);
  const int k = static_cast<int>(K);
  switch (otype) {
    case DType::kFloat32:
      gemm_s8s4_sm90_kernel<float, BM, CW, KS, W4><<<grid, C::kThreads, C::kSmemBytes, stream>>>(
          mx, mw, M, N, k, alpha, static_cast<float*>(out), ldo, tiles_m, tiles_n);
      break;
    case DType::kFloat16:
      gemm_s8s4_sm90_kernel<__half, BM, CW, KS, W4><<<grid, C::kThreads, C::kSmemBytes, stream>>>(
          mx, mw, M, N, k, alpha, static_cast<__half*>(out), ldo, tiles_m, tiles_n);
      break;
    case DType::kBFloat16:
      gemm_s8s4_sm90_kernel<__nv_bfloat16, BM, CW, KS, W4><<<grid, C::kThreads, C::kSmemBytes, stream>>>(
          mx, mw, M, N, k, alpha, static_cast<__nv_bfloat16*>(out), ldo, tiles_m, tiles_n);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return Status::device(validate::err(fn, std::string("kernel launch failed: ") + cudaGetErrorString(err)));
  return Status::ok();
}

template <typename OutT>
Status launch_typed(const GemmCall& g, const CUtensorMap& ma, const CUtensorMap& mb, int sms) {
  const int64_t tiles_m = (g.M + kBM - 1) / kBM;
  const int64_t tiles_n = (g.N + kBN - 1) / kBN;
  const int64_t work = g.batch * tiles_m * tiles_n;  // fits: batch < 2^31, tiles < 2^31 (checked by run())
  // Persistent: one CTA per SM (the kernel's shared memory and registers allow one), each looping over
  // work items; a grid of fewer items than SMs is just that many CTAs.
  const unsigned grid = static_cast<unsigned>(work < sms ? work : sms);
  gemm_s8_sm90_kernel<OutT><<<grid, kThreads, kSmemBytes, g.stream>>>(
      ma, mb, g.batch > 1 && g.strideA != 0, g.batch > 1 && g.strideB != 0, g.M, g.N, static_cast<int>(g.K), g.alpha,
      static_cast<OutT*>(g.out), g.ldo, g.strideO, tiles_m, tiles_n, work, g.row_scale);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return Status::device(std::string(g.fn) + ": sm_90a gemm kernel launch failed: " + cudaGetErrorString(err));
  return Status::ok();
}

}  // namespace

bool few_rows_eligible(const GemmCall& g) {
  if (g.batch != 1 || g.row_scale != nullptr || g.M > kFewRowsMax || !sm90_eligible(g)) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (!s4_device_ready(device)) return false;
  // Past 64 rows only while launch_sm90's 128 x 256 tiles would leave SMs idle (its 256-row register tile
  // has twice as many CTAs per weight column block).
  return g.M <= 64 || ((g.M + kBM - 1) / kBM) * ((g.N + kBN - 1) / kBN) < device_sms(device);
}

Status launch_sm90_few_rows(const GemmCall& g) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    device = -1;
  }
  const int sms = device_sms(device);
  if (g.M <= 16)
    return launch_s4<16, 1, 6, false>(g.fn, g.A, g.lda, g.B, g.ldb, g.M, g.N, g.K, g.alpha, g.otype, g.out, g.ldo,
                                      g.stream, sms);
  // 64-row activation tiles (3-way k-split) up to 192 rows, and up to 256 while they stay within two waves;
  // beyond, the 256-row tile (each weight tile read once). H100, linear_s8 bf16, us (64-row / 256-row):
  // 4096^2 M = 128 16.9 / 20.0, M = 256 17.1 / 20.1; 8192^2 M = 128 37.7 / 57.4, M = 192 49.8 / 50.4,
  // M = 256 63.0 / 38.4; 4096 x 11008 M = 192 38.7 / 46.7, M = 256 53.4 / 40.9.
  const int64_t tiles64 = ((g.M + 63) / 64) * ((g.N + 63) / 64);
  if (g.M <= 192 || tiles64 <= 2 * int64_t(sms))
    return launch_s4<64, 1, 3, false>(g.fn, g.A, g.lda, g.B, g.ldb, g.M, g.N, g.K, g.alpha, g.otype, g.out, g.ldo,
                                      g.stream, sms);
  return launch_s4<256, 1, 1, false>(g.fn, g.A, g.lda, g.B, g.ldb, g.M, g.N, g.K, g.alpha, g.otype, g.out, g.ldo,
                                     g.stream, sms);
}

bool sm90_eligible(const GemmCall& g) {
  if (g.K < 1 || g.M < 1 || g.N < 1 || g.batch < 1) return false;
  // TMA coordinates are int32; batches index a 32-bit coordinate too.
  if (g.M >= (int64_t(1) << 31) || g.N >= (int64_t(1) << 31) || g.batch >= (int64_t(1) << 31)) return false;
  if (!tma_ok(g.A, g.lda, g.strideA, g.batch) || !tma_ok(g.B, g.ldb, g.strideB, g.batch)) return false;
  if ((g.lda >> 40) != 0 || (g.ldb >> 40) != 0 || (g.strideA >> 40) != 0 || (g.strideB >> 40) != 0) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return device_ready(device);
}

Status launch_sm90(const GemmCall& g) {
  CUtensorMap ma, mb;
  if (!make_map(&ma, g.A, g.K, g.M, g.lda, g.strideA, g.batch, kBM) ||
      !make_map(&mb, g.B, g.K, g.N, g.ldb, g.strideB, g.batch, kBN))
    return Status::device(std::string(g.fn) + ": cuTensorMapEncodeTiled rejected the operands (lda=" +
                          std::to_string(g.lda) + ", ldb=" + std::to_string(g.ldb) + ")");
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    device = -1;
  }
  const int sms = device_sms(device);
  switch (g.otype) {
    case DType::kFloat32: return launch_typed<float>(g, ma, mb, sms);
    case DType::kFloat16: return launch_typed<__half>(g, ma, mb, sms);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(g, ma, mb, sms);
  }
  return Status::invalid(std::string(g.fn) + ": unreachable otype");
}

}  // namespace gemm_s8_detail

// ---------------------------------------------------------------------------------------------------
// int4-weight entry points (gemm_s8.h).

bool gemm_s8s4_fused_supported(const int8_t* A, int64_t lda, const int8_t* Bp, int64_t ldbp, int64_t M, int64_t N,
                               int64_t K) {
  using namespace gemm_s8_detail;
  const char* choice = std::getenv("LOWBIT_GEMM_S8_KERNEL");
  if (choice != nullptr && std::string(choice) == "mma") return false;
  if (K < 1 || K > kMaxGemmS8K || M < 1 || N < 1) return false;
  if (M >= (int64_t(1) << 31) || N >= (int64_t(1) << 31)) return false;
  if (lda < K || ldbp < (K + 1) / 2) return false;
  if (!tma_ok(A, lda, 0, 1) || !tma_ok(Bp, ldbp, 0, 1)) return false;
  if ((lda >> 40) != 0 || (ldbp >> 40) != 0) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return s4_device_ready(device);
}

Status gemm_s8s4_scaled(const int8_t* A, int64_t lda, const int8_t* Bp, int64_t ldbp, int64_t M, int64_t N,
                        int64_t K, const float* alpha, DType otype, void* out, int64_t ldo, CUstream_st* stream) {
  using namespace gemm_s8_detail;
  const char* fn = "lowbit::cuda::gemm_s8s4_scaled";
  Status st = validate::gemm_otype(fn, otype);
  // gemm_shape's rules on M, N, K and lda (its ldb rule is for int8 rows: ldb stands in as K here).
  if (st.is_ok()) st = validate::gemm_shape(fn, lda, K, M, N, K);
  if (st.is_ok()) st = validate::gemm_ld(fn, "ldbp", ldbp, N, (K + 1) / 2, "ceil(K/2)");
  if (st.is_ok()) st = validate::gemm_ld(fn, "ldo", ldo, M, N, "N");
  if (!st.is_ok()) return st;
  if (M == 0 || N == 0) return Status::ok();
  if (A == nullptr || Bp == nullptr || alpha == nullptr || out == nullptr)
    return Status::invalid(validate::err(fn, "A, Bp, alpha and out must not be null"));
  if (!gemm_s8s4_fused_supported(A, lda, Bp, ldbp, M, N, K))
    return Status::invalid(validate::err(
        fn, "this call cannot run on the int4-weight kernel (needs a compute capability 9.0 device with the sm_90a "
            "build, 1 <= K, 16-byte aligned A and Bp with lda and ldbp multiples of 16); unpack_s4 + "
            "gemm_s8_scaled gives the same result"));
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    device = -1;
  }
  const int sms = device_sms(device);
  const cudaStream_t cs = reinterpret_cast<cudaStream_t>(stream);
  // The tile: as narrow in activation rows as M allows (the wgmma's N), and one consumer warpgroup (64
  // weight rows per tile, twice the tiles) when two would leave SMs idle.
  if (M <= 16) return launch_s4<16, 1, 6>(fn, A, lda, Bp, ldbp, M, N, K, alpha, otype, out, ldo, cs, sms);
  if (M <= 64) return launch_s4<64, 1, 3>(fn, A, lda, Bp, ldbp, M, N, K, alpha, otype, out, ldo, cs, sms);
  if (((M + 255) / 256) * ((N + 127) / 128) < sms)
    return launch_s4<256, 1, 1>(fn, A, lda, Bp, ldbp, M, N, K, alpha, otype, out, ldo, cs, sms);
  return launch_s4<256, 2, 1>(fn, A, lda, Bp, ldbp, M, N, K, alpha, otype, out, ldo, cs, sms);
}

}  // namespace cuda
}  // namespace lowbit

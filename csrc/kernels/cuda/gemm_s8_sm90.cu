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
#include <mutex>
#include <string>

#include "gemm_s8_internal.cuh"
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
#endif

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
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int k, int row,
                                         int batch) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(k), "r"(row), "r"(batch)
      : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across a wgmma fence / wait.
__device__ __forceinline__ void pin(int32_t (&d)[kAcc]) {
#pragma unroll
  for (int i = 0; i < kAcc; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// d += A (64 x 32, from descriptor da) * B^T (256 x 32, from db); scale-d = 1 (accumulate).
__device__ __forceinline__ void wgmma_s8_n256(int32_t (&d)[kAcc], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p;\n}\n"
      :
        "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
        "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
        "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
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
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + (kAlignSlack - 1)) & ~uint32_t(kAlignSlack - 1);
  const uint32_t bars = base + kStages * kStageBytes;
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (kStages + s); };

  // Work item w (a persistent CTA takes w = blockIdx.x, + gridDim.x, ...): batch w / tiles_per_batch, and
  // in it the grouped raster (kGroupM tile-rows per group) of pid = w % tiles_per_batch. Items run in
  // increasing w across the grid, so the CTAs resident together cover neighbouring tiles (L2 reuse).
  const int64_t tiles_per_batch = tiles_m * tiles_n;
  auto locate = [&](int64_t w, int* batch, int* m0, int* n0) {
    const int64_t b = w / tiles_per_batch, pid = w - b * tiles_per_batch;
    const int64_t group_tiles = int64_t(kGroupM) * tiles_n;
    const int64_t first_m = (pid / group_tiles) * kGroupM;
    const int64_t rows_here = (tiles_m - first_m) < kGroupM ? (tiles_m - first_m) : kGroupM;
    const int64_t in_group = pid % group_tiles;
    *batch = static_cast<int>(b);
    *m0 = static_cast<int>((first_m + in_group % rows_here) * kBM);
    *n0 = static_cast<int>((in_group / rows_here) * kBN);
  };
  const int k_tiles = (K + kBK - 1) / kBK;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 4 * kConsumers);
    }
    // Make the initialised barriers visible to the async proxy (the TMA unit completes on them).
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
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
// Host side.

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

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

bool tma_ok(const int8_t* p, int64_t ld, int64_t stride, int64_t batch) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 16 == 0 && (batch == 1 || stride % 16 == 0);
}

// 3-D tensor map (K, rows, batches) of an int8 operand; box 128 K-bytes x box_rows x 1, 128B swizzle,
// zero fill out of bounds. A broadcast operand (or a single batch) gets one batch.
bool make_map(CUtensorMap* map, const int8_t* p, int64_t K, int64_t rows, int64_t ld, int64_t stride,
              int64_t batch, int box_rows) {
  const bool batched = batch > 1 && stride != 0;
  const cuuint64_t dims[3] = {cuuint64_t(K), cuuint64_t(rows), cuuint64_t(batched ? batch : 1)};
  const cuuint64_t strides[2] = {cuuint64_t(ld), cuuint64_t(batched ? stride : ld * rows)};
  const cuuint32_t box[3] = {cuuint32_t(kBK), cuuint32_t(box_rows), 1u};
  const cuuint32_t elem[3] = {1u, 1u, 1u};
  const CUresult r = encode_fn()(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<int8_t*>(p), dims, strides, box,
                                 elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
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

// SM count of the current device, cached per device.
int device_sms(int device) {
  static std::atomic<int> sms[64];
  if (device < 0 || device >= 64) return 132;
  int v = sms[device].load(std::memory_order_acquire);
  if (v > 0) return v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v < 1) {
    cudaGetLastError();
    v = 132;
  }
  sms[device].store(v, std::memory_order_release);
  return v;
}

}  // namespace

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
}  // namespace cuda
}  // namespace lowbit

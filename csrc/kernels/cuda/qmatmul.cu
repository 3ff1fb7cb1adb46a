// Quantize-on-load batched matmul for a short reduction (lowbit/kernels/qmatmul.h): Q4MatMul's attention
// scores, out = alpha * (Q(x) . Q(y)^T), with both operands quantized inside the GEMM.
//
// Why: at attention-score shapes (K = 64 .. 128, out (M, N) per batch and head) the GEMM is bound by the
// stores of its output, and the separate quantizer passes (read x and y, write their codes, read the codes
// again) added a third to the time (H100, 32 x 12 x 1024 x 1024 x 128 bf16: 2 x 55 us of quantizers +
// 349 us of GEMM, against torch.matmul's 370 us). Here the float operands are read once, quantized into
// shared memory and multiplied from there.
//
// Shape of the computation
// ------------------------
//   * One CTA (16 warps, one per SM) per (batch, group of y rows): it quantizes its group of y into shared
//     memory once (up to ~1150 rows at K = 128: a whole attention head's keys), then walks x in blocks of
//     256 rows: quantize the block into shared memory, multiply it by the group 128 rows at a time, store
//     each 256 x 128 block of out. Every element of x and y is quantized once per group (once in all when
//     N fits one group), and read once from DRAM / L2.
//   * Between the barriers around an x block the warps only read shared memory, so they drift apart over
//     the group's chunks and one warp's stores overlap another's mma.
//   * K <= kQMatmulMaxK (256): code rows are padded to Kp = K rounded up to 32 with zero codes (which add
//     nothing) and laid Kp + 16 bytes apart: 8 consecutive rows start in 8 different 16-byte bank groups,
//     so the ldmatrix reads (one 16-byte chunk from each of 8 rows) are conflict-free and the quantizer's
//     8-byte code stores fill whole wavefronts.
//   * The multiply is gemm_s8.cu's: warps in a 4 (M) x 4 (N) grid, each a 64 x 32 block of out as 4 x 4
//     mma.sync m16n8k32 s8 tiles fed by ldmatrix.x4 (same fragment addressing).
//   * Quantization is quantize_s8's arithmetic (quantize_internal.cuh): the same codes, bit for bit, with
//     the rounding done by code_byte (no float -> int conversion, a quarter-rate instruction). The vector
//     path (K % 8 == 0, 16-byte aligned rows) has 2 vectors of 8 elements per thread in flight before it
//     converts them; anything else takes one element per step.
//   * Epilogue: gemm_s8's rounding (int32 -> fp32 exactly, one multiply by alpha, -> dtype), the int32 ->
//     fp32 step as dequant_small (|acc| <= 2^22 here); 16-bit outputs regrouped across each lane quad into
//     16-byte row stores (whole sectors), fp32 in pairs.
//   * The codes can also be written out (qy by each CTA for its group, qx by the CTAs of the first
//     group), for a backward pass that needs them.
//   * The steps and alpha are formed in the kernel from the three scalars (qat_step, qat_alpha_value),
//     read in their own dtype: no separate conversion or alpha kernel.
#include "lowbit/kernels/qmatmul.h"

#ifdef __USE_FAST_MATH__
#error "qmatmul.cu must not be built with --use_fast_math: codes and epilogue must round exactly as the CPU does"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <string>

#include "../validate.h"
#include "gemm_s8_internal.cuh"
#include "quantize_internal.cuh"
#include "wgmma_internal.cuh"

namespace lowbit {
namespace cuda {
namespace {

using gemm_s8_detail::dequant_small;
using gemm_s8_detail::mma_block_s8;
using gemm_s8_detail::pack2;
using gemm_s8_detail::quad_transpose;
using gemm_s8_detail::store1;
using gemm_s8_detail::store2;
using gemm_s8_detail::store8_16;
using quantize_detail::code_byte;
using quantize_detail::kVec;
using quantize_detail::pack_codes;
using quantize_detail::Raw8;
using quantize_detail::raw8;
using quantize_detail::StepDiv;
using quantize_detail::widen;
using quantize_detail::widen8;

constexpr int kBM = 256;  // rows of x per block step
constexpr int kBN = 128;  // rows of y per multiply step
constexpr int kWarpsM = 4, kWarpsN = 4;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;  // 512
constexpr int kWM = kBM / kWarpsM;                // 64 rows of out per warp
constexpr int kWN = kBN / kWarpsN;                // 32 columns of out per warp
constexpr int kFragsM = kWM / 16, kFragsN = kWN / 8;
// Vectors of 8 elements per thread loaded before the first is converted (16 / 32 registers of raw data).
template <typename T>
constexpr int kRound = sizeof(T) == 4 ? 2 : 4;
constexpr int kSmemBudget = 200 * 1024;           // y group + x block, bytes (one CTA per SM)
constexpr int kSmemMax = 227 * 1024;
constexpr bool kStreamOut = true;  // outputs leave with the evict-first hint (nothing here reads them back)

__host__ __device__ constexpr int padded_k(int K) { return (K + 31) & ~31; }
__host__ __device__ constexpr int row_bytes(int K) { return padded_k(K) + 16; }
// Rows of y one CTA keeps (a multiple of kBN): as many as fit beside an x block, at most N rounded up.
// Rows per group when at most `cap` (a multiple of kBN) fit: the fewest groups, of equal size in chunks.
constexpr int64_t balanced_group(int64_t N, int64_t cap) {
  const int64_t chunks = (N + kBN - 1) / kBN, per = cap / kBN;
  const int64_t groups = (chunks + per - 1) / per;
  return (chunks + groups - 1) / groups * kBN;
}
constexpr int64_t group_rows(int64_t N, int K) {
  return balanced_group(N, (int64_t(kSmemBudget) / row_bytes(K) - kBM) / kBN * kBN);
}
constexpr int smem_bytes(int64_t ng, int K) { return static_cast<int>((ng + kBM) * row_bytes(K)); }
static_assert((kSmemBudget / row_bytes(256) - kBM) >= kBN, "one y chunk must fit beside an x block at the largest K");

__device__ __forceinline__ float load_scalar(const void* p, DType t) {
  switch (t) {
    case DType::kFloat16: return __half2float(*static_cast<const __half*>(p));
    case DType::kBFloat16: return __bfloat162float(*static_cast<const __nv_bfloat16*>(p));
    default: return *static_cast<const float*>(p);
  }
}

// The quantizer steps, GEMM scale and clamp bounds of a launch, from its three scalars (read in their own
// dtype: no conversion kernels): quantize_s8's qat_step and qat_alpha's value.
struct CtaScalars {
  StepDiv div_x, div_y;
  float alpha, fqmin, fqmax;
};
__device__ __forceinline__ CtaScalars cta_scalars(DType sdt, const void* x_scale, const void* y_scale,
                                                  const void* eps, int qmin, int qmax) {
  const float e = load_scalar(eps, sdt), sx = load_scalar(x_scale, sdt), sy = load_scalar(y_scale, sdt);
  return {StepDiv(lowbit::qat_step(sx, e)), StepDiv(lowbit::qat_step(sy, e)), lowbit::qat_alpha_value(sx, sy, e),
          static_cast<float>(qmin), static_cast<float>(qmax)};
}

// Where code (r, c) of a shared tile lives, as a byte offset from the tile's base.
// Padded rows (the mma.sync kernel): rows rs bytes apart (rs = Kp + 16: conflict-free ldmatrix).
struct PaddedRows {
  int rs;
  __device__ __forceinline__ int at(int r, int c) const { return r * rs + c; }
};
// Codes of `rows` rows x K of src (row stride ld elements) into a `height` x Kp shared tile laid out as
// `lay` says, zeros in the rows and columns past them; also into q (rows of K codes, contiguous) when q is
// not null. Every thread of the CTA calls it.
template <typename T, bool kVecPath, bool kFast, typename Layout>
__device__ __forceinline__ void fill_tile(const T* __restrict__ src, int64_t ld, int rows, int height, int K, int Kp,
                                          const Layout& lay, const StepDiv& div, float fqmin, float fqmax,
                                          uint8_t* tile, int8_t* __restrict__ q) {
  if constexpr (kVecPath) {
    const int vpr = Kp / kVec;  // vectors per tile row, padding included
    const int total = height * vpr;
    for (int base = 0; base < total; base += int(blockDim.x) * kRound<T>) {
      Raw8<T> raw[kRound<T>];
      bool ok[kRound<T>];
#pragma unroll
      for (int u = 0; u < kRound<T>; ++u) {
        const int v = base + u * int(blockDim.x) + static_cast<int>(threadIdx.x);
        const int r = v / vpr, c = (v - r * vpr) * kVec;
        ok[u] = v < total && r < rows && c < K;  // K % 8 == 0 on this path: the whole vector is in
        if (ok[u]) raw[u] = raw8(src + r * ld + c);
      }
#pragma unroll
      for (int u = 0; u < kRound<T>; ++u) {
        const int v = base + u * int(blockDim.x) + static_cast<int>(threadIdx.x);
        if (v >= total) break;
        const int r = v / vpr, c = (v - r * vpr) * kVec;
        uint2 packed = make_uint2(0u, 0u);
        if (ok[u]) {
          float f[kVec];
          widen8(raw[u], f);
          uint32_t b[kVec];
#pragma unroll
          for (int j = 0; j < kVec; ++j) b[j] = code_byte(div.apply<kFast>(f[j]), fqmin, fqmax);
          packed = make_uint2(pack_codes(b[0], b[1], b[2], b[3]), pack_codes(b[4], b[5], b[6], b[7]));
          if (q != nullptr) *reinterpret_cast<uint2*>(q + int64_t(r) * K + c) = packed;
        }
        *reinterpret_cast<uint2*>(tile + lay.at(r, c)) = packed;  // 8 bytes inside one 16-byte chunk
      }
    }
  } else {
    for (int e = threadIdx.x; e < height * Kp; e += blockDim.x) {
      const int r = e / Kp, c = e - r * Kp;
      uint32_t code = 0;
      if (r < rows && c < K) {
        code = code_byte(div.apply<kFast>(widen(src[r * ld + c])), fqmin, fqmax) & 0xFFu;
        if (q != nullptr) q[int64_t(r) * K + c] = static_cast<int8_t>(code);
      }
      tile[lay.at(r, c)] = static_cast<uint8_t>(code);
    }
  }
}

template <typename T, bool kVecPath, typename Layout>
__device__ __forceinline__ void fill(const T* src, int64_t ld, int rows, int height, int K, int Kp, const Layout& lay,
                                     const StepDiv& div, float fqmin, float fqmax, uint8_t* tile, int8_t* q) {
  if (div.fast)
    fill_tile<T, kVecPath, true>(src, ld, rows, height, K, Kp, lay, div, fqmin, fqmax, tile, q);
  else
    fill_tile<T, kVecPath, false>(src, ld, rows, height, K, Kp, lay, div, fqmin, fqmax, tile, q);
}

// The epilogue of one accumulator block in the m16n8 fragment layout (mma.sync, and wgmma per 8 columns):
// acc[j][0..1] at (row g, columns 8j + 2t, + 1), acc[j][2..3] at row g + 8, j = 0..kJ-1, g = lane / 4,
// t = lane % 4; `row` is row g's index, col0 column 0's. gemm_s8's rounding; |acc| <= 2^22 here, so
// dequant_small is exact. 16-bit outputs are regrouped across each lane quad (4 j at a time) into 16-byte
// row stores (whole sectors), fp32 leaves in pairs. Every lane of the warp must call it.
template <typename T, int kJ>
__device__ __forceinline__ void store_block(const int32_t (&acc)[kJ][4], int64_t row, int64_t col0, int64_t M,
                                            int64_t N, float alpha, T* out_b, int64_t ldo, bool vec_ok, bool pairs_ok,
                                            int t) {
  static_assert(kJ % 4 == 0, "the quad transpose takes 4 column groups at a time");
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = row + 8 * h;
    const bool row_ok = r < M;  // quad-uniform; the shuffles below still run on every lane
    T* const out_row = out_b + (row_ok ? r : 0) * ldo;
    if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int q = 0; q < kJ / 4; ++q) {
        uint32_t w[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
          w[u] = pack2(static_cast<T*>(nullptr), dequant_small(acc[4 * q + u][2 * h], alpha),
                       dequant_small(acc[4 * q + u][2 * h + 1], alpha));
        quad_transpose(w, t);
        if (row_ok) store8_16<kStreamOut>(reinterpret_cast<uint16_t*>(out_row), col0 + 32 * q + 8 * t, N, vec_ok, w);
      }
    } else {
      if (!row_ok) continue;
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        const int64_t col = col0 + j * 8 + 2 * t;
        const float v0 = dequant_small(acc[j][2 * h], alpha), v1 = dequant_small(acc[j][2 * h + 1], alpha);
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

// One CTA per (batch, group of up to `ng` rows of y).
template <typename T, bool kVecPath>
__global__ void __launch_bounds__(kThreads, 1) qmatmul_kernel(
    const T* __restrict__ x, int64_t ldx, int64_t strideX,  // (M, K) per batch
    const T* __restrict__ y, int64_t ldy, int64_t strideY,  // (N, K) per batch
    int64_t M, int64_t N, int K,
    int ng, int64_t groups,                                 // rows of y per CTA (multiple of kBN), groups per batch
    DType sdt, const void* x_scale, const void* y_scale, const void* eps,
    int qmin, int qmax,
    T* __restrict__ out, int64_t ldo, int64_t strideO,      // (M, N) per batch
    int8_t* __restrict__ qx, int8_t* __restrict__ qy) {     // (batch, M, K) / (batch, N, K) codes or null
  extern __shared__ __align__(16) uint8_t smem[];
  const int Kp = padded_k(K), rs = row_bytes(K);
  uint8_t* const y_tile = smem;             // ng rows
  uint8_t* const x_tile = smem + ng * rs;   // kBM rows
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;

  const int64_t b = blockIdx.x / groups;
  const int64_t n_first = (blockIdx.x - b * groups) * ng;
  const CtaScalars sc = cta_scalars(sdt, x_scale, y_scale, eps, qmin, qmax);
  const StepDiv &div_x = sc.div_x, &div_y = sc.div_y;
  const float alpha = sc.alpha, fqmin = sc.fqmin, fqmax = sc.fqmax;

  // The CTA's rows of y, quantized once; each (batch, group) is one CTA's, so its codes are written once.
  const int rows_y = static_cast<int>(N - n_first < ng ? N - n_first : ng);
  fill<T, kVecPath>(y + b * strideY + n_first * ldy, ldy, rows_y, ng, K, Kp, PaddedRows{rs}, div_y, fqmin, fqmax, y_tile,
                    qy != nullptr ? qy + (b * N + n_first) * K : nullptr);
  int8_t* const qx_b = (qx != nullptr && n_first == 0) ? qx + b * M * K : nullptr;

  // Fragment addressing (gemm_s8.cu): lanes 8j .. 8j+7 name the 8 rows of ldmatrix matrix j.
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t a_addr =
      base + uint32_t(ng * rs + (warp_m * kWM + (lane & 7) + ((lane >> 3) & 1) * 8) * rs + (lane >> 4) * 16);
  const uint32_t b_addr = base + uint32_t((warp_n * kWN + (lane & 7) + (lane >> 4) * 8) * rs + ((lane >> 3) & 1) * 16);

  T* const out_b = out + b * strideO;
  const int g = lane >> 2, t = lane & 3;
  const bool vec_ok = (ldo % 8 == 0) && (reinterpret_cast<uintptr_t>(out_b) % 16 == 0);
  const bool pairs_ok = (ldo % 2 == 0) && (reinterpret_cast<uintptr_t>(out_b) % 8 == 0);

  for (int64_t m0 = 0; m0 < M; m0 += kBM) {
    __syncthreads();  // the y group is complete (first pass); every warp is done with the previous x block
    const int rows_x = static_cast<int>(M - m0 < kBM ? M - m0 : kBM);
    fill<T, kVecPath>(x + b * strideX + m0 * ldx, ldx, rows_x, kBM, K, Kp, PaddedRows{rs}, div_x, fqmin, fqmax, x_tile,
                      qx_b != nullptr ? qx_b + m0 * K : nullptr);
    __syncthreads();

    // Multiply the x block by the group's y chunks; no barrier between chunks (shared memory is read-only
    // here), so the warps drift apart and one's stores overlap another's mma.
    for (int c0 = 0; c0 < rows_y; c0 += kBN) {
      int32_t acc[kFragsM][kFragsN][4];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;
      const uint32_t b_chunk = b_addr + uint32_t(c0 * rs);
      for (int k = 0; k < Kp; k += 32)
        mma_block_s8<kFragsM, kFragsN>(acc, a_addr + uint32_t(k), uint32_t(16 * rs), b_chunk + uint32_t(k),
                                       uint32_t(16 * rs));

      const int64_t col0 = n_first + c0 + warp_n * kWN;
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
        store_block<T, kFragsN>(acc[i], m0 + warp_m * kWM + i * 16 + g, col0, M, N, alpha, out_b, ldo, vec_ok,
                                pairs_ok, t);
    }
  }
}


// ---------------------------------------------------------------------------------------------------
// The sm_90a variant: the same phases, the multiply on wgmma (m64n128k32, both operands from shared memory
// in the 128-byte swizzle), each of the 4 warpgroups owning 64 rows of the 256-row x block. Per 128 x 128
// chunk of y a warpgroup reads its A rows and the chunk once (mma.sync's warps read them per warp), and
// the tensor cores run at wgmma's rate. Built in every pass; only the sm_90a pass has a body.
constexpr int kWgGroups = 4;                 // warpgroups per CTA, 64 rows of the x block each
constexpr int kWgBM = 64 * kWgGroups;         // rows of x per block step
constexpr int kWgThreads = 128 * kWgGroups;   // 512, one CTA per SM
constexpr int kWgSmemMax = 227 * 1024;        // per CTA, one per SM
constexpr int kWgKTile = 128;  // K bytes per swizzled k-tile (one 128-byte line per row)
constexpr int kWgAlign = 1024;  // the swizzle pattern's period: tile bases aligned to it
__host__ __device__ constexpr int wg_ktiles(int K) { return (padded_k(K) + kWgKTile - 1) / kWgKTile; }
constexpr int64_t wg_group_rows(int64_t N, int K) {
  return balanced_group(N, ((int64_t(kWgSmemMax) - kWgAlign) / (int64_t(kWgKTile) * wg_ktiles(K)) - kWgBM) / kBN * kBN);
}
constexpr int wg_smem_bytes(int64_t ng, int K) {
  return static_cast<int>(kWgAlign + (ng + kWgBM) * int64_t(kWgKTile) * wg_ktiles(K));
}
static_assert(((int64_t(kWgSmemMax) - kWgAlign) / (2 * kWgKTile) - kWgBM) >= kBN, "one y chunk must fit beside an x block at the largest K");

#ifdef LOWBIT_SM90A_DEVICE
// wgmma's K-major 128-byte swizzle (the wgmma kernel): 128 K-bytes per row per k-tile, k-tiles of `height`
// rows one after the other; 16-byte chunk j of row r at chunk j ^ (r % 8) of its 128-byte line.
struct Swizzled128 {
  int height;
  __device__ __forceinline__ int at(int r, int c) const {
    const int kt = c >> 7, cc = c & 127;
    return (kt * height + r) * 128 + ((((cc >> 4) ^ (r & 7)) << 4) | (cc & 15));
  }
};

using wgmma_detail::fence_async_shared;
using wgmma_detail::smem_desc;
using wgmma_detail::wgmma_commit;
using wgmma_detail::wgmma_fence;
using wgmma_detail::wgmma_wait;

// d (+)= A (64 x 32, descriptor da) * B^T (128 x 32, descriptor db); scale_d = 0 overwrites d.
__device__ __forceinline__ void wgmma_s8_n128(int32_t (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {" LOWBIT_WG_ACC_STR_64 "}, %64, %65, p;\n}\n"
      : LOWBIT_WG_ACC_OPS_64(d)
      : "l"(da), "l"(db), "r"(scale_d));
}

// prefetch.global.L2 of every 128-byte line of `rows` rows x K elements (row stride ld), spread over the
// CTA's threads. Addresses stay inside each row (the last line's is clamped to the row's last byte).
template <typename T>
__device__ __forceinline__ void prefetch_rows_l2(const T* src, int64_t ld, int64_t rows, int K) {
  const int bytes = K * int(sizeof(T)), lines = (bytes + 127) / 128;
  for (int64_t i = threadIdx.x; i < rows * lines; i += blockDim.x) {
    const int64_t r = i / lines;
    const int l = static_cast<int>(i - r * lines);
    const char* row = reinterpret_cast<const char*>(src + r * ld);
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(row + (l * 128 < bytes ? l * 128 : bytes - 1)));
  }
}
__device__ __forceinline__ void pin64(int32_t (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
#endif

template <typename T, bool kVecPath>
__global__ void __launch_bounds__(kWgThreads, 1) qmatmul_wg_kernel(
    const T* __restrict__ x, int64_t ldx, int64_t strideX, const T* __restrict__ y, int64_t ldy, int64_t strideY,
    int64_t M, int64_t N, int K, int ng, int64_t groups, DType sdt, const void* x_scale, const void* y_scale,
    const void* eps, int qmin, int qmax, T* __restrict__ out, int64_t ldo, int64_t strideO,
    int8_t* __restrict__ qx, int8_t* __restrict__ qy) {
#ifdef LOWBIT_SM90A_DEVICE
  extern __shared__ uint8_t smem_raw[];
  uint8_t* const smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kWgAlign - 1) & ~uintptr_t(kWgAlign - 1));
  const int Kp = padded_k(K), ktiles = wg_ktiles(K);
  uint8_t* const y_tile = smem;                                 // ktiles x ng rows x 128 B
  uint8_t* const x_tile = smem + int64_t(ng) * kWgKTile * ktiles;  // ktiles x kWgBM rows x 128 B
  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, warp_in_wg = (tid >> 5) & 3;

  const int64_t b = blockIdx.x / groups;
  const int64_t n_first = (blockIdx.x - b * groups) * ng;
  const CtaScalars sc = cta_scalars(sdt, x_scale, y_scale, eps, qmin, qmax);
  const StepDiv &div_x = sc.div_x, &div_y = sc.div_y;
  const float alpha = sc.alpha, fqmin = sc.fqmin, fqmax = sc.fqmax;

  const int rows_y = static_cast<int>(N - n_first < ng ? N - n_first : ng);
  fill<T, kVecPath>(y + b * strideY + n_first * ldy, ldy, rows_y, ng, K, Kp, Swizzled128{ng}, div_y, fqmin, fqmax,
                    y_tile, qy != nullptr ? qy + (b * N + n_first) * K : nullptr);
  int8_t* const qx_b = (qx != nullptr && n_first == 0) ? qx + b * M * K : nullptr;

  const uint32_t y_addr = static_cast<uint32_t>(__cvta_generic_to_shared(y_tile));
  const uint32_t x_addr = static_cast<uint32_t>(__cvta_generic_to_shared(x_tile));
  T* const out_b = out + b * strideO;
  const int t = lane & 3;
  const bool vec_ok = (ldo % 8 == 0) && (reinterpret_cast<uintptr_t>(out_b) % 16 == 0);
  const bool pairs_ok = (ldo % 2 == 0) && (reinterpret_cast<uintptr_t>(out_b) % 8 == 0);
  const int ksteps = Kp / 32;

  for (int64_t m0 = 0; m0 < M; m0 += kWgBM) {
    __syncthreads();  // every warpgroup's wgmmas on the previous x block have completed (wait<0> below)
    const int rows_x = static_cast<int>(M - m0 < kWgBM ? M - m0 : kWgBM);
    fill<T, kVecPath>(x + b * strideX + m0 * ldx, ldx, rows_x, kWgBM, K, Kp, Swizzled128{kWgBM}, div_x, fqmin, fqmax,
                      x_tile, qx_b != nullptr ? qx_b + m0 * K : nullptr);
    fence_async_shared();  // the codes were written by the generic proxy; wgmma reads through the async one
    __syncthreads();
    // Ask L2 for the next x block while this one is multiplied: its fill then waits on L2, not DRAM.
    if (m0 + kWgBM < M)
      prefetch_rows_l2(x + b * strideX + (m0 + kWgBM) * ldx, ldx, M - m0 - kWgBM < kWgBM ? M - m0 - kWgBM : kWgBM, K);

    for (int c0 = 0; c0 < rows_y; c0 += kBN) {
      int32_t acc[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) acc[i] = 0;
      pin64(acc);
      wgmma_fence();
      for (int s = 0; s < ksteps; ++s) {
        const int kt = s >> 2, kb = (s & 3) * 32;
        const uint32_t a = x_addr + uint32_t((kt * kWgBM + wg * 64) * kWgKTile + kb);
        const uint32_t bb = y_addr + uint32_t((kt * ng + c0) * kWgKTile + kb);
        wgmma_s8_n128(acc, smem_desc(a), smem_desc(bb), 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      pin64(acc);
      // acc[4j + r]: the m16n8 layout per 8 columns j (row 16 * warp + lane / 4 (+8)).
      store_block<T, 16>(reinterpret_cast<const int32_t(&)[16][4]>(acc), m0 + wg * 64 + warp_in_wg * 16 + (lane >> 2),
                         n_first + c0, M, N, alpha, out_b, ldo, vec_ok, pairs_ok, t);
    }
  }
#else
  __trap();  // never launched: the host checks that the sm_90a code was loaded
#endif
}

// Raise the dynamic shared-memory limit of one instantiation to the largest tile pair, once per device.
template <typename T, bool kVecPath>
Status allow_smem(const char* fn, int device) {
  static std::atomic<bool> done[64];
  if (device >= 0 && device < 64 && done[device].load(std::memory_order_acquire)) return Status::ok();
  const int bytes = kSmemMax;
  const cudaError_t err =
      cudaFuncSetAttribute(qmatmul_kernel<T, kVecPath>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status::device(validate::err(fn, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize=" +
                                                std::to_string(bytes) + ") failed: " + cudaGetErrorString(err)));
  }
  if (device >= 0 && device < 64) done[device].store(true, std::memory_order_release);
  return Status::ok();
}

struct Call {
  const void *x, *y;
  int64_t ldx, strideX, ldy, strideY, M, N, K, batch;
  DType sdt;
  const void *x_scale, *y_scale, *eps;
  int qmin, qmax;
  void* out;
  int64_t ldo, strideO;
  int8_t *qx, *qy;
  cudaStream_t stream;
};

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Per device: the sm_90a kernel can run (cc 9.0, its sm_90a code loaded, 227 KB of shared memory granted).
bool wg_ready(int device) {
  static std::atomic<int> state[64];  // 0 unknown, 1 ready, 2 not
  if (device < 0 || device >= 64) return false;
  const int st = state[device].load(std::memory_order_acquire);
  if (st != 0) return st == 1;
  cudaDeviceProp prop{};
  bool ok = cudaGetDeviceProperties(&prop, device) == cudaSuccess && prop.major == 9 && prop.minor == 0 &&
            prop.sharedMemPerBlockOptin >= size_t(kWgSmemMax);
  auto prepare = [&](auto kernel) {
    cudaFuncAttributes attr{};
    return cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 && attr.binaryVersion == 90 &&
           cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kWgSmemMax) == cudaSuccess;
  };
  ok = ok && prepare(qmatmul_wg_kernel<float, true>) && prepare(qmatmul_wg_kernel<float, false>) &&
       prepare(qmatmul_wg_kernel<__half, true>) && prepare(qmatmul_wg_kernel<__half, false>) &&
       prepare(qmatmul_wg_kernel<__nv_bfloat16, true>) && prepare(qmatmul_wg_kernel<__nv_bfloat16, false>);
  cudaGetLastError();
  state[device].store(ok ? 1 : 2, std::memory_order_release);
  return ok;
}

// LOWBIT_GEMM_S8_KERNEL (the int8 GEMMs' switch, gemm_s8.h): mma forces the mma.sync kernel, wgmma the
// sm_90a one (an error where it cannot run), anything else picks the sm_90a kernel where it can run.
enum class Choice { kAuto, kMma, kWgmma };
Choice kernel_choice() {
  const char* v = std::getenv("LOWBIT_GEMM_S8_KERNEL");
  if (v == nullptr) return Choice::kAuto;
  const std::string s(v);
  return s == "mma" ? Choice::kMma : s == "wgmma" ? Choice::kWgmma : Choice::kAuto;
}

template <typename T, bool kVecPath>
Status launch_as(const char* fn, const Call& c) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return Status::device(validate::err(fn, std::string("cudaGetDevice failed: ") + cudaGetErrorString(err)));
  const int K = static_cast<int>(c.K);
  const Choice choice = kernel_choice();
  const bool wg = choice != Choice::kMma && wg_ready(device);
  if (choice == Choice::kWgmma && !wg)
    return Status::invalid(validate::err(fn, "LOWBIT_GEMM_S8_KERNEL=wgmma, but the sm_90a kernel cannot run here (needs a "
                                             "compute capability 9.0 device and an sm_90a build)"));
  if (wg) {
    const int64_t ng = wg_group_rows(c.N, K), groups = (c.N + ng - 1) / ng;
    qmatmul_wg_kernel<T, kVecPath><<<static_cast<unsigned>(groups * c.batch), kWgThreads, wg_smem_bytes(ng, K), c.stream>>>(
        static_cast<const T*>(c.x), c.ldx, c.strideX, static_cast<const T*>(c.y), c.ldy, c.strideY, c.M, c.N, K,
        static_cast<int>(ng), groups, c.sdt, c.x_scale, c.y_scale, c.eps, c.qmin, c.qmax, static_cast<T*>(c.out),
        c.ldo, c.strideO, c.qx, c.qy);
  } else {
    const Status st = allow_smem<T, kVecPath>(fn, device);
    if (!st.is_ok()) return st;
    const int64_t ng = group_rows(c.N, K), groups = (c.N + ng - 1) / ng;
    qmatmul_kernel<T, kVecPath><<<static_cast<unsigned>(groups * c.batch), kThreads, smem_bytes(ng, K), c.stream>>>(
        static_cast<const T*>(c.x), c.ldx, c.strideX, static_cast<const T*>(c.y), c.ldy, c.strideY, c.M, c.N, K,
        static_cast<int>(ng), groups, c.sdt, c.x_scale, c.y_scale, c.eps, c.qmin, c.qmax, static_cast<T*>(c.out),
        c.ldo, c.strideO, c.qx, c.qy);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(validate::err(fn, std::string("kernel launch failed: ") + cudaGetErrorString(err)));
  return Status::ok();
}

template <typename T>
Status launch(const char* fn, const Call& c) {
  // The vector loader reads 8 elements (16 or 32 bytes) at 16-byte aligned addresses and stores 8 codes at
  // 8-byte aligned ones: every row start of every batch must be aligned, hence the element counts % 8.
  const bool vec = c.K % 8 == 0 && aligned(c.x, 16) && aligned(c.y, 16) && c.ldx % 8 == 0 && c.ldy % 8 == 0 &&
                   (c.batch == 1 || (c.strideX % 8 == 0 && c.strideY % 8 == 0)) &&
                   (c.qx == nullptr || aligned(c.qx, 8)) && (c.qy == nullptr || aligned(c.qy, 8));
  return vec ? launch_as<T, true>(fn, c) : launch_as<T, false>(fn, c);
}

}  // namespace

Status qmatmul_s8(DType dtype, const void* x, int64_t ldx, int64_t strideX, const void* y, int64_t ldy,
                  int64_t strideY, int64_t M, int64_t N, int64_t K, int64_t batch, DType scale_dtype,
                  const void* x_scale, const void* y_scale, const void* eps, int32_t qmin, int32_t qmax, void* out,
                  int64_t ldo, int64_t strideO, int8_t* qx, int8_t* qy, CUstream_st* stream) {
  const char* fn = "lowbit::cuda::qmatmul_s8";
  using validate::invalid_got;
  const int32_t dt = static_cast<int32_t>(dtype), st = static_cast<int32_t>(scale_dtype);
  if (dt < 0 || dt > 2) return invalid_got(fn, "dtype must be float32, float16 or bfloat16", dt);
  if (st < 0 || st > 2) return invalid_got(fn, "scale_dtype must be float32, float16 or bfloat16", st);
  if (K < 1 || K > kQMatmulMaxK)
    return invalid_got(fn, "K must be in [1, kQMatmulMaxK = " + std::to_string(kQMatmulMaxK) + "]", K);
  if (M < 0) return invalid_got(fn, "M must be >= 0", M);
  if (N < 0) return invalid_got(fn, "N must be >= 0", N);
  Status s = validate::gemm_ld(fn, "ldx", ldx, M, K, "K");
  if (s.is_ok()) s = validate::gemm_ld(fn, "ldy", ldy, N, K, "K");
  if (s.is_ok()) s = validate::gemm_ld(fn, "ldo", ldo, M, N, "N");
  if (!s.is_ok()) return s;
  if (strideX < 0) return invalid_got(fn, "strideX must be >= 0", strideX);
  if (strideY < 0) return invalid_got(fn, "strideY must be >= 0", strideY);
  s = validate::gemm_batch(fn, strideX, strideY, M, N, batch, dtype, strideO);  // batch, strideO, overflow
  if (!s.is_ok()) return s;
  if (qmin < -128) return invalid_got(fn, "qmin must be >= -128", qmin);
  if (qmax > 127) return invalid_got(fn, "qmax must be <= 127", qmax);
  if (qmin > qmax)
    return Status::invalid(validate::err(fn, "qmin must be <= qmax, got qmin=" + std::to_string(qmin) +
                                                 " qmax=" + std::to_string(qmax)));
  if (batch == 0 || M == 0 || N == 0) return Status::ok();  // nothing is launched or written, codes included
  if (x == nullptr || y == nullptr || out == nullptr)
    return Status::invalid(validate::err(fn, "x, y and out must not be null"));
  if (x_scale == nullptr || y_scale == nullptr || eps == nullptr)
    return Status::invalid(validate::err(fn, "x_scale, y_scale and eps must not be null"));
  // Grid: batch * groups of y rows; the mma.sync kernel's groups are the smaller, so the larger count.
  const int64_t ng = group_rows(N, static_cast<int>(K)), groups = (N + ng - 1) / ng;
  if (batch > int64_t(std::numeric_limits<int>::max()) / groups)
    return Status::invalid(validate::err(fn, "batch * " + std::to_string(groups) + " groups of y rows = " +
                                                 std::to_string(batch) + " * " + std::to_string(groups) +
                                                 " CTAs exceeds the grid (2^31 - 1)"));
  // Codes are addressed as (b * rows + row) * K: keep it in int64.
  if ((qx != nullptr && batch > std::numeric_limits<int64_t>::max() / M / K) ||
      (qy != nullptr && batch > std::numeric_limits<int64_t>::max() / N / K))
    return Status::invalid(validate::err(fn, "batch * rows * K of the codes overflows int64"));
  const Call c{x, y, ldx, strideX, ldy, strideY, M, N, K, batch, scale_dtype, x_scale, y_scale, eps, qmin, qmax,
               out, ldo, strideO, qx, qy, reinterpret_cast<cudaStream_t>(stream)};
  switch (dtype) {
    case DType::kFloat32: return launch<float>(fn, c);
    case DType::kFloat16: return launch<__half>(fn, c);
    case DType::kBFloat16: return launch<__nv_bfloat16>(fn, c);
  }
  return Status::invalid(validate::err(fn, "unreachable dtype"));
}

}  // namespace cuda
}  // namespace lowbit

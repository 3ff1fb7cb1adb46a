// 16-bit float x int8-code GEMM for Hopper (gemm_f16s8.h): the codes are widened in registers and fed to
// the 16-bit tensor cores as wgmma's register A operand, so no float copy of them exists in memory.
//
// Shape of the computation (trans_g = false: out[i, k] = alpha * sum_r G[i, r] q[r, k])
// -----------------------------------------------------------------------------------------
//   * Orientation out^T = Q^T . G^T: wgmma's A operand (64 rows x 16 r per instruction, registers) is
//     Q^T, rows = output columns k; its B operand (16 r x 256, shared memory, K-major 128B swizzle) is
//     G's rows, the tile of the int8 kernel's B with 2-byte elements. CTA tile: 128 k (two consumer
//     warpgroups of 64) x 256 rows of G; 64 r per stage (one 128-byte line of G per row).
//   * Stage: G tile by TMA (256 rows x 128 bytes, 128B swizzle, 32 KB) and Q tile by TMA (64 r-rows x
//     128 k-bytes, 128B swizzle, 8 KB); 5 stages. Producer warpgroup (one thread issues the copies),
//     two consumer warpgroups; setmaxnreg 40 / 232.
//   * Row order: the A fragment of a 16-bit wgmma gives lane (g, t) of warp w rows 16w + g and 16w + g + 8
//     and r = 2t, 2t + 1, 2t + 8, 2t + 9 of the k16 step. Output columns are assigned to rows so that a
//     lane's two rows are ADJACENT k: row 16w + g + 8h <-> k = 64cw + 16w + 2g + h. One 16-bit shared load
//     of q[r][k .. k + 1] then serves both rows, four loads per step (the 128B swizzle keeps the four
//     r-rows of a warp's load in distinct banks), and the epilogue's two values of a lane for one output
//     row are adjacent in memory: one 4-byte (8-byte for fp32) store.
//   * Widening, exact: bytes XOR 0x80 give u = q + 128 in 0..255. fp16: PRMT u under 0x64 (the half
//     1024 + u), one HSUB2 of 1152 per pair. bf16: PRMT u under 0x4B000000 (the float 2^23 + u), FADD of
//     -(2^23 + 128), and the upper halves of two such floats are the bf16 pair (exact: |q| <= 128 needs 8
//     significant bits).
//   * K-step by k-step with two register sets (as the int4-weight kernel, gemm_s8_sm90.cu): the fragment
//     of step s + 1 is loaded and widened while the wgmma of step s runs; wgmma.wait_group 1 after each
//     issue frees the previous step's registers and, at a stage's first step, the previous stage.
//   * Tails: TMA zero-fills rows past M / R and bytes past R (G) / K (Q), so the tensor cores see zeros;
//     the epilogue stores in-bounds outputs only.
//   * trans_g (out[i, k] = alpha * sum_r G[r, i] q[r, k], the weight gradient G^T . X): the B operand is
//     MN-major, G's rows being the reduction. Four TMA boxes of 64 r-rows x 64 columns (128 bytes, 128B
//     swizzle) make a stage's 256 columns, and the descriptor's MN-major form (imm-trans-b = 1; leading
//     byte offset 8 KB between the boxes, stride byte offset 1 KB between 8-row groups) reads them; a k16
//     step is 16 rows (2 KB) further. Everything else is the same kernel.
//   * Grid: persistent (one CTA per SM), grouped raster over (row tiles of G, column tiles of Q) for L2
//     reuse, the mbarrier ring running on across tiles.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "../validate.h"
#include "lowbit/kernels/gemm_f16s8.h"
#include "tma_internal.cuh"
#include "wgmma_internal.cuh"

namespace lowbit {
namespace cuda {
namespace gemm_f16s8_detail {
namespace {

constexpr int kColsK = 128;                       // output columns k per tile (2 consumers x 64 wgmma rows)
constexpr int kRowsG = 256;                       // rows of G per tile (= wgmma N)
constexpr int kRedStage = 64;                     // reduction elements per stage (128 bytes of G)
constexpr int kStages = 5;
constexpr int kConsumers = 2;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kTileG = kRowsG * 128;              // 32 KB
constexpr int kTileQ = kRedStage * kColsK;        // 8 KB
constexpr int kStageBytes = kTileG + kTileQ;      // 40 KB
[[maybe_unused]] constexpr int kTileBoxG = kRedStage * 128;      // transposed G: one box of 64 r-rows x 64 columns, 8 KB
constexpr int kAlignSlack = 1024;
constexpr int kSmemBytes = kAlignSlack + kStages * kStageBytes + 2 * kStages * 8;
[[maybe_unused]] constexpr int kGroup = 8;        // row tiles of G per raster group
[[maybe_unused]] constexpr int kAcc = kRowsG / 2; // fp32 accumulators per consumer thread (64 x 256 / 128)
static_assert(kStageBytes % 1024 == 0, "stage buffers must stay 1024-byte aligned");
static_assert(kSmemBytes <= 227 * 1024, "sm_90 allows 227 KB of shared memory per block");

#ifdef LOWBIT_SM90A_DEVICE
using tma_detail::mbar_arrive;
using tma_detail::mbar_expect_tx;
using tma_detail::mbar_wait;
using tma_detail::Ring;
using tma_detail::tma_load;
using wgmma_detail::smem_desc;
using wgmma_detail::wgmma_commit;
using wgmma_detail::wgmma_fence;
using wgmma_detail::wgmma_wait;

template <typename T>
struct Wg;
// d = A (64 x 16, registers a) * B (16 x 256, descriptor db: K-major, or MN-major when kTransB) +
// (accumulate ? d : 0).
template <>
struct Wg<__half> {
  template <bool kTransB>
  static __device__ __forceinline__ void mma(float (&d)[kAcc], const uint32_t (&a)[4], uint64_t db,
                                             uint32_t accumulate) {
    wgmma_detail::wgmma_f16<256, false, kTransB>(d, a, db, accumulate);
  }
  // w: four codes XOR 0x80 (bytes [r0 k, r0 k+1, r1 k, r1 k+1]); lo = row k (r0, r1), hi = row k + 1.
  static __device__ __forceinline__ void widen(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const __half2 bias = __halves2half2(__ushort_as_half(0x6480u), __ushort_as_half(0x6480u));  // 1152
    __half2 l, h;
    const uint32_t pl = __byte_perm(w, 0x64646464u, 0x4240), ph = __byte_perm(w, 0x64646464u, 0x4341);
    l = __hsub2(*reinterpret_cast<const __half2*>(&pl), bias);
    h = __hsub2(*reinterpret_cast<const __half2*>(&ph), bias);
    lo = *reinterpret_cast<const uint32_t*>(&l);
    hi = *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <>
struct Wg<__nv_bfloat16> {
  template <bool kTransB>
  static __device__ __forceinline__ void mma(float (&d)[kAcc], const uint32_t (&a)[4], uint64_t db,
                                             uint32_t accumulate) {
    wgmma_detail::wgmma_f16<256, true, kTransB>(d, a, db, accumulate);
  }
  static __device__ __forceinline__ void widen(uint32_t w, uint32_t& lo, uint32_t& hi) {
    auto f = [&](uint32_t sel) { return __uint_as_float(__byte_perm(w, 0x4B000000u, sel)) - 8388736.0f; };
    const float f0 = f(0x7440), f1 = f(0x7441), f2 = f(0x7442), f3 = f(0x7443);
    lo = __byte_perm(__float_as_uint(f0), __float_as_uint(f2), 0x7632);
    hi = __byte_perm(__float_as_uint(f1), __float_as_uint(f3), 0x7632);
  }
};

// Shared-memory descriptor of an MN-major (transposed) 16-bit B operand in the 128B swizzle: atoms of 8
// reduction rows x 64 elements (1024 bytes); the leading byte offset steps between 64-element column
// blocks (the four TMA boxes of a stage, 8 KB apart), the stride byte offset between 8-row groups (1 KB).
__device__ __forceinline__ uint64_t smem_desc_mn(uint32_t addr) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(kTileBoxG >> 4) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}
__device__ __forceinline__ void pin(float (&d)[kAcc]) {
#pragma unroll
  for (int i = 0; i < kAcc; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ uint32_t lds16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr) : "memory");
  return v;
}
// The A fragment of k16 step s of the Q tile at qt: rows r = 16s + 2t + {0, 1, 8, 9}, columns k, k + 1
// (off_e / off_o: the lane's byte offsets in the even / odd r-row of the tile's first 8, swizzle applied).
template <typename T>
__device__ __forceinline__ void load_frag(uint32_t (&a)[4], uint32_t qt, int s, uint32_t off_e, uint32_t off_o) {
  const uint32_t row = qt + uint32_t(s) * 16u * 128u;
  const uint32_t l0 = lds16(row + off_e), l1 = lds16(row + off_o);
  const uint32_t l8 = lds16(row + 1024u + off_e), l9 = lds16(row + 1024u + off_o);
  Wg<T>::widen(__byte_perm(l0, l1, 0x5410) ^ 0x80808080u, a[0], a[1]);
  Wg<T>::widen(__byte_perm(l8, l9, 0x5410) ^ 0x80808080u, a[2], a[3]);
}
__device__ __forceinline__ void store_pair(float* p, float v0, float v1) {
  *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
}
__device__ __forceinline__ void store_pair(__half* p, float v0, float v1) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
}
__device__ __forceinline__ void store_one(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_one(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_one(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
#endif  // LOWBIT_SM90A_DEVICE

template <typename T, typename OutT, bool kTransG>
__global__ void __launch_bounds__(kThreads, 1) gemm_f16s8_kernel(
    const __grid_constant__ CUtensorMap tm_g,  // G (M, R) as bytes: box 128 bytes x 256 rows, 128B swizzle;
                                               // transposed, G (R, M): box 128 bytes x 64 r-rows
    const __grid_constant__ CUtensorMap tm_q,  // Q (R, K) int8: box 128 k-bytes x 64 r-rows, 128B swizzle
    int64_t M, int64_t K, int R, const float* __restrict__ alpha, OutT* __restrict__ out, int64_t ldo,
    int64_t tiles_m, int64_t tiles_k) {
#ifdef LOWBIT_SM90A_DEVICE
  extern __shared__ uint8_t smem_raw[];
  const Ring ring(smem_raw, kStages, kStageBytes);
  const uint32_t base = ring.base;
  auto full = [&](int s) { return ring.full(s); };
  auto empty = [&](int s) { return ring.empty(s); };
  const int64_t work = tiles_m * tiles_k;
  // Tile w: grouped raster, kGroup row tiles of G per group, column tiles of Q across it.
  auto locate = [&](int64_t w, int* m0, int* k0) {
    int64_t tm, tk;
    tma_detail::grouped_tile(w, tiles_m, tiles_k, kGroup, &tm, &tk);
    *m0 = static_cast<int>(tm * kRowsG);
    *k0 = static_cast<int>(tk * kColsK);
  };
  const int r_tiles = (R + kRedStage - 1) / kRedStage;
  const int wg = threadIdx.x / 128;
  ring.init(4 * kConsumers);
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_g)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_q)) : "memory");
      int s = 0;
      uint32_t ph = 0;
      for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
        int m0, k0;
        locate(w, &m0, &k0);
        for (int rt = 0; rt < r_tiles; ++rt) {
          mbar_wait(empty(s), ph ^ 1u);  // round 0 passes at once
          const uint32_t slot = base + uint32_t(s) * kStageBytes;
          mbar_expect_tx(full(s), kStageBytes);
          if constexpr (kTransG) {  // four 64-column boxes, 8 KB apart: the MN-major atoms' column blocks
#pragma unroll
            for (int b = 0; b < kRowsG / 64; ++b)
              tma_load(slot + uint32_t(b) * kTileBoxG, &tm_g, full(s), 2 * m0 + 128 * b, rt * kRedStage, 0);
          } else {
            tma_load(slot, &tm_g, full(s), rt * 128, m0, 0);
          }
          tma_load(slot + kTileG, &tm_q, full(s), k0, rt * kRedStage, 0);
          if (++s == kStages) {
            s = 0;
            ph ^= 1u;
          }
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int cw = wg - 1;  // output columns 64 cw .. 64 cw + 63 of the tile
  const int t = threadIdx.x % 128;
  const int warp = t / 32, lane = t % 32;
  const int g = lane / 4, tq = lane % 4;
  const uint32_t chunk = uint32_t(4 * cw + warp);  // the 16-byte chunk of k 64cw + 16w .. + 15 in a line
  const uint32_t off_e = uint32_t(2 * tq) * 128u + (((chunk ^ uint32_t(2 * tq)) & 7u) << 4) + 2u * g;
  const uint32_t off_o = uint32_t(2 * tq + 1) * 128u + (((chunk ^ uint32_t(2 * tq + 1)) & 7u) << 4) + 2u * g;
  const float a_scale = alpha != nullptr ? __ldg(alpha) : 1.0f;
  float acc[kAcc];  // the tile's first wgmma (scale-d 0) writes them
  int s = 0, prev_s = 0;
  uint32_t ph = 0;
  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    int m0, k0;
    locate(w, &m0, &k0);
    auto qtile = [&](int st) { return base + uint32_t(st) * kStageBytes + kTileG; };
    uint32_t ra[2][4];
    mbar_wait(full(s), ph);
    load_frag<T>(ra[0], qtile(s), 0, off_e, off_o);
    for (int i = 0; i < r_tiles; ++i) {
      const uint32_t slot = base + uint32_t(s) * kStageBytes;
#pragma unroll
      for (int ks = 0; ks < kRedStage / 16; ++ks) {
        const int P = ks & 1;
        pin(acc);
        wgmma_fence();
        // k16 step ks: 32 bytes into each G line (K-major), or 16 r-rows down (MN-major).
        const uint64_t db = kTransG ? smem_desc_mn(slot + uint32_t(ks) * 16u * 128u) : smem_desc(slot + ks * 32);
        Wg<T>::template mma<kTransG>(acc, ra[P], db, i > 0 || ks > 0 ? 1u : 0u);
        wgmma_commit();
        pin(acc);
        wgmma_wait<1>();
        pin(acc);
        if (ks == 0 && i > 0) {
          __syncwarp();  // the warp's shared loads of that stage (A fragments) before lane 0's arrival
          if (lane == 0) mbar_arrive(empty(prev_s));
        }
        if (ks + 1 < kRedStage / 16) {
          load_frag<T>(ra[1 - P], slot + kTileG, ks + 1, off_e, off_o);
        } else if (i + 1 < r_tiles) {
          const int sn = s + 1 == kStages ? 0 : s + 1;
          mbar_wait(full(sn), sn == 0 ? ph ^ 1u : ph);
          load_frag<T>(ra[1 - P], qtile(sn), 0, off_e, off_o);
        }
      }
      prev_s = s;
      if (++s == kStages) {
        s = 0;
        ph ^= 1u;
      }
    }
    wgmma_wait<0>();
    pin(acc);
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(prev_s));

    // Epilogue: acc[4j + 2h + e] is out[m0 + 8j + 2tq + e][k0 + 64cw + 16warp + 2g + h].
    const int64_t k = int64_t(k0) + 64 * cw + 16 * warp + 2 * g;
    const bool pair_ok = (ldo % 2 == 0) && (reinterpret_cast<uintptr_t>(out) % (2 * sizeof(OutT)) == 0);
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t m = int64_t(m0) + 8 * j + 2 * tq + e;
        if (m >= M) continue;
        const float v0 = acc[4 * j + e] * a_scale, v1 = acc[4 * j + 2 + e] * a_scale;
        OutT* const p = out + m * ldo + k;
        if (pair_ok && k + 1 < K) {
          store_pair(p, v0, v1);
        } else {
          if (k < K) store_one(p, v0);
          if (k + 1 < K) store_one(p + 1, v1);
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

template <typename T, typename OutT, bool kTransG>
bool prepare_one() {
  cudaFuncAttributes attr{};
  return cudaFuncGetAttributes(&attr, gemm_f16s8_kernel<T, OutT, kTransG>) == cudaSuccess &&
         attr.ptxVersion >= 90 && attr.binaryVersion == 90 &&
         cudaFuncSetAttribute(gemm_f16s8_kernel<T, OutT, kTransG>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              kSmemBytes) == cudaSuccess;
}
template <typename T, typename OutT>
bool prepare_kernel() {
  return prepare_one<T, OutT, false>() && prepare_one<T, OutT, true>();
}

// Per device: cc 9.0, the sm_90a code loaded, its shared memory granted, the tensor-map encoder found.
bool device_ready(int device) {
  static std::atomic<int> state[64];  // 0 unknown, 1 ready, 2 not
  if (device < 0 || device >= 64) return false;
  const int st = state[device].load(std::memory_order_acquire);
  if (st != 0) return st == 1;
  cudaDeviceProp prop{};
  bool ok = tma_detail::encode_fn() != nullptr && cudaGetDeviceProperties(&prop, device) == cudaSuccess &&
            prop.major == 9 && prop.minor == 0 && prop.sharedMemPerBlockOptin >= size_t(kSmemBytes);
  ok = ok && prepare_kernel<__half, __half>() && prepare_kernel<__half, float>() &&
       prepare_kernel<__nv_bfloat16, __nv_bfloat16>() && prepare_kernel<__nv_bfloat16, float>();
  cudaGetLastError();
  state[device].store(ok ? 1 : 2, std::memory_order_release);
  return ok;
}

template <typename T, typename OutT>
Status launch(const char* fn, const void* G, int64_t ldg, bool trans_g, const int8_t* Q, int64_t ldq, int64_t M,
              int64_t R, int64_t K, const float* alpha, void* out, int64_t ldo, cudaStream_t stream) {
  CUtensorMap mg, mq;
  const bool g_ok = trans_g ? tma_detail::make_map(&mg, G, 2 * M, R, 2 * ldg, 0, 1, kRedStage)
                            : tma_detail::make_map(&mg, G, 2 * R, M, 2 * ldg, 0, 1, kRowsG);
  if (!g_ok ||
      !tma_detail::make_map(&mq, Q, K, R, ldq, 0, 1, kRedStage))
    return Status::device(validate::err(fn, "cuTensorMapEncodeTiled rejected the operands (ldg=" +
                                                std::to_string(ldg) + ", ldq=" + std::to_string(ldq) + ")"));
  const int64_t tiles_m = (M + kRowsG - 1) / kRowsG, tiles_k = (K + kColsK - 1) / kColsK;
  const int64_t work = tiles_m * tiles_k;
  const int sms = tma_detail::device_sms(tma_detail::current_device());
  const unsigned grid = static_cast<unsigned>(work < sms ? work : sms);
  auto kernel = trans_g ? gemm_f16s8_kernel<T, OutT, true> : gemm_f16s8_kernel<T, OutT, false>;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(mg, mq, M, K, static_cast<int>(R), alpha, static_cast<OutT*>(out),
                                                  ldo, tiles_m, tiles_k);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return Status::device(validate::err(fn, std::string("kernel launch failed: ") + cudaGetErrorString(err)));
  return Status::ok();
}

}  // namespace
}  // namespace gemm_f16s8_detail

bool gemm_f16s8_supported(DType gtype, const void* G, int64_t ldg, bool trans_g, const int8_t* Q, int64_t ldq,
                          int64_t M, int64_t R, int64_t K) {
  using namespace gemm_f16s8_detail;
  if (gtype != DType::kFloat16 && gtype != DType::kBFloat16) return false;
  if (M < 1 || R < 1 || K < 1) return false;
  if (M >= (int64_t(1) << 31) || R >= (int64_t(1) << 31) || K >= (int64_t(1) << 31)) return false;
  if (ldg < (trans_g ? M : R) || ldq < K) return false;
  if (!tma_detail::tma_ok(G, 2 * ldg, 0, 1) || !tma_detail::tma_ok(Q, ldq, 0, 1)) return false;
  if ((ldg >> 40) != 0 || (ldq >> 40) != 0) return false;
  return device_ready(tma_detail::current_device());
}

Status gemm_f16s8(DType gtype, const void* G, int64_t ldg, bool trans_g, const int8_t* Q, int64_t ldq, int64_t M,
                  int64_t R, int64_t K, const float* alpha, DType otype, void* out, int64_t ldo,
                  CUstream_st* stream) {
  using namespace gemm_f16s8_detail;
  const char* fn = "lowbit::cuda::gemm_f16s8";
  if (gtype != DType::kFloat16 && gtype != DType::kBFloat16)
    return Status::invalid(validate::err(fn, std::string("G must be float16 or bfloat16, got ") + dtype_name(gtype)));
  if (otype != DType::kFloat32 && otype != gtype)
    return Status::invalid(validate::err(fn, std::string("otype must be float32 or G's dtype (") + dtype_name(gtype) +
                                                 "), got " + dtype_name(otype)));
  if (M < 0) return validate::invalid_got(fn, "M must be >= 0", M);
  if (R < 0) return validate::invalid_got(fn, "R must be >= 0", R);
  if (K < 0) return validate::invalid_got(fn, "K must be >= 0", K);
  const int64_t g_rows = trans_g ? R : M, g_cols = trans_g ? M : R;
  if (g_rows > 0 && ldg < g_cols)
    return validate::invalid_got(fn, "ldg must be >= " + std::string(trans_g ? "M" : "R") + " (" +
                                         std::to_string(g_cols) + ")", ldg);
  if (R > 0 && ldq < K) return validate::invalid_got(fn, "ldq must be >= K (" + std::to_string(K) + ")", ldq);
  if (M > 0 && ldo < K) return validate::invalid_got(fn, "ldo must be >= K (" + std::to_string(K) + ")", ldo);
  if (M == 0 || K == 0) return Status::ok();
  if (out == nullptr) return Status::invalid(validate::err(fn, "out is null but M*K > 0"));
  const cudaStream_t cs = reinterpret_cast<cudaStream_t>(stream);
  const size_t osize = otype == DType::kFloat32 ? 4 : 2;
  if (R == 0) {  // empty sums: zeros (all-zero bits in every otype)
    const cudaError_t e =
        cudaMemset2DAsync(out, size_t(ldo) * osize, 0, size_t(K) * osize, size_t(M), cs);
    if (e != cudaSuccess) return Status::device(validate::err(fn, std::string("memset failed: ") + cudaGetErrorString(e)));
    return Status::ok();
  }
  if (G == nullptr || Q == nullptr) return Status::invalid(validate::err(fn, "G and Q must not be null"));
  if (!gemm_f16s8_supported(gtype, G, ldg, trans_g, Q, ldq, M, R, K))
    return Status::invalid(validate::err(
        fn, "this call cannot run on the sm_90a kernel (needs a compute capability 9.0 device with the sm_90a "
            "build, 16-byte aligned G and Q with row strides multiples of 16 bytes); widen Q "
            "and run a float GEMM instead"));
  if (gtype == DType::kFloat16)
    return otype == DType::kFloat32 ? launch<__half, float>(fn, G, ldg, trans_g, Q, ldq, M, R, K, alpha, out, ldo, cs)
                                    : launch<__half, __half>(fn, G, ldg, trans_g, Q, ldq, M, R, K, alpha, out, ldo, cs);
  return otype == DType::kFloat32
             ? launch<__nv_bfloat16, float>(fn, G, ldg, trans_g, Q, ldq, M, R, K, alpha, out, ldo, cs)
             : launch<__nv_bfloat16, __nv_bfloat16>(fn, G, ldg, trans_g, Q, ldq, M, R, K, alpha, out, ldo, cs);
}

}  // namespace cuda
}  // namespace lowbit

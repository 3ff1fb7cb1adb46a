// TMA-fed warpgroup weight-only matmul for Hopper (sm_90a): the large-M kernel of wq_matmul's warpgroup
// path (wq_wg.cu hands it a one-segment view of 2 or 4 bits when wgt_usable holds). Same product and same
// per-row weight formula as wq_wg_kernel, bit for bit in the weights; what differs is who moves the bytes.
//
// Why a second kernel. wq_wg_kernel has every thread issue its own cp.async copies, vote on the groups and
// meet at a block barrier each k-block; at 256 rows of x per CTA it runs 8 warps per SM at 254 registers
// and is latency-bound (docs/PERFORMANCE.md: M = 256 at 0.5x of fp16). Here a producer warpgroup (one
// thread) brings each k-block's operands with TMA into a ring of stages guarded by
// mbarriers, and two consumer warpgroups only decode and multiply (setmaxnreg 40 / 232, as gemm_f16s8):
//
//   * CTA tile: 128 output columns (two consumer warpgroups x 64 wgmma rows) x MT = 128 (M <= 128) or 256
//     rows of x (wgmma n = MT: the x' tile is the B operand, K-major, 128-byte swizzle, one TMA box of 64 k
//     x MT rows), one 64-row k-block per stage, 8 / 5 stages. Persistent grid over (row tile, column tile,
//     split-K range).
//   * Weights as wgmma's register A operand, decoded by PairCode::unit + pair_weight (wq_codes.cuh) in the
//     k-slot order of the prep pass (wg_slot_row): lane (g, t) decodes words 2t, 2t + 1 (4-bit) or word t
//     (2-bit) of its columns. A lane's two A rows are ADJACENT columns (row 16w + g + 8c <-> column 16w +
//     2g + c of its warpgroup's 64), so one 8-byte shared load reads both columns' word, one 4-byte load
//     both columns' scales, and the epilogue stores column pairs.
//   * Stage: four TMA boxes: the x' tile (32 KB), the k-block's word rows of the CTA's 128 columns (8 or 4
//     rows of 512 bytes), and the scale and zero rows of the group the k-block is expected in (row / gs,
//     256 bytes each). (A first version used eleven 1-D bulk copies per stage, the word rows padded
//     against bank conflicts: 5 % slower at 8192 x 28672, M = 256, and racecheck could not follow
//     them.) The k-block's g_idx is read by the consumers straight from global memory, one k-block
//     ahead (a vote per warp: all 64 rows
//     in one group -> the pair (s, z) per column; the expected group -> from the stage, another -> loaded
//     once per change; rows of several groups -> each pair's own groups, rolled through a per-warp scratch
//     as in wq_wg_kernel).
//   * Pipeline per consumer warpgroup: decode k-block i + 1 into the other register set while k-block i's
//     four wgmmas run (wgmma.wait_group 1, then the stage of k-block i - 1 is released).
//   * Tails: TMA zero-fills rows of x past M; the prep pass zero-pads x' past K; columns past N decode
//     whatever the stage holds and are never stored; rows past K in the tail k-block are zeroed in the A
//     fragment. Output: one split -> out (+ bias, one rounding), several -> fp32 partial sums per split,
//     which launch_reduce (wq_matmul.cu) adds in split order. Deterministic; no atomics.
#include "wq_internal.cuh"

#include <atomic>
#include <string>
#include <type_traits>

#include "../validate.h"
#include "pdl.cuh"
#include "tma_internal.cuh"
#include "wq_codes.cuh"

namespace lowbit {
namespace cuda {
namespace wq_detail {
namespace {

constexpr int kTThreads = 384;  // producer warpgroup + two consumer warpgroups
constexpr int kTCols = 128;     // output columns per tile
constexpr int kTKb = 64;        // k rows per k-block (one 128-byte line of x')

// MT: rows of x per tile (wgmma n = 128 or 256); the ring is deeper for the smaller tile.
template <int B, int MT>
struct TShape {
  static constexpr int kAcc = MT / 2;                 // fp32 accumulators per consumer thread (64 x MT / 128)
  static constexpr int kStages = MT == 256 ? 5 : 8;
  static constexpr int kXBytes = MT * 128;             // x' tile: MT rows x 64 k, 16-bit
  static constexpr int kWordRows = kTKb * B / 32;      // 8 (4-bit) / 4 (2-bit)
  static constexpr int kPitch = kTCols * 4;            // one TMA box of kWordRows x 128 words
  static constexpr int kWOff = kXBytes;
  static constexpr int kSzOff = kWOff + kWordRows * kPitch;  // scale row (256 B) then zero row (256 B)
  static constexpr int kStage = (kSzOff + 2 * kTCols * 2 + 1023) / 1024 * 1024;
  static constexpr int kScratch = 8 * 16 * 128;  // per consumer warp: 16 fragment registers x 32 lanes
  static constexpr int kSmem = 1024 + kStages * kStage + 2 * kStages * 8 + kScratch;
  static constexpr uint32_t kTx = kXBytes + kWordRows * kPitch + 2 * kTCols * 2;  // bytes per stage
  static_assert(kSmem <= 227 * 1024, "sm_90 allows 227 KB of shared memory per block");
  static_assert(kWOff % 128 == 0 && kSzOff % 128 == 0, "TMA destinations are 128-byte aligned");
  static_assert(kAcc % 4 == 0 && kTx % 16 == 0, "whole accumulator quads; whole 16-byte TMA transfers");
};

struct TArgs : WqSegArgs {
  int64_t ntiles, splits;
};

#ifdef LOWBIT_SM90A_DEVICE
using tma_detail::mbar_arrive;
using tma_detail::mbar_expect_tx;
using tma_detail::mbar_wait;
using tma_detail::Ring;
using tma_detail::tma_load;

__device__ __forceinline__ uint32_t t_lds(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ uint2 t_lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void t_sts(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
template <int N>
__device__ __forceinline__ void t_pin(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void t_pin(uint32_t (&r)[4][4]) {
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(r[s][i])::"memory");
}
__device__ __forceinline__ void store2(float* p, float v0, float v1) { *reinterpret_cast<float2*>(p) = make_float2(v0, v1); }
__device__ __forceinline__ void store2(__half* p, float v0, float v1) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
}
#endif  // LOWBIT_SM90A_DEVICE

template <typename T, int B, bool kAsym, int MT>
__global__ void __launch_bounds__(kTThreads, 1) wq_wgt_kernel(
    const __grid_constant__ CUtensorMap tm_x,   // x' (M, kp) as bytes: box 128 bytes x 256 rows, 128B swizzle
    const __grid_constant__ CUtensorMap tm_w,   // words (qrows_used, N) uint32: box 128 x kWordRows
    const __grid_constant__ CUtensorMap tm_s,   // scales (groups, N) 16-bit: box 128 x 1
    const __grid_constant__ CUtensorMap tm_z,   // zeros, as the scales
    const TArgs a) {
#ifdef LOWBIT_SM90A_DEVICE
  using S = TShape<B, MT>;
  using Sel = PairCodeSel<B, T>;
  extern __shared__ uint8_t smem_raw[];
  const Ring ring(smem_raw, S::kStages, S::kStage);
  const uint32_t base = ring.base;
  const int64_t work = a.mtiles * a.ntiles * a.splits;
  const int N = int(a.N), K = int(a.K);  // wgt_usable: N < 2^31, K < 2^30
  const int groups = int(a.groups);
  // Work item w: row tile fastest, then column tile, then split (CTAs resident together share the split's
  // x' columns and read different weights).
  auto locate = [&](int64_t w, int64_t* m0, int* n0, int* kb0, int* nk) {
    const int64_t mt = w % a.mtiles, rest = w / a.mtiles;
    const int64_t nt = rest % a.ntiles, sp = rest / a.ntiles;
    *m0 = mt * MT;
    *n0 = int(nt) * kTCols;
    *kb0 = int(sp) * a.kps;
    *nk = min(a.nkb - *kb0, a.kps);
  };
  auto guess = [&](int row0) { return min(int((float(a.row_base + row0) + 0.5f) * a.inv_gs), groups - 1); };
  const int wg = threadIdx.x / 128;
  ring.init(8);  // lane 0 of each consumer warp releases a stage
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_x)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_w)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_s)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tm_z)) : "memory");
      pdl_wait();  // x' comes from the prep kernel just before this one
      int s = 0;
      uint32_t ph = 0;
      for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
        int64_t m0;
        int n0, kb0, nk;
        locate(w, &m0, &n0, &kb0, &nk);
        for (int kb = kb0; kb < kb0 + nk; ++kb) {
          mbar_wait(ring.empty(s), ph ^ 1u);  // round 0 passes at once
          const uint32_t slot = base + uint32_t(s) * S::kStage;
          const int gexp = guess(kb * kTKb);
          // Boxes count in full, zero-filled past M, N, the word rows and the groups.
          mbar_expect_tx(ring.full(s), S::kTx);
          tma_load(slot, &tm_x, ring.full(s), kb * 128, int(m0), 0);
          tma_load(slot + S::kWOff, &tm_w, ring.full(s), n0, kb * S::kWordRows, 0);
          tma_load(slot + S::kSzOff, &tm_s, ring.full(s), n0, gexp, 0);
          tma_load(slot + S::kSzOff + kTCols * 2, &tm_z, ring.full(s), n0, gexp, 0);
          if (++s == S::kStages) {
            s = 0;
            ph ^= 1u;
          }
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int cw = wg - 1;
  const int t128 = threadIdx.x % 128;
  const int warp = t128 / 32, lane = t128 % 32;
  const int g = lane / 4, tq = lane % 4;
  const int cloc = 64 * cw + 16 * warp + 2 * g;  // this lane's first column in the tile (the second: + 1)
  constexpr int kLaneWords = B == 4 ? 2 : 1;
  const uint32_t woff = S::kWOff + uint32_t(kLaneWords * tq) * S::kPitch + uint32_t(cloc) * 4u;
  const uint32_t scr = base + S::kStages * S::kStage + 2 * S::kStages * 8 + uint32_t(4 * cw + warp) * (16u * 128u) +
                       uint32_t(lane) * 4u;
  uint32_t mg[5];
#pragma unroll
  for (int j = 0; j < 5; ++j) mg[j] = a.magic - (uint32_t(2 * j) << Tc<T>::kMant) * 0x00010001u;
  const int32_t* const gi = a.g_idx;
  auto gload = [&](int r) { return r < K ? __ldg(gi + r) : int32_t(-1); };  // -1: past K, matches any group

  float acc[S::kAcc];
  uint32_t areg[2][4][4];
  int s = 0, prev_s = 0;
  uint32_t ph = 0;

  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    int64_t m0;
    int n0, kb0, nk;
    locate(w, &m0, &n0, &kb0, &nk);
    const int ncol = min(n0 + cloc, N - 2);  // clamped column pair for direct (s, z) loads (N % 8 == 0)
    int cur_g = -1;
    uint32_t sp[2] = {0u, 0u}, zp[2] = {0u, 0u};
    // g_idx of the k-block about to be decoded, loaded one k-block ahead.
    int32_t ga = gload(kb0 * kTKb + lane), gb = gload(kb0 * kTKb + lane + 32);

    // Decode k-block kb (stage st) into areg[P].
    auto decode = [&](const int kb, const int st, auto parity) {
      constexpr int P = decltype(parity)::value;
      const uint32_t slot = base + uint32_t(st) * S::kStage;
      const int row0 = kb * kTKb;
      const int32_t ca = ga, cb = gb;
      if (kb + 1 < kb0 + nk) {
        ga = gload(row0 + kTKb + lane);
        gb = gload(row0 + kTKb + lane + 32);
      }
      const int32_t gfirst = __shfl_sync(0xFFFFFFFFu, ca, 0);  // row0 < K always
      const bool uniform = __all_sync(0xFFFFFFFFu, (ca == gfirst || ca < 0) && (cb == gfirst || cb < 0));
      if (uniform && gfirst == guess(row0)) {
        const uint32_t sv = t_lds(slot + S::kSzOff + uint32_t(cloc) * 2u);
        const uint32_t zv = t_lds(slot + S::kSzOff + kTCols * 2u + uint32_t(cloc) * 2u);
        sp[0] = __byte_perm(sv, 0u, 0x1010);
        sp[1] = __byte_perm(sv, 0u, 0x3232);
        zp[0] = __byte_perm(zv, 0u, 0x1010);
        zp[1] = __byte_perm(zv, 0u, 0x3232);
        if constexpr (!kAsym) {
          zp[0] ^= 0x80008000u;  // -z
          zp[1] ^= 0x80008000u;
        }
        cur_g = -1;
      } else if (uniform && gfirst != cur_g) {
        cur_g = gfirst;
        const int64_t gg = min(max(gfirst, 0), groups - 1);
        const uint32_t sv = __ldg(reinterpret_cast<const unsigned int*>(static_cast<const uint16_t*>(a.scales) + gg * N + ncol));
        const uint32_t zv = __ldg(reinterpret_cast<const unsigned int*>(static_cast<const uint16_t*>(a.zeros) + gg * N + ncol));
        sp[0] = __byte_perm(sv, 0u, 0x1010);
        sp[1] = __byte_perm(sv, 0u, 0x3232);
        zp[0] = __byte_perm(zv, 0u, 0x1010);
        zp[1] = __byte_perm(zv, 0u, 0x3232);
        if constexpr (!kAsym) {
          zp[0] ^= 0x80008000u;
          zp[1] ^= 0x80008000u;
        }
      }
      if (uniform) {
        uint2 wv[kLaneWords];
#pragma unroll
        for (int h = 0; h < kLaneWords; ++h) wv[h] = t_lds64(slot + woff + uint32_t(h) * S::kPitch);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int pi = B == 4 ? ks : 2 * ks + h;
            const uint2 v = wv[B == 4 ? h : 0];
            const uint32_t sub = mg[Sel::pos(pi) / 2];
            areg[P][ks][2 * h] = pair_weight<T, kAsym>(Sel::unit(v.x, pi, mg), sub, sp[0], zp[0]);
            areg[P][ks][2 * h + 1] = pair_weight<T, kAsym>(Sel::unit(v.y, pi, mg), sub, sp[1], zp[1]);
          }
      } else {
        // Rows of one pair may lie in different groups: each row's own (s, z), in a rolled loop through this
        // lane's column of the warp's scratch (as wq_wg_kernel), then into the A registers.
        cur_g = -1;
#pragma unroll 1
        for (int idx = 0; idx < 16; ++idx) {
          const int ci = idx & 1, h = (idx >> 1) & 1, ks = idx >> 2;
          const int k = 16 * ks + 2 * tq + 8 * h;
          const int r0 = min(row0 + wg_slot_row(B, k), K - 1), r1 = min(row0 + wg_slot_row(B, k + 1), K - 1);
          uint32_t s2, z2;
          wg_row_pair_sz<kAsym>(a.scales, a.zeros, groups, N, __ldg(gi + r0), __ldg(gi + r1), ncol + ci, &s2, &z2);
          const int pi = B == 4 ? ks : 2 * ks + h;
          const uint32_t wd = t_lds(slot + woff + uint32_t(B == 4 ? h : 0) * S::kPitch + uint32_t(ci) * 4u);
          const uint32_t sub = a.magic - (uint32_t(Sel::pos(pi)) << Tc<T>::kMant) * 0x00010001u;
          t_sts(scr + uint32_t(idx) * 128u, pair_weight<T, kAsym>(Sel::unit(wd, pi, mg), sub, s2, z2));
        }
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int ci = 0; ci < 2; ++ci)
              areg[P][ks][2 * h + ci] = t_lds(scr + uint32_t((ks * 2 + h) * 2 + ci) * 128u);
      }
      if (row0 + kTKb > K) {  // tail k-block: rows past K weigh 0 whatever their padding codes
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t keep = wg_tail_keep(B, row0, 16 * ks + 2 * tq + 8 * h, K);
            areg[P][ks][2 * h] &= keep;
            areg[P][ks][2 * h + 1] &= keep;
          }
      }
    };

    // k-block i: its four wgmmas on areg[P], then (while they run) k-block i + 1 decoded into the other set.
    auto step = [&](const int i, auto parity) {
      constexpr int P = decltype(parity)::value;
      const uint32_t slot = base + uint32_t(s) * S::kStage;
      t_pin(acc);
      t_pin(areg[P]);
      wgmma_detail::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
        wgmma_detail::wgmma_f16<MT, std::is_same<T, __nv_bfloat16>::value, false>(
            acc, areg[P][ks], wgmma_detail::smem_desc(slot + uint32_t(ks) * 32u), i > 0 || ks > 0 ? 1u : 0u);
      wgmma_detail::wgmma_commit();
      t_pin(acc);
      wgmma_detail::wgmma_wait<1>();  // k-block i - 1 has retired: its stage is free
      t_pin(acc);
      // mbarrier.arrive releases only the arriving thread's own accesses: the warp's other lanes' reads of
      // the stage (decode) are ordered before lane 0's arrival by the __syncwarp.
      __syncwarp();
      if (i > 0 && lane == 0) mbar_arrive(ring.empty(prev_s));
      prev_s = s;
      if (++s == S::kStages) {
        s = 0;
        ph ^= 1u;
      }
      if (i + 1 < nk) {
        mbar_wait(ring.full(s), ph);
        decode(kb0 + i + 1, s, std::integral_constant<int, 1 - P>{});
      }
    };

    mbar_wait(ring.full(s), ph);
    decode(kb0, s, std::integral_constant<int, 0>{});
    for (int i = 0; i < nk; i += 2) {
      step(i, std::integral_constant<int, 0>{});
      if (i + 1 < nk) step(i + 1, std::integral_constant<int, 1>{});
    }
    wgmma_detail::wgmma_wait<0>();
    t_pin(acc);
    __syncwarp();
    if (lane == 0) mbar_arrive(ring.empty(prev_s));

    // Epilogue: acc[4j + 2c + e] is out[m0 + 8j + 2tq + e][n0 + cloc + c].
    const int n = n0 + cloc;
    if (n < N) {
      const int64_t split = w / (a.mtiles * a.ntiles);
      float b0 = 0.0f, b1 = 0.0f;
      if (a.partial == nullptr && a.bias != nullptr) {
        b0 = float(__ldg(static_cast<const T*>(a.bias) + n));
        b1 = float(__ldg(static_cast<const T*>(a.bias) + n + 1));
      }
      const bool pair_ok = a.ldo % 2 == 0 && reinterpret_cast<uintptr_t>(a.out) % 4 == 0;
#pragma unroll
      for (int j = 0; j < S::kAcc / 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t m = m0 + 8 * j + 2 * tq + e;
          if (m >= a.M) continue;
          const float v0 = acc[4 * j + e], v1 = acc[4 * j + 2 + e];
          if (a.partial != nullptr) {
            store2(a.partial + (split * a.M + m) * N + n, v0, v1);
          } else {
            T* const p = static_cast<T*>(a.out) + m * a.ldo + n;
            if (pair_ok) {
              store2(p, v0 + b0, v1 + b1);
            } else {
              p[0] = T(v0 + b0);
              p[1] = T(v1 + b1);
            }
          }
        }
    }
  }
  pdl_trigger();
#else
  __trap();  // never launched: the host checks that the sm_90a code was loaded (wgt_ready)
#endif
}

// Calls f(kernel, smem bytes) with the instantiation for (dtype, bits, asym, row tile).
template <typename F>
decltype(auto) with_wgt_kernel(bool fp16, int bits, bool asym, int mt, F&& f) {
  auto by_t = [&](auto tag) -> decltype(auto) {
    using T = typename decltype(tag)::type;
    auto by_m = [&](auto mtag) -> decltype(auto) {
      constexpr int MT = decltype(mtag)::value;
      if (bits == 2) {
        if (asym) return f(wq_wgt_kernel<T, 2, true, MT>, TShape<2, MT>::kSmem);
        return f(wq_wgt_kernel<T, 2, false, MT>, TShape<2, MT>::kSmem);
      }
      if (asym) return f(wq_wgt_kernel<T, 4, true, MT>, TShape<4, MT>::kSmem);
      return f(wq_wgt_kernel<T, 4, false, MT>, TShape<4, MT>::kSmem);
    };
    if (mt == 128) return by_m(std::integral_constant<int, 128>{});
    return by_m(std::integral_constant<int, 256>{});
  };
  struct H { using type = __half; };
  struct BF { using type = __nv_bfloat16; };
  if (fp16) return by_t(H{});
  return by_t(BF{});
}

// Rows of x per tile: 128 up to M = 128, else 256. (A 64-row tile, 12 stages, lost to wq_wg_kernel and the
// decode kernel at M = 32 and 64 on every Llama layer: 28672 x 8192 M = 64 146 vs 122 us, 8192^2 52 vs 45:
// each k-block's decode latency is no longer hidden behind its wgmmas.)
int wgt_tile_rows(int64_t M) { return M <= 128 ? 128 : 256; }

// Per device: cc 9.0, the tensor-map encoder found, every instantiation's sm_90a code loaded and its shared
// memory granted.
bool wgt_ready(int device) {
  static std::atomic<int> state[64];  // 0 unknown, 1 ready, 2 not
  if (device < 0 || device >= 64) return false;
  const int st = state[device].load(std::memory_order_acquire);
  if (st != 0) return st == 1;
  cudaDeviceProp prop{};
  bool ok = tma_detail::encode_fn() != nullptr && cudaGetDeviceProperties(&prop, device) == cudaSuccess &&
            prop.major == 9 && prop.minor == 0;
  for (int f = 0; f < 2 && ok; ++f)
    for (int b : {2, 4})
      for (int as = 0; as < 2; ++as)
        for (int mt : {128, 256})
          ok = ok && with_wgt_kernel(f == 0, b, as == 1, mt,
                                     [&](auto kernel, int smem) { return sm90a_kernel_ready(kernel, smem, prop); });
  cudaGetLastError();
  state[device].store(ok ? 1 : 2, std::memory_order_release);
  return ok;
}

// A (rows, cols) row-major matrix of elem-byte elements as a 3-D tensor map (cols, rows, 1): box 128 columns x
// box_rows, no swizzle, zero fill out of bounds.
bool make_map_2d(CUtensorMap* map, const void* p, CUtensorMapDataType type, int elem, int64_t cols, int64_t rows,
                 int box_rows) {
  const cuuint64_t dims[3] = {cuuint64_t(cols), cuuint64_t(rows), 1};
  const cuuint64_t strides[2] = {cuuint64_t(cols * elem), cuuint64_t(cols * elem * rows)};
  const cuuint32_t box[3] = {cuuint32_t(kTCols), cuuint32_t(box_rows), 1u};
  const cuuint32_t estr[3] = {1u, 1u, 1u};
  return tma_detail::encode_fn()(map, type, 3, const_cast<void*>(p), dims, strides, box, estr,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

int64_t wgt_min_rows() {
  static const int64_t v = [] {
    const char* e = std::getenv("LOWBIT_WQ_WGT_MIN_ROWS");
    return e != nullptr ? int64_t(std::atoll(e)) : int64_t(65);
  }();
  return v;
}

bool wgt_usable(const WqWeight& v, int64_t M) {
  if (M < wgt_min_rows() || v.nseg != 1 || (v.bits[0] != 2 && v.bits[0] != 4)) return false;
  if (v.N % 8 != 0 || v.K >= (int64_t(1) << 30) || v.N >= (int64_t(1) << 31)) return false;
  auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!al16(v.qweight) || !al16(v.scales) || !al16(v.zeros) || reinterpret_cast<uintptr_t>(v.g_idx) % 4 != 0)
    return false;
  return wgt_ready(tma_detail::current_device());
}

void wgt_plan(const WqWeight& v, int64_t M, int sms, int64_t* mtiles, int64_t* ntiles, int64_t* splits,
              int64_t* kps) {
  *mtiles = (M + wgt_tile_rows(M) - 1) / wgt_tile_rows(M);
  *ntiles = (v.N + kTCols - 1) / kTCols;
  const int64_t nkb = (v.K + kTKb - 1) / kTKb;
  const int64_t base = *mtiles * *ntiles;
  // Split-K count: the best wave fill of the persistent grid (one CTA per SM), each split at least 8
  // k-blocks, a premium on fewer splits (each adds an fp32 partial-sum slot of M x N and the reduce pass).
  const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(nkb / 8, 16));
  double best = -1.0;
  int64_t pick = 1;
  for (int64_t c = 1; c <= cap; ++c) {
    const int64_t items = base * c, waves = (items + sms - 1) / sms;
    const double score = double(items) / double(waves * sms) - 0.04 * double(c - 1);
    if (score > best) {
      best = score;
      pick = c;
    }
  }
  *kps = (nkb + pick - 1) / pick;
  *splits = (nkb + *kps - 1) / *kps;
}

Status wgt_launch(const char* fn, const WqWeight& w, const WqWeight& v, const void* xprep, int64_t kp, int64_t M,
                  int64_t row_base, const void* bias, void* out, int64_t ldo, float* partial, int sms,
                  cudaStream_t stream) {
  TArgs a = {};
  int64_t mtiles = 0, kps = 0;
  wgt_plan(v, M, sms, &mtiles, &a.ntiles, &a.splits, &kps);
  static_cast<WqSegArgs&>(a) = seg_args(w, v, M, row_base, bias, out, ldo, partial, mtiles, (v.K + kTKb - 1) / kTKb, kps);
  const bool fp16 = v.sdtype == DType::kFloat16;
  CUtensorMap mx, mw, ms, mz;
  const int wrows = int(kTKb * v.bits[0] / 32);
  const int mt = wgt_tile_rows(M);
  if (!tma_detail::make_map(&mx, xprep, 2 * kp, M, 2 * kp, 0, 1, mt) ||
      !make_map_2d(&mw, v.qweight, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, v.N, v.qrows, wrows) ||
      !make_map_2d(&ms, v.scales, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, v.N, v.groups, 1) ||
      !make_map_2d(&mz, v.zeros, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, v.N, v.groups, 1))
    return Status::device(validate::err(fn, "cuTensorMapEncodeTiled rejected the operands (kp=" + std::to_string(kp) +
                                                ", N=" + std::to_string(v.N) + ")"));
  const int64_t work = a.mtiles * a.ntiles * a.splits;
  const unsigned grid = static_cast<unsigned>(work < sms ? work : sms);
  const cudaError_t err = with_wgt_kernel(fp16, v.bits[0], v.asym, mt, [&](auto kernel, int smem) {
    return launch_pdl(kernel, dim3(grid), dim3(kTThreads), static_cast<size_t>(smem), stream, /*pdl=*/true, mx, mw, ms, mz,
                      a);
  });
  if (err != cudaSuccess)
    return Status::device(validate::err(fn, std::string("TMA warpgroup kernel launch failed: ") + cudaGetErrorString(err)));
  return Status::ok();
}

}  // namespace wq_detail
}  // namespace cuda
}  // namespace lowbit

// LSQ / straight-through input gradients on CUDA: one pass over (g, x) writes grad_x and leaves float64
// partial sums for grad_shift and grad_scale in the caller's workspace; a small second kernel adds the
// partials in a fixed order. Contract (element math, rounding, the sums): include/lowbit/kernels/lsq_grad.h.
//
// The pass is memory-bound (per element: 4-8 bytes read, 2-4 written, about 15 flops), so it is shaped by
// memory traffic and by keeping the reductions off the critical path:
//   * A thread owns 8 consecutive elements of a row per step (kGroup): one 16-byte load per fp16/bf16
//     operand, two per fp32 operand, the same for the grad_x store. Taken when every such access is
//     aligned (the "vector" kernels); otherwise the same work with element loads (still coalesced enough:
//     the 8 elements of a thread share 32-byte sectors that L1 keeps between the 8 loads).
//   * Column mode (inner == 1 and a shift or grad_shift: linear, NHWC conv): block = tx threads across
//     columns x ty across rows (tx * ty = 256, tx <= 64 so that a warp reads >= 256 contiguous bytes of
//     a row). A unit is a tile of ty * rpt rows x tx * 8 columns; each thread keeps 8 column sums and one
//     scale sum in fp64 registers over its rows, then the block adds the ty rows of column sums with a
//     fixed shared-memory tree, and the scale sums with a fixed shuffle tree. The shift values of a
//     thread's columns are loaded once per unit.
//   * Row mode (everything else: NCHW conv with inner = H*W, or no channel at all, "flat"): a warp owns
//     one segment (<= 2048 elements, a multiple of 256) of the rows (o, c) for `group` consecutive o, so
//     the shift is one value per unit and the channel sum is one fp64 register (shuffle tree at the end);
//     the 8 warps of a block of work add their scale sums into one partial (fixed tree).
//   * The partition (units and the order inside each) is a function of the sizes only: not of the GPU,
//     the grid, the timing or the pointers' alignment (the vector and element paths of column mode sum in
//     the same order; in row mode the lane-to-element mapping differs, so the last bits of the sums may
//     differ between an aligned and a misaligned copy of the same data, never between runs). The grid is
//     min(blocks of work, 8 per SM) and loops over them; no atomics anywhere.
//   * The reduce kernel: grad_shift[c] = sum over j of ws[j * C + c] (cx channels x 512/cx j-lanes per
//     block, about 8 partials per j-lane, fixed tree over the j-lanes), grad_scale by one block. It is a
//     programmatic dependent launch on sm_90+ (the pass triggers at block start, the reducer waits in
//     griddepcontrol.wait), which hides its launch latency; a driver that refuses it gets a plain launch.
//
// Workspace (fp64): [J][C] channel partials (J = row tiles, or o groups x segments), then one scale
// partial per block of work. Linear M = 8192, K = 4096: 128 x 4096 + 1024 doubles (4 MB, against 200 MB
// of fp32 data moved); NHWC conv 32x64x56x56: 1568 x 64 + 1568 (0.8 MB against 77 MB).
//
// Bitwise agreement of grad_x with the CPU: the same fp32 operations in the same order through the _rn
// intrinsics (never contracted into FMAs, whatever -fmad says), IEEE division (__fdiv_rn), rintf (round
// half even), and the narrowing of float_convert.h (fp16 by cvt.rn, bf16 by the same integer round-half-
// even), every NaN replaced by the canonical one. The file refuses to build with --use_fast_math.
#include "lowbit/kernels/lsq_grad.h"
#include "pdl.cuh"

#ifdef __USE_FAST_MATH__
#error "lsq_grad.cu must not be built with --use_fast_math: it flushes subnormals and breaks bitwise CPU parity"
#endif

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "../validate.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;             // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;                 // consecutive elements per thread-step (16 bytes of fp16/bf16)
constexpr int kMaxTx = 64;                // column mode: threads across columns (512 columns per unit)
constexpr int kMaxRowsPerThread = 16;     // column mode: rows a thread walks per unit, at most
constexpr int64_t kTargetUnits = 1024;    // column mode: about one wave of 8 blocks on 132 SMs
constexpr int64_t kSegChunk = int64_t(32) * kGroup;  // row mode: 256 elements per warp-step
constexpr int64_t kMaxSeg = 2048;         // row mode: elements of one row per unit, at most
constexpr int64_t kTargetWarps = 8192;    // row mode: warp units to aim for
constexpr int kMaxGroup = 64;             // row mode: consecutive o per unit, at most
constexpr int kBlocksPerSm = 8;           // grid cap (8 x 256 = 2048 threads: a full SM)

// ---------------------------------------------------------------------------------------------------
// The plan: a function of the sizes and of the requested outputs only.

struct Plan {
  bool column_mode = false;
  int64_t C = 1;        // channels of the partial layout (1 in the flat case)
  int64_t J = 0;        // partials per channel
  int64_t units = 0;    // column mode: blocks of work; row mode: warps of work
  int64_t n_scale = 0;  // scale partials: one per block of work (row mode: per kWarps consecutive warps)
  // column mode
  int tx = 1, ty = 1;   // threads across columns / rows
  int64_t rows = 0;     // outer
  int64_t n_ct = 0;     // column tiles (tx * kGroup columns each)
  int64_t tile_rows = 0;
  // row mode
  int64_t outer = 0, len = 0, seg = 0, nseg = 0, group = 1, n_og = 0;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ int64_t ceil_div_dev(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

Plan make_plan(const LsqGradParams& p, int64_t total) {
  Plan pl;
  if (total == 0) return pl;  // no units: only the reduce kernel runs (it writes the zeros)
  const bool per_channel = p.shift != nullptr || p.grad_shift != nullptr;
  if (per_channel && p.inner == 1) {
    pl.column_mode = true;
    pl.C = p.channels;
    pl.rows = p.outer;
    const int64_t vecs = ceil_div(p.channels, kGroup);
    pl.tx = int(std::min<int64_t>(kMaxTx, pow2_ceil(vecs)));
    pl.ty = kThreads / pl.tx;
    pl.n_ct = ceil_div(vecs, pl.tx);
    int64_t rpt = kMaxRowsPerThread;
    while (rpt > 1 && ceil_div(pl.rows, pl.ty * rpt) * pl.n_ct < kTargetUnits) rpt /= 2;
    pl.tile_rows = pl.ty * rpt;
    pl.J = ceil_div(pl.rows, pl.tile_rows);
    pl.units = pl.J * pl.n_ct;
    pl.n_scale = pl.units;
    return pl;
  }
  if (per_channel) {
    pl.outer = p.outer;
    pl.C = p.channels;
    pl.len = p.inner;
  } else {
    pl.outer = 1;
    pl.C = 1;
    pl.len = total;
  }
  // Segments: about kTargetWarps of them over the whole tensor, whole 256-element warp-steps, at most
  // kMaxSeg, never longer than the row needs.
  const int64_t want = ceil_div(ceil_div(total, kTargetWarps), kSegChunk) * kSegChunk;
  pl.seg = std::min({ceil_div(pl.len, kSegChunk) * kSegChunk, std::max(kSegChunk, want), kMaxSeg});
  pl.nseg = ceil_div(pl.len, pl.seg);
  // Short rows: a warp also walks `group` consecutive o of its (c, segment), while that leaves enough units.
  const int64_t per_row = std::min(pl.len, pl.seg);
  while (pl.group * 2 <= kMaxGroup && pl.group * 2 * per_row <= 4096 &&
         ceil_div(pl.outer, pl.group * 2) * pl.C * pl.nseg >= kTargetWarps)
    pl.group *= 2;
  pl.n_og = ceil_div(pl.outer, pl.group);
  pl.J = pl.n_og * pl.nseg;
  pl.units = pl.n_og * pl.C * pl.nseg;
  pl.n_scale = ceil_div(pl.units, kWarps);
  return pl;
}

// Workspace: [J][C] fp64 channel partials (grad_shift), then [n_scale] fp64 scale partials (grad_scale).
struct WsLayout {
  int64_t n_shift = 0, n_scale = 0;
  size_t bytes() const { return size_t(n_shift + n_scale) * sizeof(double); }
};

Status ws_layout(const char* fn, const LsqGradParams& p, const Plan& pl, int64_t total, WsLayout* w) {
  w->n_shift = 0;
  w->n_scale = 0;
  if (total == 0) return Status::ok();  // the reduce kernel writes the zeros without reading anything
  if (p.grad_shift != nullptr) {
    if (pl.J > (int64_t(1) << 60) / std::max<int64_t>(pl.C, 1))
      return Status::invalid(validate::err(fn, "the workspace size overflows"));
    w->n_shift = pl.J * pl.C;
  }
  if (p.grad_scale != nullptr) w->n_scale = pl.n_scale;
  return Status::ok();
}

// ---------------------------------------------------------------------------------------------------
// Device helpers.


// Storage of one element: fp32 as float, fp16 / bf16 as their 16 bits.
template <DType T>
struct Store {
  using type = uint16_t;
};
template <>
struct Store<DType::kFloat32> {
  using type = float;
};

template <DType T>
__device__ __forceinline__ float widen(typename Store<T>::type b) {
  if constexpr (T == DType::kFloat32) {
    return b;
  } else if constexpr (T == DType::kFloat16) {
    return __half2float(__ushort_as_half(b));  // exact
  } else {
    return __uint_as_float(uint32_t(b) << 16);  // exact
  }
}

// float_convert.h's float_to_half / float_to_bf16 for numbers, the canonical quiet NaN of each dtype for
// NaN (lsq_grad.h; a GPU's arithmetic NaN is 0x7fffffff, a CPU's often 0xffc00000).
template <DType T>
__device__ __forceinline__ typename Store<T>::type narrow(float f) {
  if constexpr (T == DType::kFloat32) {
    return f != f ? __uint_as_float(0x7fc00000u) : f;
  } else if constexpr (T == DType::kFloat16) {
    if (f != f) return uint16_t(0x7e00u);
    return __half_as_ushort(__float2half_rn(f));  // cvt.rn.f16.f32: IEEE round half even, overflow to inf
  } else {
    if (f != f) return uint16_t(0x7fc0u);
    const uint32_t u = __float_as_uint(f);
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

// A sum rounded to fp32, NaN canonical.
__device__ __forceinline__ float sum_to_float(double v) {
  const float f = float(v);
  return f != f ? __uint_as_float(0x7fc00000u) : f;
}

// A sum's output element i in dtype t: rounded to fp32 (NaN canonical), then as narrow<t> (the bits of
// a .to(t) of the fp32 value, NaN canonical).
__device__ __forceinline__ void store_sum(DType t, void* p, int64_t i, double v) {
  const float f = sum_to_float(v);
  switch (t) {
    case DType::kFloat16: static_cast<uint16_t*>(p)[i] = narrow<DType::kFloat16>(f); break;
    case DType::kBFloat16: static_cast<uint16_t*>(p)[i] = narrow<DType::kBFloat16>(f); break;
    default: static_cast<float*>(p)[i] = f; break;
  }
}

// 8 consecutive elements at p (16-byte aligned) as fp32.
template <DType T>
__device__ __forceinline__ void load8_vec(const typename Store<T>::type* p, float (&f)[kGroup]) {
  if constexpr (T == DType::kFloat32) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[2 * j] = widen<T>(uint16_t(w[j] & 0xffffu));
      f[2 * j + 1] = widen<T>(uint16_t(w[j] >> 16));
    }
  }
}

template <DType T>
__device__ __forceinline__ void store8_vec(typename Store<T>::type* p, const float (&f)[kGroup]) {
  if constexpr (T == DType::kFloat32) {
    float c[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) c[j] = narrow<T>(f[j]);  // canonical NaN
    reinterpret_cast<float4*>(p)[0] = make_float4(c[0], c[1], c[2], c[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(c[4], c[5], c[6], c[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = uint32_t(narrow<T>(f[2 * j])) | (uint32_t(narrow<T>(f[2 * j + 1])) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Everything one step needs besides the data: the call's scalars.
struct ElemConst {
  float s;         // step
  float lo, hi;    // float(qmin), float(qmax)
  float gs;        // g multiplier
  bool has_gs;
};

// One element: grad_x value and fp32(R * g). The contract's formula, operation by operation.
__device__ __forceinline__ void lsq_elem(const ElemConst& k, float g, float t, float& gx, float& rg) {
  if (k.has_gs) g = __fmul_rn(g, k.gs);
  const float v = __fdiv_rn(t, k.s);
  const bool below = v < k.lo, above = v > k.hi;
  const bool inside = !below && !above && v == v;
  gx = __fmul_rn(g, inside ? 1.0f : 0.0f);
  const float r = below ? k.lo : (above ? k.hi : __fsub_rn(rintf(v), v));
  rg = __fmul_rn(r, g);
}

// The kernels' arguments (validated, pointers typed by the host side).
struct PassArgs {
  const void* g;
  const void* x;
  const float* shift;    // or nullptr
  const float* step;
  const float* g_scale;  // or nullptr
  void* grad_x;          // or nullptr
  double* ws_shift;      // [J][C] or nullptr
  double* ws_scale;      // [units] or nullptr
  float lo, hi;
  Plan pl;
};

// Fixed-order sum of one fp64 per thread over the block; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* smem /* kWarps */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) total += smem[w];
  return total;
}

// ---------------------------------------------------------------------------------------------------
// Column mode: element (r, c) at r * C + c; unit = (row tile, column tile).

template <DType G, DType X, bool VEC>
__global__ void __launch_bounds__(kThreads) lsq_cols_kernel(const PassArgs a) {
  using GS = typename Store<G>::type;
  using XS = typename Store<X>::type;
  __shared__ double red[kThreads * kGroup];  // column partials of the ty rows of threads
  __shared__ double red_scale[kWarps];
  pdl_trigger();
  const Plan& pl = a.pl;
  const GS* gp = static_cast<const GS*>(a.g);
  const XS* xp = static_cast<const XS*>(a.x);
  XS* gxp = static_cast<XS*>(a.grad_x);
  const ElemConst k{__ldg(a.step), a.lo, a.hi, a.g_scale != nullptr ? __ldg(a.g_scale) : 1.0f, a.g_scale != nullptr};
  const int tx = threadIdx.x % pl.tx, ty = threadIdx.x / pl.tx;
  const int64_t C = pl.C;

  for (int64_t u = blockIdx.x; u < pl.units; u += gridDim.x) {
    const int64_t rt = u / pl.n_ct, ct = u % pl.n_ct;
    const int64_t col0 = (ct * pl.tx + tx) * kGroup;
    const int nc = int(std::min<int64_t>(std::max<int64_t>(C - col0, 0), kGroup));  // valid columns
    float sv[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) sv[j] = (a.shift != nullptr && j < nc) ? __ldg(a.shift + col0 + j) : 0.0f;
    double acc[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) acc[j] = 0.0;
    double acc_s = 0.0;
    const int64_t r0 = rt * pl.tile_rows;
    const int64_t r1 = std::min(pl.rows, r0 + pl.tile_rows);

    // One group of 8 at row r: loads (or element loads for the valid columns), math, store, sums.
    auto process = [&](const float (&g)[kGroup], const float (&x)[kGroup], int64_t e) {
      float gx[kGroup];
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        float rg;
        const float t = a.shift != nullptr ? __fadd_rn(x[j], sv[j]) : x[j];
        lsq_elem(k, g[j], t, gx[j], rg);
        if (VEC || j < nc) {
          acc[j] += double(gx[j]);
          acc_s += double(rg);
        }
      }
      if (gxp != nullptr) {
        if (VEC) {
          store8_vec<X>(gxp + e, gx);
        } else {
#pragma unroll
          for (int j = 0; j < kGroup; ++j)
            if (j < nc) gxp[e + j] = narrow<X>(gx[j]);
        }
      }
    };
    auto load = [&](int64_t e, float (&g)[kGroup], float (&x)[kGroup]) {
      if (VEC) {
        load8_vec<G>(gp + e, g);
        load8_vec<X>(xp + e, x);
      } else {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          g[j] = j < nc ? widen<G>(gp[e + j]) : 0.0f;
          x[j] = j < nc ? widen<X>(xp[e + j]) : 0.0f;
        }
      }
    };

    if (nc > 0) {
      // Two rows per iteration, both loaded before either is used: twice the bytes in flight.
      for (int64_t r = r0 + ty; r < r1; r += 2 * int64_t(pl.ty)) {
        const int64_t r2 = r + pl.ty;
        float g0[kGroup], x0[kGroup], g1[kGroup], x1[kGroup];
        load(r * C + col0, g0, x0);
        if (r2 < r1) load(r2 * C + col0, g1, x1);
        process(g0, x0, r * C + col0);
        if (r2 < r1) process(g1, x1, r2 * C + col0);
      }
    }

    if (a.ws_shift != nullptr) {
      if (pl.ty > 1) {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) red[j * kThreads + threadIdx.x] = acc[j];  // [j][thread]: no bank conflicts
        __syncthreads();
        for (int h = pl.ty / 2; h > 0; h /= 2) {  // fixed tree over the ty rows of threads
          if (ty < h) {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) red[j * kThreads + threadIdx.x] += red[j * kThreads + threadIdx.x + h * pl.tx];
          }
          __syncthreads();
        }
        if (ty == 0) {
#pragma unroll
          for (int j = 0; j < kGroup; ++j) acc[j] = red[j * kThreads + threadIdx.x];
        }
      }
      if (ty == 0) {
#pragma unroll
        for (int j = 0; j < kGroup; ++j)
          if (j < nc) a.ws_shift[rt * C + col0 + j] = acc[j];
      }
    }
    if (a.ws_scale != nullptr) {
      const double total = block_sum(acc_s, red_scale);
      if (threadIdx.x == 0) a.ws_scale[u] = total;
    }
    __syncthreads();  // shared memory is reused by the next unit
  }
}

// ---------------------------------------------------------------------------------------------------
// Row mode: element (o, c, i) at (o * C + c) * len + i; warp unit = (o group, c, segment).

template <DType G, DType X, bool VEC>
__global__ void __launch_bounds__(kThreads) lsq_rows_kernel(const PassArgs a) {
  using GS = typename Store<G>::type;
  using XS = typename Store<X>::type;
  pdl_trigger();
  const Plan& pl = a.pl;
  const GS* gp = static_cast<const GS*>(a.g);
  const XS* xp = static_cast<const XS*>(a.x);
  XS* gxp = static_cast<XS*>(a.grad_x);
  const ElemConst k{__ldg(a.step), a.lo, a.hi, a.g_scale != nullptr ? __ldg(a.g_scale) : 1.0f, a.g_scale != nullptr};
  __shared__ double red_scale[kWarps];
  const int lane = threadIdx.x & 31;
  const int64_t blocks_of_work = ceil_div_dev(pl.units, kWarps);

  // Block b of work: warp units b * kWarps + warp. The channel sum of a warp unit is one partial; the
  // scale sums of the block's warps are one partial (fixed trees both).
  for (int64_t b = blockIdx.x; b < blocks_of_work; b += gridDim.x) {
    const int64_t w = b * kWarps + (threadIdx.x >> 5);
    double acc = 0.0, acc_s = 0.0;
    if (w < pl.units) {
      const int64_t sg = w % pl.nseg;
      const int64_t oc = w / pl.nseg;
      const int64_t c = oc % pl.C, og = oc / pl.C;
      const float sh = a.shift != nullptr ? __ldg(a.shift + c) : 0.0f;
      const int64_t i0 = sg * pl.seg;
      const int64_t i1 = std::min(pl.len, i0 + pl.seg);
      const int64_t o1 = std::min(pl.outer, (og + 1) * pl.group);
      for (int64_t o = og * pl.group; o < o1; ++o) {
        const int64_t base = (o * pl.C + c) * pl.len;
        for (int64_t i = i0; i < i1; i += kSegChunk) {
          // VEC: lane owns elements i + lane*8 .. +7 (one or two 16-byte loads). Otherwise lane owns
          // i + lane + 32*j: every load instruction of the warp reads consecutive elements.
          float g[kGroup], x[kGroup];
          int n = 0;  // valid elements of this lane's group
          if (VEC) {
            const int64_t e = i + lane * kGroup;
            n = int(std::min<int64_t>(std::max<int64_t>(i1 - e, 0), kGroup));
            if (n == kGroup) {
              load8_vec<G>(gp + base + e, g);
              load8_vec<X>(xp + base + e, x);
            } else {
#pragma unroll
              for (int j = 0; j < kGroup; ++j) {
                g[j] = j < n ? widen<G>(gp[base + e + j]) : 0.0f;
                x[j] = j < n ? widen<X>(xp[base + e + j]) : 0.0f;
              }
            }
          } else {
#pragma unroll
            for (int j = 0; j < kGroup; ++j) {
              const int64_t e = i + lane + 32 * j;
              g[j] = e < i1 ? widen<G>(gp[base + e]) : 0.0f;
              x[j] = e < i1 ? widen<X>(xp[base + e]) : 0.0f;
            }
          }
          float gx[kGroup];
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            float rg;
            const float t = a.shift != nullptr ? __fadd_rn(x[j], sh) : x[j];
            lsq_elem(k, g[j], t, gx[j], rg);
            const bool valid = VEC ? j < n : i + lane + 32 * j < i1;
            if (valid) {
              acc += double(gx[j]);
              acc_s += double(rg);
            }
          }
          if (gxp != nullptr) {
            if (VEC && n == kGroup) {
              store8_vec<X>(gxp + base + i + lane * kGroup, gx);
            } else {
#pragma unroll
              for (int j = 0; j < kGroup; ++j) {
                const int64_t e = VEC ? i + lane * kGroup + j : i + lane + 32 * j;
                if (e < i1) gxp[base + e] = narrow<X>(gx[j]);
              }
            }
          }
        }
      }
      if (a.ws_shift != nullptr) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);  // fixed tree
        if (lane == 0) a.ws_shift[(og * pl.nseg + sg) * pl.C + c] = acc;
      }
    }
    if (a.ws_scale != nullptr) {
      const double total = block_sum(acc_s, red_scale);
      if (threadIdx.x == 0) a.ws_scale[b] = total;
    }
    __syncthreads();  // red_scale is reused by the next block of work
  }
}

// ---------------------------------------------------------------------------------------------------
// The partials, summed in j order per channel and in unit order for the scale. Blocks [0, shift_blocks):
// cx channels x (kReduceThreads / cx) j-lanes each; a j-lane adds every (kReduceThreads / cx)-th partial
// of its channel in j order, then a fixed shared-memory tree adds the j-lanes. cx is chosen (host side)
// for about 8 partials per j-lane with at least 4 channels (one 32-byte sector) per row of loads: many
// partials of few channels (NHWC conv: C = 64, J ~ 1500) spread over many threads, a wide C over many
// blocks. Block shift_blocks (when grad_scale is asked for): the scale partials, the same way.
constexpr int kReduceThreads = 512;

__global__ void __launch_bounds__(kReduceThreads) lsq_reduce_kernel(
    const double* __restrict__ ws_shift,  // [J][C], or unused when J == 0
    int64_t J, int64_t C,                 // partials per channel, channels
    int cx,                               // channels per block (power of two <= 32)
    int shift_blocks,                     // blocks for grad_shift (0 when not requested)
    const double* __restrict__ ws_scale,  // [U]
    int64_t U,                            // scale partials
    double factor,                        // 1 / sqrt(numel * qmax)
    void* __restrict__ grad_shift,        // (C,) in shift_t, or nullptr
    DType shift_t,
    void* __restrict__ grad_scale,        // one in scale_t, or nullptr
    DType scale_t) {
  __shared__ double red[kReduceThreads];
  pdl_wait();
  if (int(blockIdx.x) < shift_blocks) {
    const int tx = threadIdx.x % cx, ty = threadIdx.x / cx, tys = kReduceThreads / cx;
    const int64_t c = int64_t(blockIdx.x) * cx + tx;
    double sum = 0.0;
    if (c < C) {
#pragma unroll 4
      for (int64_t j = ty; j < J; j += tys) sum += ws_shift[j * C + c];
    }
    red[threadIdx.x] = sum;
    __syncthreads();
    for (int h = tys / 2; h > 0; h /= 2) {
      if (ty < h) red[threadIdx.x] += red[threadIdx.x + h * cx];
      __syncthreads();
    }
    if (ty == 0 && c < C) store_sum(shift_t, grad_shift, c, red[tx]);
  } else if (grad_scale != nullptr) {
    double sum = 0.0;
#pragma unroll 4
    for (int64_t j = threadIdx.x; j < U; j += kReduceThreads) sum += ws_scale[j];
    red[threadIdx.x] = sum;
    __syncthreads();
    for (int h = kReduceThreads / 2; h > 0; h /= 2) {
      if (int(threadIdx.x) < h) red[threadIdx.x] += red[threadIdx.x + h];
      __syncthreads();
    }
    if (threadIdx.x == 0) store_sum(scale_t, grad_scale, 0, red[0] * factor);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

Status launch_error(const char* fn, const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::ok();
  return Status::device(validate::err(fn, std::string(what) + ": " + cudaGetErrorString(err)));
}

Status device_props(const char* fn, int* sms, int* major) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return Status::device(validate::err(fn, cudaGetErrorString(err)));
  if (*sms < 1) *sms = 1;
  return Status::ok();
}

template <DType G, DType X>
void launch_pass(const PassArgs& a, bool vec, int blocks, cudaStream_t stream) {
  if (a.pl.column_mode) {
    if (vec)
      lsq_cols_kernel<G, X, true><<<blocks, kThreads, 0, stream>>>(a);
    else
      lsq_cols_kernel<G, X, false><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    if (vec)
      lsq_rows_kernel<G, X, true><<<blocks, kThreads, 0, stream>>>(a);
    else
      lsq_rows_kernel<G, X, false><<<blocks, kThreads, 0, stream>>>(a);
  }
}

template <DType G>
void launch_pass_x(DType x, const PassArgs& a, bool vec, int blocks, cudaStream_t stream) {
  switch (x) {
    case DType::kFloat32: launch_pass<G, DType::kFloat32>(a, vec, blocks, stream); break;
    case DType::kFloat16: launch_pass<G, DType::kFloat16>(a, vec, blocks, stream); break;
    case DType::kBFloat16: launch_pass<G, DType::kBFloat16>(a, vec, blocks, stream); break;
  }
}

Status launch_reduce(const char* fn, const LsqGradParams& p, const Plan& pl, const double* ws_shift,
                     const double* ws_scale, int64_t n_scale, int major, cudaStream_t stream) {
  const bool want_shift = p.grad_shift != nullptr && p.channels > 0;
  const int64_t J = ws_shift != nullptr ? pl.J : 0;
  int64_t tys = 1;  // j-lanes: about 8 partials each, at most kReduceThreads / 4
  while (tys < kReduceThreads / 4 && tys * 8 < J) tys *= 2;
  const int cx = int(std::min<int64_t>({kReduceThreads / tys, 32, pow2_ceil(std::max<int64_t>(p.channels, 1))}));
  const int64_t shift_blocks64 = want_shift ? ceil_div(p.channels, cx) : 0;
  if (shift_blocks64 > (int64_t(1) << 30)) return Status::invalid(validate::err(fn, "too many channels"));
  const int shift_blocks = int(shift_blocks64);
  const int blocks = shift_blocks + (p.grad_scale != nullptr ? 1 : 0);
  if (blocks == 0) return Status::ok();
  const double factor = p.grad_scale != nullptr ? 1.0 / std::sqrt(double(p.numel) * double(p.qmax)) : 0.0;
  const cudaError_t err = launch_pdl(lsq_reduce_kernel, dim3(unsigned(blocks)), dim3(kReduceThreads), 0, stream,
                                     major >= 9, ws_shift, J, p.channels, cx, shift_blocks, ws_scale, n_scale, factor,
                                     p.grad_shift, p.shift_out_type, p.grad_scale, p.scale_out_type);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status::device(validate::err(fn, std::string("reduce kernel launch failed: ") + cudaGetErrorString(err)));
  }
  return launch_error(fn, "reduce kernel launch failed");
}

}  // namespace

Status lsq_grad_workspace_bytes(const LsqGradParams& p, size_t* bytes) {
  const char* fn = "lowbit::cuda::lsq_grad_workspace_bytes";
  if (bytes == nullptr) return Status::invalid(validate::err(fn, "bytes is null"));
  *bytes = 0;
  int64_t total = 0;
  bool wants = false;
  // Only the sizes and which pointers are null matter here: the data pointers need not be set yet.
  static const float placeholder = 1.0f;
  LsqGradParams q = p;
  if (q.g == nullptr) q.g = &placeholder;
  if (q.x == nullptr) q.x = &placeholder;
  if (q.step == nullptr) q.step = &placeholder;
  Status st = validate::lsq_grad(fn, q, &total, &wants);
  if (!st.is_ok() || !wants) return st;
  WsLayout w;
  st = ws_layout(fn, p, make_plan(p, total), total, &w);
  if (st.is_ok()) *bytes = w.bytes();
  return st;
}

Status lsq_grad(const LsqGradParams& p, void* workspace, size_t workspace_bytes, CUstream_st* stream) {
  const char* fn = "lowbit::cuda::lsq_grad";
  int64_t total = 0;
  bool wants = false;
  Status st = validate::lsq_grad(fn, p, &total, &wants);
  if (!st.is_ok() || !wants) return st;
  const Plan pl = make_plan(p, total);
  WsLayout w;
  st = ws_layout(fn, p, pl, total, &w);
  if (!st.is_ok()) return st;
  if (w.bytes() > 0) {
    if (workspace == nullptr || workspace_bytes < w.bytes())
      return Status::invalid(validate::err(fn, "workspace_bytes must be >= " + std::to_string(w.bytes()) +
                                                   " (lsq_grad_workspace_bytes), got " +
                                                   std::to_string(workspace == nullptr ? 0 : workspace_bytes)));
    if (!aligned(workspace, 8)) return Status::invalid(validate::err(fn, "workspace must be 8-byte aligned"));
  }
  cudaStream_t cs = reinterpret_cast<cudaStream_t>(stream);
  int sms = 1, major = 0;
  st = device_props(fn, &sms, &major);
  if (!st.is_ok()) return st;

  double* ws_shift = w.n_shift > 0 ? static_cast<double*>(workspace) : nullptr;
  double* ws_scale = w.n_scale > 0 ? static_cast<double*>(workspace) + w.n_shift : nullptr;
  if (total > 0) {
    PassArgs a;
    a.g = p.g;
    a.x = p.x;
    a.shift = p.shift;
    a.step = p.step;
    a.g_scale = p.g_scale;
    a.grad_x = p.grad_x;
    a.ws_shift = ws_shift;
    a.ws_scale = ws_scale;
    a.lo = float(p.qmin);
    a.hi = float(p.qmax);
    a.pl = pl;
    // The vector kernels read g and x and write grad_x 16 bytes at a time along rows that start at
    // multiples of 8 elements (flat row mode: the single row starts at 0; its tail is handled per element).
    const bool rows_ok = pl.column_mode ? pl.C % kGroup == 0 : (pl.C == 1 && pl.outer == 1) || pl.len % kGroup == 0;
    const bool vec = rows_ok && aligned(p.g, 16) && aligned(p.x, 16) && (p.grad_x == nullptr || aligned(p.grad_x, 16));
    const int64_t blocks = std::min<int64_t>(pl.n_scale, int64_t(sms) * kBlocksPerSm);  // n_scale: blocks of work
    switch (p.g_type) {
      case DType::kFloat32: launch_pass_x<DType::kFloat32>(p.x_type, a, vec, int(blocks), cs); break;
      case DType::kFloat16: launch_pass_x<DType::kFloat16>(p.x_type, a, vec, int(blocks), cs); break;
      case DType::kBFloat16: launch_pass_x<DType::kBFloat16>(p.x_type, a, vec, int(blocks), cs); break;
    }
    st = launch_error(fn, "kernel launch failed");
    if (!st.is_ok()) return st;
  }
  return launch_reduce(fn, p, pl, ws_shift, ws_scale, w.n_scale, major, cs);
}

}  // namespace cuda
}  // namespace lowbit

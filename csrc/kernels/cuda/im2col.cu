// im2col for int8 NHWC on CUDA. Contract: include/lowbit/kernels/im2col.h.
//
// One thread per output UNIT, grid-stride over flat indices of cols: consecutive threads write
// consecutive units (coalesced stores), and within a tap they read consecutive units of one pixel's
// channel run. A unit is 16, 4 or 1 bytes: the widest that divides C, c0 and Cg and to which both base
// pointers are aligned, so a tap (Cg bytes) is always a whole number of units, in x and in cols alike.
// Typical convolution channel counts take the 16-byte path.
//
// Decoding a flat index takes five divisions; 64-bit integer division is a long instruction sequence on
// the GPU, so when every index the kernel forms fits comfortably in int32 (the common case) the same
// kernel is instantiated with int32 arithmetic; otherwise int64. The host side validates with the checks the
// CPU entry point uses (csrc/kernels/validate.h) and launches nothing for an invalid shape.
#include "lowbit/kernels/im2col.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../validate.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Shape in units of the vector type; Index is int32_t or int64_t (signed: tap coordinates go negative).
template <typename Index>
struct Geom {
  Index H, W, C;      // input (C in units)
  Index Ho, Wo;       // output spatial size
  Index kw, kk;       // kernel width, kh * kw
  Index sh, sw, ph, pw, dh, dw;
  Index c0, Cg;       // group's first channel and channel count, in units
  Index total;        // N * Ho * Wo * kk * Cg units of cols
};

template <typename Unit, typename Index>
__global__ void __launch_bounds__(kThreads) im2col_kernel(const Unit* __restrict__ x, Geom<Index> g,
                                                          Unit* __restrict__ cols) {
  const Index stride = Index(gridDim.x) * Index(blockDim.x);
  for (Index e = Index(blockIdx.x) * Index(blockDim.x) + Index(threadIdx.x); e < g.total; e += stride) {
    const Index rt = e / g.Cg;           // (row, tap)
    const Index c = e - rt * g.Cg;       // unit within the tap's channel run
    const Index row = rt / g.kk;
    const Index tap = rt - row * g.kk;
    const Index a = tap / g.kw, b = tap - a * g.kw;
    const Index t = row / g.Wo, q = row - t * g.Wo;
    const Index n = t / g.Ho, p = t - n * g.Ho;
    const Index ih = p * g.sh - g.ph + a * g.dh;
    const Index iw = q * g.sw - g.pw + b * g.dw;
    Unit v{};  // zero padding: code 0
    if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) v = x[((n * g.H + ih) * g.W + iw) * g.C + g.c0 + c];
    cols[e] = v;
  }
}

// Blocks for `work` threads: enough to cover it, capped at a few waves (the loop is grid-stride).
Status grid_for(const char* fn, int64_t work, int* blocks) {
  int device = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return Status::device(validate::err(fn, cudaGetErrorString(e)));
  const int64_t needed = (work + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sms > 0 ? sms : 1) * (2048 / kThreads) * 4;
  *blocks = static_cast<int>(std::min(needed, cap));
  return Status::ok();
}

template <typename Unit, typename Index>
void launch(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, int8_t* cols, int64_t Ho, int64_t Wo,
            int64_t total_units, int blocks, cudaStream_t stream) {
  constexpr int64_t u = sizeof(Unit);
  const Geom<Index> g{Index(s.H), Index(s.W), Index(s.C / u), Index(Ho), Index(Wo), Index(s.kw),
                      Index(s.kh * s.kw), Index(s.sh), Index(s.sw), Index(s.ph), Index(s.pw), Index(s.dh),
                      Index(s.dw), Index(c0 / u), Index(Cg / u), Index(total_units)};
  im2col_kernel<Unit, Index><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const Unit*>(x), g,
                                                              reinterpret_cast<Unit*>(cols));
}

template <typename Unit>
void launch_any_index(bool narrow, const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, int8_t* cols,
                      int64_t Ho, int64_t Wo, int64_t total_units, int blocks, cudaStream_t stream) {
  if (narrow)
    launch<Unit, int32_t>(x, s, c0, Cg, cols, Ho, Wo, total_units, blocks, stream);
  else
    launch<Unit, int64_t>(x, s, c0, Cg, cols, Ho, Wo, total_units, blocks, stream);
}

}  // namespace

Status im2col_s8_nhwc(const int8_t* x, const Conv2dShape& s, int64_t c0, int64_t Cg, int8_t* cols,
                      CUstream_st* stream) {
  const char* fn = "lowbit::cuda::im2col_s8_nhwc";
  validate::Im2colDims dims;
  Status st = validate::im2col_s8_nhwc(fn, x, s, c0, Cg, cols, &dims);
  if (!st.is_ok()) return st;
  const int64_t Ho = dims.Ho, Wo = dims.Wo, x_len = dims.x_len, cols_len = dims.cols_len,
                padded_max = dims.padded_max;

  // Widest unit every tap is made of, in x and in cols.
  auto fits = [&](int64_t u) {
    return s.C % u == 0 && c0 % u == 0 && Cg % u == 0 && reinterpret_cast<uintptr_t>(x) % u == 0 &&
           reinterpret_cast<uintptr_t>(cols) % u == 0;
  };
  const int64_t unit = fits(16) ? 16 : (fits(4) ? 4 : 1);
  const int64_t total_units = cols_len / unit;

  // int32 arithmetic is exact when every value formed stays below 2^31 in magnitude: flat indices of x
  // (formed only for in-image taps) and of cols (plus one grid stride, below 2^21 here), and tap
  // coordinates p*sh - ph + a*dh, whose partial terms each lie within the padded extent. Strides and
  // dilations are bounded too so that their narrowing is exact even where they only ever multiply 0.
  constexpr int64_t kNarrow = int64_t(1) << 30;
  const bool narrow = x_len < kNarrow && cols_len < kNarrow && padded_max < kNarrow / 2 &&
                      std::max({s.sh, s.sw, s.dh, s.dw}) < kNarrow;

  int blocks = 0;
  st = grid_for(fn, total_units, &blocks);
  if (!st.is_ok()) return st;
  const cudaStream_t cs = reinterpret_cast<cudaStream_t>(stream);
  switch (unit) {
    case 16: launch_any_index<uint4>(narrow, x, s, c0, Cg, cols, Ho, Wo, total_units, blocks, cs); break;
    case 4: launch_any_index<uint32_t>(narrow, x, s, c0, Cg, cols, Ho, Wo, total_units, blocks, cs); break;
    default: launch_any_index<uint8_t>(narrow, x, s, c0, Cg, cols, Ho, Wo, total_units, blocks, cs); break;
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return Status::device(validate::err(fn, std::string("kernel launch failed: ") + cudaGetErrorString(e)));
  return Status::ok();
}

}  // namespace cuda
}  // namespace lowbit

// Sum of absolute values in float64: the statistic of the LSQ step size (lsq_scale = 2 * mean|x| / sqrt(qmax)).
//
//   *out = sum over i of |double(x[i])|      (x: n contiguous elements of xtype)
//
// * Read once, never copied: the input is widened element by element (the ATen composite this replaces
//   materialised a float64 copy of the whole tensor, 8 bytes per element, every training forward).
// * Deterministic: the elements are split into fixed chunks that depend on n only (not on thread counts
//   or the GPU), each chunk is summed in a fixed order, and the chunk sums are added in chunk order. The
//   CPU and CUDA orders differ, so the two float64 sums may differ in the last bits (the fp32 step they
//   give agrees unless that difference straddles an fp32 rounding boundary).
// * NaN anywhere gives NaN; inf gives inf.
//
// lsq_step: the LSQ step size itself (lowbit.lsq_scale) in the same launches, no scalar ops after them:
//
//   *out = qat_step( fp32( sum_abs(x) / double(n) * lsq_step_factor(qmax) ), eps )
//
// (float64 division and multiply, one rounding to fp32, then max with eps, NaN if either is NaN; without
// eps (eps.p null) the fp32 value itself). The same formula on both devices.
#pragma once
#include <cmath>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/quantize.h"

struct CUstream_st;

namespace lowbit {
namespace cpu {
// OpenMP over chunks; *out in host memory.
Status sum_abs_f64(DType xtype, const void* x, int64_t n, double* out);
// n >= 1; eps and out in host memory.
Status lsq_step(DType xtype, const void* x, int64_t n, double qmax, ScalarArg eps, float* out);
}  // namespace cpu

namespace cuda {
// Device pointers. workspace: sum_abs_f64_workspace_bytes(n) bytes of device memory (8-byte aligned) for
// the chunk sums; two launches on `stream`, no allocation, no host sync.
size_t sum_abs_f64_workspace_bytes(int64_t n);
Status sum_abs_f64(DType xtype, const void* x, int64_t n, double* out, void* workspace, size_t workspace_bytes,
                   CUstream_st* stream);
// n >= 1; eps and out device pointers; workspace as sum_abs_f64's (sum_abs_f64_workspace_bytes(n)).
Status lsq_step(DType xtype, const void* x, int64_t n, double qmax, ScalarArg eps, float* out, void* workspace,
                size_t workspace_bytes, CUstream_st* stream);
}  // namespace cuda

// 2 / sqrt(qmax), in float64 (computed on the host by both devices' entry points).
inline double lsq_step_factor(double qmax) { return 2.0 / std::sqrt(qmax); }
#if defined(__CUDACC__)
__host__ __device__
#endif
inline float lsq_step_value(double sum, int64_t n, double factor) {
  return static_cast<float>(sum / static_cast<double>(n) * factor);
}

// The fixed chunking both devices use: chunks of sum_abs_chunk(n) elements (a multiple of 256).
inline int64_t sum_abs_chunk(int64_t n) {
  const int64_t max_chunks = 1024, min_chunk = 4096;
  int64_t c = (n + max_chunks - 1) / max_chunks;
  if (c < min_chunk) c = min_chunk;
  return (c + 255) / 256 * 256;
}
}  // namespace lowbit

// cuda::sum_abs_f64 (reduce.h): one block per fixed chunk (reduce.h's sum_abs_chunk), each thread
// summing a fixed strided subset of the chunk in float64, a fixed shuffle tree per block; then one block
// adds the chunk sums in chunk order. Deterministic for a given n on any GPU.
#include "lowbit/kernels/reduce.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <string>

#include "quantize_internal.cuh"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
using quantize_detail::load_as_float;
using quantize_detail::widen;

// Sums v over the block in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sum_abs_chunks(const T* __restrict__ x, int64_t n, int64_t chunk,
                                                           double* __restrict__ part) {
  const int64_t b = int64_t(blockIdx.x) * chunk;
  const int64_t e = b + chunk < n ? b + chunk : n;
  double acc = 0.0;
  for (int64_t i = b + threadIdx.x; i < e; i += kThreads) acc += fabs(double(widen(x[i])));
  const double s = block_sum(acc);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

// What the last launch writes: the float64 sum (sum_abs_f64), or the LSQ step made from it (lsq_step).
struct SumOut {
  double* sum;      // set: the sum
  float* step;      // set: lsq_step's value (n, factor, eps below)
  int64_t n;
  double factor;
  ScalarArg eps;    // eps.p null: no max with eps
};

__global__ void __launch_bounds__(kThreads) sum_chunks(const double* __restrict__ part, int64_t chunks, SumOut out) {
  // Thread t adds chunks t, t + 256, ... in order; then the fixed block tree.
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) acc += part[c];
  const double s = block_sum(acc);
  if (threadIdx.x != 0) return;
  if (out.sum != nullptr) *out.sum = s;
  if (out.step != nullptr) {
    const float v = lsq_step_value(s, out.n, out.factor);
    *out.step = out.eps.p != nullptr ? qat_step(v, load_as_float(out.eps, 0)) : v;
  }
}

}  // namespace

size_t sum_abs_f64_workspace_bytes(int64_t n) {
  if (n <= 0) return 0;
  const int64_t chunk = sum_abs_chunk(n);
  return size_t((n + chunk - 1) / chunk) * sizeof(double);
}

namespace {
Status sum_launch(const std::string& fn, DType xtype, const void* x, int64_t n, const SumOut& out, void* workspace,
                  size_t workspace_bytes, CUstream_st* stream) {
  if (n < 0) return Status::invalid(fn + "n must be >= 0, got " + std::to_string(n));
  if (n > 0 && x == nullptr) return Status::invalid(fn + "x must not be null");
  if (xtype != DType::kFloat32 && xtype != DType::kFloat16 && xtype != DType::kBFloat16)
    return Status::invalid(fn + "xtype must be float32, float16 or bfloat16");
  const size_t need = sum_abs_f64_workspace_bytes(n);
  if (workspace_bytes < need || (need > 0 && workspace == nullptr))
    return Status::invalid(fn + "workspace needs " + std::to_string(need) + " bytes, got " +
                           std::to_string(workspace_bytes));
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  auto* part = static_cast<double*>(workspace);
  const int64_t chunk = sum_abs_chunk(n);
  const int64_t chunks = n > 0 ? (n + chunk - 1) / chunk : 0;
  if (chunks > 0) {
    switch (xtype) {
      case DType::kFloat32:
        sum_abs_chunks<float><<<unsigned(chunks), kThreads, 0, s>>>(static_cast<const float*>(x), n, chunk, part);
        break;
      case DType::kFloat16:
        sum_abs_chunks<__half><<<unsigned(chunks), kThreads, 0, s>>>(static_cast<const __half*>(x), n, chunk, part);
        break;
      case DType::kBFloat16:
        sum_abs_chunks<__nv_bfloat16>
            <<<unsigned(chunks), kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), n, chunk, part);
        break;
    }
  }
  sum_chunks<<<1, kThreads, 0, s>>>(part, chunks, out);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(fn + "kernel launch failed: " + cudaGetErrorString(err));
  return Status::ok();
}
}  // namespace

Status sum_abs_f64(DType xtype, const void* x, int64_t n, double* out, void* workspace, size_t workspace_bytes,
                   CUstream_st* stream) {
  const std::string fn = "lowbit::cuda::sum_abs_f64: ";
  if (out == nullptr) return Status::invalid(fn + "out must not be null");
  return sum_launch(fn, xtype, x, n, SumOut{out, nullptr, 0, 0.0, {nullptr, DType::kFloat32}}, workspace,
                    workspace_bytes, stream);
}

Status lsq_step(DType xtype, const void* x, int64_t n, double qmax, ScalarArg eps, float* out, void* workspace,
                size_t workspace_bytes, CUstream_st* stream) {
  const std::string fn = "lowbit::cuda::lsq_step: ";
  if (out == nullptr) return Status::invalid(fn + "out must not be null");
  if (n < 1) return Status::invalid(fn + "n must be >= 1, got " + std::to_string(n));
  if (!(qmax > 0) || !std::isfinite(qmax)) return Status::invalid(fn + "qmax must be positive and finite");
  if (eps.p != nullptr && static_cast<uint32_t>(eps.dtype) > 2u)
    return Status::invalid(fn + "eps dtype must be float32, float16 or bfloat16");
  return sum_launch(fn, xtype, x, n, SumOut{nullptr, out, n, lsq_step_factor(qmax), eps}, workspace, workspace_bytes,
                    stream);
}

}  // namespace cuda
}  // namespace lowbit

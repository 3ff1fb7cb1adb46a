// cuda::sum_abs_f64 (reduce.h): one block per fixed chunk (reduce.h's sum_abs_chunk), each thread
// summing a fixed strided subset of the chunk in float64, a fixed shuffle tree per block; then one block
// adds the chunk sums in chunk order. Deterministic for a given n on any GPU.
#include "lowbit/kernels/reduce.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

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

__global__ void __launch_bounds__(kThreads) sum_chunks(const double* __restrict__ part, int64_t chunks,
                                                       double* __restrict__ out) {
  // Thread t adds chunks t, t + 256, ... in order; then the fixed block tree.
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) acc += part[c];
  const double s = block_sum(acc);
  if (threadIdx.x == 0) *out = s;
}

}  // namespace

size_t sum_abs_f64_workspace_bytes(int64_t n) {
  if (n <= 0) return 0;
  const int64_t chunk = sum_abs_chunk(n);
  return size_t((n + chunk - 1) / chunk) * sizeof(double);
}

Status sum_abs_f64(DType xtype, const void* x, int64_t n, double* out, void* workspace, size_t workspace_bytes,
                   CUstream_st* stream) {
  const std::string fn = "lowbit::cuda::sum_abs_f64: ";
  if (out == nullptr) return Status::invalid(fn + "out must not be null");
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

}  // namespace cuda
}  // namespace lowbit

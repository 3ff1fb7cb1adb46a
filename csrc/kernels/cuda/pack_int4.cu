// Int4 pairs on CUDA: pack_s4 / unpack_s4 on device pointers. Contract and format:
// include/lowbit/kernels/pack_int4.h.
//
// Both are pure byte shuffles, bound by memory traffic, so the kernels are the simplest coalesced form:
// one thread per OUTPUT byte, grid-stride over int64 flat indices (any rows * K fits, no launch
// dimension can overflow). Consecutive threads write consecutive bytes; the two codes a packing thread
// reads (or the packed byte two unpacking threads share) come through L1, so the redundant reads cost
// no DRAM traffic. No alignment is assumed: any base pointer and any row stride work.
//
// Unlike the CPU version, pack_s4 does not check the range of the codes (reporting a bad code would need
// a host sync): it keeps the low 4 bits of each code, so an in-range code packs exactly as on the CPU.
#include "lowbit/kernels/pack_int4.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../validate.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) pack_s4_kernel(
    const int8_t* __restrict__ codes,  // (rows, K), row stride ldc
    int64_t K,                         // codes per row
    int64_t ldc,                       // row stride of codes in bytes
    int64_t pc,                        // packed bytes per row: ceil(K / 2)
    int64_t total,                     // rows * pc
    int8_t* __restrict__ packed) {     // (rows, pc), contiguous
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / pc;
    const int64_t k = 2 * (e - r * pc);
    const int8_t* c = codes + r * ldc + k;
    const uint32_t hi = uint8_t(c[0]) & 0x0Fu;
    const uint32_t lo = k + 1 < K ? uint8_t(c[1]) & 0x0Fu : 0u;  // odd K: last low nibble is 0
    packed[e] = int8_t(uint8_t((hi << 4) | lo));
  }
}

__global__ void __launch_bounds__(kThreads) unpack_s4_kernel(
    const int8_t* __restrict__ packed,  // (rows, ceil(K / 2)), row stride ldp
    int64_t K,                          // codes per row
    int64_t ldp,                        // row stride of packed in bytes
    int64_t total,                      // rows * K
    int8_t* __restrict__ codes) {       // (rows, K), contiguous
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / K;
    const int64_t k = e - r * K;
    const uint32_t b = uint8_t(packed[r * ldp + (k >> 1)]);
    const uint32_t nib = (k & 1) ? (b & 0x0Fu) : (b >> 4);  // first code in the high nibble
    codes[e] = int8_t(int32_t(nib ^ 8u) - 8);                // sign-extend: 8..15 -> -8..-1
  }
}

// Blocks for `work` threads: enough to cover it, capped at a few waves (the loops are grid-stride).
// Vector path: K % 32 == 0, packed base and row stride 16-byte aligned, codes base 16-byte aligned. One
// thread turns 16 packed bytes into 32 codes: per 4-byte word, the high and low nibbles are masked out
// bytewise, sign-extended per byte with __vsub4 (no borrow between bytes), and interleaved back into code
// order (high nibble first) with __byte_perm. Index is uint32_t when the unit count fits (no 64-bit
// division per unit).
template <typename Index>
__global__ void __launch_bounds__(kThreads) unpack_s4_vec_kernel(
    const int8_t* __restrict__ packed,  // (rows, K / 2), row stride ldp (multiple of 16)
    int64_t K,                          // codes per row, a multiple of 32
    int64_t ldp,                        // row stride of packed in bytes
    int64_t rows,
    int8_t* __restrict__ codes) {       // (rows, K), contiguous
  const Index per_row = Index(K / 32);
  const Index total = Index(rows) * per_row;
  const Index stride = Index(gridDim.x) * blockDim.x;
  for (Index u = Index(blockIdx.x) * blockDim.x + threadIdx.x; u < total; u += stride) {
    const Index r = u / per_row;
    const Index c = u - r * per_row;
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(packed + int64_t(r) * ldp + int64_t(c) * 16));
    const uint32_t in[4] = {w.x, w.y, w.z, w.w};
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t hi = __vsub4(((in[j] >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
      const uint32_t lo = __vsub4((in[j] & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);
      out[2 * j] = __byte_perm(hi, lo, 0x5140);      // hi.b0 lo.b0 hi.b1 lo.b1
      out[2 * j + 1] = __byte_perm(hi, lo, 0x7362);  // hi.b2 lo.b2 hi.b3 lo.b3
    }
    uint4* dst = reinterpret_cast<uint4*>(codes + int64_t(r) * K + int64_t(c) * 32);
    dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
    dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
  }
}

Status grid_for(const char* fn, int64_t work, int* blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return Status::device(std::string(fn) + ": " + cudaGetErrorString(err));
  const int64_t needed = (work + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sms > 0 ? sms : 1) * (2048 / kThreads) * 4;
  *blocks = static_cast<int>(std::min(needed, cap));
  return Status::ok();
}

Status launched(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(std::string(fn) + ": kernel launch failed: " + cudaGetErrorString(err));
  return Status::ok();
}

}  // namespace

Status pack_s4(const int8_t* codes, int64_t rows, int64_t K, int64_t ldc, int8_t* packed, CUstream_st* stream) {
  const char* fn = "lowbit::cuda::pack_s4";
  Status s = validate::pack_unpack_s4(fn, codes, "codes", rows, K, ldc, "ldc", K, "K", packed, "packed");
  if (!s.is_ok() || rows == 0 || K == 0) return s;
  const int64_t pc = packed_s4_cols(K);
  const int64_t total = rows * pc;
  int blocks = 0;
  s = grid_for(fn, total, &blocks);
  if (!s.is_ok()) return s;
  pack_s4_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(codes, K, ldc, pc, total, packed);
  return launched(fn);
}

Status unpack_s4(const int8_t* packed, int64_t rows, int64_t K, int64_t ldp, int8_t* codes, CUstream_st* stream) {
  const char* fn = "lowbit::cuda::unpack_s4";
  Status s = validate::pack_unpack_s4(fn, packed, "packed", rows, K, ldp, "ldp", packed_s4_cols(K), "ceil(K/2)",
                                      codes, "codes");
  if (!s.is_ok() || rows == 0 || K == 0) return s;
  const int64_t total = rows * K;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool vec = K % 32 == 0 && ldp % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(codes) % 16 == 0;
  int blocks = 0;
  s = grid_for(fn, vec ? total / 32 : total, &blocks);
  if (!s.is_ok()) return s;
  if (vec && total / 32 + int64_t(blocks) * kThreads < (int64_t(1) << 32)) {
    unpack_s4_vec_kernel<uint32_t><<<blocks, kThreads, 0, st>>>(packed, K, ldp, rows, codes);
  } else if (vec) {
    unpack_s4_vec_kernel<int64_t><<<blocks, kThreads, 0, st>>>(packed, K, ldp, rows, codes);
  } else {
    unpack_s4_kernel<<<blocks, kThreads, 0, st>>>(packed, K, ldp, total, codes);
  }
  return launched(fn);
}

}  // namespace cuda
}  // namespace lowbit

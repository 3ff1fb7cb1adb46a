// Per-row symmetric int8 quantizer (SwitchBack's gradient quantizer) on CUDA. Contract:
// include/lowbit/kernels/quantize_rows.h (per row: amax, scale = amax / qmax, codes = clamp(rne(x / scale))
// with NaN / inf rows giving scale NaN and codes 0).
//
// Shapes it is built for: M ~ 8192 token rows, N = 4096 .. 28672, bf16 mostly. The operation is memory-
// bound (per element 2-4 bytes read, 1 written, one division), so the kernel is shaped by memory traffic:
//   * A row belongs to one group of threads: a whole 256-thread CTA for long rows (N / V > 128 chunks),
//     one warp for short rows (8 rows per CTA), so that short rows do not leave 7 of 8 warps idle and need
//     no __syncthreads. The grid has one group per row (capped at 2^31 - 1 blocks, then a block-stride
//     loop over rows), and the hardware block scheduler balances the rows.
//   * Pass 1 reads the row once from HBM for its absmax; pass 2 re-reads it and writes the codes. The
//     re-read should hit L1 / L2: the rows in flight are (resident CTAs) x (row bytes), e.g. 132 SMs x 4
//     x 56 KiB = 30 MB for bf16 at N = 28672, inside H100's 50 MB L2 (fp32 at that width, 60 MB, would
//     send part of pass 2 back to HBM). Keeping the row in registers or shared memory instead would cap
//     occupancy for large N. Not yet measured on a GPU: PerfReport in the test prints GB/s.
//   * Vector path: a thread takes 16-byte chunks (V = 8 fp16/bf16 or 4 fp32 elements) at a stride of the
//     group size, so a warp reads 512 contiguous bytes per step; both passes load kBatch = 4 chunks per
//     thread before using any (predicated, so short rows keep several loads in flight too).
//     Codes go out as one 8- or 4-byte store per chunk. Taken when x's base is 16-byte aligned and its row
//     stride is a multiple of 16 bytes; the last N % V elements of a row take element loads. Code stores
//     are vectorised separately, when q's base and ldq are multiples of the store width.
//   * Scalar path (any other x): element loads at a stride of the group size, still coalesced.
//
// Pass 1 does not convert: it takes integer maxima of magnitude keys in x's own format (the bits of |x|:
// bits & 0x7fffffff for fp32, bits & 0x7fff for fp16 / bf16, two 16-bit keys per word with __vmaxu2).
// Non-negative IEEE values order like their bit patterns and inf < NaN sit above every finite value, so
// the largest key is amax exactly, and tells whether the row is finite. A max is exact and order-free:
// the result cannot depend on the split over threads. Warp maxima by __reduce_max_sync, then one shared
// slot per warp (double-buffered by row parity, so the next row's writes cannot race this row's reads).
//
// Bitwise agreement with the CPU reference: amax is exact on both sides; the scale is one IEEE division
// (__fdiv_rn); each code is __fdiv_rn(float(x), scale) (IEEE quotient, never a reciprocal multiply), round
// half to even (__float2int_rn: cvt.rni, which saturates and gives 0 for NaN, i.e. for 0 / 0 after a scale
// that underflowed to 0), an integer clamp. Widening fp16 (cvt.f32.f16) and bf16 (a shift) is exact;
// subnormals are kept (default -ftz=false); the file refuses to build with --use_fast_math. No product
// feeds an add, so -fmad has nothing to contract.
//
// Resources (nvcc 13.0, -O3, sm_80 / sm_90a): __launch_bounds__(256, 4) holds every variant to <= 64
// registers (4+ CTAs, 32+ warps per SM), no stack, no spills; 64 bytes of shared memory in the CTA-per-row
// variant. PTX: ld.global.nc.v4 for x, st.global.v2 / .u32 for codes, max.u16x2 for 16-bit keys,
// redux.sync.max.u32 for the warp maxima.
#include "lowbit/kernels/quantize_rows.h"

#ifdef __USE_FAST_MATH__
#error "quantize_rows.cu must not be built with --use_fast_math: it flushes subnormals and breaks bitwise CPU parity"
#endif

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../cpu/quantize_rows_internal.h"  // the argument checks shared with the CPU entry points

namespace lowbit {
namespace cuda {
namespace {

constexpr int kThreads = 256;           // 8 warps per CTA
constexpr int kWarpRowMaxChunks = 128;  // rows of at most this many 16-byte chunks go one per warp
constexpr int kBatch = 4;               // 16-byte chunks a thread loads before using any
constexpr uint32_t kCanonicalNaN = 0x7fc00000u;

// Storage of one element, as raw bits.
template <DType T>
using Raw = std::conditional_t<T == DType::kFloat32, uint32_t, uint16_t>;

// Elements per 16-byte chunk.
template <DType T>
constexpr int kV = 16 / int(sizeof(Raw<T>));

// Exact widening of one stored element to fp32.
template <DType T>
__device__ __forceinline__ float widen(Raw<T> b) {
  if constexpr (T == DType::kFloat32) return __uint_as_float(b);
  else if constexpr (T == DType::kBFloat16) return __uint_as_float(uint32_t(b) << 16);
  else return __half2float(__ushort_as_half(b));
}

// Magnitude key of one element (see the top of the file).
template <DType T>
__device__ __forceinline__ uint32_t key1(Raw<T> b) {
  if constexpr (T == DType::kFloat32) return b & 0x7fffffffu;
  else return uint32_t(b) & 0x7fffu;
}

// acc = max(acc, keys of one 16-byte chunk); for 16-bit types acc holds two 16-bit maxima.
template <DType T>
__device__ __forceinline__ uint32_t key_chunk(uint32_t acc, const uint4& c) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (T == DType::kFloat32) acc = max(acc, w[k] & 0x7fffffffu);
    else acc = __vmaxu2(acc, w[k] & 0x7fff7fffu);
  }
  return acc;
}

// The chunk accumulator as one key.
template <DType T>
__device__ __forceinline__ uint32_t key_fold(uint32_t acc) {
  if constexpr (T == DType::kFloat32) return acc;
  else return max(acc & 0xffffu, acc >> 16);
}

// amax as fp32 from the row's largest key.
template <DType T>
__device__ __forceinline__ float amax_of_key(uint32_t key) {
  return widen<T>(static_cast<Raw<T>>(key));
}

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, v);
#else
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
#endif
}

// One code, as a byte. Division, not a reciprocal multiply: the contract fixes the rounding. __fdiv_rn is
// the IEEE round-to-nearest quotient whatever -prec-div says. __float2int_rn is cvt.rni.s32.f32, which
// saturates (+-inf, huge values) and, by the PTX ISA's rule for f32 -> s32 conversions, turns NaN into 0:
// the contract's "0 / 0 -> code 0" (the only NaN quotient, after a scale that underflowed to 0) needs no
// test of its own in this loop.
__device__ __forceinline__ uint32_t code_of(float t, float s, int qmax) {
  const int r = min(max(__float2int_rn(__fdiv_rn(t, s)), -qmax), qmax);
  return uint32_t(r) & 0xffu;
}

// Codes of one chunk, packed little-endian: V bytes in (V / 4) words.
template <DType T>
__device__ __forceinline__ void codes_chunk(const uint4& c, float s, int qmax, uint32_t (&out)[kV<T> / 4]) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
  if constexpr (T == DType::kFloat32) {
    out[0] = code_of(__uint_as_float(w[0]), s, qmax) | code_of(__uint_as_float(w[1]), s, qmax) << 8 |
             code_of(__uint_as_float(w[2]), s, qmax) << 16 | code_of(__uint_as_float(w[3]), s, qmax) << 24;
  } else {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const uint32_t a = w[2 * k], b = w[2 * k + 1];
      out[k] = code_of(widen<T>(Raw<T>(a & 0xffffu)), s, qmax) | code_of(widen<T>(Raw<T>(a >> 16)), s, qmax) << 8 |
               code_of(widen<T>(Raw<T>(b & 0xffffu)), s, qmax) << 16 |
               code_of(widen<T>(Raw<T>(b >> 16)), s, qmax) << 24;
    }
  }
}

// Stores the V codes of chunk c at q + c * V: one vector store when aligned, bytes otherwise.
template <DType T>
__device__ __forceinline__ void store_chunk(int8_t* q, int64_t c, const uint32_t (&p)[kV<T> / 4], bool vec_q) {
  int8_t* dst = q + c * kV<T>;
  if (vec_q) {
    if constexpr (kV<T> == 8) *reinterpret_cast<uint2*>(dst) = make_uint2(p[0], p[1]);
    else *reinterpret_cast<uint32_t*>(dst) = p[0];
  } else {
#pragma unroll
    for (int b = 0; b < kV<T>; ++b) dst[b] = int8_t((p[b / 4] >> (8 * (b % 4))) & 0xffu);
  }
}

// One group of kTPR threads per row; kThreads / kTPR rows per CTA at a time.
template <DType T, int kTPR, bool kVecX>
__global__ void __launch_bounds__(kThreads, 4) quantize_rows_kernel(
    const Raw<T>* __restrict__ x,    // (M, N), row stride ldx elements; 16-byte aligned rows if kVecX
    int64_t M, int64_t N, int64_t ldx,
    int qmax,                        // 1 .. 127
    int8_t* __restrict__ q,          // (M, N), row stride ldq bytes
    int64_t ldq,
    float* __restrict__ row_scale,   // (M,)
    bool vec_q) {                    // q's base and ldq are multiples of the code store width (V bytes)
  constexpr int V = kV<T>;
  constexpr int kRows = kThreads / kTPR;
  constexpr int kWarps = kTPR / 32;  // warps per row
  const int t = int(threadIdx.x) % kTPR;     // thread within the row's group
  const int g = int(threadIdx.x) / kTPR;     // the row's group within the CTA
  const int64_t chunks = kVecX ? N / V : 0;  // whole 16-byte chunks; the rest takes element loads
  int parity = 0;
  for (int64_t r0 = int64_t(blockIdx.x) * kRows; r0 < M; r0 += int64_t(gridDim.x) * kRows, parity ^= 1) {
    const int64_t i = r0 + g;
    // kTPR == kThreads: one row per CTA, r0 < M, every thread takes part (the __syncthreads below).
    // kTPR == 32: a warp per row; warps past M skip the row as a whole (warp-wide collectives only).
    if (kTPR == 32 && i >= M) continue;
    const Raw<T>* row = x + i * ldx;
    const uint4* rowv = reinterpret_cast<const uint4*>(row);

    // Pass 1: the row's largest magnitude key. kBatch chunks per thread are loaded before any is used
    // (predicated, not a remainder loop), so that short rows too keep several loads in flight.
    uint32_t acc = 0;
    for (int64_t c0 = t; c0 < chunks; c0 += kBatch * kTPR) {
      uint4 a[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int64_t c = c0 + int64_t(k) * kTPR;
        a[k] = c < chunks ? __ldg(rowv + c) : make_uint4(0u, 0u, 0u, 0u);  // 0: the identity of the max
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) acc = key_chunk<T>(acc, a[k]);
    }
    acc = key_fold<T>(acc);
#pragma unroll 4
    for (int64_t j = chunks * V + t; j < N; j += kTPR) acc = max(acc, key1<T>(__ldg(row + j)));
    acc = warp_max(acc);
    if constexpr (kWarps > 1) {
      __shared__ uint32_t warp_keys[2][kWarps];  // [row parity][warp]
      const int w = t / 32;
      if (t % 32 == 0) warp_keys[parity][w] = acc;
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kWarps; ++k) acc = max(acc, warp_keys[parity][k]);
    }

    // The contract's decision, uniform over the row's threads.
    const float amax = amax_of_key<T>(acc);
    const bool finite = __float_as_uint(amax) < 0x7f800000u;  // amax >= 0: its bits order like its value
    const bool codes = finite && amax != 0.0f;
    const float s = codes ? __fdiv_rn(amax, float(qmax)) : (finite ? 0.0f : __uint_as_float(kCanonicalNaN));
    if (t == 0) row_scale[i] = s;

    // Pass 2: codes (re-reading the row from L1 / L2), or zeros for a zero / non-finite row.
    int8_t* qi = q + i * ldq;
    if (codes) {
      for (int64_t c0 = t; c0 < chunks; c0 += kBatch * kTPR) {
        uint4 a[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int64_t c = c0 + int64_t(k) * kTPR;
          a[k] = c < chunks ? __ldg(rowv + c) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const int64_t c = c0 + int64_t(k) * kTPR;
          if (c < chunks) {
            uint32_t p[V / 4];
            codes_chunk<T>(a[k], s, qmax, p);
            store_chunk<T>(qi, c, p, vec_q);
          }
        }
      }
      for (int64_t j = chunks * V + t; j < N; j += kTPR) qi[j] = int8_t(code_of(widen<T>(__ldg(row + j)), s, qmax));
    } else {
      const uint32_t zero[V / 4] = {};
      for (int64_t c = t; c < chunks; c += kTPR) store_chunk<T>(qi, c, zero, vec_q);
      for (int64_t j = chunks * V + t; j < N; j += kTPR) qi[j] = 0;
    }
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <DType T, int kTPR, bool kVecX>
void launch_one(int64_t blocks, const void* x, int64_t M, int64_t N, int64_t ldx, int32_t qmax, int8_t* q,
                int64_t ldq, float* row_scale, bool vec_q, cudaStream_t stream) {
  quantize_rows_kernel<T, kTPR, kVecX><<<unsigned(blocks), kThreads, 0, stream>>>(
      static_cast<const Raw<T>*>(x), M, N, ldx, int(qmax), q, ldq, row_scale, vec_q);
}

template <DType T>
Status launch(const char* fn, const void* x, int64_t M, int64_t N, int64_t ldx, int32_t qmax, int8_t* q,
              int64_t ldq, float* row_scale, cudaStream_t stream) {
  constexpr int V = kV<T>;
  const bool vec_x = aligned(x, 16) && (ldx * int64_t(sizeof(Raw<T>))) % 16 == 0;
  const bool vec_q = aligned(q, V) && ldq % V == 0;  // one V-byte store per chunk
  const bool warp_rows = N / V <= kWarpRowMaxChunks;
  const int64_t rows_per_block = warp_rows ? kThreads / 32 : 1;
  int64_t blocks = (M + rows_per_block - 1) / rows_per_block;
  if (blocks > INT_MAX) blocks = INT_MAX;  // the kernel loops over the rest
  if (warp_rows) {
    if (vec_x) launch_one<T, 32, true>(blocks, x, M, N, ldx, qmax, q, ldq, row_scale, vec_q, stream);
    else launch_one<T, 32, false>(blocks, x, M, N, ldx, qmax, q, ldq, row_scale, vec_q, stream);
  } else {
    if (vec_x) launch_one<T, kThreads, true>(blocks, x, M, N, ldx, qmax, q, ldq, row_scale, vec_q, stream);
    else launch_one<T, kThreads, false>(blocks, x, M, N, ldx, qmax, q, ldq, row_scale, vec_q, stream);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(std::string(fn) + ": kernel launch failed: " + cudaGetErrorString(err));
  return Status::ok();
}

}  // namespace

Status quantize_rows_s8(DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx, int32_t qmax, int8_t* q,
                        int64_t ldq, float* row_scale, CUstream_st* stream) {
  const char* fn = "lowbit::cuda::quantize_rows_s8";
  const Status st = cpu::detail::quantize_rows_s8_check(fn, xtype, x, M, N, ldx, qmax, q, ldq, row_scale);
  if (!st.is_ok() || M == 0 || N == 0) return st;  // invalid, or nothing to read or write
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (xtype) {
    case DType::kFloat32: return launch<DType::kFloat32>(fn, x, M, N, ldx, qmax, q, ldq, row_scale, s);
    case DType::kFloat16: return launch<DType::kFloat16>(fn, x, M, N, ldx, qmax, q, ldq, row_scale, s);
    case DType::kBFloat16: return launch<DType::kBFloat16>(fn, x, M, N, ldx, qmax, q, ldq, row_scale, s);
  }
  return Status::invalid(std::string(fn) + ": unreachable dtype");
}

}  // namespace cuda
}  // namespace lowbit

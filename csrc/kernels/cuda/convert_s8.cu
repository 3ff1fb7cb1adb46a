// int8 codes -> float types (cast_s8) and int8 transpose (transpose_s8) on CUDA. Contract:
// include/lowbit/kernels/convert_s8.h; argument checks shared with the CPU (cpu/convert_s8.cpp).
//
// Both move bytes and do almost no arithmetic, so the kernels are shaped by memory traffic alone: every
// warp-wide load and store instruction covers whole 32-byte sectors, and each thread keeps 32-64 bytes of
// loads in flight.
//
// cast_s8. A thread "unit" is the codes that make 16 bytes of output: 8 codes for fp16 / bf16 (one 8-byte
// load, one 16-byte store), 4 for fp32 (4-byte load, 16-byte store). Consecutive threads take consecutive
// units, so a warp's load covers 256 (128) contiguous bytes and its store 512; loading 16 codes per thread
// instead would make each of its two or four 16-byte stores cover only half of every sector it touches.
// Each thread takes kUnroll units per step (all loads issued before the first store), a block 8192 codes
// per step, grid-stride over flat unit indices; the row of a unit comes from one multiply-high by a
// precomputed reciprocal (exact for 32-bit indices, see DivU32) or a plain int64 division past 2^32 units.
//   Conversion, exact and branch-free: a code c is biased to the byte b = c + 128 (xor 0x80), one byte
//   permute places b as the low byte of the mantissa of 2^23 (fp32 bits 0x4B0000bb = 2^23 + b), and one
//   fp32 subtract of 2^23 + 128 leaves c. bf16 = the top half of those bits (exact: <= 8 significant bits).
//   fp16 does two codes at a time: 0x64bb is the half 1024 + b, and one f16x2 subtract of 1152 leaves c.
//   0 becomes +0 everywhere (x - x = +0 in round to nearest), as on the CPU.
//   Paths: the load is vector when q and its row stride are aligned to the load size, the store when out
//   and its row stride (in bytes) are 16-byte aligned; otherwise the same unit moves by single bytes /
//   elements. The last unit of a row may be partial (N not a multiple of the unit): element by element.
//   A dense (M, N) pair (ldq == ldo == N) is one row of M * N, so only the bases' alignment matters.
//
// transpose_s8. 64 x 64 byte tiles, a 64-thread block per tile (grid-stride over tiles, tile index flat in
// int64, so no grid dimension limit applies). Load: 4 row chunks of 16 bytes per thread (a warp reads 8
// rows x 64 contiguous bytes), straight into shared memory. Write: a thread owns 4 output rows x 16 bytes:
// it reads one 4-byte word (4 columns of q) from each of 16 tile rows, transposes four 4 x 4 byte blocks
// in registers (8 byte-permutes each) and stores four 16-byte chunks; a warp's store covers 8 output rows x
// 64 contiguous bytes. Shared memory is swizzled instead of padded, so both the 16-byte stores of the load
// phase and the word reads of the write phase are free of bank conflicts (see tile_word). Tiles at the
// matrix edge and unaligned bases / strides take bytewise global accesses for the affected chunks.
//
// Expected: near the HBM bandwidth of the part (bytes moved = M * N * (1 + otype size) for the cast,
// 2 * M * N for the transpose); not yet measured on a GPU: tests/cpp/test_cuda_convert_s8.cpp's PerfReport
// prints the GB/s achieved next to a device-to-device cudaMemcpy of the same traffic.
// Resources (nvcc 13.0, -O3, sm_80 / sm_90a, -Xptxas -v): no stack, no spills anywhere. Cast with 32-bit
// indices: 32 registers for fp16 / bf16 (8 blocks of 256 per SM), 43-48 for fp32; int64 indices 40-58.
// Transpose: 48-56 registers, 4 KiB static shared memory, so about 18 blocks (1152 threads, 72 KiB of
// loads in flight) per SM.
#include "lowbit/kernels/convert_s8.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace lowbit {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------
// cast_s8

constexpr int kCastThreads = 256;

// Per output type: codes per unit (16 bytes of output), bytes of one unit's vector load, units per
// thread per step (8192 codes per block step either way).
template <DType OT>
struct CastUnit {
  static constexpr int kCodes = OT == DType::kFloat32 ? 4 : 8;
  static constexpr int kInWords = kCodes / 4;
  static constexpr int kOutSize = OT == DType::kFloat32 ? 4 : 2;
  static constexpr int kUnroll = 8192 / (kCastThreads * kCodes);
};

// n / d for n, d < 2^32 with one 64 x 64 -> high 64 multiply: m = floor((2^64 - 1) / d) + 1 = 2^64 / d + e
// with 0 <= e < 1, so n * m / 2^64 = n / d + n * e / 2^64, and the error term stays below 1 / d (n * d <
// 2^64): the floor is exact. d == 1 (m would be 2^64) is m = 0.
struct DivU32 {
  uint32_t d;
  uint64_t m;
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return m == 0 ? n : static_cast<uint32_t>(__umul64hi(uint64_t(n), m));
  }
};

struct DivI64 {
  int64_t d;
  __device__ __forceinline__ int64_t div(int64_t n) const { return n / d; }
};

DivU32 make_div(uint32_t d) { return {d, d == 1 ? 0 : ~uint64_t(0) / d + 1}; }
DivI64 make_div(int64_t d) { return {d}; }

__device__ __forceinline__ uint32_t f32_bits_of_code(uint32_t biased, uint32_t selector) {
  // selector 0x744k: byte k of the biased word, then 0x00 0x00 0x4B: the fp32 2^23 + b.
  const float big = __uint_as_float(__byte_perm(biased, 0x4B000000u, selector));
  return __float_as_uint(__fsub_rn(big, 8388736.0f));  // - (2^23 + 128)
}

// kInWords words of codes (byte k of word w = code 4w + k) -> 4 words of output (element order, low first).
template <DType OT>
__device__ __forceinline__ void convert_unit(const uint32_t (&in)[CastUnit<OT>::kInWords], uint32_t (&o)[4]) {
  if constexpr (OT == DType::kFloat32) {
    const uint32_t b = in[0] ^ 0x80808080u;
    o[0] = f32_bits_of_code(b, 0x7440u);
    o[1] = f32_bits_of_code(b, 0x7441u);
    o[2] = f32_bits_of_code(b, 0x7442u);
    o[3] = f32_bits_of_code(b, 0x7443u);
  } else if constexpr (OT == DType::kBFloat16) {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const uint32_t b = in[w] ^ 0x80808080u;
      const uint32_t f0 = f32_bits_of_code(b, 0x7440u), f1 = f32_bits_of_code(b, 0x7441u);
      const uint32_t f2 = f32_bits_of_code(b, 0x7442u), f3 = f32_bits_of_code(b, 0x7443u);
      o[2 * w] = __byte_perm(f0, f1, 0x7632u);  // high halves: bf16(code 0) low, bf16(code 1) high
      o[2 * w + 1] = __byte_perm(f2, f3, 0x7632u);
    }
  } else {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const uint32_t b = in[w] ^ 0x80808080u;
      // Halves 0x64bb (1024 + b) for two codes, then one f16x2 subtract of 1152 (0x6480) per pair.
      const uint32_t lo = __byte_perm(b, 0x64u, 0x4140u), hi = __byte_perm(b, 0x64u, 0x4342u);
      asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(o[2 * w]) : "r"(lo), "r"(0x64806480u));
      asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(o[2 * w + 1]) : "r"(hi), "r"(0x64806480u));
    }
  }
}

// The scaled form (scale given): each code as fp32 (exact, as above), one fp32 multiply by s (__fmul_rn:
// never fused), one round-to-nearest-even conversion to OT: the CPU's float_to_half / float_to_bf16.
template <DType OT>
__device__ __forceinline__ void convert_unit_scaled(const uint32_t (&in)[CastUnit<OT>::kInWords], float s,
                                                    uint32_t (&o)[4]) {
  constexpr int kCodes = CastUnit<OT>::kCodes;
  float f[kCodes];
#pragma unroll
  for (int w = 0; w < CastUnit<OT>::kInWords; ++w) {
    const uint32_t b = in[w] ^ 0x80808080u;
#pragma unroll
    for (int k = 0; k < 4; ++k) f[4 * w + k] = __fmul_rn(__uint_as_float(f32_bits_of_code(b, 0x7440u + k)), s);
  }
  if constexpr (OT == DType::kFloat32) {
#pragma unroll
    for (int c = 0; c < 4; ++c) o[c] = __float_as_uint(f[c]);
  } else if constexpr (OT == DType::kBFloat16) {
#pragma unroll
    for (int c = 0; c < 4; ++c)
      o[c] = uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(f[2 * c]))) |
             (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(f[2 * c + 1]))) << 16);
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c)
      o[c] = uint32_t(__half_as_ushort(__float2half_rn(f[2 * c]))) |
             (uint32_t(__half_as_ushort(__float2half_rn(f[2 * c + 1]))) << 16);
  }
}

template <DType OT, bool kVecIn, bool kVecOut, typename Div, typename Index>
__global__ void __launch_bounds__(kCastThreads) cast_kernel(
    const int8_t* __restrict__ q,  // (rows, N), row stride ldq
    int64_t N,                     // codes per row
    int64_t ldq,                   // row stride of q in bytes
    void* __restrict__ out_raw,    // (rows, N), row stride ldo elements of OT
    int64_t ldo,                   // row stride of out in elements
    Div upr,                       // units per row: ceil(N / kCodes)
    Index total,                   // rows * units per row
    const float* __restrict__ scale) {  // one fp32 multiplier, or nullptr (the exact cast)
  using U = CastUnit<OT>;
  const bool scaled = scale != nullptr;
  const float s = scaled ? __ldg(scale) : 1.0f;
  using Elem = typename std::conditional<U::kOutSize == 4, uint32_t, uint16_t>::type;
  Elem* const out = static_cast<Elem*>(out_raw);
  const Index per_block = Index(kCastThreads) * U::kUnroll;
  for (Index base = Index(blockIdx.x) * per_block; base < total; base += Index(gridDim.x) * per_block) {
    uint32_t in[U::kUnroll][U::kInWords];
    int n[U::kUnroll];  // codes of the unit inside the row; 0: no unit
    Elem* dst[U::kUnroll];
#pragma unroll
    for (int k = 0; k < U::kUnroll; ++k) {
      const Index u = base + Index(k * kCastThreads) + Index(threadIdx.x);
      n[k] = 0;
      dst[k] = nullptr;
#pragma unroll
      for (int w = 0; w < U::kInWords; ++w) in[k][w] = 0u;
      if (u < total) {
        const Index i = upr.div(u);
        const int64_t col = int64_t(u - i * Index(upr.d)) * U::kCodes;
        n[k] = int(min(int64_t(U::kCodes), N - col));
        const int8_t* src = q + int64_t(i) * ldq + col;
        dst[k] = out + int64_t(i) * ldo + col;
        if (kVecIn && n[k] == U::kCodes) {
          if constexpr (U::kInWords == 1) {
            in[k][0] = __ldg(reinterpret_cast<const uint32_t*>(src));
          } else {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
            in[k][0] = v.x;
            in[k][1] = v.y;
          }
        } else {
#pragma unroll
          for (int c = 0; c < U::kCodes; ++c)
            if (c < n[k]) in[k][c / 4] |= uint32_t(uint8_t(__ldg(src + c))) << (8 * (c % 4));
        }
      }
    }
#pragma unroll
    for (int k = 0; k < U::kUnroll; ++k) {
      if (n[k] == 0) continue;
      uint32_t o[4];
      if (scaled)
        convert_unit_scaled<OT>(in[k], s, o);
      else
        convert_unit<OT>(in[k], o);
      if (kVecOut && n[k] == U::kCodes) {
        *reinterpret_cast<uint4*>(dst[k]) = make_uint4(o[0], o[1], o[2], o[3]);
      } else {
#pragma unroll
        for (int c = 0; c < U::kCodes; ++c) {
          if (c >= n[k]) break;
          if constexpr (U::kOutSize == 4) dst[k][c] = o[c];
          else dst[k][c] = uint16_t(o[c / 2] >> (16 * (c % 2)));
        }
      }
    }
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0; }

Status device_sms(const char* fn, int* sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return Status::device(std::string(fn) + ": " + cudaGetErrorString(err));
  if (*sms < 1) *sms = 1;
  return Status::ok();
}

Status launched(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return Status::device(std::string(fn) + ": kernel launch failed: " + cudaGetErrorString(err));
  return Status::ok();
}

template <DType OT, typename Index>
void launch_cast_kernel(bool vin, bool vout, int blocks, cudaStream_t st, const int8_t* q, int64_t N, int64_t ldq,
                        void* out, int64_t ldo, Index upr, Index total, const float* scale) {
  using Div = decltype(make_div(upr));
  const Div div = make_div(upr);
  if (vin && vout)
    cast_kernel<OT, true, true, Div, Index><<<blocks, kCastThreads, 0, st>>>(q, N, ldq, out, ldo, div, total, scale);
  else if (vin)
    cast_kernel<OT, true, false, Div, Index><<<blocks, kCastThreads, 0, st>>>(q, N, ldq, out, ldo, div, total, scale);
  else if (vout)
    cast_kernel<OT, false, true, Div, Index><<<blocks, kCastThreads, 0, st>>>(q, N, ldq, out, ldo, div, total, scale);
  else
    cast_kernel<OT, false, false, Div, Index><<<blocks, kCastThreads, 0, st>>>(q, N, ldq, out, ldo, div, total, scale);
}

template <DType OT>
Status cast_launch(const char* fn, const int8_t* q, int64_t M, int64_t N, int64_t ldq, void* out, int64_t ldo,
                   cudaStream_t st, const float* scale) {
  using U = CastUnit<OT>;
  if (M == 1 || (ldq == N && ldo == N)) {  // one row: only the bases' alignment matters below
    N *= M;                                // <= M * ldq, checked to fit
    M = 1;
    ldq = ldo = N;
  }
  const int64_t load_bytes = 4 * U::kInWords;
  const bool vin = aligned(q, load_bytes) && (M == 1 || ldq % load_bytes == 0);
  const bool vout = aligned(out, 16) && (M == 1 || ldo % (16 / U::kOutSize) == 0);  // 16-byte rows
  const int64_t upr = (N + U::kCodes - 1) / U::kCodes, total = M * upr;
  const int64_t per_block = int64_t(kCastThreads) * U::kUnroll;
  int sms = 0;
  Status s = device_sms(fn, &sms);
  if (!s.is_ok()) return s;
  // Enough blocks to cover the work once, capped at 4 waves of 8 blocks per SM (the loop is grid-stride).
  const int blocks = int(std::min((total + per_block - 1) / per_block, int64_t(sms) * 8 * 4));
  if (total + int64_t(blocks) * per_block < (int64_t(1) << 32))
    launch_cast_kernel<OT, uint32_t>(vin, vout, blocks, st, q, N, ldq, out, ldo, uint32_t(upr), uint32_t(total),
                                     scale);
  else
    launch_cast_kernel<OT, int64_t>(vin, vout, blocks, st, q, N, ldq, out, ldo, upr, total, scale);
  return launched(fn);
}

// ---------------------------------------------------------------------------------------------------
// transpose_s8

constexpr int kTile = 64;      // tile edge in bytes
constexpr int kTThreads = 64;  // two warps per tile

// Word index in shared memory of word `col` (0..15, bytes 4col..4col+3) of tile row R (0..63). 64 rows of
// 16 words: two rows share one 32-bank line. The row's parity is flipped when bit 4 of R is set, and the
// word's bit 3 when bit 5 is: then
//   * load phase, 16-byte stores of (R, 4c): each quarter warp writes rows R, R+1 (R even, same bits 4-5)
//     x 4 chunks, i.e. one whole line;
//   * write phase, word reads of (16p + r, b) for fixed r over a warp's lanes p = 0..3, b = 8w..8w+7:
//     bank = 16 * ((r ^ p) & 1) + 8 * (w ^ (p >> 1)) + (b & 7), 32 distinct banks.
__device__ __forceinline__ int tile_word(int R, int col) {
  return ((R ^ ((R >> 4) & 1)) << 4) + (col ^ (((R >> 5) & 1) << 3));
}

// Words a0..a3 (4 rows of 4 bytes) -> o[k] = byte k of a0, a1, a2, a3 (column k as a row).
__device__ __forceinline__ void transpose4x4(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t& o0,
                                             uint32_t& o1, uint32_t& o2, uint32_t& o3) {
  const uint32_t t0 = __byte_perm(a0, a1, 0x5140u);  // a0.0 a1.0 a0.1 a1.1
  const uint32_t t1 = __byte_perm(a0, a1, 0x7362u);  // a0.2 a1.2 a0.3 a1.3
  const uint32_t t2 = __byte_perm(a2, a3, 0x5140u);  // a2.0 a3.0 a2.1 a3.1
  const uint32_t t3 = __byte_perm(a2, a3, 0x7362u);  // a2.2 a3.2 a2.3 a3.3
  o0 = __byte_perm(t0, t2, 0x5410u);
  o1 = __byte_perm(t0, t2, 0x7632u);
  o2 = __byte_perm(t1, t3, 0x5410u);
  o3 = __byte_perm(t1, t3, 0x7632u);
}

template <bool kVecIn, bool kVecOut>
__global__ void __launch_bounds__(kTThreads) transpose_kernel(
    const int8_t* __restrict__ q,  // (M, N), row stride ldq
    int64_t M, int64_t N,
    int64_t ldq,
    int8_t* __restrict__ out,      // (N, M), row stride ldo
    int64_t ldo,
    int64_t tiles_n,               // ceil(N / kTile)
    int64_t tiles) {               // ceil(M / kTile) * tiles_n
  __shared__ __align__(16) uint32_t tile[kTile * kTile / 4];
  const int tid = threadIdx.x;
  // Write-phase role: tile rows 16p..16p+15 (output columns), output rows 4b..4b+3 (tile columns).
  const int p = tid & 3, b = ((tid >> 5) << 3) | ((tid & 31) >> 2);
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t tm = t / tiles_n;
    const int64_t i0 = tm * kTile, j0 = (t - tm * tiles_n) * kTile;
    // Load: chunk id = tid + 64k is tile row id / 4, bytes 16 * (id % 4) ... + 15. Rows past M and bytes
    // past N read as 0 (never stored; zeroed so that no uninitialized shared memory is read).
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int id = tid + k * kTThreads, R = id >> 2, c = id & 3;
      const int64_t i = i0 + R, j = j0 + 16 * c;
      v[k] = make_uint4(0u, 0u, 0u, 0u);
      if (i < M && j < N) {
        const int8_t* src = q + i * ldq + j;
        if (kVecIn && j + 16 <= N) {
          v[k] = __ldg(reinterpret_cast<const uint4*>(src));
        } else {
          uint32_t w[4] = {0u, 0u, 0u, 0u};
          const int n = int(min(int64_t(16), N - j));
#pragma unroll
          for (int e = 0; e < 16; ++e)
            if (e < n) w[e / 4] |= uint32_t(uint8_t(__ldg(src + e))) << (8 * (e % 4));
          v[k] = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int id = tid + k * kTThreads;
      *reinterpret_cast<uint4*>(&tile[tile_word(id >> 2, 4 * (id & 3))]) = v[k];
    }
    __syncthreads();
    uint32_t a[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) a[r] = tile[tile_word(16 * p + r, b)];
    uint32_t o[4][4];  // o[k][g]: output row 4b + k, bytes 4g..4g+3 of its 16
#pragma unroll
    for (int g = 0; g < 4; ++g)
      transpose4x4(a[4 * g], a[4 * g + 1], a[4 * g + 2], a[4 * g + 3], o[0][g], o[1][g], o[2][g], o[3][g]);
    const int64_t i = i0 + 16 * p;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t j = j0 + 4 * b + k;
      if (j >= N || i >= M) continue;
      int8_t* dst = out + j * ldo + i;
      if (kVecOut && i + 16 <= M) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(o[k][0], o[k][1], o[k][2], o[k][3]);
      } else {
        const int n = int(min(int64_t(16), M - i));
#pragma unroll
        for (int e = 0; e < 16; ++e)
          if (e < n) dst[e] = int8_t(uint8_t(o[k][e / 4] >> (8 * (e % 4))));
      }
    }
    __syncthreads();  // the next tile's stores into shared memory wait for these reads
  }
}

}  // namespace

Status cast_s8(const int8_t* q, int64_t M, int64_t N, int64_t ldq, DType otype, void* out, int64_t ldo,
               CUstream_st* stream, const float* scale) {
  const char* fn = "lowbit::cuda::cast_s8";
  const Status s = cpu::detail::cast_s8_check(fn, q, M, N, ldq, otype, out, ldo);
  if (!s.is_ok() || M == 0 || N == 0) return s;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (otype) {
    case DType::kFloat32: return cast_launch<DType::kFloat32>(fn, q, M, N, ldq, out, ldo, st, scale);
    case DType::kFloat16: return cast_launch<DType::kFloat16>(fn, q, M, N, ldq, out, ldo, st, scale);
    case DType::kBFloat16: return cast_launch<DType::kBFloat16>(fn, q, M, N, ldq, out, ldo, st, scale);
  }
  return Status::invalid(std::string(fn) + ": unreachable otype");
}

Status transpose_s8(const int8_t* q, int64_t M, int64_t N, int64_t ldq, int8_t* out, int64_t ldo,
                    CUstream_st* stream) {
  const char* fn = "lowbit::cuda::transpose_s8";
  Status s = cpu::detail::transpose_s8_check(fn, q, M, N, ldq, out, ldo);
  if (!s.is_ok() || M == 0 || N == 0) return s;
  // One row of q (or of out) never steps by its stride: its base alone decides.
  const bool vin = aligned(q, 16) && (M == 1 || ldq % 16 == 0);
  const bool vout = aligned(out, 16) && (N == 1 || ldo % 16 == 0);
  const int64_t tiles_n = (N + kTile - 1) / kTile, tiles = (M + kTile - 1) / kTile * tiles_n;
  int sms = 0;
  s = device_sms(fn, &sms);
  if (!s.is_ok()) return s;
  // Up to 32 resident 64-thread blocks per SM on sm_80 / sm_90: two rounds of those, then grid-stride.
  const int blocks = int(std::min(tiles, int64_t(sms) * 64));
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (vin && vout) transpose_kernel<true, true><<<blocks, kTThreads, 0, st>>>(q, M, N, ldq, out, ldo, tiles_n, tiles);
  else if (vin) transpose_kernel<true, false><<<blocks, kTThreads, 0, st>>>(q, M, N, ldq, out, ldo, tiles_n, tiles);
  else if (vout) transpose_kernel<false, true><<<blocks, kTThreads, 0, st>>>(q, M, N, ldq, out, ldo, tiles_n, tiles);
  else transpose_kernel<false, false><<<blocks, kTThreads, 0, st>>>(q, M, N, ldq, out, ldo, tiles_n, tiles);
  return launched(fn);
}

}  // namespace cuda
}  // namespace lowbit

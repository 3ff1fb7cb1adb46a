// int8 codes -> float types (cast_s8) and int8 transpose (transpose_s8) on the CPU. Contract:
// include/lowbit/kernels/convert_s8.h. Also defines the argument checks the CUDA entry points share.
//
// Both are memory-bound, so they are plain C++ loops written for the auto-vectorizer (no per-ISA file):
//   * cast: float(q) is exact; fp32 stores it, bf16 keeps its top 16 bits (exact: an int8 has at most 8
//     significant bits, bf16 keeps 8), fp16 rebiases the exponent (127 -> 15) and drops the 13 low mantissa
//     bits, which are zero here. Integer operations with one select, so the loop vectorizes; no rounding
//     anywhere, hence no ties to reproduce on CUDA. Work items are (row, span of kSpan columns), so one long
//     row and many short rows both spread over the threads.
//   * transpose: 64 x 64 byte blocks (4 KiB of input: the 64 source rows of a block stay in L1 while its
//     64 output rows are written), OpenMP over blocks. Inside a block 8 x 8 byte sub-blocks go through
//     registers: eight 8-byte loads, a three-step swap network on uint64 words (4x4, 2x2, 1x1 sub-blocks,
//     shift-and-mask), eight 8-byte stores; the block's ragged right / bottom edge is copied bytewise.
// Every output element is written once by one thread from one input element, so results do not depend
// on the thread count.
#include "lowbit/kernels/convert_s8.h"
#include "lowbit/kernels/float_convert.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "../validate.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "transpose8x8 assumes byte k of a row at bits 8k");

namespace lowbit {
namespace cpu {
namespace detail {

namespace {

Status null_error(const char* fn, const char* name, int64_t M, int64_t N) {
  return Status::invalid(validate::err(fn, std::string(name) + " must not be null when M * N > 0 (M=" +
                                               std::to_string(M) + ", N=" + std::to_string(N) + "), got null"));
}

// rows * ld must fit int64 (every element index formed is below it: ld >= the row length here).
Status rows_fit(const char* fn, const char* rows_name, int64_t rows, const char* ld_name, int64_t ld) {
  if (ld > 0 && rows > std::numeric_limits<int64_t>::max() / ld)
    return Status::invalid(validate::err(fn, std::string(rows_name) + " * " + ld_name + " must fit int64, got " +
                                                 rows_name + "=" + std::to_string(rows) + " " + ld_name + "=" +
                                                 std::to_string(ld)));
  return Status::ok();
}

Status stride_rule(const char* fn, const char* name, int64_t ld, bool has_rows, int64_t row_len,
                   const char* row_len_name) {
  if (ld < 0) return validate::invalid_got(fn, std::string(name) + " must be >= 0", ld);
  if (has_rows && ld < row_len)
    return validate::invalid_got(
        fn, std::string(name) + " must be >= " + row_len_name + " (" + std::to_string(row_len) + ")", ld);
  return Status::ok();
}

}  // namespace

Status cast_s8_check(const char* fn, const int8_t* q, int64_t M, int64_t N, int64_t ldq, DType otype,
                     const void* out, int64_t ldo) {
  using validate::invalid_got;
  const int32_t ot = static_cast<int32_t>(otype);
  if (ot < 0 || ot > 2) return invalid_got(fn, "otype must be float32 (0), float16 (1) or bfloat16 (2)", ot);
  if (M < 0) return invalid_got(fn, "M must be >= 0", M);
  if (N < 0) return invalid_got(fn, "N must be >= 0", N);
  Status s = stride_rule(fn, "ldq", ldq, M > 0, N, "N");
  if (s.is_ok()) s = stride_rule(fn, "ldo", ldo, M > 0, N, "N");
  if (!s.is_ok() || M == 0 || N == 0) return s;  // nothing to read or write: null pointers are fine
  if (q == nullptr) return null_error(fn, "q", M, N);
  if (out == nullptr) return null_error(fn, "out", M, N);
  const int64_t osize = otype == DType::kFloat32 ? 4 : 2;
  const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(out) % uintptr_t(osize));
  if (mis != 0)
    return invalid_got(fn, "out must be aligned to its element size (" + std::to_string(osize) + " bytes for " +
                               dtype_name(otype) + "), address % " + std::to_string(osize),
                       mis);
  s = rows_fit(fn, "M", M, "ldq", ldq);
  if (s.is_ok()) s = rows_fit(fn, "M", M, "ldo", ldo);
  return s;
}

Status transpose_s8_check(const char* fn, const int8_t* q, int64_t M, int64_t N, int64_t ldq, const int8_t* out,
                          int64_t ldo) {
  using validate::invalid_got;
  if (M < 0) return invalid_got(fn, "M must be >= 0", M);
  if (N < 0) return invalid_got(fn, "N must be >= 0", N);
  Status s = stride_rule(fn, "ldq", ldq, M > 0, N, "N");
  if (s.is_ok()) s = stride_rule(fn, "ldo", ldo, N > 0, M, "M");  // out has N rows of M
  if (!s.is_ok() || M == 0 || N == 0) return s;
  if (q == nullptr) return null_error(fn, "q", M, N);
  if (out == nullptr) return null_error(fn, "out", M, N);
  s = rows_fit(fn, "M", M, "ldq", ldq);
  if (s.is_ok()) s = rows_fit(fn, "N", N, "ldo", ldo);
  return s;
}

}  // namespace detail

namespace {

constexpr int64_t kParallelMinElems = 1 << 16;  // below this many elements a parallel region costs more than it saves
constexpr int64_t kSpan = 1 << 14;              // cast: columns per work item
constexpr int64_t kBlock = 64;                  // transpose: block edge in bytes

int threads_for(int64_t elems) { return elems < kParallelMinElems ? 1 : omp_get_max_threads(); }

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// One span of a row per dtype: independent element loops for the vectorizer (restrict: out never overlaps q).
void cast_span_f32(const int8_t* __restrict q, int64_t n, float* __restrict o) {
  for (int64_t j = 0; j < n; ++j) o[j] = float(q[j]);
}

void cast_span_bf16(const int8_t* __restrict q, int64_t n, uint16_t* __restrict o) {
  for (int64_t j = 0; j < n; ++j) o[j] = uint16_t(bits_of(float(q[j])) >> 16);
}

// float bits s|e|m (m's 13 low bits zero for |q| <= 128) -> half bits s|e-112|m>>13; 0 -> +0 (q is never -0).
void cast_span_f16(const int8_t* __restrict q, int64_t n, uint16_t* __restrict o) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = bits_of(float(q[j]));
    const uint32_t mag = u & 0x7fffffffu;
    const uint32_t h = ((u >> 16) & 0x8000u) | (mag != 0 ? (mag - 0x38000000u) >> 13 : 0u);
    o[j] = uint16_t(h);
  }
}

// One row of the scaled cast: float(q) * s (one fp32 multiply), rounded once to otype (float_convert.h:
// round to nearest even, the rounding the CUDA kernel's __float2half_rn / __float2bfloat16_rn use).
void cast_row_scaled(const int8_t* __restrict q, int64_t n, float s, DType otype, void* out, int64_t off) {
  switch (otype) {
    case DType::kFloat32: {
      float* o = static_cast<float*>(out) + off;
      for (int64_t j = 0; j < n; ++j) o[j] = float(q[j]) * s;
      break;
    }
    case DType::kFloat16: {
      uint16_t* o = static_cast<uint16_t*>(out) + off;
      for (int64_t j = 0; j < n; ++j) o[j] = float_to_half(float(q[j]) * s);
      break;
    }
    case DType::kBFloat16: {
      uint16_t* o = static_cast<uint16_t*>(out) + off;
      for (int64_t j = 0; j < n; ++j) o[j] = float_to_bf16(float(q[j]) * s);
      break;
    }
  }
}

// dst (8 rows, stride ldd) = transpose of src (8 rows, stride lds), 8 bytes each. Row r is the uint64 x[r]
// with column c at bits 8c. Step k swaps the off-diagonal sub-blocks of every 2^k x 2^k block pair: the
// upper-right block of rows r..r+h-1 (high bytes of x[r]) with the lower-left one (low bytes of x[r+h]),
// h = 4, 2, 1; after the three steps every byte (r, c) sits at (c, r).
inline void transpose8x8(const int8_t* src, int64_t lds, int8_t* dst, int64_t ldd) {
  uint64_t x[8];
  for (int r = 0; r < 8; ++r) std::memcpy(&x[r], src + r * lds, 8);
  for (int r = 0; r < 4; ++r) {
    const uint64_t t = ((x[r] >> 32) ^ x[r + 4]) & 0x00000000FFFFFFFFull;
    x[r] ^= t << 32;
    x[r + 4] ^= t;
  }
  for (int r : {0, 1, 4, 5}) {
    const uint64_t t = ((x[r] >> 16) ^ x[r + 2]) & 0x0000FFFF0000FFFFull;
    x[r] ^= t << 16;
    x[r + 2] ^= t;
  }
  for (int r = 0; r < 8; r += 2) {
    const uint64_t t = ((x[r] >> 8) ^ x[r + 1]) & 0x00FF00FF00FF00FFull;
    x[r] ^= t << 8;
    x[r + 1] ^= t;
  }
  for (int c = 0; c < 8; ++c) std::memcpy(dst + c * ldd, &x[c], 8);
}

// Rows [i0, i1) x columns [j0, j1) of q, at most kBlock x kBlock.
void transpose_block(const int8_t* q, int64_t ldq, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int8_t* out,
                     int64_t ldo) {
  const int64_t i8 = i0 + (i1 - i0) / 8 * 8, j8 = j0 + (j1 - j0) / 8 * 8;
  for (int64_t j = j0; j < j8; j += 8)
    for (int64_t i = i0; i < i8; i += 8) transpose8x8(q + i * ldq + j, ldq, out + j * ldo + i, ldo);
  for (int64_t j = j0; j < j1; ++j) {
    // Output row j: the columns past i8 always, the whole row when j is in the ragged right edge.
    for (int64_t i = j < j8 ? i8 : i0; i < i1; ++i) out[j * ldo + i] = q[i * ldq + j];
  }
}

}  // namespace

Status cast_s8(const int8_t* q, int64_t M, int64_t N, int64_t ldq, DType otype, void* out, int64_t ldo,
               const float* scale) {
  const char* fn = "lowbit::cpu::cast_s8";
  Status s = detail::cast_s8_check(fn, q, M, N, ldq, otype, out, ldo);
  if (!s.is_ok() || M == 0 || N == 0) return s;
  if (scale != nullptr) {
    const float sc = *scale;
    const int nts = threads_for(M * N);
#pragma omp parallel for schedule(static) num_threads(nts) if (nts > 1)
    for (int64_t i = 0; i < M; ++i) cast_row_scaled(q + i * ldq, N, sc, otype, out, i * ldo);
    return Status::ok();
  }
  const int64_t spans = (N + kSpan - 1) / kSpan, items = M * spans;  // M * spans <= M * ldq: no overflow
  const int nt = threads_for(M * N);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t i = it / spans, j0 = (it - i * spans) * kSpan, n = std::min(kSpan, N - j0);
    const int8_t* src = q + i * ldq + j0;
    const int64_t o = i * ldo + j0;
    switch (otype) {
      case DType::kFloat32: cast_span_f32(src, n, static_cast<float*>(out) + o); break;
      case DType::kFloat16: cast_span_f16(src, n, static_cast<uint16_t*>(out) + o); break;
      case DType::kBFloat16: cast_span_bf16(src, n, static_cast<uint16_t*>(out) + o); break;
    }
  }
  return Status::ok();
}

Status transpose_s8(const int8_t* q, int64_t M, int64_t N, int64_t ldq, int8_t* out, int64_t ldo) {
  const char* fn = "lowbit::cpu::transpose_s8";
  Status s = detail::transpose_s8_check(fn, q, M, N, ldq, out, ldo);
  if (!s.is_ok() || M == 0 || N == 0) return s;
  const int64_t bm = (M + kBlock - 1) / kBlock, bn = (N + kBlock - 1) / kBlock, blocks = bm * bn;
  const int nt = threads_for(M * N);
  // Consecutive blocks run along a 64-row panel of q: a thread's static share reads contiguous panels.
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b / bn * kBlock, j0 = b % bn * kBlock;
    transpose_block(q, ldq, i0, std::min(M, i0 + kBlock), j0, std::min(N, j0 + kBlock), out, ldo);
  }
  return Status::ok();
}

}  // namespace cpu
}  // namespace lowbit

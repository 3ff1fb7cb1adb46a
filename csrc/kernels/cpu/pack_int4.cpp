// Int4 pairs on the CPU: pack_s4 (int8 codes in [-8, 7] -> two per byte, first in the high nibble) and
// unpack_s4 (the inverse, sign-extending). Contract and format: include/lowbit/kernels/pack_int4.h.
//
// Both are memory-bound byte shuffles, so they are plain C++ loops the compiler vectorizes (the nibble
// arithmetic below is branch-free and uses only unsigned bytes, so every operation is well defined and
// maps to byte SIMD). Work is split over rows with OpenMP; each output byte is written by one thread from
// one input position, so results do not depend on the thread count.
//
// pack_s4's range check: the header promises that nothing is written past the first bad row. With rows
// packed in parallel, a thread cannot know that earlier rows (owned by other threads) are clean, so the
// rows go in blocks of ~kBlockBytes codes per thread: first every thread checks its rows of the block
// (reduction: the smallest bad row), then the rows before the first bad one are packed, and the loop
// stops there. Both loops use the same static schedule over the same rows, so a thread packs the rows it
// has just checked while they are still in its own cache: the second read costs little memory traffic.
#include "lowbit/kernels/pack_int4.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../validate.h"

namespace lowbit {
namespace cpu {
namespace {

constexpr int64_t kParallelMinBytes = 1 << 18;  // below this much traffic a parallel region costs more than it saves
constexpr int64_t kBlockBytes = 1 << 18;        // codes checked-then-packed per thread per block (fits L2)

int threads_for(int64_t bytes) { return bytes < kParallelMinBytes ? 1 : omp_get_max_threads(); }

// True iff every code of the row is in [-8, 7]. c + 8 maps the range onto [0, 15] (high nibble clear);
// anything outside lands on a byte with a high bit set. An OR-reduction, so it vectorizes without a branch.
inline bool row_in_range(const int8_t* c, int64_t K) {
  uint8_t acc = 0;
  for (int64_t k = 0; k < K; ++k) acc |= uint8_t(uint8_t(c[k]) + 8u) & 0xF0u;
  return acc == 0;
}

inline void pack_row(const int8_t* c, int64_t K, int8_t* p) {
  const int64_t pairs = K / 2;
  for (int64_t j = 0; j < pairs; ++j)
    p[j] = int8_t(uint8_t((uint8_t(c[2 * j]) << 4) | (uint8_t(c[2 * j + 1]) & 0x0Fu)));
  if (K & 1) p[pairs] = int8_t(uint8_t(uint8_t(c[K - 1]) << 4));  // odd K: the low nibble of the last byte is 0
}

// Sign-extends a nibble without implementation-defined conversions: (n ^ 8) - 8 maps 0..7 -> 0..7 and
// 8..15 -> -8..-1.
inline int8_t sext4(uint32_t n) { return int8_t(int32_t(n ^ 8u) - 8); }

inline void unpack_row(const int8_t* p, int64_t K, int8_t* c) {
  const int64_t pairs = K / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint32_t b = uint8_t(p[j]);
    c[2 * j] = sext4(b >> 4);
    c[2 * j + 1] = sext4(b & 0x0Fu);
  }
  if (K & 1) c[K - 1] = sext4(uint32_t(uint8_t(p[pairs])) >> 4);  // the low nibble is padding: ignored
}

}  // namespace

Status pack_s4(const int8_t* codes, int64_t rows, int64_t K, int64_t ldc, int8_t* packed) {
  const char* fn = "lowbit::cpu::pack_s4";
  Status s = validate::pack_unpack_s4(fn, codes, "codes", rows, K, ldc, "ldc", K, "K", packed, "packed");
  if (!s.is_ok() || rows == 0 || K == 0) return s;

  const int64_t pc = packed_s4_cols(K);
  const int nt = threads_for(rows * K);
  const int64_t block_rows = std::max<int64_t>(1, kBlockBytes / K) * nt;
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const int64_t r1 = std::min(rows, r0 + block_rows);
    int64_t first_bad = r1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(min : first_bad)
    for (int64_t r = r0; r < r1; ++r)
      if (!row_in_range(codes + r * ldc, K)) first_bad = std::min(first_bad, r);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = r0; r < first_bad; ++r) pack_row(codes + r * ldc, K, packed + r * pc);
    if (first_bad < r1) {
      const int8_t* c = codes + first_bad * ldc;
      int64_t k = 0;
      while (k < K && c[k] >= -8 && c[k] <= 7) ++k;  // row_in_range said there is one
      const std::string row = std::to_string(first_bad);
      return Status::invalid(validate::err(fn, "code " + std::to_string(int(c[k])) + " at row " + row + ", col " +
                                         std::to_string(k) + " is outside the int4 range [-8, 7] (rows before " +
                                         row + " are packed, the rest are not written)"));
    }
  }
  return Status::ok();
}

Status unpack_s4(const int8_t* packed, int64_t rows, int64_t K, int64_t ldp, int8_t* codes) {
  const char* fn = "lowbit::cpu::unpack_s4";
  Status s = validate::pack_unpack_s4(fn, packed, "packed", rows, K, ldp, "ldp", packed_s4_cols(K), "ceil(K/2)",
                                      codes, "codes");
  if (!s.is_ok() || rows == 0 || K == 0) return s;

  const int nt = threads_for(rows * K);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) unpack_row(packed + r * ldp, K, codes + r * K);
  return Status::ok();
}

}  // namespace cpu
}  // namespace lowbit

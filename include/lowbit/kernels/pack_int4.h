// Int4 pairs: BIE's serialized 4-bit format (docs/formats.md).
//
//   packed[r, j] = int8( ((q[r, 2j] & 0xF) << 4) | (q[r, 2j+1] & 0xF) )      j = 0 .. ceil(K/2) - 1
//
// Two 4-bit two's-complement codes per byte along the row (the reduction axis K), the FIRST element in the
// HIGH nibble. An odd K leaves the last byte's low nibble 0. Unpacking sign-extends each nibble
// (0x8..0xF -> -8..-1). Bits per weight: 4. Example: codes [-8, 7, 1] -> bytes [0x87, 0x10] = int8 [-121, 16].
#pragma once
#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {

// Bytes per packed row of K codes.
constexpr int64_t packed_s4_cols(int64_t K) { return (K + 1) / 2; }

namespace cpu {

// codes: (rows, K) int8, row stride ldc, every code in [-8, 7] (checked: a code outside is
// kInvalidArgument, nothing is written past the first bad row). packed: (rows, ceil(K/2)), contiguous.
// Only the K codes of a row are read and checked: the row padding (ldc > K) may hold anything.
Status pack_s4(const int8_t* codes, int64_t rows, int64_t K, int64_t ldc, int8_t* packed);
// packed: (rows, ceil(K/2)), row stride ldp. codes: (rows, K) int8 in [-8, 7], contiguous. With odd K the
// low nibble of a row's last byte is padding: it is ignored, whatever it holds.
Status unpack_s4(const int8_t* packed, int64_t rows, int64_t K, int64_t ldp, int8_t* codes);

}  // namespace cpu

namespace cuda {

// Same contracts on device pointers. pack_s4 cannot report bad codes without a host sync: it keeps the
// low 4 bits of each code (callers pass quantizer output, which is in range by construction).
Status pack_s4(const int8_t* codes, int64_t rows, int64_t K, int64_t ldc, int8_t* packed, CUstream_st* stream);
Status unpack_s4(const int8_t* packed, int64_t rows, int64_t K, int64_t ldp, int8_t* codes, CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit

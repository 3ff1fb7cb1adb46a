// Private interface between wq_matmul.cpp (validation, index checks, x' preparation, threading, epilogue)
// and the per-ISA column-tile kernels wq_matmul_avx512.cpp / wq_matmul_avx2.cpp.
//
// Same rule as gemm_s8_internal.h: the ISA units are compiled with wider -m flags, so nothing crossing
// this boundary is more than plain data, and they instantiate nothing with external inline linkage
// (no std::string / std::vector / std::min / float_convert.h): the caller validates, allocates, threads
// and converts the output.
//
// Division of work. wq_matmul.cpp cuts the (M, N) output into units = (column block, row tile); one OpenMP
// thread computes a unit completely: a TILE KERNEL accumulates the tile's fp32 sums over all K stored
// rows into a small buffer, then the generic epilogue adds the bias and rounds once to the output dtype.
// Every output is thus reduced by one thread, over stored rows 0..K-1 in order, with one fp32 FMA per
// row: acc = fma(x'[r], w[r], acc) -- exactly the order and operations of wq_matmul_ref, so every path is
// bitwise equal to the reference whatever the ISA, tile shape, block size or thread count.
#pragma once
#include <cstddef>
#include <cstdint>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/wq.h"

namespace lowbit {
namespace cpu {
namespace detail {

enum class WqIsa : int32_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The weight, validated and with its segment geometry spelled out, plus the per-chunk group table.
struct WqTileArgs {
  int64_t K, N;
  const uint32_t* qweight;                  // (qrows, N)
  int32_t nseg;
  int32_t bits[kWqMaxSegments];
  int64_t row_start[kWqMaxSegments];        // first stored row of each segment
  int64_t row_end[kWqMaxSegments];          // exclusive end
  int64_t qrow0[kWqMaxSegments];            // first word row of each segment
  int64_t chunk0[kWqMaxSegments];           // global index of each segment's first 32-row chunk
  const int32_t* g_idx;                     // (K,), every entry checked to be in [0, groups)
  const void* scales;                       // (groups, N), sdtype
  const void* zeros;                        // (groups, N), sdtype
  int32_t sdtype;                           // 0 fp32, 1 fp16, 2 bf16 (DType values)
  bool asym;
  // (total chunks,): the group every row of the chunk that lies below K belongs to, or -1 when they
  // differ. A uniform chunk loads its scale / zero vectors once instead of once per row.
  const int32_t* chunk_group;
};

// Tile kernels. xs: the row tile's x' in STORED row order, (K, MT) row-major fp32 (x'[r][m] at
// xs[r * MT + m]; rows of a padded tile are 0). MT is 1, 2, 4 or 8. Columns [n0, n0 + ncols), n0 + ncols
// <= N. acc: (MT, ldacc) fp32, overwritten: acc[m * ldacc + (n - n0)] = the fp32 FMA chain over stored
// rows 0..K-1 (before bias). The kernels may also write acc columns in [ncols, ldacc) (scratch).
//
// acc is 64-byte aligned.
// AVX-512: any ncols; ldacc a multiple of 16 and >= ncols rounded up to 64. Columns past N are masked
// off, never read.
void wq_tile_avx512(const WqTileArgs& a, const float* xs, int MT, int64_t n0, int64_t ncols, float* acc,
                    int64_t ldacc);
// AVX2: ncols a multiple of 8 (the caller runs the remaining columns on the portable kernel); ldacc >= ncols.
void wq_tile_avx2(const WqTileArgs& a, const float* xs, int MT, int64_t n0, int64_t ncols, float* acc,
                  int64_t ldacc);

// Best ISA the running CPU supports, and its name.
WqIsa wq_best_isa();
const char* wq_isa_name(WqIsa isa);

// wq_matmul on a forced ISA (which the CPU must support; tests cover every path this way) and a forced
// thread count (<= 0: omp_get_max_threads()); block_cols > 0 forces the column block width (rounded up
// to a multiple of 32), so that tests can cut small N into several blocks.
Status wq_matmul_isa(WqIsa isa, const WqWeight& w, const void* x, DType xtype, int64_t M, int64_t ldx,
                     const void* bias, void* out, int64_t ldo, int nthreads = 0, int64_t block_cols = 0);

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

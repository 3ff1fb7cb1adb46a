// Private interface of the per-row quantizer (lowbit/kernels/quantize_rows.h) between quantize_rows.cpp
// (validation, the row decision, the scalar paths, dispatch), quantize_rows_avx512.cpp (the two passes
// of one row with AVX-512) and cuda/quantize_rows.cu (which shares the argument checks). Plain data only
// across the ISA boundary; the ISA unit allocates nothing and reports no errors (gemm_s8_internal.h
// says why).
#pragma once
#include <cstdint>

#include "lowbit/kernels/common.h"

namespace lowbit {
namespace cpu {
namespace detail {

// Validated arguments; M, N >= 1.
struct QuantizeRowsArgs {
  DType xtype;
  const void* x;
  int64_t N, ldx;
  int32_t qmax;  // 1 .. 127
  int8_t* q;
  int64_t ldq;
};

// The argument rules of quantize_rows.h, worded "<fn>: <what>, got <value>". Defined in quantize_rows.cpp
// and used by the CUDA entry point too, so both sides accept the same calls with the same messages.
Status quantize_rows_s8_check(const char* fn, DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx,
                              int32_t qmax, const int8_t* q, int64_t ldq, const float* row_scale);

// Whether the CPU runs quantize_rows_avx512.cpp.
bool quantize_rows_avx512_supported();

// Validation + the AVX-512 passes (use_avx512, which must be supported) or the portable ones, OpenMP over
// rows. Tests use it to cover both. nthreads <= 0 means omp_get_max_threads().
Status quantize_rows_s8_path(bool use_avx512, DType xtype, const void* x, int64_t M, int64_t N, int64_t ldx,
                             int32_t qmax, int8_t* q, int64_t ldq, float* row_scale, int nthreads = 0);

// Pass 1 of row i: the largest magnitude key of the row in x's storage format: for fp32 the bits of
// |x| (bits & 0x7fffffff), for fp16 / bf16 the 16 bits of |x| (bits & 0x7fff). For non-negative IEEE
// values the bit patterns order like the values, and +inf < every NaN sit above all finite values, so
// the largest key is |amax| exactly and says whether the row is finite.
uint32_t quantize_rows_avx512_absmax_key(const QuantizeRowsArgs& a, int64_t i);

// Pass 2 of row i: q[i, j] = clamp(rne(float(x[i, j]) / scale), -qmax, qmax), NaN quotient -> 0.
void quantize_rows_avx512_codes(const QuantizeRowsArgs& a, int64_t i, float scale);

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

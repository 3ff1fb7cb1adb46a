// Private interface between quantize.cpp (validation, dispatch, scalar paths) and quantize_avx512.cpp.
// The AVX-512 unit is built with -mavx512*; like the GEMM units it takes plain validated data only and
// uses nothing with external inline linkage (see gemm_s8_internal.h for why).
#pragma once
#include <cstdint>

#include "lowbit/kernels/common.h"

namespace lowbit {
namespace cpu {
namespace detail {

struct QuantizeArgs {
  DType xtype;
  const void* x;
  int64_t M, K, ldx;
  const float* shift;  // nullptr: no shift
  float scale;         // finite, > 0
  int32_t qmin, qmax;  // -128 <= qmin <= qmax <= 127
  int8_t* q;
};

// Whether the CPU runs quantize_avx512.cpp.
bool quantize_avx512_supported();

// Validation + the AVX-512 kernel (use_avx512, which must be supported) or the portable OpenMP scalar
// path. Tests use it to cover both. nthreads <= 0 means omp_get_max_threads().
Status quantize_s8_path(bool use_avx512, DType xtype, const void* x, int64_t M, int64_t K, int64_t ldx,
                        const float* shift, const float* scale, int32_t qmin, int32_t qmax, int8_t* q,
                        int nthreads = 0);

// Elements [k0, k1) of row i; M, K >= 1 and arguments validated.
void quantize_s8_avx512_range(const QuantizeArgs& a, int64_t i, int64_t k0, int64_t k1);

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

// Private interface between lsq_grad.cpp (validation, the work partition, the scalar paths, the final
// sums) and lsq_grad_avx512.cpp. Plain data only across the boundary, nothing allocated or reported by
// the ISA unit (gemm_s8_internal.h says why).
#pragma once
#include <cstdint>

#include "lowbit/kernels/common.h"
#include "lowbit/kernels/lsq_grad.h"

namespace lowbit {
namespace cpu {
namespace detail {

// What every span shares: the call's validated arguments with the scalars read from memory.
struct LsqArgs {
  DType g_type;
  const void* g;     // dL/dx_hat, flat
  bool has_gscale;   // multiply g by gscale (one fp32 multiply)
  float gscale;
  DType x_type;
  const void* x;     // flat
  float step;        // s as the caller gave it (not checked)
  float lo, hi;      // float(qmin), float(qmax)
  void* grad_x;      // flat, x_type, or nullptr
};

// One run of n consecutive elements [base, base + n) of the flat arrays (n >= 1).
struct LsqSpan {
  int64_t base, n;
  const float* shift_vec;  // shift of element base + k is shift_vec[k] (channel-last rows), or nullptr
  bool has_shift_one;      // else: every element gets shift_one (one channel), or no shift at all
  float shift_one;
  double* acc_vec;         // acc_vec[k] += grad_x value of element base + k (per-column sums), or nullptr
  double* acc_one;         // *acc_one += the span's sum of grad_x values, or nullptr
  double* acc_scale;       // *acc_scale += the span's sum of fp32(R * g), or nullptr
};

// Whether the CPU runs lsq_grad_avx512.cpp.
bool lsq_grad_avx512_supported();

// Validation + the fast path, AVX-512 (use_avx512, which must be supported) or portable scalar code.
// Tests use it to cover both and to vary the thread count (nthreads <= 0: omp_get_max_threads()); the
// results never depend on nthreads.
Status lsq_grad_path(bool use_avx512, const LsqGradParams& p, int nthreads = 0);

// The AVX-512 span body (16 lanes a step, masked tail).
void lsq_span_avx512(const LsqArgs& a, const LsqSpan& s);

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

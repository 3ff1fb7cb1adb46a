// Private interface between gemm_s8.cpp (validation, dispatch, workspace) and the per-ISA GEMM
// translation units gemm_s8_avx512.cpp / gemm_s8_avx2.cpp.
//
// The ISA units are compiled with wider -m flags than the rest of the library. Any inline function
// with external linkage that they instantiate (std::string, std::vector, std::nearbyint,
// lowbit::float_to_half, Status helpers, ...) is a COMDAT the linker may pick for *every* caller, which
// would put AVX-512 instructions on the generic path. So nothing crossing this boundary is more than
// plain data, the ISA units allocate nothing and report no errors: the caller validates and owns memory.
#pragma once
#include <cstddef>
#include <cstdint>

#include "lowbit/kernels/common.h"

namespace lowbit {
namespace cpu {
namespace detail {

enum class GemmS8Isa : int32_t { kScalar = 0, kAvx2 = 1, kAvx512bw = 2, kAvx512vnni = 3 };

// Arguments already validated: M, N, K >= 1, K <= kMaxGemmS8K, strides >= row lengths, alpha finite.
struct GemmS8Args {
  const int8_t* A;
  int64_t lda;
  const int8_t* B;
  int64_t ldb;
  int64_t M, N, K;
  float alpha;
  DType otype;
  void* out;
  int64_t ldo;
  const float* row_scale;  // M per-row multipliers or nullptr (gemm_s8.h)
};

// Row i's multiplier: alpha, or alpha * row_scale[i] (one fp32 multiply; every path forms it this way).
// Internal linkage (static): safe to use from the ISA units.
static inline float row_alpha(float alpha, const float* row_scale, int64_t i) {
  return row_scale ? alpha * row_scale[i] : alpha;
}

// Best ISA the running CPU (and OS) supports, and its name as gemm_s8_isa() reports it.
GemmS8Isa gemm_s8_best_isa();
const char* gemm_s8_isa_name(GemmS8Isa isa);

// Validation + the chosen ISA's kernel; `isa` must be supported by the CPU (tests use this to cover
// every path the machine can run). nthreads <= 0 means omp_get_max_threads().
Status gemm_s8_scaled_isa(GemmS8Isa isa, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                          int64_t M, int64_t N, int64_t K, const float* alpha, DType otype, void* out,
                          int64_t ldo, int nthreads = 0, const float* row_scale = nullptr);

// How gemm_s8_scaled_batched spreads threads: kAuto picks by per-batch size (see gemm_s8.cpp); the other
// two force one strategy, so that tests cover both on any shape.
enum class GemmS8BatchSplit : int32_t { kAuto = 0, kOverBatches = 1, kWithinBatch = 2 };

// Validation + the batched GEMM on `isa` (same rules as gemm_s8_scaled_isa).
Status gemm_s8_scaled_batched_isa(GemmS8Isa isa, const int8_t* A, int64_t lda, int64_t strideA, const int8_t* B,
                                  int64_t ldb, int64_t strideB, int64_t M, int64_t N, int64_t K, int64_t batch,
                                  const float* alpha, DType otype, void* out, int64_t ldo, int64_t strideO,
                                  int nthreads = 0, GemmS8BatchSplit split = GemmS8BatchSplit::kAuto);

// Per-ISA kernels. workspace: at least *_workspace_bytes() bytes, 64-byte aligned, uninitialised.
size_t gemm_s8_avx512_workspace_bytes(const GemmS8Args& a, bool vnni, int nthreads);
void gemm_s8_avx512(const GemmS8Args& a, bool vnni, void* workspace, int nthreads);

size_t gemm_s8_avx2_workspace_bytes(const GemmS8Args& a, int nthreads);
void gemm_s8_avx2(const GemmS8Args& a, void* workspace, int nthreads);

}  // namespace detail
}  // namespace cpu
}  // namespace lowbit

// 16-bit float x int8-code GEMM (CUDA, Hopper): the float GEMMs of the QAT layers' backward read the
// saved int8 codes directly, so no float copy of them is made (issue 4: "reading the int8 operands
// directly rather than materialising float copies").
//
//   out[i, k] = to_otype( alpha * sum_r G[i, r] * float(Q[r, k]) )        (trans_g = false)
//   out[i, k] = to_otype( alpha * sum_r G[r, i] * float(Q[r, k]) )        (trans_g = true)
//
//   G: fp16 or bf16, row-major with row stride ldg elements: (M, R) or, transposed, (R, M).
//   Q: int8 codes (R, K), row-major with row stride ldq bytes.
//   out: (M, K) row-major with row stride ldo elements of otype (fp32, or G's own dtype).
//   alpha: one fp32 on the device, or nullptr for 1.
//
// * Arithmetic: every product G * q is exact in fp32 (q has at most 8 significant bits), summed in fp32 by
//   the tensor cores in a fixed order (deterministic: same inputs, same bits), times alpha in fp32, one
//   round-to-nearest-even conversion to otype. The summation order differs from a CPU GEMM's, so results
//   agree with a float64 reference to fp32 accumulation error (tests: |err| <= 2^-20 * K-term magnitude
//   sum, plus one rounding of otype).
// * R == 0: out is all zeros. M == 0 or K == 0: nothing is written.
// * Only the (M, K) window of out is written. out must not overlap G or Q.
// * Runs only where gemm_f16s8_supported holds (a compute capability 9.0 device with the sm_90a build,
//   TMA-friendly operands); elsewhere kInvalidArgument and nothing is launched: callers then widen Q and
//   run a float GEMM (what the QAT backward does on other GPUs and on the CPU).
// * Bad arguments (negative sizes, strides below their row lengths, an unsupported dtype, null pointers
//   with work to do) give kInvalidArgument with "<fn>: <what>, got <value>".
#pragma once
#include "lowbit/kernels/common.h"

struct CUstream_st;

namespace lowbit {
namespace cuda {

// The current device can run gemm_f16s8 on these operands: compute capability 9.0 with the sm_90a kernel
// loaded, gtype fp16 / bf16, M, R, K below 2^31, G and Q 16-byte aligned with row strides multiples of 16
// bytes (ldg a multiple of 8 elements, ldq of 16). Cheap (device facts cached).
bool gemm_f16s8_supported(DType gtype, const void* G, int64_t ldg, bool trans_g, const int8_t* Q, int64_t ldq,
                          int64_t M, int64_t R, int64_t K);

// The GEMM above on `stream`; device pointers; allocates nothing; no host sync.
Status gemm_f16s8(DType gtype, const void* G, int64_t ldg, bool trans_g, const int8_t* Q, int64_t ldq, int64_t M,
                  int64_t R, int64_t K, const float* alpha, DType otype, void* out, int64_t ldo, CUstream_st* stream);

}  // namespace cuda
}  // namespace lowbit

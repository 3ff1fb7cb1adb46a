// The s8 GEMM kernel on whichever device the operands live, for ops that address sub-blocks (conv
// groups, batched matmul) and so call the kernel with pointer offsets and leading dimensions.
#pragma once
#include "common.h"
#include "lowbit/kernels/gemm_s8.h"

namespace lowbit::ops {

// out (M x N, row stride ldo, dtype of `out`) = float(A . B^T) * alpha; A, B int8 with row strides
// lda, ldb; alpha one fp32 element on the device. All pointers on `device`.
inline void gemm_s8_on(const at::Device& device, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                       int64_t M, int64_t N, int64_t K, const float* alpha, at::ScalarType out_dtype, void* out,
                       int64_t ldo, const char* op) {
  const DType dt = kernel_dtype(out_dtype, op, "output");
  if (device.is_cpu()) {
    check_status(cpu::gemm_s8_scaled(A, lda, B, ldb, M, N, K, alpha, dt, out, ldo), op);
    return;
  }
#ifdef LOWBIT_WITH_CUDA
  if (device.is_cuda()) {
    check_status(cuda::gemm_s8_scaled(A, lda, B, ldb, M, N, K, alpha, dt, out, ldo,
                                      at::cuda::getCurrentCUDAStream(device.index()).stream()),
                 op);
    return;
  }
#endif
  TORCH_CHECK(false, op, ": no s8 GEMM kernel for device ", device);
}

// `batch` GEMMs of gemm_s8_on's shape in one call (one kernel launch on CUDA): batch b reads
// A + b*strideA, B + b*strideB (int8 elements) and writes out + b*strideO (elements of out_dtype). A
// stride of 0 broadcasts that operand; out batches must not overlap.
inline void gemm_s8_batched_on(const at::Device& device, const int8_t* A, int64_t lda, int64_t strideA,
                               const int8_t* B, int64_t ldb, int64_t strideB, int64_t M, int64_t N, int64_t K,
                               int64_t batch, const float* alpha, at::ScalarType out_dtype, void* out, int64_t ldo,
                               int64_t strideO, const char* op) {
  const DType dt = kernel_dtype(out_dtype, op, "output");
  if (device.is_cpu()) {
    check_status(
        cpu::gemm_s8_scaled_batched(A, lda, strideA, B, ldb, strideB, M, N, K, batch, alpha, dt, out, ldo, strideO),
        op);
    return;
  }
#ifdef LOWBIT_WITH_CUDA
  if (device.is_cuda()) {
    check_status(cuda::gemm_s8_scaled_batched(A, lda, strideA, B, ldb, strideB, M, N, K, batch, alpha, dt, out, ldo,
                                              strideO, at::cuda::getCurrentCUDAStream(device.index()).stream()),
                 op);
    return;
  }
#endif
  TORCH_CHECK(false, op, ": no s8 GEMM kernel for device ", device);
}

}  // namespace lowbit::ops

// Device-generic helpers of the QAT backwards for saved int8 codes (not operators: they run inside an
// op's CPU / CUDA kernel, so torch.compile sees only that op). Both are exact or round once, and both
// devices give the same bits (include/lowbit/kernels/convert_s8.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace lowbit::ops {

// dtype(float(q) * scale[0]): one fp32 multiply, one rounding to `dt` (fp32 / fp16 / bf16), q's shape,
// contiguous. `scale` is one element on q's device (no host read); none: the exact codes. The
// dequantized operand of a float backward GEMM in a single pass over the codes.
at::Tensor scaled_codes(const at::Tensor& q, at::ScalarType dt, const std::optional<at::Tensor>& scale,
                        const char* op);

// q (M, N) int8 -> q^T (N, M) int8, contiguous.
at::Tensor transposed_codes(const at::Tensor& q, const char* op);

}  // namespace lowbit::ops

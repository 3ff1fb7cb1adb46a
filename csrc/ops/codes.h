// Device-generic helpers of the QAT backwards for saved int8 codes (not operators: they run inside an
// op's CPU / CUDA kernel, so torch.compile sees only that op). scaled_codes and transposed_codes are
// exact or round once, and both devices give the same bits (include/lowbit/kernels/convert_s8.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace lowbit::ops {

// dtype(float(q) * scale[0]): one fp32 multiply, one rounding to `dt` (fp32 / fp16 / bf16), q's shape,
// contiguous. `scale` is one element on q's device (no host read); none: the exact codes. The
// dequantized operand of a float backward GEMM in a single pass over the codes.
at::Tensor scaled_codes(const at::Tensor& q, at::ScalarType dt, const std::optional<at::Tensor>& scale,
                        const char* op);

// out = scale[0] * (G . float(q)) (or G^T . float(q) when trans_g), fp32 accumulation, out in dtype
// out_dt: the float GEMM of a QAT backward whose second operand is saved int8 codes q (R, K). G is
// (rows, R), or (R, rows) when trans_g; scale is one fp32-convertible element on G's device or none.
// On a Hopper GPU with 16-bit G and out_dt fp32 or G's dtype, the codes are read directly by the
// gemm_f16s8 kernel (no float copy of them is made); elsewhere they are widened once (scaled_codes,
// scale folded in, rounded to G's dtype) and multiplied by at::mm. The two paths round differently (the
// kernel scales the fp32 sum; the fallback rounds each s * q to G's dtype), both to fp32-GEMM accuracy.
at::Tensor mm_codes(const at::Tensor& G, bool trans_g, const at::Tensor& q, const std::optional<at::Tensor>& scale,
                    at::ScalarType out_dt, const char* op);

// out = G . float(codes(W)) (M, K) in dtype out_dt, with codes(W) = quantize_s8(W, no shift, scale, eps,
// qmin, qmax, check_step=false) of a float weight W (N, K) made a block of kc columns at a time into one
// scratch block of N x kc bytes (never all N x K codes at once), each block's GEMM (mm_codes: the
// Hopper kernel in place, with out's row stride; elsewhere widened codes and at::mm, copied in) writing
// its columns of out. The codes are bit for bit the forward's (the same quantizer on the same values);
// on Hopper out is bitwise mm_codes(G, codes(W)) for any kc (the kernel's sum per output does not depend
// on the block), elsewhere to the float GEMM's accuracy. scale, eps: one fp32 element each on W's device
// (qat_operands' scale_w / eps views). CPU and CUDA.
at::Tensor mm_weight_codes(const at::Tensor& G, const at::Tensor& W, const at::Tensor& scale, const at::Tensor& eps,
                           int64_t qmin, int64_t qmax, int64_t kc, at::ScalarType out_dt, const char* op);

// q (M, N) int8 -> q^T (N, M) int8, contiguous.
at::Tensor transposed_codes(const at::Tensor& q, const char* op);

}  // namespace lowbit::ops

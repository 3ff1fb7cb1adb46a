// lowbit C++ API, operator level (libtorch users). Each function calls the registered operator through
// the dispatcher, so autograd, CPU/CUDA/Meta dispatch and torch.compile see the same op that Python's
// torch.ops.lowbit.* sees. Schemas and the math of each op: csrc/ops/library.cpp and docs/ops.md.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace lowbit::ops {

// int8 codes = clamp(rne((x + shift) / max(scale, eps)), qmin, qmax), computed in fp32. check_step: an
// invalid step (non-finite or <= 0) is an error, read on the host (a device sync on CUDA).
at::Tensor quantize_s8(const at::Tensor& x, const std::optional<at::Tensor>& shift, const at::Tensor& scale,
                       const at::Tensor& eps, int64_t qmin, int64_t qmax, bool check_step = true);

// fp32 max(scale1, eps) * max(scale2, eps) if both steps are finite and > 0, else NaN; 0-dim, no host read.
at::Tensor qat_alpha(const at::Tensor& scale1, const at::Tensor& scale2, const at::Tensor& eps);

// [shift as fp32 (n = shift.numel(), 0 for none) | scale1, scale2, eps as fp32, qat_alpha(scale1, scale2, eps)]:
// a 1-D fp32 tensor of n + 4 values, one launch, no host read.
at::Tensor qat_prepare(const std::optional<at::Tensor>& shift, const at::Tensor& scale1, const at::Tensor& scale2,
                       const at::Tensor& eps);

// (quantize_s8(x, shift, scale1, eps, qmin, qmax, false), qat_prepare(shift, scale1, scale2, eps)): the same
// bits as those two calls, in one launch on CUDA (a QAT forward's input codes and fp32 operands).
std::tuple<at::Tensor, at::Tensor> qat_quantize(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                                const at::Tensor& scale1, const at::Tensor& scale2,
                                                const at::Tensor& eps, int64_t qmin, int64_t qmax);

// max(2 * mean|x| / sqrt(qmax), eps) as a 0-dim fp32 tensor (mean in float64).
at::Tensor lsq_scale(const at::Tensor& x, double qmax, const std::optional<at::Tensor>& eps = std::nullopt);

// to(out_dtype)(float(qx . qw^T) * alpha); qx (..., K) int8, qw (N, K) int8. row_scale: optional fp32, one
// value per row of qx; row i is then scaled by alpha * row_scale[i] (one fp32 multiply).
at::Tensor linear_s8(const at::Tensor& qx, const at::Tensor& qw, const at::Tensor& alpha, at::ScalarType out_dtype,
                     const std::optional<at::Tensor>& row_scale = std::nullopt);

// linear_s8 with int4-pair weights: qw4 (N, ceil(K/2)) int8 (pack_s4's format), K = qx.size(-1). Bitwise
// linear_s8(qx, unpack_s4(qw4, K), alpha, out_dtype); on Hopper without the unpacked copy.
at::Tensor linear_s8s4(const at::Tensor& qx, const at::Tensor& qw4, const at::Tensor& alpha,
                       at::ScalarType out_dtype);

// Per-row symmetric int8 quantization of x (..., N): row_scale = max|x_row| / qmax (fp32, x's leading
// shape), q = clamp(rne(x / row_scale), -qmax, qmax) int8 (x's shape); an all-zero row gives scale 0 and
// codes 0, a row with inf / NaN gives scale NaN and codes 0. Returns (q, row_scale).
std::tuple<at::Tensor, at::Tensor> quantize_rows_s8(const at::Tensor& x, int64_t qmax = 127);

// The Q8Linear layer's differentiable forward (see csrc/ops/library.cpp). int8_backward: the input
// gradient's GEMM runs on int8 (the output gradient quantized per row, SwitchBack); default float.
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                     const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps,
                     const std::optional<at::Tensor>& bias = std::nullopt, bool int8_backward = false);

// The Q4Linear layer's differentiable forward (weight float, or int4 pairs (N, ceil(K/2))).
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                     const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps,
                     const std::optional<at::Tensor>& bias = std::nullopt, bool int8_backward = false);

// int8 codes in [-8, 7] <-> int4 pairs along the last dim (docs/formats.md).
at::Tensor pack_s4(const at::Tensor& codes);
at::Tensor unpack_s4(const at::Tensor& packed, int64_t K);

// The Q4Conv2d layer's differentiable forward (see csrc/ops/library.cpp).
at::Tensor q4_conv2d(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                     const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     const std::optional<at::Tensor>& bias = std::nullopt);

// The Q4MatMul layer's differentiable forward: s_x*s_y * (Q(x) . Q(y)^T) over the last two dims.
at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_clip, const at::Tensor& y_clip,
                     const at::Tensor& eps);

// Backward of an LSQ-quantized linear layer; returns (grad_x, grad_bias_a, grad_weight, grad_scale_a).
// grad_weight has dtype grad_w_dtype (default float32). qx: the forward's codes of x, or nullopt to have
// them made again from x (what the layers do: they save no codes of x). qw: the weight's int8 codes, or
// the float weight, whose codes are then made again a block of columns at a time (what the layers pass).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const std::optional<at::Tensor>& qx,
    const at::Tensor& qw, const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, int64_t qmin,
    int64_t qmax, std::array<bool, 4> output_mask, bool int8_grad = false,
    std::optional<at::ScalarType> grad_w_dtype = std::nullopt);

// ---- Weight-only quantized linear layers (schemas and formulas: csrc/ops/library.cpp, docs/ops.md) ----
// y = (x * channel_scale) . W (+ bias), differentiable in x and bias.
at::Tensor wq_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                     const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                     const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows,
                     bool asym, const std::optional<at::Tensor>& bias = std::nullopt);
at::Tensor wq_linear_forward(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                             const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits,
                             at::IntArrayRef seg_rows, bool asym, const std::optional<at::Tensor>& bias);
at::Tensor wq_linear_grad_input(const at::Tensor& grad, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& zeros, const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                                const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits,
                                at::IntArrayRef seg_rows, bool asym);
// Dense W (K, N) in input-channel order.
at::Tensor wq_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                         const at::Tensor& g_idx, const std::optional<at::Tensor>& perm, at::IntArrayRef seg_bits,
                         at::IntArrayRef seg_rows, bool asym, at::ScalarType dtype);

// Round-to-nearest per group of input channels: weight (N, K) -> (codes (K, N) int32, scales (G, N), zeros (G, N));
// mode "float_zero" (w = s*q - z), "int_zero" or "int_zero_sym" (w = s*(q - z)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> wq_quantize_rtn(const at::Tensor& weight, int64_t bits,
                                                               int64_t group_size, c10::string_view mode);
// Codes (K, N) -> int32 words (qrows, N) in the segment layout (docs/formats.md).
at::Tensor wq_pack(const at::Tensor& codes, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows);

}  // namespace lowbit::ops

// Every lowbit operator schema, in one place (implementations live beside their family:
// quantize.cpp, linear_s8.cpp, q8_linear.cpp). Conventions: M rows of activations, N output features,
// K input features; "codes" are integers stored one per int8.
#include <torch/library.h>

TORCH_LIBRARY(lowbit, m) {
  // Per-tensor symmetric quantizer with a fused shift: codes = clamp(rne((x + shift) / max(scale, eps)),
  // qmin, qmax), all in fp32. x (..., K) float32/float16/bfloat16; shift (K,) or None; scale, eps: one
  // element each. Returns int8 codes of x's shape. CPU, CUDA, Meta.
  m.def("quantize_s8(Tensor x, Tensor? shift, Tensor scale, Tensor eps, int qmin, int qmax) -> Tensor");

  // LSQ-style step size of a tensor: max(2 * mean(|x|) / sqrt(qmax), eps), the mean accumulated in
  // float64, the result rounded once to float32 (0-dim, on x's device). eps may be None (no clamp).
  m.def("lsq_scale(Tensor x, float qmax, Tensor? eps) -> Tensor");

  // int8 GEMM with a fused dequantizing epilogue: out = to(out_dtype)(float(qx . qw^T) * alpha).
  // qx (..., K) int8, qw (N, K) int8, alpha one fp32 element; out (..., N). CPU, CUDA, Meta.
  m.def("linear_s8(Tensor qx, Tensor qw, Tensor alpha, ScalarType out_dtype) -> Tensor");

  // The Q8Linear layer (LSQ quantization-aware training):
  //   y = s_a * s_w * (Q(x + bias_a; s_a) . Q(W; s_w)^T),  Q(t; s) = clamp(rne(t / s), -128, 127),
  //   s_a = max(scale_a, eps), s_w = max(scale_w, eps). weight is float (N, K) (quantized here with
  //   scale_w), or int8 codes (N, K) (a frozen qweight). Output: x's dtype. Differentiable in x, bias_a,
  //   scale_a (LSQ) and a float weight (straight-through).
  // bias: an optional float output bias (N,), added after the dequantizing epilogue (what nn.Linear's bias
  // becomes under lowbit.convert; BIE's layers have none).
  m.def(
      "q8_linear(Tensor x, Tensor bias_a, Tensor weight, Tensor scale_a, Tensor scale_w, Tensor eps, Tensor? bias=None) "
      "-> Tensor");

  // The Q4Linear layer: as q8_linear with codes in [-8, 7]; a frozen weight is int8 of shape
  // (N, ceil(K/2)) holding int4 pairs (pack_s4).
  m.def(
      "q4_linear(Tensor x, Tensor bias_a, Tensor weight, Tensor scale_a, Tensor scale_w, Tensor eps, Tensor? bias=None) "
      "-> Tensor");

  // int8 codes in [-8, 7] (..., K) -> int4 pairs (..., ceil(K/2)), first code in the high nibble; and back.
  m.def("pack_s4(Tensor codes) -> Tensor");
  m.def("unpack_s4(Tensor packed, int K) -> Tensor");

  // The Q4Conv2d layer: y = s_a*s_w * conv2d(Q(x + bias_a[c]), Q(W)) with codes in [-8, 7], zero padding
  // of the quantized input, any stride/padding/dilation/groups. x (N, C, H, W) float (any memory format);
  // weight float (O, C/groups, kh, kw), or int8 (O, kh, kw, ceil((C/groups)/2)): a frozen qweight, int4
  // pairs along the input channels in OHWI order. Output (N, O, Ho, Wo) in x's dtype, channels_last memory,
  // plus the optional output bias (O,) per channel.
  m.def(
      "q4_conv2d(Tensor x, Tensor bias_a, Tensor weight, Tensor scale_a, Tensor scale_w, Tensor eps, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor? bias=None) -> Tensor");
  // The forward's kernels, also returning the int8 codes it used (qx NHWC, qw OHWI) for the backward.
  m.def(
      "q4_conv2d_forward(Tensor x, Tensor bias_a, Tensor weight, Tensor scale_a, Tensor scale_w, Tensor eps, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor)");
  // Its backward from the saved codes (qx NHWC, qw OHWI) and the input x, as lsq_linear_backward does.
  m.def(
      "lsq_conv2d_backward(Tensor grad, Tensor x, Tensor bias_a, Tensor qx, Tensor qw, Tensor scale_a, Tensor scale_w, "
      "Tensor eps, int[2] stride, int[2] padding, int[2] dilation, int groups, int qmin, int qmax, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // The Q4MatMul layer: out = s_x*s_y * (Q(x) . Q(y)^T) over the last two dims, batch dims broadcast;
  // x (..., m, k), y (..., n, k), same float dtype; s = max(clip, eps); codes in [-8, 7].
  m.def("q4_matmul(Tensor x, Tensor y, Tensor x_clip, Tensor y_clip, Tensor eps) -> Tensor");
  // The forward's kernels, also returning the codes of the broadcast operands for the backward.
  m.def("q4_matmul_forward(Tensor x, Tensor y, Tensor x_clip, Tensor y_clip, Tensor eps) -> (Tensor, Tensor, Tensor)");
  // Its backward: STE grads of x and y with 4-bit clip masks, LSQ grads of both clips.
  m.def(
      "lsq_matmul_backward(Tensor grad, Tensor x, Tensor y, Tensor qx, Tensor qy, Tensor x_clip, Tensor y_clip, "
      "Tensor eps, int qmin, int qmax, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // Backward of a quantized (LSQ) linear layer with codes in [qmin, qmax], from the saved int8 codes and
  // the layer input x (to rebuild v = (x + bias_a) / s_a for the clip mask and the LSQ term):
  //   gA = G . (s_w qw);  grad_x = gA * [qmin <= v <= qmax];  grad_bias_a = sum over rows of grad_x;
  //   grad_weight = G^T . (s_a qx);  grad_scale_a = sum(R * gA) / sqrt(numel(x) * qmax) with
  //   R = qmin where v < qmin, qmax where v > qmax, rne(v) - v elsewhere (Esser et al. 2020, clip
  //   terms kept). output_mask selects (x, bias_a, weight, scale_a); unselected outputs are undefined.
  m.def(
      "lsq_linear_backward(Tensor grad, Tensor x, Tensor bias_a, Tensor qx, Tensor qw, Tensor scale_a, "
      "Tensor scale_w, Tensor eps, int qmin, int qmax, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

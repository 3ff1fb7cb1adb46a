// Every lowbit operator schema, in one place (implementations live beside their family:
// quantize.cpp, linear_s8.cpp, q8_linear.cpp). Conventions: M rows of activations, N output features,
// K input features; "codes" are integers stored one per int8.
#include <torch/library.h>

TORCH_LIBRARY(lowbit, m) {
  // Per-tensor symmetric quantizer with a fused shift: codes = clamp(rne((x + shift) / max(scale, eps)),
  // qmin, qmax), all in fp32. x (..., K) float32/float16/bfloat16; shift (K,) or None; scale, eps: one
  // element each. Returns int8 codes of x's shape. CPU, CUDA, Meta. check_step: a non-finite or
  // non-positive step is an error (one host read: a device sync on CUDA); the QAT layers pass False and
  // poison their output through qat_alpha instead.
  m.def("quantize_s8(Tensor x, Tensor? shift, Tensor scale, Tensor eps, int qmin, int qmax, bool check_step=True) "
        "-> Tensor");

  // GEMM scale of a QAT layer: fp32(max(scale1, eps) * max(scale2, eps)) when both steps are finite and
  // > 0, NaN otherwise (no host read). scale1, scale2, eps: one float element each. 0-dim fp32 out.
  m.def("qat_alpha(Tensor scale1, Tensor scale2, Tensor eps) -> Tensor");

  // A QAT forward's fp32 operands in one launch: a 1-D fp32 tensor [shift (n values) | scale1, scale2, eps,
  // qat_alpha(scale1, scale2, eps)], n = shift.numel() (0 for None). Each operand may be fp32 / fp16 / bf16
  // (converted exactly, as .float()). What quantize_s8 and linear_s8 then read, without a conversion kernel
  // per 16-bit operand. CPU, CUDA, Meta; no autograd history.
  m.def("qat_prepare(Tensor? shift, Tensor scale1, Tensor scale2, Tensor eps) -> Tensor");

  // A QAT forward's input codes and its qat_prepare in one op (one launch on CUDA): returns
  // (quantize_s8(x, shift, scale1, eps, qmin, qmax, check_step=False), qat_prepare(shift, scale1, scale2, eps))
  // with the same bits as those two calls. x (..., K) float; shift (K,) or None. CPU, CUDA, Meta.
  m.def("qat_quantize(Tensor x, Tensor? shift, Tensor scale1, Tensor scale2, Tensor eps, int qmin, int qmax) "
        "-> (Tensor, Tensor)");

  // LSQ-style step size of a tensor: max(2 * mean(|x|) / sqrt(qmax), eps), the mean accumulated in
  // float64, the result rounded once to float32 (0-dim, on x's device). eps may be None (no clamp).
  m.def("lsq_scale(Tensor x, float qmax, Tensor? eps=None) -> Tensor");

  // int8 GEMM with a fused dequantizing epilogue: out = to(out_dtype)(float(qx . qw^T) * alpha).
  // qx (..., K) int8, qw (N, K) int8, alpha one fp32 element; out (..., N). CPU, CUDA, Meta.
  // row_scale: optional fp32 with one value per row of qx (numel = rows); row i is then scaled by
  // alpha_i = alpha * row_scale[i] (one fp32 multiply): the GEMM of a per-row quantized qx.
  m.def("linear_s8(Tensor qx, Tensor qw, Tensor alpha, ScalarType out_dtype, Tensor? row_scale=None) -> Tensor");

  // linear_s8 with the weights as int4 pairs (pack_s4's format): qw4 (N, ceil(K/2)) int8, K = qx.size(-1).
  // Bitwise linear_s8(qx, unpack_s4(qw4, K), alpha, out_dtype). On Hopper the pairs are unpacked in the
  // GEMM's registers (no int8 copy of the weights); elsewhere it unpacks first. CPU, CUDA, Meta.
  m.def("linear_s8s4(Tensor qx, Tensor qw4, Tensor alpha, ScalarType out_dtype) -> Tensor");

  // Per-row symmetric int8 quantizer (SwitchBack): for each row of x (..., N) float,
  //   row_scale = fp32(max|x_row|) / qmax (one fp32 division), q = clamp(rne(x / row_scale), -qmax, qmax);
  //   an all-zero row: scale 0, codes 0; a row holding inf / NaN: scale NaN, codes 0 (poisons the GEMM
  //   output of that row instead of clipping a bad gradient). Returns (q int8 of x's shape, row_scale fp32
  //   of x's leading shape). CPU, CUDA, Meta; bitwise the same on CPU and CUDA.
  m.def("quantize_rows_s8(Tensor x, int qmax=127) -> (Tensor, Tensor)");

  // The Q8Linear layer (LSQ quantization-aware training):
  //   y = s_a * s_w * (Q(x + bias_a; s_a) . Q(W; s_w)^T),  Q(t; s) = clamp(rne(t / s), -128, 127),
  //   s_a = max(scale_a, eps), s_w = max(scale_w, eps). weight is float (N, K) (quantized here with
  //   scale_w), or int8 codes (N, K) (a frozen qweight). Output: x's dtype. Differentiable in x, bias_a,
  //   scale_a (LSQ) and a float weight (straight-through).
  // bias: an optional float output bias (N,), added after the dequantizing epilogue (what nn.Linear's bias
  // becomes under lowbit.convert; BIE's layers have none).
  // int8_backward: the backward's input-gradient GEMM runs on int8 tensor cores (SwitchBack, Wortsman et
  // al. 2023): the output gradient G is quantized per row (quantize_rows_s8) and multiplied by the weight
  // codes, G.Qw ~= row_scale * (qG . Qw); the weight gradient stays in float. Forward unchanged.
  m.def(
      "q8_linear(Tensor x, Tensor bias_a, Tensor weight, Tensor scale_a, Tensor scale_w, Tensor eps, "
      "Tensor? bias=None, bool int8_backward=False) -> Tensor");

  // The Q4Linear layer: as q8_linear with codes in [-8, 7]; a frozen weight is int8 of shape
  // (N, ceil(K/2)) holding int4 pairs (pack_s4).
  m.def(
      "q4_linear(Tensor x, Tensor bias_a, Tensor weight, Tensor scale_a, Tensor scale_w, Tensor eps, "
      "Tensor? bias=None, bool int8_backward=False) -> Tensor");

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
  m.def(
      "q4_matmul_forward(Tensor x, Tensor y, Tensor x_clip, Tensor y_clip, Tensor eps, bool save_codes=True) -> "
      "(Tensor, Tensor, Tensor)");
  // Its backward: STE grads of x and y with 4-bit clip masks, LSQ grads of both clips.
  m.def(
      "lsq_matmul_backward(Tensor grad, Tensor x, Tensor y, Tensor qx, Tensor qy, Tensor x_clip, Tensor y_clip, "
      "Tensor eps, int qmin, int qmax, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // Backward of a quantized (LSQ) linear layer with codes in [qmin, qmax], from the int8 codes and the
  // layer input x (to rebuild v = (x + bias_a) / s_a for the clip mask and the LSQ term). qx None: the
  // codes of x are made again by the forward's quantizer (qat_quantize with qmin / qmax), only while the
  // weight gradient needs them. qw: the weight's int8 codes, or the float weight (codes then made here,
  // a block of columns at a time, bit for bit quantize_s8(weight, None, scale_w, eps, qmin, qmax)):
  //   gA = G . (s_w qw);  grad_x = gA * [qmin <= v <= qmax];  grad_bias_a = sum over rows of grad_x;
  //   grad_weight = G^T . (s_a qx);  grad_scale_a = sum(R * gA) / sqrt(numel(x) * qmax) with
  //   R = qmin where v < qmin, qmax where v > qmax, rne(v) - v elsewhere (Esser et al. 2020, clip
  //   terms kept). output_mask selects (x, bias_a, weight, scale_a); unselected outputs are undefined.
  //   int8_grad: gA = s_w * row_scale * (qG . qw) with (qG, row_scale) = quantize_rows_s8(G, 127), on the
  //   int8 GEMM (SwitchBack); grad_weight stays the float GEMM. grad_weight_dtype (default float32): the
  //   dtype of grad_weight; the GEMM writes it directly when it is the compute dtype (docs/ops.md).
  m.def(
      "lsq_linear_backward(Tensor grad, Tensor x, Tensor bias_a, Tensor? qx, Tensor qw, Tensor scale_a, "
      "Tensor scale_w, Tensor eps, int qmin, int qmax, bool[4] output_mask, bool int8_grad=False, "
      "ScalarType? grad_weight_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- Weight-only quantized linear layers (MPQLinear, MBWQLinear; include/lowbit/kernels/wq.h) ----
  // The weight arguments (the runtime form every checkpoint format is prepared into):
  //   qweight (qrows, N) int32 words; scales, zeros (G, N) float (one dtype); g_idx (K,) int32 group of each
  //   stored row; perm (K,) int32 stored row -> input channel (None or empty: identity); channel_scale (K
  //   elements, scales' dtype; None: ones); seg_bits / seg_rows: width and exclusive end row of each segment;
  //   asym: w = s*(q - z) (integer zero points) instead of w = s*q - z.
  // y = (x * channel_scale) . W (+ bias): x (..., K) float, y (..., N) in x's dtype, fp32 accumulation.
  // Differentiable in x and bias. CPU, CUDA, Meta.
  m.def(
      "wq_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, Tensor? perm, "
      "Tensor? channel_scale, int[] seg_bits, int[] seg_rows, bool asym, Tensor? bias=None) -> Tensor");
  // Its forward kernels (no autograd) and the input gradient (grad . W^T) * channel_scale.
  m.def(
      "wq_linear_forward(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, Tensor? perm, "
      "Tensor? channel_scale, int[] seg_bits, int[] seg_rows, bool asym, Tensor? bias=None) -> Tensor");
  m.def(
      "wq_linear_grad_input(Tensor grad, Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, Tensor? perm, "
      "Tensor? channel_scale, int[] seg_bits, int[] seg_rows, bool asym) -> Tensor");
  // The dense weight W (K, N) in input-channel order, each element rounded once to dtype (no channel_scale).
  m.def(
      "wq_dequantize(Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, Tensor? perm, int[] seg_bits, "
      "int[] seg_rows, bool asym, ScalarType dtype) -> Tensor");
  // Unsigned codes (K, N) int32 <-> words (qrows, N) int32 in the segment layout (qrows = the rows used).
  m.def("wq_pack(Tensor codes, int[] seg_bits, int[] seg_rows) -> Tensor");
  m.def("wq_unpack(Tensor qweight, int[] seg_bits, int[] seg_rows) -> Tensor");
  // GPTQ packed zero points: integer zero points z (G, N) (any dtype holding integers in [1, 2^bits]) ->
  // (G, ceil(N*bits/32)) int32 words holding z - 1 along N, LSB first; and back (z = stored + 1, as `dtype`).
  m.def("wq_pack_zeros(Tensor zeros, int bits) -> Tensor");
  m.def("wq_unpack_zeros(Tensor qzeros, int bits, int N, ScalarType dtype) -> Tensor");
  // Round-to-nearest quantization of a float weight (N, K) (nn.Linear layout) per group of group_size
  // input channels (-1: one group). mode "float_zero": min-max, w = s*q - z; "int_zero": min-max with an
  // integer zero point, w = s*(q - z) (a group with z = 0 stored mirrored: -s, z = maxq); "int_zero_sym": s = max|w| / (2^(bits-1) - 1/2)... see docs/formats.md.
  // Returns codes (K, N) int32, scales (G, N), zeros (G, N) in the weight's dtype.
  m.def("wq_quantize_rtn(Tensor weight, int bits, int group_size, str mode) -> (Tensor, Tensor, Tensor)");
  // GBA double-quantization decode (BIE's prepare_params), in the dtype of the dq scales:
  //   sym: scales = (hi4(qstatistic) - qscales_zeros) * qscales_scales, zeros = (lo4 - qzeros_zeros) * qzeros_scales
  //   asym: scales = (qscales - qscales_zeros) * qscales_scales; zeros is returned empty.
  // Result (G, N).
  m.def(
      "wq_gba_decode(Tensor qstat, Tensor qscales_zeros, Tensor qscales_scales, Tensor? qzeros_zeros, "
      "Tensor? qzeros_scales, bool asym, int N) -> (Tensor, Tensor)");
  // Layout of an MBWQ layer (checked on the host): channel-mix from q_groups (2G,) int16 pairs (bits, first
  // word row), or layer-mix (q_groups None: one width `bits`, groups of group_size stored rows).
  // Returns (g_idx (K,) int32 on q_groups' device (or CPU), segments (2, nseg) int64 [bits; end row] on the
  // CPU, q_group_map (2K,) int16 (BIE's: group, rows left in the group)).
  m.def(
      "wq_mbwq_layout(Tensor? q_groups, int K, int qrows, int bits, int group_size) -> (Tensor, Tensor, Tensor)");
  // Checks a stored-row -> channel permutation (int16 read as uint16, int32 or int64; all zeros = identity)
  // and returns it as int32, or an empty tensor for the identity.
  m.def("wq_check_perm(Tensor perm, int K) -> Tensor");
  // Rows of a one-width qweight reordered: stored row r of the result is row rows[r] of the input.
  m.def("wq_permute_rows(Tensor qweight, int bits, Tensor rows) -> Tensor");
  // GPTQ act-order made contiguous (exllama's trick, done once at prepare): when g_idx is not
  // non-decreasing, returns (qweight with its rows in stable g_idx order, the sorted g_idx, perm int32:
  // stored row -> input channel); otherwise (qweight, g_idx, empty).
  m.def("wq_sort_groups(Tensor qweight, Tensor g_idx, int bits) -> (Tensor, Tensor, Tensor)");
  // Checks that every g_idx entry is in [0, groups); returns it as int32.
  m.def("wq_check_g_idx(Tensor g_idx, int K, int groups) -> Tensor");
}

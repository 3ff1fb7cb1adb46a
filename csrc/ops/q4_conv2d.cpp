// Op family "q4_conv2d": the Q4Conv2d layer. Forward = quantize (NHWC, per-channel shift) + per-group
// im2col of int8 codes + the s8 GEMM against OHWI weight codes (on CUDA, where conv_s8.h prefers it, one
// implicit-GEMM kernel instead of the last two: the same bits); backward = float convolution gradients
// of the dequantized operands + the shared LSQ input gradients (lsq.h). Checks, Meta, autograd, dispatch.
#include <torch/autograd.h>
#include <torch/library.h>

#include "codes.h"
#include "common.h"
#include "gemm_dispatch.h"
#include "lowbit/kernels/conv_s8.h"
#include "lowbit/kernels/im2col.h"
#include "lowbit/kernels/pack_int4.h"
#include "lowbit/ops.h"
#include "lsq.h"

namespace lowbit::ops {
namespace {

constexpr const char* kOp = "lowbit.q4_conv2d";
constexpr int64_t kQmin = -8, kQmax = 7;

struct ConvArgs {
  Conv2dShape s;
  int64_t O, Cg, Og, groups;
};

// Checks that hold for symbolic shapes too (the Meta kernel runs them under torch.compile). Returns the
// output spatial size (Ho, Wo) and O.
struct ConvOut {
  c10::SymInt O, Ho, Wo, Cg;
};

c10::SymInt conv_out_size(const c10::SymInt& in, const c10::SymInt& k, int64_t stride, int64_t pad, int64_t dil) {
  const auto span = in + 2 * pad - dil * (k - 1) - 1;
  TORCH_CHECK(span >= 0, kOp, ": the input extent ", in, " is smaller than the dilated kernel (", k, ", dilation ",
              dil, ") plus padding ", pad);
  return span / stride + 1;
}

ConvOut check_conv(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight, const at::Tensor& scale_a,
                   const at::Tensor& scale_w, const at::Tensor& eps, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  check_float_tensor(x, kOp, "x");
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be 4-D (N, C, H, W), got shape ", x.sym_sizes());
  TORCH_CHECK(x.sym_numel() > 0, kOp, ": x is an empty batch (shape ", x.sym_sizes(),
              "); the activation scale and the LSQ gradient are undefined for no data");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOp,
              ": stride, padding and dilation must have 2 values each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, kOp, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, kOp, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, kOp, ": dilation must be >= 1, got ", dilation);
  const auto C = x.sym_size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0, kOp, ": groups=", groups, " must be >= 1 and divide in_channels=", C);
  const auto Cg = C / groups;
  TORCH_CHECK(weight.defined() && weight.dim() == 4, kOp, ": weight must be 4-D, got ",
              weight.defined() ? weight.sym_sizes() : c10::SymIntArrayRef{});
  c10::SymInt O, kh, kw;
  if (weight.scalar_type() == at::kChar) {  // frozen qweight: (O, kh, kw, ceil(Cg/2)) int4 pairs
    O = weight.sym_size(0), kh = weight.sym_size(1), kw = weight.sym_size(2);
    TORCH_CHECK(weight.sym_size(3) == (Cg + 1) / 2, kOp, ": a packed qweight must have shape (O, kh, kw, ",
                (Cg + 1) / 2, ") for ", Cg, " input channels per group, got ", weight.sym_sizes());
  } else {
    TORCH_CHECK(is_float_dtype(weight.scalar_type()), kOp, ": weight must be float or an int8 qweight, got ",
                weight.scalar_type());
    O = weight.sym_size(0), kh = weight.sym_size(2), kw = weight.sym_size(3);
    TORCH_CHECK(weight.sym_size(1) == Cg, kOp, ": weight must have shape (O, ", Cg, ", kh, kw) for in_channels=", C,
                " and groups=", groups, ", got ", weight.sym_sizes());
  }
  TORCH_CHECK(O >= 1 && O % groups == 0 && kh >= 1 && kw >= 1, kOp, ": out_channels=", O,
              " must be a positive multiple of groups=", groups, " and the kernel non-empty");
  check_qat_state(x, bias_a, C, weight, scale_a, scale_w, eps, kOp);
  return {O, conv_out_size(x.sym_size(2), kh, stride[0], padding[0], dilation[0]),
          conv_out_size(x.sym_size(3), kw, stride[1], padding[1], dilation[1]), Cg};
}

ConvArgs conv_args(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  const bool packed = weight.scalar_type() == at::kChar;
  ConvArgs a;
  a.s = Conv2dShape{x.size(0), x.size(2), x.size(3), x.size(1), packed ? weight.size(1) : weight.size(2),
                    packed ? weight.size(2) : weight.size(3), stride[0], stride[1], padding[0], padding[1],
                    dilation[0], dilation[1]};
  a.O = weight.size(0);
  a.Cg = a.s.C / groups;
  a.Og = a.O / groups;
  a.groups = groups;
  return a;
}

// The output's memory format, as nn.Conv2d's: channels_last for a channels_last input, else contiguous
// NCHW (the kernels write NHWC; an NCHW caller gets one copy of the output rather than strides that
// break .view() on it).
at::MemoryFormat output_format(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous;
}
at::Tensor as_output(const at::Tensor& out_nhwc, const at::Tensor& x) {
  const auto y = out_nhwc.permute({0, 3, 1, 2});
  return output_format(x) == at::MemoryFormat::ChannelsLast ? y : y.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_forward_meta(const at::Tensor& x, const at::Tensor& bias_a,
                                                                 const at::Tensor& weight, const at::Tensor& scale_a,
                                                                 const at::Tensor& scale_w, const at::Tensor& eps,
                                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                                 at::IntArrayRef dilation, int64_t groups) {
  const auto o = check_conv(x, bias_a, weight, scale_a, scale_w, eps, stride, padding, dilation, groups);
  const bool packed = weight.scalar_type() == at::kChar;
  const auto kh = weight.sym_size(packed ? 1 : 2), kw = weight.sym_size(packed ? 2 : 3);
  auto y = at::empty_symint({x.sym_size(0), o.O, o.Ho, o.Wo}, x.options().memory_format(output_format(x)));
  auto qx = at::empty_symint({x.sym_size(0), x.sym_size(2), x.sym_size(3), x.sym_size(1)}, x.options().dtype(at::kChar));
  auto qw = at::empty_symint({o.O, kh, kw, o.Cg}, x.options().dtype(at::kChar));
  return {y, qx, qw};
}

void im2col_on(const at::Tensor& qx, const Conv2dShape& s, int64_t c0, int64_t Cg, at::Tensor& cols) {
  if (qx.is_cpu()) {
    check_status(cpu::im2col_s8_nhwc(qx.data_ptr<int8_t>(), s, c0, Cg, cols.data_ptr<int8_t>()), kOp);
    return;
  }
#ifdef LOWBIT_WITH_CUDA
  check_status(cuda::im2col_s8_nhwc(qx.data_ptr<int8_t>(), s, c0, Cg, cols.data_ptr<int8_t>(), current_stream(qx)),
               kOp);
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_forward_impl(const at::Tensor& x, const at::Tensor& bias_a,
                                                                 const at::Tensor& weight, const at::Tensor& scale_a,
                                                                 const at::Tensor& scale_w, const at::Tensor& eps,
                                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                                 at::IntArrayRef dilation, int64_t groups) {
  check_conv(x, bias_a, weight, scale_a, scale_w, eps, stride, padding, dilation, groups);
  const auto a = conv_args(x, weight, stride, padding, dilation, groups);
  c10::OptionalDeviceGuard guard(x.device());
  const auto& s = a.s;
  // Channels last, so the per-channel shift runs along the quantizer's last dim and im2col copies
  // contiguous channel runs.
  // x's codes and the fp32 operands (shift, steps, eps, alpha: NaN for an invalid step, no host read) in
  // one op, one launch on CUDA.
  const auto [qx, prepared] = qat_quantize(x.permute({0, 2, 3, 1}).contiguous(), bias_a, scale_a, scale_w, eps, kQmin,
                                           kQmax);
  const auto p = qat_operands(prepared, bias_a);
  const auto qw = weight.scalar_type() == at::kChar
                      ? unpack_s4(weight, a.Cg)
                      : quantize_s8(weight.permute({0, 2, 3, 1}).contiguous(), std::nullopt, p.scale_w, p.eps, kQmin,
                                    kQmax, false);
  const auto& alpha = p.alpha;
  const int64_t Ho = s.out_h(), Wo = s.out_w(), rows = s.N * Ho * Wo, kdim = s.kh * s.kw * a.Cg;
  auto out = at::empty({s.N, Ho, Wo, a.O}, x.options());
  const bool pointwise = s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0;
  const int64_t esize = out.element_size();
#ifdef LOWBIT_WITH_CUDA
  // CUDA: an implicit GEMM (the im2col matrix gathered inside the GEMM) where it can run and is the
  // faster choice (conv_s8.h); the same bits as im2col + GEMM.
  if (x.is_cuda() && !pointwise) {
    bool implicit = true;
    for (int64_t g = 0; g < a.groups && implicit; ++g)
      implicit = cuda::conv2d_s8_nhwc_preferred(qx.data_ptr<int8_t>(), s, g * a.Cg, a.Cg,
                                                qw.data_ptr<int8_t>() + g * a.Og * kdim, a.Og);
    if (implicit) {
      const DType dt = kernel_dtype(x.scalar_type(), kOp, "output");
      for (int64_t g = 0; g < a.groups; ++g)
        check_status(cuda::conv2d_s8_nhwc(qx.data_ptr<int8_t>(), s, g * a.Cg, a.Cg,
                                          qw.data_ptr<int8_t>() + g * a.Og * kdim, a.Og, alpha.data_ptr<float>(), dt,
                                          static_cast<char*>(out.data_ptr()) + g * a.Og * esize, a.O,
                                          current_stream(qx)),
                     kOp);
      return {as_output(out, x), qx, qw};
    }
  }
#endif
  at::Tensor cols;
  if (!pointwise) cols = at::empty({rows, kdim}, qx.options());
  for (int64_t g = 0; g < a.groups; ++g) {
    const int8_t* A;
    int64_t lda;
    if (pointwise) {  // a 1x1 stride-1 conv reads the codes in place: row (n, p, q), columns of group g
      A = qx.data_ptr<int8_t>() + g * a.Cg;
      lda = s.C;
    } else {
      im2col_on(qx, s, g * a.Cg, a.Cg, cols);
      A = cols.data_ptr<int8_t>();
      lda = kdim;
    }
    gemm_s8_on(x.device(), A, lda, qw.data_ptr<int8_t>() + g * a.Og * kdim, kdim, rows, a.Og, kdim,
               alpha.data_ptr<float>(), x.scalar_type(), static_cast<char*>(out.data_ptr()) + g * a.Og * esize, a.O,
               kOp);
  }
  return {as_output(out, x), qx, qw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q4_conv2d_forward(const at::Tensor& x, const at::Tensor& bias_a,
                                                                 const at::Tensor& weight, const at::Tensor& scale_a,
                                                                 const at::Tensor& scale_w, const at::Tensor& eps,
                                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                                 at::IntArrayRef dilation, int64_t groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::q4_conv2d_forward", "")
                       .typed<decltype(q4_conv2d_forward)>();
  return op.call(x, bias_a, weight, scale_a, scale_w, eps, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& qx, const at::Tensor& qw,
    const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::lsq_conv2d_backward", "")
                       .typed<decltype(lsq_conv2d_backward)>();
  return op.call(grad, x, bias_a, qx, qw, scale_a, scale_w, eps, stride, padding, dilation, groups, qmin, qmax, mask);
}

// dL/dx_hat and dL/dW_hat from torch's own convolution backward on the dequantized operands (fp32),
// then the LSQ input gradients with the shift along the channel dim.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_conv2d_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& qx, const at::Tensor& qw,
    const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask) {
  const bool need_in = mask[0] || mask[1] || mask[3];
  constexpr const char* op = "lowbit.lsq_conv2d_backward";
  // The fp32 shift and steps max(scale, eps) from one launch (no clamp or conversion op per scalar).
  const auto p = prepare_qat_operands(bias_a, scale_a, scale_w, eps);
  const auto x_hat = scaled_codes(qx, at::kFloat, p.step_a, op).permute({0, 3, 1, 2});
  const auto w_hat = scaled_codes(qw, at::kFloat, p.step_w, op).permute({0, 3, 1, 2}).contiguous();
  auto [gA, gW, unused] = at::convolution_backward(as_float(grad), x_hat, w_hat, std::nullopt, stride, padding,
                                                   dilation, false, {0, 0}, groups, {need_in, mask[2], false});
  at::Tensor grad_x, grad_b, grad_s;
  if (need_in) {
    auto g = lsq_input_grads(gA, x, bias_a, 1, scale_a, eps, qmin, qmax, mask[0], mask[1], mask[3], -1, std::nullopt,
                             false, p.step_a, p.shift);
    grad_x = g.grad_x;
    grad_b = g.grad_shift;
    grad_s = g.grad_scale;
  }
  return {grad_x, grad_b, mask[2] ? gW : at::Tensor(), grad_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_conv2d_backward_meta(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& qx, const at::Tensor& qw,
    const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask) {
  at::Tensor grad_x, grad_b, grad_w, grad_s;
  if (mask[0]) grad_x = at::empty_like(x);
  if (mask[1]) grad_b = at::empty_like(bias_a);
  if (mask[2])
    grad_w = at::empty_symint({qw.sym_size(0), qw.sym_size(3), qw.sym_size(1), qw.sym_size(2)},
                              qw.options().dtype(at::kFloat));
  if (mask[3]) grad_s = at::empty_like(scale_a);
  return {grad_x, grad_b, grad_w, grad_s};
}

// y (N, O, Ho, Wo) += bias[o], in y's dtype (y is fresh: the in-place add aliases nothing of the caller's).
void add_output_bias(at::Tensor& y, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_output_bias(bias, x, y.sym_size(1), kOp);
  if (bias.has_value() && bias->defined()) y.add_(as_dtype(*bias, y.scalar_type()).reshape({1, -1, 1, 1}));
}

class Q4Conv2dFunction : public torch::autograd::Function<Q4Conv2dFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias_a,
                            const at::Tensor& weight, const at::Tensor& scale_a, const at::Tensor& scale_w,
                            const at::Tensor& eps, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, qx, qw] = q4_conv2d_forward(x, bias_a, weight, scale_a, scale_w, eps, stride, padding, dilation, groups);
    add_output_bias(y, x, bias);
    save_qat_meta(ctx, weight, bias);
    ctx->save_for_backward({x, bias_a, qx, qw, scale_a, scale_w, eps});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [gx, gb, gw, gs] = lsq_conv2d_backward(
        grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
        ctx->saved_data["groups"].toInt(), kQmin, kQmax, qat_grad_mask(ctx));
    // Output bias: the upstream gradient summed over batch and space. Autograd edges exist only for the
    // tensor inputs present (the int lists are not edges), so a given bias is edge 6.
    const auto gbias = qat_bias_grad(ctx, grads[0], {0, 2, 3});
    const at::Tensor none;  // eps, scale_w and the four non-tensor arguments
    return {gx, gb, qat_weight_grad(ctx, gw), gs, none, none, none, none, none, none, gbias};
  }
};

at::Tensor q4_conv2d_composite(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                               const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, const std::optional<at::Tensor>& bias) {
  auto y = std::get<0>(q4_conv2d_forward(x, bias_a, weight, scale_a, scale_w, eps, stride, padding, dilation, groups));
  add_output_bias(y, x, bias);
  return y;
}

at::Tensor q4_conv2d_autograd(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                              const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, const std::optional<at::Tensor>& bias) {
  return Q4Conv2dFunction::apply(x, bias_a, weight, scale_a, scale_w, eps, stride, padding, dilation, groups, bias);
}

}  // namespace

at::Tensor q4_conv2d(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight, const at::Tensor& scale_a,
                     const at::Tensor& scale_w, const at::Tensor& eps, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::q4_conv2d", "").typed<decltype(q4_conv2d)>();
  return op.call(x, bias_a, weight, scale_a, scale_w, eps, stride, padding, dilation, groups, bias);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("q4_conv2d_forward", &conv_forward_impl);
  m.impl("lsq_conv2d_backward", &lsq_conv2d_backward_impl);
}
TORCH_LIBRARY_IMPL(lowbit, Meta, m) {
  m.impl("q4_conv2d_forward", &conv_forward_meta);
  m.impl("lsq_conv2d_backward", &lsq_conv2d_backward_meta);
}
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("q4_conv2d_forward", &conv_forward_impl);
  m.impl("lsq_conv2d_backward", &lsq_conv2d_backward_impl);
}
#endif
TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) { m.impl("q4_conv2d", &q4_conv2d_composite); }
TORCH_LIBRARY_IMPL(lowbit, Autograd, m) { m.impl("q4_conv2d", &q4_conv2d_autograd); }

}  // namespace lowbit::ops

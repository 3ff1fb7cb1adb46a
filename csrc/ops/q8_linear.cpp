// Op family "q8_linear": the Q8Linear layer's forward (composite of quantize_s8 and linear_s8), its
// autograd Function, and lsq_linear_backward (shared with the 4-bit layers: the codes range is an
// argument). Checks, autograd and composition only; kernels do the numerics.
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "lowbit/ops.h"

namespace lowbit::ops {
namespace {

constexpr const char* kOp = "lowbit.q8_linear";
constexpr int64_t kQmin = -128, kQmax = 127;

void check_q8_linear(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                     const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps) {
  check_float_tensor(x, kOp, "x");
  TORCH_CHECK(weight.defined(), kOp, ": weight is undefined (None)");
  TORCH_CHECK(weight.dim() == 2, kOp, ": weight must be 2-D (out_channels, in_channels), got shape ",
              weight.sizes());
  TORCH_CHECK(is_float_dtype(weight.scalar_type()) || weight.scalar_type() == at::kChar, kOp,
              ": weight must be float (trained weight) or int8 (quantized codes), got ", weight.scalar_type());
  // sym_* accessors: these checks also run on symbolic shapes under torch.compile.
  const auto K = weight.sym_size(1);
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) == K, kOp, ": x must have in_channels=", K,
              " features in its last dim, got shape ", x.sym_sizes());
  TORCH_CHECK(x.sym_numel() > 0, kOp, ": x is an empty batch (shape ", x.sym_sizes(),
              "); the activation scale and the LSQ gradient are undefined for no data");
  check_float_tensor(bias_a, kOp, "bias_a");
  TORCH_CHECK(bias_a.dim() == 1 && bias_a.sym_size(0) == K, kOp, ": bias_a must have shape (", K, ",), got ",
              bias_a.sym_sizes());
  check_same_device(x, "x", weight, kOp, "weight");
  check_same_device(x, "x", bias_a, kOp, "bias_a");
  check_scalar(scale_a, x, "x", kOp, "scale_a");
  check_scalar(scale_w, x, "x", kOp, "scale_w");
  check_scalar(eps, x, "x", kOp, "eps");
}

struct Q8Forward {
  at::Tensor y, qx, qw;
};

// y = s_a * s_w * (Qx . Qw^T) through the dispatcher (works for every backend, Meta included).
Q8Forward q8_forward(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                     const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps) {
  check_q8_linear(x, bias_a, weight, scale_a, scale_w, eps);
  Q8Forward f;
  f.qx = quantize_s8(x, bias_a, scale_a, eps, kQmin, kQmax);
  f.qw = weight.scalar_type() == at::kChar ? weight : quantize_s8(weight, std::nullopt, scale_w, eps, kQmin, kQmax);
  const auto alpha = clamp_scale(scale_a, eps) * clamp_scale(scale_w, eps);  // one fp32 multiply
  f.y = linear_s8(f.qx, f.qw, alpha, x.scalar_type());
  return f;
}

at::Tensor q8_linear_composite(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                               const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps) {
  return q8_forward(x, bias_a, weight, scale_a, scale_w, eps).y;
}

// Saved for backward: the int8 codes qx (M x K) and qw (N x K), the scalars, and a reference to the
// caller's input x (no copy): the clip mask and the LSQ term need v = (x + bias_a) / s_a exactly.
class Q8LinearFunction : public torch::autograd::Function<Q8LinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias_a,
                            const at::Tensor& weight, const at::Tensor& scale_a, const at::Tensor& scale_w,
                            const at::Tensor& eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto f = q8_forward(x, bias_a, weight, scale_a, scale_w, eps);
    ctx->save_for_backward({x, bias_a, f.qx, f.qw, scale_a, scale_w, eps});
    ctx->saved_data["weight_dtype"] = c10::IValue(static_cast<int64_t>(weight.scalar_type()));
    return f.y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2) && weight_dtype != at::kChar,
                                      ctx->needs_input_grad(3)};
    auto [gx, gb, gw, gs] = lsq_linear_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], kQmin, kQmax, mask);
    if (gw.defined()) gw = gw.to(weight_dtype);
    return {gx, gb, gw, gs, at::Tensor(), at::Tensor()};
  }
};

at::Tensor q8_linear_autograd(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                              const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps) {
  return Q8LinearFunction::apply(x, bias_a, weight, scale_a, scale_w, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_linear_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& qx, const at::Tensor& qw,
    const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask) {
  constexpr const char* op = "lowbit.lsq_linear_backward";
  TORCH_CHECK(qmin < 0 && qmax > 0 && qmin >= -128 && qmax <= 127, op, ": need -128 <= qmin < 0 < qmax <= 127, got ",
              qmin, ", ", qmax);
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == at::kChar, op, ": qw must be 2-D int8 codes (N, K)");
  TORCH_CHECK(qx.scalar_type() == at::kChar, op, ": qx must hold int8 codes");
  const int64_t N = qw.size(0), K = qw.size(1);
  TORCH_CHECK(x.size(-1) == K && qx.sizes() == x.sizes(), op, ": x ", x.sizes(), " and qx ", qx.sizes(),
              " must match, with K=", K);
  TORCH_CHECK(grad.size(-1) == N && grad.numel() / N == x.numel() / K, op, ": grad has shape ", grad.sizes(),
              ", expected (..., ", N, ") with the rows of x");
  const auto G = as_float(grad.reshape({-1, N}));
  const auto s_a = clamp_scale(scale_a, eps), s_w = clamp_scale(scale_w, eps);
  at::Tensor grad_x, grad_b, grad_w, grad_s;
  if (mask[0] || mask[1] || mask[3]) {
    const auto gA = at::mm(G, qw.to(at::kFloat) * s_w);  // dL/dx_hat (M, K), straight through
    // Same fp32 arithmetic as the forward quantizer, so rne(v) equals the forward's code inside the range.
    const auto v = (as_float(x.reshape({-1, K})) + as_float(bias_a)) / s_a;
    const auto below = v < double(qmin), above = v > double(qmax);
    const auto inside = at::logical_not(at::logical_or(below, above)).logical_and(v == v);
    const auto gx = gA * inside;
    if (mask[0]) grad_x = gx.to(x.scalar_type()).reshape(x.sizes());
    if (mask[1]) grad_b = gx.sum(0).to(bias_a.scalar_type());
    if (mask[3]) {
      auto r = at::where(below, double(qmin), at::where(above, double(qmax), at::round(v) - v));
      const double g = 1.0 / std::sqrt(double(x.numel()) * double(qmax));
      grad_s = ((r * gA).sum(at::kDouble) * g).to(scale_a.scalar_type()).reshape(scale_a.sizes());
    }
  }
  if (mask[2]) grad_w = at::mm(G.t(), qx.reshape({-1, K}).to(at::kFloat) * s_a);  // STE, no clip mask
  return {grad_x, grad_b, grad_w, grad_s};
}

// Shapes and dtypes only: the backward as fake tensors see it under torch.compile.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_linear_backward_meta(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& qx, const at::Tensor& qw,
    const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask) {
  at::Tensor grad_x, grad_b, grad_w, grad_s;
  if (mask[0]) grad_x = at::empty_symint(x.sym_sizes(), x.options());
  if (mask[1]) grad_b = at::empty_symint(bias_a.sym_sizes(), bias_a.options());
  if (mask[2]) grad_w = at::empty_symint(qw.sym_sizes(), qw.options().dtype(at::kFloat));
  if (mask[3]) grad_s = at::empty_symint(scale_a.sym_sizes(), scale_a.options());
  return {grad_x, grad_b, grad_w, grad_s};
}

}  // namespace

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight, const at::Tensor& scale_a,
                     const at::Tensor& scale_w, const at::Tensor& eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::q8_linear", "").typed<decltype(q8_linear)>();
  return op.call(x, bias_a, weight, scale_a, scale_w, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& qx, const at::Tensor& qw,
    const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, int64_t qmin, int64_t qmax,
    std::array<bool, 4> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::lsq_linear_backward", "")
                       .typed<decltype(lsq_linear_backward)>();
  return op.call(grad, x, bias_a, qx, qw, scale_a, scale_w, eps, qmin, qmax, output_mask);
}

TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) { m.impl("q8_linear", &q8_linear_composite); }
// The backward's body is device-generic ATen, registered per backend so fake tensors take the Meta kernel.
TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("lsq_linear_backward", &lsq_linear_backward_impl); }
TORCH_LIBRARY_IMPL(lowbit, Meta, m) { m.impl("lsq_linear_backward", &lsq_linear_backward_meta); }
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("lsq_linear_backward", &lsq_linear_backward_impl); }
#endif
TORCH_LIBRARY_IMPL(lowbit, Autograd, m) { m.impl("q8_linear", &q8_linear_autograd); }

}  // namespace lowbit::ops

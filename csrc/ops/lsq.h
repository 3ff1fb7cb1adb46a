// The LSQ / straight-through input gradients shared by every quantization-aware op (linear, conv,
// matmul). Composite ATen code of the op floor; the math is docs/ops.md "Backward".
#pragma once
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace lowbit::ops {

struct LsqInputGrads {
  at::Tensor grad_x;      // gA * [qmin <= v <= qmax], in x's dtype and shape
  at::Tensor grad_shift;  // grad_x summed over every dim but channel_dim, in shift's dtype
  at::Tensor grad_scale;  // sum(R * gA) / sqrt(numel(x) * qmax), in scale's dtype and shape
};

// gA: dL/dx_hat (fp32, x's shape). v = (fp32(x) + fp32(shift)) / max(scale, eps) is rebuilt exactly as
// the forward quantizer computed it, so rne(v) is the forward's code inside the range. shift (or none)
// is broadcast along channel_dim. R = qmin where v < qmin, qmax where v > qmax, rne(v) - v elsewhere:
// the clipped terms use the unmasked gA (Esser et al. 2020; BIE multiplies them by zero, its I-2).
// The gradient scale 1/sqrt(numel * qmax) counts the operand's own elements (BIE's choice), also when
// it was broadcast.
inline LsqInputGrads lsq_input_grads(const at::Tensor& gA, const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                     int64_t channel_dim, const at::Tensor& scale, const at::Tensor& eps, int64_t qmin,
                                     int64_t qmax, bool need_x, bool need_shift, bool need_scale,
                                     int64_t numel = -1 /* of the operand before broadcasting; -1: x.numel() */) {
  LsqInputGrads g;
  if (!need_x && !need_shift && !need_scale) return g;
  const auto s = clamp_scale(scale, eps);
  auto t = as_float(x);
  if (shift.has_value() && shift->defined()) {
    std::vector<int64_t> view(x.dim(), 1);
    view[channel_dim] = shift->numel();
    t = t + as_float(*shift).reshape(view);
  }
  const auto v = t / s;
  const auto below = v < double(qmin), above = v > double(qmax);
  const auto inside = at::logical_not(at::logical_or(below, above)).logical_and(v == v);
  const auto gx = gA * inside;
  if (need_x) g.grad_x = gx.to(x.scalar_type());
  if (need_shift && shift.has_value() && shift->defined()) {
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x.dim(); ++d)
      if (d != channel_dim) dims.push_back(d);
    g.grad_shift = gx.sum(dims).to(shift->scalar_type());
  }
  if (need_scale) {
    const auto r = at::where(below, double(qmin), at::where(above, double(qmax), at::round(v) - v));
    const double k = 1.0 / std::sqrt(double(numel < 0 ? x.numel() : numel) * double(qmax));
    g.grad_scale = ((r * gA).sum(at::kDouble) * k).to(scale.scalar_type()).reshape(scale.sizes());
  }
  return g;
}

// The autograd Functions of the QAT ops (linear, conv) share their first six inputs (x, bias_a, weight,
// scale_a, scale_w, eps) and an optional output bias (edge 6 when given: absent tensors have no edge).
// Saves what backward needs to know about them.
inline void save_qat_meta(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
  ctx->saved_data["has_bias"] = has_bias;
  ctx->saved_data["bias_dtype"] = static_cast<int64_t>(has_bias ? bias->scalar_type() : at::kFloat);
}

// Which of (x, bias_a, weight, scale_a) need a gradient; a frozen int8 weight gets none.
inline std::array<bool, 4> qat_grad_mask(torch::autograd::AutogradContext* ctx) {
  const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
          ctx->needs_input_grad(2) && weight_dtype != at::kChar, ctx->needs_input_grad(3)};
}

// The weight gradient in the weight's dtype, and the output bias gradient (grad summed over `dims`).
inline at::Tensor qat_weight_grad(torch::autograd::AutogradContext* ctx, const at::Tensor& gw) {
  return gw.defined() ? gw.to(static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt())) : gw;
}
inline at::Tensor qat_bias_grad(torch::autograd::AutogradContext* ctx, const at::Tensor& grad, at::IntArrayRef dims) {
  if (!ctx->saved_data["has_bias"].toBool() || !ctx->needs_input_grad(6)) return at::Tensor();
  return grad.sum(dims, false, at::kFloat).to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
}

}  // namespace lowbit::ops

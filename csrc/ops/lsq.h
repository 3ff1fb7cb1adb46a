// The LSQ / straight-through input gradients shared by every quantization-aware op (linear, conv,
// matmul): the op floor's side of the fused kernel lowbit/kernels/lsq_grad.h (layout, dispatch, dtypes);
// the math is docs/ops.md "Backward".
#pragma once
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cmath>
#include <optional>

#include "common.h"
#include "lowbit/kernels/lsq_grad.h"
#include "lowbit/kernels/quantize.h"
#include "lowbit/ops.h"

namespace lowbit::ops {

// A QAT layer's fp32 operands as views of qat_prepare's output p (made for bias_a): the shift (none when
// bias_a is undefined), the two steps' scales, eps, the GEMM scale alpha and the clamped steps
// max(scale, eps). The same values as as_float(...) of each, qat_alpha and clamp_scale, without a
// conversion or clamp kernel per operand.
struct QatOperands {
  std::optional<at::Tensor> shift;
  at::Tensor scale_a, scale_w, eps, alpha, step_a, step_w;  // 0-dim fp32
};
inline QatOperands qat_operands(const at::Tensor& p, const at::Tensor& bias_a) {
  const c10::SymInt n = p.sym_size(0) - kQatPreparedScalars;
  QatOperands o;
  if (bias_a.defined()) o.shift = p.narrow_symint(0, 0, n).view_symint(bias_a.sym_sizes());
  o.scale_a = p.select_symint(0, n);
  o.scale_w = p.select_symint(0, n + 1);
  o.eps = p.select_symint(0, n + 2);
  o.alpha = p.select_symint(0, n + 3);
  o.step_a = p.select_symint(0, n + 4);
  o.step_w = p.select_symint(0, n + 5);
  return o;
}
// The same from one qat_prepare launch.
inline QatOperands prepare_qat_operands(const at::Tensor& bias_a, const at::Tensor& scale_a, const at::Tensor& scale_w,
                                        const at::Tensor& eps) {
  const bool has_shift = bias_a.defined();
  return qat_operands(qat_prepare(has_shift ? std::optional<at::Tensor>(bias_a) : std::nullopt, scale_a, scale_w, eps),
                      bias_a);
}

struct LsqInputGrads {
  at::Tensor grad_x;      // gA * [qmin <= v <= qmax], in x's dtype and shape (gA's memory layout when dense)
  at::Tensor grad_shift;  // grad_x summed over every dim but channel_dim, (C,) in shift's dtype
  at::Tensor grad_scale;  // sum(R * gA) / sqrt(numel(x) * qmax), in scale's dtype and shape (summed in float64,
                          // rounded to fp32 by the kernel, then to scale's dtype)
};

namespace lsq_detail {

// Elements of a dense tensor in memory order: (outer, C, inner) with the channel dim `cd` as C, read off
// the strides (in a non-overlapping dense tensor the stride of a dim of size > 1 is the product of the
// sizes of the dims that vary faster). C == 1 or no channel: one flat row.
inline void channel_view(const at::Tensor& t, int64_t cd, bool per_channel, int64_t* outer, int64_t* C,
                         int64_t* inner) {
  const int64_t n = t.numel();
  if (!per_channel || t.size(cd) == 1) {
    *outer = 1;
    *C = 1;
    *inner = n;
    return;
  }
  *C = t.size(cd);
  *inner = t.stride(cd);
  *outer = n / (*C * *inner);
}

// Same element order in memory: equal strides on every dim of size > 1.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

}  // namespace lsq_detail

// gA: dL/dx_hat (float32, float16 or bfloat16, x's shape). v = (fp32(x) + fp32(shift)) / max(scale, eps)
// is rebuilt exactly as the forward quantizer computed it, so rne(v) is the forward's code inside the
// range. shift (or none) is broadcast along channel_dim. R = qmin where v < qmin, qmax where v > qmax,
// rne(v) - v elsewhere: the clipped terms use the unmasked gA (Esser et al. 2020; BIE multiplies them by
// zero, its I-2). The gradient scale 1/sqrt(numel * qmax) counts the operand's own elements (BIE's
// choice), also when it was broadcast. gscale (one fp32 element on x's device, or none): the gradient is
// fp32(gA) * gscale (one fp32 multiply), so a caller may pass an unscaled GEMM output and the step.
//
// One fused pass (lowbit/kernels/lsq_grad.h) on the CPU and on CUDA, the sums in float64 in a fixed order.
// Layout: gA's if it is dense (else gA is made contiguous), x copied into that layout only when its own
// differs (an expanded x, NCHW x with an NHWC gA, ...); grad_x comes back in that layout, as the ATen
// composite this replaces gave it (its output followed gA). gA_is_scratch: gA is the caller's temporary
// and may be overwritten with grad_x (when its dtype is x's). step_f32 / shift_f32: the clamped step
// max(scale, eps) and the shift as fp32 (views of qat_prepare's output, QatOperands::step_a / shift) when the
// caller has them: no clamp or conversion op here then. shift still gives grad_shift's dtype.
inline LsqInputGrads lsq_input_grads(const at::Tensor& gA, const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                     int64_t channel_dim, const at::Tensor& scale, const at::Tensor& eps, int64_t qmin,
                                     int64_t qmax, bool need_x, bool need_shift, bool need_scale,
                                     int64_t numel = -1 /* of the operand before broadcasting; -1: x.numel() */,
                                     const std::optional<at::Tensor>& gscale = std::nullopt,
                                     bool gA_is_scratch = false,
                                     const std::optional<at::Tensor>& step_f32 = std::nullopt,
                                     const std::optional<at::Tensor>& shift_f32 = std::nullopt) {
  constexpr const char* op = "lowbit.lsq_input_grads";
  LsqInputGrads g;
  const bool has_shift = shift.has_value() && shift->defined();
  need_shift = need_shift && has_shift;
  if (!need_x && !need_shift && !need_scale) return g;
  const bool has_gscale = gscale.has_value() && gscale->defined();

  check_float_tensor(gA, op, "gA");
  check_float_tensor(x, op, "x");
  TORCH_CHECK(gA.sizes() == x.sizes(), op, ": gA must have x's shape ", x.sizes(), ", got ", gA.sizes());
  check_same_device(x, "x", gA, op, "gA");
  check_scalar(scale, x, "x", op, "scale");
  check_scalar(eps, x, "x", op, "eps");
  if (has_shift) {
    check_float_tensor(*shift, op, "shift");
    check_same_device(x, "x", *shift, op, "shift");
    TORCH_CHECK(channel_dim >= 0 && channel_dim < x.dim(), op, ": channel_dim must be in [0, ", x.dim(), "), got ",
                channel_dim);
    TORCH_CHECK(shift->numel() == x.size(channel_dim), op, ": shift must hold x.size(", channel_dim, ") = ",
                x.size(channel_dim), " values, got ", shift->numel());
  }
  if (has_gscale) check_scalar(*gscale, x, "x", op, "gscale");
  TORCH_CHECK(qmin >= -128 && qmin <= qmax && qmax <= 127 && qmax >= 1, op,
              ": need -128 <= qmin <= qmax <= 127 and qmax >= 1, got qmin=", qmin, ", qmax=", qmax);
  const int64_t count = numel < 0 ? x.numel() : numel;

  // Shapes only (fake tensors): the op floor's Meta kernels never get here, but stay safe if one does.
  if (x.is_meta() || gA.is_meta()) {
    if (need_x) g.grad_x = at::empty_like(x);
    if (need_shift) g.grad_shift = at::empty({x.size(channel_dim)}, shift->options());
    if (need_scale) g.grad_scale = at::empty_like(scale);
    return g;
  }
  if (x.numel() == 0) {  // nothing to read; grad_scale = 0 * 1/sqrt(count * qmax) (NaN when count is 0)
    if (need_x) g.grad_x = at::empty_like(x);
    if (need_shift) g.grad_shift = at::zeros({x.size(channel_dim)}, shift->options());
    if (need_scale) {
      const double k = 1.0 / std::sqrt(double(count) * double(qmax));
      g.grad_scale = at::full(scale.sizes(), 0.0 * k, scale.options());
    }
    return g;
  }

  const at::Tensor ga = gA.is_non_overlapping_and_dense() ? gA : gA.contiguous();
  at::Tensor xa = x;
  if (!x.is_non_overlapping_and_dense() || !lsq_detail::same_layout(x, ga)) {
    xa = at::empty_strided(ga.sizes(), ga.strides(), x.options());
    xa.copy_(x);
  }
  int64_t outer = 0, C = 0, inner = 0;
  lsq_detail::channel_view(ga, channel_dim, has_shift, &outer, &C, &inner);

  const bool have_step = step_f32.has_value() && step_f32->defined();
  if (have_step)
    TORCH_CHECK(step_f32->scalar_type() == at::kFloat && step_f32->numel() == 1 && step_f32->device() == x.device(), op,
                ": step_f32 must be one float32 value on x's device");
  const auto s = have_step ? step_f32->detach().reshape({}).contiguous() : clamp_scale(scale, eps);  // fp32, 0-dim
  at::Tensor sh, gs;
  if (has_shift) {
    const bool pre = shift_f32.has_value() && shift_f32->defined();
    if (pre)
      TORCH_CHECK(shift_f32->scalar_type() == at::kFloat && shift_f32->numel() == shift->numel(), op,
                  ": shift_f32 must hold shift's values as float32");
    sh = (pre ? shift_f32->detach() : as_float(shift->detach())).reshape({-1}).contiguous();
  }
  if (has_gscale) gs = as_float(gscale->detach()).reshape({}).contiguous();
  // A caller's scratch gA of x's dtype takes grad_x in place (one fewer gradient-sized buffer at the
  // backward's peak): the kernels read each gradient element before writing the same element, in the same
  // thread (lsq_grad.h).
  if (need_x)
    g.grad_x = gA_is_scratch && ga.is_same(gA) && ga.scalar_type() == x.scalar_type()
                   ? ga
                   : at::empty_strided(ga.sizes(), ga.strides(), x.options());
  // The sums leave the kernel in the shift's / scale's own dtype when it is a kernel dtype (one launch, no
  // conversion op after it; the same bits as the fp32 sum's .to(dtype)), else as fp32, converted below.
  auto out_dtype = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ? t : at::kFloat;
  };
  at::Tensor gsh, gsc;
  if (need_shift) gsh = at::empty({C}, x.options().dtype(out_dtype(shift->scalar_type())));
  if (need_scale) gsc = at::empty({}, x.options().dtype(out_dtype(scale.scalar_type())));

  LsqGradParams p;
  p.outer = outer;
  p.channels = C;
  p.inner = inner;
  p.g_type = kernel_dtype(ga.scalar_type(), op, "gA");
  p.g = ga.data_ptr();
  p.g_scale = has_gscale ? gs.data_ptr<float>() : nullptr;
  p.x_type = kernel_dtype(xa.scalar_type(), op, "x");
  p.x = xa.data_ptr();
  p.shift = has_shift ? sh.data_ptr<float>() : nullptr;  // one channel (C == 1): one value for the flat row
  p.step = s.data_ptr<float>();
  p.qmin = static_cast<int32_t>(qmin);
  p.qmax = static_cast<int32_t>(qmax);
  p.numel = count;
  p.grad_x = need_x ? g.grad_x.data_ptr() : nullptr;
  p.grad_shift = need_shift ? gsh.data_ptr() : nullptr;
  p.grad_scale = need_scale ? gsc.data_ptr() : nullptr;
  if (need_shift) p.shift_out_type = kernel_dtype(gsh.scalar_type(), op, "grad_shift");
  if (need_scale) p.scale_out_type = kernel_dtype(gsc.scalar_type(), op, "grad_scale");

  if (x.is_cpu()) {
    check_status(cpu::lsq_grad(p), op);
  } else {
#ifdef LOWBIT_WITH_CUDA
    TORCH_CHECK(x.is_cuda(), op, ": x must be a CPU or CUDA tensor, got device ", x.device());
    c10::cuda::CUDAGuard guard(x.device());
    size_t bytes = 0;
    check_status(cuda::lsq_grad_workspace_bytes(p, &bytes), op);
    at::Tensor ws;
    if (bytes > 0) ws = at::empty({static_cast<int64_t>((bytes + 7) / 8)}, x.options().dtype(at::kDouble));
    check_status(cuda::lsq_grad(p, ws.defined() ? ws.data_ptr() : nullptr, bytes, current_stream(x)), op);
#else
    TORCH_CHECK(false, op, ": x is on ", x.device(), " but lowbit was built without CUDA");
#endif
  }
  if (need_shift) g.grad_shift = as_dtype(gsh, shift->scalar_type());
  if (need_scale) g.grad_scale = as_dtype(gsc, scale.scalar_type()).reshape(scale.sizes());
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

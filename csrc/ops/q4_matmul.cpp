// Op family "q4_matmul": the Q4MatMul layer, out = s_x*s_y * (Q(x) . Q(y)^T) over the last two dims with
// broadcast batch dims (attention scores). Forward on CUDA for k <= kQMatmulMaxK: one quantize-on-load
// kernel (cuda::qmatmul_s8); otherwise quantize both operands + one batched s8 GEMM (the same bits either
// way). The codes are written out only when a backward will need them (save_codes). Backward = float
// batched matmuls of the dequantized operands + the shared LSQ input gradients.
#include <ATen/ExpandUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common.h"
#include "gemm_dispatch.h"
#include "lowbit/kernels/qmatmul.h"
#include "lowbit/ops.h"
#include "lsq.h"

namespace lowbit::ops {
namespace {

constexpr const char* kOp = "lowbit.q4_matmul";
constexpr int64_t kQmin = -8, kQmax = 7;

struct MatmulArgs {
  std::vector<int64_t> batch;
  int64_t B, m, n, k;
};

// Checks that hold for symbolic shapes too (the Meta kernel runs them under torch.compile).
void check_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_clip, const at::Tensor& y_clip,
                  const at::Tensor& eps) {
  check_float_tensor(x, kOp, "x");
  check_float_tensor(y, kOp, "y");
  TORCH_CHECK(x.dim() >= 2 && y.dim() >= 2, kOp, ": x (..., m, k) and y (..., n, k) need 2 or more dims, got ",
              x.sym_sizes(), " and ", y.sym_sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), kOp, ": x and y must have the same dtype, got ", x.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(x.sym_size(-1) == y.sym_size(-1), kOp, ": x (..., m, k) and y (..., n, k) must agree on k, got ",
              x.sym_sizes(), " and ", y.sym_sizes());
  // Batch dims broadcast as torch.matmul's: aligned from the right, equal or one of them 1.
  for (int64_t i = 1; i <= std::min<int64_t>(x.dim(), y.dim()) - 2; ++i) {
    const auto dx = x.sym_size(x.dim() - 2 - i), dy = y.sym_size(y.dim() - 2 - i);
    TORCH_CHECK(dx == dy || dx == 1 || dy == 1, kOp, ": the batch dims of x ", x.sym_sizes(), " and y ",
                y.sym_sizes(), " do not broadcast (", dx, " vs ", dy, " at dim ", -2 - i, ")");
  }
  TORCH_CHECK(x.sym_numel() > 0 && y.sym_numel() > 0, kOp, ": empty operands (", x.sym_sizes(), ", ", y.sym_sizes(),
              "); the clip scales and their LSQ gradients are undefined for no data");
  check_same_device(x, "x", y, kOp, "y");
  check_scalar(x_clip, x, "x", kOp, "x_clip");
  check_scalar(y_clip, x, "x", kOp, "y_clip");
  check_scalar(eps, x, "x", kOp, "eps");
}

template <typename T>
std::vector<T> cat(std::vector<T> v, std::initializer_list<T> tail) {
  v.insert(v.end(), tail);
  return v;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matmul_forward_meta(const at::Tensor& x, const at::Tensor& y,
                                                                   const at::Tensor& x_clip, const at::Tensor& y_clip,
                                                                   const at::Tensor& eps, bool save_codes) {
  check_matmul(x, y, x_clip, y_clip, eps);
  const auto batch = at::infer_size_symint(x.sym_sizes().slice(0, x.dim() - 2), y.sym_sizes().slice(0, y.dim() - 2));
  const auto m = x.sym_size(-2), n = y.sym_size(-2), k = x.sym_size(-1);
  const auto codes = x.options().dtype(at::kChar);
  auto out = at::empty_symint(cat<c10::SymInt>(batch, {m, n}), x.options());
  if (!save_codes) return {out, at::empty({0}, codes), at::empty({0}, codes)};
  return {out, at::empty_symint(cat<c10::SymInt>(batch, {m, k}), codes),
          at::empty_symint(cat<c10::SymInt>(batch, {n, k}), codes)};
}

MatmulArgs matmul_args(const at::Tensor& x, const at::Tensor& y) {
  MatmulArgs a;
  a.batch = at::infer_size(x.sizes().slice(0, x.dim() - 2), y.sizes().slice(0, y.dim() - 2));
  a.B = 1;
  for (auto d : a.batch) a.B *= d;
  a.m = x.size(-2);
  a.n = y.size(-2);
  a.k = x.size(-1);
  return a;
}

#ifdef LOWBIT_WITH_CUDA
// t (..., rows, k) broadcast to (batch..., rows, k) as one operand of a batched kernel: a base, a row
// stride and ONE batch stride (0 broadcasts it to every batch). A view of t when its batch dims collapse
// to one stride (same batch dims as the output, or none, or broadcast along all of them), otherwise a
// contiguous copy of the broadcast operand.
struct BatchedOperand {
  at::Tensor t;
  int64_t ld, stride;
};
BatchedOperand batched_operand(const at::Tensor& t, const MatmulArgs& a, int64_t rows) {
  auto e = t.expand(cat<int64_t>(a.batch, {rows, a.k}));
  if (e.stride(-1) != 1 || e.stride(-2) < a.k) e = e.contiguous();
  int64_t stride = -1, inner = 1;  // stride of the flat batch index, elements per step of the inner dims
  bool one_stride = true;
  for (int64_t d = e.dim() - 3; d >= 0 && one_stride; --d) {
    if (e.size(d) == 1) continue;
    if (stride < 0) stride = e.stride(d);
    one_stride = e.stride(d) == stride * inner;
    inner *= e.size(d);
  }
  if (!one_stride) {
    e = e.contiguous();
    stride = rows * a.k;
  }
  return {e, e.stride(-2), stride < 0 ? 0 : stride};
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> matmul_forward_impl(const at::Tensor& x, const at::Tensor& y,
                                                                   const at::Tensor& x_clip, const at::Tensor& y_clip,
                                                                   const at::Tensor& eps, bool save_codes) {
  check_matmul(x, y, x_clip, y_clip, eps);
  const auto a = matmul_args(x, y);
  c10::OptionalDeviceGuard guard(x.device());
  auto out = at::empty(cat<int64_t>(a.batch, {a.m, a.n}), x.options());
  const auto codes = x.options().dtype(at::kChar);
#ifdef LOWBIT_WITH_CUDA
  if (x.is_cuda() && a.k <= kQMatmulMaxK) {
    // One kernel: both operands quantized on load, alpha formed inside; the scalars are read in their own
    // dtype when they share one of the kernel's (no conversion ops), else as fp32.
    const auto xo = batched_operand(x, a, a.m), yo = batched_operand(y, a, a.n);
    const bool same = x_clip.scalar_type() == y_clip.scalar_type() && y_clip.scalar_type() == eps.scalar_type() &&
                      is_float_dtype(eps.scalar_type());
    const auto sx = same ? x_clip : as_float(x_clip), sy = same ? y_clip : as_float(y_clip),
               se = same ? eps : as_float(eps);
    auto qx = save_codes ? at::empty(cat<int64_t>(a.batch, {a.m, a.k}), codes) : at::empty({0}, codes);
    auto qy = save_codes ? at::empty(cat<int64_t>(a.batch, {a.n, a.k}), codes) : at::empty({0}, codes);
    check_status(cuda::qmatmul_s8(kernel_dtype(x.scalar_type(), kOp, "x"), xo.t.data_ptr(), xo.ld, xo.stride,
                                  yo.t.data_ptr(), yo.ld, yo.stride, a.m, a.n, a.k, a.B,
                                  kernel_dtype(se.scalar_type(), kOp, "eps"), sx.data_ptr(), sy.data_ptr(),
                                  se.data_ptr(), kQmin, kQmax, out.data_ptr(), a.n, a.m * a.n,
                                  save_codes ? qx.data_ptr<int8_t>() : nullptr,
                                  save_codes ? qy.data_ptr<int8_t>() : nullptr, current_stream(x)),
                 kOp);
    return {out, qx, qy};
  }
#endif
  const auto qx = quantize_s8(x.expand(cat<int64_t>(a.batch, {a.m, a.k})).contiguous(), std::nullopt, x_clip, eps, kQmin, kQmax, false);
  const auto qy = quantize_s8(y.expand(cat<int64_t>(a.batch, {a.n, a.k})).contiguous(), std::nullopt, y_clip, eps, kQmin, kQmax, false);
  const auto alpha = qat_alpha(x_clip, y_clip, eps);  // NaN for an invalid step: no host read
  // qx, qy and out are contiguous (batch..., rows, k|n): one batched GEMM, one kernel launch on CUDA.
  gemm_s8_batched_on(x.device(), qx.data_ptr<int8_t>(), a.k, a.m * a.k, qy.data_ptr<int8_t>(), a.k, a.n * a.k, a.m,
                     a.n, a.k, a.B, alpha.data_ptr<float>(), x.scalar_type(), out.data_ptr(), a.n, a.m * a.n, kOp);
  if (!save_codes) return {out, at::empty({0}, codes), at::empty({0}, codes)};
  return {out, qx, qy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q4_matmul_forward(const at::Tensor& x, const at::Tensor& y,
                                                                 const at::Tensor& x_clip, const at::Tensor& y_clip,
                                                                 const at::Tensor& eps, bool save_codes) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::q4_matmul_forward", "")
                       .typed<decltype(q4_matmul_forward)>();
  return op.call(x, y, x_clip, y_clip, eps, save_codes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_matmul_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& qx, const at::Tensor& qy,
    const at::Tensor& x_clip, const at::Tensor& y_clip, const at::Tensor& eps, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::lsq_matmul_backward", "")
                       .typed<decltype(lsq_matmul_backward)>();
  return op.call(grad, x, y, qx, qy, x_clip, y_clip, eps, qmin, qmax, mask);
}

// Straight-through: dL/dx_hat = G . y_hat, dL/dy_hat = G^T . x_hat on the broadcast operands; the LSQ
// input gradients there; then summed back over broadcast batch dims.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_matmul_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& qx, const at::Tensor& qy,
    const at::Tensor& x_clip, const at::Tensor& y_clip, const at::Tensor& eps, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask) {
  const auto G = as_float(grad);
  at::Tensor gx, gy, gsx, gsy;
  if (mask[0] || mask[2]) {
    const auto gA = at::matmul(G, qy.to(at::kFloat) * clamp_scale(y_clip, eps));
    auto g = lsq_input_grads(gA, x.expand(qx.sizes()), std::nullopt, x.dim() - 1, x_clip, eps, qmin, qmax, mask[0],
                             false, mask[2], x.numel());
    if (mask[0]) gx = at::sum_to(g.grad_x, x.sizes());
    gsx = g.grad_scale;
  }
  if (mask[1] || mask[3]) {
    const auto gB = at::matmul(G.transpose(-1, -2), qx.to(at::kFloat) * clamp_scale(x_clip, eps));
    auto g = lsq_input_grads(gB, y.expand(qy.sizes()), std::nullopt, y.dim() - 1, y_clip, eps, qmin, qmax, mask[1],
                             false, mask[3], y.numel());
    if (mask[1]) gy = at::sum_to(g.grad_x, y.sizes());
    gsy = g.grad_scale;
  }
  return {gx, gy, gsx, gsy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_matmul_backward_meta(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& qx, const at::Tensor& qy,
    const at::Tensor& x_clip, const at::Tensor& y_clip, const at::Tensor& eps, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask) {
  return {mask[0] ? at::empty_like(x) : at::Tensor(), mask[1] ? at::empty_like(y) : at::Tensor(),
          mask[2] ? at::empty_like(x_clip) : at::Tensor(), mask[3] ? at::empty_like(y_clip) : at::Tensor()};
}

class Q4MatMulFunction : public torch::autograd::Function<Q4MatMulFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& y,
                            const at::Tensor& x_clip, const at::Tensor& y_clip, const at::Tensor& eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, qx, qy] = q4_matmul_forward(x, y, x_clip, y_clip, eps, /*save_codes=*/true);
    ctx->save_for_backward({x, y, qx, qy, x_clip, y_clip, eps});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                      ctx->needs_input_grad(3)};
    auto [gx, gy, gsx, gsy] = lsq_matmul_backward(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], kQmin, kQmax, mask);
    return {gx, gy, gsx, gsy, at::Tensor()};
  }
};

at::Tensor q4_matmul_composite(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_clip,
                               const at::Tensor& y_clip, const at::Tensor& eps) {
  return std::get<0>(q4_matmul_forward(x, y, x_clip, y_clip, eps, /*save_codes=*/false));
}

at::Tensor q4_matmul_autograd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_clip,
                              const at::Tensor& y_clip, const at::Tensor& eps) {
  // Nothing to differentiate (inference, no_grad): the forward alone, without writing the codes out.
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || y.requires_grad() || x_clip.requires_grad() || y_clip.requires_grad());
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return q4_matmul_composite(x, y, x_clip, y_clip, eps);
  }
  return Q4MatMulFunction::apply(x, y, x_clip, y_clip, eps);
}

}  // namespace

at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_clip, const at::Tensor& y_clip,
                     const at::Tensor& eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::q4_matmul", "").typed<decltype(q4_matmul)>();
  return op.call(x, y, x_clip, y_clip, eps);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("q4_matmul_forward", &matmul_forward_impl);
  m.impl("lsq_matmul_backward", &lsq_matmul_backward_impl);
}
TORCH_LIBRARY_IMPL(lowbit, Meta, m) {
  m.impl("q4_matmul_forward", &matmul_forward_meta);
  m.impl("lsq_matmul_backward", &lsq_matmul_backward_meta);
}
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("q4_matmul_forward", &matmul_forward_impl);
  m.impl("lsq_matmul_backward", &lsq_matmul_backward_impl);
}
#endif
TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) { m.impl("q4_matmul", &q4_matmul_composite); }
TORCH_LIBRARY_IMPL(lowbit, Autograd, m) { m.impl("q4_matmul", &q4_matmul_autograd); }

}  // namespace lowbit::ops

// Op family "quantize": quantize_s8 (fused shift + per-tensor quantizer) and lsq_scale (step size from
// the mean absolute value). Checks, Meta kernel and CPU/CUDA dispatch; the math is in
// csrc/kernels/{cpu,cuda}/quantize.*.
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "lowbit/kernels/quantize.h"
#include "lowbit/kernels/reduce.h"
#include "lowbit/ops.h"

namespace lowbit::ops {
namespace {

constexpr const char* kQuantOp = "lowbit.quantize_s8";

struct QuantArgs {
  int64_t M, K;
};

// Checks that hold for symbolic shapes too (the Meta kernel runs them under torch.compile).
void check_quantize(const at::Tensor& x, const std::optional<at::Tensor>& shift, const at::Tensor& scale,
                    const at::Tensor& eps, int64_t qmin, int64_t qmax, bool = true) {
  check_float_tensor(x, kQuantOp, "x");
  TORCH_CHECK(x.dim() >= 1, kQuantOp, ": x must have at least one dimension, got a 0-dim tensor");
  TORCH_CHECK(qmin <= qmax && qmin >= -128 && qmax <= 127, kQuantOp,
              ": need -128 <= qmin <= qmax <= 127 (int8 codes), got qmin=", qmin, ", qmax=", qmax);
  if (shift.has_value() && shift->defined()) {
    check_float_tensor(*shift, kQuantOp, "shift");
    TORCH_CHECK(shift->dim() == 1 && shift->sym_size(0) == x.sym_size(-1), kQuantOp, ": shift must have shape (",
                x.sym_size(-1), ",) (the last dim of x), got ", shift->sym_sizes());
    check_same_device(x, "x", *shift, kQuantOp, "shift");
  }
  check_scalar(scale, x, "x", kQuantOp, "scale");
  check_scalar(eps, x, "x", kQuantOp, "eps");
}

QuantArgs rows_and_cols(const at::Tensor& x) {
  const int64_t K = x.size(-1);
  return {K == 0 ? 0 : x.numel() / K, K};
}

at::Tensor quantize_s8_meta(const at::Tensor& x, const std::optional<at::Tensor>& shift, const at::Tensor& scale,
                            const at::Tensor& eps, int64_t qmin, int64_t qmax, bool) {
  check_quantize(x, shift, scale, eps, qmin, qmax);
  return at::empty_symint(x.sym_sizes(), x.options().dtype(at::kChar));
}

// Prepared operands shared by both devices: contiguous x, fp32 shift, fp32 scale and eps. Without the host
// check the kernel takes max(scale, eps) itself (no clamp op, no extra launch); with it, the clamped step
// is made here, read once on the host, and passed alone (eps undefined).
struct QuantOperands {
  at::Tensor x, shift, scale, eps;
  const float* eps_ptr() const { return eps.defined() ? eps.data_ptr<float>() : nullptr; }
};

QuantOperands prepare(const at::Tensor& x, const std::optional<at::Tensor>& shift, const at::Tensor& scale,
                      const at::Tensor& eps, bool check_step) {
  QuantOperands o;
  o.x = x.contiguous();
  if (shift.has_value() && shift->defined()) o.shift = as_float(shift->detach()).contiguous();
  if (check_step) {
    o.scale = clamp_scale(scale, eps);
    lowbit::ops::check_step(o.scale, scale, eps, kQuantOp, "scale");
  } else {
    o.scale = as_float(scale.detach()).reshape({});
    o.eps = as_float(eps.detach()).reshape({});
  }
  return o;
}

at::Tensor quantize_s8_cpu(const at::Tensor& x, const std::optional<at::Tensor>& shift, const at::Tensor& scale,
                           const at::Tensor& eps, int64_t qmin, int64_t qmax, bool check_step) {
  check_quantize(x, shift, scale, eps, qmin, qmax);
  const auto a = rows_and_cols(x);
  auto o = prepare(x, shift, scale, eps, check_step);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  if (q.numel() == 0) return q;
  check_status(cpu::quantize_s8(kernel_dtype(x.scalar_type(), kQuantOp, "x"), o.x.data_ptr(), a.M, a.K, a.K,
                                o.shift.defined() ? o.shift.data_ptr<float>() : nullptr,
                                o.scale.data_ptr<float>(), int32_t(qmin), int32_t(qmax), q.data_ptr<int8_t>(),
                                o.eps_ptr()),
               kQuantOp);
  return q;
}

#ifdef LOWBIT_WITH_CUDA
at::Tensor quantize_s8_cuda(const at::Tensor& x, const std::optional<at::Tensor>& shift, const at::Tensor& scale,
                            const at::Tensor& eps, int64_t qmin, int64_t qmax, bool check_step) {
  check_quantize(x, shift, scale, eps, qmin, qmax);
  const auto a = rows_and_cols(x);
  c10::cuda::CUDAGuard guard(x.device());
  auto o = prepare(x, shift, scale, eps, check_step);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  if (q.numel() == 0) return q;
  check_status(cuda::quantize_s8(kernel_dtype(x.scalar_type(), kQuantOp, "x"), o.x.data_ptr(), a.M, a.K, a.K,
                                 o.shift.defined() ? o.shift.data_ptr<float>() : nullptr,
                                 o.scale.data_ptr<float>(), int32_t(qmin), int32_t(qmax), q.data_ptr<int8_t>(),
                                 current_stream(x), o.eps_ptr()),
               kQuantOp);
  return q;
}
#endif

// qat_alpha: one tiny kernel (CPU or CUDA) instead of a host check of the steps.
constexpr const char* kAlphaOp = "lowbit.qat_alpha";
void check_alpha_args(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps) {
  check_scalar(s1, s1, "scale1", kAlphaOp, "scale1");
  check_scalar(s2, s1, "scale1", kAlphaOp, "scale2");
  check_scalar(eps, s1, "scale1", kAlphaOp, "eps");
}
at::Tensor qat_alpha_meta(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps) {
  check_alpha_args(s1, s2, eps);
  return at::empty({}, s1.options().dtype(at::kFloat));
}
struct AlphaOperands {
  at::Tensor s1, s2, eps, out;
};
AlphaOperands alpha_operands(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps) {
  check_alpha_args(s1, s2, eps);
  auto f = [](const at::Tensor& t) { return as_float(t.detach()).reshape({}).contiguous(); };
  return {f(s1), f(s2), f(eps), at::empty({}, s1.options().dtype(at::kFloat))};
}
at::Tensor qat_alpha_cpu(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps) {
  auto o = alpha_operands(s1, s2, eps);
  check_status(cpu::qat_alpha(o.s1.data_ptr<float>(), o.s2.data_ptr<float>(), o.eps.data_ptr<float>(),
                              o.out.data_ptr<float>()),
               kAlphaOp);
  return o.out;
}
#ifdef LOWBIT_WITH_CUDA
at::Tensor qat_alpha_cuda(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps) {
  c10::cuda::CUDAGuard guard(s1.device());
  auto o = alpha_operands(s1, s2, eps);
  check_status(cuda::qat_alpha(o.s1.data_ptr<float>(), o.s2.data_ptr<float>(), o.eps.data_ptr<float>(),
                               o.out.data_ptr<float>(), current_stream(s1)),
               kAlphaOp);
  return o.out;
}
#endif

// qat_prepare: a QAT forward's fp32 operands (shift, the three scalars, alpha) in one launch instead of a
// conversion kernel per 16-bit operand and qat_alpha.
constexpr const char* kPrepareOp = "lowbit.qat_prepare";
struct PrepareOperands {
  at::Tensor shift, s1, s2, eps;  // contiguous; dtypes the kernels read (fp32 / fp16 / bf16)
  int64_t n = 0;
};
PrepareOperands prepare_operands(const std::optional<at::Tensor>& shift, const at::Tensor& s1, const at::Tensor& s2,
                                 const at::Tensor& eps) {
  check_scalar(s1, s1, "scale1", kPrepareOp, "scale1");
  check_scalar(s2, s1, "scale1", kPrepareOp, "scale2");
  check_scalar(eps, s1, "scale1", kPrepareOp, "eps");
  // Other float dtypes (float64) are converted first; the kernels read the three 16/32-bit ones as they are.
  auto readable = [](const at::Tensor& t) {
    const auto d = t.scalar_type();
    const auto u = t.detach();
    return (d == at::kFloat || d == at::kHalf || d == at::kBFloat16 ? u : u.to(at::kFloat)).contiguous();
  };
  PrepareOperands o{at::Tensor(), readable(s1), readable(s2), readable(eps), 0};
  if (shift.has_value() && shift->defined()) {
    TORCH_CHECK(at::isFloatingType(shift->scalar_type()), kPrepareOp, ": shift must be a floating-point tensor, got ",
                shift->scalar_type());
    check_same_device(s1, "scale1", *shift, kPrepareOp, "shift");
    o.shift = readable(*shift);
    o.n = o.shift.numel();
  }
  return o;
}
ScalarArg scalar_arg(const at::Tensor& t) {
  return {t.defined() ? t.data_ptr() : nullptr,
          t.defined() ? kernel_dtype(t.scalar_type(), kPrepareOp, "operand") : DType::kFloat32};
}
at::Tensor qat_prepare_meta(const std::optional<at::Tensor>& shift, const at::Tensor& s1, const at::Tensor& s2,
                            const at::Tensor& eps) {
  check_scalar(s1, s1, "scale1", kPrepareOp, "scale1");
  check_scalar(s2, s1, "scale1", kPrepareOp, "scale2");
  check_scalar(eps, s1, "scale1", kPrepareOp, "eps");
  const c10::SymInt n = shift.has_value() && shift->defined() ? shift->sym_numel() : c10::SymInt(0);
  return at::empty_symint({n + kQatPreparedScalars}, s1.options().dtype(at::kFloat));
}
at::Tensor qat_prepare_cpu(const std::optional<at::Tensor>& shift, const at::Tensor& s1, const at::Tensor& s2,
                           const at::Tensor& eps) {
  const auto o = prepare_operands(shift, s1, s2, eps);
  auto out = at::empty({o.n + kQatPreparedScalars}, s1.options().dtype(at::kFloat));
  check_status(cpu::qat_prepare(scalar_arg(o.shift), o.n, scalar_arg(o.s1), scalar_arg(o.s2), scalar_arg(o.eps),
                                out.data_ptr<float>()),
               kPrepareOp);
  return out;
}
#ifdef LOWBIT_WITH_CUDA
at::Tensor qat_prepare_cuda(const std::optional<at::Tensor>& shift, const at::Tensor& s1, const at::Tensor& s2,
                            const at::Tensor& eps) {
  c10::cuda::CUDAGuard guard(s1.device());
  const auto o = prepare_operands(shift, s1, s2, eps);
  auto out = at::empty({o.n + kQatPreparedScalars}, s1.options().dtype(at::kFloat));
  check_status(cuda::qat_prepare(scalar_arg(o.shift), o.n, scalar_arg(o.s1), scalar_arg(o.s2), scalar_arg(o.eps),
                                 out.data_ptr<float>(), current_stream(s1)),
               kPrepareOp);
  return out;
}
#endif

// qat_quantize: quantize_s8(x, shift, scale1, eps) and qat_prepare(shift, scale1, scale2, eps) in one op
// (one launch on CUDA): a QAT forward's input codes and the fp32 operands its GEMM and weight quantizer read.
constexpr const char* kQatQuantOp = "lowbit.qat_quantize";
std::tuple<at::Tensor, at::Tensor> qat_quantize_meta(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                                     const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps,
                                                     int64_t qmin, int64_t qmax) {
  check_quantize(x, shift, s1, eps, qmin, qmax);
  check_scalar(s2, x, "x", kQatQuantOp, "scale2");
  const c10::SymInt n = shift.has_value() && shift->defined() ? shift->sym_numel() : c10::SymInt(0);
  return {at::empty_symint(x.sym_sizes(), x.options().dtype(at::kChar)),
          at::empty_symint({n + kQatPreparedScalars}, x.options().dtype(at::kFloat))};
}
template <typename Kernel>
std::tuple<at::Tensor, at::Tensor> qat_quantize_run(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                                    const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps,
                                                    int64_t qmin, int64_t qmax, Kernel kernel) {
  check_quantize(x, shift, s1, eps, qmin, qmax);
  check_scalar(s2, x, "x", kQatQuantOp, "scale2");
  const auto o = prepare_operands(shift, s1, s2, eps);
  const auto xc = x.contiguous();
  const auto a = rows_and_cols(xc);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto prepared = at::empty({o.n + kQatPreparedScalars}, x.options().dtype(at::kFloat));
  check_status(kernel(kernel_dtype(x.scalar_type(), kQatQuantOp, "x"), xc.data_ptr(), a.M, a.K, a.K, scalar_arg(o.shift),
                      scalar_arg(o.s1), scalar_arg(o.s2), scalar_arg(o.eps), int32_t(qmin), int32_t(qmax),
                      q.data_ptr<int8_t>(), prepared.data_ptr<float>()),
               kQatQuantOp);
  return {q, prepared};
}
std::tuple<at::Tensor, at::Tensor> qat_quantize_cpu(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                                    const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps,
                                                    int64_t qmin, int64_t qmax) {
  return qat_quantize_run(x, shift, s1, s2, eps, qmin, qmax, [](auto... args) { return cpu::qat_quantize(args...); });
}
#ifdef LOWBIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> qat_quantize_cuda(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                                     const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& eps,
                                                     int64_t qmin, int64_t qmax) {
  c10::cuda::CUDAGuard guard(x.device());
  CUstream_st* stream = current_stream(x);
  return qat_quantize_run(x, shift, s1, s2, eps, qmin, qmax,
                          [stream](auto... args) { return cuda::qat_quantize(args..., stream); });
}
#endif

// lsq_scale: reduce.h's lsq_step (the fused kernel of each device) for fp32 / fp16 / bf16 x on CPU and CUDA;
// otherwise (float64 x, other devices) the same formula in ATen ops. The mean is accumulated in
// float64 and rounded once to fp32, so CPU and CUDA agree unless the float64 sums (summed in different
// orders) straddle an fp32 rounding boundary (relative gap < 1e-15, not seen in practice).
at::Tensor lsq_scale_impl(const at::Tensor& x, double qmax, const std::optional<at::Tensor>& eps) {
  constexpr const char* op = "lowbit.lsq_scale";
  TORCH_CHECK(x.defined() && at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              x.defined() ? c10::toString(x.scalar_type()) : "None");
  TORCH_CHECK(x.numel() > 0, op, ": x is empty (shape ", x.sizes(), "); the scale of an empty tensor is undefined");
  TORCH_CHECK(qmax > 0 && std::isfinite(qmax), op, ": qmax must be a positive finite number, got ", qmax);
  const bool has_eps = eps.has_value() && eps->defined();
  if (has_eps) check_scalar(*eps, x, "x", op, "eps");
  const auto xt = x.scalar_type();
  if ((x.is_cpu() || x.is_cuda()) && (xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16)) {
    // One fused call (reduce.h lsq_step): the sum, the mean, the factor and max(s, eps) with no ATen scalar
    // op after the reduction (each of those cost more host time than the reduction's device time on a
    // small layer). Same formula as the composite below.
    const auto xc = x.detach().contiguous();
    auto out = at::empty({}, x.options().dtype(at::kFloat));
    at::Tensor e;
    if (has_eps) {
      const auto ed = eps->scalar_type();
      e = (ed == at::kFloat || ed == at::kHalf || ed == at::kBFloat16 ? eps->detach() : as_float(eps->detach()))
              .contiguous();
    }
    const ScalarArg ea{has_eps ? e.data_ptr() : nullptr,
                       has_eps ? kernel_dtype(e.scalar_type(), op, "eps") : DType::kFloat32};
    const DType t = kernel_dtype(xt, op, "x");
    if (x.is_cpu()) {
      check_status(cpu::lsq_step(t, xc.data_ptr(), xc.numel(), qmax, ea, out.data_ptr<float>()), op);
      return out;
    }
#ifdef LOWBIT_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    const size_t bytes = cuda::sum_abs_f64_workspace_bytes(xc.numel());
    auto ws = at::empty({static_cast<int64_t>(bytes / 8 + 1)}, x.options().dtype(at::kDouble));
    check_status(cuda::lsq_step(t, xc.data_ptr(), xc.numel(), qmax, ea, out.data_ptr<float>(), ws.data_ptr(), bytes,
                                current_stream(x)),
                 op);
    return out;
#endif
  }
  // float64 x, other devices: the same formula in ATen ops.
  auto mean_abs = at::linalg_vector_norm(x.detach(), 1, c10::nullopt, false, at::kDouble) / double(x.numel());
  auto s = (mean_abs * lsq_step_factor(qmax)).to(at::kFloat);
  if (has_eps) s = at::maximum(s, as_float(eps->detach()).reshape({}));
  return s;
}

}  // namespace

at::Tensor quantize_s8(const at::Tensor& x, const std::optional<at::Tensor>& shift, const at::Tensor& scale,
                       const at::Tensor& eps, int64_t qmin, int64_t qmax, bool check_step) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::quantize_s8", "").typed<decltype(quantize_s8)>();
  return op.call(x, shift, scale, eps, qmin, qmax, check_step);
}

at::Tensor qat_alpha(const at::Tensor& scale1, const at::Tensor& scale2, const at::Tensor& eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::qat_alpha", "").typed<decltype(qat_alpha)>();
  return op.call(scale1, scale2, eps);
}

at::Tensor qat_prepare(const std::optional<at::Tensor>& shift, const at::Tensor& scale1, const at::Tensor& scale2,
                       const at::Tensor& eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::qat_prepare", "").typed<decltype(qat_prepare)>();
  return op.call(shift, scale1, scale2, eps);
}

std::tuple<at::Tensor, at::Tensor> qat_quantize(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                                const at::Tensor& scale1, const at::Tensor& scale2,
                                                const at::Tensor& eps, int64_t qmin, int64_t qmax) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::qat_quantize", "").typed<decltype(qat_quantize)>();
  return op.call(x, shift, scale1, scale2, eps, qmin, qmax);
}

at::Tensor lsq_scale(const at::Tensor& x, double qmax, const std::optional<at::Tensor>& eps) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::lsq_scale", "").typed<decltype(lsq_scale)>();
  return op.call(x, qmax, eps);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quantize_s8", &quantize_s8_cpu);
  m.impl("qat_alpha", &qat_alpha_cpu);
  m.impl("qat_prepare", &qat_prepare_cpu);
  m.impl("qat_quantize", &qat_quantize_cpu);
}
TORCH_LIBRARY_IMPL(lowbit, Meta, m) {
  m.impl("quantize_s8", &quantize_s8_meta);
  m.impl("qat_alpha", &qat_alpha_meta);
  m.impl("qat_prepare", &qat_prepare_meta);
  m.impl("qat_quantize", &qat_quantize_meta);
}
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_s8", &quantize_s8_cuda);
  m.impl("qat_alpha", &qat_alpha_cuda);
  m.impl("qat_prepare", &qat_prepare_cuda);
  m.impl("qat_quantize", &qat_quantize_cuda);
}
#endif
// Steps are statistics / learned by their own LSQ gradient; the GEMM scale carries no autograd history.
TORCH_LIBRARY_IMPL(lowbit, Autograd, m) {
  m.impl("qat_alpha", torch::CppFunction::makeFallthrough());
  m.impl("qat_prepare", torch::CppFunction::makeFallthrough());
  m.impl("qat_quantize", torch::CppFunction::makeFallthrough());
}
// lsq_scale's body is device-generic ATen; registered per backend (not as a composite) so that fake
// tensors under torch.compile take the Meta kernel instead of tracing a reduction by numel.
at::Tensor lsq_scale_meta(const at::Tensor& x, double qmax, const std::optional<at::Tensor>& eps) {
  TORCH_CHECK(x.defined() && at::isFloatingType(x.scalar_type()), "lowbit.lsq_scale: x must be a floating-point tensor");
  TORCH_CHECK(qmax > 0 && std::isfinite(qmax), "lowbit.lsq_scale: qmax must be a positive finite number, got ", qmax);
  return at::empty({}, x.options().dtype(at::kFloat));
}
TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("lsq_scale", &lsq_scale_impl); }
TORCH_LIBRARY_IMPL(lowbit, Meta, m) { m.impl("lsq_scale", &lsq_scale_meta); }
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("lsq_scale", &lsq_scale_impl); }
#endif
// The step size is a statistic, not a function to differentiate (LSQ learns s_a by its own gradient;
// s_w gets none, as in BIE): its output never carries a grad_fn.
TORCH_LIBRARY_IMPL(lowbit, Autograd, m) { m.impl("lsq_scale", torch::CppFunction::makeFallthrough()); }

}  // namespace lowbit::ops

// Op family "QAT linear": the Q8Linear and Q4Linear forwards (composites of quantize_s8, unpack_s4 and
// linear_s8), their autograd Function, and lsq_linear_backward. The two widths differ only in the code
// range and in how a frozen weight is stored (int8 codes for 8 bits, int4 pairs for 4 bits).
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "codes.h"
#include "common.h"
#include "lowbit/kernels/common.h"
#include "lowbit/kernels/pack_int4.h"
#include "lowbit/ops.h"
#include "lsq.h"

namespace lowbit::ops {
namespace {

struct LinearSpec {
  const char* op;
  int64_t qmin, qmax;
  bool packed_s4;  // a frozen (int8-dtype) weight holds int4 pairs rather than int8 codes
};
constexpr LinearSpec kQ8{"lowbit.q8_linear", -128, 127, false};
constexpr LinearSpec kQ4{"lowbit.q4_linear", -8, 7, true};

void check_qat_linear(const LinearSpec& sp, const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                      const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps) {
  const char* op = sp.op;
  check_float_tensor(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(weight.defined(), op, ": weight is undefined (None)");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_channels, ...), got shape ", weight.sizes());
  TORCH_CHECK(is_float_dtype(weight.scalar_type()) || weight.scalar_type() == at::kChar, op,
              ": weight must be float (trained weight) or int8 (frozen qweight), got ", weight.scalar_type());
  // sym_* accessors: these checks also run on symbolic shapes under torch.compile.
  const auto K = x.sym_size(-1);
  if (weight.scalar_type() == at::kChar && sp.packed_s4) {
    TORCH_CHECK(weight.sym_size(1) == (K + 1) / 2, op, ": a packed int4 qweight for in_channels=", K,
                " must have ", (K + 1) / 2, " bytes per row, got shape ", weight.sym_sizes());
  } else {
    TORCH_CHECK(weight.sym_size(1) == K, op, ": x must have in_channels=", weight.sym_size(1),
                " features in its last dim, got shape ", x.sym_sizes());
  }
  TORCH_CHECK(x.sym_numel() > 0, op, ": x is an empty batch (shape ", x.sym_sizes(),
              "); the activation scale and the LSQ gradient are undefined for no data");
  check_qat_state(x, bias_a, K, weight, scale_a, scale_w, eps, op);
}

struct QatForward {
  // output; int8 codes of x (x's shape) and of the weight: (N, K) int8 codes, or for a frozen Q4 qweight
  // the int4 pairs themselves (N, ceil(K/2)), which the backward unpacks.
  at::Tensor y, qx, qw;
};

// y = s_a * s_w * (Qx . Qw^T) through the dispatcher (every backend, Meta included).
QatForward qat_forward(const LinearSpec& sp, const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                       const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps,
                       const std::optional<at::Tensor>& bias) {
  check_qat_linear(sp, x, bias_a, weight, scale_a, scale_w, eps);
  check_output_bias(bias, x, weight.sym_size(0), sp.op);
  QatForward f;
  // No host read of the steps (a device sync on CUDA): an invalid step makes alpha, hence y, NaN.
  // x's codes and the fp32 operands (shift, steps, eps, alpha) in one op: one launch on CUDA.
  auto [qx, prepared] = qat_quantize(x, bias_a.defined() ? std::optional<at::Tensor>(bias_a) : std::nullopt, scale_a,
                                     scale_w, eps, sp.qmin, sp.qmax);
  f.qx = qx;
  const auto p = qat_operands(prepared, bias_a);
  if (weight.scalar_type() == at::kChar && sp.packed_s4) {
    // int4 pairs straight into the GEMM (unpacked in its registers on Hopper): no int8 copy of the weights.
    f.qw = weight;
    f.y = linear_s8s4(f.qx, weight, p.alpha, x.scalar_type());
  } else {
    f.qw = weight.scalar_type() == at::kChar
               ? weight
               : quantize_s8(weight, std::nullopt, p.scale_w, p.eps, sp.qmin, sp.qmax, /*check_step=*/false);
    f.y = linear_s8(f.qx, f.qw, p.alpha, x.scalar_type());
  }
  if (bias.has_value() && bias->defined()) f.y.add_(as_dtype(*bias, f.y.scalar_type()));
  return f;
}

// Saved for backward: references to the caller's input x and to the weight (no copies), and the scalars.
// The clip mask and the LSQ term need v = (x + bias_a) / s_a exactly, and the weight gradient's codes of
// x are recomputed from x; the codes of a float weight are recomputed too, a block of columns at a time
// while the input gradient's GEMM needs them (the same quantizer on the same inputs: the forward's codes
// bit for bit). So the layer keeps no tensor of its own between forward and backward (a frozen weight is
// its own codes; a frozen Q4 qweight its int4 pairs): in a deep network nothing weight- or
// activation-sized waits for the backward beyond what nn.Linear keeps.
template <const LinearSpec& Spec>
class QatLinearFunction : public torch::autograd::Function<QatLinearFunction<Spec>> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias_a,
                            const at::Tensor& weight, const at::Tensor& scale_a, const at::Tensor& scale_w,
                            const at::Tensor& eps, const std::optional<at::Tensor>& bias, bool int8_backward) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto f = qat_forward(Spec, x, bias_a, weight, scale_a, scale_w, eps, bias);
    ctx->save_for_backward({x, bias_a, weight, scale_a, scale_w, eps});
    save_qat_meta(ctx, weight, bias);
    ctx->saved_data["int8_backward"] = int8_backward;
    return f.y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    // grad_weight in the weight's own dtype: a 16-bit weight's gradient leaves the 16-bit GEMM directly
    // (no fp32 temporary of the weight's size; peak memory), an fp32 master weight's stays fp32.
    const auto wdt = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    // A frozen Q4 qweight is its int4 pairs (half the bytes of its codes): unpacked here. A float weight
    // goes in as it is: lsq_linear_backward makes its codes.
    const auto qw = Spec.packed_s4 && wdt == at::kChar ? unpack_s4(s[2], s[0].size(-1)) : s[2];
    auto [gx, gb, gw, gs] = lsq_linear_backward(grads[0], s[0], s[1], std::nullopt, qw, s[3], s[4], s[5], Spec.qmin,
                                                Spec.qmax, qat_grad_mask(ctx),
                                                ctx->saved_data["int8_backward"].toBool(),
                                                is_float_dtype(wdt) ? std::optional<at::ScalarType>(wdt) : std::nullopt);
    const auto gbias = qat_bias_grad(ctx, grads[0].reshape({-1, grads[0].size(-1)}), {0});  // summed over rows
    return {gx, gb, qat_weight_grad(ctx, gw), gs, at::Tensor(), at::Tensor(), gbias, at::Tensor()};
  }
};

template <const LinearSpec& Spec>
at::Tensor qat_linear_composite(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                                const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps,
                                const std::optional<at::Tensor>& bias, bool /*int8_backward: backward only*/) {
  return qat_forward(Spec, x, bias_a, weight, scale_a, scale_w, eps, bias).y;
}

template <const LinearSpec& Spec>
at::Tensor qat_linear_autograd(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight,
                               const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps,
                               const std::optional<at::Tensor>& bias, bool int8_backward) {
  return QatLinearFunction<Spec>::apply(x, bias_a, weight, scale_a, scale_w, eps, bias, int8_backward);
}

// Columns of a float weight whose codes the backward makes at a time for the input gradient's GEMM
// (gA = G . Qw, M x K): few enough that the codes (N x kc bytes) stay within 1/16 of gA's bytes, since
// they coexist with y, gA and the weight gradient, the three buffers nn.Linear's backward peak holds;
// enough that each block's GEMM has >= 2^22 outputs (128 tiles of 128 x 256, about a wave on an H100),
// so the blocks keep the GPU as busy as one GEMM would. Whole multiples of 128 columns (the GEMM's k-tile;
// 16-byte aligned rows), the blocks as even as that allows; K itself when one block is all it takes.
// LOWBIT_QAT_WEIGHT_COLUMNS=n (read per call; tests and experiments): blocks of n columns instead.
int64_t weight_code_columns(int64_t M, int64_t N, int64_t K, int64_t ga_elem_bytes) {
  if (const char* v = std::getenv("LOWBIT_QAT_WEIGHT_COLUMNS"); v != nullptr && std::atoll(v) > 0)
    return std::min<int64_t>(std::atoll(v), std::max<int64_t>(K, 1));
  if (M <= 0 || N <= 0 || K <= 128) return K;
  const int64_t budget = (M * ga_elem_bytes * K / 16) / N;    // N * kc <= M * K * elem / 16
  const int64_t busy = ((int64_t(1) << 22) + M - 1) / M;       // M * kc >= 2^22
  const int64_t want = std::max(budget, busy);
  if (want >= K) return K;
  const int64_t blocks = (K + want - 1) / want;
  const int64_t kc = ((K + blocks - 1) / blocks + 127) / 128 * 128;
  return std::min(kc, K);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_linear_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const std::optional<at::Tensor>& qx_saved,
    const at::Tensor& qw, const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, int64_t qmin,
    int64_t qmax, std::array<bool, 4> mask, bool int8_grad, std::optional<at::ScalarType> grad_w_dtype) {
  constexpr const char* op = "lowbit.lsq_linear_backward";
  const auto gw_dt = grad_w_dtype.value_or(at::kFloat);
  TORCH_CHECK(is_float_dtype(gw_dt), op, ": grad_weight_dtype must be float32, float16 or bfloat16, got ", gw_dt);
  TORCH_CHECK(qmin < 0 && qmax > 0 && qmin >= -128 && qmax <= 127, op, ": need -128 <= qmin < 0 < qmax <= 127, got ",
              qmin, ", ", qmax);
  // qw: the weight's int8 codes, or the float weight itself (its codes then made here, never all at once).
  const bool weight_given = is_float_dtype(qw.scalar_type());
  TORCH_CHECK(qw.dim() == 2 && (qw.scalar_type() == at::kChar || weight_given), op,
              ": qw must be 2-D, the int8 weight codes (N, K) or the float weight (N, K), got ", qw.scalar_type(),
              " of shape ", qw.sizes());
  check_same_device(x, "x", qw, op, "qw");
  const bool have_qx = qx_saved.has_value() && qx_saved->defined();
  if (have_qx) TORCH_CHECK(qx_saved->scalar_type() == at::kChar, op, ": qx must hold int8 codes");
  const int64_t N = qw.size(0), K = qw.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, op, ": x ", x.sizes(), " must have K=", K, " features (qw is ",
              qw.sizes(), ")");
  if (have_qx)
    TORCH_CHECK(qx_saved->sizes() == x.sizes(), op, ": x ", x.sizes(), " and qx ", qx_saved->sizes(), " must match");
  TORCH_CHECK(grad.size(-1) == N && grad.numel() / N == x.numel() / K, op, ": grad has shape ", grad.sizes(),
              ", expected (..., ", N, ") with the rows of x");
  at::Tensor grad_x, grad_b, grad_w, grad_s;
  const std::optional<at::Tensor> shift =
      bias_a.defined() ? std::optional<at::Tensor>(bias_a) : std::nullopt;
  // The fp32 operands (shift, steps max(scale, eps)) from one qat_prepare launch, or from the launch that
  // recomputes x's codes below: no clamp or conversion op per scalar (each costs more host time than the
  // whole backward's device time when the layer has few rows).
  at::Tensor qx_made, prepared;
  if (mask[2] && !have_qx)
    std::tie(qx_made, prepared) = qat_quantize(x, shift, scale_a, scale_w, eps, qmin, qmax);
  else
    prepared = qat_prepare(shift, scale_a, scale_w, eps);
  const auto p = qat_operands(prepared, bias_a);
  const auto s_w = p.step_w, s_a = p.step_a;
  // The float GEMMs run in dtype cdt: x's dtype for 16-bit activations on CUDA (the 16-bit tensor cores,
  // fp32 accumulation, as nn.Linear's own backward in that dtype), fp32 otherwise, reading the saved codes
  // (mm_codes: directly on Hopper, else widened once). G.Qw takes the exact codes and s_w is applied in
  // fp32 in the fused LSQ pass: grad_scale_a sums R * gA over terms of both signs, and a 16-bit s_w * q
  // would add a rounding per weight to that cancellation. The weight gradient is s_a * (G^T . Qx) (on
  // Hopper: s_a times the fp32 sum, one rounding to its dtype; elsewhere X_hat = s_a * q rounded to cdt,
  // the operand a 16-bit layer holds, then the GEMM).
  const auto xdt = x.scalar_type();
  const auto cdt = x.is_cuda() && (xdt == at::kHalf || xdt == at::kBFloat16) ? xdt : at::kFloat;
  const auto G = as_dtype(grad.reshape({-1, N}), cdt);
  // Weight gradient first: on the fallback path its operand X_hat is freed before gA exists, so the
  // backward's peak holds one activation-sized temporary, not two.
  if (mask[2]) {  // STE, no mask. fp32 accumulation; out in grad_weight_dtype: written by the GEMM itself
    // when that is fp32 or the compute dtype (one rounding, as nn.Linear's weight gradient), else one
    // conversion of its fp32 output.
    // The codes of x: given, or made again by the forward's quantizer (bit for bit the forward's), alive
    // only for this GEMM.
    const auto qx = have_qx ? *qx_saved : qx_made;
    const auto out_dt = gw_dt == cdt ? cdt : at::kFloat;
    grad_w = as_dtype(mm_codes(G, /*trans_g=*/true, qx.reshape({-1, K}), s_a, out_dt, op), gw_dt);
    qx_made = at::Tensor();  // freed before gA exists
  }
  if (mask[0] || mask[1] || mask[3]) {
    at::Tensor gA;  // dL/dx_hat (M, K), or dL/dx_hat / s_w (then gscale = s_w)
    std::optional<at::Tensor> gscale;
    if (int8_grad) {
      // SwitchBack: G quantized per row to int8, the int8 GEMM against the weight codes (as a (K, N)
      // operand), row_scale and s_w applied in its fp32 epilogue: gA = fp32(acc) * (s_w * row_scale[i]).
      // A float weight's codes are made whole here (alive only until transposed).
      auto [qG, row_scale] = quantize_rows_s8(grad.reshape({-1, N}), 127);
      at::Tensor codes =
          weight_given ? quantize_s8(qw, std::nullopt, p.scale_w, p.eps, qmin, qmax, /*check_step=*/false) : qw;
      const auto codes_t = transposed_codes(codes, op);
      codes = at::Tensor();
      gA = linear_s8(qG, codes_t, s_w, cdt, row_scale);
    } else if (weight_given) {
      // The weight's codes a block of columns at a time (weight_code_columns), each block's GEMM writing
      // its columns of gA: the backward never holds all N x K codes.
      gA = mm_weight_codes(G, qw, p.scale_w, p.eps, qmin, qmax,
                           weight_code_columns(G.size(0), N, K, at::elementSize(cdt)), cdt, op);
      gscale = s_w;
    } else {
      gA = mm_codes(G, /*trans_g=*/false, qw, std::nullopt, cdt, op);
      gscale = s_w;
    }
    auto g = lsq_input_grads(gA.reshape(x.sizes()), x, bias_a, x.dim() - 1, scale_a, eps, qmin, qmax, mask[0],
                             mask[1], mask[3], -1, gscale, /*gA_is_scratch=*/true, s_a, p.shift);
    grad_x = g.grad_x;
    grad_b = g.grad_shift;
    grad_s = g.grad_scale;
  }
  return {grad_x, grad_b, grad_w, grad_s};
}

// Shapes and dtypes only: the backward as fake tensors see it under torch.compile.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_linear_backward_meta(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const std::optional<at::Tensor>& qx,
    const at::Tensor& qw,
    const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, int64_t qmin, int64_t qmax,
    std::array<bool, 4> mask, bool, std::optional<at::ScalarType> grad_w_dtype) {
  at::Tensor grad_x, grad_b, grad_w, grad_s;
  if (mask[0]) grad_x = at::empty_symint(x.sym_sizes(), x.options());
  if (mask[1]) grad_b = at::empty_symint(bias_a.sym_sizes(), bias_a.options());
  if (mask[2]) grad_w = at::empty_symint(qw.sym_sizes(), qw.options().dtype(grad_w_dtype.value_or(at::kFloat)));
  if (mask[3]) grad_s = at::empty_symint(scale_a.sym_sizes(), scale_a.options());
  return {grad_x, grad_b, grad_w, grad_s};
}

}  // namespace

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight, const at::Tensor& scale_a,
                     const at::Tensor& scale_w, const at::Tensor& eps, const std::optional<at::Tensor>& bias,
                     bool int8_backward) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::q8_linear", "").typed<decltype(q8_linear)>();
  return op.call(x, bias_a, weight, scale_a, scale_w, eps, bias, int8_backward);
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& bias_a, const at::Tensor& weight, const at::Tensor& scale_a,
                     const at::Tensor& scale_w, const at::Tensor& eps, const std::optional<at::Tensor>& bias,
                     bool int8_backward) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::q4_linear", "").typed<decltype(q4_linear)>();
  return op.call(x, bias_a, weight, scale_a, scale_w, eps, bias, int8_backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lsq_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias_a, const std::optional<at::Tensor>& qx,
    const at::Tensor& qw,
    const at::Tensor& scale_a, const at::Tensor& scale_w, const at::Tensor& eps, int64_t qmin, int64_t qmax,
    std::array<bool, 4> output_mask, bool int8_grad, std::optional<at::ScalarType> grad_w_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::lsq_linear_backward", "")
                       .typed<decltype(lsq_linear_backward)>();
  return op.call(grad, x, bias_a, qx, qw, scale_a, scale_w, eps, qmin, qmax, output_mask, int8_grad, grad_w_dtype);
}

TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) {
  m.impl("q8_linear", &qat_linear_composite<kQ8>);
  m.impl("q4_linear", &qat_linear_composite<kQ4>);
}
TORCH_LIBRARY_IMPL(lowbit, Autograd, m) {
  m.impl("q8_linear", &qat_linear_autograd<kQ8>);
  m.impl("q4_linear", &qat_linear_autograd<kQ4>);
}
// The backward's body is device-generic ATen, registered per backend so fake tensors take the Meta kernel.
TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("lsq_linear_backward", &lsq_linear_backward_impl); }
TORCH_LIBRARY_IMPL(lowbit, Meta, m) { m.impl("lsq_linear_backward", &lsq_linear_backward_meta); }
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("lsq_linear_backward", &lsq_linear_backward_impl); }
#endif

}  // namespace lowbit::ops

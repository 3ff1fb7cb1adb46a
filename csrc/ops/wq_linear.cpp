// Op family "wq" (weight-only quantized linear layers, MPQLinear / MBWQLinear): the forward (fused kernels
// for small M, dequantized column tiles + a dense GEMM for large M), the input gradient, the dense
// dequantization, and its autograd Function. Kernels: include/lowbit/kernels/wq.h. Format helpers (packing,
// decoding, layout checks) are in wq_formats.cpp.
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "common.h"
#include "lowbit/kernels/wq.h"
#include "lowbit/ops.h"
#include "wq_common.h"

namespace lowbit::ops {

// ---------------------------------------------------------------------------------------------------
// The weight bundle shared by every wq op.

WqTensors::WqTensors(const char* op_, const at::Tensor& qweight_, const at::Tensor& scales_, const at::Tensor& zeros_,
                     const at::Tensor& g_idx_, const std::optional<at::Tensor>& perm_,
                     const std::optional<at::Tensor>& channel_scale_, at::IntArrayRef seg_bits,
                     at::IntArrayRef seg_rows, bool asym)
    : op(op_) {
  TORCH_CHECK(qweight_.defined() && qweight_.scalar_type() == at::kInt && qweight_.dim() == 2, op,
              ": qweight must be a 2-D int32 tensor (word rows, out_features), got ",
              qweight_.defined() ? c10::toString(qweight_.scalar_type()) : "None", " of shape ",
              qweight_.defined() ? qweight_.sizes() : at::IntArrayRef{});
  check_float_tensor(scales_, op, "scales");
  check_float_tensor(zeros_, op, "zeros");
  TORCH_CHECK(scales_.dim() == 2 && scales_.size(1) == qweight_.size(1), op,
              ": scales must be (groups, out_features=", qweight_.size(1), "), got shape ", scales_.sizes());
  TORCH_CHECK(zeros_.sizes() == scales_.sizes() && zeros_.scalar_type() == scales_.scalar_type(), op,
              ": zeros must have the shape and dtype of scales (", scales_.sizes(), ", ", scales_.scalar_type(),
              "), got ", zeros_.sizes(), ", ", zeros_.scalar_type());
  TORCH_CHECK(seg_bits.size() >= 1 && seg_bits.size() <= size_t(kWqMaxSegments) && seg_bits.size() == seg_rows.size(),
              op, ": seg_bits and seg_rows must have the same length in [1, ", kWqMaxSegments, "], got ",
              seg_bits.size(), " and ", seg_rows.size());
  K = seg_rows.back();
  N = qweight_.size(1);
  TORCH_CHECK(g_idx_.defined() && g_idx_.scalar_type() == at::kInt && g_idx_.dim() == 1 && g_idx_.size(0) == K, op,
              ": g_idx must be int32 of shape (", K, ",), got ", g_idx_.defined() ? c10::toString(g_idx_.scalar_type()) : "None",
              " of shape ", g_idx_.defined() ? g_idx_.sizes() : at::IntArrayRef{});
  const auto dev = qweight_.device();
  check_same_device(qweight_, "qweight", scales_, op, "scales");
  check_same_device(qweight_, "qweight", zeros_, op, "zeros");
  check_same_device(qweight_, "qweight", g_idx_, op, "g_idx");
  qweight = qweight_.contiguous();
  scales = scales_.contiguous();
  zeros = zeros_.contiguous();
  g_idx = g_idx_.contiguous();
  if (perm_.has_value() && perm_->defined() && perm_->numel() > 0) {
    TORCH_CHECK(perm_->scalar_type() == at::kInt && perm_->dim() == 1 && perm_->size(0) == K, op,
                ": perm must be int32 of shape (", K, ",) (wq_check_perm converts a checkpoint's q_perm), got ",
                perm_->scalar_type(), " of shape ", perm_->sizes());
    check_same_device(qweight_, "qweight", *perm_, op, "perm");
    perm = perm_->contiguous();
  }
  if (channel_scale_.has_value() && channel_scale_->defined()) {
    TORCH_CHECK(channel_scale_->numel() == K && channel_scale_->scalar_type() == scales_.scalar_type(), op,
                ": channel_scale must hold K=", K, " elements of the scales' dtype ", scales_.scalar_type(), ", got ",
                channel_scale_->numel(), " of ", channel_scale_->scalar_type());
    check_same_device(qweight_, "qweight", *channel_scale_, op, "channel_scale");
    channel_scale = channel_scale_->reshape({K}).contiguous();
  }
  (void)dev;
  desc.K = K;
  desc.N = N;
  desc.qweight = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  desc.qrows = qweight.size(0);
  desc.nseg = static_cast<int32_t>(seg_bits.size());
  for (size_t s = 0; s < seg_bits.size(); ++s) {
    desc.bits[s] = static_cast<int32_t>(seg_bits[s]);
    desc.row_end[s] = seg_rows[s];
  }
  desc.g_idx = g_idx.data_ptr<int32_t>();
  desc.groups = scales.size(0);
  desc.scales = scales.data_ptr();
  desc.zeros = zeros.data_ptr();
  desc.sdtype = kernel_dtype(scales.scalar_type(), op, "scales");
  desc.asym = asym;
  desc.perm = perm.defined() ? perm.data_ptr<int32_t>() : nullptr;
  desc.channel_scale = channel_scale.defined() ? channel_scale.data_ptr() : nullptr;
  check_status(wq_validate(op, desc), op);
}

// Shape-only checks for the Meta kernels (no data pointers).
namespace {

constexpr const char* kLinear = "lowbit.wq_linear";
constexpr const char* kGrad = "lowbit.wq_linear_grad_input";
constexpr const char* kDequant = "lowbit.wq_dequantize";

// Largest M that takes the fused kernels; above, dequantized column tiles + a dense GEMM (tensor cores on
// CUDA) are faster. H200, K = N = 4096, 4-bit: M = 16 fused 49 us vs tiles 28 us (the fused kernel runs
// its FMAs on CUDA cores); CPU: the fused kernel reuses each decoded weight for up to 8 rows.
constexpr int64_t kFusedMaxRowsCuda = 8;
constexpr int64_t kFusedMaxRowsCpu = 16;
// LOWBIT_WQ_FUSED_MAX_ROWS overrides both (read once; for tuning and benchmarks).
int64_t fused_max_rows(bool cpu) {
  static const int64_t env = [] {
    const char* v = std::getenv("LOWBIT_WQ_FUSED_MAX_ROWS");
    return v != nullptr ? std::atoll(v) : int64_t(-1);
  }();
  if (env >= 0) return env;
  return cpu ? kFusedMaxRowsCpu : kFusedMaxRowsCuda;
}
// Bytes of one dequantized tile of the large-M path (the dense weight is never kept). H100, 4-bit
// 8192 x 28672, M = 256, CUDA graph: 536 us with 64 MB tiles (~600 when each tile's product was copied
// into out); 24 and 12 MB tiles, meant to stay in L2, were slower (692 / 948 us).
constexpr int64_t kTileBytes = int64_t(64) << 20;

void check_meta(const char* op, const at::Tensor& qweight, const at::Tensor& scales, at::IntArrayRef seg_bits,
                at::IntArrayRef seg_rows) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, op, ": qweight must be 2-D int32");
  TORCH_CHECK(scales.dim() == 2, op, ": scales must be 2-D");
  TORCH_CHECK(!seg_rows.empty() && seg_bits.size() == seg_rows.size(), op,
              ": seg_bits and seg_rows must be non-empty and of one length");
}

int64_t tile_columns(int64_t K, int64_t N, int64_t elt) {
  const int64_t cols = std::max<int64_t>(128, kTileBytes / std::max<int64_t>(1, K * elt) / 128 * 128);
  return std::min(cols, N);
}

// Dense weight columns [n0, n1) into out (K, n1 - n0, unit column stride, any row stride), through the
// device's dequantize kernel.
void dequant_into(const WqTensors& w, int64_t n0, int64_t n1, at::Tensor& out) {
  if (out.numel() == 0) return;
  const DType ot = kernel_dtype(out.scalar_type(), w.op, "dtype");
  if (w.qweight.is_cpu()) {
    check_status(cpu::wq_dequantize(w.desc, n0, n1, ot, out.data_ptr(), out.stride(0)), w.op);
  } else {
#ifdef LOWBIT_WITH_CUDA
    c10::cuda::CUDAGuard guard(w.qweight.device());
    check_status(cuda::wq_dequantize(w.desc, n0, n1, ot, out.data_ptr(), out.stride(0), current_stream(w.qweight)),
                 w.op);
#else
    TORCH_CHECK(false, w.op, ": lowbit was built without CUDA");
#endif
  }
}
// Dense weight columns [n0, n1) as (K, n1 - n0) of dtype dt.
at::Tensor dequant_tile(const WqTensors& w, int64_t n0, int64_t n1, at::ScalarType dt) {
  auto out = at::empty({w.K, n1 - n0}, w.qweight.options().dtype(dt));
  dequant_into(w, n0, n1, out);
  return out;
}

// x (M, K) -> out (M, N) through the fused kernel.
// The kernels' tensor-core permission (wq.h): 16-bit x of the scales' dtype may be multiplied by w rounded
// to that dtype, as F.linear on the dequantized 16-bit weight (and BIE's kernels) do.
WqWeight with_half(const WqTensors& w, const at::Tensor& x) {
  WqWeight d = w.desc;
  d.allow_half = x.scalar_type() == w.scales.scalar_type() && x.scalar_type() != at::kFloat;
  return d;
}

void fused_matmul(const WqTensors& w, const at::Tensor& x2, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const DType xt = kernel_dtype(x2.scalar_type(), w.op, "x");
  const WqWeight desc = with_half(w, x2);
  const int64_t M = x2.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = as_dtype(*bias, w.scales.scalar_type()).contiguous();
  const void* bp = b.defined() ? b.data_ptr() : nullptr;
  if (x2.is_cpu()) {
    check_status(cpu::wq_matmul(desc, x2.data_ptr(), xt, M, w.K, bp, out.data_ptr(), w.N), w.op);
  } else {
#ifdef LOWBIT_WITH_CUDA
    c10::cuda::CUDAGuard guard(x2.device());
    const WqWeight& d = desc;
    size_t bytes = 0;
    check_status(cuda::wq_matmul_workspace(d, M, &bytes), w.op);
    at::Tensor ws;
    if (bytes > 0) ws = at::empty({static_cast<int64_t>((bytes + 15) / 16) * 4}, x2.options().dtype(at::kFloat));
    check_status(cuda::wq_matmul(d, x2.data_ptr(), xt, M, w.K, bp, out.data_ptr(), w.N,
                                 ws.defined() ? ws.data_ptr() : nullptr, bytes, current_stream(x2)),
                 w.op);
#else
    TORCH_CHECK(false, w.op, ": lowbit was built without CUDA");
#endif
  }
}

// x (M, K) -> out (M, N): (x * channel_scale) . W in column tiles of dequantized weight.
void tiled_matmul(const WqTensors& w, const at::Tensor& x2, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const auto dt = x2.scalar_type();
  at::Tensor xs = x2;
  if (w.channel_scale.defined()) xs = (as_float(x2) * as_float(w.channel_scale)).to(dt);
  const int64_t step = tile_columns(w.K, w.N, x2.element_size());
  // One tile buffer for every tile (the last one uses its first columns, row stride kept); each tile's
  // product goes straight into its columns of out (a row-major slice: the GEMM writes it with ldc = N).
  at::Tensor buf = at::empty({w.K, step}, w.qweight.options().dtype(dt));
  for (int64_t n0 = 0; n0 < w.N; n0 += step) {
    const int64_t n1 = std::min(w.N, n0 + step);
    at::Tensor tile = buf.narrow(1, 0, n1 - n0);
    dequant_into(w, n0, n1, tile);
    if (n0 == 0 && n1 == w.N) {
      at::mm_out(out, xs, tile);
    } else {
      at::Tensor cols = out.narrow(1, n0, n1 - n0);
      at::mm_out(cols, xs, tile);
    }
  }
  if (bias.has_value() && bias->defined()) out.add_(as_dtype(*bias, dt));
}

void check_x(const WqTensors& w, const at::Tensor& x, const char* arg) {
  check_float_tensor(x, w.op, arg);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == (std::string(arg) == "x" ? w.K : w.N), w.op, ": ", arg,
              " must have ", (std::string(arg) == "x" ? w.K : w.N), " features in its last dim, got shape ", x.sizes());
  check_same_device(w.qweight, "qweight", x, w.op, arg);
}

void check_bias(const WqTensors& w, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return;
  check_float_tensor(*bias, w.op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.N, w.op, ": bias must have shape (", w.N, ",), got ",
              bias->sizes());
  check_same_device(w.qweight, "qweight", *bias, w.op, "bias");
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  auto v = sizes.vec();
  v.back() = last;
  return v;
}

at::Tensor wq_linear_forward_impl(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                  const at::Tensor& zeros, const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                                  const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits,
                                  at::IntArrayRef seg_rows, bool asym, const std::optional<at::Tensor>& bias) {
  WqTensors w(kLinear, qweight, scales, zeros, g_idx, perm, channel_scale, seg_bits, seg_rows, asym);
  check_x(w, x, "x");
  check_bias(w, bias);
  const auto x2 = x.reshape({-1, w.K}).contiguous();
  const int64_t M = x2.size(0);
  auto out = at::empty({M, w.N}, x.options());
  if (M > 0 && w.N > 0) {
    int64_t fused_max = fused_max_rows(x.is_cpu());
#ifdef LOWBIT_WITH_CUDA
    // Where the tensor-core kernels beat tiles + cuBLAS (wq.h: wq_matmul_fused_max_rows).
    static const bool env_override = std::getenv("LOWBIT_WQ_FUSED_MAX_ROWS") != nullptr;
    if (!x.is_cpu() && !env_override) {
      c10::cuda::CUDAGuard guard(x.device());
      fused_max = std::max(fused_max, cuda::wq_matmul_fused_max_rows(with_half(w, x),
                                                                    kernel_dtype(x.scalar_type(), w.op, "x")));
    }
#endif
    if (M <= fused_max) {
      fused_matmul(w, x2, bias, out);
    } else {
      tiled_matmul(w, x2, bias, out);
    }
  }
  return out.reshape(with_last(x.sizes(), w.N));
}

at::Tensor wq_linear_forward_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                  const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows,
                                  bool, const std::optional<at::Tensor>&) {
  check_meta(kLinear, qweight, scales, seg_bits, seg_rows);
  check_float_tensor(x, kLinear, "x");
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) == seg_rows.back(), kLinear, ": x must have ", seg_rows.back(),
              " features in its last dim, got shape ", x.sym_sizes());
  auto sizes = x.sym_sizes().vec();
  sizes.back() = qweight.sym_size(1);
  return at::empty_symint(sizes, x.options());
}

// grad_x = (grad . W^T) * channel_scale, in column tiles of W; accumulated in fp32 when there are several.
at::Tensor wq_linear_grad_input_impl(const at::Tensor& grad, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor& zeros, const at::Tensor& g_idx,
                                     const std::optional<at::Tensor>& perm,
                                     const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits,
                                     at::IntArrayRef seg_rows, bool asym) {
  WqTensors w(kGrad, qweight, scales, zeros, g_idx, perm, channel_scale, seg_bits, seg_rows, asym);
  check_x(w, grad, "grad");
  const auto dt = grad.scalar_type();
  const auto g2 = grad.reshape({-1, w.N});
  const int64_t step = tile_columns(w.K, w.N, grad.element_size());
  at::Tensor gx;
  if (step >= w.N) {
    gx = at::mm(g2, dequant_tile(w, 0, w.N, dt).t());
  } else {
    gx = at::zeros({g2.size(0), w.K}, grad.options().dtype(at::kFloat));
    for (int64_t n0 = 0; n0 < w.N; n0 += step) {
      const int64_t n1 = std::min(w.N, n0 + step);
      gx.add_(at::mm(g2.narrow(1, n0, n1 - n0), dequant_tile(w, n0, n1, dt).t()));
    }
  }
  if (w.channel_scale.defined()) gx = as_float(gx) * as_float(w.channel_scale);
  return as_dtype(gx, dt).reshape(with_last(grad.sizes(), w.K));
}

at::Tensor wq_linear_grad_input_meta(const at::Tensor& grad, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&, at::IntArrayRef seg_bits,
                                     at::IntArrayRef seg_rows, bool) {
  check_meta(kGrad, qweight, scales, seg_bits, seg_rows);
  auto sizes = grad.sym_sizes().vec();
  sizes.back() = c10::SymInt(seg_rows.back());
  return at::empty_symint(sizes, grad.options());
}

at::Tensor wq_dequantize_impl(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                              const at::Tensor& g_idx, const std::optional<at::Tensor>& perm, at::IntArrayRef seg_bits,
                              at::IntArrayRef seg_rows, bool asym, at::ScalarType dtype) {
  WqTensors w(kDequant, qweight, scales, zeros, g_idx, perm, std::nullopt, seg_bits, seg_rows, asym);
  return dequant_tile(w, 0, w.N, dtype);
}

at::Tensor wq_dequantize_meta(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor&,
                              const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef seg_bits,
                              at::IntArrayRef seg_rows, bool, at::ScalarType dtype) {
  check_meta(kDequant, qweight, scales, seg_bits, seg_rows);
  return at::empty({seg_rows.back(), qweight.size(1)}, qweight.options().dtype(dtype));
}

// Saved for backward: the weight bundle (references, no copies); x itself is not needed.
class WqLinearFunction : public torch::autograd::Function<WqLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& g_idx,
                            const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& channel_scale,
                            at::IntArrayRef seg_bits, at::IntArrayRef seg_rows, bool asym,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto y = wq_linear_forward(x, qweight, scales, zeros, g_idx, perm, channel_scale, seg_bits, seg_rows, asym, bias);
    ctx->save_for_backward({qweight, scales, zeros, g_idx, perm.value_or(at::Tensor()),
                            channel_scale.value_or(at::Tensor())});
    ctx->saved_data["seg_bits"] = seg_bits.vec();
    ctx->saved_data["seg_rows"] = seg_rows.vec();
    ctx->saved_data["asym"] = asym;
    // needs_input_grad counts only the tensors present, so an absent perm would shift the bias index.
    ctx->saved_data["bias_grad"] = bias.has_value() && bias->defined() && bias->requires_grad();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto seg_bits = ctx->saved_data["seg_bits"].toIntVector();
    const auto seg_rows = ctx->saved_data["seg_rows"].toIntVector();
    const bool asym = ctx->saved_data["asym"].toBool();
    const auto& g = grads[0];
    at::Tensor gx, gb;
    if (ctx->needs_input_grad(0)) {
      const std::optional<at::Tensor> perm = s[4].defined() ? std::optional<at::Tensor>(s[4]) : std::nullopt;
      const std::optional<at::Tensor> cs = s[5].defined() ? std::optional<at::Tensor>(s[5]) : std::nullopt;
      gx = wq_linear_grad_input(g, s[0], s[1], s[2], s[3], perm, cs, seg_bits, seg_rows, asym);
    }
    if (ctx->saved_data["bias_grad"].toBool())
      gb = g.reshape({-1, g.size(-1)}).sum(0);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), gb};
  }
};

at::Tensor wq_linear_composite(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& zeros, const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                               const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits,
                               at::IntArrayRef seg_rows, bool asym, const std::optional<at::Tensor>& bias) {
  return wq_linear_forward(x, qweight, scales, zeros, g_idx, perm, channel_scale, seg_bits, seg_rows, asym, bias);
}

at::Tensor wq_linear_autograd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                              const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits,
                              at::IntArrayRef seg_rows, bool asym, const std::optional<at::Tensor>& bias) {
  return WqLinearFunction::apply(x, qweight, scales, zeros, g_idx, perm, channel_scale, seg_bits, seg_rows, asym,
                                 bias);
}

}  // namespace

at::Tensor wq_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                     const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                     const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows,
                     bool asym, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::wq_linear", "").typed<decltype(wq_linear)>();
  return op.call(x, qweight, scales, zeros, g_idx, perm, channel_scale, seg_bits, seg_rows, asym, bias);
}

at::Tensor wq_linear_forward(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                             const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits,
                             at::IntArrayRef seg_rows, bool asym, const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::wq_linear_forward", "")
                       .typed<decltype(wq_linear_forward)>();
  return op.call(x, qweight, scales, zeros, g_idx, perm, channel_scale, seg_bits, seg_rows, asym, bias);
}

at::Tensor wq_linear_grad_input(const at::Tensor& grad, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& zeros, const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
                                const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits,
                                at::IntArrayRef seg_rows, bool asym) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lowbit::wq_linear_grad_input", "")
                       .typed<decltype(wq_linear_grad_input)>();
  return op.call(grad, qweight, scales, zeros, g_idx, perm, channel_scale, seg_bits, seg_rows, asym);
}

at::Tensor wq_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                         const at::Tensor& g_idx, const std::optional<at::Tensor>& perm, at::IntArrayRef seg_bits,
                         at::IntArrayRef seg_rows, bool asym, at::ScalarType dtype) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lowbit::wq_dequantize", "").typed<decltype(wq_dequantize)>();
  return op.call(qweight, scales, zeros, g_idx, perm, seg_bits, seg_rows, asym, dtype);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("wq_linear_forward", &wq_linear_forward_impl);
  m.impl("wq_linear_grad_input", &wq_linear_grad_input_impl);
  m.impl("wq_dequantize", &wq_dequantize_impl);
}
TORCH_LIBRARY_IMPL(lowbit, Meta, m) {
  m.impl("wq_linear_forward", &wq_linear_forward_meta);
  m.impl("wq_linear_grad_input", &wq_linear_grad_input_meta);
  m.impl("wq_dequantize", &wq_dequantize_meta);
}
#ifdef LOWBIT_WITH_CUDA
TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("wq_linear_forward", &wq_linear_forward_impl);
  m.impl("wq_linear_grad_input", &wq_linear_grad_input_impl);
  m.impl("wq_dequantize", &wq_dequantize_impl);
}
#endif
TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) { m.impl("wq_linear", &wq_linear_composite); }
TORCH_LIBRARY_IMPL(lowbit, Autograd, m) { m.impl("wq_linear", &wq_linear_autograd); }

}  // namespace lowbit::ops

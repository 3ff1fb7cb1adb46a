// Lifecycle shared by the C++ QAT modules (see lowbit/nn/qat_state.h); mirrors python/lowbit/nn/qat_base.py.
#include "lowbit/nn/qat_state.h"

#include <torch/torch.h>

#include "lowbit/ops.h"

#include <cmath>
#include <string>
#include <utility>

namespace lowbit::nn::detail {

void register_qat_state(torch::nn::Module& m, torch::IntArrayRef weight_shape, int64_t in_channels,
                        c10::ScalarType dtype, c10::Device device, QatTensors out) {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  const auto opt = torch::TensorOptions().dtype(dtype).device(device);
  out.weight = m.register_parameter("weight", torch::empty(weight_shape, f32));
  out.bias_a = m.register_parameter("bias_a", torch::zeros({in_channels}, opt));
  out.scale_a = m.register_parameter("scale_a", torch::zeros({}, opt));
  out.scale_w = m.register_buffer("scale_w", torch::ones({}, f32));
  out.eps = m.register_buffer("eps", torch::full({}, 1e-5, opt));
  out.qweight = m.register_buffer("qweight", torch::empty({0}, f32.dtype(torch::kInt8)));  // absent until generated
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(out.weight, std::sqrt(5.0));  // as nn::Linear / nn::Conv2d
}


void check_archive(torch::serialize::InputArchive& archive, const char* layer, torch::IntArrayRef weight_shape,
                   torch::IntArrayRef qweight_shape, int64_t in_channels) {
  auto read = [&](const char* key, bool buffer) {
    torch::Tensor t;  // undefined: try_read hands over the archived tensor itself (no copy)
    TORCH_CHECK(archive.try_read(key, t, buffer), layer, ": the checkpoint has no '", key, "'");
    return t;
  };
  const auto weight = read("weight", false), bias_a = read("bias_a", false), scale_a = read("scale_a", false);
  const auto scale_w = read("scale_w", true), eps = read("eps", true), qweight = read("qweight", true);
  for (const auto& [key, t] : {std::pair<const char*, const torch::Tensor&>{"weight", weight}, {"bias_a", bias_a},
                               {"scale_a", scale_a}, {"scale_w", scale_w}, {"eps", eps}}) {
    TORCH_CHECK(t.is_floating_point(), layer, ": checkpoint '", key, "' must be a floating tensor, got ", t.dtype());
  }
  TORCH_CHECK(weight.numel() == 0 || weight.sizes() == weight_shape, layer, ": checkpoint 'weight' has shape ",
              weight.sizes(), ", this layer's is ", weight_shape);
  TORCH_CHECK(bias_a.dim() == 1 && bias_a.size(0) == in_channels, layer, ": checkpoint 'bias_a' has shape ",
              bias_a.sizes(), ", expected (", in_channels, ")");
  for (const auto& [key, t] : {std::pair<const char*, const torch::Tensor&>{"scale_a", scale_a}, {"scale_w", scale_w},
                               {"eps", eps}}) {
    TORCH_CHECK(t.numel() == 1, layer, ": checkpoint '", key, "' must hold one element, got shape ", t.sizes());
    const double v = t.item<double>();
    TORCH_CHECK(std::isfinite(v), layer, ": checkpoint '", key, "' must be finite, got ", v);
    TORCH_CHECK(std::string(key) == "scale_a" || v > 0, layer, ": checkpoint '", key, "' must be > 0, got ", v);
  }
  if (qweight.numel() == 0) {
    TORCH_CHECK(weight.numel() > 0, layer, ": the checkpoint holds neither a weight nor a qweight");
  } else {
    TORCH_CHECK(qweight.scalar_type() == torch::kInt8 && qweight.sizes() == qweight_shape, layer,
                ": checkpoint 'qweight' must be int8 of shape ", qweight_shape, ", got ", qweight.scalar_type(), " ",
                qweight.sizes());
  }
}

void check_qat_options(const char* layer, int64_t in_channels, int64_t out_channels, int64_t a_bit, int64_t w_bit,
                       int64_t bits, c10::ScalarType dtype) {
  TORCH_CHECK(in_channels > 0 && out_channels > 0, layer, ": in_channels and out_channels must be positive, got ",
              in_channels, " and ", out_channels);
  TORCH_CHECK(a_bit == bits && w_bit == bits, layer, ": computes with ", bits,
              "-bit weights and activations; got a_bit=", a_bit, ", w_bit=", w_bit);
  TORCH_CHECK(dtype == c10::kFloat || dtype == c10::kHalf || dtype == c10::kBFloat16, layer,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
}

void make_absent(torch::Tensor& t) {
  torch::NoGradGuard no_grad;
  t.set_(torch::empty({0}, t.options()));
}

torch::Tensor q4_weight_scale(const torch::Tensor& weight, const torch::Tensor& eps) {
  return ops::lsq_scale(weight.detach(), kQ4WeightScaleQmax, eps);
}

torch::Tensor q4_pack_weight(const torch::Tensor& weight_in_code_order, const torch::Tensor& scale_w,
                             const torch::Tensor& eps) {
  return ops::pack_s4(ops::quantize_s8(weight_in_code_order, std::nullopt, scale_w, eps, -8, 7));
}

void QatState::reset() {
  scale_a_ready_ = false;
  scale_w_ready_ = false;
  qweight_version_ = -1;
}

void QatState::init_scale_a(const torch::Tensor& scale_a, const torch::Tensor& x) {
  if (scale_a_ready_) return;
  torch::NoGradGuard no_grad;
  // A non-zero scale_a was set by hand or loaded: keep it (BIE's rule), only 0 means "not yet".
  if (!scale_a.ne(0).item<bool>()) scale_a.copy_(ops::lsq_scale(x, kActInitQmax, std::nullopt));
  scale_a_ready_ = true;
}

void QatState::begin_training_forward(const torch::Tensor& weight, torch::Tensor& qweight,
                                      const torch::Tensor& scale_a, const torch::Tensor& x) {
  TORCH_CHECK(present(weight), layer_,
              ": the float weight was released by generate_quantized_weight(true); this layer is inference-only "
              "(call eval())");
  init_scale_a(scale_a, x);
  if (present(qweight)) {
    make_absent(qweight);
    qweight_version_ = -1;
  }
}

bool QatState::weight_gone(const torch::Tensor& weight, const torch::Tensor& qweight) const {
  if (present(weight)) return false;
  TORCH_CHECK(present(qweight), layer_, ": neither weight nor qweight is present");
  return true;
}

void QatState::store_qweight(torch::Tensor& weight, torch::Tensor& qweight, const torch::Tensor& codes,
                             bool qweight_only) {
  torch::NoGradGuard no_grad;
  qweight.set_(codes);
  qweight_version_ = int64_t(weight._version());
  if (qweight_only) {
    make_absent(weight);
    weight.set_requires_grad(false);  // nothing left to train; optimisers skip it
  }
}

bool QatState::qweight_current(const torch::Tensor& weight, const torch::Tensor& qweight) const {
  if (!present(qweight)) return false;
  return !present(weight) || int64_t(weight._version()) == qweight_version_;
}

void QatState::after_load(const torch::Tensor& weight, const torch::Tensor& qweight, bool weight_was_released) {
  scale_a_ready_ = false;
  scale_w_ready_ = true;  // Module::load requires every buffer, scale_w included
  qweight_version_ = present(qweight) && present(weight) ? int64_t(weight._version()) : -1;
  // InputArchive keeps the module's requires_grad flag; match it to what was loaded.
  if (!present(weight)) {
    weight.set_requires_grad(false);  // a qweight-only (inference) checkpoint
  } else if (weight_was_released) {
    weight.set_requires_grad(true);
  }
}

void QatState::after_clone(const QatState& source, bool source_qweight_current, const torch::Tensor& weight) {
  scale_a_ready_ = source.scale_a_ready_;
  scale_w_ready_ = source.scale_w_ready_;
  qweight_version_ = source_qweight_current && present(weight) ? int64_t(weight._version()) : -1;
  if (!present(weight)) weight.set_requires_grad(false);  // Cloneable copies data, not the flag
}

}  // namespace lowbit::nn::detail

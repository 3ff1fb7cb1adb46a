// lowbit::nn::Q8Linear: state and lifecycle only (lazy LSQ init, frozen qweight, invalidation); every
// number comes from the lowbit ops, exactly as in python/lowbit/nn/qat_linear.py.
#include "lowbit/nn/q8_linear.h"

#include <torch/nn/init.h>
#include <torch/torch.h>

#include <cmath>

#include "lowbit/ops.h"

namespace lowbit::nn {

namespace {
constexpr int64_t kQmin = -128, kQmax = 127;
}

Q8LinearImpl::Q8LinearImpl(const Q8LinearOptions& options_) : options(options_) { reset(); }

void Q8LinearImpl::reset() {
  TORCH_CHECK(options.in_channels() > 0 && options.out_channels() > 0,
              "Q8Linear: in_channels and out_channels must be positive, got ", options.in_channels(), " and ",
              options.out_channels());
  TORCH_CHECK(options.a_bit() == 8 && options.w_bit() == 8, "Q8Linear: a_bit and w_bit must be 8, got ",
              options.a_bit(), " and ", options.w_bit());
  const auto dt = options.dtype();
  TORCH_CHECK(dt == c10::kFloat || dt == c10::kHalf || dt == c10::kBFloat16,
              "Q8Linear: dtype must be float32, float16 or bfloat16, got ", dt);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(options.device());
  const auto opt = torch::TensorOptions().dtype(dt).device(options.device());
  weight = register_parameter("weight", torch::empty({options.out_channels(), options.in_channels()}, f32));
  bias_a = register_parameter("bias_a", torch::zeros({options.in_channels()}, opt));
  scale_a = register_parameter("scale_a", torch::zeros({}, opt));
  scale_w = register_buffer("scale_w", torch::ones({}, f32));
  eps = register_buffer("eps", torch::full({}, 1e-5, opt));
  // libtorch modules cannot unregister state, so "absent" is a 0-element tensor, swapped in place.
  qweight = register_buffer("qweight", torch::empty({0}, f32.dtype(torch::kInt8)));
  {
    torch::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  }
  scale_a_ready_ = false;
  qweight_version_ = -1;
}

void Q8LinearImpl::init_scale_a(const torch::Tensor& x) {
  if (scale_a_ready_) return;
  torch::NoGradGuard no_grad;
  if (scale_a.ne(0).item<bool>() == false) scale_a.copy_(ops::lsq_scale(x, double(kQmax), std::nullopt));
  scale_a_ready_ = true;
}

torch::Tensor Q8LinearImpl::set_activation(const torch::Tensor& x) {
  init_scale_a(x);
  return x + bias_a;
}

void Q8LinearImpl::generate_quantized_weight(bool qweight_only) {
  torch::NoGradGuard no_grad;
  if (weight_released()) {
    TORCH_CHECK(has_qweight(), "Q8Linear: neither weight nor qweight is present");
    return;
  }
  scale_w.copy_(ops::lsq_scale(weight, double(kQmax), eps));
  qweight.set_(ops::quantize_s8(weight, std::nullopt, scale_w, eps, kQmin, kQmax));
  qweight_version_ = weight._version();
  if (qweight_only) {
    weight.set_(torch::empty({0}, weight.options()));
    weight.set_requires_grad(false);
  }
}

const torch::Tensor& Q8LinearImpl::eval_qweight() {
  const bool stale = !weight_released() && int64_t(weight._version()) != qweight_version_;
  if (!has_qweight() || stale) generate_quantized_weight(false);
  return qweight;
}

torch::Tensor Q8LinearImpl::forward(const torch::Tensor& x) {
  if (is_training()) {
    TORCH_CHECK(!weight_released(), "Q8Linear: the float weight was released by generate_quantized_weight(true); "
                                  "this layer is inference-only (call eval())");
    init_scale_a(x);
    if (has_qweight()) {  // stale once training resumes
      torch::NoGradGuard no_grad;
      qweight.set_(torch::empty({0}, qweight.options()));
    }
    const auto s_w = ops::lsq_scale(weight, double(kQmax), eps);
    return ops::q8_linear(x, bias_a, weight, scale_a, s_w, eps);
  }
  return ops::q8_linear(x, bias_a, eval_qweight(), scale_a, scale_w, eps);
}

void Q8LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "lowbit::nn::Q8Linear(in_channels=" << options.in_channels()
         << ", out_channels=" << options.out_channels() << ", dtype=" << options.dtype() << ")";
}

}  // namespace lowbit::nn

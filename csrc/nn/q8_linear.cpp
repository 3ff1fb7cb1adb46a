// lowbit::nn::Q8Linear: state only; the lifecycle (lazy LSQ init, frozen qweight, invalidation) is the
// shared detail::QatState, and every number comes from the lowbit ops, as in python/lowbit/nn/q8_linear.py.
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
  detail::check_qat_options("Q8Linear", options.in_channels(), options.out_channels(), options.a_bit(),
                            options.w_bit(), 8, options.dtype());
  detail::register_qat_state(*this, {options.out_channels(), options.in_channels()}, options.in_channels(),
                             options.dtype(), options.device(), {weight, bias_a, scale_a, scale_w, eps, qweight});
  state_.reset();
}

torch::Tensor Q8LinearImpl::set_activation(const torch::Tensor& x) {
  state_.init_scale_a(scale_a, x);
  return x + bias_a;
}

void Q8LinearImpl::generate_quantized_weight(bool qweight_only) {
  if (state_.weight_gone(weight, qweight)) return;
  torch::NoGradGuard no_grad;
  scale_w.copy_(ops::lsq_scale(weight, double(kQmax), eps));  // frozen from here on (eval)
  state_.store_qweight(weight, qweight, ops::quantize_s8(weight, std::nullopt, scale_w, eps, kQmin, kQmax),
                       qweight_only);
}

torch::Tensor Q8LinearImpl::forward(const torch::Tensor& x) {
  if (is_training()) {
    state_.begin_training_forward(weight, qweight, scale_a, x);
    // Q8: the weight step follows the weight every step (as the Python Q8Linear); the 4-bit layers fix it
    // in prepare_params() instead.
    const auto s_w = ops::lsq_scale(weight, double(kQmax), eps);
    return ops::q8_linear(x, bias_a, weight, scale_a, s_w, eps, std::nullopt, options.int8_backward());
  }
  if (!state_.qweight_current(weight, qweight)) generate_quantized_weight(false);
  return ops::q8_linear(x, bias_a, qweight, scale_a, scale_w, eps);
}

void Q8LinearImpl::load(torch::serialize::InputArchive& archive) {
  const bool was_released = weight_released();
  detail::check_archive(archive, "lowbit::nn::Q8Linear", {options.out_channels(), options.in_channels()}, {options.out_channels(), options.in_channels()}, options.in_channels());
  torch::nn::Module::load(archive);
  state_.after_load(weight, qweight, was_released);
}

std::shared_ptr<torch::nn::Module> Q8LinearImpl::clone(const std::optional<torch::Device>& device) const {
  auto copy = torch::nn::Cloneable<Q8LinearImpl>::clone(device);
  auto& c = static_cast<Q8LinearImpl&>(*copy);
  c.state_.after_clone(state_, state_.qweight_current(weight, qweight), c.weight);
  return copy;
}

void Q8LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "lowbit::nn::Q8Linear(in_channels=" << options.in_channels()
         << ", out_channels=" << options.out_channels() << ", dtype=" << options.dtype() << ")";
}

}  // namespace lowbit::nn

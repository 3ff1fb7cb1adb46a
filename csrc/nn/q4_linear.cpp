// lowbit::nn::Q4Linear: state only; the lifecycle is the shared detail::QatState and every number comes
// from the lowbit ops, as in python/lowbit/nn/q4_linear.py (+ q4_base.py, qat_base.py).
#include "lowbit/nn/q4_linear.h"

#include <torch/nn/init.h>
#include <torch/torch.h>

#include <cmath>

#include "lowbit/ops.h"

namespace lowbit::nn {

Q4LinearImpl::Q4LinearImpl(const Q4LinearOptions& options_) : options(options_) { reset(); }

void Q4LinearImpl::reset() {
  detail::check_qat_options("Q4Linear", options.in_channels(), options.out_channels(), options.a_bit(),
                            options.w_bit(), 4, options.dtype());
  detail::register_qat_state(*this, {options.out_channels(), options.in_channels()}, options.in_channels(),
                             options.dtype(), options.device(), {weight, bias_a, scale_a, scale_w, eps, qweight});
  state_.reset();
}

void Q4LinearImpl::prepare_params() {
  if (weight_released()) return;  // scale_w belongs to the qweight now
  torch::NoGradGuard no_grad;
  scale_w.copy_(detail::q4_weight_scale(weight, eps));
  state_.set_scale_w_ready();
}

const torch::Tensor& Q4LinearImpl::prepared_scale_w() {
  if (!state_.scale_w_ready()) prepare_params();
  return scale_w;
}

torch::Tensor Q4LinearImpl::set_activation(const torch::Tensor& x) {
  state_.init_scale_a(scale_a, x);
  return x + bias_a;
}

void Q4LinearImpl::generate_quantized_weight(bool qweight_only) {
  if (state_.weight_gone(weight, qweight)) return;
  // The weight's codes are packed along its rows (in_channels): (out, ceil(in/2)).
  state_.store_qweight(weight, qweight, detail::q4_pack_weight(weight.detach(), prepared_scale_w(), eps),
                       qweight_only);
}

torch::Tensor Q4LinearImpl::forward(const torch::Tensor& x) {
  if (is_training()) {
    state_.begin_training_forward(weight, qweight, scale_a, x);
    return ops::q4_linear(x, bias_a, weight, scale_a, prepared_scale_w(), eps, std::nullopt, options.int8_backward());
  }
  if (!state_.qweight_current(weight, qweight)) generate_quantized_weight(false);
  return ops::q4_linear(x, bias_a, qweight, scale_a, scale_w, eps);
}

void Q4LinearImpl::load(torch::serialize::InputArchive& archive) {
  const bool was_released = weight_released();
  detail::check_archive(archive, "lowbit::nn::Q4Linear", {options.out_channels(), options.in_channels()}, {options.out_channels(), (options.in_channels() + 1) / 2}, options.in_channels());
  torch::nn::Module::load(archive);
  state_.after_load(weight, qweight, was_released);
}

std::shared_ptr<torch::nn::Module> Q4LinearImpl::clone(const std::optional<torch::Device>& device) const {
  auto copy = torch::nn::Cloneable<Q4LinearImpl>::clone(device);
  auto& c = static_cast<Q4LinearImpl&>(*copy);
  c.state_.after_clone(state_, state_.qweight_current(weight, qweight), c.weight);
  return copy;
}

void Q4LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "lowbit::nn::Q4Linear(in_channels=" << options.in_channels()
         << ", out_channels=" << options.out_channels() << ", dtype=" << options.dtype() << ")";
}

}  // namespace lowbit::nn

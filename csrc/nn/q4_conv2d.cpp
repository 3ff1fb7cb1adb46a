// lowbit::nn::Q4Conv2d: state only; the lifecycle is the shared detail::QatState and every number comes
// from the lowbit ops, as in python/lowbit/nn/q4_conv2d.py (+ q4_base.py, qat_base.py).
#include "lowbit/nn/q4_conv2d.h"

#include <torch/nn/init.h>
#include <torch/torch.h>

#include <cmath>

#include "lowbit/ops.h"

namespace lowbit::nn {

namespace {
bool all_at_least(const torch::ExpandingArray<2>& a, int64_t minimum) {
  return a->at(0) >= minimum && a->at(1) >= minimum;
}
}  // namespace

Q4Conv2dImpl::Q4Conv2dImpl(const Q4Conv2dOptions& options_) : options(options_) { reset(); }

void Q4Conv2dImpl::reset() {
  const auto& o = options;
  detail::check_qat_options("Q4Conv2d", o.in_channels(), o.out_channels(), o.a_bit(), o.w_bit(), 4, o.dtype());
  TORCH_CHECK(all_at_least(o.kernel_size(), 1), "Q4Conv2d: kernel_size must be >= 1, got ", o.kernel_size());
  TORCH_CHECK(all_at_least(o.stride(), 1), "Q4Conv2d: stride must be >= 1, got ", o.stride());
  TORCH_CHECK(all_at_least(o.padding(), 0), "Q4Conv2d: padding must be >= 0, got ", o.padding());
  TORCH_CHECK(all_at_least(o.dilation(), 1), "Q4Conv2d: dilation must be >= 1, got ", o.dilation());
  TORCH_CHECK(o.groups() >= 1 && o.in_channels() % o.groups() == 0 && o.out_channels() % o.groups() == 0,
              "Q4Conv2d: groups=", o.groups(), " must be positive and divide in_channels=", o.in_channels(),
              " and out_channels=", o.out_channels());
  const auto k = o.kernel_size();
  detail::register_qat_state(*this, {o.out_channels(), o.in_channels() / o.groups(), k->at(0), k->at(1)},
                             o.in_channels(), o.dtype(), o.device(), {weight, bias_a, scale_a, scale_w, eps, qweight});
  state_.reset();
}

void Q4Conv2dImpl::prepare_params() {
  if (weight_released()) return;  // scale_w belongs to the qweight now
  torch::NoGradGuard no_grad;
  scale_w.copy_(detail::q4_weight_scale(weight, eps));
  state_.set_scale_w_ready();
}

const torch::Tensor& Q4Conv2dImpl::prepared_scale_w() {
  if (!state_.scale_w_ready()) prepare_params();
  return scale_w;
}

torch::Tensor Q4Conv2dImpl::set_activation(const torch::Tensor& x) {
  state_.init_scale_a(scale_a, x);
  return x + bias_a.view({1, -1, 1, 1});
}

void Q4Conv2dImpl::generate_quantized_weight(bool qweight_only) {
  if (state_.weight_gone(weight, qweight)) return;
  // Codes in OHWI order, so the int4 pairs run along the input channels (the GEMM's K, contiguous per
  // kernel tap): (O, kh, kw, ceil((C/groups)/2)).
  const auto ohwi = weight.detach().permute({0, 2, 3, 1}).contiguous();
  state_.store_qweight(weight, qweight, detail::q4_pack_weight(ohwi, prepared_scale_w(), eps), qweight_only);
}

torch::Tensor Q4Conv2dImpl::conv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& s_w) const {
  return ops::q4_conv2d(x, bias_a, w, scale_a, s_w, eps, *options.stride(), *options.padding(), *options.dilation(),
                        options.groups());
}

torch::Tensor Q4Conv2dImpl::forward(const torch::Tensor& x) {
  // The input's fault in the input's terms (the op would report a weight or bias_a mismatch).
  TORCH_CHECK(x.defined() && x.dim() == 4 && x.size(1) == options.in_channels(), "lowbit::nn::Q4Conv2d: x must be 4-D "
              "(N, C, H, W) with C = in_channels=", options.in_channels(), ", got shape ",
              x.defined() ? x.sizes() : torch::IntArrayRef{});
  if (is_training()) {
    state_.begin_training_forward(weight, qweight, scale_a, x);
    return conv(x, weight, prepared_scale_w());
  }
  if (!state_.qweight_current(weight, qweight)) generate_quantized_weight(false);
  return conv(x, qweight, scale_w);
}

void Q4Conv2dImpl::load(torch::serialize::InputArchive& archive) {
  const bool was_released = weight_released();
  const auto& o = options;
  const int64_t cg = o.in_channels() / o.groups(), kh = o.kernel_size()->at(0), kw = o.kernel_size()->at(1);
  detail::check_archive(archive, "lowbit::nn::Q4Conv2d", {o.out_channels(), cg, kh, kw},
                        {o.out_channels(), kh, kw, (cg + 1) / 2}, o.in_channels());
  torch::nn::Module::load(archive);
  state_.after_load(weight, qweight, was_released);
}

std::shared_ptr<torch::nn::Module> Q4Conv2dImpl::clone(const std::optional<torch::Device>& device) const {
  auto copy = torch::nn::Cloneable<Q4Conv2dImpl>::clone(device);
  auto& c = static_cast<Q4Conv2dImpl&>(*copy);
  c.state_.after_clone(state_, state_.qweight_current(weight, qweight), c.weight);
  return copy;
}

void Q4Conv2dImpl::pretty_print(std::ostream& stream) const {
  stream << "lowbit::nn::Q4Conv2d(" << options.in_channels() << ", " << options.out_channels()
         << ", kernel_size=" << options.kernel_size() << ", stride=" << options.stride()
         << ", padding=" << options.padding() << ", dilation=" << options.dilation() << ", groups=" << options.groups()
         << ", dtype=" << options.dtype() << ")";
}

}  // namespace lowbit::nn

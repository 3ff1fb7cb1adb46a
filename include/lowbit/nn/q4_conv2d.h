// lowbit::nn::Q4Conv2d: the C++ (libtorch) twin of lowbit.nn.Q4Conv2d, same state and semantics.
//
//   y = s_a * s_w * conv2d(Q(x + bias_a[c]; s_a), Q(W; s_w)),  Q(t; s) = clamp(rne(t / max(s, eps)), -8, 7)
//
// Like torch::nn::Conv2d without an output bias: NCHW input (channels_last accepted), stride, padding
// (zeros, applied to the quantized input), dilation and groups; output (N, O, Ho, Wo) in x's dtype with
// channels_last memory. Gradients: straight-through for x (4-bit clip mask) and the weight, LSQ for
// scale_a, bias_a through the shift. scale_w and scale_a follow Q4Linear (lowbit/nn/q4_linear.h):
// scale_w fixed by prepare_params() (auto-called before the first forward), scale_a from the first
// training input.
//
// Parameters weight (O, C/groups, kh, kw) fp32, bias_a (C,), scale_a () (options.dtype); buffers scale_w ()
// fp32, eps () (options.dtype); qweight int8 (O, kh, kw, ceil((C/groups)/2)) after
// generate_quantized_weight(): int4 pairs along the input channels in OHWI order (docs/formats.md), a
// 0-element placeholder before. The math runs in the lowbit ops; this class only holds state.
#pragma once
#include <torch/expanding_array.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "lowbit/nn/qat_state.h"

namespace lowbit::nn {

struct Q4Conv2dOptions {
  Q4Conv2dOptions(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<2> kernel_size)
      : in_channels_(in_channels), out_channels_(out_channels), kernel_size_(kernel_size) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(torch::ExpandingArray<2>, kernel_size);
  TORCH_ARG(torch::ExpandingArray<2>, stride) = 1;
  TORCH_ARG(torch::ExpandingArray<2>, padding) = 0;
  TORCH_ARG(torch::ExpandingArray<2>, dilation) = 1;
  TORCH_ARG(int64_t, groups) = 1;
  TORCH_ARG(int64_t, a_bit) = 4;  // BIE's signature; only 4 is accepted
  TORCH_ARG(int64_t, w_bit) = 4;
  TORCH_ARG(c10::ScalarType, dtype) = c10::kFloat;  // of bias_a, scale_a, eps
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);
};

class Q4Conv2dImpl : public torch::nn::Cloneable<Q4Conv2dImpl> {
 public:
  Q4Conv2dImpl(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<2> kernel_size)
      : Q4Conv2dImpl(Q4Conv2dOptions(in_channels, out_channels, kernel_size)) {}
  explicit Q4Conv2dImpl(const Q4Conv2dOptions& options);

  void reset() override;  // (re)creates the state, kaiming-uniform weight as nn::Conv2d
  torch::Tensor forward(const torch::Tensor& x);
  // scale_w = max(2*mean|W|/5.6345, eps) from the current weight (no-op once the weight was released).
  void prepare_params();
  // Store qweight (OHWI int4 pairs) from the weight and scale_w (prepared first if it never was); with
  // qweight_only the float weight is released (inference only).
  void generate_quantized_weight(bool qweight_only = false);
  // Initialise scale_a from x if it is still 0; returns x + bias_a over the channel dim.
  torch::Tensor set_activation(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;
  // As Module::load / Cloneable::clone, keeping the lifecycle consistent with the loaded or copied
  // tensors: a loaded or copied scale_w is kept, not re-derived from a trained weight.
  void load(torch::serialize::InputArchive& archive) override;
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;

  // qweight holds codes (not a 0-element placeholder); the float weight was released (qweight_only).
  bool has_qweight() const { return qweight.numel() > 0; }
  bool weight_released() const { return weight.numel() == 0; }

  Q4Conv2dOptions options;
  torch::Tensor weight, bias_a, scale_a, scale_w, eps, qweight;

 private:
  const torch::Tensor& prepared_scale_w();  // scale_w, prepared first if it never was
  torch::Tensor conv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& s_w) const;
  detail::QatState state_{"Q4Conv2d"};      // lazy scale_a, scale_w readiness, qweight validity
};
TORCH_MODULE(Q4Conv2d);

}  // namespace lowbit::nn

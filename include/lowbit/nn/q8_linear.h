// lowbit::nn::Q8Linear: the C++ (libtorch) twin of lowbit.nn.Q8Linear, same state and semantics.
//
//   y = s_a * s_w * (Q(x + bias_a; s_a) . Q(W; s_w)^T),  Q(t; s) = clamp(rne(t / max(s, eps)), -128, 127)
//
// Parameters weight (out, in) fp32, bias_a (in,), scale_a () (options.dtype); buffers scale_w () fp32,
// eps () (options.dtype); qweight (out, in) int8 after generate_quantized_weight() (a 0-element
// placeholder before: libtorch modules cannot unregister state). Names match BIE's
// state-dict keys. The math runs in the lowbit ops (lowbit/ops.h); this class only holds state.
#pragma once
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "lowbit/nn/qat_state.h"

namespace lowbit::nn {

struct Q8LinearOptions {
  Q8LinearOptions(int64_t in_channels, int64_t out_channels) : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(int64_t, a_bit) = 8;
  TORCH_ARG(int64_t, w_bit) = 8;
  TORCH_ARG(c10::ScalarType, dtype) = c10::kFloat;  // of bias_a, scale_a, eps
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);
  // Backward's input gradient on the int8 GEMM (output gradient quantized per row, SwitchBack); the
  // weight gradient stays float. Default: float backward.
  TORCH_ARG(bool, int8_backward) = false;
};

class Q8LinearImpl : public torch::nn::Cloneable<Q8LinearImpl> {
 public:
  Q8LinearImpl(int64_t in_channels, int64_t out_channels) : Q8LinearImpl(Q8LinearOptions(in_channels, out_channels)) {}
  explicit Q8LinearImpl(const Q8LinearOptions& options);

  void reset() override;                 // (re)creates the state, kaiming-uniform weight as nn::Linear
  torch::Tensor forward(const torch::Tensor& x);
  void prepare_params() {}               // Q8: nothing to derive
  // Freeze scale_w, store qweight; with qweight_only the float weight is released (inference only).
  void generate_quantized_weight(bool qweight_only = false);
  // Initialise scale_a from x if it is still 0; returns x + bias_a (BIE's helper).
  torch::Tensor set_activation(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;
  // As Module::load / Cloneable::clone, keeping the lifecycle state consistent with the loaded or
  // copied tensors (a loaded qweight stays valid for the loaded weight).
  void load(torch::serialize::InputArchive& archive) override;
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;

  // qweight holds codes (not a 0-element placeholder); the float weight was released (qweight_only).
  bool has_qweight() const { return qweight.numel() > 0; }
  bool weight_released() const { return weight.numel() == 0; }

  Q8LinearOptions options;
  torch::Tensor weight, bias_a, scale_a, scale_w, eps, qweight;

 private:
  detail::QatState state_{"Q8Linear"};  // lazy scale_a, qweight validity (lowbit/nn/qat_state.h)
};
TORCH_MODULE(Q8Linear);

}  // namespace lowbit::nn

// lowbit::nn::Q4Linear: the C++ (libtorch) twin of lowbit.nn.Q4Linear (BIE: Q4LinearCutlass), same state
// and semantics.
//
//   y = s_a * s_w * (Q(x + bias_a; s_a) . Q(W; s_w)^T),  Q(t; s) = clamp(rne(t / max(s, eps)), -8, 7)
//
// * scale_w = max(2*mean|W| / 5.6345, eps) is fixed by prepare_params() (BIE's rule), not per step; if
//   nobody calls it, the first forward does (BIE would compute with scale_w = 1, rounding every weight
//   to 0). Call it again after changing the weight by hand.
// * scale_a starts at 0 and is set on the first training forward to 2*mean|x|/sqrt(127) (BIE's constant
//   for every width), then learned (LSQ).
// * qweight: int8 (out, ceil(in/2)) holding int4 pairs (pack_s4: first code in the high nibble) after
//   generate_quantized_weight(), a 0-element placeholder before (libtorch modules cannot unregister
//   state). Remade in eval when the weight changed in place; dropped when training resumes.
//
// Parameters weight (out, in) fp32, bias_a (in,), scale_a () (options.dtype); buffers scale_w () fp32,
// eps () (options.dtype), qweight. Names match BIE's state-dict keys. The math runs in the lowbit ops
// (lowbit/ops.h); this class only holds state.
#pragma once
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "lowbit/nn/qat_state.h"

namespace lowbit::nn {

struct Q4LinearOptions {
  Q4LinearOptions(int64_t in_channels, int64_t out_channels) : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(int64_t, a_bit) = 4;  // BIE's signature; only 4 is accepted
  TORCH_ARG(int64_t, w_bit) = 4;
  TORCH_ARG(c10::ScalarType, dtype) = c10::kFloat;  // of bias_a, scale_a, eps
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);
  // Backward's input gradient on the int8 GEMM (output gradient quantized per row, SwitchBack); the
  // weight gradient stays float. Default: float backward.
  TORCH_ARG(bool, int8_backward) = false;
};

class Q4LinearImpl : public torch::nn::Cloneable<Q4LinearImpl> {
 public:
  Q4LinearImpl(int64_t in_channels, int64_t out_channels) : Q4LinearImpl(Q4LinearOptions(in_channels, out_channels)) {}
  explicit Q4LinearImpl(const Q4LinearOptions& options);

  void reset() override;  // (re)creates the state, kaiming-uniform weight as nn::Linear
  torch::Tensor forward(const torch::Tensor& x);
  // scale_w = max(2*mean|W|/5.6345, eps) from the current weight (no-op once the weight was released).
  void prepare_params();
  // Store qweight from the weight and scale_w (prepared first if it never was); with qweight_only the
  // float weight is released (inference only).
  void generate_quantized_weight(bool qweight_only = false);
  // Initialise scale_a from x if it is still 0; returns x + bias_a (BIE's helper).
  torch::Tensor set_activation(const torch::Tensor& x);
  void pretty_print(std::ostream& stream) const override;
  // As Module::load / Cloneable::clone, keeping the lifecycle consistent with the loaded or copied
  // tensors: a loaded or copied scale_w is kept, not re-derived from a trained weight.
  void load(torch::serialize::InputArchive& archive) override;
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;

  // qweight holds codes (not a 0-element placeholder); the float weight was released (qweight_only).
  bool has_qweight() const { return qweight.numel() > 0; }
  bool weight_released() const { return weight.numel() == 0; }

  Q4LinearOptions options;
  torch::Tensor weight, bias_a, scale_a, scale_w, eps, qweight;

 private:
  const torch::Tensor& prepared_scale_w();  // scale_w, prepared first if it never was
  detail::QatState state_{"Q4Linear"};      // lazy scale_a, scale_w readiness, qweight validity
};
TORCH_MODULE(Q4Linear);

}  // namespace lowbit::nn

// lowbit::nn::detail::QatState: the lifecycle bookkeeping every quantization-aware C++ module shares
// (Q8Linear, Q4Linear, Q4Conv2d), the C++ counterpart of python/lowbit/nn/qat_base.py's QATBase:
//   * scale_a starts at 0 and is set from the first training input (lazy LSQ init, one host read);
//   * qweight is a frozen copy of the weight's codes, valid only for the weight version it was made
//     from: dropped when training resumes, remade in eval when the weight changed in place;
//   * the float weight may be released (qweight_only), after which the module is inference-only;
//   * 4-bit modules: scale_w is derived once (prepare_params), not per step.
// "Absent" tensors are 0-element placeholders swapped in place: libtorch modules cannot unregister
// state. No numerics here beyond calling lowbit ops; each module supplies its own quantizer.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>

namespace lowbit::nn::detail {

// BIE initialises the activation step with 2*mean|x|/sqrt(127) for every width (4-bit included).
inline constexpr double kActInitQmax = 127.0;
// BIE's 4-bit weight step: max(2*mean|W| / 5.6345, eps). lsq_scale divides by sqrt(qmax), so this qmax
// reproduces the constant (python/lowbit/nn/q4_base.py: Q4_WEIGHT_SCALE_QMAX).
inline constexpr double kQ4WeightScaleQmax = 5.6345 * 5.6345;

// The options every QAT module checks: positive channel counts, a_bit == w_bit == bits (the only width
// the module computes with), a float dtype for bias_a / scale_a / eps.
void check_qat_options(const char* layer, int64_t in_channels, int64_t out_channels, int64_t a_bit, int64_t w_bit,
                       int64_t bits, c10::ScalarType dtype);

// Registers BIE's state on module m: parameters weight (weight_shape, fp32, kaiming-uniform as
// nn::Linear / nn::Conv2d), bias_a (in_channels,) and scale_a () in dtype; buffers scale_w () fp32 = 1,
// eps () in dtype = 1e-5, and qweight (absent: a 0-element int8 placeholder until generated).
struct QatTensors {
  torch::Tensor &weight, &bias_a, &scale_a, &scale_w, &eps, &qweight;
};
void register_qat_state(torch::nn::Module& m, torch::IntArrayRef weight_shape, int64_t in_channels,
                        c10::ScalarType dtype, c10::Device device, QatTensors out);

// Checks a checkpoint before Module::load copies it in (InputArchive would take any shape): weight of
// weight_shape (or 0 elements: released by a qweight-only export), bias_a (in_channels,), one-element
// scale_a / scale_w / eps (finite; scale_w and eps > 0), floating dtypes, and qweight int8 of
// qweight_shape (or 0 elements: absent; then the weight must be there). A c10::Error names the key, the
// expected and the archived shape or dtype; the module is left untouched.
void check_archive(torch::serialize::InputArchive& archive, const char* layer, torch::IntArrayRef weight_shape,
                   torch::IntArrayRef qweight_shape, int64_t in_channels);

// Present = not a 0-element placeholder.
inline bool present(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

// Swap t for a 0-element tensor of its dtype and device, in place (module state keeps its identity).
void make_absent(torch::Tensor& t);

// lsq_scale(W, 5.6345^2, eps): the Q4 weight step (ops call on the detached weight).
torch::Tensor q4_weight_scale(const torch::Tensor& weight, const torch::Tensor& eps);
// pack_s4(quantize_s8(w, none, scale_w, eps, -8, 7)): the frozen Q4 qweight of a weight already in
// code order (the packing runs along its last dim).
torch::Tensor q4_pack_weight(const torch::Tensor& weight_in_code_order, const torch::Tensor& scale_w,
                             const torch::Tensor& eps);

class QatState {
 public:
  explicit QatState(const char* layer) : layer_(layer) {}

  // Forget everything derived from the weights (module reset()).
  void reset();

  // scale_a = lsq_scale(x, 127) if scale_a is still 0; checked once, since it costs a host read.
  void init_scale_a(const torch::Tensor& scale_a, const torch::Tensor& x);

  // The training forward's preamble: the float weight must be present (error otherwise), scale_a is
  // initialised from x, and a qweight is dropped, since it goes stale with the first optimiser step.
  void begin_training_forward(const torch::Tensor& weight, torch::Tensor& qweight, const torch::Tensor& scale_a,
                              const torch::Tensor& x);

  // generate_quantized_weight's first step: true when the float weight was released, so there is
  // nothing to quantize (an error when no qweight is left either); the caller then returns.
  bool weight_gone(const torch::Tensor& weight, const torch::Tensor& qweight) const;

  // Install codes as qweight, made from weight's current version; qweight_only releases the weight.
  void store_qweight(torch::Tensor& weight, torch::Tensor& qweight, const torch::Tensor& codes, bool qweight_only);

  // qweight exists and matches the weight (made from its current version, or the weight released).
  bool qweight_current(const torch::Tensor& weight, const torch::Tensor& qweight) const;

  // 4-bit modules: whether scale_w was derived (prepare_params) or loaded; set by the module.
  bool scale_w_ready() const { return scale_w_ready_; }
  void set_scale_w_ready() { scale_w_ready_ = true; }

  // After Module::load: the archive's scale_w is authoritative (not re-derived from a trained weight),
  // a loaded qweight belongs to the loaded weight, scale_a is re-checked. A released (0-element) weight
  // stops requiring grad; one loaded into a module whose weight had been released is trainable again.
  void after_load(const torch::Tensor& weight, const torch::Tensor& qweight, bool weight_was_released);
  // After Cloneable::clone (which calls reset() on the copy): keep what the source knew; a qweight that
  // was current in the source is current for the copy's weight.
  void after_clone(const QatState& source, bool source_qweight_current, const torch::Tensor& weight);

 private:
  const char* layer_;              // for messages: "Q4Linear", ...
  bool scale_a_ready_ = false;     // scale_a known non-zero
  bool scale_w_ready_ = false;     // 4-bit: scale_w derived or loaded
  int64_t qweight_version_ = -1;   // weight._version() when qweight was made; -1: none
};

}  // namespace lowbit::nn::detail

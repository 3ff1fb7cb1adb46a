// Shared helpers of the op floor: argument checks with messages that name op, argument, rule and
// actual value; torch dtype -> kernel DType; kernel Status -> TORCH_CHECK; the current CUDA stream.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>

#include "lowbit/kernels/common.h"

#ifdef LOWBIT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace lowbit::ops {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The float dtypes the kernels take (activations, outputs): fp32, fp16, bf16.
inline DType kernel_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", arg, " must be float32, float16 or bfloat16, got ", t);
  return DType::kFloat32;
}

inline void check_status(const Status& s, const char* op) {
  TORCH_CHECK(s.is_ok(), op, ": kernel error: ", s.message);
}

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " is undefined (None)");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", arg,
              " must be a float32, float16 or bfloat16 tensor, got dtype ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* op, const char* arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on the same device");
}

// A scalar parameter (scale, eps): one element, floating point, same device as `ref`.
inline void check_scalar(const at::Tensor& s, const at::Tensor& ref, const char* ref_name, const char* op,
                         const char* arg) {
  TORCH_CHECK(s.defined(), op, ": ", arg, " is undefined (None)");
  TORCH_CHECK(s.sym_numel() == 1, op, ": ", arg, " must hold exactly one element, got shape ", s.sym_sizes());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), op, ": ", arg, " must be a floating-point tensor, got ",
              s.scalar_type());
  check_same_device(ref, ref_name, s, op, arg);
}

// t as float32. Calls aten::to only for a real conversion: aten::to returns its input unchanged when
// the dtype already matches, which the dispatcher's schema checks forbid below autograd.
inline at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

// t in dtype dt, calling aten::to only for a real conversion (same reason as as_float).
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// s_eff = max(fp32(scale), fp32(eps)) as one fp32 element on the device of `scale` (no host round trip).
inline at::Tensor clamp_scale(const at::Tensor& scale, const at::Tensor& eps) {
  return at::maximum(as_float(scale.detach()).reshape({}), as_float(eps.detach()).reshape({}));
}

// Host-side value checks need a device sync on CUDA; they are skipped while a CUDA graph is captured
// (a sync is illegal there) and for Meta tensors.
inline bool can_read_on_host(const at::Tensor& t) {
  if (t.is_meta()) return false;
#ifdef LOWBIT_WITH_CUDA
  if (t.is_cuda() && at::cuda::currentStreamCaptureStatusMayInitCtx() != at::cuda::CaptureStatus::None)
    return false;
#endif
  return true;
}

// A quantizer step s_eff = max(scale, eps) must be finite and > 0: NaN/inf scales (a diverged LSQ
// step, a corrupt checkpoint) are an error, never silently propagated. One host read of s_eff.
inline void check_step(const at::Tensor& s_eff, const at::Tensor& scale, const at::Tensor& eps, const char* op,
                       const char* scale_name) {
  if (!can_read_on_host(s_eff)) return;
  const float s = s_eff.item<float>();
  if (std::isfinite(s) && s > 0.f) return;
  const double sv = scale.detach().to(at::kDouble).reshape({}).item<double>();
  const double ev = eps.detach().to(at::kDouble).reshape({}).item<double>();
  TORCH_CHECK(false, op, ": the quantization step max(", scale_name, ", eps) must be finite and > 0, got ",
              scale_name, "=", sv, ", eps=", ev);
}

// The state every QAT op shares: the shift bias_a (channels,), the weight on x's device, the scalars
// scale_a, scale_w, eps.
inline void check_qat_state(const at::Tensor& x, const at::Tensor& bias_a, c10::SymInt channels,
                            const at::Tensor& weight, const at::Tensor& scale_a, const at::Tensor& scale_w,
                            const at::Tensor& eps, const char* op) {
  check_float_tensor(bias_a, op, "bias_a");
  TORCH_CHECK(bias_a.dim() == 1 && bias_a.sym_size(0) == channels, op, ": bias_a must have shape (", channels,
              ",), got ", bias_a.sym_sizes());
  check_same_device(x, "x", weight, op, "weight");
  check_same_device(x, "x", bias_a, op, "bias_a");
  check_scalar(scale_a, x, "x", op, "scale_a");
  check_scalar(scale_w, x, "x", op, "scale_w");
  check_scalar(eps, x, "x", op, "eps");
}

// The optional output bias of a layer with `channels` outputs: float, (channels,), on x's device.
inline void check_output_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, c10::SymInt channels,
                              const char* op) {
  if (!bias.has_value() || !bias->defined()) return;
  check_float_tensor(*bias, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == channels, op, ": bias must have shape (", channels,
              ",), got ", bias->sym_sizes());
  check_same_device(x, "x", *bias, op, "bias");
}

#ifdef LOWBIT_WITH_CUDA
inline CUstream_st* current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

}  // namespace lowbit::ops

// The weight bundle of the wq ops (weight-only quantized linear layers): the op arguments checked
// (dtypes, shapes, devices), made contiguous, and described for the kernels (lowbit/kernels/wq.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "lowbit/kernels/wq.h"

namespace lowbit::ops {

struct WqTensors {
  WqTensors(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
            const at::Tensor& g_idx, const std::optional<at::Tensor>& perm,
            const std::optional<at::Tensor>& channel_scale, at::IntArrayRef seg_bits, at::IntArrayRef seg_rows,
            bool asym);

  const char* op;
  int64_t K = 0, N = 0;
  at::Tensor qweight, scales, zeros, g_idx, perm, channel_scale;  // contiguous; perm / channel_scale may be undefined
  WqWeight desc;                                                   // points into the tensors above
};

}  // namespace lowbit::ops

"""Q8Linear: int8 weights and activations, quantization-aware training (BIE: Q8LinearCutlass)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .qat_base import LinearShape, QATBase


class Q8Linear(LinearShape, QATBase):
    """Linear layer with 8-bit weights and activations, trained with LSQ (Esser et al., 2020).

    ``y = s_a * s_w * (Q(x + bias_a; s_a) @ Q(W; s_w).T)`` with ``Q(t; s) = clamp(rne(t / max(s, eps)),
    -128, 127)``, int32 accumulation, output in x's dtype (float32/float16/bfloat16), any leading dims.

    * ``scale_a`` starts at 0 and is set on the first forward (training or eval) to ``2*mean|x|/sqrt(127)``,
      then learned (LSQ gradient, clipped terms kept).
    * Training: ``s_w = max(2*mean|W|/sqrt(127), eps)`` from the current weight at every forward;
      gradients reach ``weight`` straight through the quantizer.
    * Eval: uses ``qweight`` (int8 codes) and the frozen ``scale_w``, made by
      :meth:`generate_quantized_weight` (automatically, and again whenever the weight changed), so
      eval output equals training output exactly on the same device.

    Args match BIE's ``Q8LinearCutlass``: ``(in_channels, out_channels, a_bit=8, w_bit=8, device=None,
    dtype=torch.float)``; ``dtype`` is that of ``bias_a``, ``scale_a`` and ``eps``. ``int8_backward=True``
    runs the backward's input-gradient GEMM on int8 (output gradient quantized per row, SwitchBack); the
    weight gradient stays float. Its accuracy and speed: docs/ops.md, docs/PERFORMANCE.md.
    """

    _bits, _qmin, _qmax = 8, -128, 127
    _act_init_qmax = 127.0

    def __init__(self, in_channels: int, out_channels: int, a_bit: int = 8, w_bit: int = 8, device=None,
                 dtype: torch.dtype = torch.float, bias: bool = False, int8_backward: bool = False) -> None:
        super().__init__(in_channels, out_channels, a_bit, w_bit, device=device, dtype=dtype, bias=bias)
        self._set_int8_backward(int8_backward)

    def _qweight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels)

    def _weight_scale(self) -> Tensor:
        return ops.lsq_scale(self.weight, float(self._qmax), self.eps)

    def _quantize_weight(self, weight: Tensor, scale_w: Tensor) -> Tensor:
        # No host check of the step (a device sync inside the first eval forward): it comes from the weight
        # (>= eps) or a checked load, and an invalid one makes the output NaN through qat_alpha anyway.
        return ops.quantize_s8(weight, None, scale_w, self.eps, self._qmin, self._qmax, check_step=False)

    def _forward_op(self, x: Tensor, weight: Tensor, scale_w: Tensor) -> Tensor:
        return ops.q8_linear(x, self.bias_a, weight, self.scale_a, scale_w, self.eps, self.bias, self.int8_backward)

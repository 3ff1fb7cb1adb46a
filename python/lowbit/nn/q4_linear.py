"""Q4Linear: 4-bit weights and activations, quantization-aware training (BIE: Q4LinearCutlass)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .q4_base import Q4Base
from .qat_base import LinearShape


class Q4Linear(LinearShape, Q4Base):
    """Linear layer with 4-bit weights and activations, trained with LSQ.

    ``y = s_a * s_w * (Q(x + bias_a; s_a) @ Q(W; s_w).T)``, ``Q(t; s) = clamp(rne(t / max(s, eps)), -8, 7)``,
    int32 accumulation, output in x's dtype (fp32/fp16/bf16, forward and backward), any leading dims and
    any batch size.

    * ``scale_w`` is fixed by :meth:`prepare_params` (``2*mean|W|/5.6345``, BIE's rule), not per step.
    * ``scale_a`` starts at 0, is set on the first forward (training or eval) to ``2*mean|x|/sqrt(127)`` (BIE's
      constant), then learned.
    * ``qweight`` is int8 of shape (out, ceil(in/2)): int4 pairs, first code in the high nibble.

    Args as BIE's ``Q4LinearCutlass``: ``(in_channels, out_channels, a_bit=4, w_bit=4, device=None,
    dtype=torch.float)``. ``int8_backward=True``: the input gradient's GEMM on int8, as in :class:`Q8Linear`.
    """

    def __init__(self, in_channels: int, out_channels: int, a_bit: int = 4, w_bit: int = 4, device=None,
                 dtype: torch.dtype = torch.float, bias: bool = False, int8_backward: bool = False) -> None:
        super().__init__(in_channels, out_channels, a_bit, w_bit, device=device, dtype=dtype, bias=bias)
        self._set_int8_backward(int8_backward)

    def _qweight_shape(self) -> tuple:
        return (self.out_channels, (self.in_channels + 1) // 2)

    def _forward_op(self, x: Tensor, weight: Tensor, scale_w: Tensor) -> Tensor:
        return ops.q4_linear(x, self.bias_a, weight, self.scale_a, scale_w, self.eps, self.bias, self.int8_backward)

"""Q4Conv2d: 4-bit weights and activations 2-D convolution, quantization-aware training
(BIE: Q4Conv2dCutlass, whose forward was not a convolution; this one is)."""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

from .. import ops
from .q4_base import Q4Base

IntPair = Union[int, Tuple[int, int]]


def _pair(name: str, v: IntPair, minimum: int) -> Tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 2 or any(not isinstance(e, int) or isinstance(e, bool) or e < minimum for e in t):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return t


class Q4Conv2d(Q4Base):
    """``y = s_a * s_w * conv2d(Q(x + bias_a[c]), Q(W)) (+ bias)`` with 4-bit codes, like ``nn.Conv2d``.

    NCHW input (channels_last accepted), any H and W, stride / padding / dilation as ints or pairs,
    ``groups``. Padding pads the quantized input with zeros. The output is (N, O, Ho, Wo) in x's dtype
    with channels_last memory. ``qweight`` is int8 (O, kh, kw, ceil((C/groups)/2)): int4 pairs along the
    input channels in OHWI order (docs/formats.md). Gradients: straight-through for x (4-bit clip mask)
    and the weight, LSQ for ``scale_a``, ``bias_a`` through the shift. ``scale_w`` as in Q4Linear.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, a_bit: int = 4, w_bit: int = 4,
                 device=None, dtype: torch.dtype = torch.float, bias: bool = False) -> None:
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.groups = groups
        super().__init__(in_channels, out_channels, a_bit, w_bit, device=device, dtype=dtype,
                         weight_shape=(out_channels, in_channels // groups, *self.kernel_size), bias=bias)

    def constructor_args(self) -> dict:
        return {**super().constructor_args(), "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation), "groups": self.groups}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")

    def _qweight_shape(self) -> tuple:
        cg = self.in_channels // self.groups
        return (self.out_channels, *self.kernel_size, (cg + 1) // 2)

    def _weight_codes_layout(self, weight: Tensor) -> Tensor:
        return weight.permute(0, 2, 3, 1).contiguous()  # OIHW -> OHWI: packed along input channels

    def _forward_op(self, x: Tensor, weight: Tensor, scale_w: Tensor) -> Tensor:
        return ops.q4_conv2d(x, self.bias_a, weight, self.scale_a, scale_w, self.eps, self.stride, self.padding,
                             self.dilation, self.groups, self.bias)

    def set_activation(self, x: Tensor) -> Tensor:
        """Initialise ``scale_a`` from x if it is still 0; return x + bias_a over the channel dim."""
        self._init_scale_a(x)
        return x + self.bias_a.view(1, -1, 1, 1)

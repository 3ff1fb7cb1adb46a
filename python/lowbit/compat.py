"""Bitorch Engine (BIE) names for lowbit layers: same constructors, same state-dict keys.

``from lowbit.compat import Q8LinearCutlass`` is a drop-in for BIE's class of that name; where lowbit
fixes a BIE defect the behaviour differs as listed in docs/compat.md."""
from __future__ import annotations

import torch

from .nn import MBWQLinear, MPQLinear, Q4Conv2d, Q4Linear, Q4MatMul, Q8Linear
from .tools import prepare_layers

Q8LinearCutlass = Q8Linear
Q4LinearCutlass = Q4Linear
prepare_bie_layers = prepare_layers
# Weight-only layers: one class serves CUDA, CPU (and MLX's layout through to_mlx / from_mlx).
MPQLinearCuda = MPQLinear
MPQLinearMlx = MPQLinear
MBWQLinearCuda = MBWQLinear


class Q4Conv2dCutlass(Q4Conv2d):
    """BIE's positional order: ``(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
    a_bit=4, w_bit=4, device=None, dtype=torch.float)``; ``groups`` is keyword-only here.

    Loading: a ``qweight`` in BIE's own layout (its I-15, the OIHW codes cut into rows of C) is converted
    to lowbit's OHWI packing, also in a qweight-only state dict without lowbit's version marker (BIE's
    checkpoints); ``state_dict()`` writes lowbit's layout (docs/formats.md)."""

    _unmarked_qweight_is_bie = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, a_bit=4, w_bit=4,
                 device=None, dtype=torch.float, *, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, a_bit, w_bit,
                         device=device, dtype=dtype)


__all__ = ["Q8LinearCutlass", "Q4LinearCutlass", "Q4Conv2dCutlass", "Q4MatMul", "prepare_bie_layers", "MPQLinearCuda",
           "MPQLinearMlx", "MBWQLinearCuda"]

"""What the 4-bit QAT layers (Q4Linear, Q4Conv2d) share beyond QATBase: a weight step fixed by
``prepare_params()`` (BIE's rule) and the int4-pair ``qweight``."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .qat_base import QATBase

# BIE's Q4 weight-scale rule: scale_w = max(2*mean|W| / 5.6345, eps), 5.6345 = sqrt(31.7476...).
# lsq_scale divides by sqrt(qmax), so qmax = 5.6345**2 reproduces the constant.
Q4_WEIGHT_SCALE_QMAX = 5.6345 ** 2


class Q4Base(QATBase):
    _bits, _qmin, _qmax = 4, -8, 7
    _act_init_qmax = 127.0  # BIE initialises the 4-bit activation step with the 8-bit constant sqrt(127)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._scale_w_ready = False  # scale_w derived from the weight (prepare_params) or loaded

    def prepare_params(self) -> None:
        """Derive ``scale_w = max(2*mean|W|/5.6345, eps)`` from the current weight (BIE's rule). Call it
        after changing the weight by hand. If nobody did, the first forward derives it too, but only while
        ``scale_w`` still holds its initial 1 (BIE would compute with 1, rounding every weight to 0): a
        step written into ``scale_w`` by hand is used as BIE uses it."""
        if self.weight is None:
            return
        self.scale_w.copy_(ops.lsq_scale(self.weight.detach(), Q4_WEIGHT_SCALE_QMAX, self.eps))
        self._scale_w_ready = True

    def _weight_scale(self) -> Tensor:
        if not self._scale_w_ready:
            if self.weight is not None:
                # On the device (no host read: the first forward may be captured or compiled).
                fresh = ops.lsq_scale(self.weight.detach(), Q4_WEIGHT_SCALE_QMAX, self.eps)
                self.scale_w.copy_(torch.where(self.scale_w == 1, fresh, self.scale_w))
            self._scale_w_ready = True
        return self.scale_w

    def _quantize_weight(self, weight: Tensor, scale_w: Tensor) -> Tensor:
        # No host check of the step (as Q8Linear's): it comes from prepare_params or a checked load.
        return ops.pack_s4(ops.quantize_s8(self._weight_codes_layout(weight), None, scale_w, self.eps,
                                           self._qmin, self._qmax, check_step=False))

    def _weight_codes_layout(self, weight: Tensor) -> Tensor:
        """The weight in the element order its codes are packed in."""
        return weight

    def _after_load(self, state_dict, prefix) -> None:
        if prefix + "scale_w" in state_dict:
            self._scale_w_ready = True

"""Q4MatMul: 4-bit quantized batched x @ y^T (attention scores), quantization-aware (BIE: Q4MatMul)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .qat_base import init_step_if_zero


class Q4MatMul(torch.nn.Module):
    """``out = s_x * s_y * (Q(x) @ Q(y).T)`` over the last two dims: x (..., m, k), y (..., n, k) ->
    (..., m, n), batch dims broadcast. ``Q(t; s) = clamp(rne(t / max(s, eps)), -8, 7)``.

    ``x_clip`` and ``y_clip`` start at 0 and are each set from their own operand on the first
    forward (``2*mean|t|/sqrt(127)``, BIE's constant; BIE sets y_clip from x, I-11), then learned (LSQ).
    Gradients: straight-through for x and y with 4-bit clip masks, LSQ for both clips.
    Args as BIE: ``Q4MatMul(dtype=torch.float, device=None)``.
    """

    _qmin, _qmax, _init_qmax = -8, 7, 127.0

    def __init__(self, dtype: torch.dtype = torch.float, device=None, *args, **kwargs) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.x_clip = torch.nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.y_clip = torch.nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.register_buffer("eps", torch.tensor(1e-5, device=device, dtype=dtype))
        self._clips_ready = False

    def constructor_args(self) -> dict:
        """Keyword arguments that rebuild this layer (lowbit.save records them)."""
        return {"dtype": str(self.dtype)}

    def set_activation_scale(self, x: Tensor, y: Tensor) -> None:
        """Initialise each clip that is still 0 from its own operand."""
        if self._clips_ready:
            return
        init_step_if_zero(self.x_clip, x, self._init_qmax)
        init_step_if_zero(self.y_clip, y, self._init_qmax)
        self._clips_ready = True

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        self.set_activation_scale(x, y)  # on the first forward in any mode, as BIE
        return ops.q4_matmul(x, y, self.x_clip, self.y_clip, self.eps)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._clips_ready = False

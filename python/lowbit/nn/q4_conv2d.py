"""Q4Conv2d: 4-bit weights and activations 2-D convolution, quantization-aware training
(BIE: Q4Conv2dCutlass, whose forward was not a convolution; this one is)."""
from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

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
    ``groups``. Padding pads the quantized input with zeros. The output is (N, O, Ho, Wo) in x's dtype,
    in x's memory format as ``nn.Conv2d`` gives it (channels_last for a channels_last x, else contiguous
    NCHW; the kernels compute NHWC, so an NCHW x costs one copy of the output). ``qweight`` is int8 (O, kh, kw, ceil((C/groups)/2)): int4 pairs along the
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

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise RuntimeError(f"{type(self).__name__}: x must be 4-D (N, C, H, W) with C = in_channels="
                               f"{self.in_channels}, got shape {tuple(getattr(x, 'shape', ()))}")

    def _qweight_shape(self) -> tuple:
        cg = self.in_channels // self.groups
        return (self.out_channels, *self.kernel_size, (cg + 1) // 2)

    def _weight_codes_layout(self, weight: Tensor) -> Tensor:
        return weight.permute(0, 2, 3, 1).contiguous()  # OIHW -> OHWI: packed along input channels

    def _forward_op(self, x: Tensor, weight: Tensor, scale_w: Tensor) -> Tensor:
        return ops.q4_conv2d(x, self.bias_a, weight, self.scale_a, scale_w, self.eps, self.stride, self.padding,
                             self.dilation, self.groups, self.bias)

    # State-dict version 2: ``qweight`` in lowbit's OHWI packing. Version 1 (what ``torch.save`` records for
    # BIE's Q4Conv2dCutlass, and for lowbit before this marker) or none (a plain dict) is ambiguous.
    _version = 2
    # Whether a qweight-only state dict without the version marker is read as BIE's layout (the compat
    # class, whose checkpoints are BIE's) or as lowbit's (this class).
    _unmarked_qweight_is_bie = False

    def _bie_qweight_to_ohwi(self, q: Tensor) -> Optional[Tensor]:
        """BIE's conv ``qweight`` (its I-15, spec §8.6): the codes of the OIHW weight, flattened in memory
        order and cut into rows of C, packed in pairs. Returns the same codes repacked in lowbit's OHWI
        layout, or None where BIE could not have written one (groups, or an odd C)."""
        C, (kh, kw) = self.in_channels, self.kernel_size
        if self.groups != 1 or C % 2 or tuple(q.shape) != self._qweight_shape():
            return None
        codes = ops.unpack_s4(q.reshape(-1, C // 2), C).reshape(self.out_channels, C, kh, kw)
        return ops.pack_s4(codes.permute(0, 2, 3, 1).contiguous())

    def _adapt_loaded_qweight(self, state_dict, prefix, local_metadata) -> None:
        """Reads a BIE conv ``qweight`` into lowbit's layout. A state dict marked version 2 is lowbit's. An
        unmarked one that also carries the float weight, ``scale_w`` and ``eps`` is recognised by which
        layout holds Q(weight): BIE's is converted, lowbit's kept, and one matching neither (a stale
        qweight) is dropped with a warning, to be re-derived from the weight. An unmarked qweight-only
        state dict is BIE's for ``lowbit.compat.Q4Conv2dCutlass`` and lowbit's for this class."""
        qkey = prefix + "qweight"
        q = state_dict.get(qkey)
        version = (local_metadata or {}).get("version")
        if not isinstance(q, Tensor) or q.dtype != torch.int8 or (version is not None and version >= 2):
            return
        w, sw, eps = (state_dict.get(prefix + k) for k in ("weight", "scale_w", "eps"))
        if all(isinstance(t, Tensor) for t in (w, sw, eps)) and tuple(w.shape) == self._weight_shape:
            expected = ops.pack_s4(ops.quantize_s8(self._weight_codes_layout(w.detach().float()), None,
                                                   sw.detach().float().reshape(()).to(w.device),
                                                   eps.detach().float().reshape(()).to(w.device), self._qmin,
                                                   self._qmax)).to(q.device)
            if tuple(expected.shape) != tuple(q.shape):
                return  # the shape check of the load reports it
            # Fractions of matching bytes (BIE rounds ties away from zero, lowbit to even: rare exact
            # ties may differ, hence a threshold rather than equality).
            as_bie = self._bie_qweight_to_ohwi(q)
            ours = float((q == expected).float().mean())
            bie = float((as_bie == expected).float().mean()) if as_bie is not None else 0.0
            if max(ours, bie) < 0.99:
                warnings.warn(f"{type(self).__name__}: state_dict[{qkey!r}] matches neither layout of the "
                              "checkpoint's quantized weight; it is dropped and re-derived from the weight")
                del state_dict[qkey]
            elif bie > ours:
                state_dict[qkey] = as_bie
            return
        if self._unmarked_qweight_is_bie:
            as_bie = self._bie_qweight_to_ohwi(q)
            if as_bie is not None:
                state_dict[qkey] = as_bie

    def set_activation(self, x: Tensor) -> Tensor:
        """Initialise ``scale_a`` from x if it is still 0; return x + bias_a over the channel dim."""
        self._init_scale_a(x)
        return x + self.bias_a.view(1, -1, 1, 1)

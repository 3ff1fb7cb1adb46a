"""Shared state and lifecycle of the quantization-aware-training layers (Q8Linear, Q4Linear, Q4Conv2d):
parameters, lazy LSQ activation-scale initialisation, the frozen ``qweight`` and its invalidation, and
state-dict validation. No numerics here: every number comes from ``lowbit.ops``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .base import LowbitLayer

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def init_step_if_zero(step: Tensor, x: Tensor, qmax: float) -> None:
    """BIE's lazy step initialisation: ``step := 2*mean|x|/sqrt(qmax)`` (in step's dtype) where ``step`` is
    still exactly 0, else unchanged. A select on the device, not a host read of ``step``: the first
    forward stays free of device syncs, so it can be captured in a CUDA graph or compiled with
    ``torch.compile(fullgraph=True)``. Callers run it once per layer (and again after a state-dict load)."""
    from .. import ops

    with torch.no_grad():
        fresh = ops.lsq_scale(x.detach(), qmax, None).to(step.dtype)
        step.copy_(torch.where(step.ne(0), step, fresh))


class QATBase(LowbitLayer):
    """A layer computing with Q(x + bias_a) and Q(W), with an LSQ-learned activation step ``scale_a``.

    State (BIE's keys): parameters ``weight`` float32, ``bias_a`` (in_channels,) and ``scale_a`` ()
    in ``dtype``; buffers ``scale_w`` () float32 and ``eps`` () in ``dtype``; after
    :meth:`generate_quantized_weight`, the buffer ``qweight`` (layout per subclass, docs/formats.md)."""

    # Subclasses set these.
    _bits: int = 8
    _qmin: int = -128
    _qmax: int = 127
    # Constant of the activation-scale init 2*mean|x|/sqrt(c); BIE uses sqrt(127) for every width.
    _act_init_qmax: float = 127.0

    def __init__(self, in_channels: int, out_channels: int, a_bit: int, w_bit: int, device=None,
                 dtype: torch.dtype = torch.float, weight_shape: Optional[tuple] = None, bias: bool = False) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        if a_bit != self._bits or w_bit != self._bits:
            raise ValueError(f"{type(self).__name__} computes with {self._bits}-bit weights and activations; "
                             f"got a_bit={a_bit}, w_bit={w_bit}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
        self.a_bit, self.w_bit, self.dtype = a_bit, w_bit, dtype
        self._weight_shape = tuple(weight_shape or (out_channels, in_channels))
        self.weight: Optional[torch.nn.Parameter] = torch.nn.Parameter(
            torch.empty(self._weight_shape, device=device, dtype=torch.float32))
        self.bias_a = torch.nn.Parameter(torch.zeros(in_channels, device=device, dtype=dtype))
        self.scale_a = torch.nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        # Optional float output bias (what nn.Linear/nn.Conv2d's bias becomes under lowbit.convert); BIE's
        # layers have none, so it is off by default and absent from their state dicts.
        self.bias: Optional[torch.nn.Parameter] = (
            torch.nn.Parameter(torch.zeros(out_channels, device=device, dtype=torch.float32)) if bias else None)
        self.register_buffer("scale_w", torch.ones((), device=device, dtype=torch.float32))
        self.register_buffer("eps", torch.tensor(1e-5, device=device, dtype=dtype))
        self.register_buffer("qweight", None)
        self._qweight_version: Optional[int] = None  # weight._version when qweight was made or loaded
        self._scale_a_ready = False  # scale_a known non-zero (checked once: one host read)
        self.reset_parameters()

    def constructor_args(self) -> dict:
        """Keyword arguments that rebuild this layer's structure (lowbit.save records them)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "dtype": str(self.dtype),
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, bits={self._bits}, "
                f"dtype={self.dtype}, qweight={'yes' if self.qweight is not None else 'no'}")

    def _apply(self, fn, recurse=True):
        # scale_w stays float32 through .half() / .to(dtype) (an fp32 buffer, as BIE's): the step an eval
        # layer freezes must be the fp32 step its training forward uses, or eval would differ from train.
        scale_w = self._buffers.get("scale_w")
        super()._apply(fn, recurse)
        moved = self._buffers.get("scale_w")
        if scale_w is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["scale_w"] = scale_w.to(device=moved.device)
        return self

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear

    # ---------------------------------------------------------------- BIE methods
    def prepare_params(self) -> None:
        """Ready the layer after its weights were set or loaded (Q8: nothing to derive)."""

    def set_weight_data(self, x: Tensor) -> None:
        """Replace the float weight (keeps it trainable: BIE freezes it, I-21)."""
        if tuple(x.shape) != self._weight_shape:
            raise ValueError(f"weight must have shape {self._weight_shape}, got {tuple(x.shape)}")
        self.weight = torch.nn.Parameter(x.detach().to(torch.float32).clone())
        self.qweight = None

    def set_quantized_weight_data(self, x: Tensor) -> None:
        """Install precomputed int8 codes as ``qweight`` (with ``scale_w`` already set)."""
        self._check_qweight(x, "qweight")
        self.qweight = x.detach().clone()
        self._qweight_version = self.weight._version if self.weight is not None else None

    def set_activation(self, x: Tensor) -> Tensor:
        """Initialise ``scale_a`` from x if it is still 0, and return the shifted input x + bias_a
        (BIE's helper; forward fuses the shift into the quantizer instead)."""
        self._init_scale_a(x)
        return x + self.bias_a

    @property
    def opt_weight(self) -> Optional[Tensor]:
        """The weight forward uses: float ``weight`` in training, ``qweight`` in eval."""
        return self.weight if self.training else self._eval_qweight()

    @torch.no_grad()
    def generate_quantized_weight(self, qweight_only: bool = False) -> None:
        """Freeze ``scale_w`` from the current weight and store the codes in ``qweight``. With
        ``qweight_only`` the float weight is released: the layer is then inference-only."""
        if self.weight is None:
            if self.qweight is None:
                raise RuntimeError(f"{type(self).__name__}: neither weight nor qweight is present")
            return
        self.scale_w.copy_(self._weight_scale())
        self.qweight = self._quantize_weight(self.weight, self.scale_w)
        self._qweight_version = self.weight._version
        if qweight_only:
            self.weight = None

    def check_parameters(self) -> None:
        """Raise if a scale is not finite or not positive, or qweight has the wrong shape/dtype."""
        for name in ("scale_a", "scale_w", "eps"):
            t = getattr(self, name)
            if not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"{type(self).__name__}: {name} must be finite, got {t.tolist()}")
        if float(self.eps) <= 0 or float(self.scale_w) <= 0:
            raise RuntimeError(f"{type(self).__name__}: eps and scale_w must be > 0, got eps={float(self.eps)}, "
                               f"scale_w={float(self.scale_w)}")
        if self.qweight is not None:
            self._check_qweight(self.qweight, "qweight")

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training:
            if self.weight is None:
                raise RuntimeError(f"{type(self).__name__}: the float weight was released by "
                                   "generate_quantized_weight(qweight_only=True); this layer is inference-only "
                                   "(call .eval())")
            self._init_scale_a(x)
            if self.qweight is not None:
                self.qweight = None  # stale once training resumes (BIE I-3)
            return self._forward_op(x, self.weight, self._weight_scale())
        self._init_scale_a(x)  # a layer evaluated before any training forward: BIE inits on any first forward
        if self.weight is not None and torch.compiler.is_compiling():
            # A compiled graph cannot see the weight's version counter, so a cached qweight could be stale
            # (a weight changed in place after the last eager call): the codes are made from the current
            # weight inside the graph, as eager eval would make them (same op, same step, same bits).
            return self._forward_op(x, self.weight, self._weight_scale())
        return self._forward_op(x, self._eval_qweight(), self.scale_w)

    # ---------------------------------------------------------------- subclass hooks
    def _check_input(self, x: Tensor) -> None:
        """Raise if x cannot be this layer's input (the ops check too, but in terms of the weight)."""

    def _adapt_loaded_qweight(self, state_dict, prefix, local_metadata) -> None:
        """Called first when a state dict is loaded: may rewrite or drop its ``qweight`` in place."""

    def _after_load(self, state_dict, prefix) -> None:
        """Called after a state dict was loaded into this layer."""

    def _weight_scale(self) -> Tensor:
        raise NotImplementedError

    def _quantize_weight(self, weight: Tensor, scale_w: Tensor) -> Tensor:
        raise NotImplementedError

    def _forward_op(self, x: Tensor, weight: Tensor, scale_w: Tensor) -> Tensor:
        raise NotImplementedError

    def _qweight_shape(self) -> tuple:
        raise NotImplementedError

    # ---------------------------------------------------------------- internals
    def _init_scale_a(self, x: Tensor) -> None:
        if self._scale_a_ready:
            return
        init_step_if_zero(self.scale_a, x, self._act_init_qmax)
        self._scale_a_ready = True

    def _eval_qweight(self) -> Tensor:
        stale = self.weight is not None and self.weight._version != self._qweight_version
        if self.qweight is None or stale:
            # Made as a normal tensor even inside torch.inference_mode(): the cached codes outlive the call,
            # and a later eval forward that records autograd (an input gradient) must be able to save them.
            with torch.inference_mode(False):
                self.generate_quantized_weight(qweight_only=False)
        return self.qweight

    def _check_qweight(self, q: Tensor, key: str) -> None:
        if not isinstance(q, Tensor) or q.dtype != torch.int8 or tuple(q.shape) != self._qweight_shape():
            got = f"dtype={q.dtype}, shape={tuple(q.shape)}" if isinstance(q, Tensor) else type(q).__name__
            raise RuntimeError(f"{type(self).__name__}: {key} must be an int8 tensor of shape "
                               f"{self._qweight_shape()}, got {got}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qkey, wkey = prefix + "qweight", prefix + "weight"
        name = type(self).__name__
        self._adapt_loaded_qweight(state_dict, prefix, local_metadata)
        for key in ("scale_a", "scale_w", "eps"):
            t = state_dict.get(prefix + key)
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.numel() != 1 or not t.is_floating_point():
                raise RuntimeError(f"{name}: state_dict[{prefix + key!r}] must be a one-element float tensor, "
                                   f"got {getattr(t, 'shape', type(t))} {getattr(t, 'dtype', '')}")
            if not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"{name}: state_dict[{prefix + key!r}] must be finite, got {t.item()}")
            if key != "scale_a" and float(t) <= 0:
                raise RuntimeError(f"{name}: state_dict[{prefix + key!r}] must be > 0, got {float(t)}")
            if t.dim() != 0:  # BIE writes 0-dim scalars; accept (1,) too
                state_dict[prefix + key] = t.reshape(())
        has_q = qkey in state_dict
        if has_q:
            self._check_qweight(state_dict[qkey], f"state_dict[{qkey!r}]")
            device = self.bias_a.device
            self.qweight = torch.empty(self._qweight_shape(), dtype=torch.int8, device=device)
        if has_q and wkey not in state_dict:
            self.weight = None  # a qweight-only (inference) checkpoint
        if not has_q:
            self.qweight = None  # a training checkpoint: codes made again from its weight when needed
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._after_load(state_dict, prefix)
        self._scale_a_ready = False
        self._qweight_version = (self.weight._version if self.weight is not None else None) if has_q else None
        if not has_q:
            self.qweight = None


class LinearShape:
    """nn.Linear-style aliases and the (out, in) weight layout of the QAT linear layers, and their
    ``int8_backward`` switch (SwitchBack: the input gradient's GEMM on int8, the output gradient quantized
    per row; the weight gradient stays float)."""

    in_channels: int
    out_channels: int
    int8_backward: bool = False

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_channels:
            raise RuntimeError(f"{type(self).__name__}: x must have in_channels={self.in_channels} features in "
                               f"its last dim, got shape {tuple(getattr(x, 'shape', ()))}")

    def _set_int8_backward(self, value) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"int8_backward must be a bool, got {value!r}")
        self.int8_backward = value

    def constructor_args(self) -> dict:
        args = super().constructor_args()  # type: ignore[misc]
        if self.int8_backward:
            args["int8_backward"] = True
        return args

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

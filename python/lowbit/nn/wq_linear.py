"""Weight-only quantized linear layers for LLM inference: ``MPQLinear`` and ``MBWQLinear`` (BIE's
``MPQLinearCuda`` / ``MPQLinearMlx`` / ``MBWQLinearCuda``: same constructors, same checkpoint keys).

Every checkpoint format (GPTQ, GBA asym, GBA sym with double quantization, MBWQ layer-mix and channel-mix;
docs/formats.md) is brought by ``prepare_params()`` into one runtime form that the native kernels take
(``include/lowbit/kernels/wq.h``): packed words, per-group scales and zeros, a group index per stored row,
an optional row permutation and an optional per-channel input scale. The arithmetic (decoding, packing,
quantizing, the matmul) lives in the ``lowbit::wq_*`` operators; this module only keeps the tensors.

Activations: float32, float16 or bfloat16 of any leading shape; the output has the activation's dtype.
Gradients flow to the input (and to an enabled bias); the quantized weight itself is frozen.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .base import LowbitLayer

_ops = torch.ops.lowbit
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Checkpoint keys BIE layers may carry that lowbit's runtime form does not need (dropped on load).
_DQ_KEYS = ("qstatistic", "qzeros_zeros", "qzeros_scales", "qscales_zeros", "qscales_scales", "qscales")
_MBW_WIDTHS = (8, 6, 5, 4, 3, 2)
# The dtypes a checkpoint tensor may have, per key (what BIE, GPTQ writers and green-bit-llm store, plus what
# lowbit itself saves). nn.Module's load would cast anything else into the buffer's dtype, silently changing
# packed bits, codes or indices: such a tensor is refused instead. Float tensors of another float dtype are
# cast to the layer's dtype (as nn.Module does).
_KEY_DTYPES = {
    "qweight": (torch.int32,), "qzeros": (torch.int32,), "g_idx": (torch.int32, torch.int64),
    "q_perm": (torch.int16, torch.int32), "q_groups": (torch.int16, torch.int32),
    "qstatistic": (torch.uint8,), "qscales": (torch.uint8,),
    **{k: _FLOAT_DTYPES for k in ("scales", "zeros", "bias", "channel_scale", "qscales_zeros", "qscales_scales",
                                  "qzeros_zeros", "qzeros_scales")},
}
# Index tensors loaded in the checkpoint's own integer dtype (no wrap-around of an out-of-range value);
# prepare_params() checks their values and converts them to the runtime's int32.
_KEEP_INT_DTYPE = ("g_idx", "q_perm", "q_groups")


def _dtype_names(dtypes) -> str:
    names = [str(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _check_common(cls: str, in_channels: int, out_channels: int, a_bit: int, dtype, requires_grad: bool) -> None:
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"{cls}: in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
    if a_bit != 16:
        raise ValueError(f"{cls}: activations are 16-bit float (a_bit=16), got a_bit={a_bit}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{cls}: dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    if requires_grad:
        raise ValueError(f"{cls}: training the quantized weight (requires_grad=True, BIE's patched-PyTorch "
                         "privileged_grad path) is not supported; use requires_grad=False. Gradients still flow "
                         "to the layer input, so the layer works inside fine-tuned models (e.g. with LoRA).")


class _WqLinearBase(LowbitLayer):
    """Shared runtime: the prepared form and the forward."""

    def _check_finite_params(self) -> None:
        """prepare_params' last check: the scales, zeros and channel scale the kernels will read are finite
        (a NaN or inf would turn whole output columns into NaN without a word). One host read, at prepare."""
        cs = self._buffers.get("channel_scale")
        for key, t in (("scales", self.scales), ("zeros", self._runtime_zeros()), ("channel_scale", cs)):
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{type(self).__name__}: {key} holds {bad} non-finite value(s) (NaN or inf); "
                                 "the checkpoint is corrupt")

    def _init_runtime(self) -> None:
        self._prepared = False
        self._seg_bits: List[int] = []
        self._seg_rows: List[int] = []
        self._asym_rt = False
        self._has_cs = False

    # Runtime tensors are non-persistent buffers so that .to()/.cuda() move them with the layer.
    def _set_rt(self, name: str, value: Optional[Tensor]) -> None:
        if name in self._buffers:
            del self._buffers[name]
        self.register_buffer(name, value, persistent=False)

    def _drop(self, *names: str) -> None:
        for n in names:
            self._buffers.pop(n, None)
            self._parameters.pop(n, None)

    def _runtime_zeros(self) -> Tensor:
        raise NotImplementedError

    def _runtime_g_idx(self) -> Tensor:
        raise NotImplementedError

    def _bias_or_none(self) -> Optional[Tensor]:
        return self._buffers.get("bias")

    def forward(self, x: Tensor) -> Tensor:
        if not self._prepared:
            raise RuntimeError(f"{type(self).__name__}: call prepare_params() after loading the checkpoint and "
                               "before the first forward (lowbit.prepare_layers(model) does every layer)")
        perm = self._buffers.get("_rt_perm")
        cs = self.channel_scale if self._has_cs else None
        return _ops.wq_linear(x, self.qweight, self.scales, self._runtime_zeros(), self._runtime_g_idx(), perm, cs,
                              self._seg_bits, self._seg_rows, self._asym_rt, self._bias_or_none())

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight in nn.Linear layout (out_features, in_features), channel_scale folded in
        (what the layer multiplies by), in ``dtype`` (default: the layer's)."""
        if not self._prepared:
            raise RuntimeError(f"{type(self).__name__}: call prepare_params() first")
        dt = dtype or self.dtype
        w = _ops.wq_dequantize(self.qweight, self.scales, self._runtime_zeros(), self._runtime_g_idx(),
                               self._buffers.get("_rt_perm"), self._seg_bits, self._seg_rows, self._asym_rt, dt)
        if self._has_cs:
            w = (w.float() * self.channel_scale.reshape(-1, 1).float()).to(dt)
        return w.t().contiguous()

    def _warn_dropped_bias(self) -> None:
        b = self._buffers.get("bias")
        if b is not None and self.disable_bias:
            if bool((b != 0).any()):
                warnings.warn(f"{type(self).__name__}: disable_bias=True drops a non-zero bias from the checkpoint; "
                              "construct the layer with disable_bias=False to keep it", stacklevel=3)
            self._drop("bias")

    def _apply(self, fn, *args, **kwargs):
        # .half() / .bfloat16() / .float() / .to(dtype) convert the float buffers: the layer's dtype follows them
        # (set_scales / set_zeros, dequantized_weight() and constructor_args() use it).
        out = super()._apply(fn, *args, **kwargs)
        s = self._buffers.get("scales")
        if s is not None and s.is_floating_point():
            self.dtype = s.dtype
        return out

    def _accepted_dtypes(self, key: str):
        """The dtypes a checkpoint tensor ``key`` may have (None: not checked, e.g. a key this layer drops)."""
        return _KEY_DTYPES.get(key)

    def _adapt_state_dict(self, state_dict, prefix: str, keys):
        """Subclass hook: bring a checkpoint's keys into this layer's layout before loading. Returns the keys
        that are derived at prepare_params() and so are not required in the checkpoint."""
        return ()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "wf", None)  # BIE's shift table: not needed
        keys = {k[len(prefix):] for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]}
        bad = []
        for k in sorted(keys):
            t, ok = state_dict[prefix + k], self._accepted_dtypes(k)
            if ok is not None and isinstance(t, Tensor) and t.dtype not in ok:
                bad.append(f"{type(self).__name__}: checkpoint tensor '{prefix}{k}' must be {_dtype_names(ok)}, "
                           f"got {t.dtype} (a cast would silently change its values)")
        if bad:  # nothing is loaded: the layer keeps its tensors
            error_msgs.extend(bad)
            return
        derived = self._adapt_state_dict(state_dict, prefix, keys) or ()
        if "bias" not in keys and self.disable_bias:
            self._drop("bias")
        if "bias" in keys and "bias" not in self._buffers:
            self.register_buffer("bias", torch.zeros(self.out_channels, dtype=self.dtype,
                                                     device=self.qweight.device))
        for k in _KEEP_INT_DTYPE:
            t, old = state_dict.get(prefix + k), self._buffers.get(k)
            if t is not None and old is not None and t.dtype != old.dtype:
                self.register_buffer(k, torch.empty(old.shape, dtype=t.dtype, device=old.device))
        was_prepared = self._prepared
        self._prepared = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for k in derived:
            if prefix + k in missing_keys:
                missing_keys.remove(prefix + k)
        if was_prepared and not error_msgs:
            self.prepare_params()

    # State-dict entries laid out along the output features, with the dim that indexes them (fuse()).
    _OUT_DIMS = {"qweight": 1, "scales": 1, "zeros": 1, "qzeros": 1, "bias": 0}
    # Constructor arguments fuse() does not compare: the output width, and the double-quantization block
    # of MPQ's GBA layout (decoded by prepare_params(), so a prepared layer no longer has those tensors).
    _FUSE_FREE_ARGS = ("out_channels", "dq_group_size", "dq_mode")

    @classmethod
    def fuse(cls, layers: Sequence["_WqLinearBase"]):
        """One layer whose output is the concatenation of the outputs of ``layers`` (in order): the q / k / v
        or gate / up projections of one input, run as one launch instead of several (what decode on small
        layers is bound by). ``layers`` are prepared layers of this class on one device, equal in everything
        that is not laid out along the output features: in_channels, dtype, widths, group size, asym,
        disable_bias, g_idx, q_perm, channel_scale, q_groups. The fused layer holds the same packed codes,
        scales and zeros side by side (its state dict is the concatenation along the output features, which
        it also loads from), and is returned prepared. Its output is that of ``torch.cat([l(x) for l in
        layers], -1)`` up to how the kernels split the sums over K (bitwise on the CPU); split it with
        ``y.split([l.out_channels for l in layers], -1)``."""
        layers = list(layers)
        name = f"{cls.__name__}.fuse"
        if not layers:
            raise ValueError(f"{name}: layers is empty")
        kind = type(layers[0])  # cls or a subclass of it; the fused layer is one too
        for i, l in enumerate(layers):
            if not isinstance(l, cls):
                raise TypeError(f"{name}: layers[{i}] must be a {cls.__name__}, got {type(l).__name__}")
            if type(l) is not kind:
                raise TypeError(f"{name}: layers[{i}] is a {type(l).__name__}, layers[0] a {kind.__name__}")
            if not l._prepared:
                raise ValueError(f"{name}: layers[{i}] is not prepared: call prepare_params() on every layer first")
        first = layers[0]
        args0 = {k: v for k, v in first.constructor_args().items() if k not in cls._FUSE_FREE_ARGS}
        dev = first.qweight.device
        for i, l in enumerate(layers[1:], 1):
            args = {k: v for k, v in l.constructor_args().items() if k not in cls._FUSE_FREE_ARGS}
            for k in args0:
                if args[k] != args0[k]:
                    raise ValueError(f"{name}: layers[{i}] has {k}={args[k]!r}, layers[0] has {args0[k]!r}")
            if l.qweight.device != dev:
                raise ValueError(f"{name}: layers[{i}] is on {l.qweight.device}, layers[0] on {dev}")
        sds = [l.state_dict() for l in layers]
        for i, sd in enumerate(sds[1:], 1):
            if set(sd) != set(sds[0]):
                raise ValueError(f"{name}: layers[{i}] has the tensors {sorted(sd)}, layers[0] has {sorted(sds[0])}")
        fused = {}
        for k, t0 in sds[0].items():
            ts = [sd[k] for sd in sds]
            d = cls._OUT_DIMS.get(k)
            if d is None:
                for i, t in enumerate(ts[1:], 1):
                    if t.shape != t0.shape or t.dtype != t0.dtype or not torch.equal(t, t0):
                        raise ValueError(f"{name}: {k} of layers[{i}] differs from that of layers[0]; layers "
                                         f"fuse only when everything but the output features is equal")
                fused[k] = t0
                continue
            for i, t in enumerate(ts):
                rest, rest0 = t.shape[:d] + t.shape[d + 1:], t0.shape[:d] + t0.shape[d + 1:]
                if rest != rest0 or t.dtype != t0.dtype:
                    raise ValueError(f"{name}: {k} of layers[{i}] is {t.dtype} {tuple(t.shape)}, not fusable with "
                                     f"layers[0]'s {t0.dtype} {tuple(t0.shape)}")
            if k == "qzeros":  # packed along the output features: each layer must end on a word boundary
                for i, l in enumerate(layers[:-1]):
                    if (l.out_channels * l.w_bit) % 32 != 0:
                        raise ValueError(f"{name}: layers[{i}] packs its {l.out_channels} integer zeros of "
                                         f"{l.w_bit} bits into a partial last word (out_channels * w_bit must "
                                         f"be a multiple of 32 for every layer but the last)")
            fused[k] = torch.cat(ts, d)
        args = dict(first.constructor_args())
        args.update(out_channels=sum(l.out_channels for l in layers), dtype=first.dtype)
        if "dq_group_size" in args:
            args["dq_group_size"] = -1
        out = kind(**args, device=dev)
        out.load_state_dict(fused)
        out.prepare_params()
        return out.to(dev)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, w_bit={self.w_bit}, "
                f"group_size={self.group_size}, dtype={self.dtype}, prepared={self._prepared}")


class MPQLinear(_WqLinearBase):
    """BIE's ``MPQLinearCuda``: GPTQ (``use_gba_quant=False``), GBA asym and GBA sym (double quantization)
    weights of 1, 2, 4 or 8 bits, act-order ``g_idx`` included. Call ``prepare_params()`` after loading."""

    def __init__(self, in_channels: int, out_channels: int, a_bit: int = 16, w_bit: int = 4,
                 dtype: torch.dtype = torch.half, group_size: int = -1, use_gba_quant: bool = True,
                 dq_group_size: int = -1, dq_mode: int = 2, disable_bias: bool = True, asym: bool = False,
                 requires_grad: bool = False, device=None) -> None:
        super().__init__()
        _check_common(type(self).__name__, in_channels, out_channels, a_bit, dtype, requires_grad)
        if w_bit not in (1, 2, 4, 8):
            raise ValueError(f"{type(self).__name__}: w_bit must be 1, 2, 4 or 8, got {w_bit}")
        K, N = in_channels, out_channels
        gs = K if group_size == -1 else group_size
        if gs < 1:
            raise ValueError(f"{type(self).__name__}: group_size must be >= 1 or -1, got {group_size}")
        D = N if dq_group_size == -1 else dq_group_size
        if D < 1:
            raise ValueError(f"{type(self).__name__}: dq_group_size must be >= 1 or -1, got {dq_group_size}")
        self.in_channels, self.out_channels, self.a_bit, self.w_bit = K, N, a_bit, w_bit
        self.dtype, self.group_size, self.use_gba_quant = dtype, gs, use_gba_quant
        self.dq_group_size, self.dq_mode, self.disable_bias = D, dq_mode, disable_bias
        self.asym = True if not use_gba_quant else asym
        self.requires_grad = requires_grad
        self.maxq = 2 ** w_bit - 1
        self._init_runtime()
        i32 = dict(device=device, dtype=torch.int32)
        self.register_buffer("qweight", torch.zeros(math.ceil(K / 32) * w_bit, N, **i32))
        self.register_buffer("g_idx", torch.div(torch.arange(K, **i32), gs, rounding_mode="floor"))
        self.register_buffer("bias", torch.zeros(N, device=device, dtype=dtype))
        if not use_gba_quant:  # GPTQ
            self.register_buffer("qzeros", torch.zeros(math.ceil(K / gs), math.ceil(N * w_bit / 32), **i32))
            self.register_buffer("scales", torch.ones(math.ceil(K / gs), N, device=device, dtype=dtype))
            return
        self._register_gba(device, dtype)

    def _register_gba(self, device, dtype) -> None:
        """The GBA layout's tensors (double quantization, BIE's init_gba), as constructed."""
        K, N, D, b = self.in_channels, self.out_channels, self.dq_group_size, self.w_bit
        G, NB = math.ceil(K / self.group_size), math.ceil(N / D)
        f = dict(device=device, dtype=dtype)
        u8 = dict(device=device, dtype=torch.uint8)
        if self.asym:
            self.register_buffer("qzeros", torch.zeros(G, math.ceil(N * b / 32), device=device, dtype=torch.int32))
            self.register_buffer("qscales", torch.ones(*((G, NB, D) if b == 4 else (G, N)), **u8))
        else:
            self.register_buffer("qstatistic", torch.ones(G, NB, D, **u8))
            self.register_buffer("qzeros_zeros", torch.zeros(G, NB, 1, **f))
            self.register_buffer("qzeros_scales", torch.ones(G, NB, 1, **f))
        dq_shape = (1, N, 1) if self.dq_mode == 1 else (G, NB, 1)
        self.register_buffer("qscales_zeros", torch.zeros(*dq_shape, **f))
        self.register_buffer("qscales_scales", torch.ones(*dq_shape, **f))
        self.register_buffer("scales", torch.ones(G, N, **f))
        self.register_buffer("zeros", torch.zeros(G, N, **f))

    # --- prepared form ---------------------------------------------------------------------------
    def _runtime_zeros(self) -> Tensor:
        return self._buffers["_rt_zeros"] if self.asym else self.zeros

    def _runtime_g_idx(self) -> Tensor:
        return self.g_idx

    def prepare_params(self) -> None:
        """Decode double quantization (GBA, group_size < 256), unpack integer zero points, check g_idx and
        the packed shapes, drop what inference does not need. Idempotent."""
        if self._prepared:
            return
        K, N, b = self.in_channels, self.out_channels, self.w_bit
        name = type(self).__name__
        need = math.ceil(K / 32) * b
        if tuple(self.qweight.shape) != (need, N) or self.qweight.dtype != torch.int32:
            raise ValueError(f"{name}: qweight must be int32 of shape ({need}, {N}), got "
                             f"{self.qweight.dtype} {tuple(self.qweight.shape)}")
        has_dq = "qscales_zeros" in self._buffers
        if self.use_gba_quant and has_dq and self.group_size < 256:
            qstat = self.qscales if self.asym else self.qstatistic
            scales, zeros = _ops.wq_gba_decode(qstat, self.qscales_zeros, self.qscales_scales,
                                               None if self.asym else self.qzeros_zeros,
                                               None if self.asym else self.qzeros_scales, self.asym, N)
            self.scales = scales.to(self.dtype)
            if not self.asym:
                self.zeros = zeros.to(self.dtype)
        self._drop(*_DQ_KEYS)
        if self.asym:
            self._drop("zeros")  # the float zeros of the GBA layout; asym layers use the packed qzeros
            if self.qzeros.dtype != torch.int32:
                raise ValueError(f"{name}: qzeros must be int32, got {self.qzeros.dtype}")
            self._set_rt("_rt_zeros", _ops.wq_unpack_zeros(self.qzeros, b, N, self.scales.dtype))
        G = self.scales.shape[0]
        if self.scales.dim() != 2 or self.scales.shape[1] != N:
            raise ValueError(f"{name}: scales must be (groups, {N}), got {tuple(self.scales.shape)}")
        self.g_idx = _ops.wq_check_g_idx(self.g_idx, K, G)
        # Act-order: rows sorted by group once (the buffers hold the sorted order, the state dict the
        # checkpoint's), so that every 32-row chunk has one group and takes the kernels' fast path.
        qweight, g_idx, perm = _ops.wq_sort_groups(self.qweight, self.g_idx, b)
        if perm.numel():
            self.qweight, self.g_idx = qweight, g_idx
        self._set_rt("_rt_perm", perm if perm.numel() else None)
        self._warn_dropped_bias()
        self._seg_bits, self._seg_rows, self._asym_rt = [b], [K], self.asym
        self._check_finite_params()
        self._prepared = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        perm = self._buffers.get("_rt_perm")
        if perm is not None:  # act-order sorted at prepare: save the checkpoint's row order
            inv = torch.argsort(perm)
            destination[prefix + "qweight"] = _ops.wq_permute_rows(self.qweight, self.w_bit, inv)
            destination[prefix + "g_idx"] = self.g_idx.index_select(0, inv)

    def _accepted_dtypes(self, key: str):
        if key == "zeros" and self.asym:  # float (GBA layout) or BIE's prepared asym layout (packed int32)
            return _FLOAT_DTYPES + (torch.int32,)
        return super()._accepted_dtypes(key)

    def _adapt_state_dict(self, state_dict, prefix: str, keys):
        has_dq = any(k in keys for k in _DQ_KEYS)
        if self.use_gba_quant and has_dq and "qscales_zeros" not in self._buffers:
            # A raw GBA checkpoint into a prepared layer (its double-quantization tensors were dropped): bring
            # them back, prepare_params() decodes them again.
            self._register_gba(self.qweight.device, self.dtype)
        # A prepared checkpoint (no double-quantization tensors): load into the prepared layout.
        if "qscales_zeros" in self._buffers and not has_dq and "scales" in keys:
            self._drop(*_DQ_KEYS)
        if self.asym and prefix + "zeros" in state_dict and state_dict[prefix + "zeros"].dtype == torch.int32:
            # BIE's prepared asym layout: `zeros` holds the packed integer zero points (a copy of qzeros).
            packed = state_dict.pop(prefix + "zeros")
            if "qzeros" not in keys:
                state_dict[prefix + "qzeros"] = packed
            keys.discard("zeros")
            keys.add("qzeros")
        if self.asym and "zeros" in self._buffers and "zeros" not in keys:
            self._drop("zeros")
        if "qscales_zeros" in self._buffers and has_dq and self.group_size < 256:
            # Double quantization (BIE decodes it for group_size < 256): scales (and the sym format's zeros)
            # are derived by prepare_params(), so a checkpoint need not carry them (spec 10.3's tensor sets).
            return ("scales",) if self.asym else ("scales", "zeros")
        return ()

    # --- construction from float weights and MLX --------------------------------------------------
    @classmethod
    def from_float(cls, linear: torch.nn.Linear, w_bit: int = 4, group_size: int = 128, asym: bool = True,
                   dtype: Optional[torch.dtype] = None) -> "MPQLinear":
        """Round-to-nearest quantization of ``linear`` per group of ``group_size`` input channels.
        ``asym=True``: GPTQ format (integer zero points, ``qzeros``; a group whose zero point would be 0, which
        GPTQ's z - 1 storage cannot hold, gets the mirrored grid: scale -s, zero 2^b - 1, so every weight is
        within half a step, also in all-positive groups); ``asym=False``: GBA sym form with float zeros
        (prepared, without double quantization). The layer comes back prepared."""
        W = linear.weight.detach()
        dt = dtype or (W.dtype if W.dtype in _FLOAT_DTYPES else torch.float32)
        N, K = W.shape
        gs = K if group_size == -1 else group_size
        layer = cls(K, N, w_bit=w_bit, dtype=dt, group_size=gs, use_gba_quant=not asym, asym=asym,
                    disable_bias=linear.bias is None, device=W.device)
        codes, s, z = _ops.wq_quantize_rtn(W.to(dt), w_bit, gs, "int_zero" if asym else "float_zero")
        layer.qweight.copy_(_ops.wq_pack(codes, [w_bit], [K]))
        layer.scales = s
        if asym:
            layer.qzeros.copy_(_ops.wq_pack_zeros(z, w_bit))
        else:
            layer._drop(*_DQ_KEYS)
            layer.zeros = z
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().to(dt))
        layer.prepare_params()
        return layer

    def to_mlx(self) -> Dict[str, object]:
        """MLX's quantized layout (``mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size,
        bits)``): ``weight`` uint32 (N, K*bits/32), ``scales`` and ``biases`` (N, G), w = scale*q + bias.
        Needs the sym format (float zeros), contiguous groups (no act-order), K a multiple of 32 and
        group_size in {32, 64, 128}, bits in {2, 4, 8}."""
        name = type(self).__name__
        if not self._prepared:
            raise RuntimeError(f"{name}: call prepare_params() before to_mlx()")
        gs, K = self.group_size, self.in_channels
        if self.asym or self.w_bit not in (2, 4, 8) or gs not in (32, 64, 128) or K % 32:
            raise ValueError(f"{name}.to_mlx: MLX takes sym weights with bits in (2, 4, 8), group_size in "
                             f"(32, 64, 128) and K % 32 == 0; this layer has asym={self.asym}, w_bit={self.w_bit}, "
                             f"group_size={gs}, K={K}")
        uniform = torch.div(torch.arange(K, device=self.g_idx.device), gs, rounding_mode="floor")
        if not torch.equal(self.g_idx.long(), uniform):
            raise ValueError(f"{name}.to_mlx: act-order g_idx has no MLX equivalent")
        return {"weight": self.qweight.t().contiguous().view(torch.uint32), "scales": self.scales.t().contiguous(),
                "biases": self.zeros.neg().t().contiguous(), "group_size": gs, "bits": self.w_bit,
                "bias": self._bias_or_none()}

    @classmethod
    def from_mlx(cls, weight: Tensor, scales: Tensor, biases: Tensor, group_size: int, bits: int,
                 bias: Optional[Tensor] = None) -> "MPQLinear":
        """Inverse of :meth:`to_mlx` (MLX arrays converted to torch tensors, e.g. via numpy)."""
        name = f"{cls.__name__}.from_mlx"
        if weight.dim() != 2 or weight.dtype not in (torch.uint32, torch.int32):
            raise ValueError(f"{name}: weight must be 2-D uint32, got {weight.dtype} {tuple(weight.shape)}")
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"{name}: bits must be 1, 2, 4 or 8 (32 / bits codes per word), got {bits}")
        if group_size < 1:
            raise ValueError(f"{name}: group_size must be >= 1, got {group_size}")
        N, words = weight.shape
        K = words * 32 // bits
        G = math.ceil(K / group_size)
        for what, t in (("scales", scales), ("biases", biases)):
            if not isinstance(t, Tensor) or t.dtype not in _FLOAT_DTYPES or tuple(t.shape) != (N, G):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: {what} must be float32, float16 or bfloat16 of shape ({N}, {G}) "
                                 f"(out_features, K / group_size for K={K}), got {got}")
        if biases.dtype != scales.dtype:
            raise ValueError(f"{name}: scales and biases must have one dtype (the layer's), got {scales.dtype} "
                             f"and {biases.dtype}")
        if bias is not None and (not isinstance(bias, Tensor) or not bias.is_floating_point()
                                 or tuple(bias.shape) != (N,)):
            got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{name}: bias must be a float tensor of shape ({N},), got {got}")
        layer = cls(K, N, w_bit=bits, dtype=scales.dtype, group_size=group_size, use_gba_quant=True, asym=False,
                    disable_bias=bias is None, device=weight.device)
        layer._drop(*_DQ_KEYS)
        layer.qweight.copy_(weight.view(torch.int32).t())
        layer.scales = scales.t().contiguous()
        layer.zeros = biases.neg().t().contiguous()
        if bias is not None:
            layer.bias.copy_(bias)
        layer.prepare_params()
        return layer

    def constructor_args(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, w_bit=self.w_bit,
                    dtype=str(self.dtype), group_size=self.group_size, use_gba_quant=self.use_gba_quant,
                    dq_group_size=self.dq_group_size, dq_mode=self.dq_mode, disable_bias=self.disable_bias,
                    asym=self.asym)


class MBWQLinear(_WqLinearBase):
    """BIE's ``MBWQLinearCuda``. ``use_mbw=False`` (layer-mix): one width per layer, groups of
    ``group_size`` stored rows. ``use_mbw=True`` (channel-mix): row segments of 8/6/5/4/3/2 bits described
    by ``q_groups``, ``groups`` groups and ``rows_packed`` word rows. Both: ``q_perm`` (stored row ->
    input channel; absent or all zero = identity) and ``channel_scale`` (input scale per channel)."""

    def __init__(self, in_channels: int, out_channels: int, a_bit: int = 16, w_bit: int = 4,
                 dtype: torch.dtype = torch.half, group_size: int = -1, use_gba_quant: bool = True,
                 dq_group_size: int = -1, dq_mode: int = 2, disable_bias: bool = True, asym: bool = False,
                 requires_grad: bool = False, use_mbw: bool = True, groups: int = 64, rows_packed: int = 64,
                 device=None) -> None:
        super().__init__()
        name = type(self).__name__
        _check_common(name, in_channels, out_channels, a_bit, dtype, requires_grad)
        if asym or not use_gba_quant:
            raise ValueError(f"{name}: MBWQ weights use float zeros (w = s*q - z): asym must be False and "
                             f"use_gba_quant True, got asym={asym}, use_gba_quant={use_gba_quant}")
        K, N = in_channels, out_channels
        gs = K if group_size == -1 else group_size
        self.in_channels, self.out_channels, self.a_bit, self.w_bit = K, N, a_bit, w_bit
        self.dtype, self.group_size, self.use_gba_quant, self.asym = dtype, gs, True, False
        self.dq_group_size, self.dq_mode, self.disable_bias = dq_group_size, dq_mode, disable_bias
        self.requires_grad, self.use_mbw, self.groups, self.rows_packed = requires_grad, use_mbw, groups, rows_packed
        self.maxq = 2 ** w_bit - 1
        self.rows = [0] * 7
        self._init_runtime()
        self.check_parameters()
        f = dict(device=device, dtype=dtype)
        i16 = dict(device=device, dtype=torch.int16)
        self.register_buffer("q_perm", torch.zeros(K, **i16))
        self.register_buffer("channel_scale", torch.ones(1, 1, K, **f))
        self.register_buffer("bias", torch.zeros(N, **f))
        if use_mbw:
            self.register_buffer("qweight", torch.zeros(rows_packed, N, device=device, dtype=torch.int32))
            self.register_buffer("q_groups", torch.zeros(2 * groups, **i16))
            G = groups
        else:
            self.register_buffer("qweight", torch.zeros(math.ceil(K / 32) * w_bit, N, device=device,
                                                        dtype=torch.int32))
            G = math.ceil(K / gs)
        self.register_buffer("scales", torch.ones(G, N, **f))
        self.register_buffer("zeros", torch.zeros(G, N, **f))
        self.register_buffer("q_group_map", None, persistent=False)  # channel-mix: built by prepare_params

    def check_parameters(self) -> None:
        name = type(self).__name__
        if self.a_bit != 16:
            raise ValueError(f"{name}: a_bit must be 16, got {self.a_bit}")
        if self.use_mbw:
            if self.groups < 1 or self.rows_packed < 1:
                raise ValueError(f"{name}: groups and rows_packed must be >= 1, got {self.groups}, {self.rows_packed}")
        else:
            if self.w_bit not in (1, 2, 3, 4, 5, 6, 8):
                raise ValueError(f"{name}: w_bit must be 1, 2, 3, 4, 5, 6 or 8, got {self.w_bit}")
            if self.group_size < 1:
                raise ValueError(f"{name}: group_size must be >= 1 or -1, got {self.group_size}")

    def _set_group_tensor(self, name: str, value: Tensor) -> None:
        old = self._buffers[name]
        if not isinstance(value, Tensor) or not value.is_floating_point() or tuple(value.shape) != tuple(old.shape):
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{type(self).__name__}.set_{name}: {name} must be a float tensor of shape "
                             f"{tuple(old.shape)} (groups, out_channels), got {got}")
        # In the layer's dtype (that of its buffers, also after .half() / .bfloat16()) and on its device.
        self.register_buffer(name, value.to(device=old.device, dtype=old.dtype))

    def set_scales(self, scales: Tensor) -> None:
        self._set_group_tensor("scales", scales)

    def set_zeros(self, zeros: Tensor) -> None:
        self._set_group_tensor("zeros", zeros)

    def _runtime_zeros(self) -> Tensor:
        return self.zeros

    def _runtime_g_idx(self) -> Tensor:
        return self._buffers["_rt_g_idx"]

    def prepare_params(self) -> None:
        """Derive the row layout from ``q_groups`` (channel-mix) or the group size (layer-mix), check
        ``q_perm`` and ``channel_scale``, drop what inference does not need. Idempotent."""
        if self._prepared:
            return
        name = type(self).__name__
        K, N = self.in_channels, self.out_channels
        if self.qweight.dtype != torch.int32 or self.qweight.dim() != 2 or self.qweight.shape[1] != N:
            raise ValueError(f"{name}: qweight must be int32 (word rows, {N}), got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        q_groups = self.q_groups if self.use_mbw else None
        g_idx, seg, gmap = _ops.wq_mbwq_layout(q_groups, K, self.qweight.shape[0], self.w_bit, self.group_size)
        G = int(g_idx[-1].item()) + 1
        if tuple(self.scales.shape) != (G, N) or tuple(self.zeros.shape) != (G, N):
            raise ValueError(f"{name}: scales and zeros must be ({G}, {N}) for this layout, got "
                             f"{tuple(self.scales.shape)} and {tuple(self.zeros.shape)}")
        if self.channel_scale.numel() != K:
            raise ValueError(f"{name}: channel_scale must hold {K} elements, got {tuple(self.channel_scale.shape)}")
        self._set_rt("_rt_g_idx", g_idx.to(self.qweight.device))  # layer-mix: built on the host
        perm = _ops.wq_check_perm(self.q_perm, K)
        self._set_rt("_rt_perm", perm if perm.numel() else None)
        self._has_cs = not bool((self.channel_scale == 1).all())
        self._seg_bits, self._seg_rows = seg[0].tolist(), seg[1].tolist()
        if self.use_mbw:
            self._set_rt("q_group_map", gmap.to(self.qweight.device))
            ends, prev = [], 0
            for b in _MBW_WIDTHS:  # BIE's rows: cumulative end row per width 8, 6, 5, 4, 3, 2, then the mask
                if b in self._seg_bits:
                    prev = self._seg_rows[self._seg_bits.index(b)]
                ends.append(prev)
            self.rows = ends + [sum(1 << (b - 1) for b in self._seg_bits)]
        self._warn_dropped_bias()
        self._check_finite_params()
        self._prepared = True

    _DROPPED_KEYS = _DQ_KEYS + ("g_idx", "qzeros", "q_group_map")  # BIE's base-class tensors, unused here

    def _accepted_dtypes(self, key: str):
        return None if key in self._DROPPED_KEYS else super()._accepted_dtypes(key)

    def _adapt_state_dict(self, state_dict, prefix: str, keys):
        for k in self._DROPPED_KEYS:
            if state_dict.pop(prefix + k, None) is not None:
                keys.discard(k)
        # As BIE's load_state_dict: a checkpoint tensor whose shape differs from the buffer's (say, a
        # channel-mix layer built with the default groups / rows_packed) is taken as it is; prepare_params()
        # then checks that the tensors fit together and names the one that does not.
        for k in ("qweight", "scales", "zeros", "q_perm", "q_groups"):
            t, old = state_dict.get(prefix + k), self._buffers.get(k)
            if k in keys and isinstance(t, Tensor) and old is not None and t.shape != old.shape:
                self.register_buffer(k, torch.empty(t.shape, dtype=old.dtype, device=old.device))
        if "q_perm" not in keys:  # absent = identity
            state_dict[prefix + "q_perm"] = torch.zeros_like(self.q_perm)
        if "channel_scale" not in keys:
            state_dict[prefix + "channel_scale"] = torch.ones_like(self.channel_scale)
        return ()

    # --- dense reconstructions (BIE's static helpers) ---------------------------------------------
    @staticmethod
    def q42fp_weight(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int,
                     q_perm: Optional[Tensor] = None) -> Tensor:
        """Dense (K, N) weight of a layer-mix layer in input-channel order, in the scales' dtype."""
        K = q_perm.numel() if q_perm is not None else qweight.shape[0] * 32 // bits
        g_idx, seg, _ = _ops.wq_mbwq_layout(None, K, qweight.shape[0], bits, group_size)
        perm = _ops.wq_check_perm(q_perm, K) if q_perm is not None else None
        return _ops.wq_dequantize(qweight, scales, zeros, g_idx.to(qweight.device),
                                  perm if perm is not None and perm.numel() else None, seg[0].tolist(),
                                  seg[1].tolist(), False, scales.dtype)

    @staticmethod
    def exl2fp_weight(qweight: Tensor, scales: Tensor, zeros: Tensor, q_perm: Tensor, q_group_map: Tensor,
                      rows: Sequence[int]) -> Tensor:
        """Dense (K, N) weight of a channel-mix layer in input-channel order, from BIE's ``q_group_map``
        and ``rows`` (cumulative end rows of the 8/6/5/4/3/2-bit segments)."""
        bits, ends, prev = [], [], 0
        for b, end in zip(_MBW_WIDTHS, rows[:6]):
            if end > prev:
                bits.append(b)
                ends.append(int(end))
                prev = end
        K = ends[-1]
        g_idx = _ops.wq_check_g_idx(q_group_map.reshape(-1)[0::2], K, scales.shape[0]).to(qweight.device)
        perm = _ops.wq_check_perm(q_perm, K).to(qweight.device)
        return _ops.wq_dequantize(qweight, scales, zeros, g_idx, perm if perm.numel() else None, bits, ends, False,
                                  scales.dtype)

    # --- construction from float weights -----------------------------------------------------------
    @classmethod
    def from_float(cls, linear: torch.nn.Linear, w_bit: int = 4, group_size: int = 128,
                   bits: Optional[Sequence[int]] = None, bits_prop: Optional[Sequence[float]] = None,
                   group_sizes: Optional[Dict[int, int]] = None, perm: Optional[Tensor] = None,
                   dtype: Optional[torch.dtype] = None) -> "MBWQLinear":
        """Round-to-nearest quantization of ``linear``. Layer-mix (``bits`` None): ``w_bit`` bits, groups of
        ``group_size``. Channel-mix: widths ``bits`` (e.g. [4, 2]) over proportions ``bits_prop`` of the
        input channels (green-bit-llm's rule: each width but the last gets max(1, floor(K*p) // gs) * gs
        channels), group size per width from ``group_sizes`` (keys int or str as in green-bit-llm's strategy;
        default ``group_size``): multiples of 32, except the last width's when its channels form one group
        (``q_groups`` hold whole 32-row chunks per group but the last; anything else is a ValueError).
        ``perm`` (optional): stored row r holds input channel perm[r] (e.g. most important first).
        The layer comes back prepared."""
        W = linear.weight.detach()
        dt = dtype or (W.dtype if W.dtype in _FLOAT_DTYPES else torch.float32)
        N, K = W.shape
        Wst = W if perm is None else W[:, perm.to(W.device).long()]
        common = dict(dtype=dt, disable_bias=linear.bias is None, device=W.device)
        if bits is None:
            gs = K if group_size == -1 else group_size
            layer = cls(K, N, w_bit=w_bit, group_size=gs, use_mbw=False, **common)
            codes, s, z = _ops.wq_quantize_rtn(Wst.to(dt), w_bit, gs, "float_zero")
            layer.qweight.copy_(_ops.wq_pack(codes, [w_bit], [K]))
        else:
            name = "MBWQLinear.from_float"
            bits = [int(b) for b in bits]
            if not bits or len(set(bits)) != len(bits) or any(b not in _MBW_WIDTHS for b in bits):
                raise ValueError(f"{name}: bits must be distinct widths from {list(_MBW_WIDTHS)}, got {bits}")
            if bits_prop is not None and len(bits_prop) != len(bits):
                raise ValueError(f"{name}: bits_prop must have one proportion per width ({len(bits)}), got "
                                 f"{list(bits_prop)}")
            order = sorted(range(len(bits)), key=lambda i: -bits[i])
            props = [float(bits_prop[i]) for i in order] if bits_prop is not None else [1.0 / len(bits)] * len(bits)
            bits = [bits[i] for i in order]
            given = {int(k): v for k, v in (group_sizes or {}).items()}  # green-bit-llm's keys are strings
            gsz = {b: int(given.get(b, group_size)) for b in bits}
            for b in bits:
                if gsz[b] < 1:
                    raise ValueError(f"{name}: the group size of the {b}-bit channels must be >= 1, got {gsz[b]} "
                                     f"(group_sizes={group_sizes}, group_size={group_size})")
            counts, used = [], 0
            for b, p in zip(bits[:-1], props[:-1]):
                n = max(1, math.floor(K * p) // gsz[b]) * gsz[b]
                counts.append(n)
                used += n
            counts.append(K - used)
            if counts[-1] < 1:
                raise ValueError(f"{name}: cannot split K={K} as bits={bits}, bits_prop={props} with group sizes "
                                 f"{gsz}: the widths before {bits[-1]} bits take {used} channels, none is left")
            # q_groups give each group its width and first word row, so a group spans whole 32-row chunks:
            # every group but the layer's last must have a multiple of 32 rows. That is every group of every
            # width but the last, and the last width's groups when its segment holds more than one group.
            for i, (b, n) in enumerate(zip(bits, counts)):
                last = i == len(bits) - 1
                if gsz[b] % 32 and (not last or n > gsz[b]):
                    raise ValueError(
                        f"{name}: the {b}-bit group size ({'group_sizes[%d]' % b if b in given else 'group_size'}"
                        f"={gsz[b]}) is not a multiple of 32, but the {b}-bit segment "
                        f"({n} of K={K} channels) " + ("is followed by other widths" if not last else
                                                       f"has {math.ceil(n / gsz[b])} groups") +
                        ": q_groups store each group as whole 32-row chunks (bits, first word row), so every group "
                        "but the layer's last must have a multiple of 32 rows")
            codes_l, s_l, z_l, q_groups, start, r0 = [], [], [], [], 0, 0
            for b, n in zip(bits, counts):
                c, s, z = _ops.wq_quantize_rtn(Wst[:, r0:r0 + n].to(dt), b, gsz[b], "float_zero")
                codes_l.append(c)
                s_l.append(s)
                z_l.append(z)
                for g0 in range(0, n, gsz[b]):
                    q_groups += [b, start]
                    start += math.ceil(min(gsz[b], n - g0) / 32) * b
                r0 += n
            seg_rows = [sum(counts[:i + 1]) for i in range(len(counts))]
            qweight = _ops.wq_pack(torch.cat(codes_l), bits, seg_rows)
            s, z = torch.cat(s_l), torch.cat(z_l)
            layer = cls(K, N, w_bit=bits[0], group_size=group_size, use_mbw=True, groups=s.shape[0],
                        rows_packed=qweight.shape[0], **common)
            layer.qweight.copy_(qweight)
            layer.q_groups.copy_(torch.tensor(q_groups, dtype=torch.int16))
        layer.set_scales(s)
        layer.set_zeros(z)
        if perm is not None:
            layer.q_perm.copy_(perm.to(torch.int32).to(torch.int16))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().to(dt))
        layer.prepare_params()
        return layer

    def constructor_args(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, w_bit=self.w_bit,
                    dtype=str(self.dtype), group_size=self.group_size, disable_bias=self.disable_bias,
                    use_mbw=self.use_mbw, groups=self.groups, rows_packed=self.rows_packed)

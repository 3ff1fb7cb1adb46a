"""Typed wrappers over ``torch.ops.lowbit.*``. Each docstring is the op's contract; the math and its
rounding are in the native library (schemas: ``csrc/ops/library.cpp``, formulas: ``docs/ops.md``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.lowbit


def quantize_s8(x: Tensor, shift: Optional[Tensor], scale: Tensor, eps: Tensor, qmin: int, qmax: int,
                check_step: bool = True) -> Tensor:
    """int8 codes ``clamp(rne((x + shift) / max(scale, eps)), qmin, qmax)``, computed in fp32.

    x: (..., K) float32/float16/bfloat16; shift: (K,) or None; scale, eps: one element each.
    Ties round half to even; NaN gives 0. Returns int8 with x's shape. ``check_step``: a non-finite or
    non-positive step ``max(scale, eps)`` raises (read on the host: one device sync on CUDA)."""
    return _ops.quantize_s8(x, shift, scale, eps, qmin, qmax, check_step)


def qat_alpha(scale1: Tensor, scale2: Tensor, eps: Tensor) -> Tensor:
    """``max(scale1, eps) * max(scale2, eps)`` in fp32 when both steps are finite and > 0, else NaN:
    the GEMM scale of a quantization-aware layer, computed on the device without a host read."""
    return _ops.qat_alpha(scale1, scale2, eps)


def qat_prepare(shift: Optional[Tensor], scale1: Tensor, scale2: Tensor, eps: Tensor) -> Tensor:
    """A QAT layer's fp32 operands in one launch: ``[shift.float() | scale1, scale2, eps as float32,
    qat_alpha(scale1, scale2, eps), max(scale1, eps), max(scale2, eps)]``, a 1-D float32 tensor of
    ``shift.numel() + 6`` values (shift may be None; the maxima are NaN where an operand is). Each operand
    may be float32, float16 or bfloat16."""
    return _ops.qat_prepare(shift, scale1, scale2, eps)


def qat_quantize(x: Tensor, shift: Optional[Tensor], scale1: Tensor, scale2: Tensor, eps: Tensor, qmin: int,
                 qmax: int) -> Tuple[Tensor, Tensor]:
    """``(quantize_s8(x, shift, scale1, eps, qmin, qmax, check_step=False), qat_prepare(shift, scale1, scale2,
    eps))`` with the same bits as those two calls, in one launch on CUDA: a QAT forward's input codes and
    the fp32 operands its GEMM reads."""
    return _ops.qat_quantize(x, shift, scale1, scale2, eps, int(qmin), int(qmax))


def lsq_scale(x: Tensor, qmax: float, eps: Optional[Tensor] = None) -> Tensor:
    """LSQ step size ``max(2 * mean(|x|) / sqrt(qmax), eps)`` as a 0-dim float32 tensor on x's device
    (mean accumulated in float64, rounded once)."""
    return _ops.lsq_scale(x, float(qmax), eps)


def linear_s8(qx: Tensor, qw: Tensor, alpha: Tensor, out_dtype: torch.dtype,
              row_scale: Optional[Tensor] = None) -> Tensor:
    """``to(out_dtype)(float(qx @ qw.T) * alpha)`` with exact int32 accumulation.

    qx: (..., K) int8; qw: (N, K) int8; alpha: one float32 element on the same device. ``row_scale``:
    optional float32, one value per row of qx; row i is then scaled by ``alpha * row_scale[i]`` (one fp32
    multiply), the GEMM of an operand quantized per row (:func:`quantize_rows_s8`)."""
    return _ops.linear_s8(qx, qw, alpha, out_dtype, row_scale)


def linear_s8s4(qx: Tensor, qw4: Tensor, alpha: Tensor, out_dtype: torch.dtype) -> Tensor:
    """:func:`linear_s8` with the weights as int4 pairs: qw4 (N, ceil(K/2)) int8 in :func:`pack_s4`'s
    format, K = ``qx.shape[-1]``. Bitwise ``linear_s8(qx, unpack_s4(qw4, K), alpha, out_dtype)``; on Hopper
    the pairs are unpacked inside the GEMM (no int8 copy of the weights)."""
    return _ops.linear_s8s4(qx, qw4, alpha, out_dtype)


def quantize_rows_s8(x: Tensor, qmax: int = 127) -> tuple:
    """Per-row symmetric int8 quantization (SwitchBack): ``row_scale = max|x_row| / qmax`` (fp32, x's
    leading shape) and ``q = clamp(rne(x / row_scale), -qmax, qmax)`` (int8, x's shape). An all-zero row
    gives scale 0 and codes 0; a row holding inf or NaN gives scale NaN and codes 0. Returns (q, row_scale)."""
    return _ops.quantize_rows_s8(x, qmax)


def q8_linear(x: Tensor, bias_a: Tensor, weight: Tensor, scale_a: Tensor, scale_w: Tensor, eps: Tensor,
              bias: Optional[Tensor] = None, int8_backward: bool = False) -> Tensor:
    """The Q8Linear forward, differentiable: ``s_a*s_w * (Q(x + bias_a; s_a) @ Q(W; s_w).T)``.

    ``weight`` is float (quantized here with ``scale_w``) or int8 codes (a frozen ``qweight``).
    Gradients: straight-through for x (clip-masked) and a float weight, LSQ for ``scale_a``. ``bias``: an
    optional float output bias (N,) added after the epilogue. ``int8_backward``: the input gradient's GEMM
    runs on int8, the output gradient quantized per row (SwitchBack); the weight gradient stays float."""
    return _ops.q8_linear(x, bias_a, weight, scale_a, scale_w, eps, bias, int8_backward)


def q4_linear(x: Tensor, bias_a: Tensor, weight: Tensor, scale_a: Tensor, scale_w: Tensor, eps: Tensor,
              bias: Optional[Tensor] = None, int8_backward: bool = False) -> Tensor:
    """The Q4Linear forward, differentiable: as :func:`q8_linear` with codes in [-8, 7]; a frozen weight
    is int8 (N, ceil(K/2)) holding int4 pairs (:func:`pack_s4`)."""
    return _ops.q4_linear(x, bias_a, weight, scale_a, scale_w, eps, bias, int8_backward)


def pack_s4(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7] (..., K) -> int4 pairs (..., ceil(K/2)), first code in the high nibble
    (BIE's format). Codes outside [-8, 7] are an error (checked on the CPU)."""
    return _ops.pack_s4(codes)


def unpack_s4(packed: Tensor, K: int) -> Tensor:
    """int4 pairs (..., ceil(K/2)) -> int8 codes (..., K) in [-8, 7]."""
    return _ops.unpack_s4(packed, K)


def q4_conv2d(x: Tensor, bias_a: Tensor, weight: Tensor, scale_a: Tensor, scale_w: Tensor, eps: Tensor,
              stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1, bias: Optional[Tensor] = None) -> Tensor:
    """The Q4Conv2d forward, differentiable: ``s_a*s_w * conv2d(Q(x + bias_a[c]), Q(W))`` with 4-bit codes.

    x (N, C, H, W); weight float (O, C/groups, kh, kw) or a frozen int8 qweight (O, kh, kw, ceil((C/groups)/2));
    output (N, O, Ho, Wo) in x's dtype, channels_last memory."""
    return _ops.q4_conv2d(x, bias_a, weight, scale_a, scale_w, eps, list(stride), list(padding), list(dilation),
                          groups, bias)


def q4_matmul(x: Tensor, y: Tensor, x_clip: Tensor, y_clip: Tensor, eps: Tensor) -> Tensor:
    """The Q4MatMul forward, differentiable: ``s_x*s_y * (Q(x) @ Q(y).T)`` over the last two dims, batch
    dims broadcast; x (..., m, k), y (..., n, k) of one float dtype."""
    return _ops.q4_matmul(x, y, x_clip, y_clip, eps)

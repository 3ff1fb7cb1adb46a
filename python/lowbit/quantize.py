"""lowbit.quantize: weight-only quantization of a float model's ``nn.Linear`` layers to ``MBWQLinear``
(green-bit-llm's layer-mix format) or ``MPQLinear`` (GPTQ format, integer zero points).

Methods:

* ``"rtn"``: round to nearest per group of input channels (``MBWQLinear.from_float`` / ``MPQLinear.from_float``,
  i.e. ``torch.ops.lowbit.wq_quantize_rtn``).
* ``"gptq"``: GPTQ (Frantar et al., 2022). Each layer's inputs are captured from calibration batches, giving
  H = 2 XᵀX / n; columns are quantized one after another (optionally in decreasing diag(H) order,
  "act-order") and each column's rounding error is spread over the columns not yet quantized through the
  upper Cholesky factor of H⁻¹, which minimises ‖XWᵀ − XŴᵀ‖. The grid of a group (scale and zero, min-max as
  in RTN) is taken from the updated weights when the group's first column is reached.

``budget_bits`` turns on a mixed-bit plan: every layer is quantized at every candidate width and a greedy
allocation picks one width per layer so that the average bits per weight stays within the budget while
Σ (weights × relative error²) is as small as it can make it (green-bit-llm's layer-mix models).

Every call returns a per-layer report (:class:`QuantizationReport`). The packing and the rounding grid are
the native ``lowbit::wq_*`` operators; GPTQ's Hessian and Cholesky bookkeeping is torch code here (an
offline algorithm, run once per layer).
"""
from __future__ import annotations

import copy
import math
import numbers
import sys
import time
import types
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .convert import _kind_for, _module_sites, _patterns, _warn_untied_parameters
from .nn import MBWQLinear, MPQLinear

_ops = torch.ops.lowbit
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
METHODS = ("rtn", "gptq")
LAYERS = {"mbwq": MBWQLinear, "mpq": MPQLinear}
WIDTHS = {"mbwq": (1, 2, 3, 4, 5, 6, 8), "mpq": (1, 2, 4, 8)}


# ------------------------------------------------------------------------------------------- progress
class _Bar:
    """Minimal progress bar on stderr (tqdm's interface subset used here): redrawn in place on a terminal,
    one line at the end otherwise."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.tty and time.perf_counter() - self.last > 0.1:
            self._draw("")

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        self._draw("\n")

    def _draw(self, end: str) -> None:
        self.last = time.perf_counter()
        fill = 30 * self.n // max(self.total, 1)
        sys.stderr.write(f"{chr(13) if self.tty else ''}{self.desc:<18} [{'#' * fill}{'.' * (30 - fill)}] "
                         f"{self.n}/{self.total} {self.last - self.start:6.1f}s {self.postfix[:40]:<40}{end}")
        sys.stderr.flush()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enable: bool = True):
    """A progress bar over ``total`` items on stderr: tqdm when installed, else a minimal one."""
    if not enable:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=True)
    except ImportError:
        return _Bar(total, desc)


# ------------------------------------------------------------------------------------------- report
class QuantizationReport(list):
    """The per-layer report: a list of dicts, one per quantized layer, with the keys

    ``name``, ``layer`` (class), ``in_features``, ``out_features``, ``bits``, ``group_size``,
    ``bits_per_weight`` (bytes of qweight + scales + zeros/qzeros × 8 / weights), ``weight_error``
    (‖W − Ŵ‖_F / ‖W‖_F), ``output_error`` (‖XWᵀ − XŴᵀ‖_F / ‖XWᵀ‖_F over the calibration inputs, from
    H = 2XᵀX/n; None without calibration), ``bytes_before`` (float weight and bias), ``bytes_after``
    (the layer's state dict), and with a mixed-bit plan ``candidates`` ({bits: [bits_per_weight, weight_error]}).

    Attributes: ``method``, ``layer``, ``budget_bits``, ``average_bits`` (weight-weighted mean bits per
    weight), ``bytes_before``, ``bytes_after`` (sums over the layers)."""

    method: str = "rtn"
    layer: str = "mbwq"
    budget_bits: Optional[float] = None

    @property
    def average_bits(self) -> float:
        n = sum(r["in_features"] * r["out_features"] for r in self)
        return sum(r["bits_per_weight"] * r["in_features"] * r["out_features"] for r in self) / max(n, 1)

    @property
    def bytes_before(self) -> int:
        return sum(r["bytes_before"] for r in self)

    @property
    def bytes_after(self) -> int:
        return sum(r["bytes_after"] for r in self)

    def table(self) -> str:
        """The report as a fixed-width text table with a totals line."""
        w = max([len("layer")] + [len(r["name"] or "<root>") for r in self])
        lines = [f"{'layer':<{w}} {'class':<11} {'in':>6} {'out':>6} {'bits':>4} {'group':>6} {'bits/w':>7} "
                 f"{'weight err':>10} {'output err':>10}"]
        for r in self:
            oe = "-" if r["output_error"] is None else f"{r['output_error']:.4f}"
            lines.append(f"{r['name'] or '<root>':<{w}} {r['layer']:<11} {r['in_features']:>6} {r['out_features']:>6} "
                         f"{r['bits']:>4} {r['group_size']:>6} {r['bits_per_weight']:>7.3f} "
                         f"{r['weight_error']:>10.4f} {oe:>10}")
        budget = "" if self.budget_bits is None else f" (budget {self.budget_bits:g})"
        lines.append(f"{len(self)} layers ({self.method}, {self.layer}): {_human(self.bytes_before)} -> "
                     f"{_human(self.bytes_after)}, {self.average_bits:.3f} bits per weight on average{budget}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _nbytes(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def packed_weight_bytes(layer: torch.nn.Module) -> int:
    """Bytes of the tensors that encode the weight: ``qweight``, ``scales`` and ``zeros`` (MBWQ, float) or
    ``qzeros`` (MPQ GPTQ format, packed integers). Bias, ``g_idx``, ``q_perm`` and ``channel_scale`` (per
    input channel, not per weight) are not counted."""
    zeros = layer._buffers.get("qzeros") if isinstance(layer, MPQLinear) and layer.asym else layer._buffers.get("zeros")
    return _nbytes(layer.qweight) + _nbytes(layer.scales) + _nbytes(zeros)


def _stats(name: str, layer, W: Tensor, bias: Optional[Tensor], H: Optional[Tensor]) -> dict:
    """Report entry: errors in float64 from the dequantized weight (what the layer multiplies by)."""
    Wd = W.detach().double()
    D = Wd - layer.dequantized_weight(torch.float32).double()
    wn = Wd.norm()
    out_err = None
    if H is not None:  # ‖XDᵀ‖² = n/2 · tr(D H Dᵀ): no need to keep X
        Hd = H.double()
        ref = ((Wd @ Hd) * Wd).sum()
        out_err = math.sqrt(max(((D @ Hd) * D).sum().item(), 0.0) / ref.item()) if ref.item() > 0 else 0.0
    N, K = W.shape
    return dict(name=name, layer=type(layer).__name__, in_features=K, out_features=N, bits=layer.w_bit,
                group_size=layer.group_size, bits_per_weight=packed_weight_bytes(layer) * 8 / (N * K),
                weight_error=(D.norm() / wn).item() if wn > 0 else 0.0, output_error=out_err,
                bytes_before=_nbytes(W) + _nbytes(bias),
                bytes_after=sum(_nbytes(t) for t in layer.state_dict().values()))


# ------------------------------------------------------------------------------------------- GPTQ
def _gptq(W: Tensor, H: Tensor, bits: int, group_size: int, mode: str, dtype: torch.dtype, act_order: bool,
          damp: float, block_size: int) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """GPTQ of one weight W (N, K) with Hessian H (K, K).

    Returns the codes (N, K) int32 in processing order, scales and zeros (G, N) in ``dtype`` (group g =
    processed columns [g·gs, (g+1)·gs)), and the processing order ``perm`` (column j processed = input
    channel perm[j]; None without act-order). The grid follows ``wq_quantize_rtn``'s ``mode``."""
    N, K = W.shape
    gs = K if group_size == -1 else group_size
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    dead = torch.diagonal(H) == 0  # inputs that are always 0: any weight works, make it 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:  # the columns with the largest input energy first, while many columns can absorb error
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    # U: upper Cholesky factor of H⁻¹. Row j of U (from j on), divided by U[j, j], is how the error of
    # column j is compensated by the later columns (the sequential OBS update in closed form).
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    maxq = float(2 ** bits - 1)
    float_zero = mode == "float_zero"
    Q = torch.zeros(N, K, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    # Lazy batches: errors are applied inside a block column by column and to the rest of W once per block.
    # Blocks are whole groups, so a group's columns are up to date when its grid is taken.
    B = gs * max(1, block_size // gs) if gs < K else block_size
    s = z = None
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % gs == 0:  # a new group: its min-max grid from the current (updated) weights, via the native op
                grp = torch.cat([W1[:, i:], W[:, i2:j + gs]], 1)[:, :gs]
                _, sg, zg = _ops.wq_quantize_rtn(grp.to(dtype), bits, -1, mode)
                scales.append(sg)
                zeros.append(zg)
                s, z = sg.float().reshape(-1), zg.float().reshape(-1)
            w = W1[:, i]
            if float_zero:  # w ≈ s·q − z
                q = torch.clamp(torch.round((w + z) / s), 0, maxq)
                wq = s * q - z
            else:  # w ≈ s·(q − z)
                q = torch.clamp(torch.round(w / s) + z, 0, maxq)
                wq = s * (q - z)
            Q[:, j] = q.to(torch.int32)
            e = (w - wq) / U1[i, i]
            W1[:, i + 1:] -= e.unsqueeze(1) * U1[i, i + 1:].unsqueeze(0)
            E[:, i] = e
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return Q, torch.cat(scales, 0), torch.cat(zeros, 0), perm


def _gptq_layer(kind: str, W: Tensor, bias: Optional[Tensor], H: Tensor, bits: int, group_size: int,
                dtype: torch.dtype, act_order: bool, damp: float, block_size: int):
    """An MPQLinear (GPTQ format; act-order: g_idx) or MBWQLinear (layer-mix; act-order: q_perm) from GPTQ."""
    N, K = W.shape
    gs = K if group_size == -1 else group_size
    dev = W.device
    mode = "int_zero" if kind == "mpq" else "float_zero"
    Q, s, z, perm = _gptq(W, H, bits, gs, mode, dtype, act_order, damp, block_size)
    codes = Q.t().contiguous()  # (K, N), processing order
    if kind == "mpq":
        layer = MPQLinear(K, N, w_bit=bits, dtype=dtype, group_size=gs, use_gba_quant=False, asym=True,
                          disable_bias=bias is None, device=dev)
        g_idx = torch.div(torch.arange(K, device=dev, dtype=torch.int32), gs, rounding_mode="floor")
        if perm is not None:  # back to input-channel order: row perm[j] holds processed column j
            codes_ch, g_ch = torch.empty_like(codes), torch.empty_like(g_idx)
            codes_ch[perm], g_ch[perm] = codes, g_idx
            codes, g_idx = codes_ch, g_ch
        layer.qweight.copy_(_ops.wq_pack(codes, [bits], [K]))
        layer.scales = s
        layer.qzeros.copy_(_ops.wq_pack_zeros(z, bits))
        layer.g_idx.copy_(g_idx)
    else:
        layer = MBWQLinear(K, N, w_bit=bits, group_size=gs, use_mbw=False, dtype=dtype, disable_bias=bias is None,
                           device=dev)
        layer.qweight.copy_(_ops.wq_pack(codes, [bits], [K]))  # stored rows in processing order
        layer.set_scales(s)
        layer.set_zeros(z)
        if perm is not None:
            layer.q_perm.copy_(perm.to(torch.int32).to(torch.int16))  # stored row r = input channel perm[r]
    if bias is not None:
        layer.bias.copy_(bias.detach().to(dtype))
    layer.prepare_params()
    return layer


def quantize_weight(weight: Tensor, bias: Optional[Tensor] = None, bits: int = 4, group_size: int = 128,
                    method: str = "rtn", layer: str = "mbwq", hessian: Optional[Tensor] = None,
                    act_order: bool = False, damp: float = 0.01, block_size: int = 128):
    """One float weight (N, K) in nn.Linear layout (+ optional bias) -> a prepared MBWQLinear / MPQLinear in
    the weight's dtype (float32 for other dtypes). ``method="gptq"`` needs ``hessian`` (K, K) = 2XᵀX/n."""
    dt = weight.dtype if weight.dtype in _FLOAT_DTYPES else torch.float32
    if method == "rtn":
        lin = types.SimpleNamespace(weight=weight.to(dt), bias=bias)
        if layer == "mpq":
            return MPQLinear.from_float(lin, w_bit=bits, group_size=group_size, asym=True, dtype=dt)
        return MBWQLinear.from_float(lin, w_bit=bits, group_size=group_size, dtype=dt)
    if hessian is None:
        raise ValueError("lowbit.quantize: method='gptq' needs the layer's Hessian (calibration inputs)")
    return _gptq_layer(layer, weight, bias, hessian, bits, group_size, dt, act_order, damp, block_size)


# ------------------------------------------------------------------------------------------- plan
def plan_bits(candidates: Sequence[Dict[int, Tuple[float, float]]], numels: Sequence[int],
              budget_bits: float) -> List[int]:
    """Greedy mixed-bit allocation. ``candidates[i]``: {bits: (bits_per_weight, relative_error)} of layer i,
    ``numels[i]`` its weight count. Starts every layer at its lowest width, then repeatedly applies the
    upgrade (to any wider candidate) with the largest Σ-error reduction (weights × err²) per added bit that
    keeps Σ weights × bits_per_weight ≤ budget × Σ weights. Returns the width per layer."""
    total = sum(numels)
    choice = [min(c) for c in candidates]
    used = sum(n * c[b][0] for n, c, b in zip(numels, candidates, choice))
    limit = budget_bits * total * (1 + 1e-12)
    if used > limit:
        raise ValueError(f"lowbit.quantize: budget_bits={budget_bits:g} is below what the narrowest candidate "
                         f"widths reach ({used / total:.4f} bits per weight, scales and zeros included)")
    while True:
        best = None
        for i, (n, c) in enumerate(zip(numels, candidates)):
            bpw0, e0 = c[choice[i]]
            for b, (bpw, e) in c.items():
                dbits, derr = n * (bpw - bpw0), n * (e0 * e0 - e * e)
                if b <= choice[i] or dbits <= 0 or derr <= 0 or used + dbits > limit:
                    continue
                if best is None or derr / dbits > best[0]:
                    best = (derr / dbits, i, b, dbits)
        if best is None:
            return choice
        _, i, b, dbits = best
        choice[i] = b
        used += dbits


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_args(bits: int, group_size: int, method: str, layer: str, budget_bits, candidate_bits,
                act_order=False, damp=0.01, block_size=128) -> Tuple[List[int], int]:
    """Checks the arguments shared by :func:`quantize` and :func:`quantize_weights`; returns the widths to
    build (one, or the usable candidates of a budget plan) and the group size, as ints."""
    who = "lowbit.quantize"
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{who}: method must be one of {METHODS}, got {method!r}")
    if not isinstance(layer, str) or layer not in LAYERS:
        raise ValueError(f"{who}: layer must be one of {tuple(LAYERS)}, got {layer!r}")
    if not _is_int(bits):
        raise TypeError(f"{who}: bits must be an int, got {bits!r} ({type(bits).__name__})")
    if not _is_int(group_size):
        raise TypeError(f"{who}: group_size must be an int, got {group_size!r} ({type(group_size).__name__})")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"{who}: group_size must be >= 1 or -1 (one group), got {group_size!r}")
    if isinstance(candidate_bits, (str, bytes)):
        raise TypeError(f"{who}: candidate_bits must be a sequence of ints, got the string {candidate_bits!r}")
    try:
        cand_in = tuple(candidate_bits)
    except TypeError:
        raise TypeError(f"{who}: candidate_bits must be a sequence of ints, got "
                        f"{type(candidate_bits).__name__}") from None
    for b in cand_in:
        if not _is_int(b):
            raise TypeError(f"{who}: candidate_bits must hold ints, got {b!r} ({type(b).__name__}) in {cand_in!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"{who}: act_order must be a bool, got {act_order!r}")
    if not _is_real(damp) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"{who}: damp must be a finite number >= 0, got {damp!r}")
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"{who}: block_size must be an int >= 1, got {block_size!r}")
    if budget_bits is None:
        if bits not in WIDTHS[layer]:
            raise ValueError(f"{who}: {layer} layers take bits in {WIDTHS[layer]}, got {bits!r}")
        return [int(bits)], int(group_size)
    if not _is_real(budget_bits):
        raise TypeError(f"{who}: budget_bits must be a number or None, got {budget_bits!r} "
                        f"({type(budget_bits).__name__})")
    if not budget_bits > 0:
        raise ValueError(f"{who}: budget_bits must be > 0, got {budget_bits!r}")
    known = sorted(set().union(*WIDTHS.values()))
    unknown = [b for b in cand_in if b not in known]
    if unknown:
        raise ValueError(f"{who}: candidate_bits {unknown} are no width of any layer type (widths: {known})")
    cands = sorted({int(b) for b in cand_in if b in WIDTHS[layer]})  # mpq has no 3-bit: skipped
    if not cands:
        raise ValueError(f"{who}: none of candidate_bits={cand_in} is a width of {layer} layers {WIDTHS[layer]}")
    return cands, int(group_size)


def quantize_weights(items: Sequence[Tuple[str, Tensor, Optional[Tensor], Optional[Tensor]]], bits: int = 4,
                     group_size: int = 128, method: str = "rtn", layer: str = "mbwq",
                     budget_bits: Optional[float] = None, candidate_bits: Sequence[int] = (2, 3, 4, 8),
                     act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                     progress: bool = True) -> Tuple[Dict[str, torch.nn.Module], QuantizationReport]:
    """The engine behind :func:`quantize` and ``lowbit quantize``: ``items`` = (name, weight (N, K), bias or
    None, Hessian or None). Returns ({name: prepared layer}, report). With ``budget_bits`` every candidate
    width of every layer is built before the plan picks one (about Σ candidate bits of quantized weights
    held at once)."""
    widths, group_size = _check_args(bits, group_size, method, layer, budget_bits, candidate_bits, act_order, damp,
                                     block_size)
    if act_order and method != "gptq":
        raise ValueError("lowbit.quantize: act_order=True needs method='gptq'")
    if not items:
        raise ValueError("lowbit.quantize: no layer to quantize (no nn.Linear / 2-D weight matches include/exclude)")
    report = QuantizationReport()
    report.method, report.layer, report.budget_bits = method, layer, budget_bits
    bar = progress_bar(len(items) * len(widths), f"quantize {method}", progress)
    built: List[Dict[int, Tuple[torch.nn.Module, dict]]] = []
    try:
        for name, W, b, H in items:
            if method == "gptq" and H is None:
                raise ValueError(f"lowbit.quantize: layer {name!r} saw no calibration input (GPTQ needs its Hessian)")
            per = {}
            for w in widths:
                bar.set_postfix_str(f"{name} {w}-bit")
                q = quantize_weight(W, b, w, group_size, method, layer, H, act_order, damp, block_size)
                per[w] = (q, _stats(name, q, W, b, H))
                bar.update(1)
            built.append(per)
        bar.set_postfix_str("done")
    finally:
        bar.close()
    if budget_bits is None:
        choice = [widths[0]] * len(items)
    else:
        cands = [{w: (st["bits_per_weight"], st["weight_error"]) for w, (_, st) in per.items()} for per in built]
        choice = plan_bits(cands, [W.numel() for _, W, _, _ in items], budget_bits)
    layers = {}
    for (name, _, _, _), per, w in zip(items, built, choice):
        q, st = per[w]
        if budget_bits is not None:
            st["candidates"] = {c: [s["bits_per_weight"], s["weight_error"]] for c, (_, s) in per.items()}
        layers[name] = q
        report.append(st)
    return layers, report


# ------------------------------------------------------------------------------------------- models
def _capture_hessians(model: torch.nn.Module, modules: Dict[str, torch.nn.Linear],
                      calibration: Iterable) -> Dict[str, Tensor]:
    """Runs ``model`` on every calibration item (Tensor: model(x); tuple/list: model(*x); dict: model(**x))
    with hooks on ``modules``, accumulating H = 2XᵀX/n per module (float64 on the CPU, float32 elsewhere)."""
    Hs: Dict[str, Tensor] = {}
    counts: Dict[str, int] = {}

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0].detach()
            K = x.shape[-1]
            x = x.reshape(-1, K).to(torch.float64 if x.device.type == "cpu" else torch.float32)
            m = x.shape[0]
            if m == 0:
                return
            n = counts.get(name, 0)
            H = Hs.get(name)
            if H is None:
                H = Hs[name] = torch.zeros(K, K, dtype=x.dtype, device=x.device)
            H.mul_(n / (n + m)).addmm_(x.t(), x, alpha=2.0 / (n + m))  # running mean of 2xxᵀ
            counts[name] = n + m
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Hs


def quantize(model: torch.nn.Module, bits: int = 4, group_size: int = 128, method: str = "rtn",
             layer: str = "mbwq", include: Optional[Iterable[str]] = None, exclude: Optional[Iterable[str]] = None,
             budget_bits: Optional[float] = None, candidate_bits: Sequence[int] = (2, 3, 4, 8),
             calibration: Optional[Iterable] = None, inplace: bool = False, progress: bool = True,
             act_order: bool = False, damp: float = 0.01,
             block_size: int = 128) -> Tuple[torch.nn.Module, QuantizationReport]:
    """Weight-only quantization of ``model``'s ``nn.Linear`` layers.

    Args:
        model: the float model (fp32, fp16 or bf16 weights; each new layer keeps its Linear's dtype).
        bits: width of every layer (an int; mbwq: 1, 2, 3, 4, 5, 6, 8; mpq: 1, 2, 4, 8) when there is no budget.
        group_size: input channels per scale/zero group (an int; -1: one group per output channel).
        method: ``"rtn"`` (round to nearest) or ``"gptq"`` (needs ``calibration``).
        layer: ``"mbwq"`` (``MBWQLinear`` layer-mix, float zeros: w = s·q − z) or ``"mpq"`` (``MPQLinear`` in
            GPTQ format, integer zero points: w = s·(q − z)).
        include / exclude: lists of ``fnmatch`` patterns on qualified module names, as in :func:`lowbit.convert`
            (default include everything, exclude nothing; keep a head float with ``exclude=["lm_head"]``; a
            single string is a TypeError). Only modules of exact type ``nn.Linear`` are replaced. A module
            used at several names (tied) is quantized once (reported under its first name) and the one new
            layer replaces it at all of them; include / exclude must select all its names or none.
        budget_bits: average bits per weight (scales and zeros counted) for a mixed-bit plan over
            ``candidate_bits``, a sequence of ints (widths a layer type does not take are skipped: mpq has no
            3-bit; a width no layer type takes is a ValueError).
        calibration: iterable of model inputs (Tensor, tuple of args or dict of kwargs). The float model runs
            on all of them once, with hooks on the matched layers recording H = 2XᵀX/n (K² floats per layer,
            all held at once). Needed by GPTQ; with RTN it only adds the output error to the report.
        inplace: modify ``model`` instead of a deep copy.
        progress: show a progress bar over the layers on stderr.
        act_order: GPTQ only: process columns in decreasing diag(H) order. mpq stores the resulting
            (non-monotone) ``g_idx``; mbwq stores the order as ``q_perm`` with contiguous groups.
        damp: GPTQ dampening, as a fraction of the mean of diag(H) added to the diagonal.
        block_size: GPTQ lazy-batch width (rounded to whole groups).

    Returns ``(model, report)``: the quantized model (layers prepared, ready for inference) and a
    :class:`QuantizationReport` (``print(report)`` shows the table)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lowbit.quantize: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_args(bits, group_size, method, layer, budget_bits, candidate_bits, act_order, damp, block_size)
    if method == "gptq" and calibration is None:
        raise ValueError("lowbit.quantize: method='gptq' needs calibration batches (calibration=[x1, x2, ...])")
    include = _patterns("lowbit.quantize", "include", include, ("*",))
    exclude = _patterns("lowbit.quantize", "exclude", exclude, ())
    for arg, value in (("inplace", inplace), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"lowbit.quantize: {arg} must be a bool, got {value!r}")
    if not inplace:
        model = copy.deepcopy(model)  # keeps modules tied: one copy per module, at all its names
    # Every nn.Linear with all its places: a module used at several names (tied) is quantized once and the
    # one new layer goes to all of them, so its names must agree on include / exclude.
    sites = _module_sites(model)
    if type(model) is torch.nn.Linear:
        sites[id(model)] = (model, [(None, "", "")])
    matched: Dict[str, torch.nn.Linear] = {}
    places_of: Dict[str, list] = {}
    for m, places in sites.values():
        if type(m) is not torch.nn.Linear:
            continue
        picked = [full for _, _, full in places if _kind_for(full, "wq", include, exclude, ()) is not None]
        if picked and len(picked) != len(places):
            others = [full for _, _, full in places if full not in picked]
            raise ValueError(f"lowbit.quantize: one nn.Linear is used at {len(places)} names (tied), and include / "
                             f"exclude select {picked} but not {others}; select all its names or none, or untie it")
        if picked:
            matched[places[0][2]] = m
            places_of[places[0][2]] = places
    if not matched:
        raise ValueError(f"lowbit.quantize: no nn.Linear module matches include={list(include)}, "
                         f"exclude={list(exclude)}")
    _warn_untied_parameters("lowbit.quantize", model, {id(m): n for n, m in matched.items()})
    Hs = _capture_hessians(model, matched, calibration) if calibration is not None else {}
    items = [(n, m.weight.detach(), None if m.bias is None else m.bias.detach(), Hs.get(n)) for n, m in matched.items()]
    layers, report = quantize_weights(items, bits, group_size, method, layer, budget_bits, candidate_bits,
                                      act_order, damp, block_size, progress)
    for name, new in layers.items():
        if name == "":
            return new, report
        for parent, child, _ in places_of[name]:
            setattr(parent, child, new)
    return model, report

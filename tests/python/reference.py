"""Independent references written from the math of docs/ops.md (never calling lowbit kernels).

The quantizer is defined in fp32 arithmetic (x + shift, then an IEEE division, round half to even), so
its codes are computed here with torch fp32 ops, which are IEEE-exact; everything after the codes
(products, sums, gradients) is computed in float64."""
import math

import torch


def codes(t: torch.Tensor, s: float, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(rne(t / s), qmin, qmax) with t, s in fp32; NaN -> 0. Returns float64 integers."""
    v = t.float() / torch.tensor(s, dtype=torch.float32)
    q = torch.round(v).clamp(qmin, qmax)
    q = torch.where(torch.isnan(v), torch.zeros_like(q), q)
    return q.double()


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def lsq_scale(t: torch.Tensor, qmax: float, eps=None) -> float:
    """max(2*mean|t|/sqrt(qmax), eps): mean in float64, rounded once to fp32."""
    s = f32(2.0 * t.double().abs().mean().item() / math.sqrt(qmax))
    return max(s, f32(float(eps))) if eps is not None else s


def q_linear_forward(x, bias_a, w_codes, s_a, s_w, qmin, qmax):
    """y = s_a*s_w * (Q(x + bias_a) @ Wq^T) in float64, and the activation codes."""
    t = x.float() + bias_a.float()
    qx = codes(t, s_a, qmin, qmax)
    y = (qx.reshape(-1, qx.shape[-1]) @ w_codes.double().t()) * f32(s_a * s_w)
    return y.reshape(*x.shape[:-1], w_codes.shape[0]), qx


def q_linear_backward(G, x, bias_a, w_codes, qx, s_a, s_w, qmin, qmax):
    """LSQ / STE gradients (Esser et al. 2020, clip terms kept) in float64:
    returns grad_x, grad_bias_a, grad_weight, grad_scale_a."""
    K = x.shape[-1]
    G = G.reshape(-1, w_codes.shape[0]).double()
    gA = G @ (w_codes.double() * s_w)
    v = ((x.float() + bias_a.float()) / torch.tensor(s_a, dtype=torch.float32)).reshape(-1, K).double()
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    gx = gA * inside
    r = torch.where(below, float(qmin), torch.where(above, float(qmax), torch.round(v) - v))
    gs = (r * gA).sum() / math.sqrt(x.numel() * qmax)
    gw = G.t() @ (qx.reshape(-1, K) * s_a)
    return gx.reshape(x.shape), gx.sum(0), gw, gs


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def lsq_input_grads(gA, t32, s, qmin, qmax, numel):
    """STE-masked input gradient and LSQ scale gradient (float64) for codes of t32 / s (t32 fp32)."""
    v = (t32.float() / torch.tensor(s, dtype=torch.float32)).double()
    below, above = v < qmin, v > qmax
    gx = gA * ~(below | above)
    r = torch.where(below, float(qmin), torch.where(above, float(qmax), torch.round(v) - v))
    return gx, (r * gA).sum() / math.sqrt(numel * qmax)


def pack_s4(codes: torch.Tensor) -> torch.Tensor:
    """int4 pairs along the last dim, first code in the high nibble (docs/formats.md)."""
    c = codes.to(torch.int64)
    if c.shape[-1] % 2:
        c = torch.cat([c, torch.zeros(*c.shape[:-1], 1, dtype=torch.int64)], -1)
    hi, lo = c[..., 0::2] & 0xF, c[..., 1::2] & 0xF
    b = (hi << 4) | lo
    return torch.where(b > 127, b - 256, b).to(torch.int8)

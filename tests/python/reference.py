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


# ---- Weight-only formats (spec_weight_only: GPTQ row packing, exl2 segments, GBA, MBWQ) ----------------
# Pure Python/torch bit manipulation in int64, independent of lowbit's packers.

def pack_stream(codes: torch.Tensor, seg_bits, seg_rows) -> torch.Tensor:
    """Codes (K, N) -> int32 words in the segment layout: per 32-row chunk of a b-bit segment, code j sits at
    bit j*b of the little-endian concatenation of the chunk's b words (padding rows are 0)."""
    K, N = codes.shape
    words, r0 = [], 0
    for b, end in zip(seg_bits, seg_rows):
        for c0 in range(r0, end, 32):
            acc = [0] * N
            chunk = codes[c0:min(c0 + 32, end)].long()
            for j in range(chunk.shape[0]):
                for n in range(N):
                    acc[n] |= int(chunk[j, n]) << (j * b)
            for i in range(b):
                words.append([((a >> (32 * i)) & 0xFFFFFFFF) for a in acc])
        r0 = end
    w = torch.tensor(words, dtype=torch.long).reshape(-1, N)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def unpack_stream(qweight: torch.Tensor, seg_bits, seg_rows) -> torch.Tensor:
    """Inverse of pack_stream: int32 words -> codes (K, N) int64."""
    q = qweight.long() & 0xFFFFFFFF
    N = q.shape[1]
    out, r0, w0 = [], 0, 0
    for b, end in zip(seg_bits, seg_rows):
        for c0 in range(r0, end, 32):
            vals = [sum(int(q[w0 + i, n]) << (32 * i) for i in range(b)) for n in range(N)]
            for j in range(min(32, end - c0)):
                out.append([(v >> (j * b)) & ((1 << b) - 1) for v in vals])
            w0 += b
        r0 = end
    return torch.tensor(out, dtype=torch.long).reshape(-1, N)


def pack_zeros_gptq(z: torch.Tensor, b: int) -> torch.Tensor:
    """GPTQ v1 zero points (G, N) -> (G, ceil(N*b/32)) words holding z - 1 along N, LSB first."""
    G, N = z.shape
    per = 32 // b
    words = []
    for g in range(G):
        row = []
        for w in range(-(-N // per)):
            v = 0
            for i in range(per):
                n = w * per + i
                if n < N:
                    v |= ((int(z[g, n]) - 1) & ((1 << b) - 1)) << (i * b)
            row.append(v - 2 ** 32 if v >= 2 ** 31 else v)
        words.append(row)
    return torch.tensor(words, dtype=torch.int32)


def wq_dense(codes, scales, zeros, g_idx, asym, perm=None) -> torch.Tensor:
    """W (K, N) float64 in input-channel order: stored row r -> channel perm[r];
    sym: s*q - z, asym: s*(q - z), with (s, z) of group g_idx[r]."""
    q = codes.double()
    s = scales.double()[g_idx.long()]
    z = zeros.double()[g_idx.long()]
    w = s * (q - z) if asym else s * q - z
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[perm.long()] = w
    return out


def wq_tol(x64: torch.Tensor, W: torch.Tensor, out_dtype: torch.dtype, cs=None, weight_rounding=False) -> torch.Tensor:
    """Per-element bound for a weight-only matmul against the float64 reference. fp32 accumulation in any
    order: 1e-5 * sum|x'||W|. A 16-bit output adds its rounding of |ref| (2^-8 bf16, 2^-11 fp16). With
    weight_rounding (the large-M path multiplies by the weight and x' rounded to the activation dtype) each
    product term may carry two such roundings."""
    xs = x64.abs() if cs is None else (x64 * cs.double()).abs()
    mag = xs @ W.abs()
    eps = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[out_dtype]
    ref = (x64 if cs is None else x64 * cs.double()) @ W
    tol = 1e-5 * mag + eps * ref.abs() + 1e-6
    if weight_rounding:
        tol = tol + 2 * eps * mag
    return tol


def rows_s8(t: torch.Tensor, qmax: int = 127):
    """Per-row symmetric int8 quantization in float64 from the definition: scale = fp32(max|row| / qmax),
    q = clamp(rne(fp32(row / scale)), -qmax, qmax); all-zero row: scale 0, q 0; a row with inf/NaN: scale
    NaN, q 0. (Dividing two fp32 values in float64 and rounding once to fp32 is the correctly rounded fp32
    quotient.) Returns (q int8, scale float32) with shapes t.shape and t.shape[:-1]."""
    t32 = t.float().cpu()
    rows = t32.reshape(-1, t32.shape[-1]).double()
    finite = torch.isfinite(rows).all(dim=1)
    amax = rows.abs().amax(dim=1) if rows.shape[1] > 0 else torch.zeros(rows.shape[0], dtype=torch.float64)
    scale = (amax / qmax).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).double()
    q = torch.round((rows / safe[:, None]).float().double()).clamp(-qmax, qmax)
    q = torch.where((scale > 0)[:, None] & finite[:, None], q, torch.zeros_like(q))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q.to(torch.int8).reshape(t.shape), scale.reshape(t.shape[:-1])

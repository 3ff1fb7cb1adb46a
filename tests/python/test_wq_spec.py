"""The weight-only layers (MPQLinear / MBWQLinear and their BIE aliases) against the spec of the formats
(spec_weight_only.md: dequantization, checkpoint keys, BIE's defects) and issue 3's text, with float64
references written here from the spec's formulas (own bit packers, own decode; nothing from lowbit or
tests/python/reference.py). Tolerance: 1e-5 relative against the float64 product (fp32 activations),
1e-2 for fp16 / bf16."""
import io
import math
import warnings

import pytest
import torch

import lowbit
from lowbit.compat import MBWQLinearCuda, MPQLinearCuda, MPQLinearMlx, prepare_bie_layers
from lowbit.nn import MBWQLinear, MPQLinear

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
REL_TOL = {F32: 1e-5, F16: 1e-2, BF16: 1e-2}  # DESIGN.md: ||out - ref|| / ||ref||


# ---------------------------------------------------------------------------------------------------
# Independent packers (spec §2 and §5.3), int64 bit arithmetic.

def _to_i32(w):
    w = w & 0xFFFFFFFF
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def pack_rows(codes, b):
    """(K, N) codes -> int32 (ceil(K/32)*b, N): 32/b consecutive K-rows per word, lowest row in the LSBs.
    A partial last 32-row chunk is zero padded (lowbit takes any K; BIE needs K % 32 == 0)."""
    K, N = codes.shape
    per = 32 // b
    Kp = math.ceil(K / 32) * 32
    c = torch.zeros(Kp, N, dtype=torch.int64)
    c[:K] = codes.long()
    c = c.view(Kp // per, per, N)
    w = torch.zeros(Kp // per, N, dtype=torch.int64)
    for j in range(per):
        w |= (c[:, j, :] & ((1 << b) - 1)) << (j * b)
    return _to_i32(w)


def pack_zeros(zp, b):
    """GPTQ v1 zero points (G, N) -> int32 (G, ceil(N*b/32)) holding zp - 1, packed along N LSB-first."""
    G, N = zp.shape
    per = 32 // b
    words = math.ceil(N * b / 32)
    c = torch.zeros(G, words * per, dtype=torch.int64)
    c[:, :N] = (zp.long() - 1) & ((1 << b) - 1)
    c = c.view(G, words, per)
    w = torch.zeros(G, words, dtype=torch.int64)
    for j in range(per):
        w |= c[:, :, j] << (j * b)
    return _to_i32(w)


def pack_stream(codes, b):
    """exl2 segment (§5.3): per 32-row chunk of one column, b words little-endian; row j in bits [j*b, j*b+b)."""
    K, N = codes.shape
    Kp = math.ceil(K / 32) * 32
    c = torch.zeros(Kp, N, dtype=torch.int64)
    c[:K] = codes.long()
    out = torch.zeros(Kp // 32 * b, N, dtype=torch.int64)
    for ch in range(Kp // 32):
        for j in range(32):
            v = c[ch * 32 + j]
            p = j * b
            wi, off = p // 32, p % 32
            out[ch * b + wi] |= (v << off) & 0xFFFFFFFF
            if off + b > 32:
                out[ch * b + wi + 1] |= v >> (32 - off)
    return _to_i32(out)


def unpack_rows(q, b, K):
    w = q.long() & 0xFFFFFFFF
    per = 32 // b
    k = torch.arange(K)
    return (w[k // per] >> ((k % per) * b).unsqueeze(1)) & ((1 << b) - 1)


def unpack_stream(q, b, K):
    w = q.long() & 0xFFFFFFFF
    out = torch.zeros(K, q.shape[1], dtype=torch.int64)
    for k in range(K):
        ch, j = divmod(k, 32)
        p = j * b
        wi, off = ch * b + p // 32, p % 32
        v = w[wi] >> off
        if off + b > 32:
            v = v | (w[wi + 1] << (32 - off))
        out[k] = v & ((1 << b) - 1)
    return out


def unpack_zeros(qz, b, N):
    w = qz.long() & 0xFFFFFFFF
    per = 32 // b
    n = torch.arange(N)
    return ((w[:, n // per] >> ((n % per) * b)) & ((1 << b) - 1)) + 1


def relerr(y, ref):
    y = y.double().reshape(ref.shape)
    assert torch.isfinite(y).all()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def dense_asym(codes, scales, zp, g_idx):
    g = g_idx.long()
    return scales.double()[g] * (codes.double() - zp.double()[g])


def dense_sym(codes, scales, zeros, g_idx):
    g = g_idx.long()
    return codes.double() * scales.double()[g] - zeros.double()[g]


def gptq_checkpoint(K, N, b, gs, act_order, dt=F16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gsz = K if gs == -1 else gs
    G = math.ceil(K / gsz)
    codes = torch.randint(0, 2 ** b, (K, N), generator=gen)
    zp = torch.randint(1, 2 ** b + 1, (G, N), generator=gen)  # stored minus one: zp in [1, 2^b]
    s = (torch.rand(G, N, generator=gen) * 0.05 + 0.005).to(dt)
    g_idx = torch.arange(K) // gsz
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    sd = {"qweight": pack_rows(codes, b), "qzeros": pack_zeros(zp, b), "scales": s, "g_idx": g_idx.int()}
    return sd, dense_asym(codes, s, zp, g_idx)


def loaded(cls, sd, strict=True, **kw):
    layer = cls(**kw)
    layer.load_state_dict(sd, strict=strict)
    layer.prepare_params()
    return layer


# ---------------------------------------------------------------------------------------------------
# MPQ: GPTQ

@pytest.mark.parametrize("b", [1, 2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_forward_odd_shapes_all_dtypes(b, act_order):
    K, N, gs = 77, 45, 16
    sd, W = gptq_checkpoint(K, N, b, gs, act_order)
    layer = loaded(MPQLinearCuda, sd, in_channels=K, out_channels=N, w_bit=b, group_size=gs, use_gba_quant=False)
    assert layer.asym  # forced in GPTQ mode
    for dt in (F32, F16, BF16):
        for lead in ((1,), (3, 7), (41,)):  # fused (small M) and tiled (large M) paths
            x = torch.randn(*lead, K).to(dt)
            y = layer(x)
            assert y.dtype == dt and y.shape == (*lead, N)
            assert relerr(y, x.double().reshape(-1, K) @ W) <= REL_TOL[dt]


def test_gptq_n_5504_and_k_not_multiple_of_256():
    K, N = 288, 5504  # BIE corrupts memory at N = 5504 (spec §4.2, §11.2)
    sd, W = gptq_checkpoint(K, N, 4, 32, True)
    layer = loaded(MPQLinear, sd, in_channels=K, out_channels=N, w_bit=4, group_size=32, use_gba_quant=False)
    for M in (1, 20):
        x = torch.randn(M, K)
        assert relerr(layer(x), x.double() @ W) <= 1e-5


def test_gptq_group_size_minus_one_and_tiny_shapes():
    for K, N, b in ((1, 1, 4), (32, 1, 8), (33, 3, 2)):
        sd, W = gptq_checkpoint(K, N, b, -1, False)
        layer = loaded(MPQLinear, sd, in_channels=K, out_channels=N, w_bit=b, use_gba_quant=False)
        x = torch.randn(2, K)
        assert relerr(layer(x), x.double() @ W) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# MPQ: GBA sym (qstatistic nibbles, double quantization decoded in the layer dtype, spec §3.4)

def gba_sym_checkpoint(K, N, b, gs, D, act_order=False, dq_mode=2, dt=F16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    G = math.ceil(K / gs)
    Dv = N if D == -1 else D
    NB = math.ceil(N / Dv)
    codes = torch.randint(0, 2 ** b, (K, N), generator=gen)
    qstat = torch.randint(0, 256, (G, NB, Dv), dtype=torch.uint8, generator=gen)
    dqs = (1, N, 1) if dq_mode == 1 else (G, NB, 1)
    qsz = (torch.rand(*dqs, generator=gen) * 6).to(dt)
    qss = (torch.rand(*dqs, generator=gen) * 0.01 + 0.001).to(dt)
    qzz = (torch.rand(G, NB, 1, generator=gen) * 6).to(dt)
    qzs = (torch.rand(G, NB, 1, generator=gen) * 0.01 + 0.001).to(dt)
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    sd = {"qweight": pack_rows(codes, b), "qstatistic": qstat, "qscales_zeros": qsz, "qscales_scales": qss,
          "qzeros_zeros": qzz, "qzeros_scales": qzs, "g_idx": g_idx.int()}
    # per element, in the layer dtype: s[g,n] = (hi[g, n//D, n%D] - qsz[g, n//D]) * qss[g, n//D]
    n = torch.arange(N)
    hi, lo = (qstat >> 4)[:, n // Dv, n % Dv].to(dt), (qstat & 15)[:, n // Dv, n % Dv].to(dt)
    if dq_mode == 1:
        s = (hi - qsz[0, :, 0]) * qss[0, :, 0]
    else:
        s = (hi - qsz[:, n // Dv, 0]) * qss[:, n // Dv, 0]
    z = (lo - qzz[:, n // Dv, 0]) * qzs[:, n // Dv, 0]
    return sd, s, z, dense_sym(codes, s, z, g_idx)


@pytest.mark.parametrize("b", [1, 2, 4, 8])
@pytest.mark.parametrize("K,N,gs,D,act_order", [(96, 64, 32, 32, False), (77, 48, 16, 16, True),
                                                (128, 40, 64, -1, True)])
def test_gba_sym_double_quant(b, K, N, gs, D, act_order):
    sd, s, z, W = gba_sym_checkpoint(K, N, b, gs, D, act_order)
    kw = dict(in_channels=K, out_channels=N, w_bit=b, group_size=gs, dq_group_size=D)
    layer = loaded(MPQLinear, sd, **kw)  # strict: scales / zeros are derived, not required (§10.3)
    prepared = layer.state_dict()
    assert torch.equal(prepared["scales"], s) and torch.equal(prepared["zeros"], z)  # bit-exact fp16 decode
    x = torch.randn(3, K)
    y = layer(x)
    assert relerr(y, x.double() @ W) <= 1e-5
    # the prepared state dict (no double-quantization tensors) round-trips into a fresh layer
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    assert torch.equal(loaded(MPQLinear, torch.load(buf), **kw)(x), y)


def test_gba_sym_checkpoint_scales_zeros_are_overridden_by_decode_and_wf_bias_accepted():
    K, N, gs, D = 96, 64, 32, 32
    sd, s, z, W = gba_sym_checkpoint(K, N, 4, gs, D, act_order=True)
    sd = dict(sd, scales=torch.ones(3, N, dtype=F16), zeros=torch.zeros(3, N, dtype=F16),
              wf=torch.arange(0, 32, 4, dtype=torch.int32).view(1, 8), bias=torch.zeros(N, dtype=F16))
    layer = loaded(MPQLinear, sd, in_channels=K, out_channels=N, w_bit=4, group_size=gs, dq_group_size=D)
    x = torch.randn(2, K)
    assert relerr(layer(x), x.double() @ W) <= 1e-5


def test_gba_sym_dq_mode1_with_d1():
    K, N, gs = 64, 24, 32
    sd, s, z, W = gba_sym_checkpoint(K, N, 2, gs, 1, dq_mode=1)
    layer = loaded(MPQLinear, sd, in_channels=K, out_channels=N, w_bit=2, group_size=gs, dq_group_size=1, dq_mode=1)
    x = torch.randn(2, K)
    assert relerr(layer(x), x.double() @ W) <= 1e-5


@pytest.mark.parametrize("K,N", [(64, 16), (160, 40)])
def test_gba_sym_n_not_multiple_of_dq_group_size(K, N):
    sd, s, z, W = gba_sym_checkpoint(K, N, 4, 32, 32)
    layer = MPQLinear(K, N, w_bit=4, group_size=32, dq_group_size=32)
    assert tuple(layer.qstatistic.shape) == (math.ceil(K / 32), math.ceil(N / 32), 32)  # the ctor's padded blocks
    layer.load_state_dict(sd)
    try:
        layer.prepare_params()
    except (RuntimeError, ValueError) as e:  # a clear refusal would also be acceptable
        assert "dq_group_size" in str(e) or "multiple" in str(e)
        return
    x = torch.randn(2, K)
    assert relerr(layer(x), x.double() @ W) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# MPQ: GBA asym (packed integer zeros, 8-bit qscales codes)

@pytest.mark.parametrize("b,dq_mode,K,N,gs,D", [(4, 2, 96, 64, 32, 32), (4, 2, 77, 64, 16, -1),
                                                (2, 1, 96, 40, 32, 32), (2, 2, 96, 40, 32, -1),
                                                (8, 2, 64, 32, 32, -1), (1, 2, 64, 32, 32, -1)])
def test_gba_asym_double_quant(b, dq_mode, K, N, gs, D):
    gen = torch.Generator().manual_seed(2)
    G = math.ceil(K / gs)
    Dv = N if D == -1 else D
    NB = math.ceil(N / Dv)
    codes = torch.randint(0, 2 ** b, (K, N), generator=gen)
    zp = torch.randint(1, 2 ** b + 1, (G, N), generator=gen)
    qs = torch.randint(0, 256, (G, NB, Dv) if b == 4 else (G, N), dtype=torch.uint8, generator=gen)
    dqs = (1, N, 1) if dq_mode == 1 else (G, NB, 1)
    qsz = (torch.rand(*dqs, generator=gen) * 4).half()
    qss = (torch.rand(*dqs, generator=gen) * 0.001 + 1e-4).half()
    g_idx = torch.arange(K) // gs
    sd = {"qweight": pack_rows(codes, b), "qzeros": pack_zeros(zp, b), "qscales": qs, "qscales_zeros": qsz,
          "qscales_scales": qss, "g_idx": g_idx.int()}
    c = qs.half() if b == 4 else qs.half().unsqueeze(-1)
    s = ((c - qsz) * qss).reshape(G, N)
    W = dense_asym(codes, s, zp, g_idx)
    kw = dict(in_channels=K, out_channels=N, w_bit=b, group_size=gs, dq_group_size=D, dq_mode=dq_mode, asym=True)
    layer = loaded(MPQLinear, sd, **kw)
    x = torch.randn(3, K)
    y = layer(x)
    assert relerr(y, x.double() @ W) <= 1e-5
    assert torch.equal(loaded(MPQLinear, layer.state_dict(), **kw)(x), y)


@pytest.mark.parametrize("b,dq_mode,D,asym", [(8, 2, 32, True), (4, 1, 32, True), (4, 1, 32, False)])
def test_gba_configurations_without_valid_broadcast_raise_clearly(b, dq_mode, D, asym):
    K, N, gs = 64, 64, 32
    layer = MPQLinear(K, N, w_bit=b, group_size=gs, dq_group_size=D, dq_mode=dq_mode, asym=asym)
    with pytest.raises((RuntimeError, ValueError), match="double-quantization|qscales|qstatistic"):
        layer.prepare_params()


@pytest.mark.parametrize("asym", [False, True])
def test_gba_group_size_256_uses_checkpoint_scales(asym):
    K, N, gs, b = 600, 40, 256, 4
    gen = torch.Generator().manual_seed(3)
    G = math.ceil(K / gs)
    codes = torch.randint(0, 16, (K, N), generator=gen)
    s = (torch.rand(G, N, generator=gen) * 0.1).half()
    g_idx = (torch.arange(K) // gs).int()
    layer = MPQLinear(K, N, w_bit=b, group_size=gs, dq_group_size=-1, asym=asym)
    sd = layer.state_dict()  # BIE's checkpoints of this kind carry the (unused) double-quantization tensors too
    if asym:
        zp = torch.randint(1, 17, (G, N), generator=gen)
        sd.update(qweight=pack_rows(codes, b), qzeros=pack_zeros(zp, b), scales=s, g_idx=g_idx)
        W = dense_asym(codes, s, zp, g_idx)
    else:
        z = (torch.rand(G, N, generator=gen) * 0.1).half()
        sd.update(qweight=pack_rows(codes, b), scales=s, zeros=z, g_idx=g_idx)
        W = dense_sym(codes, s, z, g_idx)
    layer.load_state_dict(sd)
    layer.prepare_params()
    x = torch.randn(2, K)
    assert relerr(layer(x), x.double() @ W) <= 1e-5


@pytest.mark.parametrize("with_qzeros", [True, False])
def test_bie_prepared_gba_asym_state_dict_loads(with_qzeros):
    K, N, b, gs = 64, 32, 4, 32
    sd, W = gptq_checkpoint(K, N, b, gs, False)
    bie = {"qweight": sd["qweight"], "scales": sd["scales"], "g_idx": sd["g_idx"], "zeros": sd["qzeros"].clone()}
    if with_qzeros:
        bie["qzeros"] = sd["qzeros"]
    layer = loaded(MPQLinearCuda, bie, in_channels=K, out_channels=N, w_bit=b, group_size=gs, dq_group_size=32,
                   asym=True)
    x = torch.randn(2, K)
    assert relerr(layer(x), x.double() @ W) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# MPQ: act-order state dict keeps the checkpoint's order

def test_gptq_act_order_state_dict_round_trip_is_identity():
    K, N = 96, 40
    sd, W = gptq_checkpoint(K, N, 4, 32, True)
    layer = loaded(MPQLinear, sd, in_channels=K, out_channels=N, w_bit=4, group_size=32, use_gba_quant=False)
    out = layer.state_dict()
    assert set(out) == {"qweight", "qzeros", "scales", "g_idx"}
    for k in sd:
        assert out[k].dtype == sd[k].dtype and torch.equal(out[k], sd[k]), k


# ---------------------------------------------------------------------------------------------------
# MBWQ layer-mix

def layer_mix_checkpoint(K, N, b, gs, perm=True, seed=4, zero_perm=False):
    gen = torch.Generator().manual_seed(seed)
    g = K if gs == -1 else gs
    G = math.ceil(K / g)
    codes = torch.randint(0, 2 ** b, (K, N), generator=gen)
    s = (torch.randn(G, N, generator=gen) * 0.05).half()
    z = (torch.randn(G, N, generator=gen) * 0.05).half()
    p = torch.randperm(K, generator=gen) if perm else torch.arange(K)
    cs = (torch.rand(1, 1, K, generator=gen) + 0.5).half()
    Wst = dense_sym(codes, s, z, torch.arange(K) // g)  # stored order
    Wo = torch.empty_like(Wst)
    Wo[p] = Wst  # W_orig[q_perm[r]] = Wst[r]
    q_perm = torch.zeros(K, dtype=torch.int16) if zero_perm else p.to(torch.int16)
    sd = {"qweight": pack_rows(codes, b), "scales": s, "zeros": z, "q_perm": q_perm, "channel_scale": cs}
    return sd, Wo, Wst


@pytest.mark.parametrize("b", [2, 4])
@pytest.mark.parametrize("K,N,gs", [(128, 36, 32), (100, 37, 64), (64, 1, -1)])
def test_layer_mix_forward_and_q42fp_exact(b, K, N, gs):
    sd, Wo, Wst = layer_mix_checkpoint(K, N, b, gs)
    layer = loaded(MBWQLinearCuda, sd, in_channels=K, out_channels=N, w_bit=b, group_size=gs, use_mbw=False)
    cs = sd["channel_scale"].double().reshape(-1)
    for dt in (F32, F16, BF16):
        for M in (1, 5, 33):
            x = torch.randn(M, K).to(dt)
            y = layer(x)
            assert y.dtype == dt and y.shape == (M, N)  # 2-D stays 2-D (spec §11.7)
            assert relerr(y, (x.double() * cs) @ Wo) <= REL_TOL[dt]
    g = K if gs == -1 else gs
    Wq = MBWQLinearCuda.q42fp_weight(sd["qweight"], sd["scales"], sd["zeros"], g, b, sd["q_perm"])
    assert Wq.dtype == F16 and torch.equal(Wq, Wo.half())  # q*s - z rounded once


def test_layer_mix_zero_q_perm_is_identity_and_absent_keys():
    K, N, b, gs = 96, 16, 4, 32
    sd, Wo, Wst = layer_mix_checkpoint(K, N, b, gs, zero_perm=True)
    Wq = MBWQLinear.q42fp_weight(sd["qweight"], sd["scales"], sd["zeros"], gs, b, sd["q_perm"])
    assert torch.equal(Wq, Wst.half())
    x = torch.randn(3, K)
    for drop in ((), ("q_perm",), ("q_perm", "channel_scale")):
        s2 = {k: v for k, v in sd.items() if k not in drop}
        layer = loaded(MBWQLinear, s2, in_channels=K, out_channels=N, w_bit=b, group_size=gs, use_mbw=False)
        cs = sd["channel_scale"].double().reshape(-1) if "channel_scale" not in drop else 1.0
        assert relerr(layer(x), (x.double() * cs) @ Wst) <= 1e-5


def test_layer_mix_q_perm_int16_beyond_32767():
    K, N, b, gs = 33000, 2, 4, 128
    sd, Wo, _ = layer_mix_checkpoint(K, N, b, gs)
    assert (sd["q_perm"] < 0).any()  # int16 storage, read as uint16 (§11.6)
    layer = loaded(MBWQLinear, sd, in_channels=K, out_channels=N, w_bit=b, group_size=gs, use_mbw=False)
    x = torch.randn(2, K)
    assert relerr(layer(x), (x.double() * sd["channel_scale"].double().reshape(-1)) @ Wo) <= 1e-5


def test_layer_mix_bie_flow_set_scales_after_prepare():
    """spec §9.1: load qweight, prepare_params(), then set_scales / set_zeros; q_perm left all zero."""
    K, N, b, gs = 256, 64, 4, 64
    codes = torch.randint(0, 2 ** b, (K, N))
    layer = MBWQLinearCuda(K, N, w_bit=b, group_size=gs, use_mbw=False, dq_group_size=1)
    layer.load_state_dict({"qweight": pack_rows(codes, b)}, strict=False)
    layer.prepare_params()
    s, z = torch.randn(K // gs, N).half(), torch.randn(K // gs, N).half()
    layer.set_scales(s)
    layer.set_zeros(z)
    W = dense_sym(codes, s, z, torch.arange(K) // gs)
    x = torch.randn(5, K).half()
    assert relerr(layer(x), x.double() @ W) <= 1e-2
    layer.check_parameters()


# ---------------------------------------------------------------------------------------------------
# MBWQ channel-mix

def channel_mix_checkpoint(segs, N, seed=5):
    """segs: [(bits, rows, group_size)] in the order 8, 6, 5, 4, 3, 2. Returns sd, W_orig, rows (BIE's 7 ints),
    q_group_map (BIE's make_group_map), G, P."""
    gen = torch.Generator().manual_seed(seed)
    codes_l, words, q_groups, gid, start, gi = [], [], [], [], 0, 0
    for b, n, gs in segs:
        c = torch.randint(0, 2 ** b, (n, N), generator=gen)
        codes_l.append(c)
        words.append(pack_stream(c, b))
        for g0 in range(0, n, gs):
            rows = min(gs, n - g0)
            q_groups += [b, start]
            start += math.ceil(rows / 32) * b
            gid += [gi] * rows
            gi += 1
    codes = torch.cat(codes_l)
    K, G = codes.shape[0], gi
    qweight = torch.cat(words)
    s = (torch.randn(G, N, generator=gen) * 0.05).half()
    z = (torch.randn(G, N, generator=gen) * 0.05).half()
    gid = torch.tensor(gid)
    Wst = dense_sym(codes, s, z, gid)
    perm = torch.randperm(K, generator=gen)
    Wo = torch.empty_like(Wst)
    Wo[perm] = Wst
    cum, acc = {}, 0
    for b, n, _ in segs:
        acc += n
        cum[b] = acc
    ends, prev, mask = [], 0, 0
    for b in (8, 6, 5, 4, 3, 2):
        if b in cum:
            prev = cum[b]
            mask |= 1 << (b - 1)
        ends.append(prev)
    gmap = []
    for i, S in enumerate(torch.bincount(gid).tolist()):
        for j in range(S):
            gmap += [i, S - j]
    sd = {"qweight": qweight, "scales": s, "zeros": z, "q_groups": torch.tensor(q_groups, dtype=torch.int16),
          "q_perm": perm.to(torch.int16), "channel_scale": (torch.rand(1, 1, K, generator=gen) + 0.5).half()}
    return sd, Wo, ends + [mask], torch.tensor(gmap, dtype=torch.int16), G, qweight.shape[0]


SEGS = [[(8, 32, 32), (6, 64, 32), (5, 32, 32), (4, 64, 64), (3, 32, 32), (2, 64, 32)],
        [(4, 96, 32), (2, 160, 32)], [(8, 64, 32), (2, 32, 32)], [(6, 32, 32), (3, 64, 64)], [(5, 64, 32)],
        [(4, 32, 32), (2, 40, 40)]]


@pytest.mark.parametrize("segs", SEGS, ids=lambda s: "-".join(f"{b}x{n}" for b, n, _ in s))
def test_channel_mix_forward_rows_and_exl2fp_exact(segs):
    N = 12
    sd, Wo, rows, gmap, G, P = channel_mix_checkpoint(segs, N)
    K = Wo.shape[0]
    layer = loaded(MBWQLinearCuda, sd, in_channels=K, out_channels=N, use_mbw=True, groups=G, rows_packed=P,
                   w_bit=segs[0][0])
    assert list(layer.rows) == rows  # the 7 ints, derived at load (never stored)
    assert set(layer.state_dict()) == set(sd)
    cs = sd["channel_scale"].double().reshape(-1)
    for dt in (F16, F32):
        for M in (1, 5, 33):
            x = torch.randn(M, K).to(dt)
            assert relerr(layer(x), (x.double() * cs) @ Wo) <= REL_TOL[dt]
    W = MBWQLinearCuda.exl2fp_weight(sd["qweight"], sd["scales"], sd["zeros"], sd["q_perm"], gmap, rows)
    assert W.dtype == F16 and torch.equal(W, Wo.half())


def test_channel_mix_full_bie_state_dict_and_input_gradient():
    segs, N = [(4, 64, 32), (2, 64, 64)], 16
    sd, Wo, rows, gmap, G, P = channel_mix_checkpoint(segs, N)
    K = Wo.shape[0]
    full = dict(sd, g_idx=torch.zeros(K, dtype=torch.int32), bias=torch.zeros(N, dtype=F16),
                wf=torch.arange(0, 32, 4, dtype=torch.int32).view(1, 8),
                qstatistic=torch.ones(1, 1, N, dtype=torch.uint8), qzeros_zeros=torch.zeros(1, 1, 1, dtype=F16),
                qzeros_scales=torch.ones(1, 1, 1, dtype=F16), qscales_zeros=torch.zeros(1, 1, 1, dtype=F16),
                qscales_scales=torch.ones(1, 1, 1, dtype=F16))  # BIE's base-class buffers in the checkpoint
    layer = loaded(MBWQLinear, full, in_channels=K, out_channels=N, use_mbw=True, groups=G, rows_packed=P)
    cs = sd["channel_scale"].double().reshape(-1)
    for dt in (F32, F16):
        x = torch.randn(2, 3, K).to(dt).requires_grad_()
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        assert x.grad.dtype == dt and x.grad.shape == x.shape
        ref = ((g.double().reshape(-1, N) @ Wo.t()) * cs).reshape(x.shape)
        assert relerr(x.grad, ref) <= REL_TOL[dt]


def test_channel_mix_load_state_dict_adopts_checkpoint_shapes_as_bie():
    segs, N = [(4, 96, 32), (2, 160, 32)], 12
    sd, Wo, rows, gmap, G, P = channel_mix_checkpoint(segs, N)
    K = Wo.shape[0]
    layer = MBWQLinearCuda(K, N, use_mbw=True)  # default groups=64, rows_packed=64
    layer.load_state_dict(sd)
    layer.prepare_params()
    x = torch.randn(2, K)
    assert relerr(layer(x), (x.double() * sd["channel_scale"].double().reshape(-1)) @ Wo) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# Bias, leading dims, gradients

def test_bias_leading_dims_and_dropped_bias_warning():
    K, N = 96, 40
    sd, W = gptq_checkpoint(K, N, 4, 32, True)
    bias = torch.randn(N).half()
    layer = loaded(MPQLinear, dict(sd, bias=bias), in_channels=K, out_channels=N, w_bit=4, group_size=32,
                   use_gba_quant=False, disable_bias=False)
    for shape in ((K,), (0, K), (2, 3, 4, K)):
        x = torch.randn(*shape)
        y = layer(x)
        assert y.shape == (*shape[:-1], N)
        if y.numel():
            ref = (x.double().reshape(-1, K) @ W + bias.double()).reshape(y.shape)
            assert relerr(y, ref) <= 1e-5
    xt = torch.randn(K, 5).t()  # non-contiguous
    assert relerr(layer(xt), xt.double() @ W + bias.double()) <= 1e-5
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        nob = loaded(MPQLinear, dict(sd, bias=bias), in_channels=K, out_channels=N, w_bit=4, group_size=32,
                     use_gba_quant=False)
    assert any("bias" in str(w.message) for w in rec)
    x = torch.randn(2, K)
    assert relerr(nob(x), x.double() @ W) <= 1e-5


@pytest.mark.parametrize("dt", [F32, F16, BF16])
def test_mpq_input_gradient_and_bias_gradient(dt):
    K, N = 77, 45
    sd, W = gptq_checkpoint(K, N, 2, 16, True)
    layer = loaded(MPQLinear, dict(sd, bias=torch.randn(N).half()), in_channels=K, out_channels=N, w_bit=2,
                   group_size=16, use_gba_quant=False, disable_bias=False)
    for M in (3, 40):
        x = torch.randn(M, K).to(dt).requires_grad_()
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        assert x.grad.dtype == dt
        assert relerr(x.grad, g.double() @ W.t()) <= REL_TOL[dt]


# ---------------------------------------------------------------------------------------------------
# from_float: round to nearest per group

@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("b", [1, 2, 4, 8])
def test_mpq_from_float_is_round_to_nearest(asym, b):
    K, N, gs = 100, 7, 32  # gs does not divide K
    torch.manual_seed(b)
    lin = torch.nn.Linear(K, N)
    lin.weight.data = torch.randn(N, K) * 0.1 + (0.2 if b == 1 else 0.0)
    layer = MPQLinear.from_float(lin, w_bit=b, group_size=gs, asym=asym, dtype=F32)
    sd = layer.state_dict()
    codes = unpack_rows(sd["qweight"], b, K).double()
    gi = torch.arange(K) // gs
    s = sd["scales"].double()[gi]
    Wt = lin.weight.detach().double().t()
    if asym:
        z = unpack_zeros(sd["qzeros"], b, N).double()[gi]
        What, rtn = s * (codes - z), (torch.round(Wt / s) + z).clamp(0, 2 ** b - 1)
    else:
        z = sd["zeros"].double()[gi]
        What, rtn = s * codes - z, torch.round((Wt + z) / s).clamp(0, 2 ** b - 1)
    assert torch.equal(rtn, codes)  # nearest code for the stored scale and zero
    assert ((What - Wt).abs() <= s.abs() * 0.5 * (1 + 1e-5)).all()  # every weight within half a step
    x = torch.randn(3, K)
    assert relerr(layer(x), x.double() @ What + lin.bias.double()) <= 1e-5


def test_mbwq_from_float_layer_mix_and_channel_mix():
    torch.manual_seed(7)
    K, N, gs = 100, 6, 32
    lin = torch.nn.Linear(K, N)
    perm = torch.randperm(K)
    m = MBWQLinear.from_float(lin, w_bit=4, group_size=gs, perm=perm)
    sd = m.state_dict()
    Wq = MBWQLinear.q42fp_weight(sd["qweight"], sd["scales"], sd["zeros"], gs, 4, sd["q_perm"]).double()
    step = torch.empty(K, N, dtype=torch.float64)
    step[perm] = sd["scales"].double()[torch.arange(K) // gs]
    assert ((Wq - lin.weight.detach().double().t()).abs() <= step * 0.5 * (1 + 1e-5)).all()
    # channel-mix, green-bit-llm's split: 4-bit max(1, floor(K*p)//gs)*gs channels, the rest 2-bit
    K = 256
    lin = torch.nn.Linear(K, 8, bias=False)
    m = MBWQLinear.from_float(lin, bits=[4, 2], bits_prop=[0.25, 0.75], group_sizes={"4": 32, "2": 32})
    assert (m.groups, m.rows_packed) == (2 + 6, 64 // 32 * 4 + 192 // 32 * 2)
    sd = m.state_dict()
    codes = torch.cat([unpack_stream(sd["qweight"][:8], 4, 64), unpack_stream(sd["qweight"][8:], 2, 192)]).double()
    gi = torch.arange(K) // 32
    s, z = sd["scales"].double()[gi], sd["zeros"].double()[gi]
    maxq = torch.tensor([15.0] * 64 + [3.0] * 192).unsqueeze(1)
    Wt = lin.weight.detach().double().t()
    assert torch.equal(torch.minimum(torch.round((Wt + z) / s).clamp_min(0), maxq), codes)
    m2 = loaded(MBWQLinearCuda, sd, in_channels=K, out_channels=8, use_mbw=True, groups=m.groups,
                rows_packed=m.rows_packed, dtype=F32)
    x = torch.randn(3, K)
    assert relerr(m2(x), x.double() @ (codes * s - z)) <= 1e-5


# ---------------------------------------------------------------------------------------------------
# MLX interop

@pytest.mark.parametrize("b", [2, 4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_mlx_round_trip(b, gs):
    K, N = 256, 24
    G = K // gs
    q = torch.randint(0, 2 ** b, (N, K))
    per = 32 // b
    words = torch.zeros(N, K // per, dtype=torch.int64)
    for j in range(per):  # MLX: 32/b consecutive K values per uint32, LSB first
        words |= q[:, j::per].long() << (j * b)
    weight = words.to(torch.uint32)
    sc, bi = (torch.rand(N, G) * 0.1).half(), (torch.randn(N, G) * 0.1).half()
    w = sc.double().repeat_interleave(gs, 1) * q.double() + bi.double().repeat_interleave(gs, 1)  # scale*q + bias
    layer = MPQLinearMlx.from_mlx(weight, sc, bi, gs, b)
    x = torch.randn(3, K)
    assert relerr(layer(x), x.double() @ w.t()) <= 1e-5
    out = layer.to_mlx()
    assert out["weight"].dtype == torch.uint32 and tuple(out["weight"].shape) == (N, K * b // 32)
    assert torch.equal(out["weight"].view(torch.int32), weight.view(torch.int32))
    assert torch.equal(out["scales"], sc) and torch.equal(out["biases"], bi)
    assert out["group_size"] == gs and out["bits"] == b


def test_to_mlx_of_gba_sym_layer_dequantizes_to_the_same_weight():
    K, N, b, gs = 128, 64, 4, 32
    sd, s, z, W = gba_sym_checkpoint(K, N, b, gs, 32)
    layer = loaded(MPQLinear, sd, in_channels=K, out_channels=N, w_bit=b, group_size=gs, dq_group_size=32)
    o = layer.to_mlx()
    qq = unpack_rows(o["weight"].view(torch.int32).t(), b, K).t().double()  # (N, K)
    wm = o["scales"].double().repeat_interleave(gs, 1) * qq + o["biases"].double().repeat_interleave(gs, 1)
    assert torch.equal(wm.t(), W)
    with pytest.raises(ValueError):  # GPTQ (asym) and act-order have no MLX form (spec §6, §12.7)
        loaded(MPQLinear, gptq_checkpoint(K, N, b, gs, False)[0], in_channels=K, out_channels=N, w_bit=b,
               group_size=gs, use_gba_quant=False).to_mlx()


# ---------------------------------------------------------------------------------------------------
# Bad checkpoints and arguments

def _gptq(mod):
    K, N = 96, 40
    sd, _ = gptq_checkpoint(K, N, 4, 32, False)
    mod(sd)
    loaded(MPQLinear, {k: v for k, v in sd.items() if v is not None}, in_channels=K, out_channels=N, w_bit=4,
           group_size=32, use_gba_quant=False)


def _mbwq(mod):
    K, N = 96, 40
    sd, _, _ = layer_mix_checkpoint(K, N, 4, 32)
    mod(sd)
    loaded(MBWQLinear, {k: v for k, v in sd.items() if v is not None}, in_channels=K, out_channels=N, w_bit=4,
           group_size=32, use_mbw=False)


def _cmix(mod):
    sd, Wo, rows, gmap, G, P = channel_mix_checkpoint([(4, 96, 32), (2, 160, 32)], 12)
    mod(sd)
    loaded(MBWQLinear, sd, in_channels=256, out_channels=12, use_mbw=True, groups=G, rows_packed=P)


def _set(k, f):
    return lambda sd: sd.__setitem__(k, f(sd[k]))


def _qg(i, v):
    def f(t):
        t = t.clone()
        t[i] = v
        return t
    return f


BAD = [
    ("gptq qweight shape", _gptq, _set("qweight", lambda t: t[:8]), "qweight"),
    ("gptq qweight float", _gptq, _set("qweight", lambda t: t.float()), "qweight"),
    ("gptq qweight int64", _gptq, _set("qweight", lambda t: t.long()), "qweight"),
    ("gptq qzeros shape", _gptq, _set("qzeros", lambda t: t[:2]), "qzeros"),
    ("gptq scales shape", _gptq, _set("scales", lambda t: t[:, :30]), "scales"),
    ("gptq scales int", _gptq, _set("scales", lambda t: t.int()), "scales"),
    ("gptq g_idx too large", _gptq, _set("g_idx", lambda t: torch.full_like(t, 3)), "g_idx"),
    ("gptq g_idx negative", _gptq, _set("g_idx", lambda t: torch.full_like(t, -1)), "g_idx"),
    ("gptq g_idx int64 wraps", _gptq, _set("g_idx", lambda t: t.long() + 2 ** 32), "g_idx"),
    ("gptq g_idx length", _gptq, _set("g_idx", lambda t: t[:-1]), "g_idx"),
    ("gptq g_idx float", _gptq, _set("g_idx", lambda t: t.float()), "g_idx"),
    ("gptq missing qzeros", _gptq, lambda sd: sd.pop("qzeros"), "qzeros"),
    ("mbwq q_perm out of range", _mbwq, _set("q_perm", lambda t: (torch.arange(96) + 1).to(torch.int16)), "q_perm"),
    ("mbwq q_perm duplicate", _mbwq, _set("q_perm", lambda t: torch.cat([t[:1], t[:-1]])), "q_perm"),
    ("mbwq q_perm length", _mbwq, _set("q_perm", lambda t: t[:-1]), "q_perm"),
    ("mbwq q_perm float", _mbwq, _set("q_perm", lambda t: t.float()), "q_perm"),
    ("mbwq channel_scale shape", _mbwq, _set("channel_scale", lambda t: t[..., :-1]), "channel_scale"),
    ("mbwq scales shape", _mbwq, _set("scales", lambda t: t[:2]), "scales"),
    ("mbwq zeros nan", _mbwq, _set("zeros", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))), "zeros"),
    ("cmix q_groups bits 7", _cmix, _set("q_groups", _qg(0, 7)), "q_groups"),
    ("cmix q_groups increasing width", _cmix, _set("q_groups", lambda t: _qg(6, 4)(_qg(0, 2)(t))), "q_groups"),
    ("cmix q_groups start not chunk", _cmix, _set("q_groups", _qg(3, 5)), "q_groups"),
    ("cmix q_groups first start", _cmix, _set("q_groups", _qg(1, 3)), "q_groups"),
    ("cmix q_groups last start", _cmix, _set("q_groups", _qg(15, 40)), "q_groups"),
    ("cmix q_perm out of range", _cmix, _set("q_perm", lambda t: t.int().masked_fill(t == 5, 300)), "q_perm"),
    ("cmix qweight too few rows", _cmix, _set("qweight", lambda t: t[:-2]), "qweight"),
]


@pytest.mark.parametrize("name,build,mod,key", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoint_gives_clear_error(name, build, mod, key):
    with pytest.raises((RuntimeError, ValueError, KeyError), match=key):
        build(mod)


@pytest.mark.parametrize("make,word", [
    (lambda: MPQLinear(64, 32, w_bit=3), "w_bit"), (lambda: MPQLinear(64, 32, w_bit=16), "w_bit"),
    (lambda: MPQLinearCuda(64, 32, a_bit=8), "a_bit"), (lambda: MBWQLinear(64, 32, w_bit=7, use_mbw=False), "w_bit"),
    (lambda: MBWQLinear(64, 32, use_mbw=False, asym=True), "asym")])
def test_bad_constructor_arguments(make, word):
    with pytest.raises(ValueError, match=word):
        make()


def test_forward_errors_name_the_argument():
    sd, _ = gptq_checkpoint(64, 16, 4, 32, False)
    layer = MPQLinear(64, 16, w_bit=4, group_size=32, use_gba_quant=False)
    layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="prepare_params"):
        layer(torch.randn(1, 64))
    layer.prepare_params()
    with pytest.raises(RuntimeError, match=r"\bx\b.*64"):
        layer(torch.randn(1, 65))
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        layer(torch.ones(1, 64, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------
# Aliases and model-level prepare

def test_aliases_constructor_order_and_prepare_bie_layers():
    # BIE's positional order: in, out, a_bit, w_bit, dtype, group_size, use_gba_quant, dq_group_size, dq_mode,
    # disable_bias, asym, requires_grad
    layer = MPQLinearCuda(64, 32, 16, 2, torch.half, 32, False, -1, 2, True, False, False)
    assert (layer.w_bit, layer.group_size, layer.use_gba_quant, layer.asym) == (2, 32, False, True)
    assert issubclass(MBWQLinearCuda, torch.nn.Module) and MPQLinearMlx(64, 32, w_bit=4, group_size=32).w_bit == 4
    sd, W = gptq_checkpoint(64, 32, 2, 32, True)
    layer.load_state_dict(sd)
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    prepare_bie_layers(model)
    x = torch.randn(2, 64)
    assert relerr(layer(x), x.double() @ W) <= 1e-5
    assert lowbit.prepare_layers is not None

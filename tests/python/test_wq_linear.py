"""MPQLinear / MBWQLinear (weight-only layers) against float64 references written from the format
definitions (tests/python/reference.py: an independent bit-stream packer and dense reconstruction).

Tolerances (reference.wq_tol): fp32 accumulation error 1e-5 * sum|x'||W| plus the output dtype's rounding
of |ref|; 16-bit activations (tensor cores on CUDA) and M above the fused threshold (tiles) also allow the
weight and x' rounded to the activation dtype (two roundings of sum|x'||W|)."""
import math

import pytest
import torch

import lowbit
from lowbit.compat import MBWQLinearCuda, MPQLinearCuda, MPQLinearMlx
from lowbit.nn import MBWQLinear, MPQLinear

import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand_codes(K, N, b, g=None):
    return torch.randint(0, 2 ** b, (K, N), generator=g)


def check_close(y, x, W, cs=None, big_m=False):
    x64 = x.double().cpu().reshape(-1, x.shape[-1])
    W = W.cpu()
    cs = None if cs is None else cs.cpu()
    r = ((x64 * cs.double().reshape(-1)) if cs is not None else x64) @ W
    # 16-bit activations may meet w rounded to their dtype (tensor cores, and the large-M tiles)
    tol = ref.wq_tol(x64, W, y.dtype, None if cs is None else cs.reshape(-1),
                     weight_rounding=big_m or y.dtype != torch.float32)
    err = (y.double().reshape(r.shape).cpu() - r).abs()
    assert torch.all(err <= tol), f"max err {float(err.max())}, max tol excess {float((err - tol).max())}"


def gptq_state(K, N, b, gs, act_order, dtype):
    G = math.ceil(K / gs)
    codes = rand_codes(K, N, b)
    scales = (torch.rand(G, N) * 0.02 + 0.005).to(dtype)
    zp = torch.randint(1, 2 ** b, (G, N))
    if act_order:
        g_idx = torch.tensor([i // gs for i in range(K)])[torch.randperm(K)]
    else:
        g_idx = torch.arange(K) // gs
    sd = {"qweight": ref.pack_stream(codes, [b], [K]), "qzeros": ref.pack_zeros_gptq(zp, b),
          "scales": scales, "g_idx": g_idx.to(torch.int32)}
    W = ref.wq_dense(codes, scales, zp, g_idx, asym=True)
    return sd, W


@pytest.mark.parametrize("b", [1, 2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_mpq_gptq_forward(device, b, act_order):
    K, N, gs = 96, 37, 32
    sd, W = gptq_state(K, N, b, gs, act_order, torch.float16)
    layer = MPQLinear(K, N, w_bit=b, group_size=gs, use_gba_quant=False, dtype=torch.float16)
    layer.load_state_dict(sd)
    layer.prepare_params()
    layer.to(device)
    for M in (1, 3, 40):
        for dt in DTYPES:
            x = torch.randn(M, K, dtype=dt, device=device)
            y = layer(x)
            assert y.dtype == dt and y.shape == (M, N)
            check_close(y, x, W, big_m=M > 16)


def test_mpq_act_order_state_dict_keeps_checkpoint_order(device):
    K, N, b, gs = 128, 12, 4, 32
    sd, W = gptq_state(K, N, b, gs, True, torch.float16)
    layer = MPQLinear(K, N, w_bit=b, group_size=gs, use_gba_quant=False, dtype=torch.float16)
    layer.load_state_dict(sd)
    layer.prepare_params()
    layer.to(device)
    assert layer._buffers.get("_rt_perm") is not None  # rows sorted by group for the fast path
    out = layer.state_dict()
    assert torch.equal(out["qweight"].cpu(), sd["qweight"]) and torch.equal(out["g_idx"].cpu(), sd["g_idx"])
    x = torch.randn(2, K, dtype=torch.float16, device=device)
    y = layer(x)
    check_close(y, x, W)
    again = MPQLinear(K, N, w_bit=b, group_size=gs, use_gba_quant=False, dtype=torch.float16)
    again.load_state_dict(out)
    again.prepare_params()
    assert torch.equal(again.to(device)(x), y)
    layer.load_state_dict(out)  # loading into a prepared (sorted) layer re-prepares it
    assert torch.equal(layer(x), y)


def test_mpq_leading_dims_and_bias(device):
    K, N, b, gs = 64, 20, 4, 16
    sd, W = gptq_state(K, N, b, gs, False, torch.float32)
    sd["bias"] = torch.randn(N)
    layer = MPQLinear(K, N, w_bit=b, group_size=gs, use_gba_quant=False, dtype=torch.float32, disable_bias=False)
    layer.load_state_dict(sd)
    layer.prepare_params()
    layer.to(device)
    x = torch.randn(2, 3, K, device=device)
    y = layer(x)
    assert y.shape == (2, 3, N)
    r = x.double().cpu() @ W + sd["bias"].double()
    torch.testing.assert_close(y.double().cpu(), r, rtol=1e-5, atol=1e-5)


def test_mpq_gba_sym_double_quant(device):
    K, N, b, gs, D = 64, 64, 2, 32, 32
    G, NB = K // gs, N // D
    dt = torch.float16
    layer = MPQLinear(K, N, w_bit=b, group_size=gs, dq_group_size=D, dtype=dt)
    codes = rand_codes(K, N, b)
    qstat = torch.randint(0, 256, (G, NB, D), dtype=torch.uint8)
    sz, ss = torch.rand(G, NB, 1).to(dt), (torch.rand(G, NB, 1) * 0.01 + 0.001).to(dt)
    zz, zs = torch.rand(G, NB, 1).to(dt), (torch.rand(G, NB, 1) * 0.01).to(dt)
    layer.load_state_dict({"qweight": ref.pack_stream(codes, [b], [K]), "g_idx": (torch.arange(K) // gs).int(),
                           "bias": torch.zeros(N, dtype=dt), "qstatistic": qstat, "qzeros_zeros": zz,
                           "qzeros_scales": zs, "qscales_zeros": sz, "qscales_scales": ss,
                           "scales": torch.ones(G, N, dtype=dt), "zeros": torch.zeros(G, N, dtype=dt)})
    layer.prepare_params()
    # BIE decodes in the layer dtype: (code - z) * s, each op rounded to fp16.
    s_ref = ((qstat >> 4).to(dt) - sz) * ss
    z_ref = ((qstat & 15).to(dt) - zz) * zs
    assert torch.equal(layer.scales, s_ref.reshape(G, N)) and torch.equal(layer.zeros, z_ref.reshape(G, N))
    assert not hasattr(layer, "qstatistic")
    W = ref.wq_dense(codes, s_ref.reshape(G, N), z_ref.reshape(G, N), torch.arange(K) // gs, asym=False)
    layer.to(device)
    x = torch.randn(5, K, dtype=dt, device=device)
    check_close(layer(x), x, W)


@pytest.mark.parametrize("b,dq_mode", [(4, 2), (2, 1)])
def test_mpq_gba_asym(device, b, dq_mode):
    K, N, gs, D = 64, 64, 32, 32 if dq_mode == 2 else 64
    G = K // gs
    dt = torch.float16
    layer = MPQLinear(K, N, w_bit=b, group_size=gs, dq_group_size=D, dq_mode=dq_mode, asym=True, dtype=dt)
    codes = rand_codes(K, N, b)
    zp = torch.randint(1, 2 ** b, (G, N))
    qs = torch.randint(0, 256, tuple(layer.qscales.shape), dtype=torch.uint8)
    sz = torch.rand(*layer.qscales_zeros.shape).to(dt)
    ss = (torch.rand(*layer.qscales_scales.shape) * 0.001 + 1e-4).to(dt)
    sd = dict(layer.state_dict())
    sd.update(qweight=ref.pack_stream(codes, [b], [K]), qzeros=ref.pack_zeros_gptq(zp, b), qscales=qs,
              qscales_zeros=sz, qscales_scales=ss)
    layer.load_state_dict(sd)
    layer.prepare_params()
    c = qs if qs.dim() == 3 else qs.unsqueeze(-1)
    s_ref = ((c.to(dt) - sz) * ss).reshape(G, N)
    assert torch.equal(layer.scales, s_ref)
    W = ref.wq_dense(codes, s_ref, zp, torch.arange(K) // gs, asym=True)
    layer.to(device)
    x = torch.randn(4, K, dtype=dt, device=device)
    check_close(layer(x), x, W)


def mbwq_layer_mix(K, N, b, gs, dt, perm=True, cs=True):
    G = math.ceil(K / gs)
    codes = rand_codes(K, N, b)
    scales = (torch.rand(G, N) * 0.02).to(dt)
    zeros = (torch.randn(G, N) * 0.05).to(dt)
    p = torch.randperm(K) if perm else torch.zeros(K, dtype=torch.long)
    c = (torch.rand(1, 1, K) + 0.5).to(dt) if cs else torch.ones(1, 1, K, dtype=dt)
    sd = {"qweight": ref.pack_stream(codes, [b], [K]), "scales": scales, "zeros": zeros,
          "q_perm": p.to(torch.int16), "channel_scale": c}
    W = ref.wq_dense(codes, scales, zeros, torch.arange(K) // gs, asym=False, perm=p if perm else None)
    return sd, W


@pytest.mark.parametrize("b", [2, 3, 4, 8])
@pytest.mark.parametrize("K,N,gs", [(128, 5, 32), (100, 37, 64), (33, 3, 16)])
def test_mbwq_layer_mix(device, b, K, N, gs):
    dt = torch.float16
    sd, W = mbwq_layer_mix(K, N, b, gs, dt)
    layer = MBWQLinear(K, N, w_bit=b, group_size=gs, use_mbw=False, dtype=dt)
    layer.load_state_dict(sd)
    layer.prepare_params()
    layer.to(device)
    for M in (1, 2, 17, 33):
        x = torch.randn(M, K, dtype=dt, device=device)
        y = layer(x)
        assert y.shape == (M, N)  # BIE returns (1, M, N) for 2-D input; the rank is kept here
        check_close(y, x, W, cs=sd["channel_scale"], big_m=M > 16)
    dense = MBWQLinear.q42fp_weight(layer.qweight, layer.scales, layer.zeros, gs, b, layer.q_perm)
    assert torch.allclose(dense.double().cpu(), W, rtol=2 ** -10, atol=1e-6)


def channel_mix_state(K, N, segs, gsz, dt, perm=True):
    """segs: [(bits, rows)], groups of gsz[bits] rows inside each segment."""
    seg_bits = [b for b, _ in segs]
    seg_rows = list(torch.tensor([r for _, r in segs]).cumsum(0).tolist())
    codes = torch.cat([rand_codes(r, N, b) for b, r in segs])
    g_idx, q_groups, start, g = [], [], 0, 0
    for b, r in segs:
        for g0 in range(0, r, gsz[b]):
            n = min(gsz[b], r - g0)
            g_idx += [g] * n
            q_groups += [b, start]
            start += math.ceil(n / 32) * b
            g += 1
    scales = (torch.rand(g, N) * 0.02).to(dt)
    zeros = (torch.randn(g, N) * 0.05).to(dt)
    p = torch.randperm(K) if perm else torch.zeros(K, dtype=torch.long)
    c = (torch.rand(1, 1, K) + 0.5).to(dt)
    qweight = ref.pack_stream(codes, seg_bits, seg_rows)
    sd = {"qweight": qweight, "scales": scales, "zeros": zeros, "q_perm": p.to(torch.int16),
          "channel_scale": c, "q_groups": torch.tensor(q_groups, dtype=torch.int16)}
    W = ref.wq_dense(codes, scales, zeros, torch.tensor(g_idx), asym=False, perm=p if perm else None)
    return sd, W, g, qweight.shape[0]


@pytest.mark.parametrize("segs", [[(8, 32), (6, 64), (5, 32), (4, 64), (3, 32), (2, 40)], [(4, 96), (2, 160)],
                                  [(5, 64), (3, 31)]])
@pytest.mark.parametrize("perm", [True, False])
def test_mbwq_channel_mix(device, segs, perm):
    K, N = sum(r for _, r in segs), 19
    gsz = {8: 32, 6: 64, 5: 32, 4: 32, 3: 32, 2: 64}
    dt = torch.float16
    sd, W, G, P = channel_mix_state(K, N, segs, gsz, dt, perm)
    layer = MBWQLinearCuda(K, N, use_mbw=True, groups=G, rows_packed=P, dtype=dt)
    layer.load_state_dict(sd)
    layer.prepare_params()
    assert layer.rows[:6][-1] == K
    layer.to(device)
    for M in (1, 4, 20):
        x = torch.randn(M, K, dtype=dt, device=device)
        check_close(layer(x), x, W, cs=sd["channel_scale"], big_m=M > 16)
    dense = MBWQLinear.exl2fp_weight(layer.qweight, layer.scales, layer.zeros, layer.q_perm, layer.q_group_map,
                                     layer.rows)
    assert torch.allclose(dense.double().cpu(), W, rtol=2 ** -10, atol=1e-6)


def test_backward_input_and_bias(device):
    K, N, b, gs = 64, 24, 4, 32
    dt = torch.float32
    sd, W = mbwq_layer_mix(K, N, b, gs, dt)
    sd["bias"] = torch.randn(N)
    layer = MBWQLinear(K, N, w_bit=b, group_size=gs, use_mbw=False, dtype=dt, disable_bias=False)
    layer.load_state_dict(sd)
    layer.prepare_params()
    layer.to(device)
    cs = sd["channel_scale"].reshape(-1).double()
    for M in (3, 40):
        x = torch.randn(M, K, device=device, requires_grad=True)
        g = torch.randn(M, N, device=device)
        layer(x).backward(g)
        gx_ref = (g.double().cpu() @ W.t()) * cs
        torch.testing.assert_close(x.grad.double().cpu(), gx_ref, rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is None  # a buffer: the quantized layer's tensors are frozen


def test_state_dict_round_trip_and_save_load(tmp_path, device):
    lin = torch.nn.Linear(96, 40)
    model = torch.nn.Sequential(MPQLinear.from_float(lin, w_bit=4, group_size=32),
                                MBWQLinear.from_float(torch.nn.Linear(40, 24), w_bit=2, group_size=16)).to(device)
    x = torch.randn(3, 96, device=device, dtype=torch.float32)
    y = model(x)
    sd = model.state_dict()
    fresh = torch.nn.Sequential(MPQLinear(96, 40, w_bit=4, group_size=32, use_gba_quant=False, dtype=torch.float32,
                                          disable_bias=False),
                                MBWQLinear(40, 24, w_bit=2, group_size=16, use_mbw=False, dtype=torch.float32,
                                           disable_bias=False))
    fresh.load_state_dict(sd)
    lowbit.prepare_layers(fresh)
    assert torch.equal(fresh.to(device)(x), y)
    lowbit.save(model, tmp_path / "ck")
    skeleton = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.Linear(40, 24))
    loaded = lowbit.load(tmp_path / "ck", skeleton)
    lowbit.prepare_layers(loaded)
    assert torch.equal(loaded.to(device)(x), y)


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("b", [2, 4, 8])
def test_mpq_from_float_rtn(device, asym, b):
    lin = torch.nn.Linear(80, 33, bias=False)
    layer = MPQLinear.from_float(lin, w_bit=b, group_size=16, asym=asym, dtype=torch.float32).to(device)
    W = lin.weight.detach().double()
    Wq = layer.dequantized_weight(torch.float32).double().cpu()
    # RTN: every weight within half a step of its group's grid. GPTQ's integer grid (asym) spans the range
    # widened to include 0.
    mx, mn = W.reshape(33, 5, 16).amax(-1), W.reshape(33, 5, 16).amin(-1)
    if asym:
        mx, mn = mx.clamp_min(0), mn.clamp_max(0)
    step = (mx - mn) / (2 ** b - 1)
    bound = step.repeat_interleave(16, 1) * (0.5 + 1e-4) + 1e-7
    assert torch.all((Wq - W).abs() <= bound)
    x = torch.randn(5, 80, device=device)
    check_close(layer(x), x, Wq.t())


def test_mbwq_from_float_channel_mix(device):
    lin = torch.nn.Linear(256, 48)
    perm = torch.randperm(256)
    layer = MBWQLinear.from_float(lin, bits=[2, 4], bits_prop=[0.75, 0.25], group_sizes={4: 32, 2: 64}, perm=perm,
                                  dtype=torch.float32).to(device)
    assert layer._seg_bits == [4, 2] and layer._seg_rows == [64, 256]
    Wq = layer.dequantized_weight(torch.float32).double().cpu()
    err4 = (Wq - lin.weight.double())[:, perm[:64]].abs().mean()
    err2 = (Wq - lin.weight.double())[:, perm[64:]].abs().mean()
    assert err4 < err2  # the 4-bit channels are reconstructed better
    x = torch.randn(3, 256, device=device)
    y = layer(x)
    torch.testing.assert_close(y.double().cpu(), x.double().cpu() @ Wq.t() + lin.bias.double(), rtol=1e-5, atol=1e-5)


def test_mlx_round_trip():
    lin = torch.nn.Linear(128, 16)
    layer = MPQLinear.from_float(lin, w_bit=4, group_size=32, asym=False, dtype=torch.float16)
    m = layer.to_mlx()
    assert m["weight"].dtype == torch.uint32 and m["weight"].shape == (16, 16)
    # MLX semantics: w[n, k] = scales[n, k // gs] * q + biases[n, k // gs], q packed LSB-first along k.
    q = (m["weight"].view(torch.int32).long() & 0xFFFFFFFF)
    codes = torch.stack([(q >> (4 * i)) & 15 for i in range(8)], -1).reshape(16, 128)
    w_mlx = m["scales"].double().repeat_interleave(32, 1) * codes + m["biases"].double().repeat_interleave(32, 1)
    assert torch.allclose(w_mlx, layer.dequantized_weight(torch.float32).double(), atol=1e-3)
    back = MPQLinearMlx.from_mlx(m["weight"], m["scales"], m["biases"], 32, 4, bias=m["bias"])
    x = torch.randn(2, 128, dtype=torch.float16)
    assert torch.equal(back(x), layer(x))


def test_bad_inputs():
    with pytest.raises(ValueError, match="w_bit must be 1, 2, 4 or 8"):
        MPQLinear(64, 32, w_bit=3)
    with pytest.raises(ValueError, match="requires_grad"):
        MPQLinearCuda(64, 32, requires_grad=True)
    with pytest.raises(ValueError, match="a_bit"):
        MBWQLinear(64, 32, a_bit=8)
    layer = MPQLinear(64, 32, w_bit=4, group_size=32, use_gba_quant=False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="prepare_params"):
        layer(torch.randn(2, 64))
    layer.g_idx[3] = 7
    with pytest.raises(RuntimeError, match=r"g_idx\[3\] must be in \[0, 2\)"):
        layer.prepare_params()
    layer.g_idx[3] = 0
    layer.prepare_params()
    with pytest.raises(RuntimeError, match="64 features"):
        layer(torch.randn(2, 63))
    with pytest.raises(RuntimeError, match="x must be a float32, float16 or bfloat16 tensor"):
        layer(torch.ones(2, 64, dtype=torch.int32))
    sd, _ = mbwq_layer_mix(64, 8, 4, 32, torch.float16)
    sd["q_perm"][5] = sd["q_perm"][6]
    mb = MBWQLinear(64, 8, w_bit=4, group_size=32, use_mbw=False)
    mb.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="not a permutation"):
        mb.prepare_params()
    sd, _, G, P = channel_mix_state(96, 8, [(4, 32), (2, 64)], {4: 32, 2: 32}, torch.float16)
    sd["q_groups"][2] = 8  # a width that increases
    mb = MBWQLinear(96, 8, use_mbw=True, groups=G, rows_packed=P)
    mb.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="widths must not increase"):
        mb.prepare_params()
    with pytest.raises(RuntimeError, match="must be in \\[1, 16\\]"):
        torch.ops.lowbit.wq_pack_zeros(torch.zeros(2, 8), 4)
    with pytest.raises(RuntimeError, match="code at row 0, column 0 must be in \\[0, 3\\]"):
        torch.ops.lowbit.wq_pack(torch.full((32, 2), 4, dtype=torch.int32), [2], [32])


def test_dropped_bias_warns():
    lin = torch.nn.Linear(32, 8)
    sd = MPQLinear.from_float(lin, w_bit=4, group_size=32).state_dict()
    layer = MPQLinear(32, 8, w_bit=4, group_size=32, use_gba_quant=False, dtype=torch.float32, disable_bias=True)
    layer.load_state_dict(sd)
    with pytest.warns(UserWarning, match="drops a non-zero bias"):
        layer.prepare_params()


def test_pack_ops_match_reference():
    for segs in ([(3, 64), (2, 33)], [(8, 32), (6, 32), (5, 5)], [(1, 70)]):
        bits = [b for b, _ in segs]
        rows = torch.tensor([r for _, r in segs]).cumsum(0).tolist()
        codes = torch.cat([rand_codes(r, 7, b) for b, r in segs]).int()
        q = torch.ops.lowbit.wq_pack(codes, bits, rows)
        assert torch.equal(q, ref.pack_stream(codes, bits, rows))
        assert torch.equal(torch.ops.lowbit.wq_unpack(q, bits, rows), codes)


def _prepared(cls, sd, device, **kw):
    layer = cls(**kw)
    layer.load_state_dict(sd)
    layer.prepare_params()
    return layer.to(device)


@pytest.mark.parametrize("kind", ["mbwq_layer", "mbwq_channel", "gptq_act_order", "mpq_gba_sym"])
def test_fuse_concatenates_outputs(device, kind):
    """fuse(): one layer over the concatenated output features. Its output against the float64 reference
    of the concatenated dense weights, and against the separate layers (bitwise on the CPU, where each
    output is one FMA chain in stored-row order; on CUDA the kernels' K split may change with N: the
    reference tolerance), its state dict reloading into a fresh layer of the fused width, split sizes."""
    dt = torch.float16
    K, Ns = 160, [24, 40, 8]
    layers, Ws, cs = [], [], None
    if kind == "mbwq_layer":
        p = torch.randperm(K).to(torch.int16)
        c = (torch.rand(1, 1, K) + 0.5).to(dt)
        for N in Ns:
            sd, W = mbwq_layer_mix(K, N, 4, 32, dt, perm=False, cs=False)
            sd["q_perm"], sd["channel_scale"] = p, c
            W = ref.wq_dense(ref.unpack_stream(sd["qweight"], [4], [K]), sd["scales"], sd["zeros"],
                             torch.arange(K) // 32, asym=False, perm=p.long())
            layers.append(_prepared(MBWQLinear, sd, device, in_channels=K, out_channels=N, w_bit=4, group_size=32,
                                    use_mbw=False, dtype=dt))
            Ws.append(W)
        cs = c
    elif kind == "mbwq_channel":
        segs, gsz = [(4, 96), (2, 64)], {4: 32, 2: 64}
        base, _, G, P = channel_mix_state(K, Ns[0], segs, gsz, dt)
        for N in Ns:
            sd, W, _, _ = channel_mix_state(K, N, segs, gsz, dt, perm=False)
            for k in ("q_perm", "channel_scale", "q_groups"):
                sd[k] = base[k]
            codes = ref.unpack_stream(sd["qweight"], [4, 2], [96, 160])
            g_idx = torch.tensor([i // 32 for i in range(96)] + [3 + (i - 96) // 64 for i in range(96, 160)])
            W = ref.wq_dense(codes, sd["scales"], sd["zeros"], g_idx, asym=False, perm=base["q_perm"].long())
            layers.append(_prepared(MBWQLinear, sd, device, in_channels=K, out_channels=N, use_mbw=True, groups=G,
                                    rows_packed=P, dtype=dt))
            Ws.append(W)
        cs = base["channel_scale"]
    elif kind == "gptq_act_order":
        g_idx = torch.tensor([i // 32 for i in range(K)])[torch.randperm(K)].to(torch.int32)
        for N in Ns:
            codes, zp = rand_codes(K, N, 4), torch.randint(1, 16, (K // 32, N))
            sd = {"qweight": ref.pack_stream(codes, [4], [K]), "qzeros": ref.pack_zeros_gptq(zp, 4),
                  "scales": (torch.rand(K // 32, N) * 0.02 + 0.005).to(dt), "g_idx": g_idx}
            Ws.append(ref.wq_dense(codes, sd["scales"], zp, g_idx.long(), asym=True))
            layers.append(_prepared(MPQLinear, sd, device, in_channels=K, out_channels=N, w_bit=4, group_size=32,
                                    use_gba_quant=False, dtype=dt))
    else:  # GBA sym with double quantization, decoded at prepare: fused from the decoded scales / zeros
        for N in Ns:
            lin = torch.nn.Linear(K, N, bias=False)
            layer = MPQLinear.from_float(lin, w_bit=4, group_size=32, asym=False, dtype=dt).to(device)
            layers.append(layer)
            Ws.append(layer.dequantized_weight(torch.float32).t().double().cpu())
    fused = type(layers[0]).fuse(layers)
    assert fused.out_channels == sum(Ns) and fused._prepared
    W = torch.cat(Ws, 1)
    for M in (1, 5, 33):
        x = torch.randn(M, K, dtype=dt, device=device)
        y = fused(x)
        parts = torch.cat([l(x) for l in layers], -1)
        assert y.shape == (M, sum(Ns)) and y.dtype == dt
        check_close(y, x, W, cs=cs, big_m=M > 16)
        if device == "cpu":
            assert torch.equal(y, parts)
        assert [t.shape[-1] for t in y.split([l.out_channels for l in layers], -1)] == Ns
    again = type(fused)(**{**fused.constructor_args(), "dtype": fused.dtype})
    again.load_state_dict(fused.state_dict())
    again.prepare_params()
    again.to(device)
    x = torch.randn(3, K, dtype=dt, device=device)
    assert torch.equal(again(x), fused(x))


def test_fuse_rejects_what_does_not_concatenate():
    dt = torch.float16
    K = 64

    def mbwq(N, perm_seed=0, gs=32, b=4, prepare=True):
        sd, _ = mbwq_layer_mix(K, N, b, gs, dt, perm=False, cs=False)
        sd["q_perm"] = torch.randperm(K, generator=torch.Generator().manual_seed(perm_seed)).to(torch.int16)
        layer = MBWQLinear(K, N, w_bit=b, group_size=gs, use_mbw=False, dtype=dt)
        layer.load_state_dict(sd)
        if prepare:
            layer.prepare_params()
        return layer

    with pytest.raises(ValueError, match="empty"):
        MBWQLinear.fuse([])
    with pytest.raises(ValueError, match="q_perm of layers\\[1\\] differs"):
        MBWQLinear.fuse([mbwq(8, 0), mbwq(8, 1)])
    with pytest.raises(ValueError, match="group_size=64"):
        MBWQLinear.fuse([mbwq(8), mbwq(8, gs=64)])
    with pytest.raises(ValueError, match="w_bit=2"):
        MBWQLinear.fuse([mbwq(8), mbwq(8, b=2)])
    with pytest.raises(ValueError, match="not prepared"):
        MBWQLinear.fuse([mbwq(8), mbwq(8, prepare=False)])
    lin = torch.nn.Linear(K, 12, bias=False)
    with pytest.raises(TypeError, match="must be a MBWQLinear, got MPQLinear"):
        MBWQLinear.fuse([mbwq(8), MPQLinear.from_float(lin, w_bit=4, group_size=32)])
    class Sub(MBWQLinear):
        pass
    sub = Sub(K, 8, w_bit=4, group_size=32, use_mbw=False, dtype=dt)
    sub.load_state_dict(mbwq(8).state_dict())
    sub.prepare_params()
    with pytest.raises(TypeError, match="layers\\[1\\] is a Sub, layers\\[0\\] a MBWQLinear"):
        MBWQLinear.fuse([mbwq(8), sub])
    assert type(MBWQLinear.fuse([sub, sub])) is Sub  # a subclass fuses into itself
    gptq = []
    for N in (12, 8):  # 12 4-bit zeros end mid-word: the packed qzeros cannot be concatenated
        sd, _ = gptq_state(K, N, 4, 32, False, dt)
        gptq.append(_prepared(MPQLinear, sd, "cpu", in_channels=K, out_channels=N, w_bit=4, group_size=32,
                              use_gba_quant=False, dtype=dt))
    with pytest.raises(ValueError, match="multiple of 32"):
        MPQLinear.fuse(gptq)
    assert MPQLinear.fuse(gptq[::-1]).out_channels == 20  # the partial word is the last layer's: fine


def test_fuse_gba_asym_double_quant_with_bias(device):
    """GBA asym layers (scales double-quantized, decoded at prepare; packed integer zeros) with a bias: the
    fused layer carries the decoded scales, the concatenated packed zeros and the concatenated bias."""
    K, gs, D, b = 64, 32, 32, 4
    G = K // gs
    dt = torch.float16
    layers, Ws, biases = [], [], []
    for N in (32, 64):
        layer = MPQLinear(K, N, w_bit=b, group_size=gs, dq_group_size=D, asym=True, dtype=dt, disable_bias=False)
        codes, zp = rand_codes(K, N, b), torch.randint(1, 2 ** b, (G, N))
        qs = torch.randint(0, 256, tuple(layer.qscales.shape), dtype=torch.uint8)
        sz = torch.rand(*layer.qscales_zeros.shape).to(dt)
        ss = (torch.rand(*layer.qscales_scales.shape) * 0.001 + 1e-4).to(dt)
        bias = torch.randn(N).to(dt)
        sd = dict(layer.state_dict())
        sd.update(qweight=ref.pack_stream(codes, [b], [K]), qzeros=ref.pack_zeros_gptq(zp, b), qscales=qs,
                  qscales_zeros=sz, qscales_scales=ss, bias=bias)
        layer.load_state_dict(sd)
        layer.prepare_params()
        Ws.append(ref.wq_dense(codes, ((qs.to(dt) - sz) * ss).reshape(G, N), zp, torch.arange(K) // gs, asym=True))
        biases.append(bias)
        layers.append(layer.to(device))
    fused = MPQLinear.fuse(layers)
    assert fused.out_channels == 96 and "bias" in dict(fused.named_buffers())
    x = torch.randn(7, K, dtype=dt, device=device)
    y = fused(x)
    if device == "cpu":
        assert torch.equal(y, torch.cat([l(x) for l in layers], -1))
    r = x.double().cpu() @ torch.cat(Ws, 1) + torch.cat(biases).double()
    tol = ref.wq_tol(x.double().cpu(), torch.cat(Ws, 1), dt, weight_rounding=True) + 2 ** -10 * r.abs()
    assert torch.all((y.double().cpu() - r).abs() <= tol)


# ---- checkpoint dtypes, GBA key sets, RTN grids, dtype casts, MLX inputs ---------------------------------------

def unpack_zeros_gptq(qzeros, b, N):
    """GPTQ v1 zero points from the packed words, written from the format: field n of a row (b bits at bit
    (n % (32/b))·b of word n // (32/b), LSB first) holds z − 1."""
    per = 32 // b
    w = qzeros.long() & 0xFFFFFFFF
    return torch.stack([((w[:, n // per] >> ((n % per) * b)) & ((1 << b) - 1)) + 1 for n in range(N)], 1)


def _loaded(cls, sd, **kw):
    layer = cls(**kw)
    layer.load_state_dict(sd)
    layer.prepare_params()
    return layer


def _bad_dtype_case(kind):
    dt = torch.float16
    if kind == "mpq":
        sd, _ = gptq_state(64, 24, 4, 32, False, dt)
        kw = dict(in_channels=64, out_channels=24, w_bit=4, group_size=32, use_gba_quant=False, dtype=dt)
        return MPQLinear, sd, kw
    if kind == "mbwq":
        sd, _ = mbwq_layer_mix(64, 8, 4, 32, dt)
        return MBWQLinear, sd, dict(in_channels=64, out_channels=8, w_bit=4, group_size=32, use_mbw=False, dtype=dt)
    if kind == "mbwq_cm":
        sd, _, G, P = channel_mix_state(96, 8, [(4, 32), (2, 64)], {4: 32, 2: 64}, dt)
        return MBWQLinear, sd, dict(in_channels=96, out_channels=8, use_mbw=True, groups=G, rows_packed=P, dtype=dt)
    layer = MPQLinear(64, 32, w_bit=2, group_size=32, dq_group_size=16, dtype=dt)  # GBA sym, double quantization
    sd = {k: v.clone() for k, v in layer.state_dict().items() if k not in ("scales", "zeros", "bias")}
    sd["qstatistic"] = torch.randint(0, 256, tuple(sd["qstatistic"].shape), dtype=torch.uint8)
    return MPQLinear, sd, dict(in_channels=64, out_channels=32, w_bit=2, group_size=32, dq_group_size=16, dtype=dt)


@pytest.mark.parametrize("kind,key,bad", [
    ("mpq", "qweight", torch.float32), ("mpq", "qweight", torch.uint8), ("mpq", "qweight", torch.int64),
    ("mpq", "qzeros", torch.float32), ("mpq", "scales", torch.int32), ("mpq", "g_idx", torch.float32),
    ("mbwq", "q_perm", torch.float32), ("mbwq", "q_perm", torch.int64), ("mbwq", "channel_scale", torch.int32),
    ("mbwq", "zeros", torch.int16), ("mbwq_cm", "q_groups", torch.float32), ("mbwq_cm", "q_groups", torch.int64),
    ("gba", "qstatistic", torch.float16), ("gba", "qscales_scales", torch.int32)])
def test_load_refuses_wrong_checkpoint_dtypes(kind, key, bad):
    """A tensor whose dtype no BIE / GPTQ / green-bit-llm checkpoint uses is refused with the key, the accepted
    dtypes and the one given (nn.Module's load would cast it into the buffer, silently changing packed bits,
    codes or indices), and the layer keeps what it had."""
    cls, sd, kw = _bad_dtype_case(kind)
    layer = _loaded(cls, sd, **kw)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, kw["in_channels"], dtype=torch.float16)
    y = layer(x)
    wrong = dict(sd)
    wrong[key] = sd[key].to(bad)
    with pytest.raises(RuntimeError, match=rf"{type(layer).__name__}: checkpoint tensor '{key}' must be "
                                           rf"torch\.\w+.*, got {bad}"):
        layer.load_state_dict(wrong)
    after = layer.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(layer(x), y)
    model = torch.nn.Sequential(cls(**kw))  # the message names the key with its module path
    with pytest.raises(RuntimeError, match=rf"'0\.{key}' must be"):
        model.load_state_dict({"0." + k: v for k, v in wrong.items()}, strict=False)


def test_load_accepts_checkpoint_dtypes_without_wrapping(device):
    """int64 g_idx (some GPTQ writers), int32 q_perm / q_groups and another float dtype for scales load; index
    tensors keep their own integer dtype until prepare_params() checks them, so an out-of-range value is an
    error instead of wrapping into range."""
    K, N, b, gs = 96, 37, 4, 32
    sd, W = gptq_state(K, N, b, gs, True, torch.float16)
    sd = dict(sd, g_idx=sd["g_idx"].long(), scales=sd["scales"].float())  # fp32 scales: cast to the layer's fp16
    kw = dict(in_channels=K, out_channels=N, w_bit=b, group_size=gs, use_gba_quant=False, dtype=torch.float16)
    layer = _loaded(MPQLinear, sd, **kw).to(device)
    assert layer.scales.dtype == torch.float16 and layer.g_idx.dtype == torch.int32
    x = torch.randn(4, K, dtype=torch.float16, device=device)
    check_close(layer(x), x, W)
    g = sd["g_idx"].clone()
    g[5] += 2 ** 32  # an int32 cast would wrap this back to a valid group
    with pytest.raises(RuntimeError, match=r"g_idx\[5\] must be in \[0, 3\)"):
        _loaded(MPQLinear, dict(sd, g_idx=g), **kw)

    sd, W = mbwq_layer_mix(100, 9, 4, 32, torch.float16)
    kw = dict(in_channels=100, out_channels=9, w_bit=4, group_size=32, use_mbw=False, dtype=torch.float16)
    layer = _loaded(MBWQLinear, dict(sd, q_perm=sd["q_perm"].int()), **kw).to(device)
    x = torch.randn(2, 100, dtype=torch.float16, device=device)
    check_close(layer(x), x, W, cs=sd["channel_scale"])
    p = sd["q_perm"].int()
    p[3] += 65536  # an int16 cast would wrap this to the original channel
    with pytest.raises(RuntimeError, match=r"q_perm\[3\] must be in \[0, 100\)"):
        _loaded(MBWQLinear, dict(sd, q_perm=p), **kw)

    sd, W, G, P = channel_mix_state(96, 8, [(4, 32), (2, 64)], {4: 32, 2: 32}, torch.float16)
    layer = _loaded(MBWQLinear, dict(sd, q_groups=sd["q_groups"].int()), in_channels=96, out_channels=8,
                    use_mbw=True, groups=G, rows_packed=P, dtype=torch.float16).to(device)
    x = torch.randn(2, 96, dtype=torch.float16, device=device)
    check_close(layer(x), x, W, cs=sd["channel_scale"])


def gba_spec_checkpoint(kind, K, N, gs, dt):
    """A checkpoint with exactly the tensors of spec_weight_only §10.3 (no scales / zeros: those are derived by
    the double-quantization decode), its constructor arguments, and its dense W (K, N) in float64 from the
    spec's decode (§3.4, done in the layer dtype, each operation rounded as BIE does)."""
    G = math.ceil(K / gs)
    g_idx = torch.arange(K) // gs
    if kind == "sym":  # low_bit_llama w2a16g32: qstatistic nibbles, D = 16
        b, D = 2, 16
        NB = N // D
        codes = rand_codes(K, N, b)
        qstat = torch.randint(0, 256, (G, NB, D), dtype=torch.uint8)
        qzz, qzs = (torch.rand(G, NB, 1) * 8).to(dt), (torch.rand(G, NB, 1) * 0.01).to(dt)
        qsz, qss = (torch.rand(G, NB, 1) * 8).to(dt), (torch.rand(G, NB, 1) * 0.01 + 0.001).to(dt)
        sd = {"qweight": ref.pack_stream(codes, [b], [K]), "qstatistic": qstat, "qzeros_zeros": qzz,
              "qzeros_scales": qzs, "qscales_zeros": qsz, "qscales_scales": qss, "g_idx": g_idx.int(),
              "wf": torch.arange(0, 32, b, dtype=torch.int32).reshape(1, -1), "bias": torch.zeros(N, dtype=dt)}
        s = (((qstat >> 4).to(dt) - qsz) * qss).reshape(G, N)
        z = (((qstat & 15).to(dt) - qzz) * qzs).reshape(G, N)
        W = ref.wq_dense(codes, s, z, g_idx, asym=False)
        return sd, dict(w_bit=b, dq_group_size=D), W
    # asym: packed integer zeros, 8-bit scale codes; 4-bit: per (group, N-block), 2-bit dq_mode 1: per channel
    b, D, mode = (4, 16, 2) if kind == "asym4" else (2, -1, 1)
    NB = N // (N if D == -1 else D)
    codes, zp = rand_codes(K, N, b), torch.randint(1, 2 ** b + 1, (G, N))
    qs = torch.randint(0, 256, (G, NB, D) if b == 4 else (G, N), dtype=torch.uint8)
    dq = (1, N, 1) if mode == 1 else (G, NB, 1)
    qsz, qss = (torch.rand(*dq) * 8).to(dt), (torch.rand(*dq) * 0.001 + 1e-4).to(dt)
    sd = {"qweight": ref.pack_stream(codes, [b], [K]), "qzeros": ref.pack_zeros_gptq(zp, b), "qscales": qs,
          "qscales_zeros": qsz, "qscales_scales": qss, "g_idx": g_idx.int()}
    c = qs.to(dt) if b == 4 else qs.to(dt).unsqueeze(-1)
    s = ((c - qsz) * qss).reshape(G, N)
    W = ref.wq_dense(codes, s, zp, g_idx, asym=True)
    return sd, dict(w_bit=b, dq_group_size=D, dq_mode=mode, asym=True), W


@pytest.mark.parametrize("kind", ["sym", "asym4", "asym2_dq1"])
def test_gba_spec_tensor_set_loads_strictly(device, kind):
    """A real GBA double-quantization checkpoint holds no scales / zeros (prepare_params() derives them): it
    loads with strict=True, its forward matches the float64 decode, the prepared state dict reloads, and a raw
    GBA checkpoint loaded into the prepared layer is decoded again. A missing double-quantization tensor is
    still a missing key, and group_size >= 256 (not decoded, as in BIE) still needs scales."""
    K, N, gs, dt = 200, 48, 32, torch.float16
    sd, args, W = gba_spec_checkpoint(kind, K, N, gs, dt)
    kw = dict(in_channels=K, out_channels=N, group_size=gs, dtype=dt, **args)
    layer = MPQLinear(**kw)
    result = layer.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    layer.prepare_params()
    layer.to(device)
    for M in (1, 5, 40):
        x = torch.randn(M, K, dtype=dt, device=device)
        check_close(layer(x), x, W, big_m=M > 16)
    again = _loaded(MPQLinear, layer.state_dict(), **kw).to(device)
    assert torch.equal(again(x), layer(x))
    sd2, _, W2 = gba_spec_checkpoint(kind, K, N, gs, dt)
    layer.load_state_dict(sd2, strict=True)  # into the prepared layer: re-prepared with the new tensors
    assert layer._prepared
    check_close(layer(x), x, W2, big_m=True)
    need = "qstatistic" if kind == "sym" else "qscales"
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\).*{need}"):
        MPQLinear(**kw).load_state_dict({k: v for k, v in sd.items() if k != need})
    big = MPQLinear(512, 32, w_bit=2, group_size=256, dq_group_size=16, dtype=dt)
    raw = {k: v for k, v in big.state_dict().items() if k not in ("scales", "zeros")}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*scales"):
        big.load_state_dict(raw)


@pytest.mark.parametrize("b", [1, 2, 4, 8])
@pytest.mark.parametrize("dt", [torch.float32, torch.float16])
def test_mpq_from_float_gptq_rtn_every_group(device, b, dt):
    """asym=True (GPTQ: integer zero points stored minus one) rounds to nearest in every group: mixed-sign,
    all-positive (zero point 0, which z − 1 cannot hold), all-negative, all-zero, and positive with one tiny
    negative weight. The checkpoint is decoded as any GPTQ reader does (codes, z = stored + 1, w = s·(q − z))
    in float64: every weight within |s|/2 of its value, s no larger than the group's GPTQ step."""
    K, N, gs = 200, 37, 32  # the last group has 8 rows
    G = math.ceil(K / gs)
    W = torch.randn(N, K) * 0.05
    for n in range(N):
        for g in range(G):
            blk = W[n, g * gs:(g + 1) * gs]
            kind = (n + g) % 5
            if kind == 1:
                blk.abs_().add_(0.01)
            elif kind == 2:
                blk.abs_().add_(0.01).neg_()
            elif kind == 3:
                blk.zero_()
            elif kind == 4:
                blk.abs_()[0] = -1e-4
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data.copy_(W)
    layer = MPQLinear.from_float(lin, w_bit=b, group_size=gs, asym=True, dtype=dt).to(device)
    sd = {k: v.cpu() for k, v in layer.state_dict().items()}
    codes = ref.unpack_stream(sd["qweight"], [b], [K])
    z = unpack_zeros_gptq(sd["qzeros"], b, N)
    Wdq = ref.wq_dense(codes, sd["scales"], z, sd["g_idx"], asym=True)  # (K, N)
    Wt = W.to(dt).double().t()
    s = sd["scales"].double().abs()
    assert torch.all((Wdq - Wt).abs() <= s[sd["g_idx"].long()] * (0.5 + 1e-4))
    Wg = torch.nn.functional.pad(Wt, (0, 0, 0, G * gs - K)).reshape(G, gs, N)  # zero rows: GPTQ's range has 0
    step = (Wg.amax(1).clamp_min(0) - Wg.amin(1).clamp_max(0)) / (2 ** b - 1)
    live = step > 0  # an all-zero group: any step works
    assert torch.all(s[live] <= step[live] * (1 + 2 ** -10))
    for M in (2, 33):
        x = torch.randn(M, K, dtype=dt, device=device)
        check_close(layer(x), x, Wdq, big_m=M > 16)


@pytest.mark.parametrize("group_sizes,segs", [({4: 64, 2: 136}, [(4, 64, 64), (2, 136, 136)]),
                                              ({"4": 64, "2": 32}, [(4, 64, 64), (2, 136, 32)])])
def test_mbwq_from_float_channel_mix_group_sizes(device, group_sizes, segs):
    """The last width may use a group size that is not a multiple of 32 when its channels form one group;
    green-bit-llm's string keys work. Every weight within half a step of its own group's grid (the reference
    cuts each width's rows into group_size pieces itself), and the forward is x·Wdq."""
    K, N = 200, 21
    lin = torch.nn.Linear(K, N, bias=False)
    layer = MBWQLinear.from_float(lin, bits=[4, 2], bits_prop=[0.5, 0.5], group_sizes=group_sizes,
                                  dtype=torch.float32).to(device)
    assert layer._seg_bits == [4, 2] and layer._seg_rows == [64, 200]
    W = lin.weight.detach().double().t()
    bound, r0 = torch.empty(K, N, dtype=torch.float64), 0
    for b, n, gs in segs:
        for g0 in range(r0, r0 + n, gs):
            blk = W[g0:min(g0 + gs, r0 + n)]
            bound[g0:g0 + blk.shape[0]] = (blk.amax(0) - blk.amin(0)) / (2 ** b - 1) * (0.5 + 1e-4) + 1e-7
        r0 += n
    Wq = layer.dequantized_weight(torch.float32).double().cpu().t()
    assert torch.all((Wq - W).abs() <= bound)
    x = torch.randn(3, K, device=device)
    check_close(layer(x), x, Wq)


def test_mbwq_from_float_channel_mix_refuses_unrepresentable_groups():
    lin = torch.nn.Linear(200, 16)
    with pytest.raises(ValueError, match=r"2-bit group size \(group_sizes\[2\]=100\) is not a multiple of 32, but "
                                         r"the 2-bit segment \(136 of K=200 channels\) has 2 groups"):
        MBWQLinear.from_float(lin, bits=[4, 2], bits_prop=[0.5, 0.5], group_sizes={4: 64, 2: 100})
    with pytest.raises(ValueError, match=r"4-bit group size \(group_sizes\[4\]=48\).*followed by other widths"):
        MBWQLinear.from_float(lin, bits=[4, 2], bits_prop=[0.5, 0.5], group_sizes={4: 48, 2: 32})
    with pytest.raises(ValueError, match=r"4-bit group size \(group_size=40\)"):
        MBWQLinear.from_float(lin, bits=[4, 2], bits_prop=[0.5, 0.5], group_size=40)
    with pytest.raises(ValueError, match=r"bits must be distinct widths from \[8, 6, 5, 4, 3, 2\], got \[4, 4\]"):
        MBWQLinear.from_float(lin, bits=[4, 4])
    with pytest.raises(ValueError, match=r"bits_prop must have one proportion per width \(2\)"):
        MBWQLinear.from_float(lin, bits=[4, 2], bits_prop=[1.0])
    with pytest.raises(ValueError, match=r"group size of the 2-bit channels must be >= 1, got 0"):
        MBWQLinear.from_float(lin, bits=[4, 2], group_sizes={2: 0}, group_size=32)


def test_dtype_follows_casts_of_a_prepared_layer(device):
    """After .half() / .bfloat16() / .float() the layer's dtype is that of its tensors: set_scales / set_zeros
    cast to it (and move to the layer's device), dequantized_weight() and constructor_args() report it."""
    K, N, gs, b = 200, 37, 64, 4
    G = math.ceil(K / gs)
    lin = torch.nn.Linear(K, N, bias=False)
    layer = MBWQLinear.from_float(lin, w_bit=b, group_size=gs, dtype=torch.float32).to(device)
    codes = ref.unpack_stream(layer.qweight.cpu(), [b], [K])
    for cast, dt in (("half", torch.float16), ("bfloat16", torch.bfloat16), ("float", torch.float32)):
        getattr(layer, cast)()
        assert layer.dtype == dt and layer.constructor_args()["dtype"] == str(dt)
        assert layer.dequantized_weight().dtype == dt
        s, z = torch.rand(G, N) * 0.01 + 0.001, torch.randn(G, N) * 0.01  # float32, on the CPU
        layer.set_scales(s)
        layer.set_zeros(z)
        assert layer.scales.dtype == layer.zeros.dtype == dt and layer.scales.device == layer.qweight.device
        W = ref.wq_dense(codes, s.to(dt), z.to(dt), torch.arange(K) // gs, asym=False)
        x = torch.randn(3, K, dtype=dt, device=device)
        check_close(layer(x), x, W)
    with pytest.raises(ValueError, match=r"set_scales: scales must be a float tensor of shape \(4, 37\) "
                                         r"\(groups, out_channels\), got torch.float32 \(3, 37\)"):
        layer.set_scales(torch.ones(3, N))
    with pytest.raises(ValueError, match=r"set_zeros: zeros must be a float tensor.*got torch.int64"):
        layer.set_zeros(torch.zeros(G, N, dtype=torch.long))
    mpq = MPQLinear.from_float(lin, w_bit=b, group_size=gs, dtype=torch.float32).to(device).bfloat16()
    assert mpq.dtype == torch.bfloat16 and mpq.constructor_args()["dtype"] == "torch.bfloat16"
    assert mpq.dequantized_weight().dtype == torch.bfloat16
    sd = {k: v.cpu() for k, v in mpq.state_dict().items()}
    W = ref.wq_dense(ref.unpack_stream(sd["qweight"], [b], [K]), sd["scales"], unpack_zeros_gptq(sd["qzeros"], b, N),
                     sd["g_idx"], asym=True)
    x = torch.randn(3, K, dtype=torch.bfloat16, device=device)
    check_close(mpq(x), x, W)


def test_from_mlx_refuses_bad_scales_and_biases():
    w = torch.zeros(8, 32, dtype=torch.uint32)  # N = 8, K = 256 at 4 bits: 8 groups of 32
    s = torch.ones(8, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"scales and biases must have one dtype \(the layer's\), got "
                                         r"torch.float32 and torch.float16"):
        MPQLinear.from_mlx(w, s.float(), s, 32, 4)
    with pytest.raises(ValueError, match=r"from_mlx: scales must be float32, float16 or bfloat16 of shape \(8, 8\) "
                                         r"\(out_features, K / group_size for K=256\), got torch.float16 \(8, 7\)"):
        MPQLinear.from_mlx(w, s[:, :7], s[:, :7], 32, 4)
    with pytest.raises(ValueError, match=r"from_mlx: biases must be .* got torch.float16 \(8, 4\)"):
        MPQLinear.from_mlx(w, s, s[:, :4], 32, 4)
    with pytest.raises(ValueError, match=r"from_mlx: bias must be a float tensor of shape \(8,\), got"):
        MPQLinear.from_mlx(w, s, s, 32, 4, bias=torch.zeros(7, dtype=torch.float16))
    assert MPQLinear.from_mlx(w, s, s, 32, 4).dtype == torch.float16


@pytest.mark.parametrize("cls,key", [("MPQLinear", "scales"), ("MBWQLinear", "scales"), ("MBWQLinear", "zeros"),
                                     ("MBWQLinear", "channel_scale")])
def test_prepare_refuses_non_finite_params(cls, key):
    """A NaN or inf in the scales, zeros or channel scale of a checkpoint is refused at prepare_params
    (it would silently turn output columns into NaN)."""
    lin = torch.nn.Linear(72, 40, bias=False)
    layer_cls = getattr(lowbit.nn, cls)
    src = layer_cls.from_float(lin, w_bit=4, group_size=32, dtype=torch.float32)
    state = src.state_dict()
    if key not in state:
        pytest.skip(f"{cls} has no {key}")
    bad = state[key].clone().float()
    bad.view(-1)[bad.numel() // 2] = float("nan") if key != "channel_scale" else float("inf")
    state[key] = bad.to(state[key].dtype)
    layer = layer_cls(72, 40, w_bit=4, group_size=32, dtype=torch.float32,
                      **({"use_gba_quant": False, "asym": True} if cls == "MPQLinear" else {"use_mbw": False}))
    layer.load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match=f"{key} holds 1 non-finite"):
        layer.prepare_params()

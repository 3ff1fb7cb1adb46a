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
    # RTN: every weight within half a step of its group's grid (plus the clamp of the grid's range).
    step = (W.reshape(33, 5, 16).amax(-1) - W.reshape(33, 5, 16).amin(-1)) / (2 ** b - 1)
    bound = step.repeat_interleave(16, 1) * (0.5 + 1e-4) + 1e-7
    if asym:
        bound = bound * 2  # an integer zero point shifts the grid by up to half a step
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

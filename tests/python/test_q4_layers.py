"""Q4Linear, Q4Conv2d, Q4MatMul and the int4 packing ops against float64 references (reference.py).

Tolerances (‖out−ref‖/‖ref‖, DESIGN.md): fp32 1e-5 (fp32 GEMMs/convolutions in the backward); fp16/bf16
1e-2. Codes, packing and train/eval equality are exact."""
import pytest
import torch
import torch.nn.functional as F

from lowbit import ops
from lowbit.compat import Q4Conv2dCutlass, Q4LinearCutlass
from lowbit.nn import Q4Conv2d, Q4Linear, Q4MatMul
import reference as ref

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
Q4_WQMAX = 5.6345 ** 2  # BIE's weight-scale constant 5.6345 = sqrt(Q4_WQMAX)


def _steps(layer):
    s_a = max(ref.f32(layer.scale_a.item()), ref.f32(layer.eps.item()))
    return s_a, ref.f32(layer.scale_w.item())


# ------------------------------------------------------------------------------------------ packing
def test_pack_worked_example_and_round_trip(device):
    codes = torch.tensor([[-8, 7, 1]], dtype=torch.int8, device=device)
    packed = ops.pack_s4(codes)
    assert packed.cpu().tolist() == [[-121, 16]]  # 0x87, 0x10
    for K in (1, 2, 17, 64):
        c = torch.randint(-8, 8, (5, K), dtype=torch.int8, device=device)
        p = ops.pack_s4(c)
        assert torch.equal(p.cpu(), ref.pack_s4(c.cpu()))
        assert torch.equal(ops.unpack_s4(p, K), c)
    with pytest.raises(RuntimeError, match="bytes per row"):
        ops.unpack_s4(p, 66)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(RuntimeError):
        ops.pack_s4(torch.tensor([[9, 0]], dtype=torch.int8))


# ------------------------------------------------------------------------------------------ Q4Linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,N", [((7, 33), 5), ((2, 3, 64), 17), ((1, 1), 3), ((50, 129), 31)])
def test_q4_linear_forward_and_gradients(device, dtype, shape, N):
    K = shape[-1]
    layer = Q4Linear(K, N, device=device)
    with torch.no_grad():
        layer.bias_a.copy_(torch.randn(K) * 0.1)
    x = torch.randn(shape).to(dtype).to(device).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    W = layer.weight.detach().cpu()
    assert layer.scale_w.item() == ref.lsq_scale(W, Q4_WQMAX, 1e-5)  # set by prepare_params, BIE's rule
    s_a, s_w = _steps(layer)
    w_codes = ref.codes(W, s_w, -8, 7)
    y_ref, qx = ref.q_linear_forward(x.detach().cpu(), layer.bias_a.detach().cpu(), w_codes, s_a, s_w, -8, 7)
    assert ref.rel_err(y, y_ref) < TOL[dtype]
    G = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    (y * G.to(device)).sum().backward()
    gx, gb, gw, gs = ref.q_linear_backward(G.double(), x.detach().cpu(), layer.bias_a.detach().cpu(), w_codes, qx,
                                          s_a, s_w, -8, 7)
    tol = TOL[dtype]
    assert x.grad.dtype == dtype and ref.rel_err(x.grad, gx) < tol
    assert ref.rel_err(layer.bias_a.grad, gb) < tol
    assert ref.rel_err(layer.weight.grad, gw) < tol
    assert ref.rel_err(layer.scale_a.grad, gs) < max(tol, 1e-5)


def test_q4_linear_eval_qweight_and_state_dict(device):
    layer = Q4Linear(45, 13, device=device)
    x = torch.randn(6, 45, device=device)
    y_train = layer(x)
    layer.eval()
    assert torch.equal(layer(x), y_train)
    q = layer.qweight
    assert q.dtype == torch.int8 and q.shape == (13, 23)
    s_w = ref.f32(layer.scale_w.item())
    assert torch.equal(q.cpu(), ref.pack_s4(ref.codes(layer.weight.detach().cpu(), s_w, -8, 7).to(torch.int8)))
    sd = layer.state_dict()
    other = Q4LinearCutlass(45, 13).to(device).eval()
    other.load_state_dict(sd)
    assert torch.equal(other(x), y_train)
    layer.generate_quantized_weight(qweight_only=True)
    inf = Q4Linear(45, 13, device=device).eval()
    inf.load_state_dict(layer.state_dict())
    assert inf.weight is None and torch.equal(inf(x), y_train)
    bad = dict(sd)
    bad["qweight"] = torch.zeros(13, 45, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"shape \(13, 23\)"):
        Q4Linear(45, 13).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="in_channels=45"):
        layer.train()
        Q4Linear(45, 13, device=device)(torch.randn(2, 44, device=device))


# ------------------------------------------------------------------------------------------ Q4Conv2d
CONV_CASES = [
    # (N, C, H, W, O, k, stride, padding, dilation, groups)
    (2, 6, 9, 7, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 5, 8, 11, 3, (3, 2), (2, 1), (2, 0), (1, 2), 1),
    (3, 8, 6, 6, 6, (1, 1), (1, 1), (0, 0), (1, 1), 2),
    (2, 4, 10, 9, 8, (5, 3), (2, 2), (1, 2), (2, 1), 4),
    (1, 3, 5, 5, 2, (1, 1), (2, 2), (0, 0), (1, 1), 1),
]


@pytest.fixture
def no_tf32():
    """The conv backward runs torch's own convolution gradients, which follow torch's TF32 switch
    (cuDNN allows TF32 by default, ~1e-3 relative error); the fp32 tolerance needs it off."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_q4_conv2d_forward_and_gradients(device, case, channels_last, no_tf32):
    N, C, H, W, O, k, stride, padding, dilation, groups = case
    layer = Q4Conv2d(C, O, k, stride, padding, dilation, groups, device=device)
    with torch.no_grad():
        layer.bias_a.copy_(torch.randn(C) * 0.1)
    x = torch.randn(N, C, H, W, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    s_a, s_w = _steps(layer)
    Wt = layer.weight.detach().cpu()
    b = layer.bias_a.detach().cpu().view(1, -1, 1, 1)
    xq = ref.codes(x.detach().cpu().float() + b.float(), s_a, -8, 7) * s_a
    wq = ref.codes(Wt, s_w, -8, 7) * s_w
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y_ref = F.conv2d(xq, wq, **conv)
    assert y.shape == y_ref.shape and ref.rel_err(y, y_ref) < 1e-5
    G = torch.randn(y.shape, dtype=torch.float64)
    (y * G.float().to(device)).sum().backward()
    gA = torch.nn.grad.conv2d_input(x.shape, wq, G, **conv)
    gW = torch.nn.grad.conv2d_weight(xq, Wt.shape, G, **conv)
    gx, gs = ref.lsq_input_grads(gA, x.detach().cpu().float() + b.float(), s_a, -8, 7, x.numel())
    assert ref.rel_err(x.grad, gx) < 1e-5
    assert ref.rel_err(layer.bias_a.grad, gx.sum((0, 2, 3))) < 1e-5
    assert ref.rel_err(layer.weight.grad, gW) < 1e-5
    assert ref.rel_err(layer.scale_a.grad, gs) < 1e-5
    layer.eval()
    assert torch.equal(layer(x), y)
    cg = C // groups
    assert layer.qweight.shape == (O, *k, (cg + 1) // 2)


def test_q4_conv2d_compat_and_bad_input(device):
    layer = Q4Conv2dCutlass(4, 6, 3, 1, 1).to(device)  # BIE's positional order
    assert layer.padding == (1, 1) and layer.groups == 1
    layer(torch.randn(1, 4, 5, 5, device=device))
    with pytest.raises(RuntimeError, match="weight must have shape|in_channels"):
        layer(torch.randn(1, 5, 5, 5, device=device))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        Q4Conv2d(4, 6, 5, device=device)(torch.randn(1, 4, 3, 3, device=device))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        Q4Conv2d(4, 6, 3, stride=2, device=device)(torch.randn(1, 4, 2, 2, device=device))
    with pytest.raises(RuntimeError, match="4-D"):
        layer(torch.randn(4, 5, 5, device=device))
    with pytest.raises(ValueError):
        Q4Conv2d(4, 6, 3, groups=3)


def _bie_conv_qweight(codes_oihw: torch.Tensor) -> torch.Tensor:
    """BIE's conv qweight (spec §8.6, its I-15): the OIHW codes flattened in memory order, cut into rows of
    C and packed in pairs, shaped (O, kh, kw, C/2)."""
    O, C, kh, kw = codes_oihw.shape
    return ref.pack_s4(codes_oihw.reshape(O * kh * kw, C)).reshape(O, kh, kw, C // 2)


def test_q4_conv2d_loads_bie_qweight(device):
    """A BIE conv checkpoint's qweight is read in BIE's layout and converted to lowbit's OHWI packing: by
    the compat class for a qweight-only state dict (no version marker, as BIE writes it), and by both
    classes when the float weight comes with it (the layout that holds Q(weight) is recognised). Eval
    output equals the float64 convolution of the true quantized weight."""
    C, O, k = 6, 5, (3, 3)
    src = Q4Conv2d(C, O, k, padding=1)
    src.prepare_params()
    x = torch.randn(2, C, 7, 8)
    src(x)  # sets scale_a
    s_a, s_w = _steps(src)
    wc = ref.codes(src.weight.detach(), s_w, -8, 7).to(torch.int8)  # OIHW codes
    bie_q = _bie_conv_qweight(wc)
    assert not torch.equal(bie_q, ops.pack_s4(wc.permute(0, 2, 3, 1).contiguous()))  # the layouts differ
    xq = ref.codes(x.double() + src.bias_a.detach().double().view(1, -1, 1, 1), s_a, -8, 7) * s_a
    y_ref = F.conv2d(xq, wc.double() * s_w, padding=1)
    base = {k_: v for k_, v in src.state_dict().items() if k_ != "weight"}  # a plain dict: no versions
    for cls, with_weight in ((Q4Conv2dCutlass, False), (Q4Conv2dCutlass, True), (Q4Conv2d, True)):
        state = dict(base, qweight=bie_q)
        if with_weight:
            state["weight"] = src.weight.detach().clone()
        layer = cls(C, O, 3, 1, 1) if cls is Q4Conv2dCutlass else cls(C, O, k, padding=1)
        layer.load_state_dict(state)
        layer.to(device).eval()
        y = layer(x.to(device))
        assert ref.rel_err(y, y_ref) < 1e-6, (cls.__name__, with_weight)
        assert torch.equal(layer.qweight.cpu(), ops.pack_s4(wc.permute(0, 2, 3, 1).contiguous()))
        # What it writes is lowbit's layout, marked as such: it reloads unchanged into either class.
        again = Q4Conv2dCutlass(C, O, 3, 1, 1).to(device)
        again.load_state_dict(layer.state_dict())
        assert torch.equal(again.eval()(x.to(device)), y)


def test_q4_conv2d_unmarked_qweight_rules(device):
    """Without the version marker: lowbit's class reads a qweight-only dict as its own OHWI layout; with
    the float weight, a qweight matching neither layout (stale) is dropped with a warning and re-derived,
    so eval equals training."""
    C, O = 4, 3
    src = Q4Conv2d(C, O, 3, padding=1).to(device)
    x = torch.randn(1, C, 6, 6, device=device)
    y_train = src(x)
    src.eval()
    y_eval = src(x)
    assert torch.equal(y_eval, y_train)
    plain = {k: v for k, v in src.state_dict().items() if k != "weight"}
    layer = Q4Conv2d(C, O, 3, padding=1).to(device)
    layer.load_state_dict(plain)
    assert torch.equal(layer.eval()(x), y_eval)
    stale = dict(src.state_dict(), qweight=torch.randint(-128, 128, src.qweight.shape, dtype=torch.int8))
    layer = Q4Conv2d(C, O, 3, padding=1).to(device)
    with pytest.warns(UserWarning, match="matches neither layout"):
        layer.load_state_dict(dict(stale))
    assert torch.equal(layer.eval()(x), y_train)


# ------------------------------------------------------------------------------------------ Q4MatMul
@pytest.mark.parametrize("xs,ys", [((5, 8), (4, 8)), ((2, 3, 5, 8), (2, 3, 4, 8)), ((2, 3, 5, 8), (3, 4, 8)),
                                   ((1, 7, 9), (2, 1, 3, 9))])
def test_q4_matmul_forward_and_gradients(device, xs, ys):
    mm = Q4MatMul(device=device)
    x = torch.randn(xs, device=device, requires_grad=True)
    y = (torch.randn(ys, device=device) * 3).requires_grad_()
    out = mm(x, y)
    sx = ref.lsq_scale(x.detach().cpu(), 127.0)
    sy = ref.lsq_scale(y.detach().cpu(), 127.0)  # from y itself (BIE used x: I-11)
    assert mm.x_clip.item() == sx and mm.y_clip.item() == sy
    xq = ref.codes(x.detach().cpu(), sx, -8, 7) * sx
    yq = ref.codes(y.detach().cpu(), sy, -8, 7) * sy
    out_ref = xq @ yq.transpose(-1, -2)
    assert out.shape == out_ref.shape and ref.rel_err(out, out_ref) < 1e-5
    G = torch.randn(out.shape, dtype=torch.float64)
    (out * G.float().to(device)).sum().backward()
    batch = out.shape[:-2]
    xe, ye = x.detach().cpu().expand(*batch, *xs[-2:]), y.detach().cpu().expand(*batch, *ys[-2:])
    gx, gsx = ref.lsq_input_grads(G @ yq.expand(*batch, *ys[-2:]), xe, sx, -8, 7, x.numel())
    gy, gsy = ref.lsq_input_grads(G.transpose(-1, -2) @ xq.expand(*batch, *xs[-2:]), ye, sy, -8, 7, y.numel())
    assert ref.rel_err(x.grad, gx.sum_to_size(xs)) < 1e-5
    assert ref.rel_err(y.grad, gy.sum_to_size(ys)) < 1e-5
    assert ref.rel_err(mm.x_clip.grad, gsx) < 1e-5 and ref.rel_err(mm.y_clip.grad, gsy) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xs,ys", [((130, 40), (257, 40)), ((2, 1, 5, 8), (1, 3, 4, 8)), ((3, 33, 13), (3, 70, 13)),
                                   ((2, 9, 300), (9, 300)), ((1, 1), (1, 1)), ((4, 6, 64), (6, 64))])
def test_q4_matmul_inference_matches_training_cpu_and_reference(device, dtype, xs, ys):
    """The forward without autograd (no codes written for a backward; on CUDA the quantize-on-load kernel
    for k <= 256, incl. tile tails, broadcast operands and the partial broadcast that is copied) gives the
    training forward's bits, the CPU's bits, and the float64 reference of the quantized product."""
    gen = torch.Generator().manual_seed(sum(xs) + 7 * sum(ys))
    x = torch.randn(xs, generator=gen).to(dtype)
    y = (torch.randn(ys, generator=gen) * 3).to(dtype)
    mm = Q4MatMul(dtype=dtype, device=device)
    xd = x.to(device).requires_grad_()
    out_train = mm(xd, y.to(device))
    assert out_train.requires_grad and out_train.dtype == dtype
    with torch.no_grad():
        out_eval = mm(xd, y.to(device))
    assert torch.equal(out_eval, out_train.detach())
    cpu = Q4MatMul(dtype=dtype)
    cpu.load_state_dict(mm.state_dict())
    with torch.no_grad():
        assert torch.equal(cpu(x, y), out_eval.cpu())
    eps = float(mm.eps)
    sx, sy = max(float(mm.x_clip.detach()), eps), max(float(mm.y_clip.detach()), eps)
    out_ref = (ref.codes(x, sx, -8, 7) * sx) @ (ref.codes(y, sy, -8, 7) * sy).transpose(-1, -2)
    # fp32: the int32 sum is exact, one fp32 multiply by alpha (1e-6); 16-bit outputs: one rounding (2^-8).
    assert ref.rel_err(out_eval, out_ref) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_q4_matmul_bad_input(device):
    mm = Q4MatMul(device=device)
    with pytest.raises(RuntimeError, match="agree on k"):
        mm(torch.randn(2, 3, 4, device=device), torch.randn(2, 5, 5, device=device))
    with pytest.raises(RuntimeError, match="same dtype"):
        mm(torch.randn(2, 3, 4, device=device), torch.randn(2, 5, 4, device=device, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="2 or more dims"):
        mm(torch.randn(4, device=device), torch.randn(5, 4, device=device))


def test_bad_input_messages_name_the_input(device):
    """A wrong input is reported as the input's fault (in_channels, the shape given), in training and in
    eval with the packed qweight, not as a qweight / weight shape mismatch."""
    lin = Q4Linear(37, 23, device=device)
    conv = Q4Conv2d(4, 6, 3, device=device)
    for layer, bad in ((lin, torch.randn(4, 36, device=device)), (conv, torch.randn(2, 5, 8, 8, device=device))):
        for mode in (True, False):
            layer.train(mode)
            with pytest.raises(RuntimeError, match=r"x must .*in_channels=(37|4).*got shape \((4, 36|2, 5, 8, 8)\)"):
                layer(bad)
    with pytest.raises(RuntimeError, match=r"q4_matmul: the batch dims of x .* do not broadcast \(2 vs 3 at dim -3\)"):
        Q4MatMul(device=device)(torch.randn(2, 5, 7, device=device), torch.randn(3, 6, 7, device=device))

"""Q4Linear / Q4Conv2d / Q4MatMul against issue 5's text and spec_nbit_qat.md §4, §5, §8.

Every reference here is written from the spec's math in float64 (a fake-quant autograd graph with a
hand-written LSQ/STE node), never by calling a lowbit op. Codes are formed from an fp32 division (the
quantizer's defined arithmetic) and rounded half to even (lowbit's documented rule; random data avoids
exact ties). Tolerances (DESIGN.md): ||out-ref||/||ref|| <= 1e-5 in fp32, <= 1e-2 in fp16/bf16.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import lowbit  # noqa: F401
from lowbit.compat import Q4Conv2dCutlass, Q4LinearCutlass
from lowbit.nn import Q4Conv2d, Q4Linear, Q4MatMul

QN, QP = -8, 7
EPS = 1e-5
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------ independent float64 reference
def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _step(p: torch.Tensor) -> float:
    """max(s, eps) as the quantizer uses it."""
    return max(float(p.detach().float()), _f32(EPS))


def _v(t32: torch.Tensor, s: float) -> torch.Tensor:
    """t / s in fp32 (the quantizer's arithmetic), returned as float64."""
    return (t32.float() / torch.tensor(s, dtype=torch.float32)).double()


def _codes(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v).clamp(QN, QP)


class _LSQ(torch.autograd.Function):
    """x_hat = s * clamp(round(v), -8, 7), v = t/s precomputed in fp32.
    d/dt: STE with the [-8, 7] clip mask.  d/ds: LSQ (Esser et al.), unmasked gradient in the clip terms,
    gradient scale 1/sqrt(numel * 7)."""

    @staticmethod
    def forward(ctx, t64, s64, v):
        ctx.save_for_backward(v)
        return s64 * _codes(v)

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        below, above = v < QN, v > QP
        mid = ~(below | above)
        r = torch.where(below, float(QN), torch.where(above, float(QP), torch.round(v) - v))
        gs = (g * r).sum() / math.sqrt(v.numel() * QP)
        return g * mid, gs.reshape(()), None


class _STEW(torch.autograd.Function):
    """Weight quantizer: plain STE, no mask, no scale gradient."""

    @staticmethod
    def forward(ctx, w64, s, v):
        return s * _codes(v)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def _leaf(t):
    return t.detach().double().clone().requires_grad_()


def ref_act(x, bias_a, s_a, shift_shape):
    """(x_hat graph, leaves x64, b64, s64); t = x + bias_a formed in fp32 for the codes."""
    x64, b64, s64 = _leaf(x), _leaf(bias_a), torch.tensor(s_a, dtype=torch.float64, requires_grad=True)
    t32 = x.detach().float() + bias_a.detach().float().view(shift_shape)
    xh = _LSQ.apply(x64 + b64.view(shift_shape), s64, _v(t32, s_a))
    return xh, x64, b64, s64


def ref_weight(w, s_w):
    w64 = _leaf(w)
    return _STEW.apply(w64, s_w, _v(w.detach().float(), s_w)), w64



def _assert_matches(layer, x, y, y64, x64, w64, b64, s64, dtype):
    """Output and the gradients of x, weight, bias_a and scale_a against the float64 graph's."""
    tol = TOL[dtype]
    assert rel(y, y64) < tol
    assert x.grad.dtype == dtype and rel(x.grad, x64.grad) < tol
    assert rel(layer.weight.grad, w64.grad) < tol
    assert rel(layer.bias_a.grad, b64.grad) < tol
    assert rel(layer.scale_a.grad, s64.grad) < max(tol, 1e-5)

def rel(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def pack_hi_first(codes: torch.Tensor) -> torch.Tensor:
    """Spec §1.3: byte j = ((q[2j] & 0xF) << 4) | (q[2j+1] & 0xF) along the last dim; odd tail: high nibble only."""
    c = codes.to(torch.int64)
    out = []
    K = c.shape[-1]
    for j in range(0, K, 2):
        hi = c[..., j] & 0xF
        lo = c[..., j + 1] & 0xF if j + 1 < K else torch.zeros_like(hi)
        out.append((hi << 4) | lo)
    b = torch.stack(out, -1)
    return torch.where(b > 127, b - 256, b).to(torch.int8)


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


# ================================================================================================ Q4Linear
def test_q4linear_constructor_state_and_alias():
    # Issue: "Keep BIE's constructors, state-dict keys"; spec §2.1 / §4.1.
    assert issubclass(Q4LinearCutlass, Q4Linear)
    params = list(inspect.signature(Q4LinearCutlass.__init__).parameters.values())[1:]
    names = [p.name for p in params]
    assert names[:6] == ["in_channels", "out_channels", "a_bit", "w_bit", "device", "dtype"]
    defaults = {p.name: p.default for p in params[:6]}
    assert defaults["a_bit"] == 4 and defaults["w_bit"] == 4 and defaults["device"] is None
    assert defaults["dtype"] == torch.float
    layer = Q4LinearCutlass(48, 20)  # positional use as BIE
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias_a", "scale_a", "scale_w", "eps"}
    assert sd["weight"].shape == (20, 48) and sd["weight"].dtype == torch.float32
    assert sd["bias_a"].shape == (48,) and torch.all(sd["bias_a"] == 0)
    assert sd["scale_a"].shape == () and float(sd["scale_a"]) == 0.0
    assert sd["scale_w"].shape == () and sd["scale_w"].dtype == torch.float32 and float(sd["scale_w"]) == 1.0
    assert sd["eps"].shape == () and float(sd["eps"]) == pytest.approx(1e-5)
    # weight init: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear
    assert layer.weight.abs().max() <= 1 / math.sqrt(48) + 1e-7
    assert layer.weight.std() > 0.3 / math.sqrt(48)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"weight", "bias_a", "scale_a"}
    # keyword form and dtype: bias_a / scale_a / eps in dtype, weight and scale_w fp32
    h = Q4Linear(in_channels=6, out_channels=3, dtype=torch.float16)
    assert h.bias_a.dtype == torch.float16 and h.eps.dtype == torch.float16
    assert h.weight.dtype == torch.float32 and h.scale_w.dtype == torch.float32


def test_q4linear_prepare_params_and_scale_a_init():
    # §4.2: scale_w := max(2*mean|W|/5.6345, eps), fixed (not updated by training steps).
    layer = Q4Linear(37, 11)
    layer.prepare_params()
    W = layer.weight.detach().double()
    assert float(layer.scale_w) == pytest.approx(2 * W.abs().mean().item() / 5.6345, rel=1e-5)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer.prepare_params()  # can be called again: re-derived from the current weight
    assert float(layer.scale_w) == pytest.approx(6 * W.abs().mean().item() / 5.6345, rel=1e-5)
    with torch.no_grad():
        layer.weight.zero_()
    layer.prepare_params()
    assert float(layer.scale_w) == pytest.approx(1e-5, rel=1e-3)  # clamped to eps
    # §1.4: scale_a := 2*mean|x|/11.269 on the first forward, from x before the bias_a shift.
    layer = Q4Linear(37, 11)
    layer.prepare_params()
    sw0 = float(layer.scale_w)
    with torch.no_grad():
        layer.bias_a.fill_(5.0)
    x = _randn(2, 3, 37)
    layer(x).sum().backward()
    assert float(layer.scale_a.detach()) == pytest.approx(2 * x.double().abs().mean().item() / 11.269, rel=1e-4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.step()
    sa1 = float(layer.scale_a.detach())
    layer(_randn(4, 37) * 10)  # not re-initialised from a later batch
    assert float(layer.scale_a.detach()) == sa1
    assert float(layer.scale_w) == sw0  # fixed, unlike Q8's per-step scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xshape,N", [((1, 1), 1), ((3, 7), 2), ((5, 31), 9), ((2, 3, 65), 33), ((17,), 4),
                                      ((2, 1, 3, 18), 5), ((33, 40), 64)])
def test_q4linear_forward_backward_vs_float64(dtype, xshape, N):
    """Forward and the gradients of x, weight, scale_a, bias_a; any leading shape and batch size, odd K/N."""
    K = xshape[-1]
    layer = Q4Linear(K, N)
    with torch.no_grad():
        layer.bias_a.copy_(_randn(K, scale=0.2))
    x = _randn(*xshape, dtype=dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*xshape[:-1], N)
    G = _randn(*y.shape)
    (y * G.to(dtype)).sum().backward()
    s_a, s_w = _step(layer.scale_a), _f32(float(layer.scale_w))
    xh, x64, b64, s64 = ref_act(x, layer.bias_a, s_a, (K,))
    wh, w64 = ref_weight(layer.weight, s_w)
    y64 = xh @ wh.t()
    (y64 * G.to(dtype).double()).sum().backward()
    _assert_matches(layer, x, y, y64, x64, w64, b64, s64, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_q4linear_16bit_module(dtype):
    """A layer cast with .half()/.bfloat16() (weight, scales in 16 bits) trains in that dtype."""
    layer = Q4Linear(21, 6).to(dtype)
    x = _randn(9, 21, dtype=dtype).requires_grad_()
    y = layer(x)
    G = _randn(*y.shape).to(dtype)
    (y * G).sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype and layer.weight.grad.dtype == dtype
    s_a, s_w = _step(layer.scale_a), float(layer.scale_w)
    xh, x64, b64, s64 = ref_act(x, layer.bias_a, s_a, (21,))
    wh, w64 = ref_weight(layer.weight, s_w)
    y64 = xh @ wh.t()
    (y64 * G.double()).sum().backward()
    assert rel(y, y64) < 1e-2
    assert rel(x.grad, x64.grad) < 1e-2 and rel(layer.weight.grad, w64.grad) < 1e-2
    assert rel(layer.scale_a.grad, s64.grad) < 1e-2 and rel(layer.bias_a.grad, b64.grad) < 1e-2


def test_q4linear_lsq_clip_terms_count():
    """Activations far outside the clip range: the scale gradient comes only from the clip terms
    (-8 / 7 times the unmasked gA), which BIE zeroes (I-2); x's gradient is masked to zero."""
    layer = Q4Linear(4, 2)
    layer.prepare_params()
    with torch.no_grad():
        layer.scale_a.fill_(0.01)
    x = torch.tensor([[5.0, -5.0, 6.0, -7.0]], requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.all(x.grad == 0)
    s_w = float(layer.scale_w)
    wq = _codes(_v(layer.weight.detach().float(), s_w)) * s_w
    gA = torch.ones(1, 2, dtype=torch.float64) @ wq  # (1, 4)
    r = torch.tensor([7.0, -8.0, 7.0, -8.0], dtype=torch.float64)
    expected = (gA[0] * r).sum().item() / math.sqrt(4 * 7)
    assert float(layer.scale_a.grad) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(layer.scale_a.grad) != 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 7, 64, 129])
def test_q4linear_eval_equals_train_and_qweight_format(dtype, K):
    """Issue: "eval = train"; §4.3: eval with packed qweight gives bitwise the training result; qweight is
    int8 (out, ceil(in/2)), first code in the high nibble."""
    layer = Q4Linear(K, 5)
    with torch.no_grad():
        layer.bias_a.copy_(_randn(K, scale=0.1))
    x = _randn(3, K, dtype=dtype)
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, y_train.detach())
    q = layer.qweight
    assert q.dtype == torch.int8 and q.shape == (5, (K + 1) // 2)
    s_w = _f32(float(layer.scale_w))
    assert torch.equal(q, pack_hi_first(_codes(_v(layer.weight.detach(), s_w))))
    with torch.no_grad():
        assert torch.equal(layer(x), y_train.detach())


def test_q4linear_noncontiguous_input():
    layer = Q4Linear(16, 5)
    base = _randn(16, 6)
    y1 = layer(base.t())
    y2 = layer(base.t().contiguous())
    assert torch.equal(y1, y2)
    xs = _randn(4, 32)[:, ::2]
    assert torch.equal(layer(xs), layer(xs.contiguous()))


def test_q4linear_state_dict_round_trip_after_training():
    torch.manual_seed(3)
    layer = Q4Linear(35, 12)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        layer(_randn(8, 35)).pow(2).mean().backward()
        opt.step()
    x = _randn(5, 35)
    y_train = layer(x).detach()
    sd = layer.state_dict()
    fresh = Q4LinearCutlass(35, 12)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y_train)  # training mode, loaded scales used as-is
    assert torch.equal(fresh.eval()(x), y_train)
    layer.eval()
    layer.generate_quantized_weight(qweight_only=True)  # §4.2: weight := None
    assert layer.weight is None
    sd_q = layer.state_dict()
    assert set(sd_q) == {"bias_a", "scale_a", "scale_w", "eps", "qweight"}
    inf = Q4Linear(35, 12)
    inf.load_state_dict(sd_q)
    assert torch.equal(inf.eval()(x), y_train)
    with pytest.raises(RuntimeError):
        inf.train()(x)  # inference-only: a clear error, not a crash


def test_q4linear_bad_input_errors():
    layer = Q4Linear(12, 4)
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(RuntimeError, match=r"in_channels=12"):
            layer(_randn(3, 11))
    with pytest.raises(RuntimeError, match=r"\bx\b.*(float32|dtype)"):
        layer(_randn(3, 12, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        layer(torch.ones(3, 12, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="empty"):
        layer(torch.randn(0, 12))
    with pytest.raises(ValueError):
        Q4Linear(0, 4)


# ================================================================================================ Q4Conv2d
def test_q4conv2d_constructor_state_and_alias():
    names = list(inspect.signature(Q4Conv2d.__init__).parameters)[1:]
    assert names[:7] == ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"]
    sig = inspect.signature(Q4Conv2d.__init__).parameters
    assert (sig["stride"].default, sig["padding"].default, sig["dilation"].default, sig["groups"].default) == (1, 0, 1, 1)
    # BIE's positional order on the compat alias: (in, out, k, stride, padding, dilation, a_bit, w_bit, device, dtype)
    bie = list(inspect.signature(Q4Conv2dCutlass.__init__).parameters)[1:11]
    assert bie == ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "a_bit", "w_bit",
                   "device", "dtype"]
    c = Q4Conv2dCutlass(6, 8, 3, 2, 1, 1, 4, 4, None, torch.float)
    assert c.stride == (2, 2) and c.padding == (1, 1) and c.groups == 1
    sd = c.state_dict()
    assert set(sd) == {"weight", "bias_a", "scale_a", "scale_w", "eps"}
    assert sd["weight"].shape == (8, 6, 3, 3) and sd["bias_a"].shape == (6,)
    assert float(sd["scale_a"]) == 0 and float(sd["scale_w"]) == 1
    assert c.weight.abs().max() <= 1 / math.sqrt(6 * 9) + 1e-7
    c.prepare_params()
    assert float(c.scale_w) == pytest.approx(2 * c.weight.detach().double().abs().mean().item() / 5.6345, rel=1e-5)


CONV = [
    # N, C, H, W, O, k, stride, padding, dilation, groups
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (2, 3, 5, 9, 4, 3, 1, 0, 1, 1),
    (1, 5, 10, 7, 3, (2, 3), (2, 1), (0, 2), (2, 1), 1),
    (2, 6, 7, 7, 9, 1, 1, 0, 1, 3),       # pointwise, grouped
    (2, 6, 8, 5, 6, 3, 2, 1, 1, 6),       # depthwise
    (1, 7, 9, 11, 5, 1, 2, 0, 1, 1),      # 1x1 stride 2
    (1, 4, 6, 6, 4, 3, 3, 4, 2, 2),       # padding larger than kernel
    (3, 33, 4, 3, 17, (1, 3), 1, (0, 1), 1, 1),
    (2, 8, 12, 10, 12, 5, (1, 2), 2, (1, 3), 4),
]


@pytest.mark.parametrize("case", CONV)
@pytest.mark.parametrize("dtype", DTYPES)
def test_q4conv2d_forward_backward_vs_float64(case, dtype):
    N, C, H, W, O, k, stride, padding, dilation, groups = case
    layer = Q4Conv2d(C, O, k, stride, padding, dilation, groups)
    with torch.no_grad():
        layer.bias_a.copy_(_randn(C, scale=0.2))
    x = _randn(N, C, H, W, dtype=dtype).requires_grad_()
    y = layer(x)
    nn_conv = torch.nn.Conv2d(C, O, k, stride, padding, dilation, groups, bias=False)
    assert y.shape == nn_conv(x.detach().float()).shape and y.dtype == dtype
    G = _randn(*y.shape).to(dtype)
    (y * G).sum().backward()
    s_a, s_w = _step(layer.scale_a), _f32(float(layer.scale_w))
    xh, x64, b64, s64 = ref_act(x, layer.bias_a, s_a, (1, C, 1, 1))
    wh, w64 = ref_weight(layer.weight, s_w)
    y64 = F.conv2d(xh, wh, None, stride, padding, dilation, groups)
    (y64 * G.double()).sum().backward()
    _assert_matches(layer, x, y, y64, x64, w64, b64, s64, dtype)


@pytest.mark.parametrize("case", [CONV[2], CONV[4], CONV[7]])
def test_q4conv2d_channels_last_and_noncontiguous(case):
    N, C, H, W, O, k, stride, padding, dilation, groups = case
    layer = Q4Conv2d(C, O, k, stride, padding, dilation, groups)
    x = _randn(N, C, H, W)
    y = layer(x)
    assert torch.equal(layer(x.to(memory_format=torch.channels_last)), y)
    big = _randn(N, C, H, 2 * W)[..., ::2]  # strided view
    assert torch.equal(layer(big), layer(big.contiguous()))


@pytest.mark.parametrize("case", [CONV[1], CONV[3], CONV[7], CONV[8]])
@pytest.mark.parametrize("dtype", DTYPES)
def test_q4conv2d_eval_equals_train_and_qweight(case, dtype):
    N, C, H, W, O, k, stride, padding, dilation, groups = case
    layer = Q4Conv2d(C, O, k, stride, padding, dilation, groups)
    x = _randn(N, C, H, W, dtype=dtype)
    y_train = layer(x).detach()
    layer.eval()
    assert torch.equal(layer(x), y_train)
    # qweight: int4 pairs along input channels, OHWI order (spec §8.6 export layout), high nibble first
    s_w = _f32(float(layer.scale_w))
    codes = _codes(_v(layer.weight.detach(), s_w)).permute(0, 2, 3, 1)
    assert torch.equal(layer.qweight, pack_hi_first(codes))
    # generate_quantized_weight(qweight_only=True) as BIE: weight dropped, inference still works
    layer.generate_quantized_weight(qweight_only=True)
    assert layer.weight is None and "weight" not in layer.state_dict()
    assert torch.equal(layer(x), y_train)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    other = Q4Conv2d(C, O, k, **kw)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.eval()(x), y_train)


def test_q4conv2d_state_dict_round_trip_and_compat_alias():
    torch.manual_seed(5)
    src = Q4Conv2d(6, 4, 3, padding=1)
    opt = torch.optim.SGD(src.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        src(_randn(2, 6, 5, 5)).pow(2).mean().backward()
        opt.step()
    x = _randn(2, 6, 5, 5)
    y = src(x).detach()
    src.eval()
    assert torch.equal(src(x), y)
    sd = src.state_dict()
    assert set(sd) == {"weight", "bias_a", "scale_a", "scale_w", "eps", "qweight"}
    for layer in (Q4Conv2d(6, 4, 3, padding=1), Q4Conv2dCutlass(6, 4, 3, 1, 1)):
        layer.load_state_dict(sd)
        assert torch.equal(layer(x), y)
        assert torch.equal(layer.eval()(x), y)


def test_q4conv2d_bad_input_errors():
    layer = Q4Conv2d(4, 6, 3)
    with pytest.raises(RuntimeError, match="in_channels"):
        layer(_randn(1, 5, 6, 6))
    with pytest.raises(RuntimeError, match="4-D"):
        layer(_randn(4, 6, 6))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        layer(_randn(1, 4, 2, 8))
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        layer(_randn(1, 4, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="groups"):
        Q4Conv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="stride"):
        Q4Conv2d(4, 6, 3, stride=0)
    with pytest.raises(ValueError, match="kernel_size"):
        Q4Conv2d(4, 6, (3, 3, 3))


# ================================================================================================ Q4MatMul
def test_q4matmul_constructor_and_state():
    sig = inspect.signature(Q4MatMul.__init__).parameters
    assert list(sig)[1:3] == ["dtype", "device"] and sig["dtype"].default == torch.float
    assert sig["device"].default is None
    mm = Q4MatMul()
    sd = mm.state_dict()
    assert set(sd) == {"x_clip", "y_clip", "eps"}
    assert float(sd["x_clip"]) == 0 and float(sd["y_clip"]) == 0 and float(sd["eps"]) == pytest.approx(1e-5)
    assert {n for n, _ in mm.named_parameters()} == {"x_clip", "y_clip"}
    h = Q4MatMul(torch.float16)
    assert h.x_clip.dtype == torch.float16 and h.y_clip.dtype == torch.float16


MM = [
    ((5, 8), (4, 8)),                 # 2-D
    ((1, 1), (1, 1)),
    ((3, 7, 13), (3, 6, 13)),         # batch
    ((2, 3, 5, 9), (6, 9)),           # y broadcast over all batch dims
    ((7, 9), (2, 3, 6, 9)),           # x broadcast
    ((2, 1, 5, 17), (1, 4, 3, 17)),   # both broadcast
    ((4, 1, 2, 5, 8), (3, 1, 4, 8)),  # different ranks
    ((2, 33, 40), (2, 65, 40)),
]


@pytest.mark.parametrize("xs,ys", MM)
@pytest.mark.parametrize("dtype", DTYPES)
def test_q4matmul_forward_backward_vs_float64(xs, ys, dtype):
    mm = Q4MatMul(dtype=dtype)
    x = _randn(*xs, dtype=dtype).requires_grad_()
    y = _randn(*ys, dtype=dtype, scale=3.0).requires_grad_()
    out = mm(x, y)
    # each clip from its own operand: 2*mean|t|/11.269
    rtol = 1e-4 if dtype == torch.float32 else 8e-3  # the clip is stored in dtype
    assert float(mm.x_clip.detach()) == pytest.approx(2 * x.detach().double().abs().mean().item() / 11.269, rel=rtol)
    assert float(mm.y_clip.detach()) == pytest.approx(2 * y.detach().double().abs().mean().item() / 11.269, rel=rtol)
    G = _randn(*out.shape).to(dtype)
    (out * G).sum().backward()
    sx, sy = _step(mm.x_clip), _step(mm.y_clip)
    x64, y64 = _leaf(x), _leaf(y)
    sx64 = torch.tensor(sx, dtype=torch.float64, requires_grad=True)
    sy64 = torch.tensor(sy, dtype=torch.float64, requires_grad=True)
    xh = _LSQ.apply(x64, sx64, _v(x.detach(), sx))
    yh = _LSQ.apply(y64, sy64, _v(y.detach(), sy))
    o64 = torch.matmul(xh, yh.transpose(-1, -2))
    (o64 * G.double()).sum().backward()
    tol = TOL[dtype]
    assert out.dtype == dtype and rel(out, o64) < tol
    assert x.grad.dtype == dtype and rel(x.grad, x64.grad) < tol
    assert y.grad.dtype == dtype and rel(y.grad, y64.grad) < tol
    assert rel(mm.x_clip.grad, sx64.grad) < max(tol, 1e-5)
    assert rel(mm.y_clip.grad, sy64.grad) < max(tol, 1e-5)


def test_q4matmul_noncontiguous_eval_and_round_trip():
    """The peer test's v.transpose(-1, -2) operand; eval == train; state_dict round trip."""
    mm = Q4MatMul()
    v = _randn(2, 3, 10, 8)
    s = _randn(2, 3, 5, 10)
    out = mm(v.transpose(-1, -2), s)
    assert out.shape == (2, 3, 8, 5)
    assert torch.equal(out, mm(v.transpose(-1, -2).contiguous(), s))
    sx, sy = _step(mm.x_clip), _step(mm.y_clip)
    ref = (_codes(_v(v.transpose(-1, -2), sx)) * sx) @ (_codes(_v(s, sy)) * sy).transpose(-1, -2)
    assert rel(out, ref) < 1e-6
    mm.eval()
    assert torch.equal(mm(v.transpose(-1, -2), s), out)
    other = Q4MatMul()
    other.load_state_dict(mm.state_dict())
    with torch.no_grad():
        assert torch.equal(other(v.transpose(-1, -2), s), out)


def test_q4matmul_bad_input_errors():
    mm = Q4MatMul()
    with pytest.raises(RuntimeError, match="k"):
        mm(_randn(2, 3, 4), _randn(2, 5, 6))
    with pytest.raises(RuntimeError, match="broadcast"):
        mm(_randn(2, 3, 4), _randn(3, 5, 4))
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        mm(_randn(2, 3, 4, dtype=torch.float64), _randn(2, 5, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dims"):
        mm(_randn(4), _randn(5, 4))
    with pytest.raises(RuntimeError, match="dtype"):
        mm(_randn(2, 3, 4), _randn(2, 5, 4, dtype=torch.float16))


# ================================================================================================ mixed dtypes
@pytest.mark.parametrize("layer_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_mixed_layer_and_input_dtypes(layer_dtype, x_dtype):
    """dtype= (bias_a, scale_a, eps) different from x's dtype: forward and all gradients still match."""
    tol = 1e-2 if torch.float16 in (layer_dtype, x_dtype) or torch.bfloat16 in (layer_dtype, x_dtype) else 1e-5
    lin = Q4Linear(19, 7, dtype=layer_dtype)
    conv = Q4Conv2d(5, 3, (2, 3), stride=(1, 2), padding=1, dtype=layer_dtype)
    mm = Q4MatMul(dtype=layer_dtype)
    for layer in (lin, conv):
        with torch.no_grad():
            layer.bias_a.copy_(_randn(layer.in_channels, scale=0.2))
    for layer, shape in ((lin, (6, 19)), (conv, (2, 5, 6, 7))):
        x = _randn(*shape, dtype=x_dtype).requires_grad_()
        y = layer(x)
        G = _randn(*y.shape).to(y.dtype)
        (y * G).sum().backward()
        s_a, s_w = _step(layer.scale_a), _f32(float(layer.scale_w))
        sh = (layer.in_channels,) if layer is lin else (1, layer.in_channels, 1, 1)
        xh, x64, b64, s64 = ref_act(x, layer.bias_a, s_a, sh)
        wh, w64 = ref_weight(layer.weight, s_w)
        y64 = xh @ wh.t() if layer is lin else F.conv2d(xh, wh, None, (1, 2), 1)
        (y64 * G.double()).sum().backward()
        name = type(layer).__name__
        assert rel(y, y64) < tol, name
        assert rel(x.grad, x64.grad) < tol, name
        assert rel(layer.weight.grad, w64.grad) < tol, name
        assert rel(layer.bias_a.grad, b64.grad) < tol, name
        assert rel(layer.scale_a.grad, s64.grad) < max(tol, 1e-5), name
    x = _randn(2, 5, 9, dtype=x_dtype).requires_grad_()
    y = _randn(1, 4, 9, dtype=x_dtype).requires_grad_()
    out = mm(x, y)
    G = _randn(*out.shape).to(out.dtype)
    (out * G).sum().backward()
    sx, sy = _step(mm.x_clip), _step(mm.y_clip)
    x64, y64 = _leaf(x), _leaf(y)
    sx64 = torch.tensor(sx, dtype=torch.float64, requires_grad=True)
    sy64 = torch.tensor(sy, dtype=torch.float64, requires_grad=True)
    o64 = _LSQ.apply(x64, sx64, _v(x.detach(), sx)) @ _LSQ.apply(y64, sy64, _v(y.detach(), sy)).transpose(-1, -2)
    (o64 * G.double()).sum().backward()
    assert rel(out, o64) < tol
    assert rel(x.grad, x64.grad) < tol and rel(y.grad, y64.grad) < tol
    assert rel(mm.x_clip.grad, sx64.grad) < max(tol, 1e-5) and rel(mm.y_clip.grad, sy64.grad) < max(tol, 1e-5)


def test_q4matmul_expanded_operand_gradient():
    """An operand that is itself an expand() view (stride 0) and a non-leaf: the gradient reaches its base."""
    mm = Q4MatMul()
    base = _randn(1, 5, 8).requires_grad_()
    x = base.expand(3, 5, 8)
    y = _randn(3, 4, 8).requires_grad_()
    out = mm(x, y)
    G = _randn(*out.shape)
    (out * G).sum().backward()
    sx, sy = _step(mm.x_clip), _step(mm.y_clip)
    # reference on the materialised operand (the op sees a (3, 5, 8) x)
    x64 = _leaf(x.contiguous())
    y64 = _leaf(y)
    sx64 = torch.tensor(sx, dtype=torch.float64, requires_grad=True)
    o64 = _LSQ.apply(x64, sx64, _v(x.detach(), sx)) @ (_codes(_v(y.detach(), sy)) * sy).transpose(-1, -2)
    (o64 * G.double()).sum().backward()
    assert rel(out, o64) < 1e-5
    assert rel(base.grad, x64.grad.sum(0, keepdim=True)) < 1e-5


def test_eval_mode_gradients_equal_training():
    """eval = train extends to the gradients that exist in eval (x, bias_a, scale_a)."""
    for layer, shape in ((Q4Linear(12, 5), (3, 12)), (Q4Conv2d(3, 4, 3, padding=1), (2, 3, 5, 6))):
        x = _randn(*shape).requires_grad_()
        y = layer(x)
        G = _randn(*y.shape)
        y.backward(G)
        grads = [t.grad.clone() for t in (x, layer.bias_a, layer.scale_a)]
        x.grad = None
        layer.zero_grad()
        layer.eval()
        ye = layer(x)
        assert torch.equal(ye, y.detach())
        ye.backward(G)
        for a, b in zip((x.grad, layer.bias_a.grad, layer.scale_a.grad), grads):
            assert torch.equal(a, b)


def test_qweight_follows_weight_updates():
    """§2.1 I-3 fixed: after more training the eval qweight is the current weight's."""
    layer = Q4Linear(12, 5)
    x = _randn(3, 12)
    layer(x)
    layer.eval()
    y_old = layer(x)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).sum().backward()
    opt.step()
    y_train = layer(x).detach()
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, y_train) and not torch.equal(y_eval, y_old)


@pytest.mark.parametrize("cls,args,shape", [(Q4Linear, (8, 4), (2, 8)), (Q4Conv2d, (3, 4, 3), (1, 3, 5, 5))])
def test_hand_set_scale_w_is_used(cls, args, shape):
    """§4.2/§8.2: scale_w is a buffer that prepare_params() sets; a value written into it directly (as BIE
    code or a test that pins the scales does) must be the step the forward uses."""
    layer = cls(*args)
    with torch.no_grad():
        layer.scale_w.fill_(0.05)
        layer.scale_a.fill_(0.2)
    layer(_randn(*shape))
    assert float(layer.scale_w) == pytest.approx(0.05)


def test_q4conv2d_output_layout_like_nn_conv2d():
    """Issue: "NCHW tensors like nn.Conv2d". Code written for nn.Conv2d flattens its output with view()."""
    layer = Q4Conv2d(3, 4, 3)
    x = _randn(2, 3, 6, 6)
    y = layer(x)
    assert y.is_contiguous() == torch.nn.Conv2d(3, 4, 3)(x).is_contiguous()
    assert y.view(2, -1).shape == (2, 4 * 4 * 4)
    xc = x.to(memory_format=torch.channels_last)
    assert layer(xc).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(layer(xc), y)

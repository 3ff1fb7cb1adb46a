"""Q8Linear (BIE: Q8LinearCutlass) against an independent float64 reference written from
reference/spec_nbit_qat.md §0-3, DESIGN.md and the documented deviations of docs/compat.md.

The reference never calls lowbit: the quantizer is the spec's q8_quantization
(clamp(rne(t / max(s, eps)), -128, 127), t and the division in fp32: torch's IEEE fp32 ops, exact), the
step sizes 2*mean|.|/sqrt(127) (mean in float64, docs/compat.md: sqrt(127) instead of 11.269), everything
after the integer codes in float64. Gradients are the fixed LSQ/STE formulas (§1.5 with I-2 and I-5 fixed).
CPU only."""
import math

import pytest
import torch

import lowbit
from lowbit import ops
from lowbit.compat import Q8LinearCutlass
from lowbit.nn import Q8Linear

QN, QP = -128, 127
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REL_OUT = {torch.float32: 2.0 ** -22, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------------------- reference
def f32(v) -> float:
    return float(torch.tensor(float(v), dtype=torch.float64).float())


def step_ref(t: torch.Tensor, eps=None) -> float:
    """max(fp32(2*mean|t|/sqrt(127)), eps); mean in float64."""
    s = f32(2.0 * t.detach().double().abs().mean().item() / math.sqrt(127.0))
    return max(s, f32(float(eps))) if eps is not None else s


def codes_ref(t32: torch.Tensor, s: float) -> torch.Tensor:
    """q8_quantization: clamp(rne(t / s), -128, 127), division in fp32, result float64."""
    v = t32.float() / torch.tensor(s, dtype=torch.float32)
    return torch.round(v).clamp(QN, QP).double()


def shifted(x, bias_a) -> torch.Tensor:
    """x' = x + bias_a in fp32 (docs/ops.md: the shift is fused into the fp32 quantizer)."""
    return x.detach().float() + bias_a.detach().float()


def rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


class Ref:
    """Forward/backward of Q8Linear in float64 for given scalars."""

    def __init__(self, x, bias_a, s_a, s_w, w_codes):
        self.x, self.K = x.detach(), x.shape[-1]
        self.t = shifted(x, bias_a)
        self.s_a, self.s_w = s_a, s_w
        self.qw = w_codes.double()
        self.qx = codes_ref(self.t, s_a)
        acc = self.qx.reshape(-1, self.K) @ self.qw.t()
        self.y = (acc * (s_a * s_w)).reshape(*x.shape[:-1], self.qw.shape[0])

    def backward(self, G):
        K = self.K
        G = G.detach().double().reshape(-1, self.qw.shape[0])
        gA = G @ (self.qw * self.s_w)
        v = (self.t / torch.tensor(self.s_a, dtype=torch.float32)).double().reshape(-1, K)
        small, large = v < QN, v > QP
        mid = ~(small | large)
        gx = gA * mid
        R = torch.where(small, float(QN), torch.where(large, float(QP), torch.round(v) - v))
        denom = math.sqrt(self.x.numel() * QP)
        gs = (R * gA).sum() / denom
        gs_mag = (R * gA).abs().sum() / denom
        gw = G.t() @ (self.qx.reshape(-1, K) * self.s_a)
        return dict(x=gx.reshape(self.x.shape), bias_a=gx.sum(0), weight=gw, scale_a=gs, scale_a_mag=gs_mag,
                    mask=mid.reshape(self.x.shape))


def ref_train(layer, x):
    """The reference of a training forward on the layer's current state (after scale_a is set)."""
    eps = layer.eps.float().item()
    s_a = max(f32(layer.scale_a.float().item()), f32(eps))
    s_w = step_ref(layer.weight.float(), eps)
    return Ref(x, layer.bias_a, s_a, s_w, codes_ref(layer.weight.detach().float(), s_w))


def ref_frozen(layer, x, qweight, scale_w):
    eps = layer.eps.float().item()
    s_a = max(f32(layer.scale_a.float().item()), f32(eps))
    s_w = max(f32(float(scale_w)), f32(eps))
    return Ref(x, layer.bias_a, s_a, s_w, qweight.double())


def check_out(y, y_ref, dtype):
    """Elementwise: fp32(acc)*fp32(s_a*s_w) then one rounding to the output dtype."""
    assert y.dtype == dtype and tuple(y.shape) == tuple(y_ref.shape)
    err = (y.double() - y_ref).abs()
    bound = REL_OUT[dtype] * y_ref.abs() + 1e-30
    assert (err <= bound).all(), f"max err {err.max().item()} at ref {y_ref.flatten()[err.argmax()].item()}"


def make_input(shape, dtype, outliers=True, scale=2.0):
    x = torch.randn(shape, dtype=torch.float64) * scale
    if outliers:  # values beyond 127 * s_a (~36 for this scale) in both directions: both clip regions
        flat = x.view(-1)
        n = max(1, flat.numel() // 10)
        idx = torch.randperm(flat.numel())[:n]
        flat[idx] = torch.sign(torch.randn(n, dtype=torch.float64)) * (60 + 40 * torch.rand(n, dtype=torch.float64))
    return x.to(dtype)


def new_layer(K, N, dtype=torch.float32, **kw):
    layer = Q8Linear(K, N, dtype=dtype, **kw)
    with torch.no_grad():
        layer.bias_a.copy_(torch.randn(K) * 0.3)
    return layer


SHAPES = [((1, 1), 1), ((5, 3), 2), ((2, 3, 17), 7), ((4, 1, 2, 31), 5), ((33, 130), 19)]


# ----------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("layer_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("shape,N", SHAPES)
def test_forward_and_scale_init(shape, N, x_dtype, layer_dtype):
    K = shape[-1]
    layer = new_layer(K, N, layer_dtype)
    x = make_input(shape, x_dtype, outliers=K > 1)
    assert layer.scale_a.item() == 0.0
    y = layer(x)
    # §1.4: scale_a := (2*mean|x|/sqrt(127)).to(dtype) from the unshifted input, over the whole batch.
    want = step_ref(x)
    assert layer.scale_a.dtype == layer_dtype and layer.scale_a.shape == ()
    assert layer.scale_a.item() == pytest.approx(want, rel=REL_OUT[layer_dtype] if layer_dtype != torch.float32
                                                 else 1e-6)
    assert not layer.scale_a.requires_grad or layer.scale_a.grad_fn is None
    r = ref_train(layer, x)
    check_out(y, r.y, x_dtype)  # docs/compat.md: output in x's dtype (BIE: always fp32)


def test_forward_non_contiguous_and_ties():
    """Ties round half to even (spec §1.2(b) / §3.3); non-contiguous input is read by its strides."""
    layer = Q8Linear(7, 1)
    with torch.no_grad():
        layer.scale_a.fill_(0.5)
        layer.weight.fill_(0.3)  # all weight codes round(sqrt(127)/2) = 6
    #  v = x / 0.5: -129 (clip), -128, 127, 127.5 (clip -> 127), 2.5 -> 2, -1.5 -> -2, 0.5 -> 0
    x = torch.tensor([[-64.5, -64.0, 63.5, 63.75, 1.25, -0.75, 0.25]])
    y = layer(x)
    s_w = step_ref(layer.weight)
    qsum = -128 - 128 + 127 + 127 + 2 - 2 + 0
    assert codes_ref(layer.weight, s_w).eq(6).all()
    assert y.item() == pytest.approx(0.5 * s_w * 6 * qsum, rel=1e-6)
    # non-contiguous (transposed) input
    layer2 = new_layer(9, 4)
    xt = torch.randn(9, 6).t()
    assert not xt.is_contiguous()
    y2 = layer2(xt)
    check_out(y2, ref_train(layer2, xt.contiguous()).y, torch.float32)


def test_weight_scale_is_dynamic_in_training():
    """§1.4/§3.3: in training the weight step is recomputed from the current weight on every forward
    (the scale_w buffer is not used, and keeps its value)."""
    layer = new_layer(24, 6)
    x = make_input((5, 24), torch.float32)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(3.7)
        layer.scale_w.fill_(123.0)
    y = layer(x)
    check_out(y, ref_train(layer, x).y, torch.float32)
    assert layer.scale_w.item() == 123.0
    # all-zero weight: step clamps to eps, zero output, no NaN
    with torch.no_grad():
        layer.weight.zero_()
    y = layer(x)
    assert torch.equal(y, torch.zeros_like(y))


# ----------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("layer_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("shape,N", SHAPES[1:])
def test_gradients(shape, N, x_dtype, layer_dtype):
    K = shape[-1]
    layer = new_layer(K, N, layer_dtype)
    x = make_input(shape, x_dtype).requires_grad_()
    y = layer(x)
    G = torch.randn(y.shape).to(x_dtype)
    (y * G).sum().backward()
    r = ref_train(layer, x)
    g = r.backward(G)
    tol = TOL[x_dtype] if x_dtype != torch.float32 else TOL[layer_dtype]
    # STE with clip mask, no extra s_a factor (I-5 fixed)
    assert x.grad.dtype == x_dtype and x.grad.shape == x.shape
    assert rel_err(x.grad, g["x"]) < tol
    assert (x.grad[~g["mask"]] == 0).all()
    assert layer.bias_a.grad.dtype == layer_dtype and layer.bias_a.grad.shape == (K,)
    assert rel_err(layer.bias_a.grad, g["bias_a"]) < max(tol, TOL[layer_dtype])
    # weight: plain STE G^T . x_hat, no mask
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.shape == (N, K)
    assert rel_err(layer.weight.grad, g["weight"]) < tol
    # scale_a: LSQ with the clip terms (I-2 fixed); bound relative to the magnitude of the summed terms
    assert layer.scale_a.grad.shape == () and layer.scale_a.grad.dtype == layer_dtype
    gs_tol = max(tol, TOL[layer_dtype], 1e-5)
    assert abs(layer.scale_a.grad.double().item() - g["scale_a"].item()) <= gs_tol * g["scale_a_mag"].item() + 1e-30
    assert not layer.eps.requires_grad and not layer.scale_w.requires_grad


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_lsq_clip_terms_everything_clipped(sign):
    """Every element clipped: grad_x = grad_bias_a = 0 and grad_scale_a = Qp (or Qn) * sum(gA) /
    sqrt(numel * 127): BIE's masked formula gives exactly 0 here (I-2)."""
    layer = new_layer(10, 3)
    with torch.no_grad():
        layer.bias_a.zero_()
        layer.scale_a.fill_(0.01)
    x = (sign * (5.0 + torch.rand(2, 4, 10))).requires_grad_()
    y = layer(x)
    G = torch.randn(y.shape)
    (y * G).sum().backward()
    g = ref_train(layer, x).backward(G)
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(layer.bias_a.grad, torch.zeros(10))
    s_w = step_ref(layer.weight, 1e-5)
    gA = G.double().reshape(-1, 3) @ (codes_ref(layer.weight, s_w) * s_w)
    q = QP if sign > 0 else QN
    want = q * gA.sum().item() / math.sqrt(x.numel() * 127)
    assert layer.scale_a.grad.item() == pytest.approx(want, rel=1e-5)
    assert layer.scale_a.grad.item() == pytest.approx(g["scale_a"].item(), rel=1e-5)
    assert abs(want) > 0


def test_gradient_boundary_mask():
    """v == Qn and v == Qp are inside (mask 1); v = 127.5 and -129 are clipped (§1.5: small = v < Qn,
    large = v > Qp)."""
    layer = Q8Linear(6, 2)
    with torch.no_grad():
        layer.scale_a.fill_(0.5)
    x = torch.tensor([[-64.0, 63.5, 63.75, -64.5, 1.0, -3.0]], requires_grad=True)
    y = layer(x)
    y.sum().backward()
    s_w = step_ref(layer.weight, 1e-5)
    gA = torch.ones(1, 2, dtype=torch.float64) @ (codes_ref(layer.weight, s_w) * s_w)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1]], dtype=torch.float64)
    assert rel_err(x.grad, gA * mask) < 1e-6
    assert (x.grad[0, 2:4] == 0).all()
    R = torch.tensor([[0.0, 0.0, 127.0, -128.0, 0.0, 0.0]], dtype=torch.float64)
    assert layer.scale_a.grad.item() == pytest.approx(((R * gA).sum() / math.sqrt(6 * 127)).item(), rel=1e-5)


def test_eval_backward_input_gradients_only():
    """Eval uses the frozen int8 qweight: no weight gradient, but input/scale gradients follow the
    same formulas with the frozen codes and scale_w."""
    layer = new_layer(20, 6)
    x = make_input((7, 20), torch.float32)
    layer(x)
    layer.eval()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    G = torch.randn(y.shape)
    (y * G).sum().backward()
    g = ref_frozen(layer, x, layer.qweight, layer.scale_w).backward(G)
    assert layer.weight.grad is None
    assert rel_err(xg.grad, g["x"]) < 1e-5
    assert abs(layer.scale_a.grad.item() - g["scale_a"].item()) <= 1e-5 * g["scale_a_mag"].item()


# ----------------------------------------------------------------------------------------- eval = train
@pytest.mark.parametrize("layer_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_eval_equals_train_bitwise(x_dtype, layer_dtype):
    layer = new_layer(37, 11, layer_dtype)
    x = make_input((3, 5, 37), x_dtype)
    y_train = layer(x)
    layer.eval()
    assert layer.opt_weight is layer.qweight
    y_eval = layer(x)
    assert torch.equal(y_train, y_eval)
    # the frozen state is the spec's generate_quantized_weight: scale_w = max(2 mean|W|/sqrt(127), eps)
    s_w = step_ref(layer.weight, layer.eps.float().item())
    assert layer.scale_w.dtype == torch.float32 and layer.scale_w.item() == s_w
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (11, 37)
    assert torch.equal(layer.qweight.double(), codes_ref(layer.weight, s_w))
    assert not layer.qweight.requires_grad
    # train -> update -> eval sees the new weight (I-3)
    layer.train()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.1)
    layer.eval()
    y_eval2 = layer(x)
    layer.train()
    assert torch.equal(layer(x), y_eval2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eval_equals_train_after_module_cast(dtype):
    layer = new_layer(64, 16).to(dtype)
    x = make_input((5, 64), dtype)
    y_train = layer(x)
    layer.eval()
    assert torch.equal(layer(x), y_train)


def test_generate_quantized_weight_and_qweight_only():
    layer = new_layer(40, 9)
    x = make_input((6, 40), torch.float32)
    layer(x)
    layer.prepare_params()  # no-op for Q8 (§3.2)
    assert layer.qweight is None
    layer.generate_quantized_weight()
    assert layer.weight is not None and layer.qweight is not None
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias_a", "scale_a", "qweight", "scale_w", "eps"}
    layer.eval()
    y = layer(x)
    r = ref_frozen(layer, x, layer.qweight, layer.scale_w)
    check_out(y, r.y, torch.float32)
    layer.generate_quantized_weight(qweight_only=True)
    assert layer.weight is None
    sd = layer.state_dict()
    assert set(sd) == {"bias_a", "scale_a", "qweight", "scale_w", "eps"}
    assert torch.equal(layer(x), y)  # I-4 fixed: qweight-only inference works
    with torch.no_grad():
        assert torch.equal(layer(x[:2]), y[:2])
    # a fresh layer loads the qweight-only state dict (strict) and infers identically
    other = Q8LinearCutlass(40, 9).eval()
    other.load_state_dict(sd)
    assert other.weight is None and torch.equal(other(x), y)
    layer.train()
    with pytest.raises(RuntimeError):
        layer(x)


# ----------------------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_keys_dtypes_round_trip(dtype):
    layer = Q8Linear(13, 5, dtype=dtype)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias_a", "scale_a", "scale_w", "eps"}
    assert sd["weight"].dtype == torch.float32 and sd["weight"].shape == (5, 13)
    assert sd["bias_a"].dtype == dtype and sd["bias_a"].shape == (13,) and (sd["bias_a"] == 0).all()
    assert sd["scale_a"].dtype == dtype and sd["scale_a"].shape == () and sd["scale_a"].item() == 0
    assert sd["scale_w"].dtype == torch.float32 and sd["scale_w"].item() == 1.0
    assert sd["eps"].dtype == dtype and sd["eps"].item() == torch.tensor(1e-5, dtype=dtype).item()
    bound = 1 / math.sqrt(13)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    assert sd["weight"].abs().max() <= bound and sd["weight"].abs().max() > 0.3 * bound
    with torch.no_grad():
        layer.bias_a.copy_(torch.randn(13))
    x = make_input((4, 13), torch.float32).requires_grad_()
    G = torch.randn(4, 5)
    y = layer(x)
    (y * G).sum().backward()
    other = Q8Linear(13, 5, dtype=dtype)
    other.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    y2 = other(x2)
    (y2 * G).sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    for name in ("weight", "bias_a", "scale_a"):
        assert torch.equal(getattr(layer, name).grad, getattr(other, name).grad), name
    layer.eval(), other.eval()
    ye = layer(x)
    sd = layer.state_dict()
    assert sd["qweight"].dtype == torch.int8 and sd["qweight"].shape == (5, 13)
    third = Q8Linear(13, 5, dtype=dtype).eval()
    third.load_state_dict(sd)
    assert torch.equal(third(x), ye) and torch.equal(other(x), ye)


def _bie_qweight(weight):
    """BIE's generate_quantized_weight (its own constant 11.269): (codes int8, scale)."""
    s = max(f32(2 * weight.double().abs().mean().item() / 11.269), f32(1e-5))
    return torch.round(weight.float() / s).clamp(QN, QP).to(torch.int8), s


def test_bie_checkpoints_load():
    K, N = 24, 10
    torch.manual_seed(7)
    w = torch.empty(N, K).uniform_(-0.2, 0.2)
    bias_a = torch.randn(K) * 0.1
    x = make_input((3, 4, K), torch.float32)
    # (a) a training checkpoint (no qweight; scale_w still 1)
    ck = {"weight": w, "bias_a": bias_a, "scale_a": torch.tensor(0.21), "scale_w": torch.tensor(1.0),
          "eps": torch.tensor(1e-5)}
    layer = Q8LinearCutlass(K, N, 8, 8, "cpu", torch.float)
    layer.load_state_dict(ck)
    y = layer(x)
    assert layer.scale_a.item() == pytest.approx(0.21)  # a loaded non-zero scale is kept
    check_out(y, ref_train(layer, x).y, torch.float32)
    layer.eval()
    assert torch.equal(layer(x), y)
    # (b) a packed BIE checkpoint: eval must use its qweight and scale_w as they are
    q, s = _bie_qweight(w)
    ck_b = dict(ck, qweight=q, scale_w=torch.tensor(s))
    layer = Q8LinearCutlass(K, N).eval()
    layer.load_state_dict(ck_b)
    y = layer(x)
    check_out(y, ref_frozen(layer, x, q, s).y, torch.float32)
    # (c) qweight-only: no weight key
    ck_c = {k: v for k, v in ck_b.items() if k != "weight"}
    layer = Q8LinearCutlass(K, N).eval()
    layer.load_state_dict(ck_c)
    assert layer.weight is None
    assert torch.equal(layer(x), y)
    # (d) a fp16 layer takes fp32 checkpoint scalars
    layer = Q8LinearCutlass(K, N, dtype=torch.float16).eval()
    layer.load_state_dict(ck_b)
    assert layer.bias_a.dtype == torch.float16 and layer.scale_a.dtype == torch.float16
    y16 = layer(x.half())
    check_out(y16, ref_frozen(layer, x.half(), q, s).y, torch.float16)


def test_training_checkpoint_loads_into_evaluated_layer():
    x = torch.randn(4, 16)
    src = Q8Linear(16, 8)
    src(x)
    ck = src.state_dict()  # training mode: no qweight
    assert "qweight" not in ck
    dst = Q8Linear(16, 8).eval()
    dst(x)  # eval forward: dst now holds a qweight
    dst.load_state_dict(ck)
    src.eval()
    assert torch.equal(dst(x), src(x))


def test_scale_a_init_rules():
    x = make_input((2, 3, 12), torch.float32)
    # eval-mode first forward also initialises (BIE: set_activation in every forward)
    layer = new_layer(12, 4).eval()
    with torch.no_grad():
        layer(x)
    assert layer.scale_a.item() == pytest.approx(step_ref(x), rel=1e-6)
    # later forwards do not touch it
    s0 = layer.scale_a.item()
    layer.train()
    layer(x * 10)
    assert layer.scale_a.item() == s0
    # a state dict with scale_a == 0 re-arms the initialisation
    sd = layer.state_dict()
    sd["scale_a"] = torch.tensor(0.0)
    layer.load_state_dict(sd)
    layer(x * 3)
    assert layer.scale_a.item() == pytest.approx(step_ref(x * 3), rel=1e-6)
    # set_activation: initialises and returns x + bias_a
    layer = new_layer(12, 4)
    out = layer.set_activation(x)
    assert torch.equal(out, x + layer.bias_a) and layer.scale_a.item() == pytest.approx(step_ref(x), rel=1e-6)


def test_opt_weight_and_set_weight_data():
    layer = new_layer(8, 3)
    assert layer.opt_weight is layer.weight
    w = torch.randn(3, 8)
    layer.set_weight_data(w)
    assert layer.weight.requires_grad and torch.equal(layer.weight, w)  # I-21 fixed
    x = make_input((4, 8), torch.float32)
    check_out(layer(x), ref_train(layer, x).y, torch.float32)
    layer.eval()
    q = layer.opt_weight
    assert q.dtype == torch.int8 and q.shape == (3, 8)
    # set_quantized_weight_data: eval uses the given codes with the current scale_w
    codes = torch.randint(-128, 128, (3, 8), dtype=torch.int8)
    layer.set_quantized_weight_data(codes)
    with torch.no_grad():
        y = layer(x)
    check_out(y, ref_frozen(layer, x, codes, layer.scale_w).y, torch.float32)


# ----------------------------------------------------------------------------------------- int8 backward
def rows_q_ref(G):
    """SwitchBack per-row int8 quantization (float64 definition): s_i = fp32(max_j |G_ij| / 127),
    q = clamp(rne(fp32(G / s_i)), -127, 127); an all-zero row gives 0."""
    G = G.detach().float().double()
    amax = G.abs().amax(dim=-1)
    s = (amax / 127).float().double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((G / safe[:, None]).float().double()).clamp(-127, 127)
    q = torch.where((s > 0)[:, None], q, torch.zeros_like(q))
    return q, s


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("shape,N", [((6, 21), 9), ((2, 5, 40), 13), ((1, 1), 1)])
def test_int8_backward(shape, N, x_dtype):
    K = shape[-1]
    layer = new_layer(K, N, int8_backward=True)
    x = make_input(shape, x_dtype, outliers=K > 1).requires_grad_()
    y = layer(x)
    G = torch.randn(y.shape).to(x_dtype)
    G.view(-1, N)[0] *= 100.0  # rows of very different scale: one scale per row
    (y * G).sum().backward()
    r = ref_train(layer, x)
    qG, s = rows_q_ref(G.reshape(-1, N))
    G_hat = (qG * s[:, None]).reshape(G.shape)
    g_hat = r.backward(G_hat)   # input-side gradients: from the dequantized per-row int8 gradient
    g_full = r.backward(G)      # weight gradient: stays float
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2
    assert x.grad.dtype == x_dtype and rel_err(x.grad, g_hat["x"]) < tol
    assert rel_err(layer.bias_a.grad, g_hat["bias_a"]) < tol
    assert abs(layer.scale_a.grad.item() - g_hat["scale_a"].item()) <= max(tol, 1e-5) * g_hat["scale_a_mag"].item()
    assert rel_err(layer.weight.grad, g_full["weight"]) < tol
    # the output is the same as without the option
    layer.int8_backward = False
    assert torch.equal(layer(x), y)


# ----------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("int8_backward", [False, True])
def test_compile_fullgraph_matches_eager(int8_backward):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=32):
        layer = new_layer(30, 12, torch.bfloat16, int8_backward=int8_backward)
        twin = Q8Linear(30, 12, dtype=torch.bfloat16, int8_backward=int8_backward)
        twin.load_state_dict(layer.state_dict())
        x = make_input((2, 3, 30), torch.bfloat16)
        G = torch.randn(2, 3, 12).bfloat16()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = compiled(xa), twin(xb)  # fresh layer: scale_a is initialised inside the graph
        assert torch.equal(ya, yb) and layer.scale_a.item() != 0
        (ya.float() * G.float()).sum().backward()
        (yb.float() * G.float()).sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        for name in ("weight", "bias_a", "scale_a"):
            assert torch.equal(getattr(layer, name).grad, getattr(twin, name).grad), name
        layer.eval(), twin.eval()
        with torch.no_grad():
            assert torch.equal(compiled(x), twin(x))


def test_compile_default_backend_fullgraph():
    """torch.compile's default backend (inductor, CPU), fullgraph: training forward + backward of a fresh
    layer and eval forwards, equal to an eager twin; other batch shapes too."""
    torch._dynamo.reset()
    layer = new_layer(32, 16)
    twin = Q8Linear(32, 16)
    twin.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, fullgraph=True)
    x = make_input((5, 32), torch.float32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compiled(xa), twin(xb)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    for name in ("weight", "bias_a", "scale_a"):
        assert torch.equal(getattr(layer, name).grad, getattr(twin, name).grad), name
    with torch.no_grad():
        for shape in ((3, 32), (2, 7, 32)):
            xx = make_input(shape, torch.float32)
            assert torch.equal(compiled(xx), twin(xx))
        layer.eval(), twin.eval()
        assert torch.equal(compiled(x), twin(x))


def test_saved_input_modified_in_place_is_detected():
    """The backward keeps a reference to x (docs/compat.md): an in-place change of x before backward must
    raise (autograd's version check), never give gradients of the modified x."""
    layer = new_layer(8, 4)
    x = torch.randn(3, 8)
    y = layer(x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_compiled_eval_sees_weight_update():
    torch._dynamo.reset()
    layer = new_layer(16, 8).eval()
    x = make_input((4, 16), torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(x)
        layer.weight.mul_(-1.5)
        y_c = compiled(x)
    twin = Q8Linear(16, 8).eval()
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "qweight"})
    with torch.no_grad():
        assert torch.equal(y_c, twin(x))


# ----------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    layer = new_layer(12, 5)
    with pytest.raises(RuntimeError, match=r"x.*in_channels=12|in_channels=12.*x"):
        layer(torch.randn(4, 11))
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        layer(torch.ones(4, 12, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        layer(torch.randn(4, 12, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="empty"):
        layer(torch.randn(0, 12))
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        layer(torch.tensor(1.0))
    layer(torch.randn(2, 12))  # scale set; the op's own checks now
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        layer(torch.ones(4, 12, dtype=torch.int32))
    x, W, b = torch.randn(3, 8), torch.randn(4, 8), torch.zeros(8)
    sa, sw, eps = torch.tensor(0.05), torch.tensor(0.02), torch.tensor(1e-5)
    with pytest.raises(RuntimeError, match="bias_a"):
        ops.q8_linear(x, torch.zeros(7), W, sa, sw, eps)
    with pytest.raises(RuntimeError, match="scale_a"):
        ops.q8_linear(x, b, W, torch.ones(2), sw, eps)
    with pytest.raises(RuntimeError, match="scale_w"):
        ops.q8_linear(x, b, W, sa, torch.ones(2), eps)
    with pytest.raises(RuntimeError, match="eps"):
        ops.q8_linear(x, b, W, sa, sw, torch.ones(3))
    with pytest.raises(RuntimeError, match="weight"):
        ops.q8_linear(x, b, torch.randn(8), sa, sw, eps)
    with pytest.raises(RuntimeError, match="weight"):
        ops.q8_linear(x, b, W.int(), sa, sw, eps)
    with pytest.raises(ValueError, match="a_bit"):
        Q8Linear(8, 4, a_bit=4)
    with pytest.raises(ValueError, match="in_channels"):
        Q8Linear(0, 4)
    with pytest.raises(ValueError, match="int8_backward"):
        Q8Linear(8, 4, int8_backward="yes")
    sd = Q8Linear(12, 5).state_dict()
    for key, bad in (("qweight", torch.zeros(5, 12)), ("qweight", torch.zeros(12, 5, dtype=torch.int8)),
                     ("scale_w", torch.tensor(0.0)), ("eps", torch.tensor(float("inf"))),
                     ("scale_a", torch.tensor(float("nan"))), ("bias_a", torch.zeros(11))):
        with pytest.raises(RuntimeError, match=key):
            Q8Linear(12, 5).load_state_dict(dict(sd, **{key: bad}))

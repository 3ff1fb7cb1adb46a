"""lowbit.nn.Q8Linear against the float64 reference of its math (reference.py).

Tolerances (‖out−ref‖/‖ref‖, DESIGN.md): fp32 1e-5; fp16/bf16 1e-2. Forward codes are exact; the
fp32 backward runs fp32 GEMMs (relative error ~1e-6 at these sizes)."""
import math

import pytest
import torch

import lowbit
from lowbit.compat import Q8LinearCutlass
from lowbit.nn import Q8Linear
import reference as ref

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _layer(K, N, device, dtype=torch.float32):
    layer = Q8Linear(K, N, device=device, dtype=dtype)
    with torch.no_grad():
        layer.bias_a.copy_(torch.randn(K) * 0.1)
    return layer


def _expected(layer, x):
    s_a = max(ref.f32(layer.scale_a.item()), ref.f32(layer.eps.item()))
    s_w = ref.lsq_scale(layer.weight.detach().cpu(), 127.0, layer.eps.item())
    w_codes = ref.codes(layer.weight.detach().cpu(), s_w, -128, 127)
    y, qx = ref.q_linear_forward(x.detach().cpu(), layer.bias_a.detach().cpu(), w_codes, s_a, s_w, -128, 127)
    return y, qx, w_codes, s_a, s_w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,N", [((7, 33), 5), ((2, 3, 65), 17), ((1, 1), 1), ((129, 100), 31)])
def test_forward_and_gradients(device, dtype, shape, N):
    K = shape[-1]
    layer = _layer(K, N, device)
    x = (torch.randn(shape) * 2).to(dtype).to(device).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    # scale_a was initialised from this batch (before the shift): 2*mean|x|/sqrt(127)
    assert layer.scale_a.item() == pytest.approx(ref.lsq_scale(x.detach().cpu(), 127.0), rel=1e-6)
    y_ref, qx, w_codes, s_a, s_w = _expected(layer, x)
    assert ref.rel_err(y, y_ref) < TOL[dtype]

    G = torch.randn(y.shape, dtype=torch.float64)
    (y * G.to(dtype).to(device)).sum().backward()
    gx, gb, gw, gs = ref.q_linear_backward(G.to(dtype).double(), x.detach().cpu(), layer.bias_a.detach().cpu(),
                                          w_codes, qx, s_a, s_w, -128, 127)
    tol = TOL[dtype]
    assert x.grad.dtype == dtype and ref.rel_err(x.grad, gx) < tol
    assert ref.rel_err(layer.bias_a.grad, gb) < tol
    assert layer.weight.grad.dtype == torch.float32 and ref.rel_err(layer.weight.grad, gw) < tol
    assert layer.scale_a.grad.shape == () and ref.rel_err(layer.scale_a.grad, gs) < max(tol, 1e-5)


def test_lsq_clip_terms_kept(device):
    """Inputs far outside the clip range: BIE's scale gradient would be exactly 0 there (I-2)."""
    layer = _layer(16, 4, device)
    with torch.no_grad():
        layer.scale_a.fill_(1e-3)  # every |x| >> 127 * 1e-3 clips
    x = (torch.randn(8, 16) + 3.0).to(device)
    layer(x).sum().backward()
    assert layer.scale_a.grad.abs().item() > 0
    assert torch.count_nonzero(layer.bias_a.grad).item() < 16  # most inputs clipped: masked STE


def test_eval_equals_train_and_qweight_lifecycle(device):
    layer = _layer(45, 13, device)
    x = torch.randn(6, 45, device=device)
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert layer.qweight is not None and layer.qweight.dtype == torch.int8 and layer.qweight.shape == (13, 45)
    assert torch.equal(y_train, y_eval)
    # further training: qweight dropped, then regenerated from the new weight (never stale)
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    assert layer.qweight is None
    y_train2 = layer(x)
    layer.eval()
    assert torch.equal(layer(x), y_train2)
    # an optimizer step without a training forward also invalidates it
    q_before = layer.qweight.clone()
    with torch.no_grad():
        layer.weight.mul_(-1)
    layer(x)
    assert not torch.equal(layer.qweight, q_before)


def test_qweight_only_inference(device):
    layer = _layer(40, 24, device)
    x = torch.randn(5, 40, device=device)
    layer(x)
    layer.eval()
    y = layer(x)
    layer.generate_quantized_weight(qweight_only=True)
    assert layer.weight is None and "weight" not in layer.state_dict()
    assert torch.equal(layer(x), y)
    packed = sum(b.numel() * b.element_size() for b in layer.buffers() if b.dim() == 2)
    assert packed == 40 * 24  # one byte per weight
    layer.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x)


def test_state_dict_round_trip_and_bie_keys(device):
    layer = _layer(20, 7, device)
    x = torch.randn(3, 20, device=device)
    layer(x)
    layer.eval()
    y = layer(x)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias_a", "scale_a", "scale_w", "eps", "qweight"}
    other = Q8Linear(20, 7, device=device).eval()
    other.load_state_dict(sd)
    assert torch.equal(other(x), y)
    # a BIE-style checkpoint (what Q8LinearCutlass.state_dict() holds after training, no qweight)
    bie = {"weight": layer.weight.detach().cpu(), "bias_a": layer.bias_a.detach().cpu(),
           "scale_a": layer.scale_a.detach().cpu(), "scale_w": torch.tensor(1.0), "eps": torch.tensor(1e-5)}
    compat = Q8LinearCutlass(20, 7).to(device).eval()
    compat.load_state_dict(bie)
    assert torch.equal(compat(x), y)
    # a qweight-only checkpoint loads into a fresh layer
    layer.generate_quantized_weight(qweight_only=True)
    inf = Q8Linear(20, 7, device=device).eval()
    inf.load_state_dict(layer.state_dict())
    assert inf.weight is None and torch.equal(inf(x), y)


def test_bad_inputs(device):
    layer = _layer(12, 5, device)
    with pytest.raises(RuntimeError, match="in_channels=12"):
        layer(torch.randn(4, 11, device=device))
    with pytest.raises(RuntimeError, match="floating-point|float32"):
        layer(torch.ones(4, 12, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="floating-point|float32"):
        layer(torch.ones(4, 12, dtype=torch.complex64, device=device))
    with pytest.raises(RuntimeError, match="empty"):
        layer(torch.randn(0, 12, device=device))
    layer(torch.randn(4, 12, device=device))
    # A diverged step is not tested on the host (that would sync the device every call): the output
    # turns NaN, as with a NaN weight in nn.Linear, on every device.
    for bad_step in (float("nan"), float("inf"), -1.0):
        with torch.no_grad():
            layer.scale_a.fill_(bad_step)
            layer.eps.fill_(-2.0 if bad_step == -1.0 else 1e-5)
        y = layer(torch.randn(4, 12, device=device))
        assert y.shape == (4, 5) and torch.isnan(y).all(), bad_step
    with torch.no_grad():
        layer.eps.fill_(1e-5)
    bad = Q8Linear(12, 5).state_dict()
    bad["qweight"] = torch.zeros(5, 11, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"qweight'\] must be an int8 tensor of shape \(5, 12\)"):
        Q8Linear(12, 5).load_state_dict(bad)
    bad = Q8Linear(12, 5).state_dict()
    bad["scale_w"] = torch.tensor(float("nan"))
    with pytest.raises(RuntimeError, match="finite"):
        Q8Linear(12, 5).load_state_dict(bad)
    with pytest.raises(ValueError):
        Q8Linear(12, 5, a_bit=4)
    with pytest.raises(ValueError):
        Q8Linear(0, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch():
    layer = _layer(8, 3, "cuda")
    layer(torch.randn(2, 8, device="cuda"))
    with pytest.raises(RuntimeError, match="same device"):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize("cls", [Q8Linear, lowbit.nn.Q4Linear])
def test_saved_tensors_are_references(device, cls):
    """Backward keeps references only (the caller's x, the layer's parameters and buffers) besides
    one-element steps: no float copy, no codes of x and no codes of the weight (the backward makes both
    again)."""
    M, K, N = 64, 96, 48
    layer = cls(K, N, device=device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    owned = {x.data_ptr()} | {t.data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    assert saved and all(t.data_ptr() in owned for t in saved if t.numel() > 1)  # besides 0-dim steps
    assert not any(t.dtype == torch.int8 for t in saved)
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


_BLOCKS = [None, "128", "37"]  # the default block width, whole GEMM k-tiles, odd blocks (the fallback GEMM)


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (-8, 7)])
@pytest.mark.parametrize("blocks", _BLOCKS)
@pytest.mark.parametrize("int8_grad", [False, True])
def test_backward_from_float_weight_equals_codes(device, monkeypatch, qmin, qmax, blocks, int8_grad):
    """lsq_linear_backward given the float weight (what the layers pass: it makes the weight's codes a
    block of columns at a time) gives what it gives with the weight's codes, for any block width, a last
    block narrower than the others, and both weight dtypes: bitwise where the Hopper kernel runs the
    blocks (its sum per output does not depend on the block), else to the float GEMM's accuracy (BLAS and
    cuBLAS may order a narrower product's sums differently): 1e-6 relative in fp32, one 16-bit rounding."""
    if blocks is not None:
        monkeypatch.setenv("LOWBIT_QAT_WEIGHT_COLUMNS", blocks)
    M, K, N = 45, 300, 23
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for wdt in (torch.float32, dt):
        x = (torch.randn(M, K, device=device) * 2).to(dt)
        bias_a = torch.randn(K, device=device) * 0.1
        scale_a, eps = (torch.tensor(v, device=device) for v in (0.07, 1e-5))
        W = (torch.randn(N, K, device=device) * 0.05).to(wdt)
        scale_w = torch.tensor(0.004, device=device).to(wdt)
        qw = torch.ops.lowbit.quantize_s8(W, None, scale_w, eps, qmin, qmax, False)
        G = torch.randn(M, N, device=device).to(dt)
        mask = [True, True, True, True]
        a = torch.ops.lowbit.lsq_linear_backward(G, x, bias_a, None, qw, scale_a, scale_w, eps, qmin, qmax, mask,
                                                 int8_grad)
        b = torch.ops.lowbit.lsq_linear_backward(G, x, bias_a, None, W, scale_a, scale_w, eps, qmin, qmax, mask,
                                                 int8_grad)
        hopper = device == "cuda" and torch.cuda.get_device_capability() == (9, 0) and blocks != "37"
        for u, v in zip(a, b):
            assert u.dtype == v.dtype
            if hopper or int8_grad:
                assert torch.equal(u, v)
            else:
                assert ref.rel_err(v, u.double().cpu()) < (1e-6 if dt == torch.float32 else 1e-2)


def test_backward_weight_argument_errors(device):
    x = torch.randn(4, 8, device=device)
    args = (torch.zeros(8, device=device), None)
    rest = (torch.tensor(0.1, device=device), torch.tensor(0.1, device=device), torch.tensor(1e-5, device=device),
            -128, 127, [True, True, True, True])
    G = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match="int8 weight codes .* or the float weight"):
        torch.ops.lowbit.lsq_linear_backward(G, x, *args, torch.zeros(3, 8, dtype=torch.int32, device=device), *rest)
    with pytest.raises(RuntimeError, match="int8 weight codes .* or the float weight"):
        torch.ops.lowbit.lsq_linear_backward(G, x, *args, torch.zeros(24, device=device), *rest)
    with pytest.raises(RuntimeError, match="K=9"):
        torch.ops.lowbit.lsq_linear_backward(G, x, *args, torch.zeros(3, 9, device=device), *rest)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="same device"):
            torch.ops.lowbit.lsq_linear_backward(G, x, *args, torch.zeros(3, 8), *rest)


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (-8, 7)])
def test_backward_recomputed_codes_equal_saved(device, qmin, qmax):
    """lsq_linear_backward with qx=None (codes of x made again, what the layers do) gives bitwise what it
    gives with the forward's codes; retain_graph backwards repeat the same gradients."""
    M, K, N = 37, 80, 19
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    x = (torch.randn(M, K, device=device) * 2).to(dt)
    bias_a = torch.randn(K, device=device) * 0.1
    scale_a, scale_w, eps = (torch.tensor(v, device=device) for v in (0.07, 0.01, 1e-5))
    qw = torch.randint(qmin, qmax + 1, (N, K), dtype=torch.int8, device=device)
    G = torch.randn(M, N, device=device).to(dt)
    qx = torch.ops.lowbit.qat_quantize(x, bias_a, scale_a, scale_w, eps, qmin, qmax)[0]
    mask = [True, True, True, True]
    a = torch.ops.lowbit.lsq_linear_backward(G, x, bias_a, qx, qw, scale_a, scale_w, eps, qmin, qmax, mask)
    b = torch.ops.lowbit.lsq_linear_backward(G, x, bias_a, None, qw, scale_a, scale_w, eps, qmin, qmax, mask)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v)

    layer = _layer(K, N, device)
    xl = x.float().clone().requires_grad_()
    y = layer(xl)
    grads = []
    for _ in range(2):
        y.backward(G.float(), retain_graph=True)
        grads.append([t.grad.clone() for t in (xl, layer.weight, layer.bias_a, layer.scale_a)])
        for t in (xl, layer.weight, layer.bias_a, layer.scale_a):
            t.grad = None
    for u, v in zip(*grads):
        assert torch.equal(u, v)


def test_prepare_layers_includes_root(monkeypatch):
    calls = []
    monkeypatch.setattr(Q8Linear, "prepare_params", lambda self: calls.append(self))
    root = Q8Linear(4, 4)
    lowbit.prepare_layers(root)
    assert calls == [root]
    calls.clear()
    model = torch.nn.Sequential(Q8Linear(4, 4), torch.nn.ReLU(), torch.nn.Sequential(Q8Linear(4, 2)))
    assert lowbit.prepare_layers(model) is model
    assert len(calls) == 2


def test_trains(device):
    """A few SGD steps on a linear regression reduce the loss (the whole path learns)."""
    torch.manual_seed(0)
    teacher = torch.randn(8, 32, device=device)
    layer = _layer(32, 8, device)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        x = torch.randn(64, 32, device=device)
        loss = (layer(x) - x @ teacher.t()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and math.isfinite(losses[-1])


@pytest.mark.parametrize("cls", ["Q8Linear", "Q4Linear"])
def test_torch_compile_fullgraph(device, cls):
    """Training (forward + backward) and eval (frozen qweight) capture as one graph each."""
    layer = getattr(lowbit.nn, cls)(48, 20, device=device)
    x = torch.randn(6, 48, device=device)
    layer(x)  # eager first call: initialises scale_a
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    ref = layer(x)
    y = compiled(x)
    y.sum().backward()
    assert torch.equal(y, ref) and layer.weight.grad is not None
    layer.eval()
    ref = layer(x)  # eager: makes qweight
    assert torch.equal(compiled(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", ["Q8Linear", "Q4Linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture(cls, dtype):
    """No host read in forward or backward: a training step (forward + backward) and an eval forward
    capture into CUDA graphs, and replays match eager runs on new inputs bitwise."""
    layer = getattr(lowbit.nn, cls)(72, 40, device="cuda")
    x_static = torch.randn(33, 72, device="cuda", dtype=dtype, requires_grad=True)
    g_static = torch.randn(33, 40, device="cuda", dtype=dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: scale_a init, workspaces
        for _ in range(2):
            layer.zero_grad(set_to_none=True)
            layer(x_static).backward(g_static)
    torch.cuda.current_stream().wait_stream(stream)
    layer.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = layer(x_static)
        y_static.backward(g_static)
    x_new, g_new = torch.randn_like(x_static), torch.randn_like(g_static)
    with torch.no_grad():
        x_static.copy_(x_new)
    g_static.copy_(g_new)
    for p in layer.parameters():
        p.grad.zero_()
    x_static.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    got = (y_static.clone(), x_static.grad.clone(), layer.weight.grad.clone(), layer.scale_a.grad.clone())
    eager_x = x_new.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(eager_x)
    y.backward(g_new)
    want = (y, eager_x.grad, layer.weight.grad, layer.scale_a.grad)
    assert torch.equal(got[0], want[0])  # our kernels: bitwise
    # The backward GEMMs are cuBLAS's, whose algorithm may differ between the capture stream and eager:
    # equal up to accumulation order (one 16-bit rounding step at most).
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, **tol)

    layer.eval()
    xe = torch.randn(9, 72, device="cuda", dtype=dtype)
    with torch.no_grad():
        layer(xe)  # eager: makes qweight
        eval_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(eval_graph):
            ye = layer(xe)
        xe2 = torch.randn_like(xe)
        xe.copy_(xe2)
        eval_graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(ye, layer(xe2))


def _fresh_qat_layers(device):
    """A fresh layer of each QAT class (scale_a / clips still 0, the Q4 weight steps derived) and an
    input for it."""
    layers = [
        (lowbit.nn.Q8Linear(37, 23, device=device), (torch.randn(2, 3, 37, device=device) * 1.5,)),
        (lowbit.nn.Q4Linear(37, 23, device=device), (torch.randn(5, 37, device=device) * 0.7,)),
        (lowbit.nn.Q4Conv2d(4, 6, 3, padding=1, device=device), (torch.randn(2, 4, 7, 9, device=device),)),
        (lowbit.nn.Q4MatMul(device=device), (torch.randn(2, 5, 7, device=device) * 3, torch.randn(6, 7, device=device))),
    ]
    for layer, _ in layers:
        if hasattr(layer, "prepare_params"):
            layer.prepare_params()
    return layers


def _steps(layer):
    return [layer.x_clip, layer.y_clip] if isinstance(layer, lowbit.nn.Q4MatMul) else [layer.scale_a]


@pytest.mark.parametrize("training", [True, False])
def test_first_forward_initialises_steps_in_any_mode(device, training):
    """BIE sets scale_a (Q4MatMul: each clip from its own operand) on the first forward where it is 0,
    whatever the mode: 2*mean|t|/sqrt(127) from the unshifted input. An eval-first layer used to keep a
    step of eps and return near-zero outputs."""
    for layer, inputs in _fresh_qat_layers(device):
        layer.train(training)
        with torch.no_grad():
            y = layer(*inputs)
        operands = inputs if isinstance(layer, lowbit.nn.Q4MatMul) else inputs[:1]
        for step, t in zip(_steps(layer), operands):
            assert step.item() == ref.lsq_scale(t.detach().cpu(), 127.0), type(layer).__name__
        assert y.abs().mean().item() > 1e-2, type(layer).__name__  # not the eps-step output
        # A step that is already set (loaded, or learned) is left alone by later first forwards.
        twin = type(layer)(**{k: (getattr(torch, v.split(".")[-1]) if k == "dtype" else v)
                              for k, v in layer.constructor_args().items()}).to(device)
        twin.load_state_dict(layer.state_dict())
        for s in _steps(twin):
            s.data.fill_(0.25)
        twin.train(training)
        with torch.no_grad():
            twin(*inputs)
        assert all(s.item() == 0.25 for s in _steps(twin))


def test_torch_compile_fullgraph_fresh_layer(device):
    """The lazy step initialisation is a device-side select, not a host read: a fresh layer (and one just
    loaded from a state dict with zero steps) compiles with fullgraph=True without an eager warm-up, and
    matches an eager twin bitwise, forward and gradients. (Each fresh layer instance, and each state of
    its "initialised" flag, is a compilation of the shared forward: the test's dozen exceed dynamo's
    default limit of 8 per code object, which a model's single compiled forward never meets.)"""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        _compile_fresh_layers(device)


def _compile_fresh_layers(device):
    for layer, inputs in _fresh_qat_layers(device):
        twin = type(layer)(**{k: (getattr(torch, v.split(".")[-1]) if k == "dtype" else v)
                              for k, v in layer.constructor_args().items()}).to(device)
        twin.load_state_dict(layer.state_dict())
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        y = compiled(*inputs)
        y_ref = twin(*inputs)
        assert torch.equal(y, y_ref), type(layer).__name__
        y.square().sum().backward()
        y_ref.square().sum().backward()
        for p, q in zip(_steps(layer), _steps(twin)):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
        # A reload with zero steps re-arms the initialisation; still no graph break.
        state = {k: (torch.zeros_like(v) if k in ("scale_a", "x_clip", "y_clip") else v)
                 for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        y2 = compiled(*inputs)
        assert all(s.item() != 0 for s in _steps(layer))
        assert torch.isfinite(y2).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("training", [True, False])
def test_cuda_graph_capture_of_the_first_forward(training):
    """A fresh layer's first forward (the one that initialises scale_a) captures into a CUDA graph: the
    initialisation is a device-side select, so the capture sees no host read. Replays match eager."""
    for layer, inputs in _fresh_qat_layers("cuda"):
        twin = type(layer)(**{k: (getattr(torch, v.split(".")[-1]) if k == "dtype" else v)
                              for k, v in layer.constructor_args().items()}).cuda()
        twin.load_state_dict(layer.state_dict())
        layer.train(training)
        twin.train(training)
        if not training and hasattr(layer, "generate_quantized_weight"):
            layer.generate_quantized_weight()  # the eval qweight exists before capture (an allocation)
        warm = type(layer)(**{k: (getattr(torch, v.split(".")[-1]) if k == "dtype" else v)
                              for k, v in layer.constructor_args().items()}).cuda().train(training)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # kernels and workspaces, on another layer
            warm(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            y = layer(*inputs)
        graph.replay()
        with torch.no_grad():
            y_ref = twin(*inputs)
        torch.cuda.synchronize()
        assert torch.equal(y, y_ref), type(layer).__name__
        for p, q in zip(_steps(layer), _steps(twin)):
            assert torch.equal(p, q) and p.item() != 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_sync_in_first_forwards():
    """torch.cuda.set_sync_debug_mode("error") turns every host read of device data into an error: a fresh
    layer's first training forward (the scale_a initialisation) and backward, and the first eval forward
    after training (qweight regenerated from the trained weight), read nothing back."""
    for layer, inputs in _fresh_qat_layers("cuda"):
        inputs = [t.requires_grad_() for t in inputs]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer.train()
            layer(*inputs).sum().backward()
            layer.eval()
            with torch.no_grad():
                layer(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("cls", ["Q8Linear", "Q4Linear"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_layer_weight_gradient(device, cls, dtype):
    """A layer cast to a 16-bit dtype (weight included) gets its weight gradient in that dtype, written by
    the 16-bit GEMM on CUDA (fp32 accumulation, one rounding, as nn.Linear's; no fp32 temporary of the
    weight's size), against the float64 straight-through gradient (Gᵀ · X̂, X̂ = s_a · Qx)."""
    K, N = 67, 29
    layer = getattr(lowbit.nn, cls)(K, N, device=device).to(dtype)
    assert layer.weight.dtype == dtype
    x = (torch.randn(3, 11, K) * 1.3).to(dtype).to(device).requires_grad_()
    y = layer(x)
    G = torch.randn(y.shape).to(dtype)
    (y * G.to(device)).sum().backward()
    qmax = 127 if cls == "Q8Linear" else 7
    s_a = max(ref.f32(layer.scale_a.float().item()), ref.f32(layer.eps.float().item()))
    t = x.detach().cpu().float() + layer.bias_a.detach().cpu().float()
    qx = ref.codes(t, s_a, -qmax - 1, qmax)
    gw_ref = G.double().reshape(-1, N).t() @ (qx.reshape(-1, K) * s_a)
    assert layer.weight.grad.dtype == dtype and layer.weight.grad.shape == (N, K)
    assert ref.rel_err(layer.weight.grad, gw_ref) < TOL[dtype]


@pytest.mark.parametrize("cls", [Q8Linear, lowbit.nn.Q4Linear])
def test_eval_in_inference_mode_then_with_autograd(device, cls):
    """The qweight an eval forward caches inside torch.inference_mode() is a normal tensor: a later eval
    forward that records autograd (an input gradient) can save it, and gives the same output."""
    layer = cls(16, 8, device=device)
    x = torch.randn(3, 16, device=device)
    layer(x)
    layer.eval()
    with torch.inference_mode():
        y0 = layer(x)
    assert not layer.qweight.is_inference()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.sum().backward()
    assert torch.equal(y.detach(), y0) and xg.grad is not None and xg.grad.shape == x.shape

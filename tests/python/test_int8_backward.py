"""The opt-in int8 backward of Q8Linear / Q4Linear (SwitchBack, Wortsman et al. 2023) and its two ops:
quantize_rows_s8 (the output gradient quantized per row) and linear_s8's row_scale epilogue, against
float64 references written from the definitions (reference.py), on odd shapes, CPU and CUDA.

Tolerances: codes and scales of quantize_rows_s8 are exact (bitwise); linear_s8 with row_scale is within
the fp32 roundings of float(acc) and the two products (relative 4e-7), or one bf16/fp16 rounding; the
int8-backward gradients equal the float64 LSQ/STE gradients of the dequantized gradient
row_scale * qG (fp32 GEMM: relative 1e-5), and stay within a few percent of the float backward's (the
per-row int8 quantization error of G, |G - s*qG| <= s/2)."""
import pytest
import torch

from lowbit import ops
from lowbit.nn import Q4Linear, Q8Linear
import reference as ref


def _with_specials(x):
    x = x.clone()
    x[0].zero_()                              # all-zero row
    if x.shape[0] > 2:
        x[2, x.shape[1] // 2] = float("inf")  # non-finite rows
    if x.shape[0] > 3:
        x[3, 0] = float("nan")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 129), (1, 1), (9, 4100)])
def test_quantize_rows_matches_reference(device, dtype, shape):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])
    if len(shape) == 2 and shape[0] > 3:
        x = _with_specials(x)
    x = x.to(dtype)
    q, s = ops.quantize_rows_s8(x.to(device))
    q_ref, s_ref = ref.rows_s8(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(s.cpu().isnan(), s_ref.isnan())
    assert torch.equal(torch.nan_to_num(s.cpu()), torch.nan_to_num(s_ref))
    assert int(q.abs().max()) <= 127


def test_quantize_rows_qmax_and_empty(device):
    x = torch.randn(4, 10, device=device)
    q, s = ops.quantize_rows_s8(x, 7)
    q_ref, s_ref = ref.rows_s8(x, 7)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)
    q, s = ops.quantize_rows_s8(torch.empty(3, 0, device=device))
    assert q.shape == (3, 0) and s.shape == (3,) and (s == 0).all()


def test_quantize_rows_bad_input(device):
    with pytest.raises(RuntimeError, match="qmax"):
        ops.quantize_rows_s8(torch.randn(2, 3, device=device), 0)
    with pytest.raises(RuntimeError, match="qmax"):
        ops.quantize_rows_s8(torch.randn(2, 3, device=device), 128)
    with pytest.raises(RuntimeError, match="x"):
        ops.quantize_rows_s8(torch.ones(2, 3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(7, 33, 65), (130, 17, 300), (1, 1, 1)])
def test_linear_s8_row_scale(device, out_dtype, M, N, K):
    qx = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    qw = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    rs = torch.rand(M) * 1e-3
    rs[0] = 0.0
    alpha = torch.tensor(0.37)
    out = ops.linear_s8(qx.to(device), qw.to(device), alpha.to(device), out_dtype, rs.to(device))
    acc = qx.double() @ qw.double().t()
    per_row = (alpha * rs).double()          # one fp32 multiply per row
    want = acc * per_row[:, None]
    tol = 4e-7 if out_dtype == torch.float32 else (8e-3 if out_dtype == torch.bfloat16 else 1e-3)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert ((out.double().cpu() - want).abs() <= tol * want.abs()).all()
    # row_scale=None is the plain GEMM
    plain = ops.linear_s8(qx.to(device), qw.to(device), alpha.to(device), out_dtype)
    assert torch.equal(plain, ops.linear_s8(qx.to(device), qw.to(device), alpha.to(device), out_dtype, None))


def test_linear_s8_row_scale_bad_input(device):
    qx = torch.zeros(4, 8, dtype=torch.int8, device=device)
    qw = torch.zeros(3, 8, dtype=torch.int8, device=device)
    a = torch.tensor(1.0, device=device)
    with pytest.raises(RuntimeError, match="row_scale"):
        ops.linear_s8(qx, qw, a, torch.float32, torch.ones(5, device=device))
    with pytest.raises(RuntimeError, match="row_scale"):
        ops.linear_s8(qx, qw, a, torch.float32, torch.ones(4, dtype=torch.float64, device=device))


def _expected_int8_grads(layer, x, G, qmin, qmax):
    """float64 LSQ/STE gradients with the output gradient replaced by its per-row int8 dequantization
    (the input-side grads) and the exact G (the weight grad, which stays float)."""
    s_a = max(ref.f32(layer.scale_a.item()), ref.f32(layer.eps.item()))
    s_w = ref.lsq_scale(layer.weight.detach().cpu(), 127.0, layer.eps.item()) if qmax == 127 else \
        max(ref.f32(layer.scale_w.item()), ref.f32(layer.eps.item()))
    w_codes = ref.codes(layer.weight.detach().cpu(), s_w, qmin, qmax)
    _, qx = ref.q_linear_forward(x.detach().cpu(), layer.bias_a.detach().cpu(), w_codes, s_a, s_w, qmin, qmax)
    qG, rs = ref.rows_s8(G)
    G_hat = qG.double() * rs.double()[..., None]
    gx, gb, _, gs = ref.q_linear_backward(G_hat, x.detach().cpu(), layer.bias_a.detach().cpu(), w_codes, qx, s_a,
                                          s_w, qmin, qmax)
    _, _, gw, _ = ref.q_linear_backward(G.double(), x.detach().cpu(), layer.bias_a.detach().cpu(), w_codes, qx, s_a,
                                        s_w, qmin, qmax)
    return gx, gb, gw, gs


@pytest.mark.parametrize("cls,qmin,qmax", [(Q8Linear, -128, 127), (Q4Linear, -8, 7)])
@pytest.mark.parametrize("shape,N", [((7, 33), 5), ((2, 3, 65), 17), ((129, 100), 31)])
def test_int8_backward_gradients(device, cls, qmin, qmax, shape, N):
    K = shape[-1]
    layer = cls(K, N, int8_backward=True).to(device)
    with torch.no_grad():
        layer.bias_a.copy_(torch.randn(K) * 0.1)
    if cls is Q4Linear:
        layer.prepare_params()
    x = (torch.randn(shape) * 2).to(device).requires_grad_()
    y = layer(x)
    G = torch.randn(y.shape)
    (y * G.to(device)).sum().backward()
    gx, gb, gw, gs = _expected_int8_grads(layer, x, G, qmin, qmax)
    assert ref.rel_err(x.grad, gx) < 1e-5
    assert ref.rel_err(layer.bias_a.grad, gb) < 1e-5
    assert ref.rel_err(layer.weight.grad, gw) < 1e-5
    assert ref.rel_err(layer.scale_a.grad, gs) < 1e-4
    # Close to the float backward: the int8 quantization error of G only.
    gw_int8 = layer.weight.grad.clone()
    x2 = x.detach().clone().requires_grad_()
    layer.int8_backward = False
    for p in layer.parameters():
        p.grad = None
    (layer(x2) * G.to(device)).sum().backward()
    assert ref.rel_err(x.grad, x2.grad.double()) < 0.03
    assert torch.equal(layer.weight.grad, gw_int8)  # the weight gradient is the float GEMM either way


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_backward_16bit(device, dtype):
    layer = Q8Linear(64, 48, int8_backward=True).to(device)
    x = (torch.randn(3, 11, 64)).to(dtype).to(device).requires_grad_()
    y = layer(x)
    G = torch.randn(y.shape).to(dtype)
    (y * G.to(device)).sum().backward()
    gx, gb, gw, gs = _expected_int8_grads(layer, x, G.float(), -128, 127)
    assert x.grad.dtype == dtype and ref.rel_err(x.grad, gx) < 1e-2
    assert ref.rel_err(layer.scale_a.grad, gs) < 1e-2


def test_int8_backward_flag(device):
    with pytest.raises(ValueError, match="int8_backward"):
        Q8Linear(4, 4, int8_backward=1)
    layer = Q8Linear(8, 4, int8_backward=True)
    assert layer.constructor_args()["int8_backward"] is True
    assert "int8_backward" not in Q8Linear(8, 4).constructor_args()


def test_int8_backward_nan_gradient_propagates(device):
    """A non-finite output gradient row poisons that row's input gradient (not silently clipped)."""
    layer = Q8Linear(16, 8, int8_backward=True).to(device)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    y = layer(x)
    G = torch.randn(4, 8, device=device)
    G[1, 3] = float("inf")
    (y * G).sum().backward()
    assert torch.isnan(x.grad[1]).any() and torch.isfinite(x.grad[[0, 2, 3]]).all()

"""torch.ops.lowbit quantize_s8 / lsq_scale / linear_s8 / linear_s8s4 against the float64 reference (reference.py).

Tolerances (‖out−ref‖/‖ref‖): codes and int32 products exact; fp32 outputs 1e-6 (one fp32 rounding
of the exact product); fp16/bf16 outputs 1e-2 (DESIGN.md); the CPU and CUDA results bitwise equal."""
import math

import pytest
import torch

from lowbit import ops
import reference as ref

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 2, 33), (129, 255)])
def test_quantize_matches_reference(device, dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype).to(device)
    shift = torch.randn(shape[-1], device=device)
    s, eps = torch.tensor(0.037, device=device), torch.tensor(1e-5, device=device)
    q = ops.quantize_s8(x, shift, s, eps, -128, 127)
    assert q.dtype == torch.int8 and q.shape == x.shape
    expect = ref.codes(x.float().cpu() + shift.cpu(), 0.037, -128, 127)
    assert torch.equal(q.cpu().double(), expect)
    q4 = ops.quantize_s8(x, None, s, eps, -8, 7)
    assert torch.equal(q4.cpu().double(), ref.codes(x.float().cpu(), 0.037, -8, 7))


def test_quantize_ties_nan_inf_and_eps(device):
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 3.5, -0.5, float("nan"), float("inf"), -float("inf"), 1e9],
                     device=device)
    q = ops.quantize_s8(x, None, torch.tensor(1.0, device=device), torch.tensor(1e-5, device=device), -128, 127)
    assert q.cpu().tolist() == [0, 2, 2, -2, 4, 0, 0, 127, -128, 127]
    # a zero scale falls back to eps: 1e-5 * 100 = 1e-3 -> code 100
    q = ops.quantize_s8(torch.tensor([1e-3], device=device), None, torch.tensor(0.0, device=device),
                        torch.tensor(1e-5, device=device), -128, 127)
    assert q.item() == 100


def test_quantize_non_contiguous(device):
    x = torch.randn(40, 30, device=device).t()  # (30, 40), transposed view
    s, eps = torch.tensor(0.02, device=device), torch.tensor(1e-5, device=device)
    q = ops.quantize_s8(x, None, s, eps, -128, 127)
    assert torch.equal(q.cpu().double(), ref.codes(x.cpu(), 0.02, -128, 127))


def test_quantize_bad_input(device):
    s, eps = torch.tensor(0.1, device=device), torch.tensor(1e-5, device=device)
    with pytest.raises(RuntimeError, match="x must be a float32, float16 or bfloat16"):
        ops.quantize_s8(torch.ones(3, 4, dtype=torch.int32, device=device), None, s, eps, -128, 127)
    with pytest.raises(RuntimeError, match="shift must have shape"):
        ops.quantize_s8(torch.ones(3, 4, device=device), torch.ones(5, device=device), s, eps, -128, 127)
    with pytest.raises(RuntimeError, match="qmin"):
        ops.quantize_s8(torch.ones(3, 4, device=device), None, s, eps, -300, 127)
    with pytest.raises(RuntimeError, match="finite"):
        ops.quantize_s8(torch.ones(3, 4, device=device), None, torch.tensor(float("nan"), device=device), eps,
                        -128, 127)
    with pytest.raises(RuntimeError, match="exactly one element"):
        ops.quantize_s8(torch.ones(3, 4, device=device), None, torch.ones(2, device=device), eps, -128, 127)
    # check_step=False (the QAT layers): no host read, and no error.
    ops.quantize_s8(torch.ones(3, 4, device=device), None, torch.tensor(float("nan"), device=device), eps, -128, 127,
                    check_step=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_qat_alpha(device, dtype):
    def t(v):
        return torch.tensor(v, dtype=dtype, device=device)

    def expected(a, b, e):
        steps = [max(ref.f32(a), ref.f32(e)), max(ref.f32(b), ref.f32(e))]
        if any(math.isnan(v) for v in (a, b, e)) or not all(0 < s < math.inf for s in steps):
            return math.nan
        return ref.f32(steps[0] * steps[1])

    cases = [(0.02, 0.003, 1e-5), (0.0, 0.5, 1e-3), (1e-7, 1e-7, 1e-5), (0.1, float("nan"), 1e-5),
             (float("inf"), 0.1, 1e-5), (-1.0, 0.1, -2.0), (0.0, 0.0, 0.0), (3e38, 3e38, 1e-5), (0.1, 0.2, float("nan"))]
    for a, b, e in cases:
        if dtype != torch.float64 and dtype != torch.float32 and abs(a) > 6e4:
            continue
        a_, b_, e_ = (float(t(v).float()) for v in (a, b, e))  # the values as the op sees them in fp32
        got = ops.qat_alpha(t(a), t(b), t(e))
        assert got.dtype == torch.float32 and got.dim() == 0 and got.device.type == torch.device(device).type
        want = expected(a_, b_, e_)
        if math.isnan(want):
            assert math.isnan(got.item()), (a, b, e, got)
        else:
            assert got.item() == want, (a, b, e, got.item(), want)
    with pytest.raises(RuntimeError, match="exactly one element"):
        ops.qat_alpha(torch.ones(2, device=device), t(0.1), t(1e-5))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32, torch.float16), (torch.float16,) * 3,
                                    (torch.float32, torch.bfloat16, torch.float64)])
@pytest.mark.parametrize("n", [0, 1, 37, 1000])
def test_qat_prepare(device, dtypes, n):
    # [shift | scale1, scale2, eps, alpha, step1, step2] in fp32: each operand as .float() gives it, alpha as
    # qat_alpha, the steps max(scale, eps) (NaN where either is NaN, as torch.maximum).
    sd, s1d, ed = dtypes
    g = torch.Generator().manual_seed(n)
    shift = (torch.randn(n, generator=g) * 3).to(sd).to(device) if n else None
    for a, b, e in [(0.02, 0.003, 1e-5), (0.0, 0.5, 1e-3), (0.1, float("nan"), 1e-5), (-1.0, 0.1, -2.0)]:
        t1, t2, te = (torch.tensor(v, dtype=d, device=device) for v, d in ((a, s1d), (b, torch.float32), (e, ed)))
        got = ops.qat_prepare(shift, t1, t2, te)
        assert got.dtype == torch.float32 and got.shape == (n + 6,) and got.device.type == torch.device(device).type
        want = torch.cat([shift.float() if n else torch.empty(0, device=device),
                          torch.stack([t1.float(), t2.float(), te.float()]).reshape(3),
                          ops.qat_alpha(t1, t2, te).reshape(1),
                          torch.stack([torch.maximum(t1.float(), te.float()), torch.maximum(t2.float(), te.float())])])
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0, equal_nan=True)  # exact, NaN where NaN
    with pytest.raises(RuntimeError, match="exactly one element"):
        ops.qat_prepare(shift, torch.ones(2, device=device), t2, te)
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.qat_prepare(torch.ones(3, dtype=torch.int32, device=device), t1, t2, te)


@pytest.mark.parametrize("xd", FLOATS)
@pytest.mark.parametrize("sd", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 40), (67, 264)])
def test_qat_quantize(device, xd, sd, shape):
    # (codes, prepared) = the float64 definition of the codes with step max(scale1, eps), and qat_prepare's
    # vector; the same bits as quantize_s8 + qat_prepare (one launch on CUDA).
    K = shape[-1]
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(shape, generator=g) * 3).to(xd).to(device)
    # A shift that starts one element into its storage takes the unaligned (scalar) CUDA path.
    big = (torch.randn(K + 1, generator=g)).to(sd) if sd else None
    for shift in ([big[:K], big[1:]] if sd else [None]):
        shift = shift.to(device) if shift is not None else None
        s1 = torch.tensor(0.037, dtype=torch.bfloat16, device=device)
        s2, eps = torch.tensor(0.002, device=device), torch.tensor(1e-5, dtype=torch.float16, device=device)
        for qmin, qmax in [(-128, 127), (-8, 7)]:
            q, prepared = ops.qat_quantize(x, shift, s1, s2, eps, qmin, qmax)
            assert q.dtype == torch.int8 and q.shape == x.shape and prepared.dtype == torch.float32
            t = x.double().cpu() + (shift.double().cpu() if shift is not None else 0)
            step = max(float(s1.float()), float(eps.float()))
            expect = ref.codes(t.float(), step, qmin, qmax)  # fp32 sum, as the contract
            assert torch.equal(q.cpu().double(), expect)
            assert torch.equal(q.cpu(), ops.quantize_s8(x, shift, s1, eps, qmin, qmax, check_step=False).cpu())
            torch.testing.assert_close(prepared.cpu(), ops.qat_prepare(shift, s1, s2, eps).cpu(), rtol=0, atol=0)
    s = torch.tensor(0.1, device=device)
    with pytest.raises(RuntimeError, match="shift must have shape"):
        ops.qat_quantize(x, torch.ones(K + 2, device=device), s, s, s, -128, 127)
    with pytest.raises(RuntimeError, match="exactly one element"):
        ops.qat_quantize(x, None, s, torch.ones(2, device=device), s, -128, 127)
    with pytest.raises(RuntimeError, match="qmin"):
        ops.qat_quantize(x, None, s, s, s, 5, 2)


def test_lsq_scale(device):
    x = torch.randn(37, 19, device=device)
    s = ops.lsq_scale(x, 127.0)
    assert s.dtype == torch.float32 and s.dim() == 0
    assert s.item() == ref.lsq_scale(x.cpu(), 127.0)
    eps = torch.tensor(5.0, device=device)
    assert ops.lsq_scale(x, 127.0, eps).item() == 5.0
    with pytest.raises(RuntimeError, match="empty"):
        ops.lsq_scale(torch.empty(0, 3, device=device), 127.0)


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("mnk", [(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 31, 257), (130, 70, 1000), (257, 129, 4100), (200, 40, 4112)])
def test_linear_s8_matches_reference(device, out_dtype, mnk):
    M, N, K = mnk
    qx = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    qw = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    alpha = torch.tensor(3.1e-4)
    y = ops.linear_s8(qx.to(device), qw.to(device), alpha.to(device), out_dtype)
    assert y.dtype == out_dtype and y.shape == (M, N)
    acc = qx.double() @ qw.double().t()
    expect = (acc.float() * alpha).to(out_dtype)  # the documented epilogue: fp32(acc) * alpha, then cast
    assert torch.equal(y.cpu(), expect)
    tol = 1e-6 if out_dtype == torch.float32 else 1e-2
    assert ref.rel_err(y, acc * alpha.item()) < tol


def test_linear_s8_leading_dims_and_bad_input(device):
    qx = torch.randint(-128, 128, (2, 3, 9), dtype=torch.int8, device=device)
    qw = torch.randint(-128, 128, (4, 9), dtype=torch.int8, device=device)
    a = torch.tensor(1.0, device=device)
    assert ops.linear_s8(qx, qw, a, torch.float32).shape == (2, 3, 4)
    with pytest.raises(RuntimeError, match="expects K=9"):
        ops.linear_s8(qx[..., :8], qw, a, torch.float32)
    with pytest.raises(RuntimeError, match="qw must be an int8"):
        ops.linear_s8(qx, qw.float(), a, torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype"):
        ops.linear_s8(qx, qw, a, torch.int32)


# linear_s8s4: K multiples of 32 give 16-byte packed rows (the Hopper kernel that unpacks in registers);
# the others take the unpack + int8 GEMM path. Both must give linear_s8's bits on the unpacked codes.
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("mnk", [(1, 1, 1), (3, 5, 2), (17, 33, 65), (5, 9, 32), (257, 129, 1056), (300, 257, 2080),
                                 (513, 130, 4096), (130, 70, 1001)])
def test_linear_s8s4_matches_reference(device, out_dtype, mnk):
    M, N, K = mnk
    qx = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    codes = torch.randint(-8, 8, (N, K), dtype=torch.int8)
    qw4 = ref.pack_s4(codes)
    if K % 2:  # the padding nibble of each row's last byte holds junk: it must be ignored
        qw4[:, -1] |= torch.randint(0, 16, (N,), dtype=torch.int8)
    alpha = torch.tensor(-2.7e-3)
    y = ops.linear_s8s4(qx.to(device), qw4.to(device), alpha.to(device), out_dtype)
    assert y.dtype == out_dtype and y.shape == (M, N)
    acc = qx.double() @ codes.double().t()
    assert torch.equal(y.cpu(), (acc.float() * alpha).to(out_dtype))  # fp32(acc) * alpha, then the cast
    assert torch.equal(y, ops.linear_s8(qx.to(device), codes.to(device), alpha.to(device), out_dtype))
    tol = 1e-6 if out_dtype == torch.float32 else 1e-2
    assert ref.rel_err(y, acc * alpha.item()) < tol


def test_linear_s8s4_leading_dims_and_bad_input(device):
    qx = torch.randint(-128, 128, (2, 3, 64), dtype=torch.int8, device=device)
    qw4 = torch.randint(-128, 128, (4, 32), dtype=torch.int8, device=device)
    a = torch.tensor(0.5, device=device)
    y = ops.linear_s8s4(qx, qw4, a, torch.bfloat16)
    assert y.shape == (2, 3, 4)
    assert torch.equal(y, ops.linear_s8(qx, ops.unpack_s4(qw4, 64), a, torch.bfloat16))
    assert ops.linear_s8s4(qx[:0], qw4, a, torch.float32).shape == (0, 3, 4)
    with pytest.raises(RuntimeError, match="qw4 needs 16 bytes per row"):
        ops.linear_s8s4(qx[..., :32], qw4, a, torch.float32)
    with pytest.raises(RuntimeError, match="qw4 must be an int8"):
        ops.linear_s8s4(qx, qw4.float(), a, torch.float32)
    with pytest.raises(RuntimeError, match="qw4 must be 2-D"):
        ops.linear_s8s4(qx, qw4[None], a, torch.float32)
    with pytest.raises(RuntimeError, match="qx must be an int8"):
        ops.linear_s8s4(qx.float(), qw4, a, torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype"):
        ops.linear_s8s4(qx, qw4, a, torch.int32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_bitwise_equal():
    for dtype in FLOATS:
        x = torch.randn(77, 301).to(dtype)
        s, eps = torch.tensor(0.011), torch.tensor(1e-5)
        qc = ops.quantize_s8(x, None, s, eps, -128, 127)
        qg = ops.quantize_s8(x.cuda(), None, s.cuda(), eps.cuda(), -128, 127)
        assert torch.equal(qc, qg.cpu())
        w = torch.randint(-128, 128, (45, 301), dtype=torch.int8)
        yc = ops.linear_s8(qc, w, s, dtype)
        yg = ops.linear_s8(qg, w.cuda(), s.cuda(), dtype)
        assert torch.equal(yc, yg.cpu())


def test_meta_shapes():
    x = torch.empty(4, 5, 6, device="meta")
    s = torch.empty((), device="meta")
    q = ops.quantize_s8(x, None, s, s, -128, 127)
    assert q.shape == x.shape and q.dtype == torch.int8 and q.device.type == "meta"
    w = torch.empty(7, 6, dtype=torch.int8, device="meta")
    y = ops.linear_s8(q, w, s, torch.bfloat16)
    assert y.shape == (4, 5, 7) and y.dtype == torch.bfloat16

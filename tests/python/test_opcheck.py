"""torch.library.opcheck on every lowbit operator: schema (no aliasing, no mutation), autograd
registration, fake-tensor / Meta kernels and AOT dispatch with dynamic shapes (what torch.compile needs)."""
import pytest
import torch
from torch.library import opcheck

import lowbit  # noqa: F401


def _cases(device):
    e = torch.tensor(1e-5, device=device)
    x = torch.randn(5, 7, device=device)
    q = lambda *s: torch.randint(-128, 128, s, dtype=torch.int8, device=device)  # noqa: E731
    yield "quantize_s8", (x, torch.randn(7, device=device), torch.tensor(0.05, device=device), e, -128, 127)
    yield "lsq_scale", (x, 127.0, e)
    yield "qat_prepare", (torch.randn(7, device=device).bfloat16(), torch.tensor(0.05, device=device).half(),
                          torch.tensor(0.01, device=device), e)
    yield "qat_quantize", (x.bfloat16(), torch.randn(7, device=device).half(), torch.tensor(0.05, device=device),
                           torch.tensor(0.01, device=device).bfloat16(), e, -8, 7)
    yield "linear_s8", (q(5, 7), q(3, 7), torch.tensor(0.01, device=device), torch.float32)
    yield "linear_s8_row_scale", (q(5, 7), q(3, 7), torch.tensor(0.01, device=device), torch.bfloat16,
                                  torch.rand(5, device=device))
    yield "linear_s8s4", (q(5, 7), q(3, 4), torch.tensor(0.01, device=device), torch.float16)
    yield "linear_s8s4_large", (q(2, 3, 64), q(5, 32), torch.tensor(0.01, device=device), torch.bfloat16)
    yield "quantize_rows_s8", (torch.randn(2, 5, 7, device=device), 127)
    yield "q8_linear", (x.clone().requires_grad_(), torch.zeros(7, device=device, requires_grad=True),
                        torch.randn(3, 7, device=device, requires_grad=True),
                        torch.tensor(0.05, device=device, requires_grad=True), torch.tensor(0.01, device=device), e)
    yield "q4_linear", (x.clone().requires_grad_(), torch.zeros(7, device=device, requires_grad=True),
                        torch.randn(3, 7, device=device, requires_grad=True),
                        torch.tensor(0.05, device=device, requires_grad=True), torch.tensor(0.01, device=device), e,
                        torch.randn(3, device=device, requires_grad=True))
    yield "pack_s4", (torch.randint(-8, 8, (4, 7), dtype=torch.int8, device=device),)
    yield "unpack_s4", (q(4, 4), 7)
    img = torch.randn(2, 4, 6, 5, device=device)
    conv_tail = ([2, 1], [1, 1], [1, 2], 2)
    yield "q4_conv2d", (img.clone().requires_grad_(), torch.zeros(4, device=device, requires_grad=True),
                        torch.randn(6, 2, 3, 3, device=device, requires_grad=True),
                        torch.tensor(0.05, device=device, requires_grad=True), torch.tensor(0.01, device=device), e,
                        *conv_tail, torch.randn(6, device=device, requires_grad=True))
    yield "q4_matmul", (torch.randn(2, 5, 7, device=device, requires_grad=True),
                        torch.randn(3, 7, device=device, requires_grad=True),
                        torch.tensor(0.05, device=device, requires_grad=True),
                        torch.tensor(0.04, device=device, requires_grad=True), e)
    # weight-only: 3-bit codes, K = 40 (a partial chunk), act-order g_idx, a permutation, channel_scale
    K, N = 40, 6
    wq = (torch.randint(-2**31, 2**31 - 1, (6, N), dtype=torch.int32, device=device),
          torch.rand(3, N, device=device) * 0.1, torch.randn(3, N, device=device) * 0.1,
          torch.randint(0, 3, (K,), dtype=torch.int32, device=device),
          torch.randperm(K, device=device).to(torch.int32), torch.rand(K, device=device) + 0.5, [3], [K], False)
    yield "wq_linear", (torch.randn(3, K, device=device, requires_grad=True), *wq,
                        torch.randn(N, device=device, requires_grad=True))
    yield "wq_linear_large_m", (torch.randn(20, K, device=device, requires_grad=True), *wq)
    yield "wq_dequantize", (wq[0], wq[1], wq[2], wq[3], wq[4], [3], [K], True, torch.float16)
    yield "lsq_linear_backward", (torch.randn(5, 3, device=device), x, torch.zeros(7, device=device), q(5, 7), q(3, 7),
                                  torch.tensor(0.05, device=device), torch.tensor(0.01, device=device), e, -128, 127,
                                  [True, True, True, True])
    yield "lsq_linear_backward_int8", (torch.randn(5, 3, device=device), x, torch.zeros(7, device=device), q(5, 7),
                                       q(3, 7), torch.tensor(0.05, device=device), torch.tensor(0.01, device=device), e,
                                       -128, 127, [True, True, True, True], True)
    yield "lsq_linear_backward_recompute", (torch.randn(5, 3, device=device), x, torch.zeros(7, device=device), None,
                                            q(3, 7), torch.tensor(0.05, device=device),
                                            torch.tensor(0.01, device=device), e, -8, 7, [True, True, True, True])
    yield "q8_linear_int8_backward", (x.clone().requires_grad_(), torch.zeros(7, device=device, requires_grad=True),
                                      torch.randn(3, 7, device=device, requires_grad=True),
                                      torch.tensor(0.05, device=device, requires_grad=True),
                                      torch.tensor(0.01, device=device), e, None, True)


# Variants of one op with other arguments: the op name is the case name less the suffix.
_VARIANTS = ("_large_m", "_row_scale", "_int8_backward", "_int8", "_large", "_recompute")


@pytest.mark.parametrize("name", ["quantize_s8", "lsq_scale", "qat_prepare", "qat_quantize", "linear_s8", "linear_s8_row_scale", "linear_s8s4",
                                  "linear_s8s4_large", "quantize_rows_s8",
                                  "q8_linear", "q8_linear_int8_backward", "q4_linear", "pack_s4", "unpack_s4",
                                  "q4_conv2d", "q4_matmul", "lsq_linear_backward", "lsq_linear_backward_int8",
                                  "lsq_linear_backward_recompute", "wq_linear", "wq_linear_large_m", "wq_dequantize"])
def test_opcheck(device, name):
    args = dict(_cases(device))[name]
    op = next((name[:-len(v)] for v in _VARIANTS if name.endswith(v)), name)  # the same op, other arguments
    results = opcheck(getattr(torch.ops.lowbit, op).default, args)  # raises on a failed check
    assert results and all(v == "SUCCESS" for v in results.values()), results

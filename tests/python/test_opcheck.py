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
    yield "linear_s8", (q(5, 7), q(3, 7), torch.tensor(0.01, device=device), torch.float32)
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
    yield "lsq_linear_backward", (torch.randn(5, 3, device=device), x, torch.zeros(7, device=device), q(5, 7), q(3, 7),
                                  torch.tensor(0.05, device=device), torch.tensor(0.01, device=device), e, -128, 127,
                                  [True, True, True, True])


@pytest.mark.parametrize("name", ["quantize_s8", "lsq_scale", "linear_s8", "q8_linear", "q4_linear", "pack_s4",
                                  "unpack_s4", "q4_conv2d", "q4_matmul", "lsq_linear_backward"])
def test_opcheck(device, name):
    args = dict(_cases(device))[name]
    results = opcheck(getattr(torch.ops.lowbit, name).default, args)  # raises on a failed check
    assert results and all(v == "SUCCESS" for v in results.values()), results

"""Shared fixtures: the devices to test on (CPU always, CUDA when present) and seeded generators."""
import pytest
import torch

import lowbit  # noqa: F401  (registers torch.ops.lowbit)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)

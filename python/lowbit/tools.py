"""Model-level helpers."""
from __future__ import annotations

import torch


def prepare_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Call ``prepare_params()`` on every lowbit layer of ``model``, the root module included
    (BIE's ``prepare_bie_layers`` skips the root). Returns the model."""
    from .nn.base import LowbitLayer

    for module in model.modules():  # modules() yields the root first
        if isinstance(module, LowbitLayer):
            module.prepare_params()
    return model

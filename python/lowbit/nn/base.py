"""Base class shared by lowbit layers."""
from __future__ import annotations

import torch


class LowbitLayer(torch.nn.Module):
    """Marker base of lowbit layers: each implements ``prepare_params()`` (found by
    :func:`lowbit.prepare_layers`)."""

    def prepare_params(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

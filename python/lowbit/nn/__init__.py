"""lowbit layers. One class per layer whatever the device: the tensors' device picks the kernel."""
from .base import LowbitLayer
from .q8_linear import Q8Linear

__all__ = ["LowbitLayer", "Q8Linear"]

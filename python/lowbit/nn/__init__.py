"""lowbit layers. One class per layer whatever the device: the tensors' device picks the kernel."""
from .base import LowbitLayer
from .q4_conv2d import Q4Conv2d
from .q4_linear import Q4Linear
from .q4_matmul import Q4MatMul
from .q8_linear import Q8Linear
from .wq_linear import MBWQLinear, MPQLinear

__all__ = ["LowbitLayer", "Q8Linear", "Q4Linear", "Q4Conv2d", "Q4MatMul", "MPQLinear", "MBWQLinear"]

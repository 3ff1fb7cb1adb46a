"""lowbit: a low-bit neural-network engine for PyTorch.

Layers live in :mod:`lowbit.nn`, Bitorch Engine (BIE) names in :mod:`lowbit.compat`, model-level tools
at the top level (:func:`prepare_layers`). The math runs in the native library, reached through
``torch.ops.lowbit.*`` (typed wrappers: :mod:`lowbit.ops`). Importing lowbit never initialises CUDA.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before our library)

import os as _os

try:
    # _C is found by Python's import machinery (also in editable installs); liblowbit.so, which
    # registers torch.ops.lowbit, sits beside it.
    from . import _C

    torch.ops.load_library(_os.path.join(_os.path.dirname(_C.__file__), "liblowbit.so"))
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "lowbit: the native library lowbit._C is missing or does not load "
        f"({exc}). Build and install it with `pip install --no-build-isolation .` from the "
        "lowbit source tree (needs torch==2.11.0, CMake >= 3.25 and a C++17 compiler)."
    ) from exc

from . import io, nn, ops  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .convert import convert  # noqa: E402
from .quantize import quantize  # noqa: E402
from .tools import prepare_layers  # noqa: E402

__version__ = "0.1.0"
__all__ = ["io", "nn", "ops", "compat", "convert", "quantize", "save", "load", "prepare_layers", "__version__"]


def __getattr__(name):
    if name == "compat":  # imported lazily: it only adds BIE names
        # import_module, not `from . import compat`: that form looks the attribute up first, which would
        # call this function again, without end.
        import importlib

        return importlib.import_module(f"{__name__}.compat")
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")

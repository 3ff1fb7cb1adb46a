"""Checkpoints in the safetensors format, read and written by lowbit's native library (the Python
``safetensors`` package is not needed). Files interchange with it both ways; lowbit writes the same
bytes as ``safetensors.torch.save_file`` for the same tensors without metadata.

Reading validates the whole header (sizes, offsets, dtypes, duplicate names) and raises RuntimeError
with the file and the broken rule on a malformed file. Format and rules: ``include/lowbit/io/safetensors.h``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Union

import torch
from torch import Tensor

_PathLike = Union[str, "os.PathLike[str]"]


def _path(path: _PathLike) -> str:
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"path must be a str or os.PathLike[str], got {type(p).__name__}")
    return p


def save_file(tensors: Dict[str, Tensor], path: _PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes ``tensors`` (any device; copied to the CPU and made contiguous) and optional string
    ``metadata`` to ``path``. Through a temporary file renamed into place, so an interrupted save never
    leaves a truncated file under ``path``."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of str -> Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{name!r}] must be a Tensor, got {type(t).__name__}")
    meta = {} if metadata is None else metadata
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("metadata must be a dict of str -> str")
    names = list(tensors)
    torch.ops.lowbit.safetensors_save(_path(path), names, [tensors[n] for n in names], json.dumps(meta))


def load_file(path: _PathLike) -> Dict[str, Tensor]:
    """Reads every tensor of ``path`` as a CPU tensor (file order). RuntimeError on a malformed file."""
    names, tensors, _ = torch.ops.lowbit.safetensors_load(_path(path))
    return dict(zip(names, tensors))


def load_metadata(path: _PathLike) -> Dict[str, str]:
    """The ``__metadata__`` entries of ``path`` ({} when there are none); reads only the header, which
    is fully validated."""
    return json.loads(torch.ops.lowbit.safetensors_metadata(_path(path)))


__all__ = ["save_file", "load_file", "load_metadata"]

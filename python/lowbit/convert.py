"""lowbit.convert: make a float model low-bit by swapping its layers, weights and biases copied."""
from __future__ import annotations

import copy
import fnmatch
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

from .nn import Q4Conv2d, Q4Linear, Q8Linear

# What each kind turns each float layer into.
KINDS = {
    "q8": {torch.nn.Linear: Q8Linear},
    "q4": {torch.nn.Linear: Q4Linear, torch.nn.Conv2d: Q4Conv2d},
}

Rule = Tuple[str, Optional[str]]


def _kind_for(name: str, kind: Optional[str], include: Sequence[str], exclude: Sequence[str],
              rules: Sequence[Rule]) -> Optional[str]:
    for pattern, k in rules:  # first matching rule wins
        if fnmatch.fnmatchcase(name, pattern):
            return k
    if any(fnmatch.fnmatchcase(name, p) for p in exclude):
        return None
    if not any(fnmatch.fnmatchcase(name, p) for p in include):
        return None
    return kind


def _swap(module: torch.nn.Module, kind: str, dtype: torch.dtype, name: str) -> Optional[torch.nn.Module]:
    target = KINDS[kind].get(type(module))
    if target is None:
        return None
    w = module.weight
    has_bias = module.bias is not None
    if isinstance(module, torch.nn.Linear):
        new = target(module.in_features, module.out_features, device=w.device, dtype=dtype, bias=has_bias)
    else:
        if module.padding_mode != "zeros":
            raise ValueError(f"lowbit.convert: {name}: padding_mode={module.padding_mode!r} is not supported "
                             "(only 'zeros'); exclude this module")
        if isinstance(module.padding, str):
            raise ValueError(f"lowbit.convert: {name}: padding={module.padding!r} is not supported; give explicit "
                             "padding or exclude this module")
        new = target(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                     module.dilation, module.groups, device=w.device, dtype=dtype, bias=has_bias)
    with torch.no_grad():
        new.weight.copy_(w.detach().to(torch.float32))
        if has_bias:
            new.bias.copy_(module.bias.detach().to(torch.float32))
    new.prepare_params()  # the 4-bit layers derive scale_w from the copied weight
    new.train(module.training)
    return new


def convert(model: torch.nn.Module, kind: Optional[str] = "q8", *, include: Iterable[str] = ("*",),
            exclude: Iterable[str] = (), rules: Sequence[Rule] = (), inplace: bool = False,
            dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Replace ``nn.Linear`` / ``nn.Conv2d`` modules by lowbit quantization-aware layers.

    Args:
        model: the float model (a module that is itself a Linear/Conv2d is converted too).
        kind: ``"q8"`` (Linear -> Q8Linear; convolutions stay float: there is no 8-bit conv yet) or ``"q4"``
            (Linear -> Q4Linear, Conv2d -> Q4Conv2d); None converts only what ``rules`` name.
        include / exclude: ``fnmatch`` patterns on qualified module names (``"encoder.*"``, ``"fc2"``); a
            module is converted if it matches an include pattern and no exclude pattern (keep the head
            float with ``exclude=["head"]``). The root module's name is ``""``.
        rules: ``(pattern, kind)`` pairs tried first, in order; the first match decides (kind None: leave
            float), e.g. ``[("features.0", None), ("classifier.*", "q8")]``.
        inplace: modify ``model`` instead of a deep copy.
        dtype: dtype of the new layers' ``bias_a``, ``scale_a`` and ``eps`` (their weights stay float32).

    Weights and biases are copied; a new layer's ``scale_a`` is 0 and is set from the first training
    batch. Returns the converted model (the same object when ``inplace``)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"lowbit.convert: kind must be one of {sorted(KINDS)} or None, got {kind!r}")
    for _, k in rules:
        if k is not None and k not in KINDS:
            raise ValueError(f"lowbit.convert: rule kind must be one of {sorted(KINDS)} or None, got {k!r}")
    include, exclude = tuple(include), tuple(exclude)
    if not inplace:
        model = copy.deepcopy(model)
    root_kind = _kind_for("", kind, include, exclude, rules)
    if root_kind is not None:
        swapped = _swap(model, root_kind, dtype, "<root>")
        if swapped is not None:
            return swapped
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            k = _kind_for(full, kind, include, exclude, rules)
            if k is None:
                continue
            swapped = _swap(child, k, dtype, full)
            if swapped is not None:
                setattr(module, child_name, swapped)
    return model

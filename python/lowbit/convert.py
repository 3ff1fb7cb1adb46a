"""lowbit.convert: make a float model low-bit by swapping its layers, weights and biases copied."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .nn import Q4Conv2d, Q4Linear, Q8Linear

# What each kind turns each float layer into.
KINDS = {
    "q8": {torch.nn.Linear: Q8Linear},
    "q4": {torch.nn.Linear: Q4Linear, torch.nn.Conv2d: Q4Conv2d},
}

Rule = Tuple[str, Optional[str]]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _patterns(who: str, arg: str, value, default: Tuple[str, ...]) -> Tuple[str, ...]:
    """``include`` / ``exclude`` as a tuple of fnmatch patterns (None: ``default``). A single string is refused
    (a TypeError): ``tuple("head")`` would be the patterns h, e, a, d."""
    if value is None:
        return default
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{who}: {arg} takes a list of fnmatch patterns, not a string: got {value!r} "
                        f"(write [{value!r}])")
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"{who}: {arg} must be a list of fnmatch patterns (str), got {type(value).__name__}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{who}: {arg} must hold str patterns, got {p!r} ({type(p).__name__})")
    return patterns


def _module_sites(model: torch.nn.Module) -> Dict[int, Tuple[torch.nn.Module, List[Tuple[torch.nn.Module, str, str]]]]:
    """Every child module of ``model`` with all the places it occupies: {id: (module, [(parent, attribute,
    qualified name), ...])}. A module used at several names (tied) has several places."""
    sites: Dict[int, Tuple[torch.nn.Module, list]] = {}
    for pname, parent in model.named_modules(remove_duplicate=False):
        for child, m in parent._modules.items():
            if m is not None:
                sites.setdefault(id(m), (m, []))[1].append((parent, child, f"{pname}.{child}" if pname else child))
    return sites


def _warn_untied_parameters(who: str, model: torch.nn.Module, replaced: Dict[int, str]) -> None:
    """Warn for every parameter of a module about to be replaced (``replaced``: {id(module): name}) that
    another module, not replaced, also holds (parameter-level tying, e.g. an LLM's lm_head weight shared
    with its embedding): the new layer keeps its own (quantized) copy, so the two are no longer tied."""
    owners: Dict[int, List[Tuple[int, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((id(mod), f"{mname}.{pname}" if mname else pname))
    modules = {id(m): m for m in model.modules()}
    for mid, name in replaced.items():
        mod = modules.get(mid)
        for pname, p in (mod._parameters.items() if mod is not None else ()):
            others = sorted({full for oid, full in owners.get(id(p), []) if oid not in replaced})
            if p is not None and others:
                warnings.warn(f"{who}: {name}.{pname} is also {', '.join(others)} (tied parameters); the new layer "
                              f"holds its own copy, so {name} and {others[0].rsplit('.', 1)[0] or 'the model'} are no "
                              "longer tied", stacklevel=3)


def convert(model: torch.nn.Module, kind: Optional[str] = "q8", *, include: Optional[Iterable[str]] = ("*",),
            exclude: Optional[Iterable[str]] = (), rules: Sequence[Rule] = (), inplace: bool = False,
            dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Replace ``nn.Linear`` / ``nn.Conv2d`` modules by lowbit quantization-aware layers.

    Args:
        model: the float model (a module that is itself a Linear/Conv2d is converted too).
        kind: ``"q8"`` (Linear -> Q8Linear; convolutions stay float: there is no 8-bit conv yet) or ``"q4"``
            (Linear -> Q4Linear, Conv2d -> Q4Conv2d); None converts only what ``rules`` name.
        include / exclude: lists of ``fnmatch`` patterns on qualified module names (``"encoder.*"``, ``"fc2"``);
            a module is converted if it matches an include pattern and no exclude pattern (keep the head
            float with ``exclude=["head"]``). The root module's name is ``""``. None: the default (include
            everything, exclude nothing). A single string is a TypeError, as in :func:`lowbit.quantize`.
        rules: ``(pattern, kind)`` pairs tried first, in order; the first match decides (kind None: leave
            float), e.g. ``[("features.0", None), ("classifier.*", "q8")]``.
        inplace: modify ``model`` instead of a deep copy.
        dtype: dtype of the new layers' ``bias_a``, ``scale_a`` and ``eps`` (their weights stay float32).

    Weights and biases are copied; a new layer's ``scale_a`` is 0 and is set from the first batch it
    sees (training or eval). A module used at several names (tied weights) becomes one new layer at all of them; its names
    must then all get the same kind (else ValueError). Returns the converted model (the same object when
    ``inplace``)."""
    who = "lowbit.convert"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"{who}: kind must be one of {sorted(KINDS)} or None, got {kind!r}")
    include = _patterns(who, "include", include, ("*",))
    exclude = _patterns(who, "exclude", exclude, ())
    if isinstance(rules, (str, bytes)):
        raise TypeError(f"{who}: rules must be a list of (pattern, kind) pairs, got the string {rules!r}")
    try:
        rules = tuple(rules)
    except TypeError:
        raise TypeError(f"{who}: rules must be a list of (pattern, kind) pairs, got {type(rules).__name__}") from None
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise TypeError(f"{who}: each rule must be a (pattern, kind) pair with a str pattern, got {rule!r}")
        if rule[1] is not None and rule[1] not in KINDS:
            raise ValueError(f"{who}: rule kind must be one of {sorted(KINDS)} or None, got {rule[1]!r} "
                             f"(rule {tuple(rule)!r})")
    if dtype not in _DTYPES:
        raise ValueError(f"{who}: dtype must be one of {_DTYPES}, got {dtype!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"{who}: inplace must be a bool, got {inplace!r}")
    if not inplace:
        model = copy.deepcopy(model)  # keeps modules tied: one copy per module, at all its names
    root_kind = _kind_for("", kind, include, exclude, rules)
    if root_kind is not None:
        swapped = _swap(model, root_kind, dtype, "<root>")
        if swapped is not None:
            return swapped
    plan = []
    for module, places in _module_sites(model).values():
        kinds = {full: _kind_for(full, kind, include, exclude, rules) for _, _, full in places}
        targets = {full: KINDS[k].get(type(module)) if k is not None else None for full, k in kinds.items()}
        if len(set(targets.values())) > 1:
            detail = ", ".join(f"{full!r} -> {t.__name__ if t else 'float'}" for full, t in targets.items())
            raise ValueError(f"{who}: one {type(module).__name__} module is used at {len(places)} names (tied), and "
                             f"the patterns convert them differently ({detail}); give all its names the same kind "
                             "or untie the module")
        if targets[places[0][2]] is not None:
            plan.append((module, kinds[places[0][2]], places))
    _warn_untied_parameters(who, model, {id(m): places[0][2] for m, _, places in plan})
    for module, k, places in plan:
        new = _swap(module, k, dtype, places[0][2])
        for parent, child, _ in places:
            setattr(parent, child, new)
    return model

"""lowbit.save / lowbit.load: a model's low-bit checkpoint as a directory.

    <dir>/model.safetensors   every tensor of model.state_dict() (BIE's key names inside lowbit layers)
    <dir>/lowbit.json         {"format": "lowbit-checkpoint", "version": 1, "lowbit": <version>,
                               "layers": {<module name>: {"class": "Q4Linear", "args": {...}}}}

``lowbit.json`` says which lowbit layer each module is and with which structure (the constructor
arguments); ``load`` rebuilds those layers inside the model skeleton it is given (the float
architecture, or the converted model) and loads the tensors, so a model converted, trained and
frozen (``generate_quantized_weight(qweight_only=True)``) comes back without its float weights.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Union

import torch

from . import io
from .nn import MBWQLinear, MPQLinear, Q4Conv2d, Q4Linear, Q4MatMul, Q8Linear

FORMAT, VERSION = "lowbit-checkpoint", 1
CONFIG, TENSORS = "lowbit.json", "model.safetensors"
LAYER_CLASSES = {cls.__name__: cls for cls in (Q8Linear, Q4Linear, Q4Conv2d, Q4MatMul, MPQLinear, MBWQLinear)}
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def save(model: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model``'s state dict and the structure of its lowbit layers to the directory ``path``."""
    from . import __version__

    layers = {name: {"class": type(m).__name__, "args": m.constructor_args()}
              for name, m in model.named_modules() if type(m).__name__ in LAYER_CLASSES}
    os.makedirs(path, exist_ok=True)
    tensors = {k: v for k, v in model.state_dict().items() if v is not None}
    io.save_file(tensors, os.path.join(path, TENSORS), metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": VERSION, "lowbit": __version__, "layers": layers}
    tmp = os.path.join(path, CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, CONFIG))


def _build(name: str, spec) -> torch.nn.Module:
    if not isinstance(spec, dict) or set(spec) != {"class", "args"} or not isinstance(spec["args"], dict):
        raise ValueError(f"lowbit.load: layers[{name!r}] must be {{'class': ..., 'args': {{...}}}}, got {spec!r}")
    cls = LAYER_CLASSES.get(spec["class"])
    if cls is None:
        raise ValueError(f"lowbit.load: layers[{name!r}] has unknown class {spec['class']!r} "
                         f"(known: {sorted(LAYER_CLASSES)})")
    args = dict(spec["args"])
    if "dtype" in args:
        if args["dtype"] not in _DTYPES:
            raise ValueError(f"lowbit.load: layers[{name!r}] has unsupported dtype {args['dtype']!r}")
        args["dtype"] = _DTYPES[args["dtype"]]
    try:
        return cls(**args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lowbit.load: cannot build layers[{name!r}] = {cls.__name__}(**{spec['args']}): {exc}") from exc


def load(path: Union[str, os.PathLike], model: torch.nn.Module, strict: bool = True,
         map_location: Union[str, torch.device, None] = None) -> torch.nn.Module:
    """Rebuild the lowbit layers recorded in ``path`` inside ``model`` (replacing the modules of those
    names) and load the checkpoint's tensors. ``model`` gives the architecture: the float model the
    checkpoint was converted from, or a converted one. Returns ``model`` (modified in place)."""
    cfg_path = os.path.join(path, CONFIG)
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"lowbit.load: cannot read {cfg_path}: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"lowbit.load: {cfg_path} is not a lowbit checkpoint config (format != {FORMAT!r})")
    if config.get("version") != VERSION:
        raise ValueError(f"lowbit.load: {cfg_path} has version {config.get('version')!r}; this lowbit reads {VERSION}")
    if map_location is None:  # where the skeleton lives, decided before new layers (on the CPU) join it
        params = list(model.parameters())
        map_location = params[0].device if params else "cpu"
    layers = config.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"lowbit.load: {cfg_path}: 'layers' must be an object")
    for name, spec in layers.items():
        new = _build(name, spec)
        if name == "":
            raise ValueError("lowbit.load: the checkpoint's root module is a lowbit layer; build it with "
                             f"{spec['class']}(...) and call load_state_dict(lowbit.io.load_file(...)) instead")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            getattr(parent, child)
        except AttributeError as exc:
            raise ValueError(f"lowbit.load: the model has no module {name!r} for the checkpoint's layer") from exc
        setattr(parent, child, new)
    state = io.load_file(os.path.join(path, TENSORS))
    model.to(map_location)
    tensors = OrderedDict((k, v.to(map_location)) for k, v in state.items())
    # safetensors keeps no per-module state-dict versions: restore the lowbit layers' own, so that each
    # reads its tensors in the layout lowbit wrote (e.g. Q4Conv2d's OHWI qweight, not BIE's).
    tensors._metadata = {name: {"version": getattr(type(model.get_submodule(name)), "_version", 1)}
                         for name in layers}
    model.load_state_dict(tensors, strict=strict)
    return model

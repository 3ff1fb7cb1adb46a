"""lowbit.save / lowbit.load: a model's low-bit checkpoint as a directory.

    <dir>/model.safetensors   every tensor of model.state_dict() (BIE's key names inside lowbit layers)
    <dir>/lowbit.json         {"format": "lowbit-checkpoint", "version": 1, "lowbit": <version>,
                               "layers": {<module name>: {"class": "Q4Linear", "args": {...}}}}

``lowbit.json`` says which lowbit layer each module is and with which structure (the constructor
arguments); ``load`` rebuilds those layers inside the model skeleton it is given (the float
architecture, or the converted model) and loads the tensors, so a model converted, trained and
frozen (``generate_quantized_weight(qweight_only=True)``) comes back without its float weights.

Which modules are recorded: every module that is an instance of a ``lowbit.nn`` layer class, at every
name it has (a module used at two names is recorded at both). ``lowbit.compat``'s BIE classes are
recorded as their ``lowbit.nn`` base class (same tensors, keyword arguments from ``constructor_args()``;
the checkpoint holds lowbit's layouts, e.g. Q4Conv2d's OHWI ``qweight``), so they come back as that class.
Any other subclass is refused by ``save`` (TypeError): lowbit cannot rebuild it, and rebuilding it as
its base class would silently drop what the subclass changes.
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch

from . import io
from .nn import MBWQLinear, MPQLinear, Q4Conv2d, Q4Linear, Q4MatMul, Q8Linear

FORMAT, VERSION = "lowbit-checkpoint", 1
CONFIG, TENSORS = "lowbit.json", "model.safetensors"
LAYER_CLASSES = {cls.__name__: cls for cls in (Q8Linear, Q4Linear, Q4Conv2d, Q4MatMul, MPQLinear, MBWQLinear)}
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}
_MAX_LISTED = 20  # keys named in an error or warning message (the warning object carries them all)


class IncompatibleKeysWarning(UserWarning):
    """Emitted by ``lowbit.load(..., strict=False)`` when the checkpoint and the model do not hold the same
    keys. ``missing_keys``: the model's keys the checkpoint has no tensor for (they keep the skeleton's
    values); ``unexpected_keys``: checkpoint tensors the model has no place for (ignored)."""

    def __init__(self, message: str, missing_keys: List[str], unexpected_keys: List[str]):
        super().__init__(message)
        self.missing_keys, self.unexpected_keys = list(missing_keys), list(unexpected_keys)


def _listed(keys) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(repr(k) for k in keys[:_MAX_LISTED]) + more


def _key_report(missing, unexpected) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) of the model missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected checkpoint key(s): {_listed(unexpected)}")
    return "; ".join(parts)


def _compat_classes() -> set:
    # BIE names (lowbit.compat imports lowbit.nn, not this module); import_module: `from . import compat`
    # would go through the package's lazy __getattr__.
    compat = importlib.import_module(f"{__package__}.compat")

    bases = tuple(LAYER_CLASSES.values())
    return {obj for obj in vars(compat).values() if isinstance(obj, type) and issubclass(obj, bases)
            and obj not in bases and obj.__module__ == compat.__name__}


def _recorded_class(name: str, module: torch.nn.Module, compat: set):
    """The lowbit.nn class that rebuilds ``module`` (None: not a lowbit layer). Raises TypeError for a
    subclass that lowbit cannot rebuild."""
    cls = type(module)
    if cls in LAYER_CLASSES.values():
        return cls
    base = next((c for c in cls.__mro__ if c in LAYER_CLASSES.values()), None)
    if base is None or cls in compat:
        return base
    raise TypeError(f"lowbit.save: module {name or '<root>'!r} is a {cls.__module__}.{cls.__qualname__}, a subclass of "
                    f"lowbit.nn.{base.__name__} that lowbit.load cannot rebuild (it rebuilds lowbit.nn's layer classes "
                    f"and lowbit.compat's BIE names only; as a {base.__name__} it would lose what "
                    f"{cls.__qualname__} changes). Replace it by a {base.__name__} before saving, or save "
                    "model.state_dict() with lowbit.io.save_file and rebuild those layers yourself")


def save(model: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model``'s state dict and the structure of its lowbit layers to the directory ``path``.

    Every module that is an instance of a lowbit layer class is recorded, at each of its names (a module
    used at two names at both); ``lowbit.compat`` classes as their ``lowbit.nn`` base class. Raises
    TypeError, before writing anything, for any other subclass of a lowbit layer (lowbit cannot rebuild it)."""
    from . import __version__

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lowbit.save: model must be a torch.nn.Module, got {type(model).__name__}")
    compat = _compat_classes()
    layers = {}
    for name, m in model.named_modules(remove_duplicate=False):
        cls = _recorded_class(name, m, compat)
        if cls is not None:
            layers[name] = {"class": cls.__name__, "args": m.constructor_args()}
    os.makedirs(path, exist_ok=True)
    tensors = {k: v for k, v in model.state_dict().items() if v is not None}
    io.save_file(tensors, os.path.join(path, TENSORS), metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": VERSION, "lowbit": __version__, "layers": layers}
    tmp = os.path.join(path, CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, CONFIG))


def read_config(cfg_path: Union[str, os.PathLike]) -> Dict[str, dict]:
    """Reads and checks a ``lowbit.json``; returns its ``layers`` ({module name: {"class", "args"}}, every
    class a known lowbit layer, every ``args`` an object). ValueError naming the file and what is wrong
    (the constructor arguments themselves are checked when the layers are built)."""
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {os.fspath(cfg_path)}: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = f"format {config.get('format')!r}" if isinstance(config, dict) else f"a JSON {type(config).__name__}"
        raise ValueError(f"{os.fspath(cfg_path)} is not a lowbit checkpoint config (expected an object with "
                         f"format {FORMAT!r}, got {got})")
    version = config.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(f"{os.fspath(cfg_path)} has version {version!r}; this lowbit reads {VERSION}")
    layers = config.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{os.fspath(cfg_path)}: 'layers' must be an object {{module name: {{'class': ..., "
                         f"'args': {{...}}}}}}, got {type(layers).__name__} {layers!r:.80}")
    for name, spec in layers.items():
        if not isinstance(spec, dict) or set(spec) != {"class", "args"} or not isinstance(spec["args"], dict):
            raise ValueError(f"{os.fspath(cfg_path)}: layers[{name!r}] must be {{'class': ..., 'args': {{...}}}}, "
                             f"got {spec!r:.200}")
        if not isinstance(spec["class"], str) or spec["class"] not in LAYER_CLASSES:
            raise ValueError(f"{os.fspath(cfg_path)}: layers[{name!r}] has unknown class {spec['class']!r} "
                             f"(known: {sorted(LAYER_CLASSES)})")
    return layers


def _build(name: str, spec: dict) -> torch.nn.Module:
    cls = LAYER_CLASSES[spec["class"]]
    args = dict(spec["args"])
    if "device" in args:
        raise ValueError(f"lowbit.load: layers[{name!r}] args hold 'device' ({args['device']!r}), which lowbit.save "
                         "never records: load places the layers by map_location")
    if "dtype" in args:
        if args["dtype"] not in _DTYPES:
            raise ValueError(f"lowbit.load: layers[{name!r}] has unsupported dtype {args['dtype']!r} "
                             f"(expected one of {sorted(_DTYPES)})")
        args["dtype"] = _DTYPES[args["dtype"]]
    try:
        return cls(**args)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lowbit.load: cannot build layers[{name!r}] = {cls.__name__}(**{spec['args']}): {exc}") from exc


def _resolve(model: torch.nn.Module, name: str, spec: dict) -> Tuple[torch.nn.Module, str, Optional[torch.nn.Module]]:
    """(parent, attribute, current module) of the checkpoint's layer ``name`` in ``model``."""
    if name == "":
        raise ValueError("lowbit.load: the checkpoint's root module is a lowbit layer; build it with "
                         f"{spec['class']}(...) and call load_state_dict(lowbit.io.load_file(...)) instead")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError as exc:
        raise ValueError(f"lowbit.load: the model has no module {name!r} for the checkpoint's layer ({exc})") from exc
    if child not in parent._modules:
        if hasattr(parent, child):
            what = type(getattr(parent, child)).__name__
            raise ValueError(f"lowbit.load: the checkpoint's layer {name!r} names a {what} attribute of the model, "
                             "not a module (expected the name of a submodule to replace)")
        raise ValueError(f"lowbit.load: the model has no module {name!r} for the checkpoint's layer")
    return parent, child, parent._modules[child]


def _device_of(module: torch.nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _sub_state(tensors, prefix: str) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k[len(prefix):], v) for k, v in tensors.items() if k.startswith(prefix))


def _features(m: torch.nn.Module):
    """(in, out) features of a linear / conv module (torch's or lowbit's), or None where it has none."""
    i = getattr(m, "in_features", getattr(m, "in_channels", None))
    o = getattr(m, "out_features", getattr(m, "out_channels", None))
    return (i, o) if isinstance(i, int) and isinstance(o, int) else None


def _check_sizes(name: str, old: torch.nn.Module, new: torch.nn.Module) -> None:
    """A recorded layer must have the size of the model's module it replaces (a wrong skeleton is an error,
    not a silently different model)."""
    a, b = _features(old), _features(new)
    if a is not None and b is not None and a != b:
        raise ValueError(f"lowbit.load: the checkpoint's layer {name!r} is {type(new).__name__} with in={b[0]}, "
                         f"out={b[1]}, but the model's module there is {type(old).__name__} with in={a[0]}, "
                         f"out={a[1]}: the model is not the one the checkpoint was made from")


def load(path: Union[str, os.PathLike], model: torch.nn.Module, strict: bool = True,
         map_location: Union[str, torch.device, None] = None) -> torch.nn.Module:
    """Rebuild the lowbit layers recorded in ``path`` inside ``model`` (replacing the modules of those
    names) and load the checkpoint's tensors. ``model`` gives the architecture: the float model the
    checkpoint was converted from, or a converted one. Returns ``model`` (modified in place).

    ``map_location``: the device of the loaded model (default: that of the model's first parameter; the
    model is moved there). A new layer takes the training mode of the module it replaces; a module the
    model uses at several names (tied) is replaced by one layer at all of them.

    The config, the tensors (read, and checked against the new layers, the shapes of the model's other
    tensors and, with ``strict``, the keys of ``model.state_dict()``) and every new layer are ready before
    the first module of ``model`` is swapped: a failure there (ValueError for the config, RuntimeError for
    the tensors) leaves ``model`` untouched. Should ``load_state_dict`` itself still fail, the original
    modules are put back before the error propagates (tensors it had already copied into the model's other
    modules stay, as with torch). ``strict=False`` loads what matches and emits an
    :class:`IncompatibleKeysWarning` (``missing_keys``, ``unexpected_keys``) when the keys differ."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lowbit.load: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"lowbit.load: strict must be a bool, got {strict!r}")
    try:
        layers = read_config(os.path.join(path, CONFIG))
    except ValueError as exc:
        raise ValueError(f"lowbit.load: {exc}") from exc
    if map_location is None:  # where the skeleton lives
        map_location = _device_of(model)
    try:
        map_location = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"lowbit.load: map_location must be a device (e.g. 'cpu', 'cuda:0') or None, got "
                         f"{map_location!r}") from exc

    # 1. Where each recorded layer goes, and one new layer per distinct module of the model (a module the
    # model uses at several names is one layer at all of them, recorded there or not).
    for name in layers:
        for i in range(len(name)):
            if name[i] == "." and name[:i] in layers:
                raise ValueError(f"lowbit.load: the checkpoint's layer {name!r} lies inside its layer {name[:i]!r}")
    sites = {}  # id(module in model) -> [module, first name, spec, [(parent, attribute, name)]]
    for name, spec in layers.items():
        parent, child, old = _resolve(model, name, spec)
        key = id(old) if old is not None else ("none", name)
        entry = sites.setdefault(key, [old, name, spec, []])
        if spec != entry[2]:
            raise ValueError(f"lowbit.load: the model uses one module at {entry[1]!r} and {name!r}, but the checkpoint "
                             f"records different layers there ({entry[2]} and {spec})")
        entry[3].append((parent, child, name))
    where = {id(e[0]): e for e in sites.values() if e[0] is not None}
    if where:  # the model's other names of those modules
        for pname, parent in model.named_modules(remove_duplicate=False):
            for child, m in parent._modules.items():
                e = where.get(id(m)) if m is not None else None
                full = f"{pname}.{child}" if pname else child
                if e is not None and all(n != full for _, _, n in e[3]):
                    e[3].append((parent, child, full))
    plan = []  # (new layer, [(parent, attribute, name)], old module)
    for old, first, spec, places in sites.values():
        new = _build(first, spec).to(map_location)
        if old is not None:
            _check_sizes(first, old, new)
            new.train(old.training)
        plan.append((new, places, old))
    replaced = [n for _, places, _ in plan for _, _, n in places]

    # 2. The tensors, checked against the new layers (each loads its own, in isolation) and the model.
    state = io.load_file(os.path.join(path, TENSORS))
    tensors = OrderedDict((k, v.to(map_location)) for k, v in state.items())
    # safetensors keeps no per-module state-dict versions: restore the lowbit layers' own, so that each
    # reads its tensors in the layout lowbit wrote (e.g. Q4Conv2d's OHWI qweight, not BIE's).
    versions = {name: {"version": getattr(type(new), "_version", 1)}
                for new, places, _ in plan for _, _, name in places}
    missing, unexpected = [], []
    for new, places, _ in plan:
        first = places[0][2]
        sub = _sub_state(tensors, first + ".")
        for _, _, other in places[1:]:
            alt = _sub_state(tensors, other + ".")
            if alt.keys() != sub.keys() or not all(torch.equal(alt[k], sub[k]) for k in sub):
                raise ValueError(f"lowbit.load: the model uses one module at {first!r} and {other!r} (tied), but the "
                                 "checkpoint holds different tensors for them")
        sub._metadata = {"": versions[first]}
        try:
            result = new.load_state_dict(sub, strict=False)
        except (RuntimeError, ValueError) as exc:
            raise type(exc)(f"lowbit.load: the checkpoint's tensors of layer {first!r} ({type(new).__name__}) do not "
                            f"load: {exc}") from exc
        for _, _, n in places:
            missing += [f"{n}.{k}" for k in result.missing_keys]
            unexpected += [f"{n}.{k}" for k in result.unexpected_keys]
    prefixes = tuple(n + "." for n in replaced)
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefixes)}
    mismatched = []
    for k, v in own.items():
        t = tensors.get(k)
        if t is None:
            missing.append(k)
        elif (isinstance(v, torch.Tensor) and not torch.nn.parameter.is_lazy(v) and t.shape != v.shape
              and not (v.dim() == 0 and t.shape == (1,))):
            mismatched.append(f"{k}: checkpoint {tuple(t.shape)}, model {tuple(v.shape)}")
    unexpected += [k for k in tensors if k not in own and not k.startswith(prefixes)]
    if mismatched:
        raise RuntimeError(f"lowbit.load: {len(mismatched)} tensor(s) of {os.path.join(path, TENSORS)} do not fit the "
                           f"model (shapes): {_listed(mismatched)}; is it the architecture the checkpoint was saved "
                           "from?")
    if strict and (missing or unexpected):
        raise RuntimeError(f"lowbit.load: {os.path.join(path, TENSORS)} does not hold the model's keys (strict=True): "
                           f"{_key_report(missing, unexpected)}; strict=False loads what matches")

    # 3. Swap and load; on failure, the model gets its modules back.
    tensors._metadata = versions
    swapped = []
    try:
        for new, places, old in plan:
            for parent, child, _ in places:
                setattr(parent, child, new)
                swapped.append((parent, child, old))
        result = model.load_state_dict(tensors, strict=strict)
    except BaseException:
        for parent, child, old in reversed(swapped):
            setattr(parent, child, old)
        raise
    model.to(map_location)
    if result.missing_keys or result.unexpected_keys:  # strict=False (strict raised above)
        warnings.warn(IncompatibleKeysWarning(
            f"lowbit.load(strict=False) loaded what matches (missing keys keep the model's values, unexpected ones "
            f"are ignored): {_key_report(result.missing_keys, result.unexpected_keys)}",
            result.missing_keys, result.unexpected_keys), stacklevel=2)
    return model

"""The ``lowbit`` command line (also ``python -m lowbit``).

    lowbit inspect PATH        what a checkpoint holds: lowbit layers, bits, tensor sizes
    lowbit demo [ARGS...]      the Fashion-MNIST demo (C++ binary if built, else the Python twin)
    lowbit bench [NAMES...]    the layer benchmarks of bench/ (q8_linear, q4_layers, wq_linear, llm_decode)
    lowbit quantize SRC DST    weight-only quantization of a float checkpoint (MBWQ / MPQ, RTN)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

# Bits per stored weight of each layer kind's frozen qweight (docs/formats.md).
_BITS = {"Q8Linear": 8, "Q4Linear": 4, "Q4Conv2d": 4, "Q4MatMul": None}


def _repo_root() -> Optional[Path]:
    """The source tree this package runs from (in-tree or editable installs), if any."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent.parent, Path.cwd()):
        if (cand / "examples" / "python" / "demo.py").is_file():
            return cand
    return None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_inspect(args) -> int:
    from . import io
    from .checkpoint import CONFIG, TENSORS, read_config

    path = Path(args.path)
    st_path = path / TENSORS if path.is_dir() else path
    layers = {}
    if path.is_dir():
        cfg_path = path / CONFIG
        if cfg_path.is_file():
            try:
                layers = read_config(cfg_path)
            except ValueError as exc:
                print(f"lowbit inspect: {exc}", file=sys.stderr)
                return 2
    try:
        tensors = io.load_file(st_path)
        meta = io.load_metadata(st_path)
    except (RuntimeError, OSError) as exc:
        print(f"lowbit inspect: {st_path}: {exc}", file=sys.stderr)
        return 2
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{st_path}: {len(tensors)} tensors, {_human(total)}" + (f", metadata {meta}" if meta else ""))
    if layers:
        print(f"\n{'module':<30} {'layer':<10} {'bits':>4} {'stored bytes':>14}  structure")
        for name, spec in layers.items():
            prefix = f"{name}." if name else ""
            nbytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))
            a = spec["args"]
            bits = _BITS.get(spec["class"]) or ("mix" if a.get("use_mbw") else a.get("w_bit"))
            frozen = "qweight" if f"{prefix}qweight" in tensors else "float weight"
            print(f"{name or '<root>':<30} {spec['class']:<10} {bits if bits else '-':>4} "
                  f"{nbytes:>14}  {frozen}, {json.dumps(a)}")
    if args.tensors or not layers:
        print(f"\n{'tensor':<40} {'dtype':<10} shape")
        for k, t in tensors.items():
            print(f"{k:<40} {str(t.dtype).replace('torch.', ''):<10} {tuple(t.shape)}")
    return 0


def cmd_demo(args) -> int:
    root = _repo_root()
    binary = root / "build" / "examples" / "cpp" / "lowbit_demo" if root else None
    if binary is not None and binary.is_file() and not args.python:
        return subprocess.call([str(binary), *args.rest])
    if root is None:
        print("lowbit demo: the demo lives in the source tree (examples/); run it from a lowbit checkout",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(root / "examples" / "python" / "demo.py"), *args.rest])


def cmd_bench(args) -> int:
    root = _repo_root()
    if root is None:
        print("lowbit bench: the benchmarks live in the source tree (bench/); run it from a lowbit checkout",
              file=sys.stderr)
        return 2
    rc = 0
    for name in args.names or ["q8_linear", "q4_layers", "wq_linear"]:
        script = root / "bench" / f"{name}.py"
        if not script.is_file():
            print(f"lowbit bench: no benchmark {name!r} (bench/{name}.py)", file=sys.stderr)
            return 2
        rc |= subprocess.call([sys.executable, str(script), *args.extra])
    return rc


_DEFAULT_EXCLUDE = ["*lm_head*", "*embed*"]


def cmd_quantize(args) -> int:
    from . import __version__, io
    from .checkpoint import CONFIG, FORMAT, TENSORS, VERSION, read_config
    from .convert import _kind_for
    from .quantize import quantize_weights

    def fail(msg: str) -> int:
        print(f"lowbit quantize: {msg}", file=sys.stderr)
        return 2

    if args.method == "gptq":
        return fail("--method gptq needs calibration data, which the command line does not take; use the "
                    "Python API: lowbit.quantize(model, method='gptq', calibration=[batch, ...])")
    src = Path(args.src)
    st_path = src / TENSORS if src.is_dir() else src
    existing = {}
    if src.is_dir() and (src / CONFIG).is_file():
        try:
            existing = read_config(src / CONFIG)
        except ValueError as exc:
            return fail(str(exc))
    try:
        tensors = io.load_file(st_path)
    except (RuntimeError, OSError) as exc:
        return fail(f"{st_path}: {exc}")
    include = args.include or ["*"]
    exclude = ([] if args.no_default_exclude else list(_DEFAULT_EXCLUDE)) + list(args.exclude or [])
    items = []
    for key, w in tensors.items():
        mod = key[:-len(".weight")] if key.endswith(".weight") else ""
        if not mod or w.dim() != 2 or not w.is_floating_point():
            continue
        if any(mod == e or mod.startswith(e + ".") for e in existing):  # already a lowbit layer
            continue
        if _kind_for(mod, "wq", include, exclude, ()) is None:
            continue
        b = tensors.get(mod + ".bias")
        if b is not None and (b.dim() != 1 or b.numel() != w.shape[0] or not b.is_floating_point()):
            return fail(f"{mod}.bias has shape {tuple(b.shape)} / {b.dtype}; expected a float vector of "
                        f"{w.shape[0]} for the weight {tuple(w.shape)}")
        items.append((mod, w, b, None))
    if not items:
        return fail(f"no 2-D float '<module>.weight' tensor in {st_path} matches --include {include} "
                    f"--exclude {exclude}")
    try:
        layers, report = quantize_weights(items, bits=args.bits, group_size=args.group_size, method=args.method,
                                          layer=args.layer, budget_bits=args.budget_bits,
                                          candidate_bits=args.candidate_bits, progress=not args.no_progress)
    except ValueError as exc:
        return fail(str(exc).replace("lowbit.quantize: ", ""))
    out = {k: t for k, t in tensors.items() if k.rpartition(".")[0] not in layers or
           k.rpartition(".")[2] not in ("weight", "bias")}
    for name, layer in layers.items():
        out.update({f"{name}.{k}": v for k, v in layer.state_dict().items() if v is not None})
    specs = dict(existing)
    specs.update({name: {"class": type(m).__name__, "args": m.constructor_args()} for name, m in layers.items()})
    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        return fail(f"{dst} exists and is not a directory")
    dst.mkdir(parents=True, exist_ok=True)
    io.save_file(out, dst / TENSORS, metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": VERSION, "lowbit": __version__, "layers": specs}
    tmp = dst / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, dst / CONFIG)
    before = sum(t.numel() * t.element_size() for t in tensors.values())
    after = sum(t.numel() * t.element_size() for t in out.values())
    print(report.table())
    print(f"checkpoint: {_human(before)} -> {_human(after)} ({before / max(after, 1):.2f}x smaller), "
          f"{report.average_bits:.3f} bits per quantized weight; wrote {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="lowbit: low-bit layers for PyTorch.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show what a checkpoint holds",
                       description="Show a lowbit checkpoint (a directory written by lowbit.save) or any "
                                   ".safetensors file: its lowbit layers with their bit widths, stored bytes and "
                                   "structure, and (with --tensors, or for a plain file) every tensor.")
    p.add_argument("path", help="checkpoint directory (model.safetensors + lowbit.json) or a .safetensors file")
    p.add_argument("--tensors", action="store_true", help="also list every tensor with dtype and shape")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="run the Fashion-MNIST demo",
                       description="Run the demo: the C++ binary build/examples/cpp/lowbit_demo when it is built, "
                                   "else examples/python/demo.py. Arguments after -- go to the demo "
                                   "(e.g. -- --epochs 2 --device cuda).")
    p.add_argument("--python", action="store_true", help="run the Python demo even if the C++ one is built")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the demo")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="run the layer benchmarks",
                       description="Run bench/<name>.py for each NAME (default: q8_linear q4_layers wq_linear); each "
                                   "prints a Markdown table of lowbit against its torch baseline in one process.")
    p.add_argument("names", nargs="*", help="benchmark names: q8_linear, q4_layers, wq_linear, llm_decode")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="arguments passed to every benchmark script (e.g. --extra --device cpu)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser(
        "quantize", help="weight-only quantization of a float checkpoint (MBWQ / MPQ)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize the linear weights of a float checkpoint to MBWQLinear (layer-mix) or MPQLinear "
                    "(GPTQ format)\nlayers by round to nearest, and write a lowbit checkpoint directory that "
                    "lowbit.load(DST, float_model)\nrebuilds (then lowbit.prepare_layers(model)).\n\n"
                    "A state dict carries no architecture: every 2-D floating tensor named '<module>.weight' "
                    "whose\nmodule matches --include / --exclude is treated as an nn.Linear weight (bias: "
                    "'<module>.bias' if present);\nevery other tensor is copied unchanged. Exclude modules "
                    "that are not Linear layers (embeddings,\nconvolutions stored 2-D, ...). Prints the "
                    "per-layer report: bits per weight (qweight + scales + zeros),\nrelative weight error "
                    "||W - Wq||_F / ||W||_F, and the checkpoint size before and after.\n\n"
                    "GPTQ needs calibration data: use the Python API, lowbit.quantize(model, method='gptq', "
                    "calibration=...).",
        epilog="example: lowbit quantize llama-fp16/ llama-w4/ --bits 4 --group-size 128 --exclude 'model.layers.0.*'")
    p.add_argument("src", metavar="SRC", help="float checkpoint: a lowbit checkpoint directory (model.safetensors "
                                              "[+ lowbit.json]) or a .safetensors file of a state dict")
    p.add_argument("dst", metavar="DST", help="output directory (created): model.safetensors + lowbit.json")
    p.add_argument("--bits", type=int, default=4,
                   help="bits per weight code of every layer (mbwq: 1 2 3 4 5 6 8; mpq: 1 2 4 8; default 4); "
                        "ignored with --budget-bits")
    p.add_argument("--group-size", type=int, default=128,
                   help="input channels sharing one scale and zero (default 128; -1: one group per output row)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="rtn: round to nearest (default; the only method here). gptq needs calibration batches "
                        "and is available through the Python API only")
    p.add_argument("--layer", choices=["mbwq", "mpq"], default="mbwq",
                   help="mbwq: MBWQLinear layer-mix (float zeros, w = s*q - z; default). mpq: MPQLinear in "
                        "GPTQ format (integer zero points, w = s*(q - z))")
    p.add_argument("--budget-bits", type=float, default=None, metavar="X",
                   help="mixed-bit plan: choose each layer's width from --candidate-bits so that the average "
                        "bits per weight (scales and zeros included) is <= X, with the smallest total "
                        "weighted squared error")
    p.add_argument("--candidate-bits", type=int, nargs="+", default=[2, 3, 4, 8], metavar="N",
                   help="widths the --budget-bits plan chooses from (default 2 3 4 8; mpq skips 3)")
    p.add_argument("--include", nargs="+", default=None, metavar="PATTERN",
                   help="fnmatch patterns on module names to quantize (default: all), e.g. 'model.layers.*'")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN",
                   help="fnmatch patterns on module names to keep float, added to the default exclusions "
                        f"{' '.join(_DEFAULT_EXCLUDE)}; exclusion wins over --include")
    p.add_argument("--no-default-exclude", action="store_true",
                   help="do not exclude *lm_head* and *embed* by default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_quantize)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rest", None) and args.rest[:1] == ["--"]:
        args.rest = args.rest[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

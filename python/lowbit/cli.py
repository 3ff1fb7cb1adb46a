"""The ``lowbit`` command line (also ``python -m lowbit``).

    lowbit inspect PATH        what a checkpoint holds: lowbit layers, bits, tensor sizes
    lowbit demo [ARGS...]      the Fashion-MNIST demo (C++ binary if built, else the Python twin)
    lowbit bench [NAMES...]    the layer benchmarks of bench/ (q8_linear, q4_layers)
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
    from .checkpoint import CONFIG, TENSORS

    path = Path(args.path)
    st_path = path / TENSORS if path.is_dir() else path
    layers = {}
    if path.is_dir():
        cfg_path = path / CONFIG
        if cfg_path.is_file():
            layers = json.loads(cfg_path.read_text()).get("layers", {})
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
            bits = _BITS.get(spec.get("class"))
            frozen = "qweight" if f"{prefix}qweight" in tensors else "float weight"
            print(f"{name or '<root>':<30} {spec.get('class', '?'):<10} {bits if bits else '-':>4} "
                  f"{nbytes:>14}  {frozen}, {json.dumps(spec.get('args', {}))}")
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
    for name in args.names or ["q8_linear", "q4_layers"]:
        script = root / "bench" / f"{name}.py"
        if not script.is_file():
            print(f"lowbit bench: no benchmark {name!r} (bench/{name}.py)", file=sys.stderr)
            return 2
        rc |= subprocess.call([sys.executable, str(script), *args.extra])
    return rc


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
                       description="Run bench/<name>.py for each NAME (default: q8_linear q4_layers); each "
                                   "prints a Markdown table of lowbit against its torch baseline in one process.")
    p.add_argument("names", nargs="*", help="benchmark names: q8_linear, q4_layers")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="arguments passed to every benchmark script (e.g. --extra --device cpu)")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rest", None) and args.rest[:1] == ["--"]:
        args.rest = args.rest[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

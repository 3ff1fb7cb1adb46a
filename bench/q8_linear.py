"""Q8Linear against torch's nn.Linear: speed (inference with int8 weights, training step) and memory.

    python3 bench/q8_linear.py [--device cpu|cuda|all] [--threads N] [--markdown-out FILE]

Cases, each ours vs a torch baseline in this process (method: bench/harness.py):
  eval fwd      Q8Linear in eval mode from qweight only (generate_quantized_weight(qweight_only=True))
                vs nn.Linear forward, both under no_grad
  train f+b     Q8Linear training forward + backward (grads of x, weight, bias_a, scale_a)
                vs nn.Linear forward + backward (grads of x, weight); x requires grad as in a hidden layer
  train int8 bwd  the same with Q8Linear(int8_backward=True): the input gradient's GEMM on int8
                (output gradient quantized per row, SwitchBack), the weight gradient in float
  linear_s8     the raw int8 GEMM with its dequantizing epilogue (torch.ops.lowbit.linear_s8)
                vs torch._int_mm (int8 x int8 -> int32, torch's own int8 GEMM)
Baseline dtype: fp32 on the CPU, bf16 on the GPU (where Q8Linear also gets bf16 activations; its master
weight stays fp32). nn.Linear is built without bias: Q8Linear has no output bias. Shapes: M rows, N out
features, K in features. Ratio = baseline / lowbit: > 1 means lowbit is faster.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

try:
    import lowbit
except ImportError as exc:  # pragma: no cover - depends on the installation
    sys.exit(f"q8_linear.py: cannot import lowbit ({exc}); build it with -DLOWBIT_BUILD_PYTHON=ON and set "
             "PYTHONPATH=python (bench/run_all.sh does both), or pip install --no-build-isolation -e .")

CPU_SHAPES = [(512, 2048, 2048)]  # (M, K, N)
GPU_SHAPES = [(m, kn, kn) for kn in (4096, 8192) for m in (16, 256, 2048, 8192)]


# ---------------------------------------------------------------------------------------------- builders


def _q8_layer(k, n, device, dtype, *, inference, int8_backward=False):
    layer = lowbit.nn.Q8Linear(k, n, device=device, dtype=dtype, int8_backward=int8_backward)
    if inference:
        # scale_a is learned in training; a plausible value for N(0, 1) inputs instead of 0 (which
        # would make eval quantize with eps).
        with torch.no_grad():
            layer.scale_a.fill_(2 * 0.8 / 127**0.5)
        layer.generate_quantized_weight(qweight_only=True)
        layer.eval()
    return layer


def _short(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _pct(gops, peak):
    return f"{100 * gops / peak:.1f}" if gops and peak else None


def _torch_layer(k, n, device, dtype):
    return torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)


def _x(m, k, dtype, device, grad=False):
    x = harness.random_nonzero((m, k), dtype, device)
    return x.requires_grad_(grad)


def _fwd(layer, x):
    with torch.no_grad():
        return layer(x)


def _fwd_bwd(layer, x, g):
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    layer(x).backward(g)


def _sets(device, make):
    """Copies of the operands (make(i) -> tuple) enough to exceed the cache in one rotation."""
    first = make(0)
    return [first] + [make(i) for i in range(1, harness.copies_needed(harness.nbytes(*first), device))]


# ---------------------------------------------------------------------------------------------- speed


def _time_side(fn, make, device, kw):
    """Timing of fn over enough copies from make, or the error's first line: a missing kernel (say, an
    op not yet on CUDA) costs one cell of the table, not the run."""
    try:
        return harness.time_fn(fn, _sets(device, make), device, **kw)
    except (RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:  # the copies are gone with the call: give their memory back before the next side
        if device == "cuda":
            torch.cuda.empty_cache()


def bench_shape(m, k, n, device, dtype, args, peak_gops, notes):
    """The three cases at one shape, each ours and its baseline timed in this process with the same
    method (harness.time_fn); returns table rows, appends errors to notes."""
    kw = dict(threads=args.threads if device == "cpu" else None, iters=args.iters)
    rows = []

    def case(name, ours_fn, ours_make, base_name, base_fn, base_make, count_gops=False):
        base = _time_side(base_fn, base_make, device, kw)
        ours = _time_side(ours_fn, ours_make, device, kw)
        cells, us = [], []
        for side, t in (("lowbit", ours), (base_name, base)):
            if isinstance(t, str):
                notes.append(f"{device} M={m} K={k} N={n} {name}, {side}: {t}")
                cells.append(None)
                us.append(None)
            else:  # '*': the GPU waited on the host, the time is the host's (see harness.Timing)
                cells.append(harness.fmt(t.median_us) + ("*" if t.host_bound else ""))
                us.append(t.median_us)
        ok = None not in us
        gops = harness.us_to_gops(m, n, k, us[0]) if count_gops and us[0] else None
        rows.append([device, m, f"{k}x{n}", name, cells[0], base_name, cells[1],
                     f"{us[1] / us[0]:.2f}" if ok else None, gops, _pct(gops, peak_gops)])
        print(f"  {device} M={m} K={k} N={n} {name}: lowbit {ours} | {base_name} {base}", file=sys.stderr, flush=True)

    base_name = f"nn.Linear {_short(dtype)}"
    case("eval fwd",
         _fwd, lambda i: (_q8_layer(k, n, device, dtype, inference=True), _x(m, k, dtype, device)),
         base_name, _fwd, lambda i: (_torch_layer(k, n, device, dtype), _x(m, k, dtype, device)))
    case("train fwd+bwd",
         _fwd_bwd, lambda i: (_q8_layer(k, n, device, dtype, inference=False), _x(m, k, dtype, device, True),
                              harness.random_nonzero((m, n), dtype, device)),
         base_name, _fwd_bwd, lambda i: (_torch_layer(k, n, device, dtype), _x(m, k, dtype, device, True),
                                         harness.random_nonzero((m, n), dtype, device)))
    case("train int8 bwd",
         _fwd_bwd, lambda i: (_q8_layer(k, n, device, dtype, inference=False, int8_backward=True),
                              _x(m, k, dtype, device, True), harness.random_nonzero((m, n), dtype, device)),
         base_name, _fwd_bwd, lambda i: (_torch_layer(k, n, device, dtype), _x(m, k, dtype, device, True),
                                         harness.random_nonzero((m, n), dtype, device)))

    # Raw int8 GEMM on the same kind of int8 operands; ours also dequantizes (alpha) into the output dtype.
    alpha = torch.tensor(1e-4, dtype=torch.float32, device=device)

    def s8(i):
        return (harness.random_nonzero((m, k), torch.int8, device), harness.random_nonzero((n, k), torch.int8, device))

    case("linear_s8", lambda qx, qw: lowbit.ops.linear_s8(qx, qw, alpha, dtype), s8,
         "torch._int_mm", lambda qx, qw: torch._int_mm(qx, qw.t()), s8, count_gops=True)
    if device == "cuda":
        # The foundation's bar for the CUDA kernel: faster than a plain fp32 GEMM (torch's default
        # fp32 matmul, TF32 off).
        def f32(i):
            return (harness.random_nonzero((m, k), torch.float32, device),
                    harness.random_nonzero((n, k), torch.float32, device))

        torch.backends.cuda.matmul.allow_tf32 = False
        case("linear_s8 vs fp32", lambda qx, qw: lowbit.ops.linear_s8(qx, qw, alpha, torch.float32), s8,
             "F.linear fp32", lambda x, w: torch.nn.functional.linear(x, w), f32, count_gops=True)
    return rows


HEADERS = ["device", "M", "KxN", "case", "lowbit us", "baseline", "baseline us", "baseline/lowbit", "lowbit GOP/s",
           "% int8 peak"]


# ---------------------------------------------------------------------------------------------- memory


def saved_for_backward(layer, x):
    """Storages that a training forward keeps for backward, by kind: the caller's input (shared, no new
    memory), the module's parameters and buffers (shared), or new (allocated by the forward and kept
    alive until backward: the memory a training step pays for this layer)."""
    params = {p.untyped_storage().data_ptr() for p in list(layer.parameters()) + list(layer.buffers())}
    x_ptr = x.untyped_storage().data_ptr()
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if st.nbytes() and ptr not in seen:
            kind = "input" if ptr == x_ptr else "parameter" if ptr in params else "new"
            seen[ptr] = (kind, t.dtype, st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return list(seen.values())


def memory_report(m, k, n, device, dtype):
    x = _x(m, k, dtype, device, grad=True)
    ours = _q8_layer(k, n, device, dtype, inference=False)
    base = _torch_layer(k, n, device, dtype)
    rows = []
    for name, layer in (("Q8Linear (train)", ours), (f"nn.Linear {_short(dtype)}", base)):
        saved = saved_for_backward(layer, x)
        new = [s for s in saved if s[0] == "new"]
        rows.append([name, len(saved),
                     sum(b for kind, _, b in saved if kind == "input"),
                     sum(b for kind, _, b in saved if kind == "parameter"),
                     sum(b for _, dt, b in new if dt == torch.int8),
                     sum(b for _, dt, b in new if dt.is_floating_point),
                     sum(b for *_, b in new)])
    saved_table = harness.markdown_table(
        ["layer", "saved storages", "caller's input bytes (shared)", "parameter + buffer bytes (shared)", "new int8 bytes",
         "new float bytes", "new bytes total"], rows)

    inf = _q8_layer(k, n, device, dtype, inference=True)
    f32 = torch.nn.Linear(k, n, device=device)
    bf16 = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    ref = harness.nbytes(f32)
    inf_rows = [["Q8Linear, qweight_only", harness.nbytes(inf), harness.nbytes(inf) / ref],
                ["nn.Linear fp32 (with bias)", ref, 1.0],
                ["nn.Linear bf16 (with bias)", harness.nbytes(bf16), harness.nbytes(bf16) / ref]]
    inf_table = harness.markdown_table(["inference layer", "parameter + buffer bytes", "vs fp32"], inf_rows)
    return (f"Memory, {device}, M={m}, K={k}, N={n}, activations {_short(dtype)}:\n\n"
            f"(a) saved for backward by one training forward (unique storages):\n\n{saved_table}\n\n"
            f"(b) inference state:\n\n{inf_table}\n")


def _train_layers(k, n, dtype):
    """(name, constructor) of the three layers the memory reports compare."""
    return (("Q8Linear (fp32 master weight)", lambda: _q8_layer(k, n, "cuda", dtype, inference=False)),
            ("Q8Linear (bf16 weight)", lambda: _q8_layer(k, n, "cuda", dtype, inference=False).to(torch.bfloat16)),
            (f"nn.Linear {_short(dtype)}", lambda: _torch_layer(k, n, "cuda", dtype)))


def _warm_then_reset(module, x, g):
    """One warm-up step (workspaces, the activation scales), gradients cleared, the cache emptied and the
    peak counter reset: returns the bytes allocated before the measured step."""
    _fwd_bwd(module, x, g)
    for p in module.parameters():
        p.grad = None
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return before


def peak_memory_report(shapes, dtype):
    """CUDA only: peak memory of one training forward + backward (x requires grad, every parameter
    gradient, as in a hidden layer), for Q8Linear with its fp32 master weight, Q8Linear with the whole
    layer in bf16, and nn.Linear in bf16. 'step peak' = max_memory_allocated during the step minus what
    was allocated before it (parameters, x, the upstream gradient): activations kept for backward,
    gradients and temporaries. 'total peak' adds the resident bytes."""
    rows = []
    for m, k, n in shapes:
        for name, make in _train_layers(k, n, dtype):
            layer = make()
            x = _x(m, k, dtype, "cuda", grad=True)
            g = harness.random_nonzero((m, n), dtype, "cuda")
            before = _warm_then_reset(layer, x, g)
            _fwd_bwd(layer, x, g)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            rows.append([m, f"{k}x{n}", name, f"{(peak - before) / 2**20:.1f}", f"{peak / 2**20:.1f}"])
            del layer, x, g
            torch.cuda.empty_cache()
    return harness.markdown_table(["M", "KxN", "layer", "step peak MiB", "total peak MiB"], rows, "rllrr")


def stack_peak_memory_report(m, k, depth, dtype):
    """CUDA only: the same for `depth` square layers in a row (each layer's input is the previous one's
    output, so every layer's saved tensors wait for the backward at once, as in a network). 'saved MiB'
    = allocated after the forward minus before it: what the stack keeps for its backward (its
    intermediate outputs, whatever the layers save of their own)."""
    rows = []
    for name, make in _train_layers(k, k, dtype):
        net = torch.nn.Sequential(*[make() for _ in range(depth)])
        x = _x(m, k, dtype, "cuda", grad=True)
        g = harness.random_nonzero((m, k), dtype, "cuda")
        before = _warm_then_reset(net, x, g)
        y = net(x)
        saved = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        y.backward(g)
        del y
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        rows.append([m, f"{depth} x {k}x{k}", name, f"{saved / 2**20:.1f}", f"{(peak - before) / 2**20:.1f}",
                     f"{peak / 2**20:.1f}"])
        del net, x, g
        torch.cuda.empty_cache()
    return harness.markdown_table(["M", "layers", "layer", "saved MiB (besides y)", "step peak MiB",
                                   "total peak MiB"], rows, "rllrrr")


# ---------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all: the CPU, and the GPU when there is one (default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per case (default: 20 CPU, 100 GPU)")
    ap.add_argument("--macs-per-cycle", type=int, default=128,
                    help="int8 MAC/cycle/core for the CPU peak (default 128: two 512-bit VNNI per cycle)")
    ap.add_argument("--markdown-out", type=Path, help="append the tables to this Markdown file")
    args = ap.parse_args()

    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            devices.append("cuda")
        elif args.device == "cuda":
            sys.exit("q8_linear.py: --device cuda, but torch sees no GPU")
        else:
            print("q8_linear.py: no GPU, CPU part only", file=sys.stderr)

    for device in devices:
        env = harness.environment(device)
        torch.manual_seed(0)
        if device == "cpu":
            peak, words = harness.cpu_int8_peak(args.threads, args.macs_per_cycle)
            shapes, dtype = CPU_SHAPES, torch.float32
            note = f"CPU, {args.threads} threads; {words} (an assumption: check the core's VNNI throughput)."
        else:
            peak, shapes, dtype = None, GPU_SHAPES, torch.bfloat16
            note = "GPU: CUDA events, 100 us spin before each call, weights rotated past 160 MB."
        rows, notes = [], []
        for m, k, n in shapes:
            rows += bench_shape(m, k, n, device, dtype, args, peak, notes)
        m, k, n = shapes[0] if device == "cpu" else (2048, 4096, 4096)
        try:
            memory = memory_report(m, k, n, device, dtype)
        except (RuntimeError, NotImplementedError) as exc:
            memory = f"Memory, {device}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}\n"
        if device == "cuda":
            try:
                memory += ("\n(c) peak memory of one training forward + backward:\n\n"
                           + peak_memory_report([(8192, 4096, 4096), (8192, 8192, 8192)], dtype) + "\n"
                           + "\n(d) the same for four 4096 x 4096 layers in a row:\n\n"
                           + stack_peak_memory_report(8192, 4096, 4, dtype) + "\n")
            except (RuntimeError, NotImplementedError) as exc:
                memory += f"\n(c) peak memory: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}\n"
        failed = "".join(f"- failed: {x}\n" for x in notes) + ("\n" if notes else "")
        text = (f"### Q8Linear vs nn.Linear, {device}\n\n{harness.environment_markdown(env)}\n\n{note}\n"
                f"Times are medians in microseconds; * marks a host-bound time (the GPU waited on the host).\n\n{harness.markdown_table(HEADERS, rows, 'lrllrlrrrr')}\n\n"
                f"{failed}{memory}")
        print(text, flush=True)
        if args.markdown_out:  # each device's section as soon as it is done
            with open(args.markdown_out, "a") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()

"""Weight-only layers (MBWQLinear / MPQLinear) against torch F.linear on the same weights, dense, in the
same run.

    python3 bench/wq_linear.py [--device cpu|cuda] [--quick] [--ms M,M,...] [--markdown-out FILE]

GPU (issue targets, H100, fp16 baseline): shapes (K, N) of Llama-2-7B and -70B, M = 1, 16, 32, 64, 256;
4-bit group 128, 2-bit group 128, a 2/4-bit channel-mix (50/50) and GPTQ 4-bit with act-order. Ratio =
fp16 time / lowbit time (> 1: lowbit faster). "%BW" = bytes the kernel must read (packed weight, scales,
zeros, x) / time, over the copy bandwidth measured in the same run (read + write bytes of a 1 GiB
device-to-device copy / time). CPU: M = 1, K = N = 4096 against fp32 F.linear, bandwidth against a
256 MiB memory copy. Method: bench/harness.py (rotating copies past the L2 / LLC).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lowbit  # noqa: E402
from lowbit.nn import MBWQLinear, MPQLinear  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
MS = [1, 16, 32, 64, 256]


def _rand_words(rows, n, dev):
    return torch.randint(-2**31, 2**31 - 1, (rows, n), dtype=torch.int32, device=dev)


def layer_mix(K, N, b, gs, dtype, dev):
    layer = MBWQLinear(K, N, w_bit=b, group_size=gs, use_mbw=False, dtype=dtype, device=dev)
    G = math.ceil(K / gs)
    layer.qweight.copy_(_rand_words(layer.qweight.shape[0], N, dev))
    layer.set_scales(torch.rand(G, N, device=dev) * 0.01 + 1e-3)
    layer.set_zeros(torch.randn(G, N, device=dev) * 0.01)
    layer.prepare_params()
    return layer


def channel_mix(K, N, dtype, dev):
    """4-bit on the first half of the channels, 2-bit on the rest, groups of 128 (3 bits per weight)."""
    k4 = K // 2 // 128 * 128
    gs = 128
    q_groups, start = [], 0
    for b, rows in ((4, k4), (2, K - k4)):
        for g0 in range(0, rows, gs):
            q_groups += [b, start]
            start += math.ceil(min(gs, rows - g0) / 32) * b
    G = len(q_groups) // 2
    layer = MBWQLinear(K, N, use_mbw=True, groups=G, rows_packed=start, dtype=dtype, device=dev)
    layer.qweight.copy_(_rand_words(start, N, dev))
    layer.q_groups.copy_(torch.tensor(q_groups, dtype=torch.int16))
    layer.q_perm.copy_(torch.randperm(K).to(torch.int16))
    layer.set_scales(torch.rand(G, N, device=dev) * 0.01 + 1e-3)
    layer.set_zeros(torch.randn(G, N, device=dev) * 0.01)
    layer.prepare_params()
    return layer


def gptq_act_order(K, N, gs, dtype, dev):
    layer = MPQLinear(K, N, w_bit=4, group_size=gs, use_gba_quant=False, dtype=dtype, device=dev)
    layer.qweight.copy_(_rand_words(layer.qweight.shape[0], N, dev))
    layer.qzeros.copy_(_rand_words(*layer.qzeros.shape, dev) & 0x77777777)
    layer.scales.copy_(torch.rand_like(layer.scales) * 0.01 + 1e-3)
    layer.g_idx.copy_(layer.g_idx[torch.randperm(K, device=dev)])
    layer.prepare_params()
    return layer


def weight_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in layer.buffers())


def copy_bandwidth(dev) -> float:
    """Bytes per second of a large copy (read + write)."""
    n = (2**30 if dev == "cuda" else 2**28) // 4
    a = torch.empty(n, dtype=torch.float32, device=dev).fill_(1.0)
    b = torch.empty_like(a)
    t = harness.time_fn(lambda a, b: b.copy_(a), [(a, b)], dev, iters=20)
    del a, b
    return 2 * n * 4 / (t.median_us * 1e-6)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="GPU: only the first two shapes and M = 1, 16")
    ap.add_argument("--ms", type=lambda v: [int(m) for m in v.split(",")],
                    help="GPU: these M instead of 1,16,32,64,256 (comma-separated)")
    ap.add_argument("--markdown-out", type=Path)
    args = ap.parse_args()
    dev = args.device
    gpu = dev == "cuda"
    dt = torch.float16 if gpu else torch.float32
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s", file=sys.stderr, flush=True)
    rows = []
    shapes = SHAPES if gpu else [(4096, 4096)]
    ms = MS if gpu else [1]
    if args.quick:
        shapes, ms = shapes[:2], [1, 16]
    if args.ms and gpu:
        ms = args.ms
    kinds = [("4-bit g128", lambda K, N: layer_mix(K, N, 4, 128, dt, dev)),
             ("2-bit g128", lambda K, N: layer_mix(K, N, 2, 128, dt, dev))]
    if gpu:
        kinds += [("2/4 mix g128", lambda K, N: channel_mix(K, N, dt, dev)),
                  ("GPTQ 4-bit act-order", lambda K, N: gptq_act_order(K, N, 128, dt, dev))]
    for K, N in shapes:
        for kind, make in kinds:
            layers = [make(K, N)]
            wb = weight_bytes(layers[0])
            layers += [make(K, N) for _ in range(harness.copies_needed(wb, dev) - 1)]
            dense = [torch.randn(N, K, dtype=dt, device=dev) for _ in range(harness.copies_needed(N * K * 2, dev))]
            for M in ms:
                x = harness.random_nonzero((M, K), dt, dev)
                with torch.no_grad():
                    c = harness.compare(lambda layer, x: layer(x), [(layer, x) for layer in layers],
                                        lambda w, x: torch.nn.functional.linear(x, w), [(w, x) for w in dense], dev)
                read = wb + x.numel() * x.element_size()
                pct = read / (c.ours.median_us * 1e-6) / bw * 100
                rows.append([dev, f"K={K} N={N}", kind, M, harness.fmt(c.ours.median_us),
                             harness.fmt(c.baseline.median_us), f"{c.ratio:.2f}", f"{pct:.0f}%"])
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
            del layers, dense
            if gpu:
                torch.cuda.empty_cache()
    env = harness.environment(dev)
    base = "F.linear fp16" if gpu else "F.linear fp32"
    table = harness.markdown_table(["device", "shape", "weights", "M", "lowbit us", f"{base} us",
                                    "ratio", "%BW"], rows)
    text = (f"### Weight-only layers, {dev} (copy bandwidth {bw / 1e9:.0f} GB/s)\n\n"
            f"{harness.environment_markdown(env)}\n\n{table}\n")
    harness.emit(text, args.markdown_out)


if __name__ == "__main__":
    main()

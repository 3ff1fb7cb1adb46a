"""Where a weight-only layer's forward spends device time (torch.profiler), for tuning the wq kernels.

    PYTHONPATH=python python3 scripts/wq_profile.py [K N] [M ...] [--bits B | --mix]  (CUDA, fp16)

Builds an MBWQLinear layer-mix layer (B-bit, group 128, default 4) -- or with --mix the 2/4-bit
channel-mix layer of bench/wq_linear.py (q_perm, groups of 128) -- with random words, runs 20 forwards
per M (default M = 1 16) on several copies of the weights (so that they come from DRAM, not L2), and
prints the median time of one forward (CUDA events behind a spin kernel; and inside a CUDA graph of
back-to-back forwards), the average device time of every kernel and the bandwidth on the packed bytes.
LOWBIT_WQ_FUSED_MAX_ROWS picks the fused kernels or the dequantized tiles for a given M."""
import argparse
import math

import torch
from torch.profiler import ProfilerActivity, profile

import sys
from pathlib import Path

import lowbit  # noqa: F401
from lowbit.nn import MBWQLinear

ap = argparse.ArgumentParser()
ap.add_argument("shape", nargs="*", type=int, default=[4096, 4096, 1, 16])
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--mix", action="store_true", help="the 2/4-bit channel-mix layer of bench/wq_linear.py")
args = ap.parse_args()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import wq_linear  # noqa: E402  (channel_mix)

K, N, *Ms = args.shape
Ms = Ms or [1, 16]
dev = "cuda"


def make():
    if args.mix:
        return wq_linear.channel_mix(K, N, torch.half, dev)
    layer = MBWQLinear(K, N, w_bit=args.bits, group_size=128, use_mbw=False, dtype=torch.half, device=dev)
    G = math.ceil(K / 128)
    layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, dtype=torch.int32, device=dev))
    layer.set_scales(torch.rand(G, N, device=dev) * 0.01 + 1e-3)
    layer.set_zeros(torch.randn(G, N, device=dev) * 0.01)
    layer.prepare_params()
    return layer


packed = K * N * (3 if args.mix else args.bits) / 8 + 2 * 2 * math.ceil(K / 128) * N
copies = max(2, math.ceil(160e6 / packed))
layers = [make() for _ in range(copies)]
for M in Ms:
    x = torch.randn(M, K, device=dev, dtype=torch.half)
    for i in range(3 * copies):
        layers[i % copies](x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(20):
            layers[i % copies](x)
        torch.cuda.synchronize()
    times = []
    for i in range(30):  # CUDA events around one forward behind a spin kernel (as bench/harness.py)
        torch.cuda._sleep(200000)
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        layers[i % copies](x)
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) * 1000)
    times.sort()
    # Inside a CUDA graph (as a decode step runs): 4 * copies forwards captured back to back, replayed.
    calls = 4 * copies
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            layers[i % copies](x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            layers[i % copies](x)
    graph.replay()
    torch.cuda.synchronize()
    gtimes = []
    for _ in range(10):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        graph.replay()
        t1.record()
        torch.cuda.synchronize()
        gtimes.append(t0.elapsed_time(t1) * 1000 / calls)
    gtimes.sort()
    del graph
    kind = "2/4 mix" if args.mix else f"{args.bits}-bit"
    print(f"== K={K} N={N} M={M} {kind} g128: packed {packed / 1e6:.1f} MB, forward {times[15]:.1f} us (median), "
          f"in a CUDA graph {gtimes[5]:.1f} us per forward")
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total):
        if ev.self_device_time_total <= 0:
            continue
        us = ev.self_device_time_total / max(1, ev.count)
        print(f"  {us:8.2f} us x{ev.count:3d}  {ev.key[:90]}"
              + (f"   {packed / us / 1e6:.2f} TB/s" if "wq_tc" in ev.key or "wq_matmul" in ev.key else ""))

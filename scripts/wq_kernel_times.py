"""Per-kernel GPU times of the weight-only layers (torch.profiler / CUPTI), for tuning wq_matmul.cu:
which of the launches of one forward (main kernel per segment, split-K reduce, dequantize, GEMM) costs what.

    PYTHONPATH=python python3 scripts/wq_kernel_times.py [K N M bits ...]
"""
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import wq_linear as bench  # noqa: E402


def main():
    args = [int(a) for a in sys.argv[1:]] or [4096, 4096, 1, 4, 4096, 4096, 16, 4, 8192, 28672, 1, 4,
                                             4096, 4096, 1, 2]
    for K, N, M, b in zip(*[iter(args)] * 4):
        layer = bench.layer_mix(K, N, b, 128, torch.float16, "cuda")
        x = torch.randn(M, K, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            for _ in range(20):
                layer(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(50):
                    layer(x)
                torch.cuda.synchronize()
        print(f"== K={K} N={N} M={M} bits={b}: weight bytes {bench.weight_bytes(layer)}")
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA or getattr(e, "self_device_time_total", 0) > 0:
                t = getattr(e, "self_device_time_total", 0) / max(1, e.count)
                print(f"   {e.key[:90]:90s} x{e.count:4d}  {t:8.2f} us")


if __name__ == "__main__":
    main()

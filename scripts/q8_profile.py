"""Where a Q8Linear training step spends host and device time (torch.profiler), for tuning.

    PYTHONPATH=python python3 scripts/q8_profile.py [M] [K] [N] [int8]   (CUDA; default 16 4096 4096, bf16)

A fourth argument "int8" profiles Q8Linear(int8_backward=True).

Prints the ops sorted by self CPU time, then by self CUDA time, for one forward + backward after warm-up."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import lowbit

M, K, N = (int(a) for a in (sys.argv[1:4] if len(sys.argv) >= 4 else (16, 4096, 4096)))
INT8 = len(sys.argv) >= 5 and sys.argv[4] == "int8"
layer = lowbit.nn.Q8Linear(K, N, device="cuda", int8_backward=INT8)
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)


def step():
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(g)


for _ in range(5):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        step()
    torch.cuda.synchronize()
if "--cuda-only" not in sys.argv:
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
print("ops per step:", sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU) // 10)


def wall_us(fn, iters=200):
    """Mean wall time of fn over iters synced calls (host + device), in microseconds."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


base = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)


def base_step():
    base.weight.grad = None
    x.grad = None
    base(x).backward(g)


print(f"step back to back: Q8Linear {wall_us(step):.1f} us, nn.Linear bf16 {wall_us(base_step):.1f} us")

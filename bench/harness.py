"""Timing harness shared by lowbit's benchmarks (method: docs/DESIGN "Tests and benchmarks", and
reference/anchors_perf.md section 7).

GPU: CUDA events around one call, median of >= 50 timed calls after warm-up; the calls rotate among
several copies of weights and inputs so that one rotation reads more than the L2 (50 MB on H100/H200,
we ask for 160 MB), and a ~100 us spin kernel (torch.cuda._sleep) is enqueued before each timed call so
the GPU never waits on the host: what is timed is the kernels, not Python's launch overhead.
CPU: wall clock around one call with torch.set_num_threads(threads), median after warm-up, rotating
copies past the last-level cache.

Ours and the torch baseline run in the same process (compare()), so both see the same clocks, driver
and allocator. Data is random and never zero (random_nonzero()).
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

GPU_ROTATION_BYTES = 160 * 2**20  # > 3x the 50 MB L2 of H100/H200
GPU_SLEEP_US = 100.0
GPU_MIN_ITERS = 50

# ---------------------------------------------------------------------------------------------- data


def random_nonzero(shape, dtype: torch.dtype, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random tensor without zeros: int8 uniform on [-127, -1] U [1, 127], floats ~ N(0, 1) with exact
    zeros replaced by 1 (zero data lets hardware skip work and hides wrong-operand bugs)."""
    if dtype == torch.int8:
        mag = torch.randint(1, 128, shape, generator=generator, dtype=torch.int16)
        sign = torch.randint(0, 2, shape, generator=generator, dtype=torch.int16) * 2 - 1
        return (mag * sign).to(torch.int8).to(device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    x[x == 0] = 1
    return x.to(device)


def llc_bytes() -> int:
    """Size of the CPU's last-level cache (bytes), 32 MiB when the system does not say."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


def copies_needed(bytes_per_copy: int, device: str, minimum: int = 2, maximum: int = 64) -> int:
    """How many copies of the operands one rotation needs so that it does not fit in the cache: past
    GPU_ROTATION_BYTES on a GPU, past twice the last-level cache on a CPU."""
    target = GPU_ROTATION_BYTES if str(device).startswith("cuda") else 2 * llc_bytes()
    return max(minimum, min(maximum, -(-target // max(1, bytes_per_copy))))


def nbytes(*tensors) -> int:
    """Bytes of the tensors (and of the parameters and buffers of modules) among the arguments."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in list(t.parameters()) + list(t.buffers()))
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-call times of one benchmark, in microseconds."""

    samples_us: list = field(repr=False)
    copies: int = 1
    host_us: Optional[float] = None  # GPU: host time per enqueued call
    spin_us: float = 0.0  # GPU: the spin enqueued before each call

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    @property
    def n(self) -> int:
        return len(self.samples_us)

    @property
    def host_bound(self) -> bool:
        """GPU: the host needed longer per call than the GPU did (spin included), so the GPU idled
        waiting for launches and the time measures the host (or a sync inside the call)."""
        return self.host_us is not None and self.host_us > self.median_us + self.spin_us

    def __str__(self) -> str:
        flag = f", HOST-BOUND: {self.host_us:.0f} us/call on the host" if self.host_bound else ""
        return f"{self.median_us:.1f} us (median of {self.n}, {self.copies} copies{flag})"


_sleep_cycles_per_us: Optional[float] = None


def _cycles_per_us() -> float:
    """The spin kernel's clock, measured (the SM clock varies with boost; properties may not say it)."""
    global _sleep_cycles_per_us
    if _sleep_cycles_per_us is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 2_000_000
        rates = []
        for _ in range(3):  # the first one also warms the kernel up
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            rates.append(cycles / (start.elapsed_time(end) * 1e3))
        _sleep_cycles_per_us = max(rates[1:])
    return _sleep_cycles_per_us


def time_cuda(fn: Callable, arg_sets: Sequence[tuple], warmup: int = 10, iters: int = 100,
              sleep_us: float = GPU_SLEEP_US) -> Timing:
    """Median GPU time of fn(*args), args cycling through arg_sets (see the module doc)."""
    iters = max(iters, GPU_MIN_ITERS)
    cycles = int(sleep_us * _cycles_per_us())
    for i in range(max(warmup, len(arg_sets))):  # every copy touched once: lazy state, allocator
        fn(*arg_sets[i % len(arg_sets)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    t0 = time.perf_counter()
    for i in range(iters):
        args = arg_sets[i % len(arg_sets)]
        torch.cuda._sleep(cycles)  # keeps the queue ahead of the host: the GPU never idles before fn
        starts[i].record()
        fn(*args)
        ends[i].record()
    host_us = (time.perf_counter() - t0) * 1e6 / iters
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)], len(arg_sets), host_us, sleep_us)


def time_cpu(fn: Callable, arg_sets: Sequence[tuple], threads: Optional[int] = None, warmup: int = 3,
             iters: int = 20) -> Timing:
    """Median wall-clock time of fn(*args) on the CPU with torch.set_num_threads(threads)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for i in range(max(warmup, len(arg_sets))):
            fn(*arg_sets[i % len(arg_sets)])
        samples = []
        for i in range(iters):
            args = arg_sets[i % len(arg_sets)]
            t0 = time.perf_counter()
            fn(*args)
            samples.append((time.perf_counter() - t0) * 1e6)
    finally:
        torch.set_num_threads(previous)
    return Timing(samples, len(arg_sets))


def time_fn(fn: Callable, arg_sets: Sequence[tuple], device: str, threads: Optional[int] = None,
            warmup: Optional[int] = None, iters: Optional[int] = None) -> Timing:
    """time_cuda on a CUDA device, time_cpu otherwise (defaults: 10/100 on GPU, 3/20 on CPU)."""
    if str(device).startswith("cuda"):
        return time_cuda(fn, arg_sets, warmup=10 if warmup is None else warmup, iters=iters or 100)
    return time_cpu(fn, arg_sets, threads=threads, warmup=3 if warmup is None else warmup, iters=iters or 20)


@dataclass
class Comparison:
    ours: Timing
    baseline: Timing

    @property
    def ratio(self) -> float:
        """baseline / ours: > 1 means lowbit is faster."""
        return self.baseline.median_us / self.ours.median_us


def compare(ours: Callable, ours_args: Sequence[tuple], baseline: Callable, baseline_args: Sequence[tuple],
            device: str, **kw) -> Comparison:
    """Times ours and the baseline in this process, same method and settings (kw: see time_fn)."""
    b = time_fn(baseline, baseline_args, device, **kw)
    o = time_fn(ours, ours_args, device, **kw)
    return Comparison(o, b)


# ---------------------------------------------------------------------------------------------- machine


def _cpuinfo() -> dict:
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def cpu_frequency_mhz() -> tuple[float, str]:
    """The CPU clock to assume for a peak: lscpu's max MHz where the system gives it, else the
    current "cpu MHz" of /proc/cpuinfo (on a VM usually the nominal clock). Returns (MHz, source)."""
    mx = _lscpu().get("CPU max MHz")
    if mx:
        return float(mx), "lscpu CPU max MHz"
    cur = _cpuinfo().get("cpu MHz")
    if cur:
        return float(cur), "/proc/cpuinfo cpu MHz"
    return 0.0, "unknown"


def cpu_int8_peak(cores: int, macs_per_cycle: int = 128) -> tuple[float, str]:
    """int8 peak in GOP/s (one MAC = 2 ops) = cores x clock x macs_per_cycle x 2, and the assumption
    in words. 128 MAC/cycle/core = two 512-bit VPDPBUSD per cycle (AVX-512 VNNI on two FMA ports)."""
    mhz, source = cpu_frequency_mhz()
    peak = cores * mhz * 1e6 * macs_per_cycle * 2 / 1e9
    words = (f"int8 peak {peak:.0f} GOP/s = {cores} cores x {mhz:.0f} MHz ({source}) x {macs_per_cycle} int8 "
             f"MAC/cycle x 2 ops/MAC")
    if source.startswith("/proc"):
        words += " (on a VM the nominal clock: boost may be higher)"
    return peak, words


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "none (no commit yet)"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: str = "cpu") -> dict:
    """What a published figure must carry: device, software versions, CPU, date, commit."""
    cpu = _cpuinfo()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "cpu": cpu.get("model name", platform.processor() or "unknown"),
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    else:
        env["gpu"] = "none" if not torch.cuda.is_available() else f"{torch.cuda.get_device_name(0)} (not used)"
    try:
        import lowbit

        env["lowbit"] = getattr(lowbit, "__version__", "?")
    except ImportError:
        env["lowbit"] = "not importable"
    return env


def environment_markdown(env: dict) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in env.items())


# ---------------------------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """Markdown table; align is one letter per column, 'l' or 'r' (default: numbers right)."""
    cells = [[fmt(c) for c in row] for row in rows]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def fmt(x) -> str:
    """A table cell: n/a for None/NaN, numbers to about 3 significant digits (integers above 1000)."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if x != x:
            return "n/a"
        return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def us_to_gops(m: int, n: int, k: int, us: float) -> float:
    """GOP/s of an (m x k) . (k x n) product, one multiply-add counted as 2 operations."""
    return 2.0 * m * n * k / (us * 1e3)



def emit(text: str, markdown_out=None) -> None:
    """Prints a benchmark's Markdown report and appends it to markdown_out when given."""
    print(text)
    if markdown_out:
        with open(markdown_out, "a") as f:
            f.write(text + "\n")

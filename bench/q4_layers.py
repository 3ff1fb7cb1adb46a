"""Q4Linear, Q4Conv2d and Q4MatMul against torch baselines, inference forward including quantization.

    python3 bench/q4_layers.py [--device cpu|cuda] [--markdown-out FILE]

Issue targets (H100, same run): Q4Linear >= 1.5x bf16 nn.Linear at M = 8192, K = N = 8192 and not slower
than Q8Linear; Q4Conv2d >= 1.3x cuDNN fp16 channels_last on ResNet-50 3x3 layers at batch 64; Q4MatMul
>= 1.0x bf16 torch.matmul at batch 32, 12 heads, sequence 1024, head dim 128. Method: bench/harness.py.
Ratio = baseline / lowbit (> 1: lowbit faster). On the CPU the shapes shrink and the baseline is fp32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lowbit  # noqa: E402


def _inference(layer):
    with torch.no_grad():
        if hasattr(layer, "scale_a"):
            layer.scale_a.fill_(0.1)
        layer.prepare_params()
        layer.generate_quantized_weight(qweight_only=True)
    return layer.eval()


def _time(fn, make, device):
    sets = [make(0)]
    sets += [make(i) for i in range(1, harness.copies_needed(harness.nbytes(*sets[0]), device))]
    try:
        with torch.no_grad():
            return harness.time_fn(fn, sets, device)
    except (RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--markdown-out", type=Path)
    args = ap.parse_args()
    dev = args.device
    gpu = dev == "cuda"
    act = torch.bfloat16 if gpu else torch.float32
    conv_act = torch.float16 if gpu else torch.float32
    rows = []

    def row(case, ours_name, ours, base_name, base):
        cells = [harness.fmt(t.median_us) if not isinstance(t, str) else t for t in (ours, base)]
        ratio = (f"{base.median_us / ours.median_us:.2f}" if not isinstance(ours, str) and not isinstance(base, str)
                 else None)
        rows.append([dev, case, ours_name, cells[0], base_name, cells[1], ratio])
        print(f"  {case}: {ours_name} {ours} | {base_name} {base}", file=sys.stderr, flush=True)

    # Linear: the target shape, then fewer rows (on the GPU, M <= 2048 runs the kernel that unpacks the int4
    # weights in its registers; M = 8192 unpacks them first).
    kn = 8192 if gpu else 2048
    call = lambda layer, t: layer(t)  # noqa: E731
    for m in ((8192, 2048, 256, 16) if gpu else (512,)):
        x = lambda i, m=m: harness.random_nonzero((m, kn), act, dev)  # noqa: E731
        q4 = lambda i, x=x: (_inference(lowbit.nn.Q4Linear(kn, kn, device=dev)), x(i))  # noqa: E731
        q8 = lambda i, x=x: (_inference(lowbit.nn.Q8Linear(kn, kn, device=dev)), x(i))  # noqa: E731
        lin = lambda i, x=x: (torch.nn.Linear(kn, kn, bias=False, device=dev, dtype=act), x(i))  # noqa: E731
        case = f"linear M={m} K=N={kn}"
        t4, t8, tb = _time(call, q4, dev), _time(call, q8, dev), _time(call, lin, dev)
        row(case, "Q4Linear", t4, f"nn.Linear {act}".replace("torch.", ""), tb)
        row(case, "Q4Linear", t4, "Q8Linear", t8)

    # Conv: ResNet-50 3x3 layers (channels, spatial) at batch 64 on the GPU, batch 4 on the CPU
    batch = 64 if gpu else 4
    for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
        def img(i, c=c, hw=hw):
            return harness.random_nonzero((batch, c, hw, hw), conv_act, dev).to(memory_format=torch.channels_last)
        q = lambda i, c=c, hw=hw: (_inference(lowbit.nn.Q4Conv2d(c, c, 3, padding=1, device=dev)), img(i))  # noqa: E731
        base = lambda i, c=c, hw=hw: (torch.nn.Conv2d(c, c, 3, padding=1, bias=False, device=dev, dtype=conv_act)  # noqa: E731
                                      .to(memory_format=torch.channels_last), img(i))
        row(f"conv3x3 N={batch} C={c} {hw}x{hw}", "Q4Conv2d", _time(call, q, dev),
            f"nn.Conv2d {conv_act} channels_last".replace("torch.", ""), _time(call, base, dev))

    # MatMul: attention scores
    b, h, s, d = (32, 12, 1024, 128) if gpu else (2, 4, 256, 64)
    qk = lambda i: (harness.random_nonzero((b, h, s, d), act, dev), harness.random_nonzero((b, h, s, d), act, dev))  # noqa: E731
    mm = lowbit.nn.Q4MatMul(dtype=act, device=dev).eval()
    with torch.no_grad():
        mm.x_clip.fill_(0.1)
        mm.y_clip.fill_(0.1)
    row(f"matmul {b}x{h}x{s}x{s}x{d}", "Q4MatMul", _time(lambda q, k: mm(q, k), qk, dev),
        f"torch.matmul {act}".replace("torch.", ""), _time(lambda q, k: torch.matmul(q, k.transpose(-1, -2)), qk, dev))

    env = harness.environment(dev)
    table = harness.markdown_table(["device", "case", "lowbit", "lowbit us", "baseline", "baseline us",
                                    "baseline/lowbit"], rows)
    text = f"### Q4 layers, {dev}\n\n{harness.environment_markdown(env)}\n\n{table}\n"
    harness.emit(text, args.markdown_out)


if __name__ == "__main__":
    main()

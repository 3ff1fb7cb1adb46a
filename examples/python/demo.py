"""lowbit demo: an MLP whose hidden layers are 8-bit (lowbit.nn.Q8Linear) trained on Fashion-MNIST next
to its fp32 twin (torch.nn.Linear everywhere); test accuracy, training time and weight bytes compared.

Both models start from the same weights and see the same batches in the same order, so the difference
between those two rows is the quantization alone. A third model, a small CNN computing with 4-bit weights and
activations (lowbit.nn.Q4Conv2d, Q4Linear; fp32 head), is trained the same way and shown in the same table;
last, the trained fp32 MLP is compressed weight-only to 4 and 2 bits (lowbit.quantize, no retraining).
Same as examples/cpp/demo_fashion_mnist.cpp.

    python3 examples/python/demo.py [--data DIR] [--epochs N] [--device cpu|cuda] [--batch N] [--lr F]

The dataset is the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, gzipped IDX);
--data DIR or $LOWBIT_FASHION_MNIST point elsewhere.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lowbit

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
EXIT_NO_DATA = 3


# ---------------------------------------------------------------------------------------------- data


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX uint8 file (big-endian header: magic 0x0800 + ndim, then ndim sizes)."""
    raw = gzip.decompress(path.read_bytes())
    header = np.frombuffer(raw, ">u4", count=1 + ndim)
    if header[0] != 0x800 + ndim:
        raise ValueError(f"{path} is not an IDX uint8 file with {ndim} dimension(s)")
    shape = tuple(int(s) for s in header[1:])
    data = np.frombuffer(raw, np.uint8, offset=4 * (1 + ndim))
    if data.size != np.prod(shape):
        raise ValueError(f"{path}: payload of {data.size} bytes, header says {int(np.prod(shape))}")
    return data.reshape(shape[0], -1) if ndim > 1 else data


def load_fashion_mnist(root: Path, device: torch.device):
    """(train_x, train_y, test_x, test_y) on device; images (n, 784) float32 with the training set's
    mean and std taken out (the test set stays unseen), labels int64."""
    def split(name):
        x = torch.from_numpy(read_idx(root / f"{name}-images-idx3-ubyte.gz", 3).astype(np.float32) / 255)
        y = torch.from_numpy(read_idx(root / f"{name}-labels-idx1-ubyte.gz", 1).astype(np.int64))
        if x.shape[0] != y.shape[0] or x.shape[1] != 784:
            raise ValueError(f"images and labels of {name} in {root} do not match")
        return x, y

    train_x, train_y = split("train")
    test_x, test_y = split("t10k")
    mean, std = train_x.mean(), train_x.std()
    return [t.to(device) for t in ((train_x - mean) / std, train_y, (test_x - mean) / std, test_y)]


# ---------------------------------------------------------------------------------------------- models


def mlp(hidden) -> nn.Sequential:
    """784 -> 512 -> 256 -> 10, ReLU between; `hidden(k, n)` makes the hidden layers, the head is fp32."""
    return nn.Sequential(hidden(784, 512), nn.ReLU(), hidden(512, 256), nn.ReLU(), nn.Linear(256, 10))


C1, C2, CNN_HIDDEN = 16, 32, 128


def q4_cnn() -> nn.Sequential:
    """conv3x3(1->C1, pad 1) -> ReLU -> maxpool 2 -> conv3x3(C1->C2, pad 1) -> ReLU -> maxpool 2 -> flatten ->
    Q4Linear(C2*7*7 -> 128) -> ReLU -> fp32 Linear(128 -> 10). The first conv sees the normalised image: every
    conv and hidden layer is 4-bit, only the 10-way head stays fp32 (as in the MLPs)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        lowbit.nn.Q4Conv2d(1, C1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        lowbit.nn.Q4Conv2d(C1, C2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), lowbit.nn.Q4Linear(C2 * 7 * 7, CNN_HIDDEN), nn.ReLU(), nn.Linear(CNN_HIDDEN, 10))


def make_models(device, seed):
    torch.manual_seed(seed)
    fp32 = mlp(nn.Linear).to(device)
    q8 = mlp(lowbit.nn.Q8Linear).to(device)
    # The same with the int8 backward (SwitchBack: input gradients on the int8 GEMM), to show its accuracy.
    q8i = mlp(lambda k, n: lowbit.nn.Q8Linear(k, n, int8_backward=True)).to(device)
    # Same starting point: Q8Linear has no output bias (its bias_a shifts the input), so the hidden weights
    # and the whole head are copied; the fp32 hidden biases have no counterpart.
    with torch.no_grad():
        for model in (q8, q8i):
            for i in (0, 2):
                model[i].weight.copy_(fp32[i].weight)
            model[4].load_state_dict(fp32[4].state_dict())
    cnn = q4_cnn().to(device)  # its own initial weights: no fp32 twin to copy
    return q8, q8i, fp32, cnn


def weight_bytes(model: nn.Sequential) -> int:
    """The weight tensors as stored: int8 codes (Q8) or int4 pairs (Q4) for a lowbit layer that holds them."""
    total = 0
    for layer in model:
        if not hasattr(layer, "weight"):
            continue
        w = getattr(layer, "qweight", None)
        w = w if w is not None else layer.weight
        total += w.numel() * w.element_size()
    return total


def weight_only_bytes(model: nn.Sequential) -> int:
    """Weight-only layers: packed words plus their scales and zeros; other layers as weight_bytes."""
    total = 0
    for layer in model:
        if isinstance(layer, lowbit.nn.MBWQLinear):
            total += sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.zeros))
        elif hasattr(layer, "weight"):
            total += layer.weight.numel() * layer.weight.element_size()
    return total


def state_bytes(model: nn.Module) -> int:
    """Every parameter and buffer (biases, scales included)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ---------------------------------------------------------------------------------------------- progress


class SimpleBar:
    """Minimal stand-in for tqdm: redrawn in place on a terminal, one line at the end otherwise."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, n):
        self.n += n
        if self.tty and time.perf_counter() - self.last > 0.1:
            self._draw("")

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s

    def close(self):
        self._draw("\n")

    def _draw(self, end):
        self.last = time.perf_counter()
        rate = self.n / max(self.last - self.start, 1e-9)
        fill = 30 * self.n // max(self.total, 1)
        sys.stderr.write(f"{chr(13) if self.tty else ''}{self.desc:<22} [{'#' * fill}{'.' * (30 - fill)}] "
                         f"{100 * self.n // max(self.total, 1):3d}% {self.n:6d}/{self.total}  {self.postfix}  "
                         f"{rate:7.0f} items/s{end}")
        sys.stderr.flush()


def progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="items", unit_scale=True, file=sys.stderr, leave=True)
    except ImportError:
        return SimpleBar(total, desc)


# ---------------------------------------------------------------------------------------------- train / test


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, x, y, args, name, device) -> float:
    """Adam on cross-entropy, batches from a permutation seeded by args.seed (identical for every model).
    Returns the training seconds (data already on the device)."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    gen = torch.Generator().manual_seed(args.seed)
    n = x.shape[0]
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        bar = progress(n, f"{name} epoch {epoch + 1}/{args.epochs}")
        # The running loss stays on the device: reading it syncs, so only now and then.
        loss_sum, steps, last_read = torch.zeros((), device=device), 0, 0.0
        for i in range(0, n, args.batch):
            idx = perm[i:i + args.batch]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            steps += 1
            if time.perf_counter() - last_read > 0.5:
                last_read = time.perf_counter()
                bar.set_postfix_str(f"loss {loss_sum.item() / steps:.4f}", refresh=False)
            bar.update(idx.numel())
        bar.set_postfix_str(f"loss {loss_sum.item() / steps:.4f}")
        bar.close()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                      for i in range(0, x.shape[0], 1000))
    return 100.0 * correct / x.shape[0]


def timed_accuracy(model, x, y, device):
    """Accuracy and the milliseconds of that test pass (10000 images, batches of 1000)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    acc = accuracy(model, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return acc, 1e3 * (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("LOWBIT_FASHION_MNIST") or DEFAULT_DATA))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.epochs < 1 or args.batch < 1 or not args.lr > 0:
        ap.error("--epochs and --batch must be >= 1 and --lr > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)

    try:
        train_x, train_y, test_x, test_y = load_fashion_mnist(args.data, device)
    except (OSError, ValueError, EOFError) as exc:
        print(f"demo.py: Fashion-MNIST not found or unreadable: {exc}\n"
              "  install it with `apt-get install dataset-fashion-mnist`, or point --data DIR or\n"
              "  LOWBIT_FASHION_MNIST at a directory with the four *-ubyte.gz files.", file=sys.stderr)
        return EXIT_NO_DATA
    print(f"Fashion-MNIST: {train_x.shape[0]} train / {test_x.shape[0]} test images from {args.data}; "
          f"device {device}, {torch.get_num_threads()} CPU threads")
    print(f"MLP 784-512-256-10; CNN conv3x3 1-{C1}-{C2} + maxpool, {C2 * 7 * 7}-{CNN_HIDDEN}-10; {args.epochs} "
          f"epoch(s), batch {args.batch}, Adam lr {args.lr:g}, seed {args.seed}", flush=True)

    q8, q8i, fp32, cnn = make_models(device, args.seed)
    q8_secs = train(q8, train_x, train_y, args, "Q8 (lowbit)", device)
    q8i_secs = train(q8i, train_x, train_y, args, "Q8 int8 bwd (lowbit)", device)
    fp32_secs = train(fp32, train_x, train_y, args, "fp32 (torch)", device)
    cnn_secs = train(cnn, train_x, train_y, args, "Q4 CNN (lowbit)", device)

    # Inference form of the lowbit models: codes only, the float weights released.
    for layer in list(q8) + list(q8i) + list(cnn):
        if isinstance(layer, (lowbit.nn.Q8Linear, lowbit.nn.Q4Linear, lowbit.nn.Q4Conv2d)):
            layer.generate_quantized_weight(qweight_only=True)
    # Weight-only compression of the trained fp32 MLP (hidden layers, RTN, groups of 32; head kept), no retraining.
    wo = {b: lowbit.quantize(fp32, bits=b, group_size=32, exclude=["4"], progress=False)[0] for b in (4, 2)}
    accuracy(fp32, test_x, test_y)  # warm-up
    (q8_acc, q8_ms), (fp32_acc, fp32_ms) = timed_accuracy(q8, test_x, test_y, device), \
        timed_accuracy(fp32, test_x, test_y, device)
    q8i_acc, q8i_ms = timed_accuracy(q8i, test_x, test_y, device)
    cnn_acc, cnn_ms = timed_accuracy(cnn, test_x, test_y, device)
    wo_res = {b: timed_accuracy(m, test_x, test_y, device) for b, m in wo.items()}

    print("\n| model | test accuracy % | train s | test pass ms | weight bytes | state bytes |\n"
          "|---|---:|---:|---:|---:|---:|")
    print(f"| Q8Linear MLP (int8 hidden, QAT) | {q8_acc:.2f} | {q8_secs:.1f} | {q8_ms:.1f} | {weight_bytes(q8)} | "
          f"{state_bytes(q8)} |")
    print(f"| Q8Linear MLP, int8 backward (SwitchBack) | {q8i_acc:.2f} | {q8i_secs:.1f} | {q8i_ms:.1f} | "
          f"{weight_bytes(q8i)} | {state_bytes(q8i)} |")
    print(f"| fp32 MLP (torch Linear) | {fp32_acc:.2f} | {fp32_secs:.1f} | {fp32_ms:.1f} | {weight_bytes(fp32)} | "
          f"{state_bytes(fp32)} |")
    print(f"| Q4 CNN (int4 conv + hidden, QAT) | {cnn_acc:.2f} | {cnn_secs:.1f} | {cnn_ms:.1f} | "
          f"{weight_bytes(cnn)} | {state_bytes(cnn)} |")
    for b, (acc, ms) in wo_res.items():
        print(f"| fp32 MLP, hidden weight-only {b}-bit g32 (RTN) | {acc:.2f} | - | {ms:.1f} | "
              f"{weight_only_bytes(wo[b])} | - |")
    print("\nweight bytes: the weight tensors as stored after generate_quantized_weight(qweight_only=True):\n"
          "Q8 hidden layers 1 byte per weight; Q4 layers int4 pairs, half a byte per weight (the 1-channel\n"
          "first conv: a byte, half of each pair is padding); heads fp32; weight-only rows: packed words plus\n"
          "fp32 scales and zeros per group of 32 (the trained fp32 MLP compressed after training, no\n"
          "retraining); they pay off at a few rows per call (LLM decode), while a 1000-row batch dequantizes each\n"
          "layer per call. state bytes: all parameters and buffers. test pass: 10000 images, batches of 1000.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

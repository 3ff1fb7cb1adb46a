"""One weight-only forward per call, for profilers (ncu / nsys): K N M bits [iters]."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import wq_linear as bench  # noqa: E402

K, N, M, b = (int(a) for a in sys.argv[1:5])
iters = int(sys.argv[5]) if len(sys.argv) > 5 else 5
layer = bench.layer_mix(K, N, b, 128, torch.float16, "cuda")
x = torch.randn(M, K, dtype=torch.float16, device="cuda")
with torch.no_grad():
    for _ in range(iters):
        layer(x)
torch.cuda.synchronize()

"""End-to-end greedy decode of a Llama-2-7B-shaped decoder: fp16 nn.Linear against MBWQLinear 4-bit and a
2/4-bit mix, tokens/s at batch 1 and 16 with CUDA graphs, and the GPU memory of the linear layers.

    PYTHONPATH=python python3 bench/llm_decode.py [--device cuda|cpu] [--preset 7b|tiny] [--layers N]
        [--tokens 128] [--prompt 16] [--batches 1,16] [--variants fp16,mbwq4,mix24[,fp16+fuse,...]] [--repeats 3]
        [--check | --no-check] [--markdown-out FILE]

    CPU smoke run: PYTHONPATH=python python3 bench/llm_decode.py --device cpu --preset tiny --tokens 8 --batches 1,2

Issue targets (H100, preset 7b): mbwq4 decode >= 2.5x the tokens/s of fp16 at batch 1; GPU memory allocated
for the linear layers <= 1.1x the bytes of their packed tensors.

Model. A minimal Llama decoder in plain PyTorch (no transformers): token embedding, N layers of
[RMSNorm -> attention (q/k/v/o projections, rotary embeddings in the Llama "rotate half" form, a static KV
cache of fixed length) -> residual, RMSNorm -> SiLU-gated MLP (gate/up/down) -> residual], final RMSNorm and
an lm_head that stays dense (never quantized). Presets: 7b = hidden 4096, intermediate 11008, 32 layers, 32
heads, vocab 32000 (Llama-2-7B); tiny = hidden 256, intermediate 688, 2 layers, 4 heads, vocab 1000.
--layers cuts the depth and keeps the shapes. The parts between the projections use PyTorch's fused
kernels, as an inference runtime would (a step of a 7B model is ~15 of them per layer, not ~45):
F.rms_norm, rotary embeddings of q and k together in the model dtype (x * cos + roll(x, half) * sin with
the sign of rotate-half folded into the sin table, as Hugging Face computes them in the activation dtype),
F.scaled_dot_product_attention over the whole static cache with a boolean mask of the positions <= the
current one (cache of prompt + tokens = 144 positions at the defaults).

Weights. Random, generated on the device layer by layer (no host copy of the model). Dense weights ~ N(0, 1/K).
The quantized variants are built from random packed words with bench/wq_linear.py's layer_mix() and
channel_mix() (the speed of the kernels does not depend on the values); afterwards their scales and zeros
are overwritten in place so that every dequantized weight is s * (q - mid) with std ~ 1/sqrt(K), which keeps
the activations of a 32-layer model finite in fp16 (values only: no tensor is reallocated). Variants:
  fp16        dense nn.Linear (fp16 on CUDA; fp32 on the CPU, where it is the CPU baseline)
  mbwq4       MBWQLinear layer-mix 4-bit, group 128, every q/k/v/o/gate/up/down projection
  mix24       MBWQLinear channel-mix: in every projection 4-bit on half the input channels and 2-bit on the
              other half, groups of 128, a random input permutation q_perm (3 bits/weight + scales/zeros;
              the "2/4 mix g128" of bench/wq_linear.py)
  mix24layer  MBWQLinear layer-mix: attention q/k/v/o 4-bit, MLP gate/up/down 2-bit, group 128
  mbwq2       MBWQLinear layer-mix 2-bit, group 128, every projection
Any variant with the suffix +fuse (e.g. mbwq4+fuse) runs q/k/v as one projection of 3 * hidden outputs and
gate/up as one of 2 * intermediate, as inference runtimes do (MBWQLinear.fuse / MPQLinear.fuse build such
a layer from the separately loaded ones; here it is built at its fused width directly) -- 4 projections
per layer instead of 7; a fused variant's speed-up is against fp16+fuse when that ran.
One variant is built, measured and freed before the next.

Decode. For each batch B: a random prompt of P tokens (the same for every variant) is prefilled in one
forward (eager), which fills the cache and gives the first new token; then T decode steps each feed one
token per sequence at the position held in a device tensor and write the greedy (argmax) next token back
into the static input buffer, advance the position and record the token, all on the device. On CUDA the step
is captured once in a CUDA graph (torch.cuda.CUDAGraph: three warm-up steps on a side stream, then capture;
the state is reset by a new prefill afterwards), and the T steps are T graph replays with no host work in
between. On the CPU the same step runs eagerly. Time = wall clock of the T steps, synchronized before and
after; tokens/s = B * T / time; the median of --repeats runs (each after a fresh prefill, plus one untimed
run first). Speed-up = tokens/s of the variant / tokens/s of fp16 at the same batch.

Memory. "linear MiB": bytes of all parameters and buffers of the 7 * layers projection modules (runtime
tensors included). "packed MiB": bytes of their state_dict (MBWQ: qweight, scales, zeros, q_perm,
channel_scale, q_groups; fp16: the weights). "bits/w": packed bytes * 8 / weights. "mem ratio" (CUDA):
torch.cuda.memory_allocated() after minus before building each projection, summed, over packed bytes
(the issue's <= 1.1x target). "peak GiB" (CUDA): torch.cuda.max_memory_allocated() during the timed decode
(whole model, KV cache and graph pool included).

Checks. With the tiny preset (or --check): (1) the cached decode is compared with a full recompute: the
decoded sequence is run through the model in one forward (teacher forcing) and its logits at every decoded
position must match the logits of the prefill and of each cached step (relative max error < 1e-3 in fp32,
3e-2 in fp16); (2) on CUDA, the greedy tokens of the graph-replayed decode must equal those of an eager
decode of the same model from the same prefill (assert).
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import wq_linear  # noqa: E402  (layer_mix, channel_mix: quantized layers from random packed words)

import lowbit  # noqa: E402,F401
from lowbit.nn import MBWQLinear  # noqa: E402

WARMUP_STEPS = 3  # eager steps on a side stream before the graph capture


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS = {
    "7b": Config(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000),
    "tiny": Config(hidden=256, intermediate=688, layers=2, heads=4, vocab=1000),
}

# ---------------------------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x (..., S, head_dim); cos (S, head_dim) and sin_signed = cat(-sin[:half], sin[half:]) in x's dtype:
    x * cos + rotate_half(x) * sin, with rotate_half(x) * sin == roll(x, half) * sin_signed."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class Attention(nn.Module):
    def __init__(self, cfg: Config, make: Callable[[str, str, int, int], nn.Module], fuse: bool = False) -> None:
        super().__init__()
        h = cfg.hidden
        self.heads, self.head_dim, self.fuse = cfg.heads, cfg.head_dim, fuse
        if fuse:  # q, k, v as one projection of 3h outputs (what MBWQLinear.fuse builds from three)
            self.qkv_proj = make("attn", "qkv_proj", h, 3 * h)
        else:
            self.q_proj = make("attn", "q_proj", h, h)
            self.k_proj = make("attn", "k_proj", h, h)
            self.v_proj = make("attn", "v_proj", h, h)
        self.o_proj = make("attn", "o_proj", h, h)
        self.k_cache: Optional[Tensor] = None  # (B, heads, L, head_dim), set by Llama.allocate_cache
        self.v_cache: Optional[Tensor] = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        B, S, H = x.shape
        if self.fuse:
            qkv = self.qkv_proj(x).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            qk = apply_rope(qkv[:2], cos, sin)  # (2, B, heads, S, head_dim): one rotary pass for both
            v = qkv[2]
        else:
            qk = torch.stack((self.q_proj(x), self.k_proj(x)))  # (2, B, S, H): one rotary pass for both
            qk = apply_rope(qk.view(2, B, S, self.heads, self.head_dim).transpose(2, 3), cos, sin)
            v = self.v_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        q, k = qk.unbind(0)  # (B, heads, S, head_dim)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        # mask (S, L): True where key pos <= query pos
        o = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)  # (B, heads, S, hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H))


class MLP(nn.Module):
    def __init__(self, cfg: Config, make: Callable[[str, str, int, int], nn.Module], fuse: bool = False) -> None:
        super().__init__()
        self.fuse = fuse
        if fuse:  # gate and up as one projection of 2 * intermediate outputs
            self.gate_up_proj = make("mlp", "gate_up_proj", cfg.hidden, 2 * cfg.intermediate)
        else:
            self.gate_proj = make("mlp", "gate_proj", cfg.hidden, cfg.intermediate)
            self.up_proj = make("mlp", "up_proj", cfg.hidden, cfg.intermediate)
        self.down_proj = make("mlp", "down_proj", cfg.intermediate, cfg.hidden)

    def forward(self, x: Tensor) -> Tensor:
        if self.fuse:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, make, dtype, device, fuse: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps, dtype, device)
        self.self_attn = Attention(cfg, make, fuse)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps, dtype, device)
        self.mlp = MLP(cfg, make, fuse)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, pos, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nn.Module):
    """Llama decoder; make(role, name, K, N) builds each projection (role 'attn' or 'mlp'); fuse: q/k/v and
    gate/up as one projection each."""

    def __init__(self, cfg: Config, make, dtype, device, fuse: bool = False) -> None:
        super().__init__()
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False).normal_(0.0, 1.0)
        self.layers = nn.ModuleList()
        for i in range(cfg.layers):
            self.layers.append(DecoderLayer(cfg, make, dtype, device, fuse))
        self.norm = RMSNorm(cfg.hidden, cfg.eps, dtype, device)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, dtype=dtype, device=device)  # never quantized
        self.lm_head.weight.requires_grad_(False).normal_(0.0, cfg.hidden ** -0.5)
        self.cache_len = 0

    def allocate_cache(self, batch: int, length: int) -> None:
        """Static KV cache of `length` positions and the rotary tables for them."""
        cfg, dev = self.cfg, self.device
        self.free_cache()
        for layer in self.layers:
            shape = (batch, cfg.heads, length, cfg.head_dim)
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=dev)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=dev)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=dev, dtype=torch.float32)
                                              / cfg.head_dim))
        freqs = torch.outer(torch.arange(length, device=dev, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        half = cfg.head_dim // 2
        sin = emb.sin()
        self.rope_cos = emb.cos().to(self.dtype)
        self.rope_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.dtype)  # rotate-half's sign
        self.key_positions = torch.arange(length, device=dev)
        self.cache_len = length

    def free_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self.rope_cos = self.rope_sin = self.key_positions = None
        self.cache_len = 0

    def forward(self, tokens: Tensor, pos: Tensor, last_only: bool = True) -> Tensor:
        """tokens (B, S) at positions pos (S,) (int64, on the device); writes their K/V into the cache and
        returns the logits of the last position (B, vocab), or of all positions (B, S, vocab)."""
        h = self.embed_tokens(tokens)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        mask = self.key_positions[None, :] <= pos[:, None]  # (S, L)
        for layer in self.layers:
            h = layer(h, cos, sin, pos, mask)
        if last_only:
            h = h[:, -1]
        return self.lm_head(self.norm(h))


# ---------------------------------------------------------------------------------------------- variants


def dense_linear(K: int, N: int, dtype, dev) -> nn.Linear:
    lin = nn.Linear(K, N, bias=False, dtype=dtype, device=dev)
    lin.weight.requires_grad_(False).normal_(0.0, K ** -0.5)
    return lin


def center_values(layer: MBWQLinear) -> MBWQLinear:
    """Overwrite scales and zeros in place so that w = s*q - z = s*(q - mid) with std ~ 1/sqrt(K) (see the
    module doc). The group widths come from q_groups (channel-mix) or w_bit (layer-mix)."""
    G, N = layer.scales.shape
    dev = layer.scales.device
    if layer.use_mbw:
        bits = layer.q_groups[0::2].to(torch.float32)
    else:
        bits = torch.full((G,), float(layer.w_bit), device=dev)
    levels = torch.pow(2.0, bits)
    mid = (levels - 1) / 2
    std_q = torch.sqrt((levels * levels - 1) / 12)
    s = (0.5 + torch.rand(G, N, device=dev)) / (math.sqrt(layer.in_channels) * std_q[:, None])
    layer.scales.copy_(s)
    layer.zeros.copy_(s * mid[:, None])
    return layer


def quantized(make: Callable[[], MBWQLinear], dev) -> MBWQLinear:
    # .to(dev): prepare_params() leaves the layer-mix g_idx (a runtime buffer built by wq_mbwq_layout) on the
    # CPU; the native op wants every tensor on qweight's device. A no-op for what is already there.
    return center_values(make().to(dev))


VARIANTS: Dict[str, Tuple[str, Callable]] = {
    "fp16": ("dense nn.Linear",
             lambda role, K, N, dt, dev: dense_linear(K, N, dt, dev)),
    "mbwq4": ("MBWQLinear layer-mix 4-bit g128 (all q/k/v/o/gate/up/down)",
              lambda role, K, N, dt, dev: quantized(lambda: wq_linear.layer_mix(K, N, 4, 128, dt, dev), dev)),
    "mix24": ("MBWQLinear channel-mix per projection: 4-bit on half the input channels, 2-bit on the rest, "
              "g128, random q_perm (bench/wq_linear.py channel_mix)",
              lambda role, K, N, dt, dev: quantized(lambda: wq_linear.channel_mix(K, N, dt, dev), dev)),
    "mix24layer": ("MBWQLinear layer-mix: attention q/k/v/o 4-bit, MLP gate/up/down 2-bit, g128",
                   lambda role, K, N, dt, dev: quantized(
                       lambda: wq_linear.layer_mix(K, N, 4 if role == "attn" else 2, 128, dt, dev), dev)),
    "mbwq2": ("MBWQLinear layer-mix 2-bit g128 (all projections)",
              lambda role, K, N, dt, dev: quantized(lambda: wq_linear.layer_mix(K, N, 2, 128, dt, dev), dev)),
}


@dataclass
class LinearMemory:
    modules: int = 0
    weights: int = 0  # K * N summed
    tensor_bytes: int = 0  # all parameters and buffers
    packed_bytes: int = 0  # state_dict
    allocated_bytes: Optional[int] = None  # CUDA: memory_allocated() deltas

    @property
    def ratio(self) -> Optional[float]:
        return None if self.allocated_bytes is None else self.allocated_bytes / self.packed_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.packed_bytes * 8 / self.weights


FUSE_SUFFIX = "+fuse"


def split_variant(v: str) -> Tuple[str, bool]:
    """'mbwq4+fuse' -> ('mbwq4', True): the variant with q/k/v and gate/up fused into one projection each."""
    return (v[:-len(FUSE_SUFFIX)], True) if v.endswith(FUSE_SUFFIX) else (v, False)


def build_model(cfg: Config, variant: str, dtype, dev: str) -> Tuple[Llama, LinearMemory]:
    """The model with every projection built by the variant's factory, measuring each one's memory."""
    name, fuse = split_variant(variant)
    factory = VARIANTS[name][1]
    per_layer = 4 if fuse else 7
    cuda = dev.startswith("cuda")
    mem = LinearMemory(allocated_bytes=0 if cuda else None)
    built = [0]

    def make(role: str, name: str, K: int, N: int) -> nn.Module:
        before = torch.cuda.memory_allocated(dev) if cuda else 0
        m = factory(role, K, N, dtype, dev)
        if cuda:
            mem.allocated_bytes += torch.cuda.memory_allocated(dev) - before
        mem.modules += 1
        mem.weights += K * N
        mem.tensor_bytes += harness.nbytes(m)
        mem.packed_bytes += sum(t.numel() * t.element_size() for t in m.state_dict().values())
        built[0] += 1
        if built[0] % per_layer == 0:
            log(f"    built layer {built[0] // per_layer}/{cfg.layers}")
        return m

    with torch.no_grad():
        model = Llama(cfg, make, dtype, dev, fuse).eval()
    return model, mem


# ---------------------------------------------------------------------------------------------- decode


class DecodeState:
    """Static device buffers of one decode: the token being fed (B, 1), its position (1,), and every token
    of the sequence so far (B, L + 1)."""

    def __init__(self, batch: int, length: int, dev) -> None:
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.hist = torch.zeros(batch, length + 1, dtype=torch.long, device=dev)
        self.positions = torch.arange(length, device=dev)


@torch.no_grad()
def prefill(model: Llama, st: DecodeState, prompt: Tensor) -> Tensor:
    """Runs the prompt, fills the cache, sets tok/pos to the first new token; returns its logits (B, V)."""
    P = prompt.shape[1]
    st.hist.zero_()
    st.hist[:, :P].copy_(prompt)
    logits = model(prompt, st.positions[:P])
    nxt = logits.argmax(-1, keepdim=True)
    st.tok.copy_(nxt)
    st.pos.fill_(P)
    st.hist[:, P:P + 1].copy_(nxt)
    return logits


@torch.no_grad()
def step(model: Llama, st: DecodeState) -> Tensor:
    """One greedy decode step, device-only: feeds tok at pos, writes the argmax into tok and hist[pos + 1],
    advances pos. Returns the logits (B, V). Graph-capturable (no host sync, no host data)."""
    logits = model(st.tok, st.pos)
    nxt = logits.argmax(-1, keepdim=True)
    st.tok.copy_(nxt)
    st.pos.add_(1)
    st.hist.index_copy_(1, st.pos, nxt)
    return logits


def capture(model: Llama, st: DecodeState, prompt: Tensor) -> torch.cuda.CUDAGraph:
    """CUDA graph of one step (warm-up on a side stream first). Leaves the state dirty: prefill again."""
    prefill(model, st, prompt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            step(model, st)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, st)
    torch.cuda.synchronize()
    return graph


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def run_decode(model: Llama, st: DecodeState, prompt: Tensor, T: int, graph, dev: str,
               keep_logits: bool = False) -> Tuple[float, Optional[int], List[Tensor]]:
    """Prefill then T steps (graph replays when graph is given). Returns (seconds of the T steps, peak
    allocated bytes during them on CUDA, logits of the prefill and of each step when keep_logits)."""
    first = prefill(model, st, prompt)
    logits = [first.float().clone()] if keep_logits else []
    sync(dev)
    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(T):
        if graph is not None:
            graph.replay()
        else:
            out = step(model, st)
            if keep_logits:
                logits.append(out.float().clone())
    sync(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if cuda else None
    return seconds, peak, logits


@torch.no_grad()
def check_against_recompute(model: Llama, st: DecodeState, prompt: Tensor, T: int, dev: str) -> float:
    """Eager cached decode vs one full forward over the decoded sequence (teacher forcing): the logits at
    every decoded position must agree. Returns the relative max error."""
    _, _, step_logits = run_decode(model, st, prompt, T, None, dev, keep_logits=True)
    P = prompt.shape[1]
    seq = st.hist[:, :P + T].clone()
    full = model(seq, st.positions[:P + T], last_only=False).float()  # (B, P + T, V)
    ref = full[:, P - 1:P + T]  # logits that produced the tokens at P .. P + T
    got = torch.stack(step_logits, dim=1)
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    tol = 1e-3 if model.dtype == torch.float32 else 3e-2
    assert torch.isfinite(got).all(), "non-finite logits in the cached decode"
    assert err < tol, f"cached decode disagrees with a full recompute: relative max error {err:.2e} >= {tol}"
    return err


# ---------------------------------------------------------------------------------------------- main


def parse_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    ap.add_argument("--layers", type=int, help="number of decoder layers (default: the preset's)")
    ap.add_argument("--tokens", type=int, default=128, help="decode steps T (default 128)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length P (default 16)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--variants", default="fp16,mbwq4,mix24",
                    help=f"comma list of {', '.join(VARIANTS)}, each optionally with {FUSE_SUFFIX} (q/k/v and "
                         "gate/up fused into one projection each)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per (variant, batch); median reported")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                    help="correctness checks (default: on for the tiny preset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown-out", type=Path)
    args = ap.parse_args()

    dev = args.device
    cuda = dev == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = replace(cfg, layers=args.layers)
    variants = parse_list(args.variants)
    for v in variants:
        if split_variant(v)[0] not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose among {', '.join(VARIANTS)}")
    batches = [int(b) for b in parse_list(args.batches)]
    T, P = args.tokens, args.prompt
    if T < 1 or P < 1 or args.repeats < 1:
        ap.error("--tokens, --prompt and --repeats must be >= 1")
    check = args.check if args.check is not None else args.preset == "tiny"
    dtype = torch.float16 if cuda else torch.float32
    length = P + max(T, WARMUP_STEPS)  # cache positions; the graph warm-up writes up to P + 2
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {B: torch.randint(0, cfg.vocab, (B, P), generator=gen).to(dev) for B in batches}
    log(f"llm_decode: preset {args.preset} {cfg}, {dev} {dtype}, P={P} T={T}, batches {batches}, "
        f"variants {variants}, check={check}")

    results = []  # dict per (variant, batch)
    mems: Dict[str, LinearMemory] = {}
    for variant in variants:
        log(f"[{variant}] building: {VARIANTS[split_variant(variant)[0]][0]}")
        t_build = time.perf_counter()
        model, mem = build_model(cfg, variant, dtype, dev)
        mems[variant] = mem
        ratio = f", allocated / packed = {mem.ratio:.4f}" if mem.ratio is not None else ""
        log(f"[{variant}] built in {time.perf_counter() - t_build:.1f} s: {mem.modules} projections, "
            f"{mem.tensor_bytes / 2**20:.1f} MiB of tensors, packed {mem.packed_bytes / 2**20:.1f} MiB "
            f"({mem.bits_per_weight:.3f} bits/weight){ratio}")
        for B in batches:
            prompt = prompts[B]
            model.allocate_cache(B, length)
            st = DecodeState(B, length, dev)
            if check:
                err = check_against_recompute(model, st, prompt, T, dev)
                log(f"[{variant}] B={B}: cached decode == full recompute (relative max logit error {err:.1e})")
            graph = capture(model, st, prompt) if cuda else None
            if check and cuda:
                run_decode(model, st, prompt, T, None, dev)
                eager_tokens = st.hist.clone()
                run_decode(model, st, prompt, T, graph, dev)
                assert torch.equal(eager_tokens, st.hist), \
                    f"{variant} B={B}: graph-replayed greedy tokens differ from the eager decode"
                log(f"[{variant}] B={B}: graph decode tokens == eager decode tokens ({T} steps)")
            run_decode(model, st, prompt, T, graph, dev)  # untimed
            times, peaks = [], []
            for _ in range(args.repeats):
                seconds, peak, _ = run_decode(model, st, prompt, T, graph, dev)
                times.append(seconds)
                peaks.append(peak)
            sec = statistics.median(times)
            tps = B * T / sec
            results.append(dict(variant=variant, batch=B, tps=tps, ms=sec / T * 1e3,
                                peak=max(peaks) if cuda else None))
            log(f"[{variant}] B={B}: {tps:.1f} tokens/s ({sec / T * 1e3:.3f} ms/step, runs "
                f"{', '.join(f'{t * 1e3:.1f}' for t in times)} ms)")
            del graph, st
            model.free_cache()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # Each variant against fp16 of the same model structure (fp16+fuse for fused variants, when it ran).
    base = {(r["variant"], r["batch"]): r["tps"] for r in results if split_variant(r["variant"])[0] == "fp16"}

    def baseline(variant: str, batch: int) -> Optional[float]:
        fuse = split_variant(variant)[1]
        return base.get(("fp16" + (FUSE_SUFFIX if fuse else ""), batch), base.get(("fp16", batch)))

    rows = []
    for r in results:
        mem = mems[r["variant"]]
        b0 = baseline(r["variant"], r["batch"])
        speedup = r["tps"] / b0 if b0 is not None else None
        rows.append([r["variant"], r["batch"], harness.fmt(r["tps"]), harness.fmt(r["ms"]),
                     f"{speedup:.2f}x" if speedup is not None else "n/a",
                     harness.fmt(mem.tensor_bytes / 2**20), harness.fmt(mem.packed_bytes / 2**20),
                     f"{mem.bits_per_weight:.2f}", f"{mem.ratio:.3f}" if mem.ratio is not None else "n/a",
                     harness.fmt(r["peak"] / 2**30) if r["peak"] is not None else "n/a"])
    table = harness.markdown_table(["variant", "batch", "tokens/s", "ms/step", "vs fp16", "linear MiB",
                                    "packed MiB", "bits/w", "mem ratio", "peak GiB"], rows,
                                   align="lrrrrrrrrr")
    dense = ", fp16" if cuda else ", fp32 on the CPU (the CPU baseline)"
    legend = "\n".join(f"- {v}: {VARIANTS[split_variant(v)[0]][0]}" + (dense if split_variant(v)[0] == "fp16" else "")
                       + (", q/k/v and gate/up fused into one projection each" if split_variant(v)[1] else "")
                       + "" for v in variants)
    notes = []
    if cuda and args.preset == "7b":
        for v in ("mbwq4", "mbwq4" + FUSE_SUFFIX):
            r4 = [r for r in results if r["variant"] == v and r["batch"] == 1]
            b0 = baseline(v, 1)
            if r4 and b0 is not None:
                s = r4[0]["tps"] / b0
                notes.append(f"- target {v} >= 2.5x fp16 at batch 1: {s:.2f}x ({'met' if s >= 2.5 else 'NOT met'})")
    for v, mem in mems.items():
        if mem.ratio is not None and v != "fp16":
            notes.append(f"- target memory of {v}'s linear layers <= 1.1x packed bytes: {mem.ratio:.3f}x "
                         f"({'met' if mem.ratio <= 1.1 else 'NOT met'})")
    if check:
        notes.append("- checks passed: cached decode == full recompute (teacher-forced logits)"
                     + ("; CUDA-graph greedy tokens == eager greedy tokens" if cuda else ""))
    env = harness.environment(dev)
    text = (f"### LLM decode, Llama-{args.preset}-shaped ({cfg.layers} layers, hidden {cfg.hidden}, "
            f"intermediate {cfg.intermediate}, heads {cfg.heads}, vocab {cfg.vocab}), {dev}\n\n"
            f"{harness.environment_markdown(env)}\n"
            f"- method: greedy decode, prompt {P} tokens then {T} decode steps, "
            f"{'CUDA graph of one step replayed' if cuda else 'eager steps'}; tokens/s = batch x {T} / time of "
            f"the {T} steps, median of {args.repeats}; activations and dense weights {dtype}; lm_head dense\n\n"
            f"{legend}\n\n{table}\n" + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    harness.emit(text, args.markdown_out)


if __name__ == "__main__":
    main()

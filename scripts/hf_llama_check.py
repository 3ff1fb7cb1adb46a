"""Hugging Face transformers as a lowbit client, at Llama-2-7B shape: quantize, save, load in a fresh process,
greedy-generate and compare with the dequantized-weight model, and time decode at batch 1.

    PYTHONPATH=python python3 scripts/hf_llama_check.py [--layers N] [--new-tokens 32] [--bench-tokens 64]
        [--prompt 16] [--group-size 128] [--repeats 3] [--cuda-graphs] [--assert-first 4] [--out DIR]

    GPU machine (H100/H200), 8 of the 32 layers:  PYTHONPATH=python python3 scripts/hf_llama_check.py --layers 8
    CPU smoke test (tiny config, float32):        PYTHONPATH=python python3 scripts/hf_llama_check.py --device cpu --tiny

Steps.
 1. A LlamaForCausalLM from a LlamaConfig of Llama-2-7B shape (hidden 4096, intermediate 11008, 32 layers,
    32 heads, vocab 32000; --layers cuts the depth) with random weights (transformers' init, N(0, 0.02)),
    built directly on the device in the target dtype (fp16 on CUDA, float32 on the CPU; --dtype overrides).
    --tiny: hidden 256, intermediate 688, 2 layers, 4 heads, 2 kv heads, vocab 1000.
 2. lowbit.quantize: every projection inside model.model.layers (q/k/v/o/gate/up/down) to MBWQLinear 4-bit,
    RTN, group --group-size (default 128); embeddings, norms and lm_head stay dense.
 3. lowbit.save to a directory (with the config.json of the LlamaConfig beside it); the quantized model is
    freed. The float model becomes the reference: each quantized projection's weight is overwritten in place
    by MBWQLinear.dequantized_weight() (exactly what the lowbit layer multiplies by).
 4. A fresh Python process (this script with --child) builds the skeleton from config.json (no weight init),
    lowbit.load + lowbit.prepare_layers, and runs: greedy generate of --new-tokens tokens (do_sample=False)
    from a fixed random prompt of --prompt tokens, the logits of the prompt's last position, and the timing.
 5. This process runs the same on the reference model and compares: tokens matched, first mismatch (and
    the reference's top-1 - top-2 logit margin there: a small margin means a near-tie broken by fp16
    rounding, not a wrong model), max |logit difference| at the prompt's last position.
    Asserted: the first --assert-first tokens are equal (default 4; 0 turns it off); with float32 (the CPU
    smoke) every token. At 7B in fp16 the rest is reported, not asserted: the MBWQ kernels and cuBLAS sum in
    different orders, and after 32 layers a near-tie can flip.

Timing. model.generate(prompt, max_new_tokens=T, min_new_tokens=T, do_sample=False) with T = --bench-tokens
(64), batch 1, after one untimed warm-up call; the median wall clock of --repeats calls, synchronized before
and after. "tokens/s" = T / time (the brief's figure; includes the prefill of the prompt and transformers'
per-step host work). "decode tokens/s" = (T - 1) / (time - prefill), with prefill = the median time of one
forward of the prompt (use_cache=True). Default: transformers' dynamic KV cache, eager. --cuda-graphs: the
static cache (cache_implementation="static"), with which transformers compiles the decode step with
torch.compile(mode="reduce-overhead"), i.e. CUDA graphs; the first (warm-up) call then compiles. The fp16
row is the reference model (dense fp16 nn.Linear, same shapes as the original fp16 model).

The last thing printed is a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import lowbit  # noqa: E402
from lowbit.nn import MBWQLinear  # noqa: E402

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def make_config(args):
    from transformers import LlamaConfig

    if args.tiny:
        shape = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:  # Llama-2-7B
        shape = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    return LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_model(cfg, dtype: torch.dtype, device: str, init: bool = True):
    """LlamaForCausalLM(cfg) created directly on ``device`` in ``dtype`` (no host copy, no fp32 detour);
    ``init=False`` skips the random init (a skeleton whose tensors are all loaded afterwards)."""
    from transformers import LlamaForCausalLM
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:  # 4.x
        from transformers.modeling_utils import no_init_weights

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), (contextlib.nullcontext() if init else no_init_weights()):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def gen_kwargs(model, ids, n: int, cuda_graphs: bool) -> dict:
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
              pad_token_id=model.config.eos_token_id)
    if cuda_graphs:
        kw["cache_implementation"] = "static"
    return kw


def run_checks(model, ids, args) -> dict:
    """Greedy tokens, the prompt's last logits, and the timing, for one model (the lowbit one in the child
    process, the reference here)."""
    dev = args.device
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
        tokens = model.generate(ids, **gen_kwargs(model, ids, args.new_tokens, args.cuda_graphs))[0].tolist()
        result = {"tokens": tokens, "logits": logits.cpu().tolist(), "finite": bool(torch.isfinite(logits).all()),
                  "model_bytes": model_bytes(model)}
        if args.bench_tokens <= 0:
            return result
        kw = gen_kwargs(model, ids, args.bench_tokens, args.cuda_graphs)
        t0 = time.perf_counter()
        model.generate(ids, **kw)  # warm-up (compiles the step with --cuda-graphs)
        sync(dev)
        result["warmup_s"] = time.perf_counter() - t0
        times, prefill = [], []
        for _ in range(args.repeats):
            sync(dev)
            t0 = time.perf_counter()
            model(ids, use_cache=True)
            sync(dev)
            prefill.append(time.perf_counter() - t0)
        for _ in range(args.repeats):
            sync(dev)
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            sync(dev)
            times.append(time.perf_counter() - t0)
            assert out.shape[1] == ids.shape[1] + args.bench_tokens, out.shape
        result["generate_s"] = statistics.median(times)
        result["prefill_s"] = statistics.median(prefill)
    return result


def child(args) -> None:
    """Fresh process: skeleton from config.json, lowbit.load, prepare, checks; JSON on the last stdout line."""
    from transformers import LlamaConfig

    t0 = time.perf_counter()
    cfg = LlamaConfig.from_pretrained(args.child)
    model = build_model(cfg, DTYPES[args.dtype], args.device, init=False)
    lowbit.load(args.child, model)
    lowbit.prepare_layers(model)
    sync(args.device)
    n_q = sum(isinstance(m, MBWQLinear) for m in model.modules())
    load_s = time.perf_counter() - t0
    log(f"[child] loaded {args.child}: {n_q} MBWQLinear layers in {load_s:.1f} s")
    ids = torch.tensor([json.loads(args.prompt_ids)], device=args.device)
    result = run_checks(model, ids, args)
    result["load_s"] = load_s
    result["n_quantized"] = n_q
    print(json.dumps(result))


def fmt_rate(n: int, seconds) -> str:
    return "-" if not seconds or seconds <= 0 else f"{n / seconds:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: the config's, 32 at 7B)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length (random tokens)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared")
    ap.add_argument("--bench-tokens", type=int, default=64, help="tokens per timed generate (0: no timing)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="static KV cache: transformers compiles the decode step (torch.compile reduce-overhead)")
    ap.add_argument("--assert-first", type=int, default=4, help="assert that the first N greedy tokens match")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "fp16"
    if args.child:
        return child(args)

    import transformers

    dtype, dev = DTYPES[args.dtype], args.device
    cfg = make_config(args)
    cfg.dtype = dtype
    shape = (f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
             f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}")
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, lowbit {lowbit.__version__}, "
        f"device {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}), {args.dtype}")
    log(f"LlamaForCausalLM: {shape}")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(cfg, dtype, dev)
    sync(dev)
    log(f"built the random {args.dtype} model on {dev} in {time.perf_counter() - t0:.1f} s "
        f"({model_bytes(model) / 2**30:.2f} GiB)")

    t0 = time.perf_counter()
    qmodel, report = lowbit.quantize(model, bits=4, group_size=args.group_size, method="rtn", layer="mbwq",
                                     include=["model.layers.*"], exclude=["lm_head"], progress=True)
    sync(dev)
    quant_s = time.perf_counter() - t0
    log(report.table().splitlines()[-1] + f" ({quant_s:.1f} s)")
    names = [r["name"] for r in report]
    assert len(names) == 7 * cfg.num_hidden_layers, len(names)

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="hf_llama_check_")
        args.out = tmp.name
    ckpt = args.out
    t0 = time.perf_counter()
    lowbit.save(qmodel, ckpt)
    cfg.save_pretrained(ckpt)
    save_s = time.perf_counter() - t0
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    log(f"saved {ckpt} ({ckpt_bytes / 2**20:.1f} MiB) in {save_s:.1f} s")

    # The float model becomes the dequantized-weight reference; the quantized one is freed.
    with torch.no_grad():
        for name in names:
            q, lin = qmodel.get_submodule(name), model.get_submodule(name)
            lin.weight.copy_(q.dequantized_weight(dtype))
            if lin.bias is not None:
                lin.bias.copy_(q.bias)
    del qmodel
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed + 1))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", ckpt, "--prompt-ids", json.dumps(prompt[0].tolist()),
           "--device", dev, "--dtype", args.dtype, "--new-tokens", str(args.new_tokens),
           "--bench-tokens", str(args.bench_tokens), "--repeats", str(args.repeats)]
    if args.cuda_graphs:
        cmd.append("--cuda-graphs")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log("fresh process: load + generate + time the lowbit model ...")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # stderr passes through
    if proc.returncode != 0:
        sys.exit(f"hf_llama_check: the child process failed (exit {proc.returncode})")
    low = json.loads(proc.stdout.strip().splitlines()[-1])
    assert low["n_quantized"] == len(names), low["n_quantized"]

    log(f"reference ({args.dtype} nn.Linear with the dequantized weights): generate + time ...")
    ref = run_checks(model, prompt.to(dev), args)

    P = args.prompt
    ref_new, low_new = ref["tokens"][P:], low["tokens"][P:]
    assert ref["tokens"][:P] == low["tokens"][:P] == prompt[0].tolist()
    mismatch = next((i for i, (a, b) in enumerate(zip(ref_new, low_new)) if a != b), None)
    matched = sum(a == b for a, b in zip(ref_new, low_new))
    logit_diff = max(abs(a - b) for a, b in zip(ref["logits"], low["logits"]))
    logit_scale = max(abs(a) for a in ref["logits"])
    margin_note = ""
    if mismatch is not None:  # the reference's top-1 - top-2 margin at the first mismatch
        with torch.no_grad():
            seq = torch.tensor([ref["tokens"][:P + mismatch]], device=dev)
            top = model(seq).logits[0, -1].float().topk(2).values
        margin_note = f" (reference top-1 - top-2 logit margin there: {float(top[0] - top[1]):.4g})"

    print(f"transformers {transformers.__version__}; LlamaForCausalLM {shape}; {args.dtype} on {dev}; "
          f"MBWQ 4-bit RTN g{args.group_size} on {len(names)} projections")
    print(f"quantize {quant_s:.1f} s, save {save_s:.1f} s, checkpoint {ckpt_bytes / 2**20:.1f} MiB, "
          f"skeleton + lowbit.load + prepare in a fresh process {low['load_s']:.1f} s")
    print(f"projections: {report.bytes_before / 2**20:.1f} MiB {args.dtype} -> {report.bytes_after / 2**20:.1f} MiB "
          f"packed ({report.average_bits:.3f} bits/weight)")
    print(f"greedy tokens ({args.new_tokens} new): {matched}/{len(ref_new)} equal, first mismatch: "
          f"{'none' if mismatch is None else f'position {mismatch}'}{margin_note}")
    print(f"logits at the prompt's last position: max |lowbit - reference| = {logit_diff:.4g} "
          f"(max |logit| {logit_scale:.4g}); finite: lowbit {low['finite']}, reference {ref['finite']}")

    ok = low["finite"] and ref["finite"]
    need = len(ref_new) if dtype == torch.float32 else min(args.assert_first, len(ref_new))
    if mismatch is not None and mismatch < need:
        ok = False
        print(f"FAIL: the first {need} greedy tokens must match (mismatch at {mismatch})")

    if args.bench_tokens > 0:
        T = args.bench_tokens
        mode = "dynamic cache, eager"
        if args.cuda_graphs:  # transformers auto-compiles the static-cache step on CUDA only
            mode = ("static cache + torch.compile reduce-overhead (CUDA graphs)" if dev.startswith("cuda")
                    else "static cache, eager (transformers compiles only on CUDA)")
        rows = [(f"{args.dtype} nn.Linear (dequantized weights)", ref), (f"lowbit MBWQ 4-bit g{args.group_size}", low)]
        base = T / ref["generate_s"]
        print()
        print(f"Batch 1, prompt {P}, generate {T} new tokens ({mode}), median of {args.repeats} after a warm-up; "
              f"{dev}.")
        print()
        print("| model | model MiB | prefill ms | generate s | tokens/s | decode tokens/s | speed-up |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, r in rows:
            decode = (T - 1) / (r["generate_s"] - r["prefill_s"]) if r["generate_s"] > r["prefill_s"] else None
            print(f"| {label} | {r['model_bytes'] / 2**20:.1f} | {r['prefill_s'] * 1e3:.1f} | {r['generate_s']:.3f} | "
                  f"{fmt_rate(T, r['generate_s'])} | {'-' if decode is None else f'{decode:.1f}'} | "
                  f"{T / r['generate_s'] / base:.2f}x |")
    if tmp is not None:
        tmp.cleanup()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()

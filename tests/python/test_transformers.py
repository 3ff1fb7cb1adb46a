"""Hugging Face transformers as a client of lowbit: a LlamaForCausalLM built from a (tiny) config with random
weights is quantized to 4-bit MBWQ (every projection inside ``model.model.layers``; embeddings, norms and
``lm_head`` stay float32), saved with ``lowbit.save``, loaded with ``lowbit.load`` into a skeleton built from
the same config in a fresh Python process, and its greedy ``generate`` must give exactly the tokens of the
float model whose quantized Linear weights are replaced by ``MBWQLinear.dequantized_weight()``.

Tolerance of the logits check (float32, CPU): the MBWQ forward multiplies by the same dequantized weight as
the reference ``nn.Linear`` but sums in another order, so the logits of one forward agree to within
``LOGIT_ATOL`` = 1e-4 absolute (observed: 0.0 on the CPU, logits of order 0.5). The fresh-process logits are
compared against the in-process quantized model with the same tolerance. The 7B-shaped version of this check
runs on the GPU machine: scripts/hf_llama_check.py.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.nn import MBWQLinear  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_DIR = os.path.join(ROOT, "python")
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NEW_TOKENS = 16
LOGIT_ATOL = 1e-4

# intermediate 176 is not a multiple of the group (32): down_proj's last group is partial.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)

# Runs in a fresh interpreter: argv[1] = checkpoint directory (config.json + lowbit checkpoint), argv[2] = the
# prompt as JSON. Prints {"tokens": [...], "logits": [...]} (logits of the prompt's last position).
CHILD = r"""
import json, sys
import torch
import lowbit
from transformers import LlamaConfig, LlamaForCausalLM

path, prompt = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(1234)  # a different random init: every weight must come from the checkpoint
model = LlamaForCausalLM(LlamaConfig.from_pretrained(path)).eval()
lowbit.load(path, model)
lowbit.prepare_layers(model)
ids = torch.tensor([prompt])
with torch.no_grad():
    logits = model(ids).logits[0, -1]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=%d, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
print(json.dumps({"tokens": out[0].tolist(), "logits": logits.tolist()}))
""" % NEW_TOKENS


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=model.config.eos_token_id)[0].tolist()


def _dequantized_reference(float_model, quantized_model, names):
    """The float model with each quantized projection's weight (and bias) replaced by what the MBWQ layer
    multiplies by."""
    ref = copy.deepcopy(float_model)
    for name in names:
        q = quantized_model.get_submodule(name)
        lin = ref.get_submodule(name)
        assert isinstance(q, MBWQLinear) and type(lin) is torch.nn.Linear
        with torch.no_grad():
            lin.weight.copy_(q.dequantized_weight())
            if lin.bias is not None:
                lin.bias.copy_(q.bias)
    return ref


def test_llama_quantize_save_load_generate(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert model.dtype == torch.float32

    qmodel, report = lowbit.quantize(model, bits=4, group_size=32, method="rtn", layer="mbwq",
                                     include=["model.layers.*"], exclude=["lm_head"], progress=False)
    names = [f"model.layers.{i}.{p}" for i in range(cfg.num_hidden_layers) for p in PROJ]
    assert sorted(r["name"] for r in report) == sorted(names)
    for name in names:
        layer = qmodel.get_submodule(name)
        assert isinstance(layer, MBWQLinear) and layer.w_bit == 4 and layer.group_size == 32
        assert layer.dtype == torch.float32
    assert type(qmodel.lm_head) is torch.nn.Linear and qmodel.lm_head.weight.dtype == torch.float32

    ckpt = str(tmp_path / "llama-w4")
    lowbit.save(qmodel, ckpt)
    cfg.save_pretrained(ckpt)  # config.json beside model.safetensors / lowbit.json

    # On disk: packed tensors only for the quantized projections, float weights for the rest.
    state = lowbit.io.load_file(os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, "lowbit.json")) as f:
        assert sorted(json.load(f)["layers"]) == sorted(names)
    for name in names:
        keys = {k[len(name) + 1:] for k in state if k.startswith(name + ".")}
        assert "weight" not in keys, f"{name}: float weight saved"
        assert {"qweight", "scales", "zeros"} <= keys, f"{name}: {sorted(keys)}"
        assert keys <= {"qweight", "scales", "zeros", "q_perm", "channel_scale", "bias"}, f"{name}: {sorted(keys)}"
        assert state[name + ".qweight"].dtype == torch.int32
    assert state["lm_head.weight"].dtype == torch.float32
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    packed = sum(state[f"{n}.{k}"].numel() * state[f"{n}.{k}"].element_size()
                 for n in names for k in ("qweight", "scales", "zeros"))
    dense = sum(model.get_submodule(n).weight.numel() * 4 for n in names)
    assert packed < dense / 4  # 4-bit words + fp32 scales/zeros per 32 vs fp32 weights

    prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))

    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHON_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", CHILD, ckpt, json.dumps(prompt[0].tolist())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])

    ref = _dequantized_reference(model, qmodel, names)
    ref_tokens = _greedy(ref, prompt)
    assert len(ref_tokens) == prompt.shape[1] + NEW_TOKENS
    assert child["tokens"] == ref_tokens
    assert _greedy(qmodel, prompt) == ref_tokens  # in-process quantized model as well

    # Logits of one forward (the whole prompt plus the generated tokens): quantized vs dequantized reference.
    seq = torch.tensor([ref_tokens])
    with torch.no_grad():
        q_logits = qmodel(seq).logits
        r_logits = ref(seq).logits
        f_logits = model(seq).logits
    err = (q_logits - r_logits).abs().max().item()
    assert err <= LOGIT_ATOL, err
    child_logits = torch.tensor(child["logits"])
    assert (child_logits - q_logits[0, prompt.shape[1] - 1]).abs().max().item() <= LOGIT_ATOL
    # ...and the quantization did change the model (4-bit error is far above the tolerance).
    assert (f_logits - r_logits).abs().max().item() > 100 * LOGIT_ATOL

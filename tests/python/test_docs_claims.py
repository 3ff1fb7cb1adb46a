"""Checks that the user-facing documentation (README.md, docs/guide.md, docs/api.md, docs/ops.md,
docs/formats.md, docs/compat.md) is true on the CPU: every snippet, command, name, signature, default,
documented error and worked example that can be checked cheaply and deterministically.

GPU-only and performance claims are not tested here."""
from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import ops
from lowbit.nn import MBWQLinear, MPQLinear, Q4Conv2d, Q4Linear, Q4MatMul, Q8Linear

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / "python")
T = torch.tensor
EPS = T(1e-5)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = PY + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(capsys, *argv):
    """lowbit.cli.main in-process: (rc, stdout, stderr)."""
    from lowbit.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _freeze(model):
    for m in model.modules():
        if isinstance(m, lowbit.nn.LowbitLayer):
            m.generate_quantized_weight(qweight_only=True)
    return model


# ============================================================================================ README.md


def test_readme_q8linear_snippet():
    """README "Python": train step, eval equals training output, qweight_only inference (1 byte/weight)."""
    layer = Q8Linear(512, 256)
    x = torch.randn(32, 512, requires_grad=True)
    assert float(layer.scale_a) == 0.0
    y = layer(x)
    assert float(layer.scale_a) > 0  # scale_a initialised from this batch
    y.square().mean().backward()
    for g in (x.grad, layer.weight.grad, layer.bias_a.grad, layer.scale_a.grad):
        assert g is not None
    layer.eval()
    assert torch.equal(layer(x), y)  # eval uses int8 qweight; output equals training output
    layer.generate_quantized_weight(qweight_only=True)
    assert layer.weight is None and layer.qweight.dtype == torch.int8 and layer.qweight.element_size() == 1
    assert torch.equal(layer(x), y)
    assert sorted(layer.state_dict()) == ["bias_a", "eps", "qweight", "scale_a", "scale_w"]  # BIE's keys


def test_readme_weight_only_snippet():
    """README: MPQLinear(..., use_gba_quant=False) loads a GPTQ state dict by key name; prepare_params();
    MBWQLinear.from_float layer-mix and channel-mix (bits=[4, 2], bits_prop=[0.25, 0.75])."""
    K = N = 256
    src = MPQLinear.from_float(torch.nn.Linear(K, N, bias=False).half(), w_bit=4, group_size=128, asym=True)
    checkpoint_tensors = src.state_dict()
    assert {"qweight", "qzeros", "scales", "g_idx"} <= set(checkpoint_tensors)
    gptq = MPQLinear(K, N, w_bit=4, group_size=128, use_gba_quant=False)
    gptq.load_state_dict(checkpoint_tensors)
    with pytest.raises(RuntimeError, match="prepare_params"):  # mandatory after loading
        gptq(torch.randn(2, K).half())
    gptq.prepare_params()
    x = torch.randn(4, K)
    y = gptq(x.half())
    assert y.dtype == torch.float16 and torch.equal(y, src(x.half()))
    q = MBWQLinear.from_float(torch.nn.Linear(K, N), w_bit=4, group_size=128)
    assert not q.use_mbw and q.w_bit == 4
    linear = torch.nn.Linear(K, N)
    mix = MBWQLinear.from_float(linear, bits=[4, 2], bits_prop=[0.25, 0.75])
    assert mix.use_mbw and mix._seg_bits == [4, 2] and mix._seg_rows == [128, 256]  # max(1, floor(K*p)//gs)*gs
    assert _rel(mix(x), x @ mix.dequantized_weight().t() + linear.bias.detach()) < 1e-5


def test_readme_layer_table_and_ops_list():
    import lowbit.compat as compat

    for name, bie in (("Q8Linear", "Q8LinearCutlass"), ("Q4Linear", "Q4LinearCutlass"), ("Q4MatMul", "Q4MatMul"),
                      ("MPQLinear", "MPQLinearCuda"), ("MPQLinear", "MPQLinearMlx"), ("MBWQLinear", "MBWQLinearCuda")):
        assert getattr(compat, bie) is getattr(lowbit.nn, name)
    assert issubclass(compat.Q4Conv2dCutlass, lowbit.nn.Q4Conv2d)
    for name in ("quantize_s8", "lsq_scale", "linear_s8", "q8_linear", "q4_linear", "q4_conv2d", "q4_matmul",
                 "pack_s4", "unpack_s4"):
        assert callable(getattr(lowbit.ops, name)) and hasattr(torch.ops.lowbit, name)
    wq = {n for n in dir(torch.ops.lowbit) if n.startswith("wq_")}
    assert {"wq_linear", "wq_dequantize", "wq_pack", "wq_quantize_rtn"} <= wq


def test_readme_convert_save_load_prepare(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.body = torch.nn.Linear(4 * 6 * 6, 16)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(torch.relu(self.conv(x)).flatten(1))))

    q8 = lowbit.convert(Net(), "q8", exclude=["head"])
    assert [type(m).__name__ for m in (q8.conv, q8.body, q8.head)] == ["Conv2d", "Q8Linear", "Linear"]
    q4 = lowbit.convert(Net(), "q4", exclude=["head"])
    assert [type(m).__name__ for m in (q4.conv, q4.body, q4.head)] == ["Q4Conv2d", "Q4Linear", "Linear"]
    x = torch.randn(2, 1, 6, 6)
    q4(x).sum().backward()  # trains like the original
    q4.eval()
    ref = q4(x)
    _freeze(q4)
    assert torch.equal(q4(x), ref)
    d = tmp_path / "readme_ckpt"
    lowbit.save(q4, d)
    assert sorted(os.listdir(d)) == ["lowbit.json", "model.safetensors"]
    restored = lowbit.load(d, Net()).eval()
    assert restored.body.weight is None and restored.conv.weight is None  # no float weights
    assert torch.equal(restored(x), ref)

    root = MPQLinear(32, 8, use_gba_quant=False, group_size=32)
    assert lowbit.prepare_layers(root) is root and root._prepared  # the root included


def test_readme_cpp_and_layout_paths_exist():
    for p in ("include/lowbit/nn/q8_linear.h", "include/lowbit/nn.h", "include/lowbit/ops.h",
              "include/lowbit/io/safetensors.h", "include/lowbit/io/safetensors_torch.h",
              "examples/cpp/q8_linear_example.cpp", "examples/cpp/demo_fashion_mnist.cpp", "examples/python/demo.py",
              "csrc/ops/library.cpp", "csrc/kernels/cpu", "csrc/kernels/cuda", "csrc/nn", "tests/cpp", "bench",
              "docs/dependencies.md", "docs/PERFORMANCE.md", "cmake/lowbitConfig.cmake.in"):
        assert (ROOT / p).exists(), p
    cm = (ROOT / "CMakeLists.txt").read_text()
    assert 'LOWBIT_CUDA_ARCHITECTURES "80;86;89;90a"' in cm and "VERSION 3.25" in cm
    assert "add_library(lowbit::kernels ALIAS" in cm and "add_library(lowbit::lowbit ALIAS" in cm
    pp = (ROOT / "pyproject.toml").read_text()
    assert 'lowbit = "lowbit.cli:main"' in pp and '"torch==2.11.0"' in pp


def test_readme_demo_weight_bytes():
    """README demo table, "weight bytes" column (depends on the shapes only, not on training)."""
    spec = importlib.util.spec_from_file_location("lowbit_demo_py", ROOT / "examples/python/demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    q8, q8i, fp32, cnn = demo.make_models(torch.device("cpu"), 0)
    for m in (q8, q8i, cnn):
        _freeze(m)
    assert demo.weight_bytes(q8) == 542720 and demo.weight_bytes(q8i) == 542720
    assert demo.weight_bytes(fp32) == 2140160
    assert demo.weight_bytes(cnn) == 107920
    wo = {b: lowbit.quantize(fp32, bits=b, group_size=32, exclude=["4"], progress=False)[0] for b in (4, 2)}
    assert demo.weight_only_bytes(wo[4]) == 415744 and demo.weight_only_bytes(wo[2]) == 280576


# ============================================================================================ CLI


def test_cli_help_every_command():
    from lowbit.cli import build_parser

    ap = build_parser()
    for cmd in ("inspect", "quantize", "bench", "demo"):
        with pytest.raises(SystemExit) as e:
            ap.parse_args([cmd, "--help"])
        assert e.value.code == 0
    help_q = ap._subparsers._group_actions[0].choices["quantize"].format_help()
    for flag in ("--bits", "--group-size", "--layer", "--budget-bits", "--include", "--exclude",
                 "--no-default-exclude", "--candidate-bits", "--method"):
        assert flag in help_q


def test_cli_python_m_lowbit_inspect(tmp_path):
    m = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)), "q8")
    m(torch.randn(2, 16))
    lowbit.save(_freeze(m.eval()), tmp_path / "ckpt")
    r = subprocess.run([sys.executable, "-m", "lowbit", "inspect", str(tmp_path / "ckpt")], capture_output=True,
                       text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^0\s+Q8Linear\s+8\s+\d+\s+qweight", r.stdout, re.M)
    assert re.search(r"^2\s+Q8Linear\s+8\s+\d+\s+qweight", r.stdout, re.M)
    # a malformed file: "lowbit <command>: <file>: ..." on stderr, exit status 2, no traceback
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"abcdefgh")
    r = subprocess.run([sys.executable, "-m", "lowbit", "inspect", str(tmp_path / "ckpt")], capture_output=True,
                       text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"lowbit inspect: {tmp_path / 'ckpt' / 'model.safetensors'}: ")


@pytest.mark.parametrize("cmd", ["inspect", "quantize"])
@pytest.mark.parametrize("broken", ["json_syntax", "json_format", "json_class", "truncated_tensors"])
def test_cli_malformed_checkpoint_reported(tmp_path, capsys, cmd, broken):
    """api.md: a malformed model.safetensors or lowbit.json -> stderr message naming the file, exit 2, no traceback."""
    m = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(16, 8)), "q8")
    m(torch.randn(2, 16))
    d = tmp_path / "ck"
    lowbit.save(m, d)
    cfg, st = d / "lowbit.json", d / "model.safetensors"
    if broken == "json_syntax":
        cfg.write_text("{not json")
    elif broken == "json_format":
        cfg.write_text('{"format": "x"}')
    elif broken == "json_class":
        c = json.loads(cfg.read_text())
        c["layers"]["0"]["class"] = "Foo"
        cfg.write_text(json.dumps(c))
    else:
        st.write_bytes(st.read_bytes()[:100])
    bad = st if broken == "truncated_tensors" else cfg
    args = [cmd, str(d)] + ([str(tmp_path / "out"), "--no-progress"] if cmd == "quantize" else [])
    rc, _, err = _cli(capsys, *args)
    assert rc == 2
    assert err.startswith(f"lowbit {cmd}: ") and str(bad) in err and "Traceback" not in err


def test_cli_quantize_guide_commands(tmp_path, capsys):
    """guide.md "Command line": both commands, default exclusions, other tensors copied, load + prepare_layers."""
    g = torch.Generator().manual_seed(0)
    sd = {"model.layers.0.q_proj.weight": torch.randn(64, 256, generator=g).half(),
          "model.layers.0.q_proj.bias": torch.randn(64, generator=g).half(),
          "model.layers.1.q_proj.weight": torch.randn(64, 256, generator=g).half(),
          "model.embed_tokens.weight": torch.randn(100, 256, generator=g).half(),
          "lm_head.weight": torch.randn(100, 256, generator=g).half(),
          "model.norm.weight": torch.randn(256, generator=g).half()}
    src = tmp_path / "llama-fp16.safetensors"
    lowbit.io.save_file(sd, src)
    rc, out, err = _cli(capsys, "quantize", str(src), str(tmp_path / "llama-w4"), "--bits", "4", "--group-size", "128",
                        "--no-progress")
    assert rc == 0, err
    assert "2 layers (rtn, mbwq)" in out
    layers = json.loads((tmp_path / "llama-w4" / "lowbit.json").read_text())["layers"]
    assert sorted(layers) == ["model.layers.0.q_proj", "model.layers.1.q_proj"]
    assert all(s["class"] == "MBWQLinear" for s in layers.values())
    out_t = lowbit.io.load_file(tmp_path / "llama-w4" / "model.safetensors")
    for k in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):  # copied unchanged
        assert torch.equal(out_t[k], sd[k])

    rc, out, err = _cli(capsys, "quantize", str(src), str(tmp_path / "llama-mix"), "--layer", "mpq", "--budget-bits",
                        "3.5", "--exclude", "model.layers.0.*", "--no-progress")
    assert rc == 0, err
    layers = json.loads((tmp_path / "llama-mix" / "lowbit.json").read_text())["layers"]
    assert list(layers) == ["model.layers.1.q_proj"] and layers["model.layers.1.q_proj"]["class"] == "MPQLinear"
    assert "(budget 3.5)" in out

    rc, _, err = _cli(capsys, "quantize", str(src), str(tmp_path / "all"), "--no-default-exclude", "--no-progress")
    assert rc == 0, err
    layers = json.loads((tmp_path / "all" / "lowbit.json").read_text())["layers"]
    assert "lm_head" in layers and "model.embed_tokens" in layers

    rc, _, err = _cli(capsys, "quantize", str(src), str(tmp_path / "g"), "--method", "gptq")
    assert rc == 2 and "Python API" in err  # the command line does RTN only

    # lowbit.load(DST, float_skeleton) then prepare_layers rebuilds the model
    class L(torch.nn.Module):
        def __init__(self, bias):
            super().__init__()
            self.q_proj = torch.nn.Linear(256, 64, bias=bias)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([L(True), L(False)])
            self.embed_tokens = torch.nn.Embedding(100, 256)
            self.norm = torch.nn.LayerNorm(256, bias=False)

    class Top(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = M()
            self.lm_head = torch.nn.Linear(256, 100, bias=False)

    model = lowbit.load(tmp_path / "llama-w4", Top().half())
    lowbit.prepare_layers(model)
    proj = model.model.layers[0].q_proj
    x = torch.randn(3, 256).half()
    ref = x.float() @ proj.dequantized_weight().float().t() + sd["model.layers.0.q_proj.bias"].float()
    assert _rel(proj(x), ref) < 1e-2
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])


def test_cli_quantize_from_lowbit_directory(tmp_path, capsys):
    """api.md: SRC may be a lowbit checkpoint directory; its lowbit layers stay, float Linears are quantized."""
    m = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)), "q8",
                       include=["0"])
    m(torch.randn(2, 64))
    lowbit.save(m, tmp_path / "src")
    rc, _, err = _cli(capsys, "quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--group-size", "32",
                      "--no-progress")
    assert rc == 0, err
    layers = json.loads((tmp_path / "dst" / "lowbit.json").read_text())["layers"]
    assert layers["0"]["class"] == "Q8Linear" and layers["2"]["class"] == "MBWQLinear"
    sk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    r = lowbit.prepare_layers(lowbit.load(tmp_path / "dst", sk))
    assert type(r[0]) is Q8Linear and type(r[2]) is MBWQLinear
    assert r(torch.randn(3, 64)).shape == (3, 32)


def test_cli_bench_unknown_name(capsys):
    rc, _, err = _cli(capsys, "bench", "no_such_bench")
    assert rc == 2 and "no benchmark 'no_such_bench'" in err
    for name in ("q8_linear", "q4_layers", "wq_linear", "llm_decode"):
        assert (ROOT / "bench" / f"{name}.py").is_file()


def test_cpp_demo_help_flags():
    """README: `lowbit_demo --help` lists its flags (`--device cuda`, `--epochs N`, ...)."""
    binary = ROOT / "build-lsq" / "examples" / "cpp" / "lowbit_demo"
    if not binary.is_file():
        pytest.skip("C++ demo not built")
    r = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    text = r.stdout + r.stderr
    assert "--device cpu|cuda" in text and "--epochs N" in text


# ============================================================================================ guide.md


def test_guide_convert_patterns_rules_copy_and_ties():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    c = lowbit.convert(m, "q4", rules=[("0", None), ("2", "q8")])  # first match wins
    assert [type(x).__name__ for x in c] == ["Linear", "Q4Linear", "Q8Linear"]
    assert type(m[0]) is torch.nn.Linear  # a copy unless inplace=True
    with pytest.raises(TypeError):
        lowbit.convert(m, "q8", exclude="0")  # never a bare string
    with pytest.raises(TypeError):
        lowbit.convert(m, "q8", include="*")
    assert type(lowbit.convert(m, "q8", include=None, exclude=None)[0]) is Q8Linear  # None: the default
    assert lowbit.convert(m, "q8", inplace=True) is m and type(m[0]) is Q8Linear
    # weights and biases copied
    lin = torch.nn.Linear(8, 3)
    q = lowbit.convert(torch.nn.Sequential(lin), "q8")[0]
    assert torch.equal(q.weight, lin.weight) and torch.equal(q.bias, lin.bias)
    # tied module: one layer at all names; names converted differently: ValueError
    shared = torch.nn.Linear(8, 8)
    tied = torch.nn.Module()
    tied.a, tied.b = shared, shared
    ct = lowbit.convert(tied, "q8")
    assert ct.a is ct.b and type(ct.a) is Q8Linear
    with pytest.raises(ValueError):
        lowbit.convert(tied, "q8", exclude=["b"])
    # a weight Parameter held by another module is untied with a warning
    emb = torch.nn.Embedding(10, 8)
    head = torch.nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    with pytest.warns(UserWarning, match="tied"):
        lowbit.convert(torch.nn.ModuleDict({"emb": emb, "head": head}), "q8")


def test_guide_direct_layers():
    assert lowbit.nn.Q8Linear(512, 256)(torch.randn(2, 512)).shape == (2, 256)
    assert Q4Conv2d(64, 64, 3, padding=1)(torch.randn(1, 64, 5, 7)).shape == (1, 64, 5, 7)
    assert Q4MatMul()(torch.randn(2, 5, 16), torch.randn(2, 3, 16)).shape == (2, 5, 3)


def test_guide_save_records_compat_as_nn_and_refuses_subclasses(tmp_path):
    from lowbit.compat import Q4Conv2dCutlass

    m = torch.nn.Sequential(Q4Conv2dCutlass(4, 6, 3, 1, 1))
    x = torch.randn(2, 4, 6, 6)
    m(x)
    m.eval()
    lowbit.save(m, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "lowbit.json").read_text())["layers"]["0"]["class"] == "Q4Conv2d"
    r = lowbit.load(tmp_path / "c", torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1))).eval()
    assert type(r[0]) is Q4Conv2d and torch.equal(r(x), m(x))

    class Mine(Q8Linear):
        pass

    with pytest.raises(TypeError):
        lowbit.save(torch.nn.Sequential(Mine(4, 4)), tmp_path / "mine")
    assert not (tmp_path / "mine").exists()  # before anything is written


def _mlp(h=16):
    return torch.nn.Sequential(torch.nn.Linear(8, h), torch.nn.ReLU(), torch.nn.Linear(h, 4))


def _assert_untouched(skeleton, fn, exc):
    types = {n: type(m) for n, m in skeleton.named_modules()}
    state = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(exc):
        fn(skeleton)
    assert types == {n: type(m) for n, m in skeleton.named_modules()}
    assert all(torch.equal(state[k], v) for k, v in skeleton.state_dict().items())


def test_guide_load_failures_leave_skeleton(tmp_path):
    q = lowbit.convert(_mlp(), "q8", exclude=["2"])
    q(torch.randn(2, 8))
    lowbit.save(q, tmp_path / "ck")
    # a wrong-size skeleton: a recorded layer of another size than the module it replaces (ValueError), or a
    # tensor outside the replaced layers that does not fit (RuntimeError)
    _assert_untouched(_mlp(32), lambda s: lowbit.load(tmp_path / "ck", s), (RuntimeError, ValueError))
    # a truncated file: RuntimeError
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "lowbit.json").write_text((tmp_path / "ck" / "lowbit.json").read_text())
    (tmp_path / "t" / "model.safetensors").write_bytes((tmp_path / "ck" / "model.safetensors").read_bytes()[:-10])
    _assert_untouched(_mlp(), lambda s: lowbit.load(tmp_path / "t", s), RuntimeError)
    # a broken lowbit.json: ValueError
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "lowbit.json").write_text("{")
    (tmp_path / "j" / "model.safetensors").write_bytes((tmp_path / "ck" / "model.safetensors").read_bytes())
    _assert_untouched(_mlp(), lambda s: lowbit.load(tmp_path / "j", s), ValueError)


def test_guide_load_wrong_size_skeleton_all_layers_replaced(tmp_path):
    q = lowbit.convert(_mlp(16), "q8")
    q(torch.randn(2, 8))
    lowbit.save(q, tmp_path / "ck")
    _assert_untouched(_mlp(32), lambda s: lowbit.load(tmp_path / "ck", s), (RuntimeError, ValueError))


def test_guide_load_strict_false_warning_and_modes(tmp_path):
    from lowbit.checkpoint import IncompatibleKeysWarning

    q = lowbit.convert(_mlp(), "q8")
    q(torch.randn(2, 8))
    lowbit.save(q, tmp_path / "ck")
    sk = _mlp()
    sk.add_module("3", torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="strict"):
        lowbit.load(tmp_path / "ck", sk)
    sk = _mlp()
    sk.add_module("3", torch.nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = lowbit.load(tmp_path / "ck", sk, strict=False)
    ws = [i.message for i in w if isinstance(i.message, IncompatibleKeysWarning)]
    assert r is sk and len(ws) == 1
    assert ws[0].missing_keys == ["3.weight", "3.bias"] and ws[0].unexpected_keys == []
    # new layers take the training mode of the modules they replace; map_location
    sk = _mlp().eval()
    lowbit.load(tmp_path / "ck", sk, map_location="cpu")
    assert [m.training for m in sk] == [False, False, False]
    with pytest.raises(ValueError):
        lowbit.load(tmp_path / "ck", _mlp(), map_location=3.5)
    # tied module: one layer at all of its names
    shared = torch.nn.Linear(8, 8)
    tied = torch.nn.Module()
    tied.a, tied.b = shared, shared
    ct = lowbit.convert(tied, "q8")
    ct.a(torch.randn(2, 8))
    lowbit.save(ct, tmp_path / "tied")
    shared2 = torch.nn.Linear(8, 8)
    sk = torch.nn.Module()
    sk.a, sk.b = shared2, shared2
    lowbit.load(tmp_path / "tied", sk)
    assert sk.a is sk.b and type(sk.a) is Q8Linear


def test_guide_io_interchangeable_with_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int32), "c": torch.randn(2).bfloat16(),
         "d": torch.zeros(2, 2, dtype=torch.uint8), "e": torch.randn(4).half()}
    lowbit.io.save_file(t, tmp_path / "x.safetensors", metadata={"k": "v"})
    r = st.load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(r[k], t[k]) and r[k].dtype == t[k].dtype for k in t)
    st.save_file(t, str(tmp_path / "y.safetensors"), metadata={"k": "v"})
    r = lowbit.io.load_file(tmp_path / "y.safetensors")
    assert all(torch.equal(r[k], t[k]) and r[k].dtype == t[k].dtype for k in t)
    assert lowbit.io.load_metadata(tmp_path / "y.safetensors") == {"k": "v"}
    assert list(inspect.signature(lowbit.io.save_file).parameters) == ["tensors", "path", "metadata"]
    assert inspect.signature(lowbit.io.save_file).parameters["metadata"].default is None


def test_guide_bie_single_layer_checkpoint_loads():
    from lowbit.compat import Q8LinearCutlass

    a = Q8LinearCutlass(16, 8)
    a(torch.randn(2, 16))
    b = Q8LinearCutlass(16, 8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(a(x), b(x))


def _gptq_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def test_guide_quantize_report_example():
    """guide.md report example: 96->64, 64->32, GPTQ act-order, MPQ, g32 (numbers of the table's
    size columns and totals line; the error columns depend on the data)."""
    model = _gptq_model()
    tokens = torch.randn(128, 96)
    qmodel, report = lowbit.quantize(model, bits=4, group_size=32, method="gptq", layer="mpq", act_order=True,
                                     calibration=[tokens[i:i + 8] for i in range(0, 128, 8)], progress=False)
    lines = str(report).splitlines()
    assert lines[0] == "layer class           in    out bits  group  bits/w weight err output err"
    assert re.fullmatch(r"0     MPQLinear       96     64    4     32   5\.125 +\d\.\d{4} +\d\.\d{4}", lines[1])
    assert re.fullmatch(r"2     MPQLinear       64     32    4     32   5\.125 +\d\.\d{4} +\d\.\d{4}", lines[2])
    assert lines[3] == "2 layers (gptq, mpq): 32.4 KiB -> 6.1 KiB, 5.125 bits per weight on average"
    assert isinstance(report, list) and all(isinstance(r, dict) for r in report) and report.table() == str(report)
    # act-order: MPQ stores a non-monotone g_idx
    g = qmodel[0].state_dict()["g_idx"]
    assert (g[1:] < g[:-1]).any()
    assert type(model[0]) is torch.nn.Linear  # a copy unless inplace=True


def test_guide_quantize_report_definitions():
    model = _gptq_model()
    X = torch.randn(64, 96) @ (torch.randn(96, 96) * 0.3 + torch.eye(96))  # correlated inputs
    rtn, r_rtn = lowbit.quantize(model, bits=4, group_size=32, layer="mpq", calibration=[X], progress=False)
    gptq, r_gptq = lowbit.quantize(model, bits=4, group_size=32, layer="mpq", method="gptq", calibration=[X],
                                   progress=False)
    _, r_none = lowbit.quantize(model, bits=4, group_size=32, progress=False)
    assert all(r["output_error"] is None for r in r_none)  # only with calibration
    W = model[0].weight.detach()
    layer = rtn[0]
    Wq = layer.dequantized_weight(torch.float32)
    assert r_rtn[0]["weight_error"] == pytest.approx(float((W - Wq).norm() / W.norm()), rel=1e-6)
    ref = X @ W.t()
    assert r_rtn[0]["output_error"] == pytest.approx(float((ref - X @ Wq.t()).norm() / ref.norm()), rel=1e-4)
    nbytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.qzeros))
    assert r_rtn[0]["bits_per_weight"] == pytest.approx(nbytes * 8 / W.numel())
    assert r_rtn[0]["bits_per_weight"] == pytest.approx(4 + 32 / 32 + 4 / 32)  # fp32 scales, packed zeros
    assert r_gptq[0]["output_error"] < r_rtn[0]["output_error"]  # the quantity GPTQ minimises


def test_guide_quantize_budget_and_types():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    q, report = lowbit.quantize(model, budget_bits=3.5, candidate_bits=(2, 3, 4, 8), exclude=["4"], progress=False)
    assert type(q[4]) is torch.nn.Linear and report.average_bits <= 3.5
    for r in report:
        assert sorted(r["candidates"]) == [2, 3, 4, 8]
        # fp32 scales and zeros cost 64/group_size bits
        assert r["candidates"][2][0] == pytest.approx(2 + 64 / 128)
    with pytest.raises(TypeError):
        lowbit.quantize(model, bits=4.0, progress=False)
    with pytest.raises(TypeError):
        lowbit.quantize(model, group_size="128", progress=False)
    with pytest.raises(TypeError):
        lowbit.quantize(model, budget_bits=3.5, candidate_bits=(2.0, 4.0), progress=False)
    with pytest.raises(TypeError):
        lowbit.quantize(model, exclude="4", progress=False)


def test_guide_quantize_exact_linear_dtype_ties_and_mbwq_act_order():
    class MyLinear(torch.nn.Linear):
        pass

    m = torch.nn.Sequential(torch.nn.Linear(64, 32).half(), MyLinear(32, 32))
    q, _ = lowbit.quantize(m, bits=4, group_size=32, progress=False)
    assert type(q[0]) is MBWQLinear and q[0].dtype == torch.float16  # the Linear's dtype
    assert type(q[1]) is MyLinear  # only exact nn.Linear
    shared = torch.nn.Linear(32, 32)
    tied = torch.nn.Module()
    tied.a, tied.b = shared, shared
    qt, rep = lowbit.quantize(tied, bits=4, group_size=32, progress=False)
    assert qt.a is qt.b and len(rep) == 1
    with pytest.raises(ValueError):
        lowbit.quantize(tied, bits=4, group_size=32, exclude=["b"], progress=False)
    # GPTQ act-order with MBWQ: the order as q_perm, contiguous groups
    model = _gptq_model()
    qm, _ = lowbit.quantize(model, bits=4, group_size=32, method="gptq", layer="mbwq", act_order=True,
                            calibration=[torch.randn(64, 96)], progress=False)
    perm = qm[0].q_perm.long()
    assert sorted(perm.tolist()) == list(range(96)) and perm.tolist() != list(range(96))
    assert not qm[0].use_mbw and qm[0].group_size == 32


def test_guide_fuse():
    q, k, v = [MBWQLinear.from_float(torch.nn.Linear(64, n), w_bit=4, group_size=32) for n in (48, 16, 16)]
    qkv = MBWQLinear.fuse([q, k, v])
    x = torch.randn(3, 64)
    yq, yk, yv = qkv(x).split([q.out_channels, k.out_channels, v.out_channels], -1)
    assert torch.equal(yq, q(x)) and torch.equal(yk, k(x)) and torch.equal(yv, v(x))  # bitwise on the CPU
    other = MBWQLinear.from_float(torch.nn.Linear(64, 16), w_bit=4, group_size=32, perm=torch.randperm(64))
    with pytest.raises(ValueError, match="q_perm"):
        MBWQLinear.fuse([q, other])
    with pytest.raises(ValueError, match="w_bit"):
        MBWQLinear.fuse([q, MBWQLinear.from_float(torch.nn.Linear(64, 16), w_bit=2, group_size=32)])
    mq = [MPQLinear.from_float(torch.nn.Linear(64, n), w_bit=4, group_size=32) for n in (32, 16)]
    assert torch.equal(MPQLinear.fuse(mq)(x), torch.cat([m(x) for m in mq], -1))


def test_guide_fused_layer_saves_and_loads_as_one(tmp_path):
    q, k = [MBWQLinear.from_float(torch.nn.Linear(64, n), w_bit=4, group_size=32) for n in (48, 16)]
    f = MBWQLinear.fuse([q, k])
    lowbit.save(torch.nn.Sequential(f), tmp_path / "f")
    r = lowbit.prepare_layers(lowbit.load(tmp_path / "f", torch.nn.Sequential(torch.nn.Linear(64, 64))))
    x = torch.randn(2, 64)
    assert r[0].out_channels == 64 and torch.equal(r(x), f(x))


def test_guide_transformers_round_trip(tmp_path):
    """guide.md "Hugging Face transformers" snippet, on the CPU with a tiny config."""
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    if int(transformers.__version__.split(".")[0]) >= 5:
        from transformers.initialization import no_init_weights
    else:  # pragma: no cover
        from transformers.modeling_utils import no_init_weights
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    qmodel, report = lowbit.quantize(model, bits=4, group_size=32, method="rtn", layer="mbwq",
                                     include=["model.layers.*"], exclude=["lm_head"], progress=False)
    assert len(report) == 7
    d = tmp_path / "llama-w4"
    lowbit.save(qmodel, d)
    cfg.save_pretrained(d)
    cfg2 = LlamaConfig.from_pretrained(d)
    with torch.device("cpu"), no_init_weights():
        m2 = LlamaForCausalLM._from_config(cfg2, dtype=torch.float32).eval()
    lowbit.load(d, m2)
    lowbit.prepare_layers(m2)
    ids = torch.randint(0, 100, (1, 6))
    assert torch.equal(qmodel.generate(ids, max_new_tokens=4, do_sample=False),
                       m2.generate(ids, max_new_tokens=4, do_sample=False))


def test_guide_ci_transformers_pin():
    pin = re.search(r"transformers==([0-9.]+)", (ROOT / "docs" / "guide.md").read_text()).group(1)
    assert f"transformers=={pin}" in (ROOT / "scripts" / "setup.sh").read_text()


def test_guide_scripts_flags():
    hf = (ROOT / "scripts" / "hf_llama_check.py").read_text()
    assert '"--layers"' in hf and '"--cuda-graphs"' in hf
    assert "+fuse" in (ROOT / "bench" / "llm_decode.py").read_text()


# ============================================================================================ api.md


def _params(fn):
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if k != "self"}


E = inspect.Parameter.empty


def test_api_signatures():
    assert _params(Q8Linear.__init__) == dict(in_channels=E, out_channels=E, a_bit=8, w_bit=8, device=None,
                                              dtype=torch.float, bias=False, int8_backward=False)
    assert _params(Q4Linear.__init__)["int8_backward"] is False
    p = _params(Q4Conv2d.__init__)
    assert list(p)[:7] == ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"]
    assert (p["stride"], p["padding"], p["dilation"], p["groups"]) == (1, 0, 1, 1)
    p = _params(Q4MatMul.__init__)
    assert list(p)[:2] == ["dtype", "device"] and p["dtype"] is torch.float and p["device"] is None
    assert _params(MPQLinear.__init__) == dict(
        in_channels=E, out_channels=E, a_bit=16, w_bit=4, dtype=torch.half, group_size=-1, use_gba_quant=True,
        dq_group_size=-1, dq_mode=2, disable_bias=True, asym=False, requires_grad=False, device=None)
    p = _params(MBWQLinear.__init__)
    assert (p["use_mbw"], p["groups"], p["rows_packed"]) == (True, 64, 64)
    for name in ("prepare_params", "from_float", "to_mlx", "from_mlx", "dequantized_weight", "fuse"):
        assert callable(getattr(MPQLinear, name))
    for name in ("q42fp_weight", "exl2fp_weight", "set_scales", "set_zeros", "check_parameters", "from_float", "fuse"):
        assert callable(getattr(MBWQLinear, name))
    sig = inspect.signature(lowbit.convert)
    assert {k: v.default for k, v in sig.parameters.items()} == dict(
        model=E, kind="q8", include=("*",), exclude=(), rules=(), inplace=False, dtype=torch.float32)
    assert all(sig.parameters[k].kind is inspect.Parameter.KEYWORD_ONLY
               for k in ("include", "exclude", "rules", "inplace", "dtype"))
    assert _params(lowbit.quantize) == dict(
        model=E, bits=4, group_size=128, method="rtn", layer="mbwq", include=None, exclude=None, budget_bits=None,
        candidate_bits=(2, 3, 4, 8), calibration=None, inplace=False, progress=True, act_order=False, damp=0.01,
        block_size=128)
    assert _params(lowbit.load) == dict(path=E, model=E, strict=True, map_location=None)
    assert list(_params(lowbit.save)) == ["model", "path"]
    import lowbit.compat as compat

    for name in ("Q8LinearCutlass", "Q4LinearCutlass", "Q4Conv2dCutlass", "Q4MatMul", "MPQLinearCuda", "MPQLinearMlx",
                 "MBWQLinearCuda", "prepare_bie_layers"):
        assert name in compat.__all__ and hasattr(compat, name)
    assert compat.prepare_bie_layers is lowbit.prepare_layers


def test_api_qat_eval_qweight_regeneration():
    l = Q8Linear(16, 8)
    x = torch.randn(4, 16)
    l(x)
    l.eval()
    y0 = l(x)
    with torch.no_grad():
        l.weight.mul_(2)  # version counter bumps: regenerated
    y1 = l(x)
    assert not torch.equal(y0, y1)
    l.train()
    ytr = l(x)
    l.eval()
    assert torch.equal(l(x), ytr)
    l.weight.data.mul_(0.5)  # through .data: not seen ...
    assert torch.equal(l(x), ytr)
    l.generate_quantized_weight()  # ... until generate_quantized_weight()
    assert not torch.equal(l(x), ytr)
    l.train()
    l(x)
    assert l.qweight is None  # training resumed


@pytest.mark.parametrize("train", [True, False])
def test_api_compile_fullgraph_first_forward(train):
    """api.md: layers run under torch.compile(fullgraph=True), the first forward (scale_a init) included
    (backend aot_eager: graph capture and AOT dispatch, no C++ compile)."""
    torch._dynamo.reset()
    x = torch.randn(4, 16)
    eager = Q8Linear(16, 8)
    comp = Q8Linear(16, 8)
    comp.load_state_dict(eager.state_dict())
    eager.train(train)
    comp.train(train)
    y = torch.compile(comp, fullgraph=True, backend="aot_eager")(x)
    assert float(comp.scale_a) > 0 and torch.equal(y, eager(x))
    torch._dynamo.reset()
    mm = Q4MatMul()
    mm.train(train)
    a, b = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    torch.compile(mm, fullgraph=True, backend="aot_eager")(a, b)
    assert float(mm.x_clip) > 0 and float(mm.y_clip) > 0


def test_api_weight_only_load_dtype_checks_and_dtype_following():
    lin = torch.nn.Linear(64, 48)
    m = MPQLinear.from_float(lin, w_bit=4, group_size=32)
    sd = dict(m.state_dict())
    sd["qweight"] = sd["qweight"].float()
    with pytest.raises(RuntimeError, match=r"'qweight' must be torch\.int32, got torch\.float32"):
        MPQLinear(64, 48, w_bit=4, group_size=32, use_gba_quant=False, disable_bias=False).load_state_dict(sd)
    b = MBWQLinear.from_float(lin, w_bit=4, group_size=32)
    sd = dict(b.state_dict())
    sd["q_perm"] = sd["q_perm"].long()
    with pytest.raises(RuntimeError, match=r"'q_perm' must be torch\.int16 or torch\.int32, got torch\.int64"):
        MBWQLinear(64, 48, w_bit=4, group_size=32, use_mbw=False, disable_bias=False).load_state_dict(sd)
    # accepted index dtypes: int64 g_idx, int32 q_perm
    sd = dict(m.state_dict())
    sd["g_idx"] = sd["g_idx"].long()
    n = MPQLinear(64, 48, w_bit=4, group_size=32, use_gba_quant=False, disable_bias=False, dtype=torch.float32)
    n.load_state_dict(sd)
    n.prepare_params()
    x = torch.randn(2, 64)
    assert torch.equal(n(x), m(x))
    sd = dict(b.state_dict())
    sd["q_perm"] = sd["q_perm"].int()
    n = MBWQLinear(64, 48, w_bit=4, group_size=32, use_mbw=False, disable_bias=False, dtype=torch.float32)
    n.load_state_dict(sd)
    n.prepare_params()
    assert torch.equal(n(x), b(x))
    # dtype follows .half() / .bfloat16() / .float()
    h = MBWQLinear.from_float(lin, w_bit=4, group_size=32).half()
    assert h.dtype == torch.float16 and h.constructor_args()["dtype"] == "torch.float16"
    assert h.dequantized_weight().dtype == torch.float16
    h.set_scales(torch.ones(2, 48))
    assert h.scales.dtype == torch.float16
    assert h.bfloat16().dtype == torch.bfloat16 and h.float().dtype == torch.float32
    # from_float refuses channel-mix group sizes q_groups cannot hold; from_mlx checks scales / biases
    with pytest.raises(ValueError, match="multiple of 32"):
        MBWQLinear.from_float(lin, bits=[4, 2], bits_prop=[0.5, 0.5], group_size=16)
    s = MPQLinear.from_float(lin, w_bit=4, group_size=32, asym=False)
    d = s.to_mlx()
    with pytest.raises(ValueError, match="scales"):
        MPQLinear.from_mlx(d["weight"], d["scales"][:, :1], d["biases"], 32, 4)
    with pytest.raises(ValueError):
        MPQLinear.from_mlx(d["weight"], d["scales"].half(), d["biases"], 32, 4)


def _gba_sym(K=64, N=40, gs=32, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, NB = K // gs, math.ceil(N / D)
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, generator=g)
    ck = {"qweight": torch.ops.lowbit.wq_pack(codes, [4], [K]), "g_idx": (torch.arange(K) // gs).to(torch.int32),
          "qstatistic": torch.randint(0, 256, (G, NB, D), dtype=torch.uint8, generator=g),
          "qscales_zeros": torch.randn(G, NB, 1, generator=g), "qscales_scales": torch.rand(G, NB, 1, generator=g) + .1,
          "qzeros_zeros": torch.randn(G, NB, 1, generator=g), "qzeros_scales": torch.rand(G, NB, 1, generator=g) + .1}
    return ck, codes


def test_api_formats_gba_double_quantization_strict_load_and_decode():
    """api.md / formats.md: a GBA double-quantization checkpoint loads strictly without scales / zeros;
    s = (hi4 - qscales_zeros)*qscales_scales, z = (lo4 - qzeros_zeros)*qzeros_scales, w = s*q - z, the
    padding of D not dividing N ignored."""
    K, N, gs, D = 64, 40, 32, 16
    ck, codes = _gba_sym(K, N, gs, D)
    layer = MPQLinear(K, N, w_bit=4, group_size=gs, dq_group_size=D, dtype=torch.float32)
    layer.load_state_dict(ck, strict=True)
    layer.prepare_params()
    G = K // gs
    q = ck["qstatistic"]
    s = ((q >> 4).float() - ck["qscales_zeros"]) * ck["qscales_scales"]
    z = ((q & 15).float() - ck["qzeros_zeros"]) * ck["qzeros_scales"]
    s, z = s.reshape(G, -1)[:, :N], z.reshape(G, -1)[:, :N]
    rows = torch.arange(K) // gs
    ref = s[rows] * codes.float() - z[rows]  # (K, N)
    got = layer.dequantized_weight(torch.float32).t()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    # the prepared state dict loads back strictly (no double-quantization tensors)
    sd = layer.state_dict()
    assert sorted(sd) == ["g_idx", "qweight", "scales", "zeros"]
    l2 = MPQLinear(K, N, w_bit=4, group_size=gs, dq_group_size=D, dtype=torch.float32)
    l2.load_state_dict(sd, strict=True)
    l2.prepare_params()
    x = torch.randn(2, K)
    assert torch.equal(l2(x), layer(x))
    # a raw GBA checkpoint into a prepared layer
    ck2, _ = _gba_sym(K, N, gs, D, seed=1)
    l2.load_state_dict(ck2, strict=True)
    l3 = MPQLinear(K, N, w_bit=4, group_size=gs, dq_group_size=D, dtype=torch.float32)
    l3.load_state_dict(ck2)
    l3.prepare_params()
    assert torch.equal(l2(x), l3(x))


# ============================================================================================ ops.md


def test_ops_schemas():
    names = ("quantize_s8", "qat_alpha", "qat_prepare", "qat_quantize", "linear_s8", "linear_s8s4", "quantize_rows_s8",
             "lsq_linear_backward", "q4_matmul_forward", "wq_linear", "wq_quantize_rtn", "wq_linear_forward",
             "wq_linear_grad_input", "wq_dequantize", "wq_pack", "wq_unpack", "wq_pack_zeros", "wq_unpack_zeros",
             "wq_gba_decode", "wq_mbwq_layout", "wq_check_perm", "wq_check_g_idx")
    sch = {n: str(getattr(torch.ops.lowbit, n).default._schema) for n in names}
    assert "bool check_step=True" in sch["quantize_s8"]
    assert sch["qat_alpha"].startswith("lowbit::qat_alpha(Tensor scale1, Tensor scale2, Tensor eps)")
    assert "Tensor? shift, Tensor scale1, Tensor scale2, Tensor eps)" in sch["qat_prepare"]
    assert "int qmin, int qmax) -> (Tensor, Tensor)" in sch["qat_quantize"]
    assert "ScalarType out_dtype, Tensor? row_scale=None" in sch["linear_s8"]
    assert "(Tensor qx, Tensor qw4, Tensor alpha, ScalarType out_dtype)" in sch["linear_s8s4"]
    assert "(Tensor x, int qmax=127) -> (Tensor, Tensor)" in sch["quantize_rows_s8"]
    assert "bool int8_grad=False, ScalarType? grad_weight_dtype=None" in sch["lsq_linear_backward"]
    assert "bool save_codes=True" in sch["q4_matmul_forward"]
    assert ("(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor g_idx, Tensor? perm, "
            "Tensor? channel_scale, int[] seg_bits, int[] seg_rows, bool asym, Tensor? bias=None)") in sch["wq_linear"]
    assert "(Tensor weight, int bits, int group_size, str mode)" in sch["wq_quantize_rtn"]
    # C++ (include/lowbit/ops.h) declares every op api.md lists
    hdr = (ROOT / "include/lowbit/ops.h").read_text()
    for n in ("quantize_s8", "quantize_rows_s8", "qat_alpha", "qat_prepare", "qat_quantize", "lsq_scale", "linear_s8",
              "linear_s8s4", "q8_linear", "q4_linear", "q4_conv2d", "q4_matmul", "pack_s4", "unpack_s4",
              "lsq_linear_backward", "wq_linear", "wq_linear_forward", "wq_linear_grad_input", "wq_dequantize",
              "wq_quantize_rtn", "wq_pack"):
        assert re.search(rf"\b{n}\(", hdr), n
    for h in ("quantize.h", "quantize_rows.h", "gemm_s8.h", "qmatmul.h", "convert_s8.h", "gemm_f16s8.h", "reduce.h",
              "pack_int4.h", "im2col.h", "conv_s8.h", "lsq_grad.h", "wq.h"):
        assert (ROOT / "include/lowbit/kernels" / h).is_file(), h
    nn_h = (ROOT / "include/lowbit/nn/q8_linear.h").read_text()
    assert "TORCH_ARG(bool, int8_backward)" in nn_h


def test_ops_lsq_scale_eps_default():
    x = torch.randn(4, 8)
    assert torch.equal(torch.ops.lowbit.lsq_scale(x, 127.0), lowbit.ops.lsq_scale(x, 127.0))


def test_ops_quantize_s8_rules():
    x = T([float("nan"), float("inf"), -float("inf"), 0.5, 1.5, 2.5, -0.5])
    assert ops.quantize_s8(x, None, T(1.0), EPS, -128, 127).tolist() == [0, 127, -128, 0, 2, 2, 0]  # rne, NaN 0
    assert ops.quantize_s8(x.reshape(1, -1), torch.ones(7), T(1.0), EPS, -8, 7).tolist() == [[0, 7, -8, 2, 2, 4, 0]]
    assert ops.quantize_s8(x, None, T(0.0), T(0.5), -128, 127).tolist() == [0, 127, -128, 1, 3, 5, -1]  # max(s, eps)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="finite and > 0"):
            ops.quantize_s8(x, None, T(bad), T(0.0), -128, 127)
    ops.quantize_s8(x, None, T(0.0), T(0.0), -128, 127, check_step=False)  # no check
    for qmin, qmax in ((-129, 127), (5, 3), (0, 128)):
        with pytest.raises(RuntimeError):
            ops.quantize_s8(x, None, T(1.0), EPS, qmin, qmax)
    xs = torch.randn(8, 4).t()  # any strides
    assert torch.equal(ops.quantize_s8(xs, None, T(0.1), EPS, -128, 127),
                       ops.quantize_s8(xs.contiguous(), None, T(0.1), EPS, -128, 127))
    # IEEE division, fp32: 0.005 / 0.002 in fp32 == 2.5 -> 2 (ties to even), formats.md's example below


def test_ops_qat_alpha_prepare_quantize():
    assert float(ops.qat_alpha(T(0.5), T(0.25), EPS)) == 0.125
    assert float(ops.qat_alpha(T(0.0), T(0.25), T(0.1))) == pytest.approx(0.025)  # max(scale, eps)
    for bad in (T(-1.0), T(float("inf")), T(float("nan"))):
        assert math.isnan(float(ops.qat_alpha(bad, T(0.25), T(0.0))))
    a = ops.qat_alpha(T(0.5), T(0.25), EPS)
    assert a.dtype == torch.float32 and a.dim() == 0
    p = ops.qat_prepare(T([1.0, 2.0, 3.0]).half(), T(0.5).bfloat16(), T(0.25), EPS)
    assert p.dtype == torch.float32 and p.shape == (9,)
    assert p[:6].tolist() == pytest.approx([1, 2, 3, 0.5, 0.25, 1e-5]) and float(p[6]) == 0.125
    assert p[7:].tolist() == [0.5, 0.25]  # the steps max(scale, eps)
    assert ops.qat_prepare(None, T(0.5), T(0.25), EPS).shape == (6,)
    assert ops.qat_prepare(None, T(0.0), T(0.25), EPS)[4:].tolist() == pytest.approx([1e-5, 0.25])
    x, sh = torch.randn(5, 7), torch.randn(7)
    codes, prep = ops.qat_quantize(x, sh, T(0.3), T(0.2), EPS, -8, 7)
    assert torch.equal(codes, ops.quantize_s8(x, sh, T(0.3), EPS, -8, 7, check_step=False))
    assert torch.equal(prep, ops.qat_prepare(sh, T(0.3), T(0.2), EPS))


def test_ops_lsq_scale_formula():
    x = torch.randn(33, 17)
    s = ops.lsq_scale(x, 127.0)
    assert s.dtype == torch.float32 and s.dim() == 0
    assert float(s) == pytest.approx(float(2 * x.double().abs().mean() / math.sqrt(127)), rel=1e-7)
    assert float(ops.lsq_scale(x, 127.0, T(10.0))) == 10.0


def test_ops_linear_s8_s8s4_rows():
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(-128, 128, (6, 33), generator=g, dtype=torch.int8)
    qw = torch.randint(-128, 128, (5, 33), generator=g, dtype=torch.int8)
    alpha = T(0.0123)
    acc = (qx.long() @ qw.long().t()).float()
    assert torch.equal(ops.linear_s8(qx, qw, alpha, torch.float32), acc * alpha)
    assert torch.equal(ops.linear_s8(qx, qw, alpha, torch.bfloat16), (acc * alpha).bfloat16())
    rs = torch.rand(6, generator=g)
    assert torch.equal(ops.linear_s8(qx, qw, alpha, torch.float32, row_scale=rs), acc * (alpha * rs).unsqueeze(1))
    qw4 = ops.pack_s4(torch.randint(-8, 8, (5, 33), generator=g, dtype=torch.int8))
    assert qw4.shape == (5, 17)
    assert torch.equal(ops.linear_s8s4(qx, qw4, alpha, torch.float16),
                       ops.linear_s8(qx, ops.unpack_s4(qw4, 33), alpha, torch.float16))
    x = torch.randn(2, 3, 8, generator=g)
    x[0, 1] = 0
    x[1, 2, 3] = float("inf")
    x[1, 0, 0] = float("nan")
    q, s = ops.quantize_rows_s8(x)
    assert q.shape == x.shape and q.dtype == torch.int8 and s.shape == (2, 3) and s.dtype == torch.float32
    assert float(s[0, 1]) == 0 and math.isnan(float(s[1, 2])) and math.isnan(float(s[1, 0]))
    for i, j in ((0, 1), (1, 2), (1, 0)):
        assert not q[i, j].any()
    for i, j in ((0, 0), (0, 2), (1, 1)):
        sc = x[i, j].abs().max() / 127
        assert float(s[i, j]) == float(sc)
        assert torch.equal(q[i, j], torch.clamp(torch.round(x[i, j] / sc), -127, 127).to(torch.int8))


@pytest.mark.parametrize("qmin,qmax,fn", [(-128, 127, "q8_linear"), (-8, 7, "q4_linear")])
def test_ops_qat_linear_forward_backward_reference(qmin, qmax, fn):
    """ops.md q8_linear and its backward (lsq_linear_backward), float64 reference, 1e-5 relative."""
    g = torch.Generator().manual_seed(0)
    M, K, N = 7, 20, 9
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g, requires_grad=True)
    ba = (0.1 * torch.randn(K, generator=g)).requires_grad_()
    sa, sw = T(0.02, requires_grad=True), T(0.05)
    y = getattr(ops, fn)(x, ba, W, sa, sw, EPS)
    G = torch.randn(M, N, generator=g)
    y.backward(G)
    v = (x.detach() + ba.detach()) / T(0.02)
    Qx = torch.clamp(torch.round(v), qmin, qmax).double()
    Qw = torch.clamp(torch.round(W.detach() / sw), qmin, qmax).double()
    s_a, s_w = float(T(0.02)), float(sw)
    assert _rel(y, (Qx @ Qw.t()) * s_a * s_w) < 1e-5
    gA = (G.double() @ Qw) * s_w
    gx = gA * ((v >= qmin) & (v <= qmax)).double()
    assert _rel(x.grad, gx) < 1e-5
    assert _rel(ba.grad, gx.sum(0)) < 1e-5
    assert _rel(W.grad, (G.double().t() @ Qx) * s_a) < 1e-5
    R = torch.where(v < qmin, float(qmin), torch.where(v > qmax, float(qmax), torch.round(v) - v)).double()
    assert float(sa.grad) == pytest.approx(float((R * gA).sum() / math.sqrt(x.numel() * qmax)), rel=1e-5)
    assert (v > qmax).any() or (v < qmin).any()  # the clip terms are exercised


def test_ops_q8_linear_errors_dtypes_nan():
    l = Q8Linear(16, 8)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        y = l(torch.randn(2, 3, 16, dtype=dt))
        assert y.dtype == dt and y.shape == (2, 3, 8)  # x's dtype, any leading dims
    with pytest.raises(RuntimeError, match="empty batch"):
        l(torch.randn(0, 16))
    with torch.no_grad():
        l.scale_a.fill_(float("nan"))
    l._scale_a_ready = True
    assert l(torch.randn(4, 16)).isnan().all()  # invalid step -> NaN output, no error
    # no gradient reaches scale_w or eps
    sw, eps = T(0.05, requires_grad=True), T(1e-5, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    ops.q8_linear(x, torch.zeros(8), torch.randn(4, 8), T(0.1), sw, eps).sum().backward()
    assert sw.grad is None and eps.grad is None and x.grad is not None


def test_ops_int8_backward_within_3_percent():
    a = Q8Linear(256, 128)
    b = Q8Linear(256, 128, int8_backward=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, 256)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    G = torch.randn(64, 128)
    ya, yb = a(xa), b(xb)
    assert torch.equal(ya, yb)  # forward unchanged
    ya.backward(G)
    yb.backward(G)
    assert _rel(xb.grad, xa.grad) < 0.03
    assert torch.equal(a.weight.grad, b.weight.grad)  # the weight gradient stays float


def test_ops_q4_conv2d_reference_and_output_size():
    c = Q4Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    x = torch.randn(2, 6, 9, 8)
    y = c(x)
    Ho = (9 + 2 * 1 - 1 * (3 - 1) - 1) // 2 + 1
    Wo = (8 + 0 - 2 * (2 - 1) - 1) // 1 + 1
    assert y.shape == (2, 4, Ho, Wo)
    s_a, s_w = float(c.scale_a), float(c.scale_w)
    Qx = torch.clamp(torch.round((x + c.bias_a.detach().view(1, -1, 1, 1)) / T(s_a)), -8, 7)
    Qw = torch.clamp(torch.round(c.weight.detach() / T(s_w)), -8, 7)
    ref = torch.nn.functional.conv2d(Qx.double(), Qw.double(), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                                     groups=2) * s_a * s_w
    assert _rel(y, ref) < 1e-5
    c.eval()
    c.generate_quantized_weight()
    assert c.qweight.shape == (4, 3, 2, 2)  # (O, kh, kw, ceil((C/groups)/2))
    assert c(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)


def test_ops_q4_matmul_reference_broadcast_and_save_codes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 16, generator=g, requires_grad=True)
    y = torch.randn(3, 4, 16, generator=g, requires_grad=True)
    xc, yc = T(0.2, requires_grad=True), T(0.15, requires_grad=True)
    out = ops.q4_matmul(x, y, xc, yc, EPS)
    G = torch.randn(out.shape, generator=g)
    out.backward(G)
    ux, uy = x.detach() / T(0.2), y.detach() / T(0.15)
    xh, yh = (torch.clamp(torch.round(ux), -8, 7) * 0.2).double(), (torch.clamp(torch.round(uy), -8, 7) * 0.15).double()
    assert out.shape == (2, 3, 5, 4) and _rel(out, xh @ yh.transpose(-1, -2)) < 1e-5
    gX = G.double() @ yh
    gY = (G.double().transpose(-1, -2) @ xh).sum(0)  # summed back over the broadcast dim
    m = lambda u: ((u >= -8) & (u <= 7)).double()  # noqa: E731
    R = lambda u: torch.where(u < -8, -8., torch.where(u > 7, 7., torch.round(u) - u)).double()  # noqa: E731
    assert _rel(x.grad, gX * m(ux)) < 1e-5 and _rel(y.grad, gY * m(uy)) < 1e-5
    assert float(xc.grad) == pytest.approx(float((R(ux) * gX).sum() / math.sqrt(x.numel() * 7)), rel=1e-5)
    assert float(yc.grad) == pytest.approx(float((R(uy) * gY).sum() / math.sqrt(y.numel() * 7)), rel=1e-5)
    a, b = torch.randn(2, 5, 7), torch.randn(3, 7)
    r = torch.ops.lowbit.q4_matmul_forward(a, b, T(0.1), T(0.1), EPS, False)
    assert r[1].numel() == 0 and r[2].numel() == 0  # codes not written without save_codes
    assert torch.equal(r[0], ops.q4_matmul(a, b, T(0.1), T(0.1), EPS))
    assert Q4MatMul()(torch.randn(5, 16), torch.randn(4, 16)).shape == (5, 4)  # 2-D inputs


def test_ops_wq_quantize_rtn_modes():
    op = torch.ops.lowbit.wq_quantize_rtn
    W = T([[-1.0, 0.5, 2.0, 0.25], [0.3, 0.3, 0.3, 0.3], [1.0, 2.0, 3.0, 4.0]])
    q, s, z = op(W, 2, 4, "float_zero")  # s = (max-min)/3, z = -min, q = rne((w+z)/s)
    assert q.shape == (4, 3) and q.t().tolist() == [[0, 2, 3, 1], [0, 0, 0, 0], [0, 1, 2, 3]]
    assert s.tolist() == [[1.0, 1.0, 1.0]]  # all-equal group: s = 1
    assert z.flatten().tolist() == pytest.approx([1.0, -0.3, -1.0])
    q, s, z = op(W, 2, 4, "int_zero")  # range widened to 0; z = 0 -> mirrored (-s, 2^b - 1, 2^b - 1 - q)
    assert q.t().tolist() == [[0, 1, 3, 1], [0, 0, 0, 0], [2, 1, 1, 0]]
    assert s.flatten().tolist() == pytest.approx([1.0, -0.1, -4 / 3]) and z.tolist() == [[1.0, 3.0, 3.0]]
    q, s, z = op(W, 2, 4, "int_zero_sym")  # s = 2 max|w| / (2^b - 1), z = 2^(b-1)
    assert s.flatten().tolist() == pytest.approx([4 / 3, 0.2, 8 / 3]) and z.tolist() == [[2.0, 2.0, 2.0]]
    assert q.t().tolist() == [[1, 2, 3, 2], [3, 3, 3, 3], [2, 3, 3, 3]]


def test_ops_wq_linear_and_backward():
    lin = torch.nn.Linear(64, 8)
    m = MBWQLinear.from_float(lin, w_bit=4, group_size=32)
    sd = m.state_dict()
    c = torch.rand(1, 1, 64) + 0.5
    sd["channel_scale"] = c
    m2 = MBWQLinear(64, 8, w_bit=4, group_size=32, use_mbw=False, disable_bias=False, dtype=torch.float32)
    m2.load_state_dict(sd)
    m2.prepare_params()
    W = m.dequantized_weight()
    x = torch.randn(3, 64, requires_grad=True)
    y = m2(x)
    assert torch.allclose(y, (x.detach() * c.reshape(-1)) @ W.t() + lin.bias.detach(), atol=1e-5)  # y = (x*c)W + b
    G = torch.randn(3, 8)
    y.backward(G)
    assert torch.allclose(x.grad, (G @ W) * c.reshape(-1), atol=1e-5)  # grad_x = (G W^T) * c
    assert torch.allclose(m2.dequantized_weight(), W * c.reshape(1, -1))  # channel_scale folded in


_OPCHECK_OK = ["qat_alpha", "q4_conv2d_forward", "q4_matmul_forward", "wq_linear_forward", "wq_linear_grad_input",
               "wq_unpack_zeros"]


def _opcheck_args(name, tmp):
    K, N = 64, 8
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (K, N), dtype=torch.int32, generator=g)
    qw = torch.ops.lowbit.wq_pack(codes, [4], [K])
    g_idx = (torch.arange(K) // 32).to(torch.int32)
    sc, zr = torch.rand(2, N, generator=g), torch.randn(2, N, generator=g)
    path = os.path.join(tmp, "a.safetensors")
    if not os.path.exists(path):
        lowbit.io.save_file({"a": torch.randn(3)}, path)
    return {
        "qat_alpha": (T(0.5), T(0.25), EPS),
        "q4_conv2d_forward": (torch.randn(2, 4, 6, 5), torch.zeros(4), torch.randn(6, 2, 3, 3), T(0.05), T(0.01), EPS,
                              [2, 1], [1, 1], [1, 2], 2),
        "q4_matmul_forward": (torch.randn(2, 5, 7), torch.randn(3, 7), T(0.05), T(0.04), EPS, True),
        "wq_linear_forward": (torch.randn(3, K), qw, sc, zr, g_idx, None, None, [4], [K], False),
        "wq_linear_grad_input": (torch.randn(3, N), qw, sc, zr, g_idx, None, None, [4], [K], False),
        "wq_unpack_zeros": (torch.randint(0, 2 ** 31 - 1, (2, 1), dtype=torch.int32, generator=g), 4, N,
                            torch.float16),
        "wq_pack": (codes, [4], [K]),
        "wq_unpack": (qw, [4], [K]),
        "wq_pack_zeros": (torch.randint(1, 17, (2, N), dtype=torch.int32, generator=g), 4),
        "wq_quantize_rtn": (torch.randn(N, K, generator=g), 4, 32, "float_zero"),
        "wq_gba_decode": (torch.randint(0, 256, (2, 1, N), dtype=torch.uint8, generator=g), torch.randn(2, 1, 1),
                          torch.rand(2, 1, 1), torch.randn(2, 1, 1), torch.rand(2, 1, 1), False, N),
        "wq_mbwq_layout": (None, K, 16, 4, 32),
        "wq_check_perm": (torch.randperm(K, generator=g).to(torch.int16), K),
        "wq_permute_rows": (qw, 4, torch.randperm(K, generator=g).to(torch.int32)),
        "wq_sort_groups": (qw, g_idx.flip(0).contiguous(), 4),
        "wq_check_g_idx": (g_idx, K, 2),
        "safetensors_load": (path,),
        "safetensors_metadata": (path,),
    }[name]


def _opcheck(name, tmp):
    from torch.library import opcheck

    results = opcheck(getattr(torch.ops.lowbit, name).default, _opcheck_args(name, tmp))
    assert all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.parametrize("name", _OPCHECK_OK)
def test_readme_opcheck_ops_not_in_test_opcheck(name, tmp_path):
    """README / api.md: the compute ops pass torch.library.opcheck (those tests/python/test_opcheck.py skips)."""
    _opcheck(name, str(tmp_path))


# ============================================================================================ formats.md


def test_formats_q8_example():
    codes = ops.quantize_s8(T([[0.10, -0.26, 0.005]]), None, T(0.002), EPS, -128, 127)
    assert codes.tolist() == [[50, -128, 2]]  # -130 clamped, 2.5 -> 2 (ties to even)


def test_formats_int4_pairs_example_and_layouts():
    packed = ops.pack_s4(T([-8, 7, 1], dtype=torch.int8))
    assert [v & 0xFF for v in packed.tolist()] == [0x87, 0x10] and packed.tolist() == [-121, 16]
    assert ops.unpack_s4(packed, 3).tolist() == [-8, 7, 1]  # sign-extended
    with pytest.raises(RuntimeError):
        ops.pack_s4(T([8], dtype=torch.int8))
    q4 = Q4Linear(33, 5)
    q4(torch.randn(2, 33))
    q4.generate_quantized_weight()
    assert q4.qweight.shape == (5, 17) and "qweight" in q4._buffers  # a buffer, same key as BIE
    ref = ops.pack_s4(ops.quantize_s8(q4.weight.detach(), None, q4.scale_w, q4.eps, -8, 7))
    assert torch.equal(q4.qweight, ref)
    c = Q4Conv2d(6, 4, (3, 2), groups=2)
    c(torch.randn(1, 6, 5, 5))
    c.generate_quantized_weight()
    ohwi = ops.quantize_s8(c.weight.detach().permute(0, 2, 3, 1).contiguous(), None, c.scale_w, c.eps, -8, 7)
    assert c.qweight.shape == (4, 3, 2, 2) and torch.equal(c.qweight, ops.pack_s4(ohwi))
    assert c.state_dict()._metadata[""]["version"] == 2


def test_formats_bie_conv_qweight_conversion():
    from lowbit.compat import Q4Conv2dCutlass

    c = Q4Conv2dCutlass(4, 6, 3, 1, 1)
    x = torch.randn(2, 4, 6, 6)
    c(x)
    c.eval()
    y = c(x)
    codes = ops.quantize_s8(c.weight.detach(), None, c.scale_w, c.eps, -8, 7)  # OIHW memory order, rows of C
    bie_q = ops.pack_s4(codes.reshape(-1, 4)).reshape(6, 3, 3, 2)
    qonly = {k: v for k, v in c.state_dict().items() if k != "weight"}
    qonly["qweight"] = bie_q
    n = Q4Conv2dCutlass(4, 6, 3, 1, 1)
    n.load_state_dict(dict(qonly))
    assert torch.equal(n.eval()(x), y)  # unmarked qweight-only: BIE's layout for the compat class
    n = Q4Conv2d(4, 6, 3, 1, 1)
    n.load_state_dict(dict(qonly))
    assert not torch.equal(n.eval()(x), y)  # ... and lowbit's for lowbit.nn.Q4Conv2d
    full = dict(c.state_dict())
    full["qweight"] = bie_q
    n = Q4Conv2d(4, 6, 3, 1, 1)
    n.load_state_dict(full)
    assert torch.equal(n.eval()(x), y)  # with the float weight: whichever layout holds Q(weight)
    gen = torch.Generator().manual_seed(0)
    full["qweight"] = torch.randint(-100, 100, bie_q.shape, dtype=torch.int8, generator=gen)
    n = Q4Conv2d(4, 6, 3, 1, 1)
    with pytest.warns(UserWarning, match="matches neither layout"):
        n.load_state_dict(full)
    assert torch.equal(n.eval()(x), y)  # stale: dropped and re-derived


def test_formats_row_and_segment_packing_examples():
    codes = torch.arange(1, 9, dtype=torch.int32).reshape(8, 1)
    w = torch.ops.lowbit.wq_pack(codes, [4], [8])
    assert w.shape == (4, 1)  # (ceil(K/32)*b, N): the partial chunk padded with zero codes
    assert [v & 0xFFFFFFFF for v in w.flatten().tolist()] == [0x87654321, 0, 0, 0]
    for row, words in ((10, [0xC0000000, 0x1, 0x0]), (21, [0x0, 0x80000000, 0x3])):  # 3-bit rows straddle words
        c = torch.zeros(32, 1, dtype=torch.int32)
        c[row, 0] = 7
        w = torch.ops.lowbit.wq_pack(c, [3], [32])
        assert [v & 0xFFFFFFFF for v in w.flatten().tolist()] == words
        assert torch.equal(torch.ops.lowbit.wq_unpack(w, [3], [32]), c)
    z = torch.ops.lowbit.wq_pack_zeros(T([[1, 16, 5]], dtype=torch.int32), 4)  # holds z - 1
    assert z.tolist() == [[0x4F0]]
    assert torch.ops.lowbit.wq_unpack_zeros(z, 4, 3, torch.float32).tolist() == [[1.0, 16.0, 5.0]]


def test_formats_mbwq_q_groups_rows_and_keys():
    mix = MBWQLinear.from_float(torch.nn.Linear(64, 8), bits=[2, 4], bits_prop=[0.5, 0.5], group_size=32)
    assert mix.q_groups.dtype == torch.int16 and mix.q_groups.tolist() == [4, 0, 2, 4]  # (width, first word row)
    assert mix.rows == [0, 0, 0, 32, 32, 64, 8 + 2]  # [R8, R6, R5, R4, R3, R2, mask]
    assert "rows" not in mix.state_dict()
    assert sorted(mix.state_dict()) == ["bias", "channel_scale", "q_groups", "q_perm", "qweight", "scales", "zeros"]
    lin = torch.nn.Linear(64, 48)
    assert sorted(MPQLinear.from_float(lin, group_size=32).state_dict()) == ["bias", "g_idx", "qweight", "qzeros",
                                                                           "scales"]
    assert sorted(MPQLinear.from_float(lin, group_size=32, asym=False).state_dict()) == ["bias", "g_idx", "qweight",
                                                                                         "scales", "zeros"]
    assert sorted(MBWQLinear.from_float(lin, group_size=32).state_dict()) == ["bias", "channel_scale", "q_perm",
                                                                              "qweight", "scales", "zeros"]


def test_formats_mirrored_grid_all_positive_group():
    lp = torch.nn.Linear(64, 4)
    with torch.no_grad():
        lp.weight.uniform_(0.5, 1.0)
    m = MPQLinear.from_float(lp, w_bit=4, group_size=32)  # asym GPTQ format
    assert (m.scales < 0).all()  # scale -s, z = 2^b - 1
    assert (m._buffers["_rt_zeros"] == 15).all()
    err = (m.dequantized_weight(torch.float32) - lp.weight.detach()).abs()  # (N, K)
    half = (m.scales.abs() / 2).t().repeat_interleave(32, 1)  # (N, K)
    assert (err <= half * (1 + 1e-5)).all()  # every weight within half a step


def test_formats_q_perm_identity_and_uint16():
    lin = torch.nn.Linear(64, 8)
    mix = MBWQLinear.from_float(lin, bits=[4, 2], bits_prop=[0.5, 0.5], group_size=32)
    assert not mix.q_perm.any()  # all zeros = identity, also in channel-mix
    x = torch.randn(2, 64)
    assert torch.allclose(mix(x), x @ mix.dequantized_weight().t() + lin.bias.detach(), atol=1e-5)
    K = 40000
    big = torch.nn.Linear(K, 2)
    m = MBWQLinear.from_float(big, w_bit=8, group_size=-1, perm=torch.randperm(K))
    assert (m.q_perm < 0).any()  # values > 32767 stored in int16, read as uint16
    assert (m.dequantized_weight() - big.weight.detach()).abs().max() < 1e-3


def test_formats_mlx_layout():
    lin = torch.nn.Linear(64, 48)
    s = MPQLinear.from_float(lin, w_bit=4, group_size=32, asym=False)
    d = s.to_mlx()
    assert d["weight"].dtype == torch.uint32 and d["weight"].shape == (48, 64 * 4 // 32)
    assert torch.equal(d["weight"].view(torch.int32), s.qweight.t())
    assert torch.equal(d["scales"], s.scales.t()) and torch.equal(d["biases"], -s.zeros.t())
    w = d["weight"].view(torch.int32)
    q = torch.stack([(w >> (4 * i)) & 15 for i in range(8)], -1).reshape(48, 64).float()  # LSB first
    W = d["scales"].repeat_interleave(32, 1) * q + d["biases"].repeat_interleave(32, 1)  # scale*q + bias
    assert torch.allclose(W, s.dequantized_weight(torch.float32), atol=1e-6)
    r = MPQLinear.from_mlx(d["weight"], d["scales"], d["biases"], 32, 4, bias=d["bias"])
    x = torch.randn(3, 64)
    assert torch.equal(r(x), s(x))
    with pytest.raises(ValueError):
        MPQLinear.from_float(lin, w_bit=4, group_size=32).to_mlx()  # sym format only


# ============================================================================================ compat.md


def test_compat_all_layers():
    q = Q8Linear(16, 8)
    q(torch.randn(2, 16))
    q.generate_quantized_weight()
    assert "qweight" in q._buffers and "qweight" not in dict(q.named_parameters())  # packed weights are buffers
    q.set_weight_data(torch.randn(8, 16))
    assert q.weight.requires_grad  # the weight stays trainable
    with pytest.raises(ValueError):
        Q8Linear(16, 8, a_bit=4)  # must be 8
    with pytest.raises(ValueError):
        Q4Linear(16, 8, w_bit=8)


def test_compat_q8_init_state_checks():
    l = Q8Linear(16, 8)
    x = torch.randn(4, 16)
    l(x)
    assert float(l.scale_a) == pytest.approx(float(2 * x.abs().mean() / math.sqrt(127)), rel=1e-6)  # sqrt(127)
    with torch.no_grad():
        l.scale_a.zero_()
    l(x)
    assert float(l.scale_a) == 0.0  # a learned 0 is not re-initialised
    sd = l.state_dict()
    l2 = Q8Linear(16, 8)
    l2(torch.randn(4, 16))
    l2.load_state_dict(sd)
    l2(x)
    assert float(l2.scale_a) > 0  # ... but a loaded 0 is
    for key, val, msg in (("scale_a", float("nan"), "finite"), ("scale_w", 0.0, "> 0"), ("eps", -1.0, "> 0"),
                          ("scale_w", float("inf"), "finite")):
        bad = dict(sd)
        bad[key] = T(val)
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            Q8Linear(16, 8).load_state_dict(bad)
    bad = dict(sd)
    bad["qweight"] = torch.zeros(8, 15, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="qweight"):
        Q8Linear(16, 8).load_state_dict(bad)
    frozen = Q8Linear(16, 8)
    frozen(x)
    frozen.eval()
    frozen.generate_quantized_weight(qweight_only=True)
    assert frozen(x).shape == (4, 8)  # qweight_only inference works


def test_compat_q4_linear_scale_w_any_shapes_half_backward():
    q4 = Q4Linear(33, 5)  # any in_features; odd in packs a half-empty last byte
    assert float(q4.scale_w) == 1.0
    y = q4(torch.randn(3, 33))  # prepare_params() not called: derived on the first forward
    assert float(q4.scale_w) == pytest.approx(float(2 * q4.weight.detach().abs().mean() / 5.6345), rel=1e-5)
    assert y.abs().sum() > 0
    q = Q4Linear(16, 8)
    with torch.no_grad():
        q.scale_w.fill_(0.05)  # a step written by hand is used
    q(torch.randn(2, 16))
    assert float(q.scale_w) == pytest.approx(0.05)
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(5, 32, dtype=dt, requires_grad=True)
        Q4Linear(32, 8)(x).sum().backward()
        assert x.grad.dtype == dt


def test_compat_q4_conv2d_constructor_order():
    from lowbit.compat import Q4Conv2dCutlass

    c = Q4Conv2dCutlass(4, 6, 3, 1, 1, 1, 4, 4, None, torch.float)  # BIE's positional order
    assert c.padding == (1, 1) and c.groups == 1
    assert Q4Conv2dCutlass(4, 6, 3, groups=2).groups == 2
    with pytest.raises(TypeError):
        Q4Conv2dCutlass(4, 6, 3, 1, 1, 1, 4, 4, None, torch.float, 2)  # groups keyword-only
    c = Q4Conv2d(4, 6, 3, 1, 1, 1, 2)  # lowbit.nn: groups after dilation
    assert c.groups == 2
    assert Q4Conv2d(3, 5, (3, 1))(torch.randn(1, 3, 7, 4)).shape == (1, 5, 5, 4)  # rectangular, any H, W


def test_compat_q4_matmul_clips_from_own_operand():
    m = Q4MatMul()
    a, b = torch.randn(2, 3, 5, 16), 3 * torch.randn(3, 4, 16)
    assert m(a, b).shape == (2, 3, 5, 4)
    assert float(m.x_clip) == pytest.approx(float(2 * a.abs().mean() / math.sqrt(127)), rel=1e-6)
    assert float(m.y_clip) == pytest.approx(float(2 * b.abs().mean() / math.sqrt(127)), rel=1e-6)


def test_compat_weight_only():
    for K, N in ((5, 3), (1, 1), (33, 7)):  # any K >= 1, N >= 1
        lin = torch.nn.Linear(K, N)
        for layer in (MBWQLinear.from_float(lin, w_bit=4, group_size=-1),
                      MPQLinear.from_float(lin, w_bit=4, group_size=-1)):
            x = torch.randn(2, K)
            assert torch.allclose(layer(x), x @ layer.dequantized_weight().t() + lin.bias.detach(), atol=1e-5)
    lin = torch.nn.Linear(64, 48)
    b = MBWQLinear.from_float(lin, w_bit=4, group_size=32)
    assert b(torch.randn(5, 64)).shape == (5, 48)  # a 2-D input keeps its rank
    assert b.bfloat16()(torch.randn(5, 64).bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="requires_grad"):
        MPQLinear(64, 48, requires_grad=True)
    x = torch.randn(2, 64, requires_grad=True)
    MPQLinear.from_float(lin, group_size=32)(x).sum().backward()
    assert x.grad is not None  # input gradients flow
    m = MPQLinear.from_float(lin, w_bit=4, group_size=32)
    n = MPQLinear(64, 48, w_bit=4, group_size=32, use_gba_quant=False, disable_bias=True)
    n.load_state_dict(m.state_dict())
    with pytest.warns(UserWarning, match="drops a non-zero bias"):
        n.prepare_params()
    sd = dict(m.state_dict())
    sd["wf"] = torch.arange(8, dtype=torch.int32)  # dropped on load
    MPQLinear(64, 48, w_bit=4, group_size=32, use_gba_quant=False, disable_bias=False).load_state_dict(sd)
    sd = dict(m.state_dict())
    sd["g_idx"] = sd["g_idx"].clone()
    sd["g_idx"][3] = 7
    n = MPQLinear(64, 48, w_bit=4, group_size=32, use_gba_quant=False, disable_bias=False)
    n.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="g_idx"):
        n.prepare_params()  # checked at prepare_params()
    sd = dict(b.state_dict())
    sd["q_perm"] = torch.ones(64, dtype=torch.int16)
    n = MBWQLinear(64, 48, w_bit=4, group_size=32, use_mbw=False, disable_bias=False)
    n.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="permutation"):
        n.prepare_params()


def test_compat_gba_asym_prepared_int32_zeros_and_broadcast_errors():
    K, N = 64, 16
    g = MPQLinear.from_float(torch.nn.Linear(K, N), w_bit=4, group_size=32, asym=True)
    x = torch.randn(2, K)
    for drop_qzeros in (False, True):
        sd = dict(g.state_dict())
        sd["zeros"] = sd["qzeros"].clone()  # BIE's prepared asym layout: packed int32 zeros
        if drop_qzeros:
            del sd["qzeros"]
        a = MPQLinear(K, N, w_bit=4, group_size=32, use_gba_quant=True, asym=True, dtype=torch.float32,
                      disable_bias=False)
        a.load_state_dict(sd)
        a.prepare_params()
        assert torch.equal(a(x), g(x))
    b = MPQLinear(K, N, w_bit=8, group_size=32, use_gba_quant=True, asym=True, dq_group_size=4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        b.prepare_params()  # a clear error at prepare_params() naming the tensors
    b = MPQLinear(K, N, w_bit=4, group_size=32, use_gba_quant=True, asym=False, dq_mode=1, dq_group_size=4,
                  dtype=torch.float32)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        b.prepare_params()

"""lowbit.quantize (RTN, GPTQ, act-order, mixed-bit plan) and `lowbit quantize` (CPU, small models)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import cli
from lowbit.nn import MBWQLinear, MPQLinear
from lowbit.quantize import LAYERS, plan_bits

PYTHON_DIR = str(Path(lowbit.__file__).resolve().parent.parent)


def small_model(dtype=torch.float32):
    return nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype)


def correlated_batches(k, n_batches=4, rows=64, seed=0):
    """Inputs with strongly correlated features of very different scales (where GPTQ pays off)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.rand(k, generator=g) ** 3
    return [torch.randn(rows, k, generator=g) @ mix + 0.1 * torch.randn(rows, k, generator=g)
            for _ in range(n_batches)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def trained_mlp():
    """A tiny 2-layer MLP trained for a few Adam steps on a regression task, and its calibration batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    teacher = nn.Linear(64, 16)
    cal = correlated_batches(64, n_batches=4, rows=128, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.cat(cal)
    target = teacher(x).detach()
    for _ in range(10):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cal


# ------------------------------------------------------------------------------------------- RTN
@pytest.mark.parametrize("layer,cls", [("mbwq", MBWQLinear), ("mpq", MPQLinear)])
def test_rtn_replaces_matching_modules(layer, cls):
    model = small_model()
    q, report = lowbit.quantize(model, bits=4, group_size=32, layer=layer, exclude=["2"], progress=False)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear  # not in place
    assert type(q[0]) is cls and type(q[2]) is nn.Linear
    assert q[0].w_bit == 4 and q[0].group_size == 32 and q[0].dtype == torch.float32
    assert [r["name"] for r in report] == ["0"]
    x = torch.randn(16, 96)
    with torch.no_grad():
        assert rel(q(x), model(x)) < 0.1
    # in place, all layers
    q2, report2 = lowbit.quantize(model, bits=8, group_size=32, layer=layer, inplace=True, progress=False)
    assert q2 is model and type(model[0]) is cls and type(model[2]) is cls
    assert [r["name"] for r in report2] == ["0", "2"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer", ["mbwq", "mpq"])
def test_dtype_is_kept(dtype, layer):
    q, report = lowbit.quantize(small_model(dtype), bits=4, group_size=32, layer=layer, progress=False)
    for i in (0, 2):
        assert q[i].dtype == dtype and q[i].scales.dtype == dtype
    assert report[0]["weight_error"] < 0.1


def test_matches_from_float():
    model = small_model()
    q, _ = lowbit.quantize(model, bits=3, group_size=32, progress=False)
    ref = MBWQLinear.from_float(model[0], w_bit=3, group_size=32)
    assert torch.equal(q[0].qweight, ref.qweight) and torch.equal(q[0].scales, ref.scales)


@pytest.mark.parametrize("layer", ["mbwq", "mpq"])
def test_report_fields(layer):
    model = small_model()
    cal = correlated_batches(96, n_batches=2)
    q, report = lowbit.quantize(model, bits=4, group_size=32, layer=layer, calibration=cal, progress=False)
    r = report[0]
    assert (r["name"], r["in_features"], r["out_features"], r["bits"], r["group_size"]) == ("0", 96, 64, 4, 32)
    assert r["layer"] == ("MBWQLinear" if layer == "mbwq" else "MPQLinear")
    # bits per weight from the byte counts: qweight (K/32*b words x N int32) + fp32 scales (G x N) + zeros
    K, N, b, G = 96, 64, 4, 3
    qweight_bytes = (K // 32) * b * N * 4
    scales_bytes = G * N * 4
    zeros_bytes = G * N * 4 if layer == "mbwq" else G * math.ceil(N * b / 32) * 4  # float zeros / packed qzeros
    assert r["bits_per_weight"] == pytest.approx((qweight_bytes + scales_bytes + zeros_bytes) * 8 / (K * N))
    assert r["bits_per_weight"] == pytest.approx(6.0 if layer == "mbwq" else 5.125)
    W = model[0].weight.double()
    Wq = q[0].dequantized_weight(torch.float32).double()
    assert r["weight_error"] == pytest.approx(((W - Wq).norm() / W.norm()).item(), rel=1e-9)
    assert 0 < r["weight_error"] < 0.1
    X = torch.cat(cal).double()
    assert r["output_error"] == pytest.approx(((X @ (W - Wq).t()).norm() / (X @ W.t()).norm()).item(), rel=1e-6)
    assert r["bytes_before"] == (96 * 64 + 64) * 4
    assert r["bytes_after"] == sum(t.numel() * t.element_size() for t in q[0].state_dict().values())
    assert report.average_bits == pytest.approx(sum(x["bits_per_weight"] * x["in_features"] * x["out_features"]
                                                    for x in report) / (96 * 64 + 64 * 32))
    assert "weight err" in report.table() and "MBWQLinear" in str(report) or "MPQLinear" in str(report)
    _, no_cal = lowbit.quantize(model, bits=4, group_size=32, layer=layer, progress=False)
    assert no_cal[0]["output_error"] is None and no_cal[0]["weight_error"] == pytest.approx(r["weight_error"])


# ------------------------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("layer,bits", [("mbwq", 3), ("mbwq", 4), ("mpq", 4), ("mpq", 2)])
def test_gptq_beats_rtn_on_calibration_data(trained_mlp, layer, bits):
    model, cal = trained_mlp
    kw = dict(bits=bits, group_size=32, layer=layer, calibration=cal, progress=False)
    q_rtn, rep_rtn = lowbit.quantize(model, method="rtn", **kw)
    q_gptq, rep_gptq = lowbit.quantize(model, method="gptq", **kw)
    for a, b in zip(rep_gptq, rep_rtn):  # per layer, on the layer's own calibration inputs
        assert a["output_error"] < (0.9 if bits > 2 else 1.0) * b["output_error"], (a, b)
    X = torch.cat(cal)
    with torch.no_grad():
        ref = model(X)
        assert rel(q_gptq(X), ref) < rel(q_rtn(X), ref)


@pytest.mark.parametrize("layer", ["mbwq", "mpq"])
def test_gptq_act_order(trained_mlp, layer, tmp_path):
    model, cal = trained_mlp
    kw = dict(bits=4, group_size=32, layer=layer, calibration=cal, progress=False)
    q_ao, rep_ao = lowbit.quantize(model, method="gptq", act_order=True, **kw)
    _, rep_rtn = lowbit.quantize(model, method="rtn", **kw)
    sd = q_ao[0].state_dict()
    K = 64
    if layer == "mpq":
        g_idx = sd["g_idx"].long()  # checkpoint order: the group of each input channel
        assert bool((g_idx[1:] < g_idx[:-1]).any()), "act-order g_idx should be non-monotone"
        assert torch.equal(torch.bincount(g_idx), torch.full((K // 32,), 32))
    else:
        perm = sd["q_perm"].long()
        assert sorted(perm.tolist()) == list(range(K)) and not torch.equal(perm, torch.arange(K))
    for a, b in zip(rep_ao, rep_rtn):
        assert a["output_error"] < b["output_error"]
    # the layer computes with the weight it reports, and a save/load round trip keeps it
    X = torch.cat(cal)
    W = q_ao[0].dequantized_weight(torch.float32)
    with torch.no_grad():
        assert rel(q_ao[0](X), X @ W.t() + q_ao[0].bias) < 1e-5
    lowbit.save(q_ao, tmp_path)
    back = lowbit.prepare_layers(lowbit.load(tmp_path, nn.Sequential(nn.Linear(64, 128), nn.ReLU(),
                                                                       nn.Linear(128, 16))))
    with torch.no_grad():
        assert torch.equal(back(X), q_ao(X))


# ------------------------------------------------------------------------------------------- mixed-bit plan
def test_budget_plan_gives_bits_to_the_sensitive_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        # layer 0: every row of every 64-group spans [-1, 1] on the 2-bit grid: (almost) no error at 2 bits
        levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
        w = levels[torch.randint(0, 4, (64, 64))]
        w[:, 0], w[:, 1] = -1.0, 1.0
        model[0].weight.copy_(w)
        model[1].weight.normal_()  # Gaussian: large error at 2 bits
    # fp32 scales + zeros per 64 weights add 1 bit: widths 2/3/4/8 cost 3/4/5/9 bits per weight
    q, report = lowbit.quantize(model, group_size=64, budget_bits=6.0, progress=False)
    bits = {r["name"]: r["bits"] for r in report}
    assert bits == {"0": 2, "1": 8}
    assert report.average_bits <= 6.0 and report.budget_bits == 6.0
    assert set(report[1]["candidates"]) == {2, 3, 4, 8}
    assert type(q[0]) is MBWQLinear and q[0].w_bit == 2 and q[1].w_bit == 8
    # a tighter budget: the sensitive layer still gets the extra bits
    _, report = lowbit.quantize(model, group_size=64, budget_bits=4.0, progress=False)
    assert [r["bits"] for r in report] == [2, 4] and report.average_bits <= 4.0


def test_budget_plan_meets_the_budget(trained_mlp):
    model, cal = trained_mlp
    for layer in ("mbwq", "mpq"):
        for budget in (4.2, 5.5, 7.0):  # fp32 scales + zeros per 32 weights: +2 bits
            _, report = lowbit.quantize(model, group_size=32, layer=layer, budget_bits=budget, progress=False)
            assert report.average_bits <= budget + 1e-9
            widths = {2, 3, 4, 8} if layer == "mbwq" else {2, 4, 8}
            assert all(r["bits"] in widths for r in report)
    _, rep = lowbit.quantize(model, group_size=32, method="gptq", calibration=cal, budget_bits=5.5, progress=False)
    assert rep.average_bits <= 5.5 and all(r["output_error"] is not None for r in rep)


def test_plan_bits_greedy():
    # layer 1's error falls much faster per bit: it is upgraded first
    cands = [{2: (2.5, 0.10), 4: (4.5, 0.05)}, {2: (2.5, 0.60), 4: (4.5, 0.10)}]
    assert plan_bits(cands, [100, 100], 3.5) == [2, 4]
    assert plan_bits(cands, [100, 100], 4.5) == [4, 4]
    with pytest.raises(ValueError, match="below"):
        plan_bits(cands, [100, 100], 2.0)


# ------------------------------------------------------------------------------------------- bad arguments
def test_bad_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="method"):
        lowbit.quantize(model, method="awq", progress=False)
    with pytest.raises(ValueError, match="layer"):
        lowbit.quantize(model, layer="exl2", progress=False)
    with pytest.raises(ValueError, match="bits"):
        lowbit.quantize(model, bits=3, layer="mpq", progress=False)
    with pytest.raises(ValueError, match="below what the narrowest"):
        lowbit.quantize(model, group_size=32, budget_bits=2.0, progress=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lowbit.quantize(model, include=["encoder.*"], progress=False)
    with pytest.raises(ValueError, match="calibration"):
        lowbit.quantize(model, method="gptq", progress=False)
    with pytest.raises(ValueError, match="act_order"):
        lowbit.quantize(model, act_order=True, progress=False)


def test_argument_types():
    model = small_model()
    cases = [(dict(bits=4.0), TypeError, r"bits must be an int, got 4\.0 \(float\)"),
             (dict(bits="4"), TypeError, r"bits must be an int, got '4' \(str\)"),
             (dict(bits=True), TypeError, r"bits must be an int, got True \(bool\)"),
             (dict(bits=7), ValueError, r"mbwq layers take bits in .*, got 7"),
             (dict(group_size=32.0), TypeError, r"group_size must be an int, got 32\.0"),
             (dict(group_size=0), ValueError, "group_size must be >= 1 or -1"),
             (dict(budget_bits=4, candidate_bits="24"), TypeError,
              "candidate_bits must be a sequence of ints, got the string '24'"),
             (dict(budget_bits=4, candidate_bits=(2, 4.0)), TypeError, r"candidate_bits must hold ints, got 4\.0"),
             (dict(budget_bits=4, candidate_bits=4), TypeError, "candidate_bits must be a sequence of ints, got int"),
             (dict(budget_bits=4, candidate_bits=(7, 4)), ValueError, r"candidate_bits \[7\] are no width"),
             (dict(budget_bits=4, layer="mpq", candidate_bits=(3,)), ValueError, "none of candidate_bits"),
             (dict(budget_bits="4"), TypeError, "budget_bits must be a number or None, got '4'"),
             (dict(budget_bits=float("nan")), ValueError, "budget_bits must be > 0"),
             (dict(method="gptq", calibration=[torch.randn(4, 96)], damp=-0.1), ValueError, "damp"),
             (dict(method="gptq", calibration=[torch.randn(4, 96)], block_size=0), ValueError, "block_size"),
             (dict(method="gptq", calibration=[torch.randn(4, 96)], act_order=1), TypeError,
              "act_order must be a bool"),
             (dict(include="0"), TypeError, "include takes a list of fnmatch patterns, not a string"),
             (dict(exclude="2"), TypeError, "exclude takes a list"),
             (dict(exclude=[2]), TypeError, "exclude must hold str patterns"),
             (dict(inplace=1), TypeError, "inplace must be a bool")]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            lowbit.quantize(model, progress=False, **kw)
    assert type(model[0]) is nn.Linear  # nothing happened to the model
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lowbit.quantize([model], progress=False)
    # mpq skips a width it does not take (documented), the rest of a budget plan goes on
    _, report = lowbit.quantize(model, group_size=32, layer="mpq", budget_bits=5.2, candidate_bits=[3, 4],
                                progress=False)
    assert [r["bits"] for r in report] == [4, 4]


@pytest.mark.parametrize("layer", ["mbwq", "mpq"])
def test_shared_linear_is_quantized_once_and_stays_shared(layer, tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(8, 32)
    q, report = lowbit.quantize(model, bits=4, group_size=16, layer=layer, progress=False)
    assert type(q[0]) is LAYERS[layer] and q[0] is q[2]
    assert [r["name"] for r in report] == ["0"]  # one layer, reported under its first name
    assert type(model[0]) is nn.Linear and model[0] is model[2]  # the original is untouched
    with torch.no_grad():
        assert rel(q(x), model(x)) < 0.1
        assert torch.equal(q(x), q[0](torch.relu(q[0](x))))
    # GPTQ: one Hessian from both uses (the layer's inputs at '0' and at '2')
    cal = [torch.randn(16, 32) for _ in range(2)]
    qg, rep = lowbit.quantize(model, bits=4, group_size=16, layer=layer, method="gptq", calibration=cal,
                              progress=False)
    assert qg[0] is qg[2] and len(rep) == 1
    X = torch.cat([torch.cat([c, torch.relu(model[0](c))]) for c in cal]).detach().double()
    W = model[0].weight.detach().double()
    D = W - qg[0].dequantized_weight(torch.float32).double()
    assert rep[0]["output_error"] == pytest.approx(((X @ D.t()).norm() / (X @ W.t()).norm()).item(), rel=1e-6)
    # in place, and saved / loaded into a tied skeleton: still one layer
    q2, _ = lowbit.quantize(model, bits=4, group_size=16, layer=layer, inplace=True, progress=False)
    assert q2 is model and model[0] is model[2] and type(model[0]) is LAYERS[layer]
    lowbit.save(model, tmp_path)
    tied = nn.Linear(32, 32)
    back = lowbit.prepare_layers(lowbit.load(tmp_path, nn.Sequential(tied, nn.ReLU(), tied)))
    assert back[0] is back[2]
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_shared_linear_selected_at_one_name_only_is_refused():
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"used at 2 names \(tied\).*select \['0'\] but not \['2'\]"):
        lowbit.quantize(model, group_size=16, exclude=["2"], progress=False)
    q, report = lowbit.quantize(model, group_size=16, exclude=["0", "2"], progress=False)  # all its names: fine
    assert q[0] is q[2] and type(q[0]) is nn.Linear and [r["name"] for r in report] == ["3"]


# ------------------------------------------------------------------------------------------- CLI
def test_cli_quantize_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(10, 96), "mlp": small_model(), "lm_head": nn.Linear(32, 10)})
    lowbit.io.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "float.safetensors")
    dst = tmp_path / "q"
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(tmp_path / "float.safetensors"), str(dst),
                        "--bits", "4", "--group-size", "32"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "mlp.0" in r.stdout and "mlp.2" in r.stdout and "bits per weight" in r.stdout
    assert "lm_head " not in r.stdout and "embed " not in r.stdout  # excluded by default
    skeleton = nn.ModuleDict({"embed": nn.Embedding(10, 96), "mlp": small_model(), "lm_head": nn.Linear(32, 10)})
    q = lowbit.prepare_layers(lowbit.load(dst, skeleton))
    assert type(q["mlp"][0]) is MBWQLinear and type(q["mlp"][2]) is MBWQLinear
    assert type(q["lm_head"]) is nn.Linear and torch.equal(q["lm_head"].weight, model["lm_head"].weight)
    assert torch.equal(q["embed"].weight, model["embed"].weight)
    x = torch.randn(16, 96)
    with torch.no_grad():
        assert rel(q["mlp"](x), model["mlp"](x)) < 0.1
        ref, _ = lowbit.quantize(model["mlp"], bits=4, group_size=32, progress=False)
        assert torch.equal(q["mlp"](x), ref(x))  # same layers as the Python API
    # a lowbit checkpoint directory as SRC, MPQ layers, a budget plan
    lowbit.save(model, tmp_path / "float_dir")
    assert cli.main(["quantize", str(tmp_path / "float_dir"), str(tmp_path / "q2"), "--layer", "mpq",
                     "--budget-bits", "5", "--group-size", "32", "--exclude", "mlp.2", "--no-progress"]) == 0
    q2 = lowbit.prepare_layers(lowbit.load(tmp_path / "q2", nn.ModuleDict(
        {"embed": nn.Embedding(10, 96), "mlp": small_model(), "lm_head": nn.Linear(32, 10)})))
    assert type(q2["mlp"][0]) is MPQLinear and type(q2["mlp"][2]) is nn.Linear


def test_cli_quantize_help_and_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--bits", "--group-size", "--method", "--layer", "--budget-bits", "--candidate-bits", "--include",
                 "--exclude", "--no-default-exclude", "--no-progress", "Python API"):
        assert flag in out
    src = tmp_path / "f.safetensors"
    lowbit.io.save_file(small_model().state_dict(), src)
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", str(src), str(tmp_path / "o"), "--method", "awq"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert cli.main(["quantize", str(src), str(tmp_path / "o"), "--method", "gptq"]) == 2
    assert "calibration" in capsys.readouterr().err
    assert cli.main(["quantize", str(src), str(tmp_path / "o"), "--budget-bits", "1.5", "--no-progress"]) == 2
    assert "below what the narrowest" in capsys.readouterr().err
    assert cli.main(["quantize", str(src), str(tmp_path / "o"), "--include", "encoder.*"]) == 2
    assert "no 2-D float" in capsys.readouterr().err
    assert cli.main(["quantize", str(src), str(tmp_path / "o"), "--bits", "3", "--layer", "mpq"]) == 2
    assert "bits" in capsys.readouterr().err
    assert cli.main(["quantize", str(tmp_path / "missing.safetensors"), str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()

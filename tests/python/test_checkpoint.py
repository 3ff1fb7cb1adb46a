"""lowbit.save / lowbit.load: a converted, trained, frozen model comes back identical from a directory."""
import json
import os
import warnings

import pytest
import torch

import lowbit
from lowbit.nn import Q4Conv2d, Q4Linear, Q8Linear


def _cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 8, 3, stride=2),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 3 * 3, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def _trained_frozen(device):
    torch.manual_seed(0)
    model = lowbit.convert(_cnn().to(device), "q4", exclude=["7"])
    x = torch.randn(8, 3, 8, 8, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for m in model.modules():
        if isinstance(m, (Q4Linear, Q4Conv2d)):
            m.generate_quantized_weight(qweight_only=True)
    return model, x


def test_save_load_round_trip(device, tmp_path):
    model, x = _trained_frozen(device)
    y = model(x)
    lowbit.save(model, tmp_path)
    cfg = json.loads((tmp_path / "lowbit.json").read_text())
    assert cfg["format"] == "lowbit-checkpoint" and set(cfg["layers"]) == {"0", "2", "5"}
    assert cfg["layers"]["2"]["args"]["stride"] == [2, 2]
    state = lowbit.io.load_file(tmp_path / "model.safetensors")
    assert "0.qweight" in state and "0.weight" not in state and state["0.qweight"].dtype == torch.int8
    fresh = _cnn().to(device)  # the float architecture; its layers are rebuilt from the config
    loaded = lowbit.load(tmp_path, fresh).eval()
    assert isinstance(loaded[0], Q4Conv2d) and loaded[0].weight is None and type(loaded[7]) is torch.nn.Linear
    assert torch.equal(loaded(x), y)


def test_checkpoint_readable_by_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model, _ = _trained_frozen("cpu")
    lowbit.save(model, tmp_path)
    other = st.load_file(os.fspath(tmp_path / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(other[k], v)


def test_load_rejects_bad_configs(tmp_path):
    model, _ = _trained_frozen("cpu")
    lowbit.save(model, tmp_path)
    cfg_path = tmp_path / "lowbit.json"
    cfg = json.loads(cfg_path.read_text())
    bad = dict(cfg, layers={"0": {"class": "Q5Linear", "args": {}}})
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown class"):
        lowbit.load(tmp_path, _cnn())
    cfg_path.write_text(json.dumps(dict(cfg, layers={"9": cfg["layers"]["0"]})))
    with pytest.raises(ValueError, match="no module '9'"):
        lowbit.load(tmp_path, _cnn())
    cfg_path.write_text(json.dumps(dict(cfg, version=99)))
    with pytest.raises(ValueError, match="version"):
        lowbit.load(tmp_path, _cnn())
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        lowbit.load(tmp_path, _cnn())
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00")  # truncated
    with pytest.raises(RuntimeError):
        lowbit.load(tmp_path, _cnn())


# ------------------------------------------------------------------------------------------- subclasses
def _compat_model():
    """Every BIE name of lowbit.compat that is a layer (alias or subclass), trained a step where it learns."""
    from lowbit import compat

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        compat.Q4Conv2dCutlass(4, 6, 3, 1, 1),                    # BIE's positional order (stride, padding)
        torch.nn.Flatten(),
        compat.Q8LinearCutlass(6 * 5 * 5, 40),
        compat.Q4LinearCutlass(40, 32),
        compat.MPQLinearCuda.from_float(torch.nn.Linear(32, 32), w_bit=4, group_size=16),
        compat.MPQLinearMlx.from_float(torch.nn.Linear(32, 32), w_bit=2, group_size=16, asym=False),
        compat.MBWQLinearCuda.from_float(torch.nn.Linear(32, 8), w_bit=4, group_size=16, dtype=torch.float32))
    x = torch.randn(4, 4, 5, 5)
    model[:4](x)  # training forward: sets every scale_a
    model.eval()
    model[0].generate_quantized_weight(qweight_only=True)  # a frozen conv: qweight in lowbit's OHWI layout
    model[2].generate_quantized_weight(qweight_only=True)
    return model, x


def _compat_skeleton():
    return torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(150, 40),
                               torch.nn.Linear(40, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32),
                               torch.nn.Linear(32, 8))


def test_compat_classes_are_saved_as_their_lowbit_class(tmp_path):
    model, x = _compat_model()
    with torch.no_grad():
        y = model(x)
    lowbit.save(model, tmp_path)
    layers = json.loads((tmp_path / "lowbit.json").read_text())["layers"]
    assert {k: v["class"] for k, v in layers.items()} == {
        "0": "Q4Conv2d", "2": "Q8Linear", "3": "Q4Linear", "4": "MPQLinear", "5": "MPQLinear", "6": "MBWQLinear"}
    assert layers["0"]["args"]["padding"] == [1, 1] and layers["0"]["args"]["stride"] == [1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict, and no warning of any kind
        loaded = lowbit.prepare_layers(lowbit.load(tmp_path, _compat_skeleton().eval()))
    assert [type(m).__name__ for m in loaded] == ["Q4Conv2d", "Flatten", "Q8Linear", "Q4Linear", "MPQLinear",
                                                  "MPQLinear", "MBWQLinear"]
    assert loaded[0].weight is None and not loaded[0].training
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_compat_constructor_args_rebuild_the_same_structure():
    """The keyword arguments recorded for a compat class build its lowbit.nn base with the same tensors."""
    from lowbit import compat
    from lowbit.checkpoint import LAYER_CLASSES, _compat_classes

    built = [compat.Q4Conv2dCutlass(6, 4, (3, 1), 2, (1, 0), 2, groups=2), compat.Q4Conv2dCutlass(3, 8, 1),
             compat.Q8LinearCutlass(12, 5), compat.Q4LinearCutlass(7, 3, dtype=torch.half),
             compat.MPQLinearCuda(64, 16, w_bit=2, group_size=32), compat.MPQLinearMlx(64, 16, w_bit=4, group_size=32,
                                                                                      use_gba_quant=False),
             compat.MBWQLinearCuda(64, 16, w_bit=4, group_size=32, use_mbw=False)]
    assert {type(m) for m in built if type(m) not in LAYER_CLASSES.values()} <= _compat_classes()
    for m in built:
        base = next(c for c in type(m).__mro__ if c in LAYER_CLASSES.values())
        args = m.constructor_args()
        if "dtype" in args:
            args["dtype"] = getattr(torch, args["dtype"].replace("torch.", ""))
        again = base(**args)
        assert again.constructor_args() == m.constructor_args()
        assert {k: (v.shape, v.dtype) for k, v in again.state_dict().items()} == \
               {k: (v.shape, v.dtype) for k, v in m.state_dict().items()}, type(m)


def test_save_refuses_a_subclass_it_cannot_rebuild(tmp_path):
    class MyQ8(Q8Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), MyQ8(8, 4))
    with pytest.raises(TypeError, match=r"module '1' is a .*MyQ8, a subclass of lowbit.nn.Q8Linear"):
        lowbit.save(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()  # refused before anything is written
    from lowbit.compat import Q4Conv2dCutlass

    class MyConv(Q4Conv2dCutlass):  # a subclass of a compat class is no compat class
        pass

    with pytest.raises(TypeError, match="MyConv"):
        lowbit.save(torch.nn.Sequential(MyConv(2, 2, 1)), tmp_path / "ck")


# ------------------------------------------------------------------------------------------- failed loads
def _snapshot(model):
    return [(n, m) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snap):
    modules, state = snap
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in modules]
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _mlp_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4),
                                               torch.nn.BatchNorm1d(4)), "q8", exclude=["2"])
    model(torch.randn(6, 12))
    model.eval()
    model[0].generate_quantized_weight(qweight_only=True)
    lowbit.save(model, tmp_path)
    return model


def _skeleton(out=4, extra=False):
    mods = [torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, out), torch.nn.BatchNorm1d(out)]
    return torch.nn.Sequential(*mods, *([torch.nn.Linear(out, 2)] if extra else []))


@pytest.mark.parametrize("case", ["truncated", "wrong_size", "missing_keys", "unexpected_keys", "layer_tensors",
                                  "parameter_name", "load_state_dict_fails"])
def test_failed_load_leaves_the_model_as_it_was(tmp_path, case):
    _mlp_checkpoint(tmp_path)
    sk = _skeleton(out=5) if case == "wrong_size" else _skeleton(extra=case == "missing_keys")
    if case == "unexpected_keys":
        sk = torch.nn.Sequential(torch.nn.Linear(12, 8))
    cfg_path = tmp_path / "lowbit.json"
    cfg = json.loads(cfg_path.read_text())
    if case == "truncated":
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif case == "layer_tensors":  # the recorded structure matches neither the tensors nor the model
        cfg["layers"]["0"]["args"]["in_channels"] = 13
    elif case == "parameter_name":
        cfg["layers"]["0.weight"] = cfg["layers"].pop("0")
    elif case == "load_state_dict_fails":  # something only the model's own load_state_dict finds

        def refuse(module, state_dict, *args):
            raise RuntimeError("refused by a hook")

        sk.register_load_state_dict_pre_hook(refuse)
    cfg_path.write_text(json.dumps(cfg))
    snap = _snapshot(sk)
    expected = {"truncated": (RuntimeError, "truncated|too few|bytes"), "wrong_size": (RuntimeError, "2.weight"),
                "missing_keys": (RuntimeError, "missing from the checkpoint: '4.weight', '4.bias'"),
                "unexpected_keys": (RuntimeError, "unexpected checkpoint key"),
                "layer_tensors": (ValueError, r"layer '0' is Q8Linear with in=13, out=8, but the model's module there "
                                              r"is Linear with in=12"),
                "parameter_name": (ValueError, "'0.weight' names a Parameter attribute of the model, not a module"),
                "load_state_dict_fails": (RuntimeError, "refused by a hook")}[case]
    with pytest.raises(expected[0], match=expected[1]):
        lowbit.load(tmp_path, sk)
    _assert_untouched(sk, snap)
    assert type(sk[0]) is torch.nn.Linear


def test_strict_false_warns_with_the_missing_and_unexpected_keys(tmp_path):
    from lowbit.checkpoint import IncompatibleKeysWarning

    model = _mlp_checkpoint(tmp_path)
    x = torch.randn(3, 12)
    with torch.no_grad():
        y = model(x)
    sk = _skeleton(extra=True).eval()
    w4 = sk[4].weight.detach().clone()
    with pytest.warns(IncompatibleKeysWarning, match=r"missing from the checkpoint: '4.weight', '4.bias'") as rec:
        out = lowbit.load(tmp_path, sk, strict=False)
    assert out is sk and isinstance(sk[0], Q8Linear) and torch.equal(sk[4].weight, w4)
    w = [r.message for r in rec if isinstance(r.message, IncompatibleKeysWarning)][0]
    assert w.missing_keys == ["4.weight", "4.bias"] and w.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(sk[:4](x), y)
    with pytest.warns(IncompatibleKeysWarning, match="unexpected checkpoint key") as rec:
        lowbit.load(tmp_path, torch.nn.Sequential(torch.nn.Linear(12, 8)), strict=False)
    w = [r.message for r in rec if isinstance(r.message, IncompatibleKeysWarning)][0]
    assert w.missing_keys == [] and sorted(w.unexpected_keys) == sorted(
        ["2.weight", "2.bias", "3.weight", "3.bias", "3.running_mean", "3.running_var", "3.num_batches_tracked"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keys that match: no warning
        lowbit.load(tmp_path, _skeleton(), strict=False)


def test_load_rejects_more_bad_configs(tmp_path):
    _mlp_checkpoint(tmp_path)
    cfg_path = tmp_path / "lowbit.json"
    cfg = json.loads(cfg_path.read_text())
    spec = cfg["layers"]["0"]
    bad = [({**cfg, "version": True}, "version True"),
           ({**cfg, "layers": [1]}, "'layers' must be an object"),
           ({**cfg, "layers": {"0": 5}}, r"layers\['0'\] must be"),
           ({**cfg, "layers": {"0": {"class": 3, "args": {}}}}, "unknown class 3"),
           ({**cfg, "layers": {"0": {"class": "Q8Linear", "args": {**spec["args"], "device": "cuda"}}}}, "'device'"),
           ({**cfg, "layers": {"0": spec, "0.x": spec}}, "lies inside its layer '0'"),
           ({**cfg, "layers": {"0": {"class": "Q8Linear", "args": {**spec["args"], "dtype": "torch.int8"}}}},
            "unsupported dtype 'torch.int8'")]
    for config, match in bad:
        cfg_path.write_text(json.dumps(config))
        sk = _skeleton()
        snap = _snapshot(sk)
        with pytest.raises(ValueError, match=match):
            lowbit.load(tmp_path, sk)
        _assert_untouched(sk, snap)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lowbit.load(tmp_path, {"0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="map_location"):
        lowbit.load(tmp_path, _skeleton(), map_location="nowhere")


# ------------------------------------------------------------------------------------------- tied modules
def _tied():
    lin = torch.nn.Linear(8, 8)
    return torch.nn.Sequential(lin, torch.nn.ReLU(), lin)


def test_tied_layer_round_trip(tmp_path):
    torch.manual_seed(0)
    q = lowbit.convert(_tied(), "q8")
    assert q[0] is q[2]
    x = torch.randn(5, 8)
    q(x)
    q.eval()
    with torch.no_grad():
        y = q(x)
    lowbit.save(q, tmp_path)
    assert set(json.loads((tmp_path / "lowbit.json").read_text())["layers"]) == {"0", "2"}
    tied = lowbit.load(tmp_path, _tied().eval())  # the skeleton ties them: one layer at both names
    assert isinstance(tied[0], Q8Linear) and tied[0] is tied[2]
    untied = lowbit.load(tmp_path, torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                                       torch.nn.Linear(8, 8)).eval())
    assert isinstance(untied[2], Q8Linear) and untied[0] is not untied[2]
    with torch.no_grad():
        assert torch.equal(tied(x), y) and torch.equal(untied(x), y)
    # a checkpoint that records the layer at one of its names only: the skeleton's other name follows it
    cfg = json.loads((tmp_path / "lowbit.json").read_text())
    del cfg["layers"]["2"]
    (tmp_path / "lowbit.json").write_text(json.dumps(cfg))
    again = lowbit.load(tmp_path, _tied().eval())
    assert isinstance(again[0], Q8Linear) and again[0] is again[2]
    # a tied skeleton, a checkpoint with different tensors at the two names: refused, model untouched
    state = lowbit.io.load_file(tmp_path / "model.safetensors")
    state["2.bias_a"] = state["2.bias_a"] + 1
    lowbit.io.save_file(state, tmp_path / "model.safetensors")
    sk = _tied()
    snap = _snapshot(sk)
    with pytest.raises(ValueError, match="tied"):
        lowbit.load(tmp_path, sk)
    _assert_untouched(sk, snap)


def test_lowbit_compat_attribute_before_import():
    """`lowbit.compat` is imported on first attribute access (a fresh interpreter: nothing imported it yet)."""
    import subprocess
    import sys

    code = "import lowbit; print(lowbit.compat.Q8LinearCutlass.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "Q8Linear"  # the BIE name is an alias of lowbit.nn.Q8Linear

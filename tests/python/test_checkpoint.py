"""lowbit.save / lowbit.load: a converted, trained, frozen model comes back identical from a directory."""
import json
import os

import pytest
import torch

import lowbit
from lowbit.nn import Q4Conv2d, Q4Linear


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

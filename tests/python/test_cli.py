"""The lowbit command line: --help for every command, inspect on a saved checkpoint and on bad input."""
import subprocess
import sys

import torch

import lowbit
from lowbit import cli


def test_help_explains_every_command(capsys):
    for argv in (["--help"], ["inspect", "--help"], ["demo", "--help"], ["bench", "--help"]):
        try:
            cli.main(argv)
        except SystemExit as exc:
            assert exc.code == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "--tensors" in out and "q4_layers" in out


def test_inspect_checkpoint(tmp_path, capsys):
    model = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)), "q4",
                           exclude=["2"]).eval()
    model[0].generate_quantized_weight(qweight_only=True)
    lowbit.save(model, tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Q4Linear" in out and "qweight" in out and " 4 " in out
    assert cli.main(["inspect", str(tmp_path / "model.safetensors")]) == 0
    assert "0.qweight" in capsys.readouterr().out
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 20)
    assert cli.main(["inspect", str(tmp_path / "bad.safetensors")]) == 2


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "inspect" in r.stdout

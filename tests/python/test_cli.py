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


BAD_CONFIGS = ['{bad', '[1]', '{"layers": {"a": 5}}', '{"layers": [1]}',
               '{"format": "lowbit-checkpoint", "version": 1, "layers": [1]}',
               '{"format": "lowbit-checkpoint", "version": 1, "layers": {"a": 5}}',
               '{"format": "lowbit-checkpoint", "version": 1, "layers": {"a": {"class": "Q9", "args": {}}}}',
               '{"format": "lowbit-checkpoint", "version": 1, "layers": {"a": {"class": "Q8Linear", "args": [1]}}}',
               '{"format": "lowbit-checkpoint", "version": 2, "layers": {}}']


def test_malformed_lowbit_json_is_an_error_message_not_a_traceback(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    lowbit.save(model, tmp_path)
    cfg = tmp_path / "lowbit.json"
    good = cfg.read_text()
    for text in BAD_CONFIGS:
        cfg.write_text(text)
        assert cli.main(["inspect", str(tmp_path)]) == 2, text
        err = capsys.readouterr().err
        assert err.startswith("lowbit inspect: ") and "lowbit.json" in err and "Traceback" not in err, (text, err)
        assert cli.main(["quantize", str(tmp_path), str(tmp_path / "out"), "--group-size", "32",
                         "--no-progress"]) == 2, text
        err = capsys.readouterr().err
        assert err.startswith("lowbit quantize: ") and "lowbit.json" in err, (text, err)
        assert not (tmp_path / "out").exists()
    cfg.write_text(good)  # the checks pass a good config
    assert cli.main(["inspect", str(tmp_path)]) == 0
    assert cli.main(["quantize", str(tmp_path), str(tmp_path / "out"), "--group-size", "32", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "out")]) == 0
    assert "MBWQLinear" in capsys.readouterr().out


def test_python_dash_m_malformed_config(tmp_path):
    lowbit.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), tmp_path)
    (tmp_path / "lowbit.json").write_text('{"layers": [1]}')
    r = subprocess.run([sys.executable, "-m", "lowbit", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("lowbit inspect: ") and "Traceback" not in r.stderr

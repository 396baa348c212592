"""`edgeq qat` through a subprocess: a model factory named by the user, a weights-only state dict, .npz data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import digits_8x8, import_source, train_on_digits

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
FACTORY = '''
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

def broken():
    raise RuntimeError("no GPU here")

NOT_CALLABLE = 3
'''


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("qatcli")
    mynets = import_source(work, "mynets", FACTORY)
    x, y = digits_8x8()
    torch.manual_seed(0)
    model = train_on_digits(mynets.build(), x, y, epochs=3)
    torch.save(model.state_dict(), work / "weights.pt")
    np.savez(work / "train.npz", input=x[:1200], labels=y[:1200])
    np.savez(work / "val.npz", input=x[1200:], labels=y[1200:])
    return work


@pytest.mark.slow
def test_qat_command_trains_exports_and_reports(workdir):
    proc = run(["qat", "mynets:build", "--weights", "weights.pt", "--train", "train.npz", "--val", "val.npz", "--epochs", "1",
                "--per-tensor", "-o", "out.onnx", "--json", "qat.json"], workdir)
    assert proc.returncode == 0, proc.stderr
    assert "verdict before QAT" in proc.stdout and "qat" in proc.stdout
    onnx.checker.check_model(str(workdir / "out.onnx"))
    result = json.loads((workdir / "qat.json").read_text())
    assert result["metric"] == "top1" and result["fp32"] > 80
    assert result["verdict_before"] in ("ship", "try-qat", "stay-fp16")
    ops = [n.op_type for n in onnx.load(str(workdir / "out.onnx")).graph.node]
    assert ops.count("Conv") == 1 and "QuantizeLinear" in ops
    # The exported model goes through the same commands as any other.
    check = run(["validate", "out.onnx", "--data", "val.npz", "-o", "v.json"], workdir)
    assert check.returncode == 0, check.stderr
    assert abs(json.loads((workdir / "v.json").read_text())["value"] - result["qat"]) < 1e-9


@pytest.mark.parametrize("args, message", [
    (["mynets:build", "--weights", "missing.pt"], "weights file not found"),
    (["mynets:build", "--weights", "train.npz"], "weights-only state dict"),
    (["mynets:nothing", "--weights", "weights.pt"], "has no callable 'nothing'"),
    (["mynets:NOT_CALLABLE", "--weights", "weights.pt"], "has no callable"),
    (["mynets:broken", "--weights", "weights.pt"], "mynets:broken() failed"),
    (["no_such_module_xyz:build", "--weights", "weights.pt"], "cannot import module"),
    (["mynets", "--weights", "weights.pt"], "MODULE:FACTORY"),
    (["mynets:build", "--weights", "weights.pt", "--weight-bits", "3"], "weight-bits"),
])
def test_bad_model_or_weights_is_a_one_line_user_error(workdir, args, message):
    proc = run(["qat", *args, "--train", "train.npz", "--val", "val.npz", "-o", "never.onnx"], workdir)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeq: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (workdir / "never.onnx").exists()


def test_weights_of_another_network_are_refused(workdir):
    torch.save({"weight": torch.zeros(3)}, workdir / "other.pt")
    proc = run(["qat", "mynets:build", "--weights", "other.pt", "--train", "train.npz", "--val", "val.npz", "-o", "never.onnx"], workdir)
    assert proc.returncode == 2 and "do not fit" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_pickled_module_is_refused(workdir):
    """A whole pickled module (torch.save(model)) would run code when loaded: weights_only refuses it."""
    sys.path.insert(0, str(workdir))
    try:
        import mynets
        torch.save(mynets.build(), workdir / "pickled.pt")
    finally:
        sys.path.remove(str(workdir))
    proc = run(["qat", "mynets:build", "--weights", "pickled.pt", "--train", "train.npz", "--val", "val.npz", "-o", "never.onnx"], workdir)
    assert proc.returncode == 2 and "weights-only" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

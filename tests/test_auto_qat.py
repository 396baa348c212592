"""`auto` with a PyTorch model: when no INT8 or mixed model meets the budget it runs QAT, evaluates the exported model
like every other candidate and picks it when it meets; without one, the verdict gives the QAT command. Plus the
command-line checks of the QAT inputs.

The test network is a small digits CNN trained for one epoch only, then one activation channel is scaled up 256×
(BatchNorm scale and shift of channel 0; the Linear layer's weights reading it divided by 256, so the FP32 function
is unchanged). Its int8 activation step then crushes the other channels: plain INT8 loses several points, and
cross-layer equalization cannot undo it (Flatten stands between the two layers). QAT fine-tunes from this early
checkpoint, so it also finishes the training: the test checks the orchestration, not how much QAT recovers
(bench/qat.py measures that).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgeq
import edgeq.cli
from edgeq.executors import InProcess
from edgeq.report.auto import pareto_front
from tests.conftest import digits_8x8, import_source, train_on_digits

torch = pytest.importorskip("torch")

FACTORY = '''
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
'''
MODULE = "autoqat_nets"
SCALE = 256.0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("autoqat")
    nets = import_source(work, MODULE, FACTORY)
    x, y = digits_8x8()
    torch.manual_seed(0)
    model = train_on_digits(nets.build(), x, y, epochs=1)   # one epoch: an early checkpoint
    with torch.no_grad():                    # function-preserving: channel 0 ×256 after BatchNorm, ÷256 where it is read
        model[1].weight[0] *= SCALE
        model[1].bias[0] *= SCALE
        model[5].weight[:, :16] /= SCALE
    torch.save(model.state_dict(), work / "weights.pt")
    torch.save(nets.build().state_dict(), work / "other.pt")    # the same network, other weights
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(work / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    np.savez(work / "train.npz", input=x[:1200], labels=y[:1200])
    np.savez(work / "unlabelled.npz", input=x[:1200])
    np.savez(work / "calib.npz", input=x[:512])
    np.savez(work / "val.npz", input=x[1200:], labels=y[1200:])
    return work


def auto_args(work, out: str, *extra: str) -> list[str]:
    return ["auto", str(work / "model.onnx"), "--calib", str(work / "calib.npz"), "--val", str(work / "val.npz"),
            "--budget", "1", "-o", str(work / out), "--max-float-layers", "0", *extra]


def test_auto_runs_qat_when_no_int8_model_meets_and_chooses_it(work, monkeypatch, capsys):
    monkeypatch.chdir(work)                  # MODULE:FACTORY is imported from the current folder, as with `edgeq qat`
    edgeq.cli.main(auto_args(work, "out", "--torch-model", f"{MODULE}:build", "--weights", "weights.pt", "--train", "train.npz",
                             "--qat-epochs", "3", "--qat-lr", "1e-3", "--workers", "1"))
    report = json.loads((work / "out" / "report.json").read_text())
    cands = {c["name"]: c for c in report["candidates"]}
    int8 = [c for c in report["candidates"] if c["kind"] == "int8"]
    assert int8 and not any(c["meets"] for c in int8) and all(not c["float_layers"] for c in int8)
    q = cands["qat"]
    assert q["kind"] == "qat" and q["meets"] and q["drop"] <= 1.0 and q["p50_ms"] > 0 and q["int8_layers"] == report["layers"] == 2
    assert q["qat"]["epochs"] == 3 and q["evaluation"] == report["evaluations"] == len(report["candidates"])
    within = [c for c in report["candidates"] if c["meets"]]
    assert cands[report["chosen"]]["p50_ms"] == min(c["p50_ms"] for c in within)   # the fastest within budget, FP32 included
    if report["chosen"] == "qat":
        assert report["verdict"]["status"] == "met" and "quantization-aware training" in report["verdict"]["summary"]
    else:                                    # on this 2-layer net a float model can be faster: the verdict says so
        assert "nothing beats FP32" in report["verdict"]["summary"] or report["chosen"] == "fp16"
    assert any(s["step"] == "qat" for s in report["search"]) and cands["fp16"]["evaluation"] == 2
    assert "qat" in pareto_front(report["candidates"])
    # the QAT export scores what its record says
    assert (work / "out" / "candidates" / "qat.onnx").is_file() and (work / "out" / "candidates" / "qat.json").is_file()
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(work / "out" / "candidates" / "qat.onnx")).graph.node}
    assert edgeq.validate(work / "out" / "candidates" / "qat.onnx", edgeq.Dataset.from_npz(work / "val.npz")).value == pytest.approx(q["metric_value"])
    html = (work / "out" / "report.html").read_text()
    chart = html.split('id="tradeoff"')[1].split("</figure>")[0]
    assert f"{report['chosen']} ★" in html and "QAT 3 epochs" in html and "<!-- qat -->" in chart     # a point of the Pareto chart
    assert f"{report['chosen']} ★" in capsys.readouterr().out


def test_without_a_pytorch_model_the_verdict_gives_the_qat_command(work):
    report = edgeq.auto(work / "model.onnx", work / "calib.npz", work / "val.npz", 1.0, work / "no-qat", max_float_layers=0,
                        executor=InProcess(), bench_runs=3)
    assert "qat" not in {c["name"] for c in report["candidates"]}
    assert report["verdict"]["status"] in ("fp16", "fp32")      # whichever float model is faster here
    hint = next(r for r in report["verdict"]["reasons"] if r.startswith("recommendation: quantization-aware training"))
    assert f"--val {work / 'val.npz'}" in hint and "edgeq qat MODULE:FACTORY --weights WEIGHTS.pt --train TRAIN_DATA" in hint
    assert "--torch-model MODULE:FACTORY" in hint
    assert any(s["step"] == "fallback" and "max_float_layers 0" in s["result"] for s in report["search"])


@pytest.mark.parametrize("extra, message", [
    (["--weights", "weights.pt"], "--weights is for QAT and needs --torch-model"),
    (["--train", "train.npz"], "--train is for QAT and needs --torch-model"),
    (["--torch-model", f"{MODULE}:build", "--train", "train.npz"], "--torch-model needs --weights"),
    (["--torch-model", f"{MODULE}:build", "--weights", "weights.pt"], "--torch-model needs --train"),
    (["--torch-model", f"{MODULE}:nothing", "--weights", "weights.pt", "--train", "train.npz"], "has no callable 'nothing'"),
    (["--torch-model", f"{MODULE}:build", "--weights", "weights.pt", "--train", "unlabelled.npz"], "training data has no labels"),
    (["--torch-model", f"{MODULE}:build", "--weights", "other.pt", "--train", "train.npz"], "does not compute what model.onnx computes"),
    (["--torch-model", f"{MODULE}:build", "--weights", "weights.pt", "--train", "train.npz", "--qat-epochs", "0"], "at least 1 epoch"),
    (["--max-float-layers", "-1"], "max float layers -1 is negative"),
])
def test_bad_qat_inputs_are_one_line_errors_before_any_work(work, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit_info:
        edgeq.cli.main(auto_args(work, "never", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeq: error:") and message in lines[0], err
    assert not (work / "never").exists()

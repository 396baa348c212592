"""PyTorch in: a module (API), MODULE:FACTORY with a weights-only state dict (CLI) and a `.pt2` program go through
quantize, validate, bench and auto like the ONNX model exported by hand; a module neither exporter captures is one
line naming where each stopped; the TorchScript fallback is said in the notes."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest

import edgeq
import edgeq.cli
from edgeq.errors import ModelError
from edgeq.executors import InProcess
from tests.conftest import digits_8x8, import_source, train_on_digits

torch = pytest.importorskip("torch")

NETS = '''
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it, a TorchScript trace would freeze one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class Prototypes(nn.Module):
    """Distances to class prototypes: the dynamo exporter has no ONNX function for aten._cdist_forward, TorchScript has."""

    def __init__(self):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(10, 64))

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.prototypes)


class Histogram(nn.Module):
    """torch.histc: neither exporter has it."""

    def forward(self, x):
        return torch.histc(x, bins=10)


def branchy():
    return Branchy()


def histogram():
    return Histogram()
'''
MODULE = "torchin_nets"
SHAPE = "1,1,8,8"


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        edgeq.cli.main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchin")
    nets = import_source(work, MODULE, NETS)
    x, y = digits_8x8()
    torch.manual_seed(0)
    model = train_on_digits(nets.build(), x, y, epochs=2)
    torch.save(model.state_dict(), work / "weights.pt")
    example = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(model, (example,), str(work / "by_hand.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    torch.export.save(torch.export.export(model, (example,)), str(work / "program.pt2"))
    np.savez(work / "calib.npz", input=x[:256])
    np.savez(work / "train.npz", input=x[:1200], labels=y[:1200])
    np.savez(work / "val.npz", input=x[1200:], labels=y[1200:])
    return work, nets, model


def test_a_module_exports_with_the_dynamo_exporter_and_computes_what_torch_does(work):
    folder, _, model = work
    exported = edgeq.from_torch(model, torch.zeros(1, 1, 8, 8), name="digits")
    (note,) = exported.notes
    assert note.startswith("exported from digits with the dynamo exporter (torch.export, opset ")
    assert [s.describe() for s in exported.inputs] == ["input: float32[batch,1,8,8]"]   # named after forward's argument
    assert [s.describe() for s in exported.outputs] == ["output: float32[batch,10]"]
    x = np.load(folder / "val.npz")["input"][:5]
    want = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(exported.session().run(None, {"input": x})[0], want, rtol=1e-4, atol=1e-5)


def test_quantize_validate_and_bench_of_a_module_match_the_onnx_exported_by_hand(work):
    folder, _, model = work
    exported = edgeq.from_torch(model, torch.zeros(1, 1, 8, 8))
    calib, val = edgeq.open_data(folder / "calib.npz"), edgeq.open_data(folder / "val.npz")
    config = edgeq.Int8Static(method="minmax", coverage="all")
    ours, theirs = edgeq.quantize(exported, config, calib), edgeq.quantize(folder / "by_hand.onnx", config, calib)
    assert ours.summary.quantized == theirs.summary.quantized and ours.summary.notes[0].startswith("exported from Sequential")
    fp32 = edgeq.validate(exported, val)
    assert fp32.value == pytest.approx(edgeq.validate(folder / "by_hand.onnx", val).value, abs=0.3) and fp32.value > 80
    assert any("dynamo exporter" in n for n in fp32.warnings)
    assert edgeq.validate(ours, val).value == pytest.approx(edgeq.validate(theirs, val).value, abs=1.0)
    x = np.load(folder / "val.npz")["input"][:1]
    np.testing.assert_allclose(ours.session().run(None, {"input": x})[0], theirs.session().run(None, {"input": x})[0], atol=0.15)
    (record,) = edgeq.benchmark([exported], runs=2, warmup=0, rounds=1)
    assert record.name == "Sequential" and record.latency_ms.p50 > 0 and record.size_bytes == pytest.approx(exported.proto.ByteSize(), rel=0.05)


def test_auto_takes_a_module(work):
    folder, _, model = work
    report = edgeq.auto(edgeq.from_torch(model, torch.zeros(1, 1, 8, 8)), folder / "calib.npz", folder / "val.npz", 1.0,
                        folder / "auto-api", executor=InProcess(), bench_runs=3, methods=("minmax",), refine=False, max_float_layers=0)
    names = {c["name"] for c in report["candidates"]}
    assert {"fp32", "fp16"} <= names and next(c for c in report["candidates"] if c["name"] == "fp32")["metric_value"] > 80 and (folder / "auto-api" / "model.onnx").is_file()


def test_the_cli_takes_module_factory_with_weights_and_the_result_equals_the_hand_export(work, monkeypatch, capsys):
    folder, _, _ = work
    monkeypatch.chdir(folder)                # MODULE:FACTORY is imported from the current folder
    torch_args = ["--weights", "weights.pt", "--input-shape", SHAPE]
    code, out, err = _run(["quantize", f"{MODULE}:build", *torch_args, "--calib", "calib.npz", "--method", "minmax",
                           "--coverage", "all", "-o", "q.onnx"], capsys)
    assert code == 0, err
    assert "exported from build with the dynamo exporter" in out
    code, _, err = _run(["quantize", "by_hand.onnx", "--calib", "calib.npz", "--method", "minmax", "--coverage", "all",
                         "-o", "q_by_hand.onnx"], capsys)
    assert code == 0, err
    for name, model in (("fp32", f"{MODULE}:build"), ("fp32_by_hand", "by_hand.onnx"), ("pt2", "program.pt2")):
        extra = torch_args if name == "fp32" else []
        code, _, err = _run(["validate", model, *extra, "--data", "val.npz", "-o", f"{name}.json"], capsys)
        assert code == 0, err
    fp32, by_hand, pt2 = (json.loads((folder / f"{n}.json").read_text()) for n in ("fp32", "fp32_by_hand", "pt2"))
    assert fp32["value"] == pytest.approx(by_hand["value"], abs=0.3) and pt2["value"] == pytest.approx(fp32["value"], abs=0.3)
    assert any("exported from program with the dynamo exporter" in n for n in pt2["warnings"])
    q, q_by_hand = (edgeq.validate(folder / n, edgeq.open_data(folder / "val.npz")).value for n in ("q.onnx", "q_by_hand.onnx"))
    assert q == pytest.approx(q_by_hand, abs=1.0)
    assert (folder / "weights.pt").stat().st_size > 0 and not list(folder.glob("*.onnx.tmp*"))   # nothing but the outputs written


def test_cli_auto_takes_module_factory(work, monkeypatch, capsys):
    folder, _, _ = work
    monkeypatch.chdir(folder)
    code, out, err = _run(["auto", f"{MODULE}:build", "--weights", "weights.pt", "--input-shape", SHAPE, "--calib", "calib.npz",
                           "--val", "val.npz", "-o", "auto-cli", "--max-float-layers", "0", "--workers", "1"], capsys)
    assert code == 0, err
    report = json.loads((folder / "auto-cli" / "report.json").read_text())
    fp32 = next(c for c in report["candidates"] if c["name"] == "fp32")
    assert fp32["metric_value"] > 80 and (folder / "auto-cli" / "model.onnx").is_file() and "exported from build" in out
    code, _, err = _run(["auto", f"{MODULE}:build", "--weights", "weights.pt", "--input-shape", SHAPE, "--calib", "calib.npz",
                         "--val", "val.npz", "-o", "never", "--torch-model", f"{MODULE}:build", "--train", "train.npz"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "leave out --torch-model" in err and not (folder / "never").exists()


def test_a_module_torch_export_cannot_capture_is_one_line_naming_the_branch(work, monkeypatch, capsys):
    folder, _, _ = work
    monkeypatch.chdir(folder)
    torch.save(__import__(MODULE).branchy().state_dict(), folder / "branchy.pt")
    code, out, err = _run(["quantize", f"{MODULE}:branchy", "--weights", "branchy.pt", "--input-shape", SHAPE, "--mode", "dynamic",
                           "-o", "branchy.onnx"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edgeq: error: cannot export branchy to ONNX"), err
    assert "torchin_nets.py:" in lines[0] and "if x.sum() > 0:" in lines[0] and "data-dependent" in lines[0]
    assert "TorchScript exporter at a data-dependent value" in lines[0] and "torch.cond" in lines[0]
    assert not (folder / "branchy.onnx").exists()


def test_an_operator_no_exporter_has_is_named(work):
    _, nets, _ = work
    with pytest.raises(ModelError, match=r"dynamo exporter stopped at operator aten\.histc.*TorchScript exporter at operator aten::histc"):
        edgeq.from_torch(nets.Histogram(), torch.rand(1, 1, 8, 8))


def test_the_torchscript_fallback_is_reported_with_the_dynamo_reason(work):
    folder, nets, _ = work
    module = nets.Prototypes().eval()
    exported = edgeq.from_torch(module, torch.zeros(1, 1, 8, 8))
    (note,) = exported.notes
    assert note.startswith("exported from Prototypes with the TorchScript exporter: the dynamo exporter stopped at operator aten._cdist_forward")
    x = np.load(folder / "val.npz")["input"][:1]
    np.testing.assert_allclose(exported.session().run(None, {"x": x})[0], module(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-4)
    assert edgeq.quantize(exported, edgeq.Int8Dynamic()).summary.notes[0] == note


def test_pt2_files_with_pickled_payloads_are_refused_and_other_commands_say_the_way(work, tmp_path, capsys):
    folder, _, _ = work
    with zipfile.ZipFile(folder / "program.pt2") as source, zipfile.ZipFile(tmp_path / "pickled.pt2", "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            target.writestr(item, data)
    with pytest.raises(ModelError, match="holds pickled objects"):
        edgeq.load_torch(tmp_path / "pickled.pt2")
    shutil.copy(folder / "program.pt2", tmp_path / "program.pt2")
    code, _, err = _run(["analyze", str(tmp_path / "program.pt2")], capsys)
    assert code == 2 and "is a torch.export program (.pt2), not an ONNX model" in err and "edgeq.from_torch" in err


@pytest.mark.parametrize("args, message", [
    (["quantize", f"{MODULE}:build", "--mode", "dynamic", "-o", "x.onnx"], "needs --weights and --input-shape"),
    (["quantize", f"{MODULE}:build", "--weights", "weights.pt", "--input-shape", "1,a", "--mode", "dynamic", "-o", "x.onnx"], "is not a shape"),
    (["quantize", "by_hand.onnx", "--weights", "weights.pt", "--mode", "dynamic", "-o", "x.onnx"], "--weights is for a PyTorch MODEL"),
    (["bench", "by_hand.onnx", "--weights", "weights.pt", "--runs", "1"], "--weights is for a PyTorch MODEL"),
    (["validate", f"{MODULE}:missing", "--weights", "weights.pt", "--input-shape", SHAPE, "--data", "val.npz", "-o", "x.json"], "has no callable 'missing'"),
])
def test_bad_pytorch_inputs_are_one_line(work, monkeypatch, capsys, args, message):
    folder, _, _ = work
    monkeypatch.chdir(folder)
    code, _, err = _run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err

"""validate / compare on tiny ONNX models built in code: metrics against numpy, intervals, pairing, refusals, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import make_conv_model
from edgeq.data import Dataset
from edgeq.decide import DecisionRule
from edgeq.errors import ConfigError, DataError, UserError
from edgeq.evaluate import compare, read_validation, validate
from edgeq.sqnr import SQNR_CAP_DB

REPO = Path(__file__).resolve().parents[1]


# ----- models and data ------------------------------------------------------------------------------------------

def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def perturbed_conv(tmp_path: Path, scale: float, seed: int = 7) -> Path:
    """The conftest conv net with relative Gaussian noise on every weight: a stand-in for a quantized model."""
    model = make_conv_model()
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((w + rng.normal(0, scale * w.std(), w.shape)).astype(np.float32), init.name))
    path = tmp_path / f"perturbed_{scale}.onnx"
    onnx.save(model, path)
    return path


def linear_model(tmp_path: Path) -> Path:
    """y = x @ W + b with 4 inputs and 2 float outputs: a regression model."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 1, (4, 2)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w, b])
    path = tmp_path / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def prob_map_model(tmp_path: Path, bias: float = 0.0, name: str = "det.onnx") -> Path:
    """Conv + Sigmoid: a (N, 1, 8, 8) probability map in [0, 1], like a text-detection head; two outputs."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (1, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.array([bias], np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c"], ["prob"])]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 1, 8, 8]),
                               helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, 8, 8])], [w, b])
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (300, 1, 8, 8)).astype(np.float32)


@pytest.fixture
def model_labels(conv_model_path, images) -> np.ndarray:
    """The FP32 model's own classes with a fifth of them replaced: accuracy near 80%, so drops are visible."""
    rng = np.random.default_rng(2)
    labels = run_onnx(conv_model_path, images).argmax(axis=1)
    flip = rng.random(len(labels)) < 0.2
    return np.where(flip, rng.integers(0, 10, len(labels)), labels)


# ----- metrics ---------------------------------------------------------------------------------------------------

def test_top1_on_labelled_data_equals_numpy(conv_model_path, conv_data):
    npz = np.load(conv_data)
    logits = run_onnx(conv_model_path, npz["x"])
    record = validate(conv_model_path, Dataset.from_npz(conv_data), batch_size=16)
    assert record.metric == "top1" and record.higher_is_better and record.samples == 200
    assert record.value == pytest.approx(100 * np.mean(logits.argmax(1) == npz["labels"]))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert record.metrics["top5"].value == pytest.approx(100 * np.mean((top5 == npz["labels"][:, None]).any(1)))
    assert record.predictions.tolist() == logits.argmax(1).tolist()


def test_regression_gives_mae_and_rmse(tmp_path):
    path = linear_model(tmp_path)
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (120, 4)).astype(np.float32)
    targets = run_onnx(path, x) + rng.normal(0, 0.3, (120, 2))
    record = validate(path, Dataset.from_arrays({"x": x}, labels=targets))
    err = run_onnx(path, x) - targets
    assert record.metric == "mae" and not record.higher_is_better
    assert record.value == pytest.approx(np.abs(err).mean())
    assert record.metrics["rmse"].value == pytest.approx(np.sqrt((err ** 2).mean()))


def test_fidelity_of_a_model_to_itself_is_perfect_and_ships(conv_model_path, images):
    data = Dataset.from_arrays({"x": images})
    record = validate(conv_model_path, data, reference=conv_model_path)
    assert record.metric == "top1_agreement" and record.value == 100.0
    assert record.metrics["cosine"].value == pytest.approx(1.0)
    assert record.metrics["sqnr_db"].value == SQNR_CAP_DB   # finite: the record stays valid JSON
    result = compare(record, record)
    assert result.drop == 0 and result.within_noise and result.verdict == "ship"
    assert result.to_dict()["drop_ci95"] == [0.0, 0.0]


def test_probability_maps_get_map_metrics_and_output_can_be_chosen(tmp_path, images):
    base, shifted = prob_map_model(tmp_path), prob_map_model(tmp_path, bias=0.2, name="shifted.onnx")
    record = validate(shifted, Dataset.from_arrays({"x": images}), reference=base, output="prob")
    assert record.output == "prob" and record.metric == "cosine"
    assert {"mean_abs_diff", "iou@0.3", "sqnr_db"} <= set(record.metrics)
    assert 0 < record.metrics["mean_abs_diff"].value < 0.2 and 0 < record.metrics["iou@0.3"].value < 1
    logits = validate(shifted, Dataset.from_arrays({"x": images}), reference=base)  # first output: not in [0, 1]
    assert logits.output == "c" and "iou@0.3" not in logits.metrics
    with pytest.raises(ConfigError, match="no output"):
        validate(shifted, Dataset.from_arrays({"x": images}), reference=base, output="nope")


def test_every_interval_contains_its_estimate(conv_model_path, images, model_labels, tmp_path):
    labelled = validate(conv_model_path, Dataset.from_arrays({"x": images}, labels=model_labels))
    fidelity = validate(perturbed_conv(tmp_path, 0.2), Dataset.from_arrays({"x": images}), reference=conv_model_path)
    for record in (labelled, fidelity):
        for name, est in record.metrics.items():
            assert est.ci95[0] <= est.value <= est.ci95[1], name
            assert est.ci95[0] < est.ci95[1] or name == "top1_agreement", name


# ----- compare ---------------------------------------------------------------------------------------------------

def test_compare_of_a_perturbed_model(conv_model_path, images, model_labels, tmp_path):
    data = Dataset.from_arrays({"x": images}, labels=model_labels)
    base = validate(conv_model_path, data)
    cand = validate(perturbed_conv(tmp_path, 0.05), data)
    result = compare(base, cand)
    assert result.drop == pytest.approx(base.value - cand.value)
    assert result.drop_ci95[0] <= result.drop <= result.drop_ci95[1]
    assert 0 < result.agreement.value < 100
    assert result.agreement.value == pytest.approx(100 * np.mean(base.predictions == cand.predictions))
    out = result.to_dict()
    assert {"metric", "base", "candidate", "drop", "drop_ci95", "within_noise", "verdict", "reasons"} <= set(out)
    assert out["verdict"] in ("ship", "try-qat", "stay-fp16") and out["reasons"]


def test_paired_interval_is_narrower_than_unpaired(conv_model_path, images, model_labels, tmp_path):
    data = Dataset.from_arrays({"x": images}, labels=model_labels)
    base, cand = validate(conv_model_path, data), validate(perturbed_conv(tmp_path, 0.01), data)
    paired = compare(base, cand).drop_ci95
    half = lambda ci: (ci[1] - ci[0]) / 2  # noqa: E731
    unpaired_width = 2 * np.hypot(half(base.ci95), half(cand.ci95))
    assert paired[1] - paired[0] < 0.5 * unpaired_width


def synthetic(flips: int, n: int = 1000) -> dict:
    """A validation record with `flips` wrong answers out of n: drops of flips/10 points against flips=0."""
    correct = [0] * flips + [1] * (n - flips)
    return {"metric": "top1", "value": 100 * (n - flips) / n, "ci95": [0, 100], "samples": n, "model": f"m{flips}",
            "per_sample": {"correct": correct}, "data_fingerprint": "sha256:same", "predictions": None}


@pytest.mark.parametrize(("flips", "verdict"), [(0, "ship"), (5, "ship"), (10, "try-qat"), (20, "try-qat"),
                                                 (30, "try-qat"), (31, "stay-fp16"), (80, "stay-fp16")])
def test_thresholds_give_each_verdict(flips, verdict):
    result = compare(synthetic(0), synthetic(flips), DecisionRule())
    assert result.drop == pytest.approx(flips / 10)
    assert result.verdict == verdict


def test_better_candidate_ships_with_a_reason():
    result = compare(synthetic(40), synthetic(0))
    assert result.drop == pytest.approx(-4.0) and result.verdict == "ship"
    assert any("better" in r for r in result.reasons)


def test_compare_refuses_mismatched_records(conv_model_path, images, model_labels):
    data = validate(conv_model_path, Dataset.from_arrays({"x": images}, labels=model_labels))
    other = validate(conv_model_path, Dataset.from_arrays({"x": images[::-1].copy()}, labels=model_labels))
    fewer = validate(conv_model_path, Dataset.from_arrays({"x": images[:100]}, labels=model_labels[:100]))
    fidelity = validate(conv_model_path, Dataset.from_arrays({"x": images}), reference=conv_model_path)
    with pytest.raises(UserError, match="different data"):
        compare(data, other)
    with pytest.raises(UserError, match="300 samples .* 100"):
        compare(data, fewer)
    with pytest.raises(UserError, match="measures top1 and the candidate top1_agreement"):
        compare(data, fidelity)


# ----- reporting, refusals, determinism ----------------------------------------------------------------------

def test_nan_in_data_is_reported_not_refused(conv_model_path, images, model_labels):
    images = images.copy()
    images[3, 0, 0, 0] = np.nan
    images[7, 0, 1, 1] = np.inf
    record = validate(conv_model_path, Dataset.from_arrays({"x": images}, labels=model_labels))
    assert record.nonfinite["inputs"] == 2
    assert record.nonfinite["samples_with_nonfinite_outputs"] == 2
    assert not record.per_sample["correct"][[3, 7]].any()
    assert any("NaN" in w for w in record.warnings)
    json.dumps(record.to_dict(), allow_nan=False)  # still strict JSON


def test_no_labels_and_no_reference_is_a_user_error(conv_model_path, images):
    with pytest.raises(UserError, match="--reference"):
        validate(conv_model_path, Dataset.from_arrays({"x": images}))


def test_labels_outside_the_classes_are_refused(conv_model_path, images):
    with pytest.raises(DataError, match="10 classes"):
        validate(conv_model_path, Dataset.from_arrays({"x": images}, labels=np.full(len(images), 10)))


def test_same_inputs_give_identical_records(conv_model_path, images, model_labels, tmp_path):
    data = Dataset.from_arrays({"x": images}, labels=model_labels)
    cand = perturbed_conv(tmp_path, 0.2)
    first, second = validate(cand, data).to_dict(), validate(cand, data, batch_size=7).to_dict()
    assert first == second
    base = validate(conv_model_path, data)
    assert compare(base, first).to_dict() == compare(base.to_dict(), second).to_dict()


def test_read_validation_explains_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found.*edgeq validate"):
        read_validation(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_validation(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not an edgeq validation record"):
        read_validation(tmp_path / "other.json")
    (tmp_path / "cmp.json").write_text(json.dumps({"verdict": "ship", "drop": 0}))
    with pytest.raises(UserError, match="comparison"):
        read_validation(tmp_path / "cmp.json")


# ----- command line --------------------------------------------------------------------------------------------

def edgeq_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_validate_and_compare(tmp_path, conv_model_path, conv_data):
    cand = perturbed_conv(tmp_path, 0.2)
    for model, out in ((conv_model_path, "a.json"), (cand, "b.json")):
        done = edgeq_cli("validate", model, "--data", conv_data, "-o", out, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "a.json").read_text())
    assert {"metric", "value", "samples", "ci95", "metrics", "per_sample", "predictions", "data_fingerprint",
            "model", "nonfinite", "warnings", "higher_is_better"} <= set(record)
    done = edgeq_cli("compare", "a.json", "b.json", "--json", "c.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "verdict" in done.stdout
    result = json.loads((tmp_path / "c.json").read_text())
    assert {"metric", "base", "candidate", "drop", "drop_ci95", "within_noise", "verdict", "reasons"} <= set(result)


def test_cli_user_errors_exit_2_with_one_line(tmp_path, conv_model_path):
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    cases = [("validate", conv_model_path, "--data", "nolabels.npz", "-o", "r.json"),
             ("compare", "missing.json", "missing.json")]
    for args in cases:
        done = edgeq_cli(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

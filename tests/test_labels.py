"""What labels may hold (issue 12.10): class names are refused before any work with one clear line; one-hot rows
are class ids (argmax), not regression targets; probability rows that are not one-hot are scored against their most
likely class and the record says so."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeq
from edgeq.data import Dataset, batches
from edgeq.errors import DataError
from edgeq.evaluate import validate
from edgeq.model import TensorSpec, make_session

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = np.array(["cat", "dog", "owl", "yak"])


@pytest.fixture
def images_and_ids():
    rng = np.random.default_rng(5)
    return rng.normal(0, 1, (120, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 120)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEQ_")} | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dtype", ["U", "S"])
def test_string_labels_in_an_npz_are_one_line_and_exit_2(conv_model_path, tmp_path, dtype):
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 1, 8, 8), np.float32), labels=CLASS_NAMES.astype(dtype))
    proc = _cli(tmp_path, "validate", str(conv_model_path), "--data", "val.npz", "-o", "r.json")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("edgeq: error: val.npz: the labels are strings") and "save the labels as integers" in line
    assert not (tmp_path / "r.json").exists()


def test_string_labels_are_refused_from_every_source(tmp_path):
    with pytest.raises(DataError, match="labels are strings"):
        Dataset.from_arrays({"x": np.zeros((4, 3), np.float32)}, labels=list(CLASS_NAMES))
    for i in range(4):
        np.save(tmp_path / f"{i}.npy", np.zeros(3, np.float32))
    np.save(tmp_path / "labels.npy", CLASS_NAMES)
    with pytest.raises(DataError, match="labels are strings"):
        Dataset.from_npy_dir(tmp_path)
    stream = Dataset(lambda: iter([({"x": np.zeros((4, 3), np.float32)}, CLASS_NAMES)]))
    with pytest.raises(DataError, match="labels are strings"):
        list(batches(stream, [TensorSpec("x", np.dtype("float32"), ("N", 3))]))


@pytest.mark.parametrize("labels", [np.arange(4).astype(np.complex64), np.arange(4).astype("datetime64[D]")])
def test_labels_that_are_not_numbers_are_refused(labels, tmp_path):
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 3), np.float32), labels=labels)
    with pytest.raises(DataError, match=re.escape(f"the labels are {labels.dtype}, not numbers")):
        Dataset.from_npz(tmp_path / "val.npz")


def test_one_hot_labels_are_classification_not_regression(conv_model_path, images_and_ids):
    x, ids = images_and_ids
    by_id = validate(conv_model_path, Dataset.from_arrays({"x": x}, labels=ids))
    one_hot = validate(conv_model_path, Dataset.from_arrays({"x": x}, labels=np.eye(10, dtype=np.float32)[ids]))
    logits = make_session(edgeq.load(conv_model_path).proto).run(None, {"x": x})[0]
    assert one_hot.metric == "top1" and "mae" not in one_hot.metrics
    assert one_hot.value == pytest.approx(100 * np.mean(logits.argmax(1) == ids)) == by_id.value
    assert not any("probability rows" in w for w in one_hot.warnings)


def test_soft_labels_are_scored_against_their_most_likely_class_and_say_so(conv_model_path, images_and_ids, tmp_path):
    x, ids = images_and_ids
    smoothed = np.full((len(ids), 10), 0.01, np.float32)
    smoothed[np.arange(len(ids)), ids] = 0.91  # label smoothing 0.1 over 10 classes
    smoothed[:20] = np.eye(10, dtype=np.float32)[ids[:20]]  # some rows one-hot: only the others are soft
    np.savez(tmp_path / "soft.npz", x=x, labels=smoothed)
    proc = _cli(tmp_path, "validate", str(conv_model_path), "--data", "soft.npz", "-o", "r.json", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    logits = make_session(edgeq.load(conv_model_path).proto).run(None, {"x": x})[0]
    assert record["metric"] == "top1"
    assert record["value"] == pytest.approx(100 * np.mean(logits.argmax(1) == ids))
    (said,) = [w for w in record["warnings"] if "probability rows" in w]
    assert said.startswith("100 of 120 labels") and "most likely class" in said
    assert "most likely class" in " ".join(proc.stdout.split())  # printed with the table


def test_label_rows_that_are_not_distributions_stay_regression_targets(conv_model_path):
    """Rows that do not sum to 1 (targets for every output value) keep MAE, as before."""
    x = np.random.default_rng(0).normal(0, 1, (30, 1, 8, 8)).astype(np.float32)
    logits = make_session(edgeq.load(conv_model_path).proto).run(None, {"x": x})[0]
    record = validate(conv_model_path, Dataset.from_arrays({"x": x}, labels=logits + 0.5))
    assert record.metric == "mae" and record.value == pytest.approx(0.5, abs=1e-5)

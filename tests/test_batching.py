"""Batching for models whose non-batch dims are dynamic (issue 12.2): PP-OCR's text-direction classifier declares its
input (-1, 3, ?, ?); `batches()` read the -1 as a fixed batch of -1 and yielded 398 samples then an empty batch, and
`validate` crashed. Every batch must hold `batch_size` samples except the last (the rest, never none)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.data import Dataset, batches
from edgeq.evaluate import validate
from edgeq.model import make_session

REPO = Path(__file__).resolve().parents[1]
PPOCR_CLS = Path(__import__("importlib.util").util.find_spec("rapidocr_onnxruntime").origin).parent / "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
BOUNDED = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def dynamic_classifier() -> onnx.ModelProto:
    """GlobalAveragePool-Flatten-Gemm over an input declared as PP-OCR cls declares it: (-1, 3, ?, ?), opset 11."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (2, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b")]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "dynamic_cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, None, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dyn") / "dyn.onnx"
    onnx.save(dynamic_classifier(), path)
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEQ_")} | {"PYTHONPATH": str(REPO)}


@st.composite
def chunked(draw) -> tuple[list[int], int]:
    """Chunk sizes as a source yields them (an .npz in 16 MiB pieces, a folder one file each) and a batch size."""
    total = draw(st.integers(1, 150))
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=6)) if total > 1 else set())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    return sizes, draw(st.one_of(st.integers(1, 40), st.integers(total, total + 50)))


def _dataset(sizes: list[int], shape: tuple[int, int]) -> tuple[Dataset, np.ndarray, np.ndarray]:
    n = sum(sizes)
    x = np.arange(n * 3 * shape[0] * shape[1], dtype=np.float32).reshape(n, 3, *shape)
    labels = np.arange(n) % 2
    edges = np.cumsum([0, *sizes])
    chunks = [{"x": x[a:b], "labels": labels[a:b]} for a, b in zip(edges[:-1], edges[1:])]
    return Dataset(lambda: iter(chunks), length=n), x, labels


def test_a_negative_dim_is_read_as_unknown(model_path):
    assert edgeq.load(model_path).inputs[0].shape == (None, 3, None, None)


@BOUNDED
@given(chunked(), st.tuples(st.integers(1, 5), st.integers(1, 7)))
def test_every_batch_is_full_but_the_last_and_no_sample_is_lost(model_path, case, shape):
    sizes, batch_size = case
    data, x, labels = _dataset(sizes, shape)
    got = list(batches(data, edgeq.load(model_path).inputs, batch_size))
    n = len(x)
    assert [b.size for b in got] == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    np.testing.assert_array_equal(np.concatenate([b.inputs["x"] for b in got]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in got]), labels)


@BOUNDED
@given(st.lists(st.tuples(st.integers(1, 20), st.sampled_from([(4, 6), (4, 8), (5, 6)])), min_size=1, max_size=5),
       st.integers(1, 16))
def test_samples_of_different_sizes_never_share_a_batch(model_path, chunks, batch_size):
    """Dynamic spatial dims: each chunk its own image size; a batch holds one size, at most batch_size samples."""
    arrays = [np.full((n, 3, *hw), i, np.float32) for i, (n, hw) in enumerate(chunks)]
    data = Dataset(lambda: iter([{"x": a} for a in arrays]))
    got = list(batches(data, edgeq.load(model_path).inputs, batch_size))
    assert all(0 < b.size <= batch_size for b in got)
    # the samples in order, each with its own size: nothing lost, reordered or padded
    assert [(a.shape[2:], a[0, 0, 0, 0]) for a in arrays for _ in range(len(a))] == \
        [(b.inputs["x"].shape[2:], v) for b in got for v in b.inputs["x"][:, 0, 0, 0]]
    # a batch ends early only where the next sample has another size, or at the end
    for this, following in zip(got, got[1:]):
        assert this.size == batch_size or this.inputs["x"].shape[2:] != following.inputs["x"].shape[2:]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([1, 2, 31, 33, 64, 100, 400]), st.sampled_from([1, 7, 32, 500]))
def test_validate_scores_every_sample_of_a_dynamic_model(model_path, n, batch_size):
    """1 sample, sizes that are not multiples of the batch, a batch larger than the data."""
    x = np.random.default_rng(n).normal(0, 1, (n, 3, 4, 6)).astype(np.float32)
    labels = np.random.default_rng(n + 1).integers(0, 2, n)
    record = validate(model_path, Dataset.from_arrays({"x": x}, labels=labels), batch_size=batch_size)
    logits = make_session(edgeq.load(model_path).proto).run(None, {"x": x})[0]
    assert record.samples == n
    assert record.value == pytest.approx(100 * np.mean(logits.argmax(1) == labels))


@pytest.mark.slow
def test_validate_on_ppocr_cls_with_400_images_and_batch_32(tmp_path):
    """The case of the issue, through the CLI: 400 images of 3x48x192 in an .npz (read in chunks of 151 samples)."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (400, 3, 48, 192)).astype(np.float32)
    labels = rng.integers(0, 2, 400)
    np.savez(tmp_path / "val.npz", x=x, labels=labels)
    proc = subprocess.run([sys.executable, "-m", "edgeq.cli", "validate", str(PPOCR_CLS), "--data", "val.npz", "--batch-size", "32",
                           "-o", "r.json"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    session = make_session(edgeq.load(PPOCR_CLS).proto)
    predictions = np.concatenate([session.run(None, {"x": x[i:i + 100]})[0].argmax(1) for i in range(0, 400, 100)])
    assert record["samples"] == 400
    assert record["value"] == pytest.approx(100 * np.mean(predictions == labels))
    assert math.isfinite(record["value"])


@pytest.mark.parametrize("size", ["0", "-4"])
def test_a_batch_size_below_one_is_one_line_and_exit_2(model_path, tmp_path, size):
    np.savez(tmp_path / "val.npz", x=np.zeros((5, 3, 4, 6), np.float32), labels=np.zeros(5, np.int64))
    proc = subprocess.run([sys.executable, "-m", "edgeq.cli", "validate", str(model_path), "--data", "val.npz", "--batch-size", size,
                           "-o", "r.json"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"edgeq: error: batch size {size} is not a positive number of samples — give a batch size of 1 or more"]
    assert not (tmp_path / "r.json").exists()

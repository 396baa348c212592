"""Shared fixtures: small ONNX models built in code, and the real pretrained models shipped by pip packages."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def make_conv_model(seed: int = 0, opset: int = 17, batch: int | str = "N") -> onnx.ModelProto:
    """A tiny conv net (Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm) with random weights: 10 classes."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (16,)).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (10, 16)).astype(np.float32), "wf"),
        numpy_helper.from_array(rng.normal(0, 0.1, (10,)).astype(np.float32), "bf"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def conv_model_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(make_conv_model(), path)
    return path


@pytest.fixture
def conv_data(tmp_path):
    """200 samples for the tiny conv net, with labels from the FP32 model itself plus some noise."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (200, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "data.npz"
    labels = rng.integers(0, 10, 200)
    np.savez(path, x=x, labels=labels)
    return path


def make_candidate(name: str, kind: str = "int8", p50_ms: float | None = None, drop: float = 0.0, evaluation: int = 1,
                   meets: bool = True, float_layers: tuple[str, ...] = (), method: str | None = None,
                   size_mb: float | None = None):
    """An `auto` candidate record as the search makes it (top-1 metric), for tests of the choice and the verdict."""
    from edgeq.auto import Candidate, Recipe

    return Candidate(name, f"{name}.onnx", Recipe(kind, tuple(float_layers), method), "top1", 100.0 - drop, [0.0, 0.0],
                     evaluation, drop, [drop, drop], meets, size_mb=size_mb, p50_ms=p50_ms)


def import_source(folder, name: str, source: str):
    """Write `source` as the module `name` in `folder` and import it (the MODULE:FACTORY tests import it from there)."""
    import importlib
    import sys

    (folder / f"{name}.py").write_text(source)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 1, 8, 8) float32 in [0, 1] and int64 class ids."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def train_on_digits(model, x: np.ndarray, y: np.ndarray, epochs: int, samples: int = 1200, lr: float = 3e-3):
    """Adam on the first `samples` digits in batches of 64 for `epochs` epochs; the model in eval mode."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(epochs):
        for start in range(0, samples, 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.from_numpy(x[start:start + 64])), torch.from_numpy(y[start:start + 64])).backward()
            opt.step()
    return model.eval()

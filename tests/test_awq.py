"""AWQ: the scale search starts from RTN, folding keeps FP32 outputs, planted activation outliers, end to end, errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.errors import DataError
from edgeq.model import Model
from edgeq.quantize.awq import awq_scale, fold_scales, output_error, search_clip, search_scale
from edgeq.quantize.int4 import ActStats, find_targets
from edgeq.quantize.packing import quantize_rtn

K, F, N = 64, 48, 32


def _stats(x: np.ndarray) -> ActStats:
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return ActStats(x.T @ x / len(x), np.abs(x).mean(axis=0), len(x))


def _outlier_inputs(rows: int, seed: int, k: int = K) -> np.ndarray:
    """Activations with four channels 30x larger than the rest, as in transformers' salient channels."""
    x = np.random.default_rng(seed).normal(size=(rows, k))
    return (x * np.where(np.arange(k) % 16 == 3, 30.0, 1.0)).astype(np.float32)


def _block_model(seed: int = 0, gamma_outliers: float = 1.0) -> Model:
    """x → LayerNorm → q, k, fc1 (+bias, Relu) → fc2, and → t → Tanh → fc3: the LayerNorm group, a MatMul chain
    whose producer fc1 is itself quantized, and a group behind Tanh (no exact producer: an inserted Mul)."""
    rng = np.random.default_rng(seed)
    gamma = (1 + 0.1 * rng.normal(size=K)) * np.where(np.arange(K) % 16 == 3, gamma_outliers, 1.0)
    w = lambda *shape: rng.normal(0, 0.1, shape).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in [
        ("gamma", gamma), ("beta", 0.1 * rng.normal(size=K)), ("wq", w(K, N)), ("wk", w(K, N)), ("w1", w(K, F)),
        ("b1", 0.1 * rng.normal(size=F)), ("w2", w(F, N)), ("wt", w(K, F)), ("w3", w(F, N))]]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="fc1"),
             helper.make_node("Add", ["a", "b1"], ["ab"], name="fc1_bias"),
             helper.make_node("Relu", ["ab"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
             helper.make_node("MatMul", ["h", "wt"], ["t"], name="t"),
             helper.make_node("Tanh", ["t"], ["tt"], name="tanh"),
             helper.make_node("MatMul", ["tt", "w3"], ["z"], name="fc3")]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["B", "T", N]) for o in ("q", "k", "y", "z")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return Model(model)


def _matmul_model(seed: int = 0) -> Model:
    w = np.random.default_rng(seed).normal(0, 0.1, (K, N)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return Model(model)


def _run(model: Model, x: np.ndarray) -> list[np.ndarray]:
    return model.session().run(None, {"x": x})


def test_alpha_zero_is_rtn_and_the_search_never_loses_to_it():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (K, N)).astype(np.float32)
    x = _outlier_inputs(2048, 1)
    st = _stats(x)
    s0 = awq_scale(st.absmean, 0.0)
    np.testing.assert_array_equal(s0, np.ones(K))
    np.testing.assert_array_equal(quantize_rtn(w * s0[:, None], 32).dequantize() / s0[:, None], quantize_rtn(w, 32).dequantize())
    rtn = output_error(w, quantize_rtn(w, 32).dequantize(), st.h)
    assert np.isclose(rtn, np.mean(np.sum((x @ (w - quantize_rtn(w, 32).dequantize())) ** 2, axis=1)), rtol=1e-4)
    s, alpha = search_scale([w], st, 32, True)
    awq = output_error(w, quantize_rtn(w * s[:, None], 32).dequantize() / s[:, None], st.h)
    assert alpha > 0 and awq < 0.5 * rtn  # the outlier channels' weights get a finer grid
    # activations with no salient channel: every alpha gives s = 1, and RTN is kept
    flat = ActStats(st.h, np.ones(K), st.rows)
    s, alpha = search_scale([w], flat, 32, True)
    assert alpha == 0.0 and (s == 1).all()
    clip = search_clip(w, st.h, 32, True)
    if clip is not None:  # clipping is kept only when it lowers the layer's output error
        assert output_error(w, quantize_rtn(w, 32, clip=clip).dequantize(), st.h) < rtn
        assert clip.shape == (N, 2) and ((clip > 0.5) & (clip <= 1)).all()


@pytest.mark.parametrize("exclude", [(), ("q",)])
def test_folding_keeps_fp32_outputs(exclude):
    """1/s into LayerNorm's scale and bias, into fc1's columns and bias (through Relu), or a Mul: same FP32 outputs."""
    model = _block_model()
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    targets, _ = find_targets(proto, edgeq.Int4WeightOnly(exclude_nodes=exclude))
    rng = np.random.default_rng(1)
    scales = {act: np.exp(rng.uniform(-1.5, 1.5, K if act == "h" else F)) for act in ("h", "r", "tt")}
    where = fold_scales(proto, targets, scales)
    # an excluded reader of h must not see h/s: the LayerNorm group then gets a Mul too
    assert where == ({"LayerNormalization": 1, "MatMul": 1, "inserted Mul": 1} if not exclude else {"MatMul": 1, "inserted Mul": 2})
    onnx.checker.check_model(proto)
    x = np.random.default_rng(2).normal(size=(2, 5, K)).astype(np.float32)
    for got, ref in zip(_run(Model(proto), x), _run(model, x)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    fc1 = next(t for t in targets if t.node.name == "fc1")
    np.testing.assert_allclose(inits[fc1.node.input[1]], fc1.weight)  # both scales on fc1: rows (h) and columns (r)


def test_awq_beats_rtn_on_planted_activation_outliers():
    model = _matmul_model()
    calib = edgeq.Dataset.from_arrays({"x": _outlier_inputs(512, 3)})
    x = _outlier_inputs(512, 4)
    ref = _run(model, x)[0]
    err = {}
    for algorithm in ("rtn", "awq"):
        q = edgeq.quantize(model, edgeq.Int4WeightOnly(algorithm=algorithm, accuracy_level=0), calib=calib)
        err[algorithm] = float(np.mean((_run(q, x)[0] - ref) ** 2))
    assert err["awq"] < 0.5 * err["rtn"], err
    assert "inserted a Mul" in " ".join(q.summary.notes)  # x is the graph's input: nothing upstream can absorb 1/s


@pytest.mark.parametrize("fmt,symmetric", [("nbits", True), ("qdq", False)])
def test_end_to_end_runs_on_onnx_runtime_close_to_fp32(fmt, symmetric):
    model = _block_model(gamma_outliers=20.0)
    x = np.random.default_rng(5).normal(size=(64, 8, K)).astype(np.float32)
    calib = edgeq.Dataset.from_arrays({"x": x[:48]})
    config = edgeq.Int4WeightOnly(algorithm="awq", format=fmt, symmetric=symmetric, int8_auto=1)
    q = edgeq.quantize(model, config, calib=calib)
    assert q.summary.calibration == {"method": "awq", "samples": 48} and sum(q.summary.quantized.values()) == 6
    assert "1/s folded into 1 LayerNormalization, 1 MatMul" in q.summary.notes[0]
    rtn = edgeq.quantize(model, edgeq.Int4WeightOnly(algorithm="rtn", format=fmt, symmetric=symmetric, int8_auto=1), calib=calib)
    for got, base, ref in zip(_run(q, x[48:]), _run(rtn, x[48:]), _run(model, x[48:])):
        assert np.abs(got - ref).max() < 0.15 * np.abs(ref).max()
        assert np.mean((got - ref) ** 2) < np.mean((base - ref) ** 2)  # measured: 1.2-4x lower than RTN


def test_awq_without_calibration_is_a_user_error(tmp_path):
    with pytest.raises(DataError, match="AWQ needs calibration data"):
        edgeq.quantize(_matmul_model(), edgeq.Int4WeightOnly(algorithm="awq"))
    src = tmp_path / "mm.onnx"
    onnx.save(_matmul_model().proto, src)
    cmd = [sys.executable, "-m", "edgeq.cli", "quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--precision", "int4",
           "--algorithm", "awq"]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and "--calib" in bad.stderr and "Traceback" not in bad.stderr
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_outlier_inputs(64, 6))
    proc = subprocess.run(cmd + ["--calib", str(calib)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node} == {"Mul", "MatMulNBits"}

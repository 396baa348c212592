"""One static QDQ builder: `edgeq.quantize`, the sensitivity analysis and `auto`'s candidates give the same graph
(nodes, initializer dtypes and values, opset) for the same config, W4A8 included."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.analyze.sensitivity import eval_inputs, full_int8_fidelity, sensitivity
from edgeq.quantize.prepare import INT4_OPSET
from edgeq.quantize.qdq import prepare_and_calibrate, prepare_and_calibrate_each, quantize_qdq
from tests.conftest import make_candidate


def _pool_reshape_model() -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Reshape-MatMul-Add: a folded Relu, two ops that take their input's scale, a MatMul weight;
    the Relu is unnamed (the builder names it)."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b1"),
             numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(0, 0.2, (64, 6)).astype(np.float32), "wm"),
             numpy_helper.from_array(rng.normal(0, 0.1, (6,)).astype(np.float32), "bm")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "wm"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "bm"], ["y"], name="bias")]
    graph = helper.make_graph(nodes, "pool_reshape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _graph(proto: onnx.ModelProto) -> dict:
    """What makes two QDQ graphs the same: nodes in order with their attributes, initializers by name with dtype
    and values, the opsets."""
    nodes = [(n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output),
              tuple(sorted(a.SerializeToString() for a in n.attribute))) for n in proto.graph.node]
    inits = {t.name: (t.data_type, numpy_helper.to_array(t).tobytes()) for t in proto.graph.initializer}
    return {"nodes": nodes, "initializers": inits, "opsets": sorted((o.domain, o.version) for o in proto.opset_import)}


@pytest.fixture
def calib():
    return edgeq.Dataset.from_arrays({"x": np.random.default_rng(2).normal(0, 1, (48, 1, 8, 8)).astype(np.float32)})


@pytest.mark.parametrize("weight_bits,activation_type", [(8, "uint8"), (4, "uint8"), (8, "int8")])
def test_quantize_and_sensitivity_build_the_same_graph(calib, monkeypatch, weight_bits, activation_type):
    config = edgeq.Int8Static(method="minmax", weight_bits=weight_bits, activation_type=activation_type)
    model = edgeq.Model(_pool_reshape_model(), None)
    quantized = _graph(edgeq.quantize(model, config, calib=calib).proto)
    prep = prepare_and_calibrate(model, calib, config)
    assert _graph(quantize_qdq(prep)) == quantized
    sensitivity_mod = importlib.import_module("edgeq.analyze.sensitivity")  # the package exports the function
    built = []
    real_outputs_of = sensitivity_mod.outputs_of
    monkeypatch.setattr(sensitivity_mod, "outputs_of", lambda proto, feed: built.append(proto) or real_outputs_of(proto, feed))
    feed = eval_inputs(prep, calib)
    full_int8_fidelity(prep, feed)
    assert _graph(built[-1]) == quantized
    built.clear()
    ranked = sensitivity(prep, feed, ["conv", "matmul"])
    assert len(ranked) == 2
    for layer, kept_float in (("conv", built[2]), ("matmul", built[4])):  # reference, then (alone, kept) per layer
        alone = dataclasses.replace(config, exclude_nodes=(layer,))
        assert _graph(kept_float) == _graph(edgeq.quantize(model, alone, calib=calib).proto)
    weights = {name: dtype for name, (dtype, _) in quantized["initializers"].items() if name in ("w1_quantized", "wm_quantized")}
    expected = TensorProto.INT4 if weight_bits == 4 else TensorProto.INT8
    assert len(weights) == 2 and set(weights.values()) == {expected}
    if weight_bits == 4:
        assert ("", INT4_OPSET) in quantized["opsets"]


def test_auto_candidates_are_the_graphs_quantize_builds(calib):
    """`auto`'s calibration step evaluates the full-INT8 candidate of each method: the graphs `edgeq.quantize`
    gives for that method, with int4 weights for a W4A8 config."""
    from edgeq.auto.search import pick_calibration

    config = edgeq.Int8Static(weight_bits=4)
    model = edgeq.Model(_pool_reshape_model(), None)

    class Search:
        candidates: dict = {}

        def evaluate(self, cands):
            self.candidates.update({name: proto for name, proto, _ in cands})
            return [make_candidate(name, method=recipe.method) for name, _, recipe in cands]

    search = Search()
    methods = ("minmax", "mse")
    pick_calibration(search, model, calib, config, methods, "validation", [], lambda *a: None)
    for method in methods:
        expected = edgeq.quantize(model, dataclasses.replace(config, method=method), calib=calib).proto
        assert _graph(search.candidates[f"int8-{method}"]) == _graph(expected)
    assert prepare_and_calibrate_each(model, calib, config, methods)["mse"].model.opset == INT4_OPSET

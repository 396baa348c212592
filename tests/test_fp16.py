"""FP16 conversion: small graphs built for one rule each, then the real PP-OCR det and MiniLM models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.testing import zoo
from edgeq.model import Model
from edgeq.quantize import fp16 as fp16_module
from edgeq.quantize.config import FP16_BLOCK_OPS
from edgeq.quantize.fp16 import convert_fp16
from tests.conftest import make_conv_model

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()) -> Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    proto.ir_version = 8
    return Model(proto)


def _run(model: Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return model.session().run(None, feeds)


def _dtype(model: Model, name: str) -> int:
    """Element type of a tensor in a converted model, as ONNX shape inference sees it."""
    graph = onnx.shape_inference.infer_shapes(model.proto, strict_mode=True).graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == name:
            return value.type.tensor_type.elem_type
    return next(t.data_type for t in graph.initializer if t.name == name)


def _node(model: Model, name: str) -> onnx.NodeProto:
    return next(n for n in model.proto.graph.node if n.name == name)


def _left(summary) -> dict[str, str]:
    return {entry["node"]: entry["reason"] for entry in summary.left_float}


def _valid(model: Model) -> None:
    onnx.checker.check_model(model.proto, full_check=True)


def _initializer_bytes(model: Model) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.proto.graph.initializer)


# ------------------------------------------------------------------------------------------- small graphs

def test_conv_net_halves_weights_keeps_float32_io_and_accuracy():
    source = Model(make_conv_model())
    converted, summary = convert_fp16(source, edgeq.Fp16())
    _valid(converted)
    assert summary.precision == "fp16" and summary.mode is None
    assert summary.quantized["Conv"] == 2 and summary.quantized["Gemm"] == 1 and not summary.left_float
    assert all(t.data_type == F16 for t in converted.proto.graph.initializer)
    assert _initializer_bytes(converted) * 2 == _initializer_bytes(source)
    assert converted.proto.ByteSize() < 0.6 * source.proto.ByteSize()  # the rest is graph structure
    assert [s.dtype for s in converted.inputs + converted.outputs] == [np.float32, np.float32]
    x = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
    expected, got = _run(source, {"x": x})[0], _run(converted, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=5e-3 * np.abs(expected).max())


def test_conv_net_with_float16_io():
    source = Model(make_conv_model())
    converted, summary = convert_fp16(source, edgeq.Fp16(keep_io_types=False))
    _valid(converted)
    assert [s.dtype for s in converted.inputs + converted.outputs] == [np.float16, np.float16]
    assert not any(n.op_type == "Cast" for n in converted.proto.graph.node)
    x = np.random.default_rng(1).normal(size=(2, 1, 8, 8)).astype(np.float32)
    got = _run(converted, {"x": x.astype(np.float16)})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), _run(source, {"x": x})[0], atol=1e-2)


def _scaled_model(constant: np.ndarray) -> Model:
    """x -> Relu -> Mul(constant) -> Add(1) -> y: the constant decides whether Mul may run in float16."""
    return _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                   helper.make_node("Mul", ["r", "k"], ["m"], name="scale"),
                   helper.make_node("Add", ["m", "one"], ["y"], name="shift")],
                  [helper.make_tensor_value_info("x", F32, [2, 3])], [helper.make_tensor_value_info("y", F32, [2, 3])],
                  [numpy_helper.from_array(constant, "k"), numpy_helper.from_array(np.ones(3, np.float32), "one")])


@pytest.mark.parametrize("constant, words", [
    (np.array([1.0, 2.0, 1e5], np.float32), "beyond float16's range"),
    (np.array([1e-9, 2e-9, 3e-9], np.float32), "flush to zero"),
])
def test_constant_outside_float16_keeps_its_reader_float32(constant, words):
    source = _scaled_model(constant)
    converted, summary = convert_fp16(source, edgeq.Fp16())
    _valid(converted)
    assert "scale" in _left(summary) and words in _left(summary)["scale"] and "'k'" in _left(summary)["scale"]
    assert summary.quantized == {"Add": 1, "Relu": 1}
    stored = next(t for t in converted.proto.graph.initializer if t.name == "k")
    np.testing.assert_array_equal(numpy_helper.to_array(stored), constant)  # never clamped, never flushed
    x = np.array([[1.0, 2.0, 0.5], [0.0, 3.0, 0.25]], np.float32)
    np.testing.assert_allclose(_run(converted, {"x": x})[0], _run(source, {"x": x})[0], rtol=1e-3)


def test_blocked_op_type_and_node_name_stay_float32():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=-1),
             helper.make_node("Relu", ["p"], ["y"], name="relu")]
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), "w")
    source = _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 4])], [helper.make_tensor_value_info("y", F32, [2, 4])], [w])
    converted, summary = convert_fp16(source, edgeq.Fp16(block_nodes=("relu", "no_such_node")))
    _valid(converted)
    left = _left(summary)
    assert "block_ops" in left["softmax"] and left["relu"] == "listed in block_nodes"
    assert summary.quantized == {"MatMul": 1}
    assert _dtype(converted, _node(converted, "softmax").input[0]) == F32
    assert any("no_such_node" in w for w in summary.warnings)
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(converted, {"x": x})[0], _run(source, {"x": x})[0], atol=2e-3)


def test_resize_converts_data_but_scales_stay_float32():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Resize", ["r", "", "scales"], ["y"], name="up", mode="linear")]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    source = _model(nodes, [helper.make_tensor_value_info("x", F32, [1, 2, 4, 4])],
                    [helper.make_tensor_value_info("y", F32, [1, 2, 8, 8])], [scales])
    config = edgeq.Fp16(block_ops=tuple(op for op in FP16_BLOCK_OPS if op != "Resize"))
    converted, summary = convert_fp16(source, config)
    _valid(converted)
    assert summary.quantized == {"Relu": 1, "Resize": 1}
    resize = _node(converted, "up")
    assert _dtype(converted, resize.input[0]) == F16
    assert _dtype(converted, "scales") == F32  # the Resize schema fixes scales to tensor(float)
    x = np.random.default_rng(2).normal(size=(1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(converted, {"x": x})[0], _run(source, {"x": x})[0], atol=5e-3)


def test_if_subgraph_reading_a_float16_tensor_loads_and_runs():
    def branch(op: str, name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["r", "two"], [f"{name}_out"], name=f"{name}_op")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", F32, [2, 3])])

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["cond"], ["b"], name="branch", then_branch=branch("Add", "then"),
                              else_branch=branch("Mul", "else")),
             helper.make_node("Sigmoid", ["b"], ["y"], name="sigmoid")]
    source = _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                    [helper.make_tensor_value_info("y", F32, [2, 3])], [numpy_helper.from_array(np.float32(2.0), "two")])
    converted, summary = convert_fp16(source, edgeq.Fp16())
    _valid(converted)
    assert "subgraph" in _left(summary)["branch"]
    assert summary.quantized == {"Add": 1, "Mul": 1, "Relu": 1, "Sigmoid": 1}  # the branches are converted inside
    x = np.random.default_rng(3).normal(size=(2, 3)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(_run(converted, feeds)[0], _run(source, feeds)[0], atol=2e-3)


@pytest.mark.parametrize("value, stored", [(0.5, F16), (0.1, F32)])
def test_initializer_shared_by_float16_and_float32_readers(value, stored):
    """Stored in float16 when float16 holds it exactly (0.5), else in float32 (0.1), with a Cast for the others."""
    nodes = [helper.make_node("Mul", ["x", "c"], ["m"], name="mul"),
             helper.make_node("Softmax", ["m"], ["s"], name="softmax"),
             helper.make_node("Sub", ["s", "c"], ["y"], name="sub"),
             helper.make_node("Pow", ["s", "c"], ["z"], name="pow")]
    source = _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 3])],
                    [helper.make_tensor_value_info("y", F32, [2, 3]), helper.make_tensor_value_info("z", F32, [2, 3])],
                    [numpy_helper.from_array(np.full(3, value, np.float32), "c")])
    converted, summary = convert_fp16(source, edgeq.Fp16())
    _valid(converted)
    assert summary.quantized == {"Mul": 1, "Sub": 1}
    assert _dtype(converted, "c") == stored
    x = np.random.default_rng(4).normal(size=(2, 3)).astype(np.float32)
    for got, expected in zip(_run(converted, {"x": x}), _run(source, {"x": x})):
        np.testing.assert_allclose(got, expected, atol=2e-3)


def test_graph_output_read_inside_the_graph_keeps_name_and_type():
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("Neg", ["h"], ["y"], name="neg")]
    source = _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 3])],
                    [helper.make_tensor_value_info("h", F32, [2, 3]), helper.make_tensor_value_info("y", F32, [2, 3])])
    converted, _ = convert_fp16(source, edgeq.Fp16())
    _valid(converted)
    assert [(s.name, s.dtype) for s in converted.outputs] == [("h", np.float32), ("y", np.float32)]
    x = np.random.default_rng(5).normal(size=(2, 3)).astype(np.float32)
    for got, expected in zip(_run(converted, {"x": x}), _run(source, {"x": x})):
        np.testing.assert_allclose(got, expected, atol=2e-3)


def test_contrib_op_without_float16_cpu_kernel_stays_float32():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Gelu", ["r"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Neg", ["g"], ["y"], name="neg")]
    source = _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 3])], [helper.make_tensor_value_info("y", F32, [2, 3])],
                    extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    converted, summary = convert_fp16(source, edgeq.Fp16())
    assert "no float16 kernel" in _left(summary)["gelu"]
    assert summary.quantized == {"Neg": 1, "Relu": 1}
    x = np.random.default_rng(6).normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(converted, {"x": x})[0], _run(source, {"x": x})[0], atol=2e-3)


def test_cast_reading_a_float16_tensor_needs_no_extra_cast():
    """Relu(float16) -> Cast(to int64): the model's Cast reads the float16 tensor instead of a float32 copy."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Cast", ["r"], ["i"], name="to_int", to=TensorProto.INT64),
             helper.make_node("Sigmoid", ["r"], ["y"], name="sigmoid")]
    source = _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 3])],
                    [helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3]), helper.make_tensor_value_info("y", F32, [2, 3])])
    converted, summary = convert_fp16(source, edgeq.Fp16())
    _valid(converted)
    assert _node(converted, "to_int").input[0] == "r"
    assert [n.op_type for n in converted.proto.graph.node].count("Cast") == 3  # input, y, and the model's own
    x = np.array([[0.4, 2.6, -1.0], [7.0, 0.0, 3.5]], np.float32)
    for got, expected in zip(_run(converted, {"x": x}), _run(source, {"x": x})):
        np.testing.assert_allclose(got, expected, atol=2e-3)


def test_model_onnx_runtime_cannot_load_at_all_is_converted_with_a_warning():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Frobnicate", ["r"], ["y"], name="custom", domain="example.ops")]
    source = _model(nodes, [helper.make_tensor_value_info("x", F32, [2, 3])], [helper.make_tensor_value_info("y", F32, [2, 3])],
                    extra_opsets=[helper.make_opsetid("example.ops", 1)])
    converted, summary = convert_fp16(source, edgeq.Fp16())
    assert summary.quantized == {"Relu": 1}
    assert any("cannot load the original model either" in w for w in summary.warnings)
    custom = _node(converted, "custom")
    assert next(n for n in converted.proto.graph.node if custom.input[0] in n.output).op_type == "Cast"


def test_node_onnx_runtime_rejects_goes_back_to_float32(monkeypatch):
    """The load check: a node named in ONNX Runtime's error returns to float32 and conversion runs again."""
    real = fp16_module._load_failure
    failures = iter(["Could not find an implementation for Relu(14) node with name 'relu2'"])
    monkeypatch.setattr(fp16_module, "_load_failure", lambda proto: next(failures, None) or real(proto))
    converted, summary = convert_fp16(Model(make_conv_model()), edgeq.Fp16())
    _valid(converted)
    assert "ONNX Runtime CPU cannot load it" in _left(summary)["relu2"]
    assert summary.quantized["Relu"] == 1


def test_quantize_api_saves_a_verified_model(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(make_conv_model(), path)
    quantized = edgeq.quantize(path, edgeq.Fp16())
    assert quantized.summary.quantized["Conv"] == 2
    out = quantized.save(tmp_path / "tiny_fp16.onnx")
    assert out.stat().st_size < 0.6 * path.stat().st_size
    assert edgeq.load(out).inputs[0].dtype == np.float32


# ------------------------------------------------------------------------------------------- real models

@pytest.fixture(scope="session")
def minilm_path(tmp_path_factory):
    return zoo.export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")


@pytest.mark.slow
def test_ppocr_det_fp16_is_half_the_size_and_finds_the_same_text():
    source = edgeq.load(zoo.ppocr_det_path())
    converted, summary = convert_fp16(source, edgeq.Fp16())
    _valid(converted)
    assert converted.proto.ByteSize() <= 0.55 * zoo.ppocr_det_path().stat().st_size
    assert summary.quantized["Conv"] == 62
    # its first BatchNormalization has a running variance of 9.8e7: float32, said so, never clamped
    assert any("beyond float16's range" in entry["reason"] for entry in summary.left_float)
    pages = zoo.render_text_images(2, height=480, width=640)
    expected = source.session(threads=2).run(None, {"x": pages})[0]
    got = converted.session(threads=2).run(None, {"x": pages})[0]
    assert np.abs(got - expected).mean() < 0.01
    text, found = expected > 0.3, got > 0.3
    assert text.mean() > 0.01  # the pages hold text the model sees
    assert (text & found).sum() / (text | found).sum() >= 0.95


@pytest.mark.slow
def test_minilm_fp16_gives_the_same_sentence_embeddings(minilm_path):
    source = edgeq.load(minilm_path)
    converted, summary = convert_fp16(source, edgeq.Fp16())
    _valid(converted)
    assert converted.proto.ByteSize() <= 0.55 * minilm_path.stat().st_size
    assert summary.quantized["MatMul"] == 48
    assert {entry["op_type"] for entry in summary.left_float} >= {"LayerNormalization", "Softmax"}
    feeds = zoo.minilm_inputs(zoo.sample_sentences(16))
    expected = source.session(threads=2).run(["sentence_embedding"], feeds)[0]
    got = converted.session(threads=2).run(["sentence_embedding"], feeds)[0]
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.999

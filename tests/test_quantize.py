"""INT8 static/dynamic on small models built in code: what gets quantized, preparation of messy graphs, fidelity."""
import json
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import edgeq
from edgeq.model import make_session
from edgeq.quantize.prepare import constants_to_initializers
from tests.conftest import make_conv_model


def _run(model: edgeq.Model, x: np.ndarray) -> np.ndarray:
    return make_session(model.proto).run(None, {"x": x})[0]


@pytest.fixture
def calib(conv_data):
    return edgeq.Dataset.from_npz(conv_data)


def _x():
    return np.random.default_rng(5).normal(0, 1, (32, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_static_quantizes_compute_ops_and_stays_close(conv_model_path, calib, per_channel, activation_type):
    model = edgeq.load(conv_model_path)
    q = edgeq.quantize(model, edgeq.Int8Static(per_channel=per_channel, activation_type=activation_type), calib=calib)
    assert q.summary.quantized == {"Conv": 2, "Gemm": 1}
    assert q.summary.left_float == []
    ref, out = _run(model, _x()), _run(q, _x())
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    weights = [t for t in q.proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights, "conv weights are stored as int8"
    scales = {n.input[0]: n.input[1] for n in q.proto.graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: numpy_helper.to_array(t) for t in q.proto.graph.initializer}
    w_scale = inits[scales[weights[0].name]]
    assert (w_scale.shape == (weights[0].dims[0],)) == per_channel


def test_static_requires_calibration_data(conv_model_path):
    with pytest.raises(edgeq.UserError, match="calibration"):
        edgeq.quantize(edgeq.load(conv_model_path), edgeq.Int8Static())


def test_dynamic_quantizes_matrix_ops_only(conv_model_path):
    q = edgeq.quantize(edgeq.load(conv_model_path), edgeq.Int8Dynamic())
    ops = {n.op_type for n in q.proto.graph.node}
    assert "ConvInteger" not in ops and "Conv" in ops
    assert sum(q.summary.quantized.values()) == 1
    ref = _run(edgeq.load(conv_model_path), _x())
    assert np.abs(_run(q, _x()) - ref).max() < 0.05 * np.abs(ref).max()


def test_dynamic_conv_when_forced_is_reported(conv_model_path):
    q = edgeq.quantize(edgeq.load(conv_model_path), edgeq.Int8Dynamic(op_types=("Conv", "Gemm")))
    assert "ConvInteger" in {n.op_type for n in q.proto.graph.node}
    assert any("ConvInteger" in w and "measured" in w and "FP32 latency" in w for w in q.summary.warnings)


def test_dynamic_on_model_without_matmul_says_it_stays_fp32(tmp_path):
    proto = make_conv_model()
    nodes = [n for n in proto.graph.node if n.op_type != "Gemm"]
    nodes[-1].output[0] = "logits"
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 16
    path = tmp_path / "convonly.onnx"
    onnx.save(proto, path)
    q = edgeq.quantize(edgeq.load(path), edgeq.Int8Dynamic())
    assert q.summary.quantized == {}
    assert any("stays FP32" in w for w in q.summary.warnings)


def _with_constant_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Turn initializers into Constant nodes, as Paddle and old TF exporters write them."""
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in proto.graph.initializer]
    nodes = list(proto.graph.node)
    del proto.graph.initializer[:]
    del proto.graph.node[:]
    proto.graph.node.extend(consts + nodes)
    return proto


def test_constant_node_weights_and_old_opset_are_quantized(tmp_path, calib):
    proto = _with_constant_weights(make_conv_model(opset=11))
    proto.ir_version = 6
    path = tmp_path / "old.onnx"
    onnx.save(proto, path)
    model = edgeq.load(path)
    q = edgeq.quantize(model, edgeq.Int8Static(), calib=calib)
    assert q.summary.quantized == {"Conv": 2, "Gemm": 1}
    assert any("Constant" in n for n in q.summary.notes) and any("opset 11" in n for n in q.summary.notes)
    q.save(tmp_path / "old_int8.onnx")
    big_float = [t.name for t in q.proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 64]
    assert big_float == [], "every weight tensor is stored as int8"


def test_constants_to_initializers_handles_scalar_attributes():
    proto = make_conv_model()
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value_float=2.0))
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["ks"], value_ints=[1, 2]))
    assert constants_to_initializers(proto) == 2
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits["k"] == np.float32(2.0) and inits["ks"].tolist() == [1, 2]


def test_excluded_node_stays_float_and_is_listed(conv_model_path, calib):
    q = edgeq.quantize(edgeq.load(conv_model_path), edgeq.Int8Static(exclude_nodes=("conv2",)), calib=calib)
    assert q.summary.quantized == {"Conv": 1, "Gemm": 1}
    assert [d["node"] for d in q.summary.left_float] == ["conv2"]


def test_configs_check_themselves_round_trip_as_dicts_and_the_summary_records_the_recipe():
    from edgeq.errors import ConfigError
    from edgeq.quantize.config import RECIPES, Recipe

    for bad in (dict(method="magic"), dict(activation_type="int16"), dict(weight_bits=3), dict(rounding="up"),
                dict(percentile=20.0), dict(smoothquant=1.5), dict(batch_size=0), dict(detection_head="never")):
        with pytest.raises(ConfigError):
            edgeq.Int8Static(**bad)
    with pytest.raises(ConfigError, match="not a valid algorithm"):
        edgeq.Int4WeightOnly(algorithm="magic")
    for kind in RECIPES.values():
        config = kind()
        assert Recipe.from_dict(config.to_dict()) == config
    custom = edgeq.Int8Static(method="minmax", exclude_nodes=["conv1"], weight_bits=4)
    assert custom.exclude_nodes == ("conv1",)  # lists from JSON or the CLI become tuples (hashable, frozen)
    assert Recipe.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    with pytest.raises(ConfigError, match="no field colour"):
        Recipe.from_dict({"kind": "Fp16", "colour": "red"})
    with pytest.raises(ConfigError, match="unknown recipe kind"):
        Recipe.from_dict({"kind": "Int2"})
    q = edgeq.quantize(edgeq.Model(make_conv_model()), edgeq.Fp16())
    assert q.summary.recipe == edgeq.Fp16().to_dict() and q.summary.to_dict()["recipe"]["kind"] == "Fp16"

"""The analyses on small models with known answers."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.analyze import analyze, operator_support, weight_outliers
from edgeq.analyze.outliers import QMAX
from edgeq.analyze.quality import data_quality
from edgeq.analyze.sensitivity import eval_inputs, fidelity, sensitivity
from edgeq.errors import ConfigError
from edgeq.model import make_session
from edgeq.quantize.qdq import prepare_and_calibrate
from edgeq.sqnr import SQNR_CAP_DB
from edgeq.testing.planted import plant_outliers
from tests.conftest import make_conv_model


def _run(proto, x):
    return make_session(proto, threads=1).run(None, {"x": x})[0]


@pytest.fixture
def x_calib():
    return np.random.default_rng(3).normal(0, 1, (96, 1, 8, 8)).astype(np.float32)


def test_planting_keeps_fp32_and_breaks_the_layer_ranked_first(x_calib):
    """Outliers planted into conv2 (function-preserving): conv2 is ranked first by sensitivity and by outliers."""
    clean = make_conv_model()
    planted = make_conv_model()
    note = plant_outliers(planted, "conv2", 300.0)
    assert "conv2" in note
    np.testing.assert_allclose(_run(planted, x_calib), _run(clean, x_calib), rtol=1e-4, atol=1e-4)
    calib = edgeq.Dataset.from_arrays({"x": x_calib})
    prep = prepare_and_calibrate(edgeq.Model(planted, None), calib)
    ranked = sensitivity(prep, eval_inputs(prep, calib, 64))
    assert [s.rank for s in ranked] == [1, 2, 3]
    assert ranked[0].node == "conv2"
    assert ranked[0].only_quantized.sqnr_db < ranked[1].only_quantized.sqnr_db - 5
    # keeping only conv2 in float restores fidelity well above keeping any other layer in float
    kept = {s.node: s.only_float.sqnr_db for s in ranked}
    assert kept["conv2"] > max(v for k, v in kept.items() if k != "conv2") + 5
    outl = weight_outliers(prep.model.proto)
    assert outl[0].node == "conv2" and "clip-or-float" in outl[0].flags
    assert outl[0].outlier_ratio > 100
    assert all(not o.flags for o in outl[1:])


def test_outlier_numbers_are_exact():
    """Per-tensor step is max|w|/127; a channel 20× wider than the rest is flagged for per-channel."""
    proto = make_conv_model()
    inits = {t.name: t for t in proto.graph.initializer}
    w = numpy_helper.to_array(inits["w2"]).copy()
    w[3] *= 20
    inits["w2"].CopyFrom(numpy_helper.from_array(w, "w2"))
    rows = {o.node: o for o in weight_outliers(proto)}
    conv2 = rows["conv2"]
    assert conv2.max_abs == pytest.approx(float(np.abs(w).max()), rel=1e-6)
    assert conv2.per_tensor_step == pytest.approx(float(np.abs(w).max()) / QMAX, rel=1e-6)
    assert conv2.channel_spread > 10
    assert "per-channel" in conv2.flags and "clip-or-float" not in conv2.flags
    assert conv2.zeroed_per_tensor > conv2.zeroed_per_channel
    assert not rows["conv1"].flags


def _model_with(op: str) -> onnx.ModelProto:
    base = make_conv_model()
    graph = base.graph
    graph.node.append(helper.make_node(op, ["logits"], ["odd"], name="odd_op"))
    graph.output[0].CopyFrom(helper.make_tensor_value_info("odd", TensorProto.FLOAT, ["N", 10]))
    onnx.checker.check_model(base)
    return base


def test_operator_absent_from_a_profile_is_unsupported():
    proto = _model_with("Erf")
    tfl = operator_support(proto, "tflite")
    status = {n.node: n.status for n in tfl.nodes}
    assert status["odd_op"] == "float"             # Erf is in TFLite's float list
    npu = operator_support(proto, "npu")
    status = {n.node: n.status for n in npu.nodes}
    assert status["odd_op"] == "unsupported" and npu.unsupported_ops == ["Erf"]
    assert status["conv1"] == status["conv2"] == status["fc"] == "int8"
    assert status["relu1"] == "int8"                 # passes int8 data through after an int8 conv
    ort = operator_support(_model_with("Softsign"), "onnxruntime-cpu")
    assert {n.node: n.status for n in ort.nodes}["odd_op"] == "float"   # ORT runs any ONNX op, in float
    assert operator_support(_model_with("Softsign"), "tflite").counts["unsupported"] == 1


def test_custom_profile_file_and_unknown_target(tmp_path):
    profile = {"name": "tiny-npu", "int8": {"Conv": "conv"}, "default": "unsupported", "passthrough": ["Relu"]}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(profile))
    rep = operator_support(make_conv_model(), path)
    status = {n.node: n.status for n in rep.nodes}
    assert status["conv1"] == "int8" and status["relu1"] == "int8"
    assert status["fc"] == "unsupported" and status["gap"] == "unsupported"
    assert rep.counts == {"int8": 4, "float": 0, "unsupported": 3}
    with pytest.raises(ConfigError):
        operator_support(make_conv_model(), "no-such-runtime")


def test_data_quality_counts_and_coverage_warning(x_calib):
    calib_x = np.concatenate([x_calib[:40], x_calib[:10]])           # 10 exact duplicates
    calib_x[20, 0, 0, 0] = np.nan                                     # one non-finite sample (not a duplicated one)
    calib = edgeq.Dataset.from_arrays({"x": calib_x})
    shifted = edgeq.Dataset.from_arrays({"x": x_calib * 4.0})         # validation far outside the calibrated ranges
    same = edgeq.Dataset.from_arrays({"x": x_calib[:40]})
    clean = edgeq.Dataset.from_arrays({"x": x_calib[:40]})
    model = edgeq.Model(make_conv_model(), None)
    prep = prepare_and_calibrate(model, clean, edgeq.Int8Static(method="minmax"))
    q = data_quality(prep, calib, shifted, prep.ranges)
    assert q.calib.samples == 50 and q.calib.duplicates == 10 and q.calib.nonfinite == 1
    assert any("duplicates" in w for w in q.warnings) and any("NaN" in w for w in q.warnings)
    assert any("does not represent the validation set" in w for w in q.warnings)
    inp = next(c for c in q.coverage if c.tensor == "x")
    expected = float(np.mean((x_calib * 4 < x_calib[:40].min()) | (x_calib * 4 > x_calib[:40].max())))
    assert inp.outside == pytest.approx(expected, abs=1e-6)
    ok = data_quality(prep, clean, same, prep.ranges)
    assert all(c.outside == 0 for c in ok.coverage)
    assert not any("does not represent" in w for w in ok.warnings)


def test_fidelity_known_values():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    f = fidelity(ref, ref + np.array([[0.1, 0.0], [0.0, 0.0]]))
    assert f.sqnr_db == pytest.approx(10 * np.log10(5 / 0.01), abs=1e-3)
    assert fidelity(ref, ref).sqnr_db == SQNR_CAP_DB and fidelity(ref, ref).cosine == pytest.approx(1.0)


def test_analyze_api_and_cli(tmp_path, x_calib):
    planted = make_conv_model()
    plant_outliers(planted, "conv2", 300.0)
    model_path = tmp_path / "planted.onnx"
    onnx.save(planted, model_path)
    np.savez(tmp_path / "calib.npz", x=x_calib)
    np.savez(tmp_path / "val.npz", x=x_calib[:32])
    a = analyze(model_path, tmp_path / "calib.npz", "npu", val=tmp_path / "val.npz", samples=64)
    assert a.sensitivity[0].node == "conv2" and a.layers == 3
    assert any("conv2" in f for f in a.findings)
    out = tmp_path / "an.json"
    proc = subprocess.run([sys.executable, "-m", "edgeq.cli", "analyze", str(model_path), "--calib", str(tmp_path / "calib.npz"),
                           "--val", str(tmp_path / "val.npz"), "--target", "tflite", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text())
    assert saved["sensitivity"][0]["node"] == "conv2" and saved["support"]["target"] == "tflite-int8"
    assert saved["outliers"][0]["node"] == "conv2"
    bad = subprocess.run([sys.executable, "-m", "edgeq.cli", "analyze", str(model_path), "--target", "abacus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown target" in bad.stderr


def test_a_custom_op_onnxruntime_cannot_load_is_still_analysed(tmp_path):
    proto = make_conv_model()
    proto.graph.node.append(helper.make_node("MyOp", ["logits"], ["odd"], name="custom", domain="acme"))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("odd", TensorProto.FLOAT, ["N", 10]))
    proto.opset_import.append(helper.make_opsetid("acme", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(proto, path)
    a = analyze(edgeq.Model(proto, None), target="onnxruntime-cpu")
    status = {n.node: n.status for n in a.support.nodes}
    assert status["custom"] == "unsupported" and status["conv1"] == "int8"
    assert a.outliers and a.layers == 3

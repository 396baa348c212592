"""Accuracy repairs: equalization and SmoothQuant keep FP32 outputs; weight range, bias correction and method auto
do what they claim, measured on small models built here."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgeq
from edgeq.model import Model, make_session
from edgeq.quantize.method_choice import MARGIN_DB, output_sqnr
from edgeq.quantize.prepare import prepare
from edgeq.quantize.repair import clip_weights, equalize, smooth
from edgeq.quantize.repair import smoothquant as sq
from edgeq.quantize.repair.smoothquant import sample_rows
from edgeq.quantize.repair.weight_range import best_clip


def depthwise_model(seed: int = 0, imbalance: float = 30.0, outlier: float = 0.0) -> onnx.ModelProto:
    """Conv 3→8, ReLU, depthwise 3×3 (group 8), ReLU, MaxPool, pointwise 8→16, ReLU, GAP, Flatten, Gemm 16→10; the
    per-channel weight ranges differ by `imbalance`, each layer compensating the previous one's channel scales (as
    after BatchNorm folding in MobileNets); `outlier` sets one conv1 weight to that multiple of the largest."""
    rng = np.random.default_rng(seed)
    spread = np.geomspace(1 / np.sqrt(imbalance), np.sqrt(imbalance), 8)
    s1, s2 = rng.permutation(spread), rng.permutation(spread)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)) * s1[:, None, None, None]
    wd = rng.normal(0, 0.5, (8, 1, 3, 3)) * (s2 / s1)[:, None, None, None]
    wp = rng.normal(0, 0.3, (16, 8, 1, 1)) / s2[None, :, None, None]
    if outlier:
        w1[0, 0, 1, 1] = outlier * np.abs(w1).max()
    inits = {"w1": w1, "b1": rng.normal(0, 0.1, 8) * s1, "wd": wd, "bd": rng.normal(0, 0.1, 8) * s2,
             "wp": wp, "bp": rng.normal(0, 0.1, 16),
             "wf": rng.normal(0, 0.3, (10, 16)), "bf": rng.normal(0, 0.1, 10)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["cd"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["cd"], ["rd"], name="relud"),
        helper.make_node("MaxPool", ["rd"], ["pd"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pd", "wp", "bp"], ["cp"], name="pw"),
        helper.make_node("Relu", ["cp"], ["rp"], name="relup"),
        helper.make_node("GlobalAveragePool", ["rp"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(proto, x):
    session = make_session(proto)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _weight(proto, name):
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def test_equalization_keeps_fp32_outputs_and_balances_ranges():
    model = depthwise_model()
    x = np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    equalized = onnx.ModelProto()
    equalized.CopyFrom(model)
    assert equalize(equalized) == 2  # conv1→depthwise, depthwise→(ReLU, MaxPool)→pointwise
    np.testing.assert_allclose(_run(equalized, x), before, rtol=1e-4, atol=1e-5)

    def spread(proto, name):
        r = np.abs(_weight(proto, name)).reshape(8, -1).max(axis=1)
        return r.max() / r.min()

    assert spread(equalized, "wd") < spread(model, "wd") / 5
    assert spread(equalized, "w1") < spread(model, "w1") / 2


def test_equalization_improves_per_tensor_int8_on_an_imbalanced_depthwise_net(tmp_path):
    model = Model(depthwise_model(), None)
    rng = np.random.default_rng(2)
    calib = edgeq.Dataset.from_arrays({"x": rng.normal(size=(128, 3, 8, 8)).astype(np.float32)})
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    reference = _run(model.proto, x)
    scores = {}
    for equal in (False, True):
        q = edgeq.quantize(model, edgeq.Int8Static(method="minmax", per_channel=False, equalize=equal), calib=calib)
        scores[equal] = output_sqnr([[reference]], [[_run(q.proto, x)]])
        assert ("equalize_pairs" in q.summary.calibration.get("repairs", {})) == equal
    assert scores[True] > scores[False] + 3.0, scores


def _token_model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x [N, 5 tokens, 32] → nodes → y [N, 5, 8], opset 17, with `inits` as float32 initializers."""
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def matmul_model(seed: int = 0) -> onnx.ModelProto:
    """x → Add(bias with a few huge channels) → MatMul W1 → Relu → MatMul W2: transformer-like activation outliers."""
    rng = np.random.default_rng(seed)
    shift = np.zeros(32)
    shift[[3, 17]] = [40.0, -60.0]
    inits = {"shift": shift, "w1": rng.normal(0, 0.2, (32, 64)), "w2": rng.normal(0, 0.2, (64, 8))}
    nodes = [helper.make_node("Add", ["x", "shift"], ["h"], name="add"),
             helper.make_node("MatMul", ["h", "w1"], ["m1"], name="mm1"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    return _token_model(nodes, inits)


def test_smoothquant_keeps_fp32_outputs_and_helps_int8():
    model = matmul_model()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 5, 32)).astype(np.float32)
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    h = x + _weight(model, "shift")
    assert smooth(smoothed, {"h": np.abs(h).reshape(-1, 32).max(axis=0)}, alpha=0.5) == 1
    np.testing.assert_allclose(_run(smoothed, x), _run(model, x), rtol=1e-4, atol=1e-4)

    calib = edgeq.Dataset.from_arrays({"x": rng.normal(size=(128, 5, 32)).astype(np.float32)})
    reference = _run(model, x)
    scores = {}
    for alpha in (None, 0.5, "auto"):
        q = edgeq.quantize(Model(model, None), edgeq.Int8Static(method="minmax", smoothquant=alpha), calib=calib)
        scores[alpha] = output_sqnr([[reference]], [[_run(q.proto, x)]])
    assert scores[0.5] > scores[None] + 3.0, scores
    assert scores["auto"] >= scores[0.5] - 0.5, scores  # the per-layer search finds an alpha at least as good
    assert "h" in q.summary.calibration["repairs"]["smoothquant"]["alphas"]


@pytest.mark.parametrize("shift, per_channel", [(0.0, True), (0.0, False), (50.0, True)])
def test_smoothquant_auto_picks_the_grid_alpha_with_least_simulated_error(shift, per_channel):
    model = matmul_model()
    next(t for t in model.graph.initializer if t.name == "shift").CopyFrom(
        numpy_helper.from_array(np.full(32, shift, np.float32) * (np.arange(32) == 3), "shift"))
    rows = np.random.default_rng(4).normal(size=(512, 32)) + _weight(model, "shift")
    low, high = rows.min(axis=0), rows.max(axis=0)
    w = _weight(model, "w1").astype(np.float64)

    def brute_force_error(s):
        xq = sq._fake_quant_activation(rows / s, low / s, high / s, False)
        return float((((xq @ sq._fake_quant_weight(w * s[:, None], per_channel)) - rows @ w) ** 2).sum())

    absmax = np.maximum(np.abs(low), np.abs(high))
    errors = {a: brute_force_error(sq.smoothing_scales(absmax, np.abs(w).max(axis=1), a)) for a in sq.ALPHA_GRID}
    errors[None] = brute_force_error(np.ones(32))
    expected = min(errors, key=errors.get)
    chosen = sq.choose_alphas(model, {"h": rows}, {"h": (low, high)}, symmetric_activations=False, per_channel=per_channel)
    assert chosen.get("h") == expected, errors


def test_sample_rows_keeps_every_row_when_there_are_few_and_a_bounded_uniform_sample_otherwise():
    model = Model(matmul_model(), None)
    x = np.random.default_rng(5).normal(size=(40, 5, 32)).astype(np.float32)
    few = sample_rows(model, edgeq.Dataset.from_arrays({"x": x}), ["h"], rows=1000, batch_size=8)["h"]
    np.testing.assert_allclose(few, (x + _weight(model.proto, "shift")).reshape(-1, 32), rtol=1e-6)
    some = sample_rows(model, edgeq.Dataset.from_arrays({"x": x}), ["h"], rows=50, batch_size=8)["h"]
    assert some.shape == (50, 32)
    first_half = (x[:20] + _weight(model.proto, "shift")).reshape(-1, 32)
    from_first_half = sum(bool((np.abs(first_half - row).max(axis=1) < 1e-5).any()) for row in some)
    assert 10 <= from_first_half <= 40  # both halves of the stream are represented (expected 25)
    capped = sample_rows(model, edgeq.Dataset.from_arrays({"x": x}), ["h"], rows=1000, batch_size=8, max_samples=12)["h"]
    np.testing.assert_allclose(capped, (x[:12] + _weight(model.proto, "shift")).reshape(-1, 32), rtol=1e-6)


def test_best_clip_matches_brute_force_and_clip_weights_reduces_error():
    rng = np.random.default_rng(4)
    w = rng.laplace(0, 0.1, (6, 50))
    w[0, 0] = 3.0  # an outlier weight
    t = best_clip(w, axis=0)

    def err(row, bound):
        s = bound / 127
        return float(((np.clip(np.rint(row / s), -127, 127) * s - row) ** 2).sum())

    ratios = np.linspace(0.3, 1.0, 71)
    for c in range(6):
        a = np.abs(w[c]).max()
        assert err(w[c], t[c]) == pytest.approx(min(err(w[c], a * r) for r in ratios))
        assert err(w[c], t[c]) <= err(w[c], a)
    # in a graph: a heavy-tailed MatMul weight is clipped to the range that minimises its error (per tensor here)
    proto = matmul_model()
    original = rng.laplace(0, 0.1, (32, 64)).astype(np.float32)
    next(t for t in proto.graph.initializer if t.name == "w1").CopyFrom(numpy_helper.from_array(original, "w1"))
    assert clip_weights(proto, ("MatMul",), per_channel=False) == 1
    bound = float(np.abs(_weight(proto, "w1")).max())
    assert bound < np.abs(original).max()
    assert err(original.ravel(), bound) < err(original.ravel(), float(np.abs(original).max()))


def test_bias_correction_reduces_the_mean_output_error():
    model = Model(depthwise_model(imbalance=1.0, outlier=20.0), None)
    rng = np.random.default_rng(5)
    calib = edgeq.Dataset.from_arrays({"x": rng.normal(size=(256, 3, 8, 8)).astype(np.float32)})
    x = rng.normal(size=(128, 3, 8, 8)).astype(np.float32)
    reference = _run(model.proto, x)

    def quantized(**repairs):
        q = edgeq.quantize(model, edgeq.Int8Static(method="minmax", per_channel=False, **repairs), calib=calib)
        return _run(q.proto, x)

    plain = quantized()
    corrected = quantized(bias_correction=True)
    # bias correction removes the systematic part of the error: the mean error per logit shrinks
    assert np.abs((corrected - reference).mean(axis=0)).mean() < 0.5 * np.abs((plain - reference).mean(axis=0)).mean()


def linear_model(seed: int = 0) -> onnx.ModelProto:
    """x → MatMul W1 → Add b1 → Relu → MatMul W2 → Add b2: transformer linear layers, bias as a separate Add; W1
    has one outlier weight so that a per-tensor weight scale rounds most of it coarsely."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (32, 64))
    w1[0, 0] = 12.0
    inits = {"w1": w1, "b1": rng.normal(0, 0.1, 64), "w2": rng.normal(0, 0.2, (64, 8)), "b2": rng.normal(0, 0.1, 8)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    return _token_model(nodes, inits)


def test_bias_correction_shifts_the_float_bias_after_a_matmul():
    model = Model(linear_model(), None)
    rng = np.random.default_rng(6)
    calib = edgeq.Dataset.from_arrays({"x": (rng.normal(size=(256, 5, 32)) + 0.5).astype(np.float32)})
    x = (rng.normal(size=(128, 5, 32)) + 0.5).astype(np.float32)
    reference = _run(model.proto, x)

    def quantized(**repairs):
        q = edgeq.quantize(model, edgeq.Int8Static(method="minmax", per_channel=False, **repairs), calib=calib)
        return q, _run(q.proto, x)

    _, plain = quantized()
    q, corrected = quantized(bias_correction=True)
    assert q.summary.calibration["repairs"]["bias_correction"] == 2  # both MatMul+Add layers
    mean_error = lambda got: np.abs((got - reference).reshape(-1, 8).mean(axis=0)).mean()  # noqa: E731
    assert mean_error(corrected) < 0.5 * mean_error(plain)


def test_method_auto_keeps_the_best_observer_and_reports_it(conv_model_path, conv_data):
    q = edgeq.quantize(conv_model_path, edgeq.Int8Static(method="auto"), calib=edgeq.Dataset.from_npz(conv_data))
    cal = q.summary.calibration
    assert cal["requested"] == "auto" and set(cal["output_sqnr_db"]) == {"minmax", "percentile", "entropy", "mse"}
    scores = cal["output_sqnr_db"]
    assert cal["chosen"] == "mse" or scores[cal["chosen"]] >= scores["mse"] + MARGIN_DB
    assert scores[cal["chosen"]] == max(s for m, s in scores.items() if m == "mse" or s >= scores["mse"] + MARGIN_DB)
    assert cal["method"] == cal["chosen"] and cal["holdout_samples"] == 32  # every 5th batch of 16
    assert any("auto chose" in n for n in q.summary.notes)
    assert cal["samples"] == 200  # the held-back batches calibrate too, once the method is chosen


def test_method_auto_is_the_default_and_ships_the_chosen_methods_ranges(conv_model_path, conv_data):
    """The default recipe chooses its method, then calibrates on all the data: the model equals the one the
    chosen method alone gives (same bytes)."""
    calib = edgeq.Dataset.from_npz(conv_data)
    auto = edgeq.quantize(conv_model_path, edgeq.Int8Static(), calib=calib)
    chosen = auto.summary.calibration["chosen"]
    alone = edgeq.quantize(conv_model_path, edgeq.Int8Static(method=chosen), calib=calib)
    assert auto.proto.SerializeToString() == alone.proto.SerializeToString()


def test_method_auto_keeps_mse_unless_another_leads_clearly():
    from edgeq.quantize.method_choice import pick

    assert pick({"minmax": 27.2, "percentile": 27.59, "entropy": 27.13, "mse": 27.52}) == "mse"  # YOLOv8n: noise
    assert pick({"minmax": 7.14, "percentile": 9.97, "entropy": 6.91, "mse": 7.49}) == "percentile"  # PP-PicoDet
    assert pick({"minmax": 12.0, "percentile": 12.0, "entropy": 1.0, "mse": 9.0}) == "minmax"  # a tie: the earlier


def test_method_auto_with_few_samples_scores_on_all_of_them(conv_model_path, conv_data):
    """Fewer than HOLDOUT_MIN samples would be held back: none are, the ranges see every sample and the scores are
    measured on the calibration samples (one held-back page chose badly on PP-OCR det)."""
    calib = edgeq.Dataset.from_arrays({"x": np.load(conv_data)["x"][:40]})
    q = edgeq.quantize(conv_model_path, edgeq.Int8Static(method="auto", batch_size=4), calib=calib)
    cal = q.summary.calibration
    assert cal["holdout_samples"] is None and cal["samples"] == 40
    assert any("too small to hold some back" in n for n in q.summary.notes)


def test_repairs_need_valid_values(conv_model_path, conv_data):
    from edgeq.errors import ConfigError

    data = edgeq.Dataset.from_npz(conv_data)
    with pytest.raises(ConfigError):
        edgeq.quantize(conv_model_path, edgeq.Int8Static(weight_range="magic"), calib=data)
    with pytest.raises(ConfigError):
        edgeq.quantize(conv_model_path, edgeq.Int8Static(smoothquant=1.5), calib=data)
    with pytest.raises(ConfigError):
        edgeq.quantize(conv_model_path, edgeq.Int8Static(method="magic"), calib=data)

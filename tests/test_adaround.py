"""AdaRound (edgeq.quantize.repair.adaround): the relaxation and regulariser on a tiny layer, the rounding written
into the QDQ graph, and the output error it recovers at W4A8 on a small conv net (fixed seeds, tolerances)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

import edgeq
from edgeq.errors import ConfigError
from edgeq.model import Model, make_session
from edgeq.quantize.repair.adaround import (AdaRoundSettings, Moments, find_layers, initial_v, learn_rounding,
                                            rectified_sigmoid)
from tests.conftest import make_conv_model


def test_rectified_sigmoid_is_bounded_and_initial_v_inverts_it():
    v = np.linspace(-10, 10, 101)
    h = rectified_sigmoid(v)
    assert h.min() == 0.0 and h.max() == 1.0
    fractions = np.array([0.05, 0.3, 0.5, 0.9])
    np.testing.assert_allclose(rectified_sigmoid(initial_v(fractions)), fractions, atol=1e-5)


def test_learned_rounding_ends_binary_and_beats_nearest_on_a_tiny_layer():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 512, 16)) * np.linspace(0.2, 3, 16)  # channels of different scales: nearest is not optimal
    w = rng.normal(size=(1, 8, 16)).astype(np.float32)
    scale = np.abs(w).max() / 7
    moments = Moments(width=16)
    moments.add(x, np.matmul(x, w.transpose(0, 2, 1)))
    codes, h = learn_rounding(w, scale, -8, 7, moments, AdaRoundSettings(iterations=1500, regularisation=1.0))
    # with a regulariser weight that matters at this output scale, the soft rounding ends at 0 or 1
    assert np.mean((h < 0.01) | (h > 0.99)) > 0.98
    assert np.all(np.abs(codes - w / scale) < 1 + 1e-6)  # floor or ceil, never further
    nearest = moments.error(scale * np.clip(np.rint(w / scale), -8, 7))
    assert moments.error(scale * codes) < nearest


def test_moments_rows_and_gram_forms_agree():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(2, 40, 6)), rng.normal(size=(2, 3, 6))
    raw, folded = Moments(width=100), Moments(width=6)
    for part in np.split(x, 4, axis=1):
        raw.add(part, np.matmul(part, w.transpose(0, 2, 1)))
        folded.add(part, np.matmul(part, w.transpose(0, 2, 1)))
    assert raw.gram is None and folded.gram is not None
    other = w + rng.normal(size=w.shape) * 0.1
    assert raw.error(other) == pytest.approx(folded.error(other), rel=1e-6)


def _net_and_data(seed: int = 0):
    model = make_conv_model(seed=seed)
    shape = tuple(d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim)[1:]
    rng = np.random.default_rng(seed)
    return model, rng.normal(size=(256,) + shape).astype(np.float32), rng.normal(size=(128,) + shape).astype(np.float32)


@pytest.mark.parametrize("per_channel", [False, True])
def test_w4a8_adaround_recovers_output_error_and_writes_its_rounding(per_channel):
    model, calib, held = _net_and_data()
    data = edgeq.Dataset.from_arrays({"x": calib})
    reference = make_session(model).run(None, {"x": held})[0]
    errors = {}
    for rounding in ("nearest", "adaround"):
        q = edgeq.quantize(Model(model, None), edgeq.Int8Static(weight_bits=4, per_channel=per_channel, method="minmax",
                                                                rounding=rounding), calib=data)
        errors[rounding] = float(np.mean((make_session(q.proto).run(None, {"x": held})[0] - reference) ** 2))
        if rounding == "adaround":
            report = q.summary.calibration["repairs"]["adaround"]
            assert report["layers"] >= 2 and any(n.startswith("AdaRound learned") for n in q.summary.notes)
            inits = {t.name: numpy_helper.to_array(t).astype(np.int64) for t in q.proto.graph.initializer}
            changed = 0
            for layer in find_layers(model, q.proto)[0]:  # the graph's codes are floor or ceil of W / scale
                grid = layer.canonical(layer.weight) / layer.grid()
                stored = layer.canonical(inits[layer.codes.name])
                assert np.all((stored == np.floor(grid)) | (stored == np.ceil(grid)) | (stored == np.clip(stored, -8, 7)) & (np.abs(grid) > 7))
                changed += int(np.sum(stored != np.clip(np.rint(grid), -8, 7)))
            assert changed > 0
    assert errors["adaround"] < 0.6 * errors["nearest"]  # measured: 0.55 (per tensor) and 0.20 (per channel) of nearest


def test_unknown_rounding_is_a_config_error():
    model, calib, _ = _net_and_data()
    with pytest.raises(ConfigError, match="rounding"):
        edgeq.quantize(Model(model, None), edgeq.Int8Static(rounding="up"), calib=edgeq.Dataset.from_arrays({"x": calib}))

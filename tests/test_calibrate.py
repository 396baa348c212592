"""Streaming observers against brute-force references, and calibration through a real ONNX Runtime session."""
import numpy as np
import pytest

import edgeq
from edgeq.calibrate import calibrate
from edgeq.calibrate.observers import HistogramObserver, MinMaxObserver
from edgeq.errors import ConfigError, DataError


def test_minmax_equals_numpy_over_chunks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10_000).astype(np.float32)
    obs = MinMaxObserver()
    for chunk in np.array_split(x, 7):
        obs.update(chunk)
    assert obs.range() == (float(x.min()), float(x.max()))


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_one_bin(percentile):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 50_000), rng.normal(0, 30, 20)]).astype(np.float32)  # heavy tail
    obs = HistogramObserver()
    obs.update(x)
    low, high = obs.percentile_range(percentile)
    width = 2 * obs.half_width / obs.bins
    assert abs(high - np.percentile(x, percentile)) <= 2 * width
    assert abs(low - np.percentile(x, 100 - percentile)) <= 2 * width
    assert x.min() <= low < high <= x.max()


def test_one_sided_data_keeps_zero_low_end():
    obs = HistogramObserver()
    obs.update(np.abs(np.random.default_rng(2).normal(size=5000)).astype(np.float32))
    assert obs.percentile_range(99.9)[0] >= 0.0


def test_streaming_in_any_order_equals_one_shot():
    """The grid depends only on the largest |x|, so counts are identical whatever the chunking and order."""
    rng = np.random.default_rng(3)
    chunks = [rng.normal(0, s, 1000).astype(np.float32) for s in (0.01, 5.0, 0.3, 40.0, 1.0)]
    one_shot = HistogramObserver()
    one_shot.update(np.concatenate(chunks))
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        streamed = HistogramObserver()
        for i in order:
            streamed.update(chunks[i])
        assert streamed.half_width == one_shot.half_width
        np.testing.assert_array_equal(streamed.counts, one_shot.counts)
        assert streamed.percentile_range(99.9) == one_shot.percentile_range(99.9)


def test_calibration_ranges_independent_of_batch_size(conv_model_path, conv_data):
    model = edgeq.load(conv_model_path)
    data = edgeq.Dataset.from_npz(conv_data)
    results = [calibrate(model, data, method=m, batch_size=b).ranges for m in ("minmax", "percentile") for b in (1, 7, 64)]
    for group in (results[:3], results[3:]):
        for other in group[1:]:
            assert other.keys() == group[0].keys()
            for name in other:
                np.testing.assert_allclose(other[name], group[0][name], rtol=1e-5, atol=1e-6)


def test_calibration_sees_every_sample_and_bounds_percentile(conv_model_path, conv_data):
    model = edgeq.load(conv_model_path)
    data = edgeq.Dataset.from_npz(conv_data)
    minmax = calibrate(model, data, method="minmax")
    pct = calibrate(model, data, method="percentile", percentile=99.0)
    assert minmax.samples == pct.samples == 200
    x = np.load(conv_data)["x"]
    assert minmax.ranges["x"] == (float(x.min()), float(x.max()))
    for name, (lo, hi) in pct.ranges.items():
        assert minmax.ranges[name][0] - 1e-6 <= lo <= hi <= minmax.ranges[name][1] + 1e-6


def test_few_samples_warn_with_the_number(conv_model_path):
    model = edgeq.load(conv_model_path)
    data = edgeq.Dataset.from_arrays({"x": np.ones((5, 1, 8, 8), np.float32)})
    assert any("only 5 calibration samples" in w for w in calibrate(model, data).warnings)


def test_bad_method_and_nan_are_user_errors(conv_model_path):
    model = edgeq.load(conv_model_path)
    x = np.ones((4, 1, 8, 8), np.float32)
    with pytest.raises(ConfigError):
        calibrate(model, edgeq.Dataset.from_arrays({"x": x}), method="magic")
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        calibrate(model, edgeq.Dataset.from_arrays({"x": x}))


def _true_mse(x: np.ndarray, low: float, high: float, symmetric: bool) -> float:
    from edgeq.quantize.qparams import QType, dequantize, qparams, quantize

    qtype = QType.of("int8" if symmetric else "uint8", symmetric=symmetric)
    scale, zero = qparams(low, high, qtype, symmetric)
    return float(np.mean((dequantize(quantize(x, scale, zero, qtype), scale, zero) - x) ** 2))


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_is_near_the_brute_force_optimum(symmetric):
    """The histogram estimate picks a range whose real quantization error is within 10% of the best candidate's,
    and far below min/max's on heavy-tailed data."""
    rng = np.random.default_rng(4)
    # Big tensors with a couple of far outliers: the regime of real activations, where clipping pays.
    x = np.concatenate([rng.laplace(0, 1, 1_000_000), [60.0, -55.0 if symmetric else -20.0]]).astype(np.float32)
    obs = HistogramObserver()
    obs.update(x)
    low, high = obs.mse_range(symmetric=symmetric)
    chosen = _true_mse(x, low, high, symmetric)
    fractions = np.linspace(1 / 48, 1, 48)
    if symmetric:
        a = float(np.abs(x).max())
        brute = min(_true_mse(x, -a * f, a * f, symmetric) for f in fractions)
    else:
        brute = min(_true_mse(x, float(x.min()) * f, float(x.max()) * g, symmetric) for f in fractions[::8] for g in fractions[::2])
    assert chosen <= 1.1 * brute
    assert chosen < 0.5 * _true_mse(x, float(x.min()), float(x.max()), symmetric)
    assert x.min() <= low <= 0 <= high <= x.max()

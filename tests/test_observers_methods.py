"""Entropy, per-channel and streaming observers against brute-force references on small arrays; constant memory."""
import tracemalloc

import numpy as np
import pytest
from scipy.stats import entropy as scipy_kl

import edgeq
from edgeq.calibrate import METHODS, calibrate, observe
from edgeq.calibrate.observers import (ChannelHistogramObserver, ChannelMinMaxObserver, HistogramObserver, _kl_threshold,
                                       range_of)
from edgeq.errors import DataError


def _smooth(p, eps=1e-4):
    zeros = p == 0
    n_zero, n_nonzero = zeros.sum(), p.size - zeros.sum()
    return p.astype(np.float64) + eps * zeros - (eps * n_zero / n_nonzero) * ~zeros


def reference_kl(hist: np.ndarray, levels: int, t: int) -> float:
    """MXNet/TensorRT's KL(P_T || Q_T) for one candidate T, written out as they loop over bins."""
    sliced = hist[:t].astype(np.float64)
    p = sliced.copy()
    p[-1] += hist[t:].sum()
    nonzero = p != 0
    merged = t // levels
    q = np.zeros(t)
    for j in range(levels):
        lo, hi = j * merged, (t if j == levels - 1 else (j + 1) * merged)
        n = nonzero[lo:hi].sum()
        if n:
            q[lo:hi] = np.where(nonzero[lo:hi], sliced[lo:hi].sum() / n, 0.0)
    return float(scipy_kl(_smooth(p), _smooth(q)))


def brute_force_kl_threshold(hist: np.ndarray, levels: int) -> int:
    """Every candidate, one at a time (the reference the coarse-to-fine search must reproduce)."""
    used = int(np.flatnonzero(hist)[-1]) + 1
    if used <= levels:
        return used
    kls = {t: reference_kl(hist, levels, t) for t in range(levels, used + 1)}
    return min(kls, key=kls.get)


@pytest.mark.parametrize("case", ["laplace", "relu", "far_from_zero", "sparse"])
def test_prefix_sum_kl_equals_the_reference_for_every_candidate(case):
    """The O(levels) score of each candidate equals the bin-by-bin reference, including the smoothing of empty bins
    (many of them in the sparse and far-from-zero cases, whose first groups of Q are empty)."""
    from edgeq.calibrate.observers import _KLTables

    rng = np.random.default_rng(3)
    x = {"laplace": rng.laplace(0, 1, 20_000), "relu": np.maximum(rng.normal(0, 1, 20_000), 0),
         "far_from_zero": rng.uniform(3, 9, 5_000), "sparse": rng.exponential(1, 300)}[case].astype(np.float32)
    obs = HistogramObserver(bins=1024)
    obs.update(x)
    folded = (obs.counts[512:] + obs.counts[:512][::-1]).astype(np.float64)
    levels = 128
    used = int(np.flatnonzero(folded)[-1]) + 1
    candidates = np.arange(levels, used + 1)
    expected = np.array([reference_kl(folded, levels, t) for t in candidates])
    np.testing.assert_allclose(_KLTables(folded[:used], levels).scores(candidates), expected, rtol=1e-9,
                               atol=1e-12 * expected.max())


@pytest.mark.parametrize("case", ["laplace", "relu", "outlier"])
def test_entropy_threshold_equals_brute_force(case):
    rng = np.random.default_rng(0)
    x = {"laplace": rng.laplace(0, 1, 20_000), "relu": np.maximum(rng.normal(0, 1, 20_000), 0),
         "outlier": np.concatenate([rng.normal(0, 1, 20_000), [25.0]])}[case].astype(np.float32)
    obs = HistogramObserver(bins=1024)
    obs.update(x)
    half = obs.bins // 2
    folded = (obs.counts[half:] + obs.counts[:half][::-1]).astype(np.float64)
    folded[0] = folded[1]
    levels = 256 if x.min() >= 0 else 128
    assert _kl_threshold(folded, levels) == brute_force_kl_threshold(folded, levels)
    low, high = obs.entropy_range()
    t = brute_force_kl_threshold(folded, levels) * obs.half_width / half
    assert high == pytest.approx(min(t, float(x.max())))
    assert low == pytest.approx(max(-t, float(x.min())))


def test_entropy_differs_from_minmax_on_heavy_tails():
    """ONNX Runtime's default Entropy (128 bins = 128 levels) returns min/max; the TensorRT search clips outliers."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 200_000), [30.0, -28.0]]).astype(np.float32)
    obs = HistogramObserver()
    obs.update(x)
    low, high = obs.entropy_range()
    assert -28.0 < low < -2.0 and 2.0 < high < 30.0


@pytest.mark.parametrize("method", METHODS)
def test_streaming_equals_one_shot_for_every_method(method):
    rng = np.random.default_rng(2)
    chunks = [rng.normal(0, s, 3000).astype(np.float32) for s in (0.2, 3.0, 1.0, 12.0)]
    one_shot = HistogramObserver()
    one_shot.update(np.concatenate(chunks))
    streamed = HistogramObserver()
    for chunk in reversed(chunks):
        streamed.update(chunk)
    for symmetric in (False, True):
        assert range_of(streamed, method, symmetric=symmetric) == range_of(one_shot, method, symmetric=symmetric)


def test_per_channel_observers_equal_per_tensor_observers_on_each_channel():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (64, 4, 5, 5)).astype(np.float32) * np.array([0.1, 1.0, 10.0, 100.0], np.float32)[None, :, None, None]
    x[:, 0] = np.abs(x[:, 0])  # one one-sided channel
    mm, hist = ChannelMinMaxObserver(axis=1), ChannelHistogramObserver(axis=1)
    for chunk in np.array_split(x, 5):
        mm.update(chunk)
        hist.update(chunk)
    low, high = mm.range()
    np.testing.assert_array_equal(low, x.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(high, x.max(axis=(0, 2, 3)))
    for method in METHODS:
        lows, highs = hist.ranges(method)
        for c in range(4):
            single = HistogramObserver()
            single.update(x[:, c])
            assert (lows[c], highs[c]) == pytest.approx(range_of(single, method))


def test_per_channel_calibration_along_last_axis(conv_model_path, conv_data):
    model = edgeq.load(conv_model_path)
    cal = calibrate(model, edgeq.Dataset.from_npz(conv_data), ["logits"], method="minmax", channel_axis=-1)
    low, high = cal.ranges["logits"]
    logits = model.session().run(["logits"], {"x": np.load(conv_data)["x"]})[0]
    np.testing.assert_allclose(low, logits.min(axis=0), rtol=1e-5)
    np.testing.assert_allclose(high, logits.max(axis=0), rtol=1e-5)


def test_holdout_batches_never_reach_the_observers(conv_model_path, conv_data):
    model = edgeq.load(conv_model_path)
    data = edgeq.Dataset.from_npz(conv_data)
    seen = observe(model, data, ["x"], histogram=False, batch_size=10, holdout=True)
    assert seen.samples == 160 and sum(b.size for b in seen.holdout) == 40
    x = np.load(conv_data)["x"]
    kept = np.concatenate([x[i * 10:(i + 1) * 10] for i in range(20) if i % 5 != 4])
    assert seen.observers["x"].range() == (float(kept.min()), float(kept.max()))
    seen.include_holdout()
    assert seen.samples == 200 and not seen.holdout
    assert seen.observers["x"].range() == (float(x.min()), float(x.max()))


def test_too_few_held_back_samples_are_not_held_back(conv_model_path, conv_data):
    """Holding back fewer than HOLDOUT_MIN samples would judge by too few and calibrate on less: none are."""
    from edgeq.calibrate import HOLDOUT_MIN

    model, data = edgeq.load(conv_model_path), edgeq.Dataset.from_npz(conv_data)
    samples = 5 * 2 * (HOLDOUT_MIN // 2 - 1)  # batches of 2, every 5th held back: 2 short of HOLDOUT_MIN
    seen = observe(model, data, ["x"], histogram=False, batch_size=2, max_samples=samples, holdout=True)
    assert not seen.holdout and seen.samples == samples


def test_binning_in_chunks_equals_binning_at_once(monkeypatch):
    """Updates bin CHUNK values at a time; chunk edges change nothing, tiny negatives (which underflow to -0.0 and
    still belong below zero) included."""
    from edgeq.calibrate import observers

    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(0, 1, 5000), [-1e-30, 1e-30, -0.0, 300.0]]).astype(np.float32)
    rng.shuffle(x)
    whole = HistogramObserver()
    whole.update(x)
    monkeypatch.setattr(observers, "CHUNK", 64)
    chunked = HistogramObserver()
    chunked.update(x)
    np.testing.assert_array_equal(chunked.counts, whole.counts)
    assert chunked.counts[whole.bins // 2 - 1] >= 1  # -1e-30 sits just below zero


def test_parallel_workers_observe_exactly_what_one_does(conv_model_path, conv_data, monkeypatch):
    """Batches are observed by several threads in whatever order they finish: every histogram, range, sample count
    and held-back batch is the same as with one thread."""
    import edgeq.calibrate.stream as calibration

    model, data = edgeq.load(conv_model_path), edgeq.Dataset.from_npz(conv_data)
    seen = {}
    for workers in (1, 2, 3):
        monkeypatch.setattr(calibration, "WORKERS", workers)
        seen[workers] = observe(model, data, batch_size=7, holdout=True)
    for workers in (2, 3):
        assert seen[workers].samples == seen[1].samples == 200 - 35
        assert [b.inputs["x"].tobytes() for b in seen[workers].holdout] == [b.inputs["x"].tobytes() for b in seen[1].holdout]
        assert seen[workers].observers.keys() == seen[1].observers.keys()
        for name, obs in seen[1].observers.items():
            np.testing.assert_array_equal(seen[workers].observers[name].counts, obs.counts)
            assert seen[workers].observers[name].minmax == obs.minmax


def test_an_error_in_any_worker_reaches_the_caller(conv_model_path):
    """Bad data in a late batch, read by whichever worker pulls it: a DataError for the caller, no hang."""
    def source():
        for i in range(12):
            x = np.ones((4, 1, 8, 8), np.float32)
            if i == 9:
                x[0, 0, 0, 0] = np.nan
            yield {"x": x}

    with pytest.raises(DataError, match="NaN"):
        calibrate(edgeq.load(conv_model_path), edgeq.Dataset(source, length=48), method="entropy", batch_size=4)


def _streamed(n: int) -> edgeq.Dataset:
    def source():
        rng = np.random.default_rng(0)
        for _ in range(n // 20):
            yield {"x": rng.normal(0, 1, (20, 1, 8, 8)).astype(np.float32)}

    return edgeq.Dataset(source, length=n)


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_calibration_memory_is_constant_in_the_number_of_samples(conv_model_path, method):
    """Python-side peak allocation (numpy reports to tracemalloc) while streaming 100 vs 2000 samples. Keeping the
    activations of 2000 samples would take ~25 MB here; the slack of 64 KB covers ONNX Runtime's small caches."""
    model = edgeq.load(conv_model_path)
    calibrate(model, _streamed(100), method=method, batch_size=20)  # warm-up: imports and first-call caches
    peaks = []
    for n in (100, 2000):
        tracemalloc.start()
        calibrate(model, _streamed(n), method=method, batch_size=20)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] <= 1.10 * peaks[0] + 64 * 1024, peaks


def _attention_like_model() -> "onnx.ModelProto":
    """x → MatMul → Reshape → Transpose → MatMul (a quantized chain: the reshapes share the MatMul output's scale),
    x → Mul → Reshape → Transpose → MatMul (Mul is not quantized: the Transpose output needs its own range) and
    x → Add → Relu → Reshape → MatMul (a Relu after an unquantized op quantizes nothing: the Reshape output needs
    its own range)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name) for name, shape in
               (("w1", (16, 16)), ("w2", (4, 4)), ("w3", (4, 4)), ("w4", (4, 4)), ("half", (1,)))]
    shape = numpy_helper.from_array(np.array([0, 4, 4], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Reshape", ["h", "shape"], ["h_r"], name="r1"),
             helper.make_node("Transpose", ["h_r"], ["h_t"], perm=[0, 2, 1], name="t1"),
             helper.make_node("MatMul", ["h_t", "w2"], ["a"], name="mm2"),
             helper.make_node("Mul", ["x", "half"], ["m"], name="mul"),
             helper.make_node("Reshape", ["m", "shape"], ["m_r"], name="r2"),
             helper.make_node("Transpose", ["m_r"], ["m_t"], perm=[0, 2, 1], name="t2"),
             helper.make_node("MatMul", ["m_t", "w3"], ["b"], name="mm3"),
             helper.make_node("Add", ["x", "half"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["s_r"], name="relu"),
             helper.make_node("Reshape", ["s_r", "shape"], ["s_v"], name="r3"),
             helper.make_node("MatMul", ["s_v", "w4"], ["c"], name="mm4")]
    graph = helper.make_graph(nodes, "attention_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4, 4]) for n in ("a", "b", "c")],
                              weights + [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_reshapes_of_a_quantized_tensor_need_no_range_and_the_model_is_the_same(tmp_path, monkeypatch):
    """Replaying ONNX Runtime's pass: a Reshape/Transpose after a quantized MatMul shares its scale (not observed),
    one after an unquantized Mul is quantized by its consumer (observed); the QDQ model is byte-identical to one
    calibrated on every tensor."""
    import importlib

    import onnx

    from edgeq.quantize.qdq import quantized_tensors

    passes = importlib.import_module("edgeq.quantize.passes")
    model = _attention_like_model()
    path = tmp_path / "attention_like.onnx"
    onnx.save(model, path)
    config = edgeq.Int8Static(method="entropy")
    needed = quantized_tensors(onnx.shape_inference.infer_shapes(model), config.op_types)  # typed, as prepared
    assert {"h_r", "h_t", "m", "m_r"}.isdisjoint(needed) and {"x", "h", "m_t", "a", "b", "s_r", "s_v"} <= set(needed)
    data = edgeq.Dataset.from_arrays({"x": np.random.default_rng(1).normal(0, 1, (64, 16)).astype(np.float32)})
    fewer = edgeq.quantize(path, config, calib=data)
    monkeypatch.setattr(passes, "quantized_tensors", lambda proto, ops, exclude=(): None)
    everything = edgeq.quantize(path, config, calib=data)
    assert fewer.proto.SerializeToString() == everything.proto.SerializeToString()


def test_calibrating_only_the_needed_tensors_gives_the_same_model(conv_model_path, conv_data, monkeypatch):
    """Static INT8 observes only the tensors the quantizer reads ranges of (no pre-ReLU outputs, no outputs that take
    their input's scale): the QDQ model is byte-identical to one calibrated on every tensor."""
    import importlib

    passes = importlib.import_module("edgeq.quantize.passes")
    data = edgeq.Dataset.from_npz(conv_data)
    for method in ("minmax", "entropy"):
        needed = edgeq.quantize(conv_model_path, edgeq.Int8Static(method=method), calib=data)
        with monkeypatch.context() as patch:
            patch.setattr(passes, "quantized_tensors", lambda proto, ops, exclude=(): None)
            everything = edgeq.quantize(conv_model_path, edgeq.Int8Static(method=method), calib=data)
        assert needed.proto.SerializeToString() == everything.proto.SerializeToString()

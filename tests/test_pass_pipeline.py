"""The static INT8 pass pipeline: how often each recipe reads the calibration data, and that one shared pass gives
every collector exactly what a pass of its own gave (byte-identical quantized models: tools/golden_static.py)."""
import numpy as np
import pytest

import edgeq
from edgeq.calibrate import collect, observe
from edgeq.calibrate.collectors import ChannelMeans, KeptBatches, Reservoir
from edgeq.data import Dataset
from edgeq.model import Model
from edgeq.quantize.passes import static_passes
from edgeq.quantize.pipeline import StaticState, run_passes
from edgeq.quantize.qdq import prepare_static
from tests.conftest import make_conv_model
from tests.test_repair import matmul_model


class CountingDataset(Dataset):
    """A Dataset that counts how often it is read from the start."""

    reads: int = 0

    def chunks(self):
        self.reads += 1
        yield from super().chunks()


def _counting(x: np.ndarray) -> CountingDataset:
    return CountingDataset(lambda: [edgeq.data.Batch({"x": x[i:i + 20]}) for i in range(0, len(x), 20)], length=len(x))


CONV_X = np.random.default_rng(1).normal(size=(200, 1, 8, 8)).astype(np.float32)
TOKENS_X = np.random.default_rng(3).normal(size=(128, 5, 32)).astype(np.float32)


@pytest.mark.parametrize("options, reads", [
    ({}, 1),
    ({"method": "mse"}, 1),
    ({"equalize": True, "weight_range": "mse"}, 1),
    ({"rounding": "adaround", "bias_correction": True, "method": "auto"}, 1),
], ids=["default", "method-mse", "data-free-repairs", "adaround-bias-auto"])
def test_float_statistics_of_a_recipe_take_one_read(options, reads):
    data = _counting(CONV_X)
    q = edgeq.quantize(Model(make_conv_model(), None), edgeq.Int8Static(**options), calib=data)
    assert data.reads == reads
    assert q.summary.calibration["samples"] == 200  # --method auto (the default) bins the held-back batches after choosing


@pytest.mark.parametrize("alpha, labels", [(0.5, ["smoothquant", "calibrate"]), ("auto", ["smoothquant", "calibrate+bias_correction"])])
def test_smoothquant_measures_the_graph_it_smooths_then_the_smoothed_graph(alpha, labels):
    """SmoothQuant's maxima and sampled rows share one read (they were two for auto); the ranges are of the
    smoothed graph, a new state and so a second read; bias correction's FP32 means join the ranges' read."""
    data = _counting(TOKENS_X)
    config = edgeq.Int8Static(smoothquant=alpha, bias_correction=alpha == "auto")
    prepared, notes = prepare_static(Model(matmul_model(), None), config)
    state = run_passes(static_passes(config), StaticState(prepared, config, data, True, notes))
    assert data.reads == 2 and state.reads == labels
    assert state.repairs["smoothquant"]["activations"] >= 1


def test_one_pass_feeds_every_collector_what_its_own_pass_did():
    """Collectors with different sample limits and needs share one pass: each sees exactly the samples, in the
    order, that a pass of its own saw (a batch straddling a limit is cut for that collector)."""
    from edgeq.quantize.repair.smoothquant import sample_rows

    model = Model(matmul_model(), None)
    data = Dataset.from_arrays({"x": TOKENS_X})
    rows, means, kept = Reservoir(["h"], rows=100, max_samples=70), ChannelMeans([("m1", -1)], max_samples=40), KeptBatches(max_samples=50)
    collect(model, data, [rows, means, kept], batch_size=16)
    np.testing.assert_array_equal(rows.kept["h"], sample_rows(model, data, ["h"], rows=100, max_samples=70)["h"])
    assert [b.size for b in kept.batches] == [16, 16, 16, 2]
    alone = ChannelMeans([("m1", -1)], max_samples=40)
    collect(model, data, [alone], batch_size=16)
    np.testing.assert_array_equal(means.means()["m1"], alone.means()["m1"])
    assert means.means()["m1"].shape == (64,)
    seen = observe(model, data, ["h"], batch_size=16)
    assert seen.samples == 128


def test_smoothquant_auto_on_a_model_without_smoothable_layers_says_so():
    """No MatMul/Gemm with a constant weight: nothing to smooth (this raised KeyError 'alphas' in the notes)."""
    from tests.test_subgraphs import _if_calib, if_inputs, if_model

    x = np.concatenate([if_inputs(True, 32, 1), if_inputs(False, 32, 2)])
    q = edgeq.quantize(Model(if_model(), None), edgeq.Int8Static(method="minmax", smoothquant="auto"), calib=_if_calib(x))
    assert q.summary.calibration["repairs"]["smoothquant"] == {"alpha": "auto", "alphas": {}, "activations": 0}


def test_method_auto_without_a_holdout_ships_the_model_it_scored(monkeypatch):
    """Too few samples to hold back: the chosen method's ranges are the ones it was scored with, so its scored QDQ
    model ships (one build per method, none again), byte-identical to a fresh build from the final ranges."""
    from edgeq.calibrate import HOLDOUT_MIN, METHODS
    from edgeq.quantize import passes
    from edgeq.quantize.qdq import build_qdq

    built = []
    monkeypatch.setattr(passes, "build_qdq", lambda *a, **k: built.append(a[2]) or build_qdq(*a, **k))
    config = edgeq.Int8Static(method="auto")
    data = _counting(CONV_X[:HOLDOUT_MIN])   # too few samples to hold any back
    prepared, notes = prepare_static(Model(make_conv_model(), None), config)
    state = run_passes(static_passes(config), StaticState(prepared, config, data, True, notes))
    assert state.held_samples == 0 and len(built) == len(METHODS) and data.reads == 1
    fresh = build_qdq(state.prepared, config, state.calibration.ranges)
    assert state.result.proto.SerializeToString() == fresh.proto.SerializeToString()
    assert state.scored is None   # not kept past the build

"""The passes of static INT8, in the order `static_passes` runs them (`quantize/pipeline.py` runs them): the float
repairs (equalization, SmoothQuant, weight range setting), the activation ranges (and `--method auto`'s choice), the
QDQ build, measured coverage, AdaRound, bias correction. Each declares its statistics and applies; a new pass is one
class here and one line in `static_passes`.
"""
from __future__ import annotations

import time

import numpy as np

from edgeq.calibrate import HOLDOUT_MAX, observed, range_collector, to_calibration
from edgeq.calibrate.collectors import ChannelMeans, KeptBatches, Reservoir, StatisticPoint
from edgeq.quantize.config import Int8Static
from edgeq.quantize.method_choice import choose_method
from edgeq.quantize.pipeline import Pass, StaticState
from edgeq.quantize.qdq import build_qdq, quantized_tensors
from edgeq.quantize.repair import adaround as rounding
from edgeq.quantize.repair import bias_correction, clip_weights, equalize, smoothquant

# AdaRound and bias correction read at most this many calibration samples.
REPAIR_SAMPLES = 512


def _repair_samples(config: Int8Static) -> int:
    return min(config.max_samples or REPAIR_SAMPLES, REPAIR_SAMPLES)


class Equalize:
    """Cross-layer equalization (data-free; FP32 outputs unchanged)."""

    name, changes_float = "equalize", True

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        return []

    def apply(self, state: StaticState, stats: dict) -> None:
        state.repairs["equalize_pairs"] = equalize(state.prepared.proto)


class SmoothQuant:
    """SmoothQuant in place with one alpha, or ("auto") the alpha per activation that minimises its group's
    simulated INT8 output error on reservoir-sampled calibration rows; needs each activation's per-channel maxima."""

    name, changes_float = "smoothquant", True

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        config = state.config
        groups = list(smoothquant.smoothable(state.prepared.proto, tuple(config.exclude_nodes)))
        if not groups:
            return []
        points = [StatisticPoint("absmax", range_collector(state.prepared, groups, histogram=False, channel_axis=-1,
                                                           max_samples=config.max_samples, runtime=state.runtime))]
        if config.smoothquant == "auto":
            points.append(StatisticPoint("rows", Reservoir(groups, max_samples=config.max_samples)))
        return points

    def apply(self, state: StaticState, stats: dict) -> None:
        alpha = state.config.smoothquant
        if "absmax" not in stats:
            state.repairs["smoothquant"] = {"alpha": alpha, "activations": 0} | ({"alphas": {}} if alpha == "auto" else {})
            return
        ranges = observed(stats["absmax"], state.calib, []).ranges("minmax")
        absmax = {name: np.maximum(np.abs(lo), np.abs(hi)) for name, (lo, hi) in ranges.items()}
        if alpha == "auto":
            alphas = smoothquant.choose_alphas(state.prepared.proto, stats["rows"].kept, ranges, per_channel=state.per_channel,
                                               symmetric_activations=state.config.activation_type == "int8")
            done = {"alpha": "auto", "alphas": alphas, "activations": smoothquant.smooth(state.prepared.proto, absmax, alphas)}
        else:
            done = {"alpha": alpha, "activations": smoothquant.smooth(state.prepared.proto, absmax, alpha)}
        state.repairs["smoothquant"] = done


class WeightRange:
    """Weight range setting (data-free): weights clipped to their error-minimising symmetric range."""

    name, changes_float = "weight_range", True

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        return []

    def apply(self, state: StaticState, stats: dict) -> None:
        config = state.config
        clipped = clip_weights(state.prepared.proto, tuple(config.op_types), per_channel=state.per_channel,
                               exclude=tuple(config.exclude_nodes), qmax=7 if config.weight_bits == 4 else 127)
        state.repairs["weight_range"] = {"method": "mse", "weights_clipped": clipped}


class CalibrateRanges:
    """Activation ranges of the tensors the quantizer reads (histograms unless minmax); `--method auto` holds every
    5th batch back, chooses by the QDQ models' outputs on them (`method_choice.py`), then bins them too."""

    name, changes_float = "calibrate", False

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        config = state.config
        # Measured coverage may keep any node float, and a Reshape after a float node then needs a range of its own:
        # observe every tensor then (PP-OCRv4 rec crashed with "Quantization parameters are not specified"), only
        # what the quantizer reads otherwise.
        wanted = (quantized_tensors(state.prepared.proto, config.op_types, tuple(config.exclude_nodes))
                  if config.coverage == "all" else None)
        collector = range_collector(state.prepared, wanted, histogram=config.method != "minmax", max_samples=config.max_samples,
                                    runtime=state.runtime)
        if config.method != "auto":
            return [StatisticPoint("ranges", collector)]
        # scored on when too few samples can be held back (then none are)
        return [StatisticPoint("ranges", collector, holds_back=True), StatisticPoint("first", KeptBatches(HOLDOUT_MAX))]

    def apply(self, state: StaticState, stats: dict) -> None:
        started = time.perf_counter()
        config = state.config
        state.seen = observed(stats["ranges"], state.calib, state.collected)
        state.method, state.held_samples = config.method, sum(b.size for b in state.seen.holdout)
        if config.method == "auto":
            # With nothing held back the chosen method's scored model has the ranges that ship: BuildQdq takes it.
            state.method, state.scores, held_note, state.scored = choose_method(
                state.prepared, state.calib, config, state.seen, lambda ranges: build_qdq(state.prepared, config, ranges),
                stats["first"].batches)
            state.notes.append(held_note)
            state.seen.include_holdout()
        state.calibration = to_calibration(state.seen, state.method, percentile=config.percentile,
                                           symmetric=config.activation_type == "int8")
        state.calibration_seconds = state.read_seconds + time.perf_counter() - started


class BuildQdq:
    """The QDQ model from the ranges (`qdq.build_qdq`), or the one `--method auto` built from the same ranges."""

    name, changes_float = "build_qdq", False

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        return []

    def apply(self, state: StaticState, stats: dict) -> None:
        state.result = state.scored or build_qdq(state.prepared, state.config, state.calibration.ranges)
        state.scored = None


class MeasuredCoverage:
    """Which nodes stay float for speed, by measured kernel time (`quantize/coverage.py`, on the first sample)."""

    name, changes_float = "coverage", False

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        return []

    def apply(self, state: StaticState, stats: dict) -> None:
        from edgeq.quantize.coverage import choose_for

        ranges = state.calibration.ranges
        state.result, state.coverage = choose_for(state.prepared, state.calib, state.config,
                                                  lambda float_nodes: build_qdq(state.prepared, state.config, ranges, exclude=float_nodes))


class AdaRound:
    """Learned weight rounding, from the FP32 input moments of every layer it may round."""

    name, changes_float = "adaround", False

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        config, cap = state.config, _repair_samples(state.config)
        layers = rounding.float_layers(state.prepared.proto, tuple(config.op_types), tuple(config.exclude_nodes))
        return [StatisticPoint("moments", rounding.InputMoments(layers, cap)), StatisticPoint("batches", KeptBatches(cap))]

    def apply(self, state: StaticState, stats: dict) -> None:
        state.repairs["adaround"] = rounding.round_layers(state.prepared, state.result, stats["moments"].moments,
                                                          stats["batches"].batches, runtime=state.runtime)


class BiasCorrection:
    """Empirical bias correction: FP32 per-channel output means, then the QDQ model's layer by layer."""

    name, changes_float = "bias_correction", False

    def statistics(self, state: StaticState) -> list[StatisticPoint]:
        cap = _repair_samples(state.config)
        return [StatisticPoint("reference", ChannelMeans(bias_correction.reference_outputs(state.prepared.proto), cap)),
                StatisticPoint("batches", KeptBatches(cap))]

    def apply(self, state: StaticState, stats: dict) -> None:
        state.repairs["bias_correction"] = bias_correction.shift_biases(state.prepared, state.result, stats["reference"].means(),
                                                                        stats["batches"].batches, state.runtime)


def static_passes(config: Int8Static) -> list[Pass]:
    """The passes of this recipe, in order."""
    passes: list[Pass] = []
    if config.equalize:
        passes.append(Equalize())
    if config.smoothquant is not None:
        passes.append(SmoothQuant())
    if config.weight_range == "mse":
        passes.append(WeightRange())
    passes += [CalibrateRanges(), BuildQdq()]
    if config.coverage == "measured":
        passes.append(MeasuredCoverage())
    if config.rounding == "adaround":
        passes.append(AdaRound())
    if config.bias_correction:
        passes.append(BiasCorrection())
    return passes

"""Calibration data quality: sample count, NaN/Inf, duplicates, and coverage — the share of validation activations
that fall outside the ranges calibrated on the calibration set, per layer."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeq.calibrate import with_outputs
from edgeq.data import Dataset, batches
from edgeq.model import Model, make_session
from edgeq.quantize.qdq import Prepared

MIN_SAMPLES = 100
OUTSIDE_WARN = 0.01     # more than 1% of a layer's validation values outside its calibrated range


@dataclass
class SetStats:
    description: str
    samples: int
    nonfinite: int           # samples holding at least one NaN/Inf
    duplicates: int          # samples identical to an earlier one
    mean: float
    std: float


@dataclass
class LayerCoverage:
    tensor: str
    node: str
    calibrated: tuple[float, float]
    validation: tuple[float, float]
    outside: float           # share of validation values outside the calibrated range


@dataclass
class DataQuality:
    calib: SetStats
    val: SetStats | None = None
    coverage: list[LayerCoverage] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def set_stats(model: Model, data: Dataset) -> SetStats:
    """Count samples, non-finite samples and exact duplicates (by content hash), streaming."""
    seen: set[bytes] = set()
    n = nonfinite = dup = 0
    total = total_sq = count = 0.0
    for batch in batches(data, model.inputs, 64, refuse_nonfinite=False):
        arrays = [np.ascontiguousarray(batch.inputs[s.name]) for s in model.inputs]
        for i in range(batch.size):
            h = hashlib.sha1()
            for a in arrays:
                h.update(a[i].tobytes())
            key = h.digest()
            dup += key in seen
            seen.add(key)
        finite = np.ones(batch.size, bool)
        for a in arrays:
            if a.dtype.kind == "f":
                finite &= np.isfinite(a.reshape(batch.size, -1)).all(axis=1)
                good = a[finite].astype(np.float64)
                total += float(good.sum())
                total_sq += float((good ** 2).sum())
                count += good.size
        nonfinite += int((~finite).sum())
        n += batch.size
    mean = total / count if count else 0.0
    std = float(np.sqrt(max(total_sq / count - mean ** 2, 0.0))) if count else 0.0
    return SetStats(data.description, n, nonfinite, dup, mean, std)


def coverage(prep: Prepared, val: Dataset, minmax_ranges: dict[str, tuple[float, float]]) -> list[LayerCoverage]:
    """For each quantizable layer's output (and the graph inputs): the share of validation values outside the range
    the calibration set produced (min/max, so a value outside is truly unseen)."""
    producers = {o: n.name for n in prep.model.proto.graph.node for o in n.output}
    layer_names = {l["name"] for l in prep.layers}
    tensors = [s.name for s in prep.model.inputs]
    tensors += [n.output[0] for n in prep.model.proto.graph.node if n.name in layer_names]
    tensors = [t for t in tensors if t in minmax_ranges]
    graph_inputs = {s.name for s in prep.model.inputs}
    session = make_session(with_outputs(prep.model.proto, [t for t in tensors if t not in graph_inputs]), threads=0)
    names = [o.name for o in session.get_outputs()]
    outside = dict.fromkeys(tensors, 0)
    sizes = dict.fromkeys(tensors, 0)
    lows = {t: np.inf for t in tensors}
    highs = {t: -np.inf for t in tensors}
    for batch in batches(val, prep.model.inputs, 64, refuse_nonfinite=False):
        finite = np.ones(batch.size, bool)
        for a in batch.inputs.values():
            if a.dtype.kind == "f":
                finite &= np.isfinite(a.reshape(batch.size, -1)).all(axis=1)
        feed = {k: v[finite] for k, v in batch.inputs.items()}
        if not finite.any():
            continue
        values = dict(zip(names, session.run(names, feed))) | feed
        for t in tensors:
            v = values[t]
            lo, hi = minmax_ranges[t]
            outside[t] += int(np.count_nonzero((v < lo) | (v > hi)))
            sizes[t] += v.size
            lows[t] = min(lows[t], float(v.min()))
            highs[t] = max(highs[t], float(v.max()))
    return [LayerCoverage(t, producers.get(t, "(input)"), tuple(map(float, minmax_ranges[t])), (lows[t], highs[t]),
                          round(outside[t] / max(sizes[t], 1), 6)) for t in tensors]


def data_quality(prep: Prepared, calib: Dataset, val: Dataset | None, minmax_ranges: dict[str, tuple[float, float]] | None) -> DataQuality:
    model = prep.model
    report = DataQuality(set_stats(model, calib))
    c = report.calib
    if c.samples < MIN_SAMPLES:
        report.warnings.append(f"only {c.samples} calibration samples: use a few hundred representative ones")
    if c.nonfinite:
        report.warnings.append(f"{c.nonfinite} calibration samples hold NaN/Inf: remove them (calibration refuses them)")
    if c.duplicates:
        report.warnings.append(f"{c.duplicates} of {c.samples} calibration samples are exact duplicates: they add no information")
    if val is not None:
        report.val = set_stats(model, val)
        if minmax_ranges:
            report.coverage = coverage(prep, val, minmax_ranges)
            bad = sorted((l for l in report.coverage if l.outside > OUTSIDE_WARN), key=lambda l: -l.outside)
            if bad:
                worst = bad[0]
                report.warnings.append(
                    f"the calibration set does not represent the validation set: {len(bad)} of {len(report.coverage)} layers see more "
                    f"than {OUTSIDE_WARN:.0%} of validation values outside their calibrated range (worst: {worst.node}, "
                    f"{worst.outside:.1%} outside [{worst.calibrated[0]:.3g}, {worst.calibrated[1]:.3g}]); calibrate on data drawn like the validation data")
        v = report.val
        if c.std > 0 and (abs(v.mean - c.mean) > 0.5 * c.std or not 0.5 < v.std / c.std < 2):
            report.warnings.append(f"input statistics differ: calibration mean {c.mean:.3g} / std {c.std:.3g}, "
                                   f"validation mean {v.mean:.3g} / std {v.std:.3g}: check the preprocessing of both sets")
    return report

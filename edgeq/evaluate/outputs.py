"""Fidelity of every scored output, per channel group, and the worst of them: what a fidelity verdict rests on.

Each output gets a kind from its first batch:
- `classes`: integer class ids, or one score vector per sample that is narrow (< `EMBEDDING_MIN_DIMS` values),
  ends in a softmax (a Softmax/LogSoftmax node, or rows of the reference that are non-negative and sum to 1) or
  has labels; judged by top-1 agreement, as before;
- `embedding`: a wide float vector per sample (≥ `EMBEDDING_MIN_DIMS` values) that is no softmax and has no
  labels: its argmax means nothing (MiniLM's INT8 sentence embedding agrees on 89% of argmaxes at cosine 0.997), so
  it is judged by cosine to the reference;
- `tensor`: any other float output (maps, hidden states, recurrent state): judged by cosine.
A cosine-judged output is judged on its worst channel group (`tasks/groups.py`); the worst output is the one that
loses the most points against a perfect reference (100 − agreement %, or 100 × (1 − cosine)), so one rule of
points ranks outputs of either kind.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from edgeq.decide import DecisionRule
from edgeq.evaluate.metrics import METRICS
from edgeq.evaluate.stats import Estimate, json_number, mean_estimate, sqnr_estimate
from edgeq.evaluate.tasks.fidelity import fidelity, fidelity_metrics
from edgeq.evaluate.tasks.groups import channel_axis, channel_ranges, describe_channels, group_closeness, range_groups
from edgeq.evaluate.tasks.rows import class_scores
from edgeq.model import TensorSpec

# Below 32 values a vector is read as class scores (the digits CNN's 10, a VAD's 1); from 32 on, without a softmax
# or labels, as an embedding (MiniLM 384, audio embedders 96-1024). Logits of a wide classifier without a softmax
# are then judged by cosine, which is the stricter reading: argmax agreement survives errors that cosine sees.
EMBEDDING_MIN_DIMS = 32
SUMS_TO_ONE = 1e-3

_DEFAULT_RULE = DecisionRule()


def thresholds() -> dict:
    """The fidelity thresholds a record states: the default decision rule (ship under 1 point, try QAT up to 3)
    read in each metric's points. One point of cosine is 0.01 (`metrics.py`), so cosine ≥ 0.99 reads as ship and
    ≥ 0.97 as try-QAT, the same 1/3-point rule as accuracy. For noise uncorrelated with the signal
    cos = 1/√(1 + N/S), so those cosines are SQNRs of 16.9 dB and 12.0 dB (noise at 2% and 6% of the signal power);
    the SQNR columns are stated for reading, the verdict is paired on cosine.

    >>> thresholds()["cosine"], thresholds()["sqnr_db"]["ship_at_least"]
    ({'ship_at_least': 0.99, 'try_qat_at_least': 0.97}, 16.9)
    """
    ship, qat = 1 - _DEFAULT_RULE.ship_below / 100, 1 - _DEFAULT_RULE.qat_up_to / 100
    return {
        "cosine": {"ship_at_least": ship, "try_qat_at_least": qat},
        "sqnr_db": {"ship_at_least": round(_sqnr_of_cosine(ship), 1), "try_qat_at_least": round(_sqnr_of_cosine(qat), 1)},
        "top1_agreement": {"ship_at_least": 100 - _DEFAULT_RULE.ship_below, "try_qat_at_least": 100 - _DEFAULT_RULE.qat_up_to},
        "rule": "cosine-judged outputs (embeddings, maps, tensors) on their worst channel group, class outputs on top-1 "
                "agreement; the worst output decides",
    }


def _sqnr_of_cosine(cosine: float) -> float:
    return -10 * math.log10(1 / cosine ** 2 - 1)


@dataclass
class OutputSummary:
    """One output's fidelity: its metrics (cosine-judged ones on the worst group), groups, and loss in points."""

    name: str
    kind: str
    judged_by: str
    metrics: dict[str, Estimate]
    per_sample: dict[str, np.ndarray]
    overall: dict[str, Estimate]
    groups: list[dict]
    worst_group: int
    loss_points: float
    predictions: np.ndarray | None
    channel_axis: int | None = None
    silent: int = 0  # channels left out of the groups (10^6 or more below the widest)
    values_per_sample: int = 0

    @property
    def caveat(self) -> str | None:
        """A cosine over one value is its sign only: say so, with the SQNR that does measure it."""
        if self.judged_by != "cosine" or self.values_per_sample != 1:
            return None
        sqnr = self.overall["sqnr_db"].value
        return (f"output {self.name} holds one value per sample, whose cosine is only its sign: read its SQNR "
                f"({sqnr:.1f} dB; ship-like from {thresholds()['sqnr_db']['ship_at_least']} dB) and mean |diff|")

    def to_dict(self) -> dict:
        loss = self.loss_points
        judgement = "ship-like" if loss < _DEFAULT_RULE.ship_below else "try-qat-like" if loss <= _DEFAULT_RULE.qat_up_to else "stay-like"
        if self.caveat:  # one value per sample: judged here by its SQNR against the cosine thresholds' equivalents
            sqnr, cut = self.overall["sqnr_db"].value, thresholds()["sqnr_db"]
            judgement = "ship-like" if sqnr >= cut["ship_at_least"] else "try-qat-like" if sqnr >= cut["try_qat_at_least"] else "stay-like"
        return {"name": self.name, "kind": self.kind, "judged_by": self.judged_by,
                "value": json_number(self.metrics[self.judged_by].value), "loss_points": json_number(loss),
                "judgement": judgement if math.isfinite(loss) else "stay-like",
                "whole_output": {k: {**e.to_dict(), "higher_is_better": METRICS[k].higher_is_better} for k, e in self.overall.items()},
                "channel_axis": self.channel_axis, "silent_channels_left_out": self.silent,
                "groups": self.groups, "worst_group": self.worst_group}


@dataclass
class OutputFidelity:
    """Accumulates one output's fidelity columns batch by batch; kind and channel groups fixed by the first batch."""

    name: str
    spec: TensorSpec | None
    softmax_end: bool
    kind: str | None = None
    axis: int | None = None
    groups: list[np.ndarray] = field(default_factory=list)
    ranges: np.ndarray | None = None
    values_per_sample: int = 0
    columns: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))

    def add(self, y: np.ndarray, r: np.ndarray, failed: np.ndarray, labelled: bool) -> None:
        if self.kind is None:
            self.fix(y, r, labelled)
        cols = fidelity(y, r, failed)
        if self.kind != "classes":  # an embedding's argmax means nothing
            cols = {k: v for k, v in cols.items() if k not in ("prediction", "agree")}
        if len(self.groups) > 1:
            for index, group in enumerate(group_closeness(y, r, self.axis, self.groups, failed)):
                cols.update({f"group{index}:{k}": v for k, v in group.items()})
        for key, values in cols.items():
            self.columns[key].append(values)

    def fix(self, y: np.ndarray, r: np.ndarray, labelled: bool) -> None:
        """Kind and channel groups, from the first batch (a data shard is given the data's first batch)."""
        scores = class_scores(r)
        if y.dtype.kind in "iu" or (scores is not None and (scores.shape[1] < EMBEDDING_MIN_DIMS or labelled
                                                            or self.softmax_end or _probabilities(scores))):
            self.kind = "classes"
        else:
            self.kind = "embedding" if scores is not None else "tensor"
        self.values_per_sample = int(np.prod(r.shape[1:], dtype=np.int64))
        self.axis = channel_axis(r, self.spec) if r.dtype.kind == "f" else None
        self.ranges = channel_ranges(r, self.axis)
        self.groups = range_groups(self.ranges)

    def extend(self, other: "OutputFidelity") -> None:
        """The columns of the next shard (fixed on the same first batch) after these."""
        for key, parts in other.columns.items():
            self.columns[key].extend(parts)

    def summary(self) -> OutputSummary | None:
        """None when nothing in this output can be compared (non-float values that are not class ids)."""
        cols = {k: np.concatenate(v) for k, v in self.columns.items()}
        overall = fidelity_metrics({k: v for k, v in cols.items() if not k.startswith("group")})
        if not overall:
            return None
        judged = "top1_agreement" if "top1_agreement" in overall else "cosine"
        metrics, per_sample = dict(overall), {k: v for k, v in cols.items() if not k.startswith("group")}
        rows, worst = [], 0
        if judged == "cosine":
            estimates = self._group_estimates(cols, overall)
            worst = min(range(len(estimates)), key=lambda i: (_or_inf(estimates[i][0].value), _or_inf(estimates[i][1].value)))
            rows = [self._group_row(channels, *est) for channels, est in zip(self.groups, estimates)]
            if len(self.groups) > 1:
                metrics["cosine"], metrics["sqnr_db"] = estimates[worst]
                per_sample["cosine"] = cols[f"group{worst}:cosine"]
        value = metrics[judged].value
        loss = (100 - value) if judged == "top1_agreement" else 100 * (1 - value)
        silent = len(self.ranges) - sum(len(g) for g in self.groups) if self.ranges is not None else 0
        return OutputSummary(self.name, self.kind or "tensor", judged, metrics, per_sample, overall, rows, worst,
                             loss if math.isfinite(loss) else math.inf, cols.get("prediction"), self.axis, silent,
                             self.values_per_sample)

    def _group_estimates(self, cols: dict[str, np.ndarray], overall: dict[str, Estimate]) -> list[tuple[Estimate, Estimate]]:
        """(cosine, SQNR) per group; a single group is the whole output."""
        if len(self.groups) == 1:
            return [(overall["cosine"], overall["sqnr_db"])]
        return [(mean_estimate(cols[f"group{i}:cosine"]), sqnr_estimate(cols[f"group{i}:signal"], cols[f"group{i}:noise"]))
                for i in range(len(self.groups))]

    def _group_row(self, channels: np.ndarray, cosine: Estimate, sqnr: Estimate) -> dict:
        span = self.ranges[channels] if self.ranges is not None else None
        return {"channels": describe_channels(channels) if span is not None else "all",
                "count": int(len(channels)) if span is not None else 1,
                "fp32_range": [json_number(float(span.min())), json_number(float(span.max()))] if span is not None else None,
                "cosine": cosine.to_dict(), "sqnr_db": sqnr.to_dict()}


def worst_output(summaries: list[OutputSummary]) -> OutputSummary:
    """The output that loses the most points (the first on ties).

    >>> record = validate("int8.onnx", val, reference="model.onnx")    # doctest: +SKIP
    >>> record.worst["output"] == record.output                         # doctest: +SKIP
    True
    """
    return max(summaries, key=lambda s: s.loss_points)


def _probabilities(scores: np.ndarray) -> bool:
    finite = scores[np.isfinite(scores).all(axis=1)]
    return bool(len(finite)) and bool((finite >= 0).all()) and bool(np.allclose(finite.sum(axis=1), 1.0, atol=SUMS_TO_ONE))


def _or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf

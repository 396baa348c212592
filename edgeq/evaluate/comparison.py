"""Read validation records and compare two of them sample by sample (paired), then decide."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.decide import SHIP, TRY_QAT, DecisionRule, Verdict, decide
from edgeq.errors import UserError
from edgeq.evaluate.detection.pooled import paired_map_drop, table_of_record
from edgeq.evaluate.metrics import METRICS, MetricInfo
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.render import format_value
from edgeq.evaluate.stats import Estimate, bootstrap_ci, contain, json_number, proportion
from edgeq.evaluate.tasks.detect import MIN_SHIP_BOX_F1

_REQUIRED = ("metric", "value", "samples", "per_sample", "data_fingerprint")


def read_validation(path: Path | str) -> dict:
    """Read a validation record written by `edgeq validate`; UserError with a fix for anything else.

    >>> read_validation("fp32.json")["metric"]        # doctest: +SKIP
    'top1'
    """
    path = Path(path)
    rerun = f"write it with `edgeq validate MODEL --data DATA -o {path}`"
    if not path.is_file():
        raise UserError(f"validation results not found: {path}", rerun if not path.exists() else "give the path of a .json file")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})".replace("\n", " "), rerun) from None
    if isinstance(record, dict) and "verdict" in record:
        raise UserError(f"{path} is a comparison, not a validation record", "give the JSON files that `edgeq validate` wrote")
    missing = [k for k in _REQUIRED if not isinstance(record, dict) or k not in record]
    if missing:
        raise UserError(f"{path} is not an edgeq validation record (missing {', '.join(missing)})", rerun)
    info = METRICS.get(record["metric"])
    if info and info.pooled:
        if not isinstance(record.get("detections"), dict) or record["detections"].get("images") != record["samples"]:
            raise UserError(f"{path} has no per-image detections for its metric {record['metric']!r}", f"re-run validation: {rerun}")
        return record
    values = record["per_sample"].get(info.samples) if info and isinstance(record["per_sample"], dict) else None
    if not isinstance(values, list) or len(values) != record["samples"]:
        raise UserError(f"{path} has no per-sample results for its metric {record['metric']!r}", f"re-run validation: {rerun}")
    return record


@dataclass
class Comparison:
    """Base against candidate on the same samples: the drop, its paired interval, and the verdict."""

    metric: str
    unit: str
    higher_is_better: bool
    samples: int
    base: float
    candidate: float
    base_ci95: tuple[float, float]
    candidate_ci95: tuple[float, float]
    base_model: str
    candidate_model: str
    drop: float
    drop_ci95: tuple[float, float]
    within_noise: bool
    agreement: Estimate | None
    verdict: str
    reasons: list[str]
    rule: DecisionRule

    def to_dict(self) -> dict:
        return {
            "metric": self.metric, "unit": self.unit, "higher_is_better": self.higher_is_better, "samples": self.samples,
            "base": json_number(self.base), "candidate": json_number(self.candidate),
            "base_ci95": [json_number(v) for v in self.base_ci95], "candidate_ci95": [json_number(v) for v in self.candidate_ci95],
            "base_model": self.base_model, "candidate_model": self.candidate_model,
            "drop": json_number(self.drop), "drop_ci95": [json_number(v) for v in self.drop_ci95], "within_noise": self.within_noise,
            "top1_agreement": None if self.agreement is None else self.agreement.to_dict(),
            "verdict": self.verdict, "reasons": list(self.reasons),
            "rule": {"ship_below": self.rule.ship_below, "qat_up_to": self.rule.qat_up_to},
        }


def compare(base: dict | ValidationRecord, candidate: dict | ValidationRecord, rule: DecisionRule | None = None) -> Comparison:
    """Measure the candidate's drop against the base on the same samples (paired) and decide.

    The drop is in points of the metric and positive when the candidate is worse (percentage points for accuracy
    and agreement, 0.01 for cosine, the targets' units for MAE).

    >>> c = compare(read_validation("fp32.json"), read_validation("int8.json"))   # doctest: +SKIP
    >>> c.verdict, round(c.drop, 2), c.within_noise                               # doctest: +SKIP
    ('ship', 0.5, True)
    """
    rule = rule or DecisionRule()
    base, cand = _as_dict(base), _as_dict(candidate)
    _check_comparable(base, cand)
    info = METRICS[base["metric"]]
    if info.pooled:
        drop, drop_ci = _pooled_drop(base, cand, info)
        diff = np.zeros(int(base["samples"]))  # the paired samples behind the drop: every image
    else:
        diff = _paired_drop(base, cand, info)
        drop = round(float(diff.mean()), 9) + 0.0 if len(diff) else math.nan  # no float dust (or -0.0) at a threshold
        drop_ci = contain(Estimate(drop, bootstrap_ci(lambda d: d.mean(axis=1), diff))).ci95
    if base["metric"] == "perplexity":  # paired nll difference → relative perplexity increase in percent
        drop, drop_ci = _relative_ppl(drop), (_relative_ppl(drop_ci[0]), _relative_ppl(drop_ci[1]))
    within = bool(drop_ci[0] <= 0 <= drop_ci[1])
    agreement = _agreement(base, cand)
    verdict = _box_floor(decide(drop, drop_ci, rule, samples=len(diff)), cand)
    reasons = [*_context(base, cand, info, len(diff), agreement), *verdict.reasons]
    return Comparison(base["metric"], _unit(base["metric"]), info.higher_is_better, int(base["samples"]),
                      _float(base["value"]), _float(cand["value"]), _pair(base.get("ci95")), _pair(cand.get("ci95")),
                      str(base.get("model")), str(cand.get("model")), drop, drop_ci, within, agreement,
                      verdict.verdict, reasons, rule)


def _box_floor(verdict: Verdict, cand: dict) -> Verdict:
    """A detector keeping fewer than 90% of the reference's boxes (box F1, point value) never ships, whatever the rule."""
    f1 = (cand.get("metrics") or {}).get("box_f1", {}).get("value")
    if verdict.verdict != SHIP or f1 is None or f1 >= MIN_SHIP_BOX_F1:
        return verdict
    return Verdict(TRY_QAT, [f"box F1 against the reference is {f1:.3f}, below {MIN_SHIP_BOX_F1}: a detector that loses "
                             "that many boxes does not ship, whatever the thresholds; try QAT or keep the head in float",
                             *verdict.reasons[1:]])


def _relative_ppl(nll_increase: float) -> float:
    return round(100 * math.expm1(nll_increase), 9) + 0.0 if math.isfinite(nll_increase) else nll_increase


def _as_dict(record: dict | ValidationRecord) -> dict:
    return record.to_dict() if isinstance(record, ValidationRecord) else record


def _check_comparable(base: dict, cand: dict) -> None:
    fix = "validate both models on the same data (and the same --reference) and compare those results"
    if base["metric"] != cand["metric"]:
        raise UserError(f"the base measures {base['metric']} and the candidate {cand['metric']}", fix)
    if base["metric"] not in METRICS or (METRICS[base["metric"]].samples is None and not METRICS[base["metric"]].pooled):
        raise UserError(f"cannot compare on metric {base['metric']!r}", "validate with a current edgeq and compare again")
    if base["samples"] != cand["samples"]:
        raise UserError(f"the base was validated on {base['samples']} samples and the candidate on {cand['samples']}", fix)
    if base["data_fingerprint"] != cand["data_fingerprint"]:
        raise UserError("the base and the candidate were validated on different data (their data fingerprints differ)", fix)


def _paired_drop(base: dict, cand: dict, info: MetricInfo) -> np.ndarray:
    """Per-sample drop in points (positive = worse), over samples finite on both sides."""
    b = np.asarray(base["per_sample"][info.samples], dtype=np.float64)
    c = np.asarray(cand["per_sample"][info.samples], dtype=np.float64)
    sign = 1.0 if info.higher_is_better else -1.0
    d = sign * (b - c) * info.scale * info.points
    return d[np.isfinite(d)]


def _pooled_drop(base: dict, cand: dict, info: MetricInfo) -> tuple[float, tuple[float, float]]:
    """mAP drop in points on the same bootstrap resamples of images for both models (positive = worse)."""
    (base_table, base_truth), (cand_table, cand_truth) = (table_of_record(r["detections"]) for r in (base, cand))
    if base_truth.shape != cand_truth.shape or not np.array_equal(base_truth, cand_truth):
        raise UserError("the base and the candidate were scored on different ground-truth boxes",
                        "validate both models with the same --labels file and compare those results")
    column = 0 if base["metric"] == "map50" else 1
    point, draws = paired_map_drop(base_table, cand_table)
    drop = round(float(point[column]) * info.points, 9) + 0.0
    lo, hi = np.nanpercentile(draws[:, column] * info.points, [2.5, 97.5])
    return drop, contain(Estimate(drop, (float(lo), float(hi)))).ci95


def _agreement(base: dict, cand: dict) -> Estimate | None:
    p, q = base.get("predictions"), cand.get("predictions")
    if not p or not q or len(p) != len(q):
        return None
    return proportion(np.asarray(p) == np.asarray(q))


def _context(base: dict, cand: dict, info: MetricInfo, paired: int, agreement: Estimate | None) -> list[str]:
    metric, n = base["metric"], int(base["samples"])
    lines = [f"{metric}: base {format_value(metric, _float(base['value']))}, candidate {format_value(metric, _float(cand['value']))} "
             f"on the same {n} samples"]
    if paired < n:
        lines.append(f"{n - paired} samples with non-finite results on either side are left out of the paired drop")
    if agreement is not None:
        lines.append(f"the models pick the same top-1 class on {agreement.value:.2f}% of samples")
    lines.extend(_worst_outputs(base, cand))
    if metric == "perplexity":
        lines.append("the perplexity drop is its relative increase in percent, paired window by window")
    elif info.points != 1:
        lines.append(f"{metric} drops are counted in points of {1 / info.points:g}")
    elif info.unit != "%":
        lines.append(f"the {metric} drop is in the targets' units: set --ship-below/--qat-up-to to what your application tolerates")
    return lines


def _worst_outputs(base: dict, cand: dict) -> list[str]:
    """Which output (and channel group) each side's fidelity rests on, when the records say (version 2)."""
    def where(worst: dict) -> str:
        group = f", channel group {worst['group']} (channels {worst['channels']})" if worst.get("group") is not None else ""
        return f"output {worst['output']}{group}"

    b, c = base.get("worst"), cand.get("worst")
    if not isinstance(c, dict) or c.get("metric") != base["metric"]:
        return []
    line = f"{base['metric']} is measured on each model's worst scored output: the candidate's is {where(c)}"
    if isinstance(b, dict) and b.get("loss_points") and (b.get("output"), b.get("group")) != (c.get("output"), c.get("group")):
        line += f", the base's {where(b)}"
    return [line]


def _unit(metric: str) -> str:
    if metric == "perplexity":
        return "% relative increase"
    info = METRICS[metric]
    if info.unit == "%":
        return "percentage points"
    return f"points of {1 / info.points:g} {metric}" if info.points != 1 else f"{metric} units"


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _pair(v: Any) -> tuple[float, float]:
    return (_float(v[0]), _float(v[1])) if isinstance(v, (list, tuple)) and len(v) == 2 else (math.nan, math.nan)

"""The few-evaluation search of `auto`: FP32 and FP16 first, the best calibration method, the fewest layers back to
float (a guess from the sensitivity analysis, grown by doubling, bisected down), the refinement of the recipe found
(scored on calibration samples, one evaluation), and the choice among the candidates within the budget."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from edgeq.analyze.sensitivity import eval_inputs, fidelity, full_int8_fidelity, outputs_of
from edgeq.auto.candidates import Candidate, EvalTask, Recipe, evaluate_task
from edgeq.data import Dataset
from edgeq.evaluate.shards import DataSource, validate_many
from edgeq.executors import Executor
from edgeq.model import Model
from edgeq.quantize.config import Int8Static
from edgeq.quantize.qdq import Prepared, prepare_and_calibrate_each, quantize_qdq
from edgeq.sqnr import BROKEN_SQNR_DB

# Learned rounding joins the refinement at these weight widths. Measured in bench/rounding.py: at W4A8 AdaRound +
# bias correction recovers 95–103 % of round-to-nearest's loss (MobileNet-style net, digits CNN) where the best
# repair without it recovers 0–93 %; at W8A8 there was no loss left to recover and it cost 2.6–364 s.
ADAROUND_WEIGHT_BITS = (4,)

BATCH = 64   # validation batch size of every candidate


class Search:
    """Saves, evaluates and records candidates; counts evaluations. Candidates are validated through the executor,
    split by data shard (a detector: one task per candidate), on the validation data's `source`: its file, or its
    arrays shared once."""

    def __init__(self, folder, executor: Executor, source: DataSource, budget: float, rule, reference: str | None = None,
                 detect: bool = False, detection_labels: str | None = None) -> None:
        self.folder, self.executor, self.source = folder, executor, source
        self.budget, self.rule, self.reference = budget, rule, reference
        self.detect, self.detection_labels = detect, detection_labels
        self.records: dict[str, Candidate] = {}
        self.base: dict | None = None   # FP32's validation record
        self.evaluations = 0

    def evaluate(self, candidates: list[tuple[str, Any, Recipe]]) -> list[Candidate]:
        from edgeq.evaluate import compare
        from edgeq.model import save

        paths = [str(save(proto, self.folder.path(f"candidates/{name}.onnx"), force=True)) for name, proto, _ in candidates]
        description = f"validating {', '.join(name for name, _, _ in candidates)}"[:80]
        if self.detect:
            tasks = [EvalTask(name, path, self.source, reference=self.reference, detection_labels=self.detection_labels)
                     for (name, _, _), path in zip(candidates, paths)]
            results = self.executor.map(evaluate_task, tasks, description)
        else:
            records = validate_many(paths, self.source, self.reference, BATCH, [], self.executor, description=description)
            results = [{k: v for k, v in r.to_dict().items() if k != "predictions"} for r in records]
        self.evaluations += len(paths)
        out = []
        for (name, _, recipe), path, result in zip(candidates, paths, results):
            evaluation = self.evaluations - len(paths) + len(out) + 1
            if self.base is None:
                self.base = result
                drop, drop_ci95, meets, reasons = 0.0, [0.0, 0.0], True, None
            else:
                c = compare(self.base if self.reference is None else _perfect(result), result, self.rule).to_dict()
                drop, drop_ci95, meets, reasons = c["drop"], c["drop_ci95"], bool(c["drop"] <= self.budget), c["reasons"]
            candidate = Candidate(name, path, recipe, result["metric"], result["value"], result["ci95"], evaluation,
                                  drop, drop_ci95, meets, reasons)
            self.records[name] = candidate
            out.append(candidate)
        return out

    def meeting(self) -> list[Candidate]:
        """Quantized candidates (INT8, mixed, QAT) that meet the budget."""
        return [c for c in self.records.values() if c.meets and c.recipe.quantized]

    def within_budget(self) -> list[Candidate]:
        """Every candidate that meets the budget, FP32 and FP16 included."""
        return [c for c in self.records.values() if c.meets]


def _perfect(record: dict) -> dict:
    """FP32's fidelity to itself, on the candidate's metric and samples: 100% agreement, cosine 1. Each candidate's
    drop is paired against it, so it is the points the candidate loses to FP32 even when the worst output (and so
    the metric) differs between candidates of a multi-output model."""
    from edgeq.evaluate.metrics import METRICS

    info = METRICS[record["metric"]]
    ones = [1.0] * len(record["per_sample"][info.samples])
    return {**record, "value": info.scale, "ci95": [info.scale, info.scale], "model": "fp32 (reference)", "worst": None,
            "predictions": None, "per_sample": {**record["per_sample"], info.samples: ones}}


def float_candidates(search: Search, source: Model, say) -> None:
    """FP32 (the baseline) and FP16, evaluated before any calibration: both are candidates like the others."""
    from edgeq.quantize import quantize
    from edgeq.quantize.config import Fp16

    say("evaluating FP32 and FP16")
    search.evaluate([("fp32", source.proto, Recipe("fp32")), ("fp16", quantize(source, Fp16()).proto, Recipe("fp16"))])


def pick_calibration(search: Search, source: Model, calib: Dataset, config: Int8Static, methods: tuple[str, ...], select: str,
              steps: list[dict], say) -> tuple[dict[str, Prepared], Candidate, dict[str, np.ndarray]]:
    """Calibrate with every method; evaluate the best full INT8 (every method's with `select="validation"`).
    Returns the prepared graphs, the best full-INT8 candidate and the calibration samples fidelity is measured on."""
    say("calibrating with each method; the one whose INT8 outputs stay closest to FP32 is kept")
    preps = prepare_and_calibrate_each(source, calib, config, methods)
    feed = eval_inputs(next(iter(preps.values())), calib)
    scores = {m: full_int8_fidelity(p, feed) for m, p in preps.items()}
    def int8(m: str) -> tuple:
        return f"int8-{m}", quantize_qdq(preps[m]), Recipe("int8", method=m)

    if select == "validation":   # one validation run per method: the most accurate, at the price of evaluations
        full = search.evaluate([int8(m) for m in methods])
        best = min(full, key=lambda c: (c.drop, methods.index(c.recipe.method)))
        why = "lowest validation drop: " + ", ".join(f"{c.recipe.method} {c.drop:+.2f}" for c in full)
    else:                        # fidelity on calibration samples: no validation run spent on the choice
        method = max(methods, key=lambda m: (scores[m].sqnr_db, -methods.index(m)))
        full = search.evaluate([int8(method)])
        best = full[0]
        why = "highest output SQNR vs FP32 on calibration samples: " + ", ".join(f"{m} {scores[m].sqnr_db:.1f} dB" for m in methods)
    steps.append({"step": "calibration", "evaluated": [c.name for c in full], "best": best.name, "why": why,
                  "sqnr_db": {m: scores[m].sqnr_db for m in methods}})
    return preps, best, feed


def fallback_search(search: Search, prep: Prepared, best: Candidate, ranked: list[str], analysis, steps: list[dict], say,
             max_float_layers: int | None = None) -> None:
    """Fewest top-ranked layers to float (at most `max_float_layers`): start at the sensitivity analysis's guess
    (layers that alone break the outputs), grow by doubling while the budget fails, then bisect the count down to
    the smallest that meets it."""
    method = best.recipe.method
    n = len(ranked) if max_float_layers is None else min(max_float_layers, len(ranked))
    if n == 0:
        steps.append({"step": "fallback", "result": "no layer may stay in float (max_float_layers 0): no mixed-precision search"})
        return
    sens = {s.node: s for s in analysis.sensitivity}
    guess = max(1, sum(1 for name in ranked if sens[name].only_quantized.sqnr_db < BROKEN_SQNR_DB))
    results: dict[int, Candidate] = {0: best}

    def trial(k: int) -> Candidate:
        if k not in results:
            layers = ranked[:k]
            (record,) = search.evaluate([(f"int8-{method}-float{k}", quantize_qdq(prep, exclude=layers),
                                          Recipe("int8", tuple(layers), method))])
            results[k] = record
            steps.append({"step": "fallback", "float_count": k, "float_layers": layers, "drop": record.drop, "meets": record.meets})
            say(f"  top {k} layers in float: drop {record.drop:+.2f} ({'meets' if record.meets else 'over'} the budget)")
        return results[k]

    low, high = 0, None          # low: largest count known to fail; high: smallest known to meet
    k = min(guess, n)
    while k <= n:
        if trial(k).meets:
            high = k
            break
        low = k
        if k == n:
            break
        k = min(2 * k, n)
    if high is None:
        limit = f"all {n} layers" if n == len(ranked) else f"the top {n} layers (max_float_layers)"
        steps.append({"step": "fallback", "result": f"even {limit} in float miss the budget"})
        return
    while high - low > 1:
        mid = (low + high) // 2
        if trial(mid).meets:
            high = mid
        else:
            low = mid
    steps.append({"step": "fallback", "result": f"{high} layer(s) in float is the fewest by rank that meets the budget"})


def refine_target(search: Search) -> Candidate:
    """The INT8 candidate to refine: the one meeting the budget with the fewest layers in float, else the closest."""
    int8 = [c for c in search.records.values() if c.recipe.kind == "int8"]
    meeting = [c for c in int8 if c.meets]
    if meeting:
        return min(meeting, key=lambda c: (len(c.recipe.float_layers), c.drop))
    return min(int8, key=lambda c: c.drop)


def refine_recipe(search: Search, preps: dict[str, Prepared], target: Candidate, calib: Dataset, feed: dict[str, np.ndarray],
           config: Int8Static, steps: list[dict], say) -> None:
    """Validate the recipe with the best output SQNR on calibration samples for the target's layers in float, unless
    it is the target's own: at most one evaluation."""
    learned = " and learned rounding" if config.weight_bits in ADAROUND_WEIGHT_BITS else ""
    say(f"refining {target.name}: calibration methods, equalization, bias correction{learned} scored on calibration samples")
    protos, scores = _score_recipes(preps, target, calib, feed, config)
    key = max(scores, key=scores.get)
    method, cle, bc, ada = key
    floats = target.recipe.float_layers
    name = (f"int8-{method}" + (f"-float{len(floats)}" if floats else "") + ("-cle" if cle else "") + ("-ada" if ada else "")
            + ("-bc" if bc else ""))
    ranking = ", ".join(f"{_recipe_label(*k)} {v:.1f} dB" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
    done = {"step": "refine", "target": target.name, "sqnr_db": {_recipe_label(*k): v for k, v in scores.items()}, "best": name}
    if name in search.records:
        done["result"] = f"{name} keeps the highest output SQNR on calibration samples ({ranking}): no evaluation spent"
    else:
        recipe = Recipe("int8", floats, method, repairs=tuple(_recipe_repairs(cle, bc, ada)))
        (record,) = search.evaluate([(name, protos[key], recipe)])
        done["result"] = (f"{name} has the highest output SQNR on calibration samples ({ranking}); validated: drop "
                          f"{record.drop:+.2f} vs {target.drop:+.2f} for {target.name}")
        say(f"  {name}: drop {record.drop:+.2f}")
    steps.append(done)


def _score_recipes(preps: dict[str, Prepared], target: Candidate, calib: Dataset, feed: dict[str, np.ndarray],
                   config: Int8Static) -> tuple[dict[tuple, Any], dict[tuple, float]]:
    """Every calibration method with and without cross-layer equalization, then bias correction on the best of
    those (a slow repair: once) and, at the weight widths where it pays (ADAROUND_WEIGHT_BITS), learned rounding
    with bias correction on it too; each with the target's layers in float. Keyed (method, equalize, bias
    correction, adaround)."""
    from edgeq.quantize import quantize

    floats = list(target.recipe.float_layers)
    model = preps[target.recipe.method].model
    reference = outputs_of(model.proto, feed)

    def build(method: str, cle: bool, bc: bool, ada: bool) -> Any:
        if not (cle or bc or ada):      # the stored ranges: the same model the search builds
            return quantize_qdq(preps[method], exclude=floats)
        recipe = dataclasses.replace(config, method=method, exclude_nodes=tuple(config.exclude_nodes) + tuple(floats),
                                     equalize=cle, bias_correction=bc, rounding="adaround" if ada else "nearest")
        return quantize(model, recipe, calib=calib).proto

    protos = {(m, cle, False, False): build(m, cle, False, False) for m in preps for cle in (False, True)}
    scores = {key: fidelity(reference, outputs_of(p, feed)).sqnr_db for key, p in protos.items()}
    method, cle, _, _ = max(scores, key=scores.get)
    for ada in (False, True) if config.weight_bits in ADAROUND_WEIGHT_BITS else (False,):
        key = (method, cle, True, ada)
        protos[key] = build(*key)
        scores[key] = fidelity(reference, outputs_of(protos[key], feed)).sqnr_db
    return protos, scores


def _recipe_repairs(cle: bool, bc: bool, ada: bool = False) -> list[str]:
    return [label for label, on in (("equalization", cle), ("adaround", ada), ("bias correction", bc)) if on]


def _recipe_label(method: str, cle: bool, bc: bool, ada: bool) -> str:
    return " + ".join([method] + _recipe_repairs(cle, bc, ada))


def _structure(candidate: Candidate) -> tuple:
    """Candidates with the same kind and layers in float run the same kernels."""
    return candidate.recipe.kind, tuple(sorted(candidate.recipe.float_layers))


def choose(meeting: list[Candidate]) -> Candidate:
    """The fastest candidate that meets the budget; among those with its structure, the most accurate (their
    latencies differ by measurement noise only)."""
    fastest = min(meeting, key=lambda c: c.p50_ms)
    same = [c for c in meeting if _structure(c) == _structure(fastest)]
    return min(same, key=lambda c: (c.drop, c.evaluation))

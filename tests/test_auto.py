"""`auto` on the honest test model (a trained residual digits CNN with outliers planted into two layers), the search,
the refinement, the executor and the Pareto front."""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.executors import InProcess
from edgeq.executors.local import LocalPool
from tests.conftest import make_candidate, make_conv_model
from edgeq.report.auto import pareto_front


@pytest.fixture(scope="session")
def planted():
    """Trained once per machine (seeded, so the same model every time) and kept in ~/.cache/edgeq."""
    pytest.importorskip("torch")
    from edgeq.testing.planted import cached_planted_model

    return cached_planted_model()


@pytest.mark.slow
def test_auto_meets_the_budget_keeping_90_percent_int8_and_names_the_broken_layers(planted, tmp_path):
    folder = planted.planted.parent
    val = edgeq.Dataset.from_npz(folder / "val.npz")
    # planting is function-preserving: the FP32 accuracy is the trained model's
    assert edgeq.validate(planted.planted, val).value == pytest.approx(edgeq.validate(planted.fp32, val).value, abs=0.2)
    out = tmp_path / "auto"
    proc = subprocess.run([sys.executable, "-m", "edgeq.cli", "auto", str(planted.planted), "--calib", str(folder / "calib.npz"),
                           "--val", str(folder / "val.npz"), "--budget", "1", "-o", str(out), "--workers", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    cands = {c["name"]: c for c in report["candidates"]}
    full = [c for c in report["candidates"] if c["kind"] == "int8" and not c["float_layers"]]
    assert min(c["drop"] for c in full) > 1.0, "the planted outliers must break plain INT8"
    assert report["verdict"]["status"] == "met"
    chosen = cands[report["chosen"]]
    assert chosen["meets"] and chosen["drop"] <= 1.0
    assert set(chosen["float_layers"]) <= set(planted.broken)
    assert (report["layers"] - len(chosen["float_layers"])) / report["layers"] >= 0.9
    assert report["layers"] == len(planted.quantizable) == 23
    assert set(planted.broken) <= set(report["verdict"]["broken_layers"])
    meeting = [c for c in report["candidates"] if c["meets"] and c["kind"] != "fp32"]
    fastest = min(meeting, key=lambda c: c["p50_ms"])
    assert chosen["p50_ms"] == fastest["p50_ms"] or chosen["float_layers"] == fastest["float_layers"]
    assert chosen["p50_ms"] < cands["fp32"]["p50_ms"], "32-channel convolutions: INT8 must beat FP32 on ONNX Runtime CPU"
    refine = next(s for s in report["search"] if s["step"] == "refine")
    assert refine["target"] == "int8-" + full[0]["method"] + f"-float{len(chosen['float_layers'])}"
    assert all(cands[n]["float_layers"] == chosen["float_layers"] for n in cands if n.endswith(("-cle", "-bc")))
    assert all(c.get("p50_ms") for c in report["candidates"])
    assert report["evaluations"] == len(report["candidates"]) <= 8
    html = (out / "report.html").read_text()
    assert f"Evaluations: <b>{report['evaluations']}</b>" in html
    assert all(name in html for name in planted.broken)
    assert (out / "model.onnx").is_file()
    for name in cands:
        assert (out / "candidates" / f"{name}.json").is_file() and (out / "candidates" / f"{name}.onnx").is_file()
    assert report["analysis"]["sensitivity"][0]["node"] in planted.broken
    assert {o["node"] for o in report["analysis"]["outliers"][:2]} == set(planted.broken)


def _square(x: int) -> int:
    return x * x


def test_executors_agree():
    tasks = list(range(7))
    with LocalPool(2) as pool:
        assert pool.map(_square, tasks) == InProcess().map(_square, tasks) == [t * t for t in tasks]


@pytest.mark.parametrize("needed,guess", [(5, 1), (1, 1), (3, 3), (30, 2), (2, 4)])
def test_fallback_search_finds_the_fewest_layers_in_few_evaluations(monkeypatch, needed, guess):
    """A stand-in evaluator: the budget holds once the top `needed` ranked layers are float."""
    search_mod = importlib.import_module("edgeq.auto.search")

    monkeypatch.setattr(search_mod, "quantize_qdq", lambda prep, exclude=(): list(exclude))
    ranked = [f"layer{i}" for i in range(30)]

    class Search:
        evaluations = 0

        def evaluate(self, cands):
            self.evaluations += 1
            (name, layers, recipe) = cands[0]
            meets = len(layers) >= needed
            return [make_candidate(name, drop=0.5 if meets else 3.0, meets=meets, float_layers=recipe.float_layers, method=recipe.method)]

    sens = [SimpleNamespace(node=n, only_quantized=SimpleNamespace(sqnr_db=5.0 if i < guess else 40.0)) for i, n in enumerate(ranked)]
    steps: list[dict] = []
    search = Search()
    best = make_candidate("int8-mse", method="mse", drop=3.0, meets=False)
    search_mod.fallback_search(search, None, best, ranked, SimpleNamespace(sensitivity=sens), steps, lambda *a: None)
    tried = {s["float_count"]: s["meets"] for s in steps if "float_count" in s}
    assert min(k for k, ok in tried.items() if ok) == needed
    assert tried.get(needed - 1, False) is False or needed == 1
    assert search.evaluations <= 2 * int(np.ceil(np.log2(30))) + 1


def test_pareto_front_known_answer():
    c = [dict(name="a", size_mb=1, p50_ms=1, metric_value=90), dict(name="b", size_mb=2, p50_ms=2, metric_value=89),
         dict(name="c", size_mb=0.5, p50_ms=3, metric_value=95), dict(name="d", size_mb=1, p50_ms=1, metric_value=90)]
    assert pareto_front(c) == ["a", "c", "d"]   # b is beaten by a on all three; a and d tie


def test_verdict_when_nothing_meets_the_budget_recommends_qat_or_fp16():
    from edgeq.auto.qat import qat_command
    from edgeq.auto.verdict import assemble_verdict

    analysis = SimpleNamespace(sensitivity=[], outliers=[])
    best = make_candidate("int8-mse", method="mse", drop=5.0, meets=False)
    fp32 = make_candidate("fp32", "fp32", drop=0.0, size_mb=4.0, p50_ms=2.0)
    fp16 = make_candidate("fp16", "fp16", drop=0.1, size_mb=2.0, p50_ms=1.6)
    search = SimpleNamespace(records={"fp32": fp32, "fp16": fp16}, evaluations=9)
    model = edgeq.Model(make_conv_model(), "models/net.onnx")
    hint = qat_command(model, "data/val set.npz", edgeq.Int8Static(per_channel=False), "out")
    assert "edgeq qat MODULE:FACTORY --weights WEIGHTS.pt --train TRAIN_DATA --val 'data/val set.npz' --per-tensor -o out/qat.onnx" in hint
    assert "net.onnx was exported from" in hint
    v = assemble_verdict(fp16, [fp16], search, 1.0, 35, analysis, best, ["even all 35 layers in float miss the budget"], hint)
    assert v["status"] == "fp16" and "no INT8 or mixed-precision model meets the budget" in v["summary"]
    assert hint in v["reasons"] and any("FP16: drop +0.10" in r for r in v["reasons"])
    assert "even all 35 layers in float miss the budget" in v["reasons"]
    assert v["reasons"][-1].startswith("9 evaluations")
    fp16_bad = dataclasses.replace(fp16, drop=2.0, meets=False)
    search.records["fp16"] = fp16_bad
    v = assemble_verdict(fp32, [], search, 1.0, 35, analysis, best, [], hint)
    assert v["status"] == "not-met" and any("misses the budget" in r for r in v["reasons"])


def test_choose_takes_the_fastest_structure_then_the_most_accurate_of_it():
    from edgeq.auto.search import choose

    def cand(name, floats, p50, drop, evaluation):
        return make_candidate(name, float_layers=floats, p50_ms=p50, drop=drop, evaluation=evaluation)

    plain, refined = cand("a-float1", ["x"], 5.0, 0.8, 3), cand("a-float1-bc", ["x"], 5.1, 0.2, 5)
    slower = cand("a-float2", ["x", "y"], 6.0, 0.0, 4)
    assert choose([plain, refined, slower]).name == "a-float1-bc"    # same kernels: 0.1 ms is noise
    assert choose([dataclasses.replace(plain, p50_ms=6.5), refined, slower]).name == "a-float1-bc"
    assert choose([plain, slower]).name == "a-float1"


def test_fallback_search_respects_max_float_layers(monkeypatch):
    search_mod = importlib.import_module("edgeq.auto.search")
    monkeypatch.setattr(search_mod, "quantize_qdq", lambda prep, exclude=(): list(exclude))
    ranked = [f"layer{i}" for i in range(30)]
    tried = []

    class Search:
        def evaluate(self, cands):
            (name, layers, recipe) = cands[0]
            tried.append(len(layers))
            return [make_candidate(name, drop=3.0, meets=len(layers) >= 5, float_layers=recipe.float_layers, method=recipe.method)]

    sens = [SimpleNamespace(node=n, only_quantized=SimpleNamespace(sqnr_db=5.0 if i == 0 else 40.0)) for i, n in enumerate(ranked)]
    best = make_candidate("int8-mse", method="mse", drop=3.0, meets=False)
    for limit, expected in ((3, [1, 2, 3]), (0, [])):
        tried.clear()
        steps: list[dict] = []
        search_mod.fallback_search(Search(), None, best, ranked, SimpleNamespace(sensitivity=sens),
                                   steps, lambda *a: None, max_float_layers=limit)
        assert tried == expected and "max_float_layers" in steps[-1]["result"]


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_refinement_tries_learned_rounding_where_it_pays(conv_model_path, conv_data, weight_bits):
    """Issue 16: AdaRound (with bias correction) is one of the refined recipes at W4A8, where bench/rounding.py
    measured it recovering what no other repair does; at W8A8 it is not tried (nothing to recover, minutes spent)."""
    from edgeq.analyze.sensitivity import eval_inputs
    from edgeq.auto.search import _score_recipes
    from edgeq.quantize.qdq import prepare_and_calibrate_each

    calib = edgeq.Dataset.from_npz(conv_data)
    config = edgeq.Int8Static(weight_bits=weight_bits, per_channel=False, batch_size=8, max_samples=64)
    preps = prepare_and_calibrate_each(edgeq.load(conv_model_path), calib, config, ("minmax", "mse"))
    feed = eval_inputs(next(iter(preps.values())), calib)
    protos, scores = _score_recipes(preps, make_candidate("int8-mse", method="mse"), calib, feed, config)
    learned = [key for key in scores if key[3]]
    assert len(learned) == (1 if weight_bits == 4 else 0)
    assert len(scores) == 4 + 1 + len(learned) and all(np.isfinite(v) for v in scores.values())
    if learned:
        (method, cle, bc, _), = learned
        assert bc and scores[learned[0]] > max(v for (m, c, b, a), v in scores.items() if not (b or a)) - 3.0
        weights = {i.name for i in protos[learned[0]].graph.initializer if i.data_type == onnx.TensorProto.INT4}
        assert weights, "the learned-rounding candidate keeps int4 weights"


def test_auto_on_a_model_with_a_fixed_batch_of_one(tmp_path):
    """A batch-1 export (fixed first dim): the fidelity scores ran the 128-sample feed in one run and `auto` crashed
    (`Got: 64 Expected: 1`); now every analysis feed runs in the model's batch."""
    model = tmp_path / "fixed.onnx"
    onnx.save(make_conv_model(batch=1), model)
    rng = np.random.default_rng(0)
    calib = edgeq.Dataset.from_arrays({"x": rng.normal(size=(48, 1, 8, 8)).astype(np.float32)})
    val = edgeq.Dataset.from_arrays({"x": rng.normal(size=(24, 1, 8, 8)).astype(np.float32)})
    report = edgeq.auto(model, calib, val, budget=1, output=tmp_path / "out", methods=("minmax",), refine=False,
                        bench_runs=3, bench_batch=1, executor=InProcess())
    int8 = [c for c in report["candidates"] if c["kind"] == "int8"]
    assert int8 and all(np.isfinite(c["drop"]) and c["p50_ms"] > 0 for c in int8)
    assert report["chosen"] in {c["name"] for c in report["candidates"]}

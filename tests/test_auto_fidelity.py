"""`auto` without labels measures fidelity to the FP32 model it was given; FP32 and FP16 are candidates like the
others, and the fastest candidate within the budget wins (issue 19, points 2 and 3)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import edgeq
import edgeq.cli
from edgeq.auto.search import choose
from edgeq.auto.verdict import assemble_verdict, metric_note
from tests.conftest import make_candidate


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """The digits model of tests/test_auto.py, with validation inputs and no labels."""
    pytest.importorskip("torch")
    from edgeq.testing.planted import cached_planted_model

    planted = cached_planted_model()
    folder = tmp_path_factory.mktemp("unlabelled")
    with np.load(planted.planted.parent / "val.npz", allow_pickle=False) as val:
        np.savez(folder / "val.npz", input=val["input"][:400])
    return SimpleNamespace(planted=planted, val=folder / "val.npz", calib=planted.planted.parent / "calib.npz", folder=folder)


@pytest.mark.slow
def test_auto_on_unlabelled_data_scores_fidelity_to_the_fp32_model(unlabelled, capsys):
    out = unlabelled.folder / "out"
    edgeq.cli.main(["auto", str(unlabelled.planted.planted), "--calib", str(unlabelled.calib), "--val", str(unlabelled.val),
                    "--budget", "1", "-o", str(out), "--workers", "1", "--max-float-layers", "2"])
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    cands = {c["name"]: c for c in report["candidates"]}
    assert report["metric"] == "top1_agreement"
    assert cands["fp32"]["metric_value"] == pytest.approx(100.0) and cands["fp32"]["drop"] == 0.0
    assert cands["fp32"]["evaluation"] == 1 and cands["fp16"]["evaluation"] == 2   # before calibration
    assert cands["fp16"]["metric_value"] >= 99.0 and cands["fp16"]["meets"]
    full = [c for c in report["candidates"] if c["kind"] == "int8" and not c["float_layers"]]
    assert full and all(c["drop"] == pytest.approx(100.0 - c["metric_value"]) for c in full)
    note = report["metric_note"]
    assert "top-1 agreement with the FP32 model" in note and "1% of the validation samples" in note
    assert "fidelity to the FP32 model" in " ".join(printed.split()) or "agreement with the FP32 model" in " ".join(printed.split())
    assert "--reference" not in printed
    chosen = cands[report["chosen"]]
    meeting = [c for c in report["candidates"] if c["meets"]]
    assert chosen["p50_ms"] == min(c["p50_ms"] for c in meeting) or chosen["kind"] == "int8"
    assert (out / "model.onnx").is_file() and "Metric: no labels" in (out / "report.html").read_text()


def cand(name: str, kind: str, p50: float, drop: float, evaluation: int, meets: bool = True):
    return make_candidate(name, kind, p50_ms=p50, drop=drop, evaluation=evaluation, meets=meets,
                          size_mb={"fp32": 4.0, "fp16": 2.0}.get(kind, 1.0))


def decide(records: list) -> tuple:
    search = SimpleNamespace(records={r.name: r for r in records}, evaluations=len(records))
    meeting = [r for r in records if r.meets]
    chosen = choose(meeting)
    best = make_candidate("int8-mse", method="mse", drop=0.4, meets=True)
    return chosen, assemble_verdict(chosen, meeting, search, 1.0, 23, SimpleNamespace(sensitivity=[], outliers=[]), best, [], None)


def test_fp32_wins_when_int8_is_slower_and_the_verdict_says_nothing_beats_it():
    chosen, v = decide([cand("fp32", "fp32", 1.0, 0.0, 1), cand("fp16", "fp16", 1.6, 0.1, 2), cand("int8-mse", "int8", 1.28, 0.4, 3)])
    assert chosen.name == "fp32" and v["status"] == "fp32"
    assert "nothing beats FP32" in v["summary"] and "int8-mse, runs at 0.78× FP32's speed (1.28 vs 1.00 ms p50)" in v["summary"]
    assert "FP32 is the chosen model" in v["summary"]
    assert any(r.startswith("fastest of the candidates that meet the budget: fp32 1.00 ms, int8-mse 1.28 ms, fp16 1.60 ms") for r in v["reasons"])


def test_fp16_wins_when_it_is_the_fastest_within_the_budget():
    chosen, v = decide([cand("fp32", "fp32", 1.0, 0.0, 1), cand("fp16", "fp16", 0.8, 0.1, 2), cand("int8-mse", "int8", 1.28, 0.4, 3)])
    assert chosen.name == "fp16" and v["status"] == "fp16"
    assert "fp16 is the fastest model within the budget" in v["summary"] and "1.25× FP32's speed" in v["summary"]
    assert "int8-mse meets the budget at 0.78× FP32's speed" in v["summary"]


def test_int8_wins_when_it_is_the_fastest_and_a_slower_fp16_is_reported():
    chosen, v = decide([cand("fp32", "fp32", 1.0, 0.0, 1), cand("fp16", "fp16", 1.6, 0.1, 2), cand("int8-mse", "int8", 0.5, 0.4, 3)])
    assert chosen.name == "int8-mse" and v["status"] == "met"
    assert any("(2.00× the speed)" in r for r in v["reasons"]) and any(r.startswith("FP16: drop +0.10 points") for r in v["reasons"])


def test_when_nothing_meets_fp32_is_written_and_the_fastest_miss_is_named():
    chosen, v = decide([cand("fp32", "fp32", 1.0, 0.0, 1), cand("fp16", "fp16", 1.6, 1.5, 2, meets=False),
                        cand("int8-mse", "int8", 0.5, 4.0, 3, meets=False)])
    assert chosen.name == "fp32" and v["status"] == "not-met"
    assert v["summary"].startswith("no INT8 or mixed-precision model meets the budget of 1 points; nothing beats FP32")
    assert "int8-mse, runs at 2.00× FP32's speed" in v["summary"]


@pytest.mark.parametrize("metric,value,words", [
    ("top1_agreement", 100.0, "lets 1.5% of the validation samples change their top class"),
    ("cosine", 1.0, "a budget of 1.5 points is 0.015 of cosine: a candidate meets it at ≥ 0.985"),
])
def test_the_metric_note_reads_the_budget_on_the_fidelity_metric(metric, value, words):
    note = metric_note({"metric": metric, "value": value, "output": "logits"}, 1.5, labelled=False)
    assert "fidelity to the FP32 model" in note or "agreement with the FP32 model" in note
    assert words in note and "(output logits)" in note
    assert metric_note({"metric": "top1", "value": 97.0}, 1.5, labelled=True) is None

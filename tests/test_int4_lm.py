"""INT4 on the docstring LM trained by edgeq.testing.lm: perplexity, fidelity to FP32, GPTQ, mixed INT4/INT8, CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.testing import lm
from edgeq.evaluate import compare, validate, window_nll

# Smaller than the bench's LM (lm.LMConfig()) so that the whole file stays within a minute on 2 cores.
TEST_LM = lm.LMConfig(d_model=64, heads=2, layers=2, d_ff=256, context=64, steps=120, batch=8, lr=5e-3,
                       corpus="modules")


@pytest.fixture(scope="session")
def docstring_lm(tmp_path_factory):
    """The trained LM (ONNX), held-out and calibration windows; trained once per test session."""
    return lm.build_lm(tmp_path_factory.mktemp("lm"), TEST_LM, calib_windows=48)


def _heldout(paths, n=96):
    with np.load(paths["heldout"]) as f:
        return edgeq.Dataset.from_arrays({"input_ids": f["input_ids"][:n]})


def test_text_split_is_disjoint_and_stable():
    train, held = lm.split_texts(corpus="modules")
    assert len(held) > 20_000 and len(train) > 5 * len(held)
    held_docs = set(held.decode().split("\n"))
    assert not held_docs & set(train.decode().split("\n"))
    assert lm.split_texts(corpus="modules") == (train, held)


def test_window_nll_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    logits, ids = rng.normal(size=(3, 5, 7)), rng.integers(0, 7, (3, 5))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    direct = -np.mean([[np.log(p[i, t, ids[i, t + 1]]) for t in range(4)] for i in range(3)], axis=1)
    np.testing.assert_allclose(window_nll(logits, ids), direct, rtol=1e-10)


@pytest.mark.slow
def test_lm_trains_exports_and_validates_with_perplexity(docstring_lm):
    model = edgeq.load(docstring_lm["model"])
    assert [s.name for s in model.inputs] == ["input_ids"] and model.outputs[0].shape[-1] == lm.VOCAB
    record = validate(model, _heldout(docstring_lm))
    assert record.metric == "perplexity" and record.samples == 96
    lo, hi = record.ci95
    assert lo <= record.value <= hi and hi - lo > 0
    assert 2 < record.value < 30  # learnt far more than the uniform 256
    assert record.metrics["nll"].value == pytest.approx(np.log(record.value))


@pytest.mark.slow
def test_int4_outputs_stay_close_to_fp32_and_data_aware_methods_help(docstring_lm):
    fp32 = edgeq.load(docstring_lm["model"])
    calib = edgeq.Dataset.from_npz(docstring_lm["calib"])
    val = _heldout(docstring_lm)
    base = validate(fp32, val)
    ids = np.load(docstring_lm["heldout"])["input_ids"][:8]
    ref = fp32.session().run(None, {"input_ids": ids})[0]
    results, mse = {}, {}
    configs = {"rtn": edgeq.Int4WeightOnly(block_size=32, algorithm="rtn"), "gptq": edgeq.Int4WeightOnly(block_size=32, algorithm="gptq"),
               "awq": edgeq.Int4WeightOnly(block_size=32, algorithm="awq"),
               "mixed": edgeq.Int4WeightOnly(block_size=32, algorithm="rtn", int8_auto=3),
               "int8": edgeq.Int4WeightOnly(block_size=32, algorithm="rtn", int8_auto=13)}
    for name, config in configs.items():
        q = edgeq.quantize(fp32, config, calib=calib)
        y = q.session().run(None, {"input_ids": ids})[0]
        cos = (y * ref).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() > 0.98, name
        assert np.abs(y - ref).max() < 0.25 * np.abs(ref).max(), name
        mse[name] = float(((y - ref) ** 2).mean())
        results[name] = compare(base, validate(q, val))
        assert q.summary.quantized == {"MatMulNBits": 2 * 6 + 1}
    for name, c in results.items():
        # relative perplexity increase in percent; this small test LM barely notices INT4 (bench/int4.py's LM does)
        assert c.metric == "perplexity" and -1 < c.drop < 15, (name, c.drop)
        assert c.drop_ci95[0] <= c.drop <= c.drop_ci95[1]
    assert mse["gptq"] < 0.5 * mse["rtn"]  # GPTQ: about 10x smaller logit error, measured
    assert mse["awq"] < 0.8 * mse["rtn"]  # AWQ: 20-45% smaller over several seeds, measured
    assert mse["int8"] < 0.1 * mse["rtn"] and mse["mixed"] < mse["rtn"]


@pytest.mark.slow
def test_int4_file_is_small_and_embeddings_can_be_quantized(docstring_lm, tmp_path):
    fp32 = edgeq.load(docstring_lm["model"])
    q = edgeq.quantize(fp32, edgeq.Int4WeightOnly(block_size=32, embeddings=True))
    assert q.summary.quantized.get("GatherBlockQuantized") == 1
    out = q.save(tmp_path / "q.onnx")
    assert out.stat().st_size < 0.3 * docstring_lm["model"].stat().st_size
    record = validate(out, _heldout(docstring_lm, 16))
    assert np.isfinite(record.value)


@pytest.mark.slow
def test_cli_quantize_validate_compare_perplexity(docstring_lm, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, a)], capture_output=True, text=True)  # noqa: E731
    held = tmp_path / "held.npz"
    np.savez(held, input_ids=np.load(docstring_lm["heldout"])["input_ids"][:32])
    q = tmp_path / "lm_int4.onnx"
    proc = run("quantize", docstring_lm["model"], "-o", q, "--precision", "int4", "--block-size", "64", "--algorithm", "gptq",
               "--calib", docstring_lm["calib"], "--int8-layers", "first-last")
    assert proc.returncode == 0, proc.stderr
    for model, out in ((docstring_lm["model"], tmp_path / "fp32.json"), (q, tmp_path / "q.json")):
        proc = run("validate", model, "--data", held, "-o", out)
        assert proc.returncode == 0, proc.stderr
        assert "perplexity" in proc.stdout
    record = json.loads((tmp_path / "q.json").read_text())
    assert record["metric"] == "perplexity" and len(record["per_sample"]["nll"]) == 32 and record["ci95"][0] <= record["value"]
    proc = run("compare", tmp_path / "fp32.json", tmp_path / "q.json", "--json", tmp_path / "c.json")
    assert proc.returncode == 0, proc.stderr
    comparison = json.loads((tmp_path / "c.json").read_text())
    assert comparison["metric"] == "perplexity" and "relative" in proc.stdout or "%" in proc.stdout
    graph = onnx.load(q).graph
    bits = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    assert sorted(bits).count(8) == 2 and len(bits) == 13

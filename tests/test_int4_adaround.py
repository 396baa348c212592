"""INT4 weight-only AdaRound: learned rounding on round-to-nearest's grid, through the API, ONNX Runtime and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import edgeq
from edgeq.errors import DataError
from edgeq.quantize.gptq import quantize_gptq
from edgeq.quantize.int4_adaround import quantize_adaround
from edgeq.quantize.packing import quantize_rtn
from edgeq.quantize.repair.adaround import AdaRoundSettings
from tests.test_int4 import _matmul_model

FAST = AdaRoundSettings(iterations=400)


def _activations(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Correlated inputs with a few strong channels, as a transformer's MatMuls see them."""
    return rng.normal(size=(rows, k)) @ rng.normal(size=(k, k)) * np.where(np.arange(k) < 4, 8.0, 1.0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32])
def test_adaround_keeps_rtn_grid_and_lowers_the_output_error(block, symmetric):
    rng = np.random.default_rng(block)
    x = _activations(rng, 1024, 64)
    w = rng.normal(0, 0.1, (64, 16)).astype(np.float32)
    rtn = quantize_rtn(w, block, symmetric=symmetric)
    ada = quantize_adaround(w, x.T @ x / len(x), len(x), block, symmetric=symmetric, settings=FAST)
    np.testing.assert_array_equal(ada.scales, rtn.scales)        # the same grid: only the rounding was learned
    np.testing.assert_array_equal(ada.zero_points, rtn.zero_points)
    assert ada.codes.min() >= 0 and ada.codes.max() <= 15 and ada.codes.shape == rtn.codes.shape
    steps = np.abs(ada.codes.astype(int) - rtn.codes.astype(int))
    assert steps.max() <= 1 and 0 < steps.mean() < 0.5              # floor or ceil: some weights rounded the other way
    e_rtn = np.linalg.norm(x @ (rtn.dequantize() - w))
    e_ada = np.linalg.norm(x @ (ada.dequantize() - w))
    e_gptq = np.linalg.norm(x @ (quantize_gptq(w, x.T @ x, block, symmetric=symmetric).dequantize() - w))
    # measured 3-9 % below RTN here; GPTQ, free to move codes further than one step, is far lower (why it stays the
    # data-aware default)
    assert e_gptq < e_ada < 0.98 * e_rtn, (e_gptq, e_ada, e_rtn)


def test_adaround_model_runs_and_beats_rtn_on_held_out_inputs():
    model = _matmul_model(64, 16, seed=3)
    rng = np.random.default_rng(7)
    mix = rng.normal(size=(64, 64)) * np.where(np.arange(64) < 4, 8.0, 1.0)
    calib, held_out = (rng.normal(size=(n, 4, 64)) @ mix for n in (64, 32))
    data = edgeq.Dataset.from_arrays({"x": calib.astype(np.float32)})
    results = {a: edgeq.quantize(model, edgeq.Int4WeightOnly(block_size=16, algorithm=a), calib=data) for a in ("rtn", "adaround")}
    assert results["adaround"].summary.mode == "adaround"
    assert results["adaround"].summary.calibration == {"method": "adaround", "samples": 64}
    assert {n.op_type for n in results["adaround"].proto.graph.node} == {"MatMulNBits"}
    x = held_out.astype(np.float32)
    reference = model.session().run(None, {"x": x})[0]
    error = {a: float(np.linalg.norm(r.session().run(None, {"x": x})[0] - reference)) for a, r in results.items()}
    assert error["adaround"] < 0.95 * error["rtn"], error


def test_adaround_needs_calibration_data():
    with pytest.raises(DataError, match="ADAROUND needs calibration data"):
        edgeq.quantize(_matmul_model(64, 8), edgeq.Int4WeightOnly(algorithm="adaround"))


def test_cli_rounding_adaround_selects_it_for_int4(tmp_path):
    src, calib, out = tmp_path / "mm.onnx", tmp_path / "calib.npz", tmp_path / "mm_int4.onnx"
    onnx.save(_matmul_model(64, 16).proto, src)
    np.savez(calib, x=np.random.default_rng(5).normal(size=(16, 4, 64)).astype(np.float32))
    cmd = [sys.executable, "-m", "edgeq.cli", "quantize", str(src), "-o", str(out), "--precision", "int4", "--block-size", "16",
           "--calib", str(calib), "--rounding", "adaround", "--summary-json", str(tmp_path / "s.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s.json").read_text())["mode"] == "adaround"
    clash = subprocess.run(cmd + ["--algorithm", "gptq", "--force"], capture_output=True, text=True)
    assert clash.returncode == 2 and len(clash.stderr.strip().splitlines()) == 1 and "two INT4 algorithms" in clash.stderr
    no_data = [c for c in cmd if c not in ("--calib", str(calib))] + ["--force"]
    missing = subprocess.run(no_data, capture_output=True, text=True)
    assert missing.returncode == 2 and "calib" in missing.stderr and "Traceback" not in missing.stderr

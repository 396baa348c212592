"""A real pretrained transformer text recogniser nobody here wrote: PP-OCRv4 rec (PPLCNetV3 backbone, SVTR mixing
blocks, CTC head over 6625 characters; opset 12, weights in Constant nodes, dynamic width), fed with text lines
rendered by Pillow. Static INT8 must keep the per-step CTC labels (argmax per time step, what greedy decoding reads)
of FP32 on ≥ 95 % of the steps at ≤ 0.35× the file size, and the summary must give the measured speed ratio."""
import subprocess
import sys

import numpy as np
import pytest

import edgeq
from edgeq.testing import zoo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    calib = folder / "calib.npz"
    np.savez(calib, x=zoo.render_text_lines(64, seed=0))
    val, texts = zoo.text_lines(96, seed=1)
    fp32 = edgeq.load(zoo.ppocr_rec_path())
    reference = zoo.ctc_steps(fp32.session(threads=2).run(None, {"x": val})[0])
    return {"fp32": fp32, "calib": calib, "val": val, "texts": texts, "reference": reference, "folder": folder}


def test_fp32_reads_the_rendered_lines(rec):
    """Sanity of the fixture: the real model reads what Pillow drew (so agreement is measured on real reading)."""
    decoded = zoo.ctc_decode(rec["reference"])
    assert np.mean([d.strip() == t for d, t in zip(decoded, rec["texts"])]) >= 0.9


def test_int8_static_keeps_the_ctc_steps_at_a_third_of_the_size(rec):
    """The default recipe (issue 12 item 5: plain mse kept 93.1 %): `--method auto` sees percentile's outputs clearly
    closer to FP32 and ships them."""
    q = edgeq.quantize(rec["fp32"], edgeq.Int8Static(), calib=edgeq.Dataset.from_npz(rec["calib"]))
    assert q.summary.calibration["chosen"] == "percentile"
    path = q.save(rec["folder"] / "rec_int8.onnx")
    steps = zoo.ctc_steps(q.session(threads=2).run(None, {"x": rec["val"]})[0])
    agreement = float(np.mean(steps == rec["reference"]))
    assert agreement >= 0.95, agreement
    assert path.stat().st_size <= 0.35 * zoo.ppocr_rec_path().stat().st_size
    assert q.summary.quantized == {"Conv": 38, "MatMul": 13}


def test_cli_summary_gives_the_measured_speed_ratio(rec):
    """Issue 12 item 4 on this family: `edgeq quantize` (coverage measured) states INT8's measured speed against FP32,
    and warns with the ratio when INT8 is the slower one. (Which convs stay float for speed depends on the machine,
    so the file size is not asserted here: on the 2-core box under load 37 of 51 nodes measured faster in float.)"""
    out = rec["folder"] / "cli_int8.onnx"
    proc = subprocess.run([sys.executable, "-m", "edgeq.cli", "quantize", str(zoo.ppocr_rec_path()), "-o", str(out),
                           "--calib", str(rec["calib"])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "× FP32 speed" in text or "the FP32 latency" in text, text
    if "slower than FP32" in text:
        assert "× the FP32 latency" in text, text
    assert out.stat().st_size < zoo.ppocr_rec_path().stat().st_size

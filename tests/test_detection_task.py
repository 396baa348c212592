"""Detection as a task: `validate --task detect` on a real YOLOv8n (nudenet) and `compare`'s box-F1 floor."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeq
from edgeq.decide import DecisionRule
from edgeq.evaluate import compare
from edgeq.evaluate.detection import Detections
from edgeq.evaluate.detect_validation import validate_detection
from edgeq.evaluate.tasks.detect import detect_columns, detect_metrics
from edgeq.evaluate.record import ValidationRecord

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def nudenet(tmp_path_factory) -> tuple[Path, Path, Path]:
    from edgeq.quantize.fp16 import convert_fp16

    folder = tmp_path_factory.mktemp("nudenet")
    fp32 = Path(importlib.util.find_spec("nudenet").submodule_search_locations[0]) / "320n.onnx"
    fp16, _ = convert_fp16(edgeq.load(fp32), edgeq.Fp16())
    fp16.save(folder / "fp16.onnx")
    images = np.random.default_rng(0).random((4, 3, 320, 320), dtype=np.float32)
    np.savez(folder / "images.npz", images=images)
    return fp32, folder / "fp16.onnx", folder / "images.npz"


@pytest.mark.slow
def test_validate_recognises_the_yolo_head_and_fp16_keeps_the_boxes(nudenet, tmp_path) -> None:
    fp32, fp16, images = nudenet
    done = _cli("validate", str(fp16), "--data", str(images), "--reference", str(fp32), "--score-threshold", "0.01",
                "-o", "fp16.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "fp16.json").read_text())
    assert record["metric"] == "box_f1" and record["value"] >= 0.95
    assert record["metrics"]["matched_iou"]["value"] > 0.95
    assert any("decoder yolo assumed" in w for w in record["warnings"])
    raw = _cli("validate", str(fp16), "--data", str(images), "--reference", str(fp32), "--task", "raw", "-o", "raw.json", cwd=tmp_path)
    assert raw.returncode == 0, raw.stderr
    assert "looks like a detector (yolo head)" in raw.stdout


@pytest.mark.slow
def test_detection_needs_labels_or_a_reference(nudenet, tmp_path) -> None:
    fp32, _, images = nudenet
    done = _cli("validate", str(fp32), "--data", str(images), "--task", "detect", "-o", "x.json", cwd=tmp_path)
    assert done.returncode == 2 and "pass --labels BOXES (.npz or COCO .json) or --reference FP32_MODEL" in done.stderr
    assert not (tmp_path / "x.json").exists()


def _record(found: list[Detections], reference: list[Detections]) -> ValidationRecord:
    cols = detect_columns(found, reference)
    metrics = detect_metrics(cols)
    return ValidationRecord("m.onnx", "d.npz", "out", "box_f1", len(found), metrics, {k: cols[k] for k in metrics},
                            "sha256:same", reference="fp32.onnx")


def test_compare_never_ships_a_detector_below_box_f1_0_9() -> None:
    ref = [Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.ones(2), np.zeros(2))] * 10
    base = _record(ref, ref)
    kept_one = [Detections(r.boxes[:1], r.scores[:1], r.classes[:1]) for r in ref[:3]] + ref[3:]
    cand = _record(kept_one, ref)
    assert cand.metrics["box_f1"].value == pytest.approx((7 + 3 * 2 / 3) / 10)  # three images keep 1 of 2 boxes
    lax = DecisionRule(ship_below=20, qat_up_to=30)
    assert compare(base, cand, lax).verdict == "ship"  # F1 0.9: at the floor, the user's thresholds decide
    worse = _record([Detections(r.boxes[:1], r.scores[:1], r.classes[:1]) for r in ref[:5]] + ref[5:], ref)
    result = compare(base, worse, lax)
    assert worse.metrics["box_f1"].value < 0.9
    assert result.verdict == "try-qat" and any("below 0.9" in r for r in result.reasons)


def test_labels_for_another_number_of_images_are_a_user_error(nudenet, tmp_path) -> None:
    fp32, _, images = nudenet  # 4 images
    np.savez(tmp_path / "boxes.npz", boxes=np.array([[1.0, 1, 9, 9]]), classes=np.array([0]), image=np.array([0]), images=np.int64(2))
    done = _cli("validate", str(fp32), "--data", str(images), "--labels", str(tmp_path / "boxes.npz"), "-o", "x.json", cwd=tmp_path)
    assert done.returncode == 2 and "the labels hold 2 images but the data 4" in done.stderr
    assert not (tmp_path / "x.json").exists()

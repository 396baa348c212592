"""Labelled detection: COCO mAP with a bootstrap over images, ground-truth files, and `validate --labels` + `compare`
on a real PP-PicoDet layout detector."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeq
from edgeq.errors import DataError
from edgeq.evaluate.detection import Detections, coco_map
from edgeq.evaluate.detection.labels import read_detection_labels
from edgeq.evaluate.detection.pooled import MapTable, pooled_map, resample_weights
from edgeq.demo import detection_data as dd

ROOT = Path(__file__).resolve().parents[1]


def _scene(rng: np.random.Generator, images: int, noise: float) -> tuple[list[Detections], list[Detections]]:
    """Ground truth and predictions that find most boxes (jittered), miss some and add false ones."""
    preds, truths = [], []
    for _ in range(images):
        k = int(rng.integers(0, 6))
        corner, size = rng.uniform(0, 300, (k, 2)), rng.uniform(10, 80, (k, 2))
        boxes, classes = np.concatenate([corner, corner + size], 1), rng.integers(0, 4, k)
        truths.append(Detections(boxes, np.ones(k), classes))
        found = rng.uniform(size=k) > 0.2
        extra = int(rng.integers(0, 3))
        false = rng.uniform(0, 300, (extra, 2))
        preds.append(Detections(np.concatenate([boxes[found] + rng.normal(0, noise, (found.sum(), 4)), np.concatenate([false, false + 30], 1)]),
                                rng.uniform(0, 1, found.sum() + extra), np.concatenate([classes[found], rng.integers(0, 4, extra)])))
    return preds, truths


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_weights_give_coco_map_and_a_resample_is_the_map_of_the_images_drawn(seed):
    preds, truths = _scene(np.random.default_rng(seed), 40, noise=4.0)
    table = MapTable.build(preds, truths)
    expected = coco_map(preds, truths)
    assert table.values(np.ones((1, 40)))[0] == pytest.approx([expected["map50"], expected["map50_95"]], abs=1e-12)
    weights = resample_weights(40, 3)
    for row in weights:
        drawn = [i for i, times in enumerate(row.astype(int)) for _ in range(times)]
        brute = coco_map([preds[i] for i in drawn], [truths[i] for i in drawn])
        assert table.values(row[None])[0] == pytest.approx([brute["map50"], brute["map50_95"]], abs=1e-12)


def test_the_interval_holds_the_value_and_narrows_with_more_images():
    small = pooled_map(*_scene(np.random.default_rng(3), 20, noise=3.0))
    large = pooled_map(*_scene(np.random.default_rng(3), 200, noise=3.0))
    for result in (small, large):
        for value, (lo, hi) in result.values():
            assert lo <= value <= hi
    width = lambda r: r["map50"][1][1] - r["map50"][1][0]  # noqa: E731
    assert width(large) < width(small)


def test_perfect_predictions_score_one_and_a_class_without_truth_counts_in_no_mean():
    _, truths = _scene(np.random.default_rng(4), 10, noise=0.0)
    perfect = [Detections(t.boxes, np.linspace(1, 0.5, len(t)), t.classes) for t in truths]
    stray = [Detections(np.concatenate([p.boxes, [[0, 0, 5, 5]]]), np.concatenate([p.scores, [0.1]]),
                        np.concatenate([p.classes, [9]])) for p in perfect]  # class 9 has no ground truth
    for preds in (perfect, stray):
        result = pooled_map(preds, truths)
        assert result["map50"][0] == pytest.approx(1.0) and result["map50_95"][0] == pytest.approx(1.0)


def _write_labels(folder: Path, per_image: list[Detections]) -> tuple[Path, Path]:
    boxes = np.concatenate([d.boxes for d in per_image]).astype(np.float32)
    classes = np.concatenate([d.classes for d in per_image])
    image = np.concatenate([np.full(len(d), i) for i, d in enumerate(per_image)]).astype(np.int64)
    npz = folder / "labels.npz"
    np.savez(npz, boxes=boxes, classes=classes, image=image, images=np.int64(len(per_image)))
    ids = [17, 3, 42, 8]  # COCO-style category ids; the class index is the position in sorted id order
    coco = {"images": [{"id": 100 + i, "file_name": f"{i}.png"} for i in range(len(per_image))],
            "categories": [{"id": c, "name": f"c{c}"} for c in ids],
            "annotations": [{"image_id": 100 + i, "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                             "category_id": sorted(ids)[int(c)]} for i, d in enumerate(per_image) for b, c in zip(d.boxes, d.classes)]}
    path = folder / "labels.json"
    path.write_text(json.dumps(coco))
    return npz, path


def test_npz_and_coco_json_labels_read_the_same_boxes(tmp_path):
    _, truths = _scene(np.random.default_rng(5), 6, noise=0.0)
    npz, coco = _write_labels(tmp_path, truths)
    for path in (npz, coco):
        got = read_detection_labels(path)
        assert len(got) == 6
        for g, t in zip(got, truths):
            np.testing.assert_allclose(g.boxes, t.boxes, atol=1e-3)
            assert g.classes.tolist() == t.classes.tolist()


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p / "l.npz", boxes=np.zeros((1, 4))), "lack classes, image, images"),
    (lambda p: np.savez(p / "l.npz", boxes=np.array([[5.0, 5, 1, 1]]), classes=[0], image=[0], images=np.int64(1)), "x2 < x1"),
    (lambda p: np.savez(p / "l.npz", boxes=np.zeros((1, 4)), classes=[0], image=[3], images=np.int64(2)), "belongs to image 3"),
    (lambda p: (p / "l.json").write_text('{"images": [{"id": 1}], "annotations": [{"image_id": 2, "bbox": [0, 0, 1, 1], "category_id": 0}]}'), "not COCO-style"),
    (lambda p: (p / "l.json").write_text("{broken"), "not COCO-style"),
])
def test_bad_label_files_are_user_errors(tmp_path, make, message):
    make(tmp_path)
    path = next(tmp_path.glob("l.*"))
    with pytest.raises(DataError, match=message):
        read_detection_labels(path)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_validate_with_labels_gives_map_and_compare_pairs_it_on_a_real_picodet(tmp_path):
    from edgeq.quantize.fp16 import convert_fp16

    pages = dd.write_set(tmp_path, "layout", 6, seed=1)
    fp32 = dd.layout_model_path()
    fp16, _ = convert_fp16(edgeq.load(fp32), edgeq.Fp16())
    fp16.save(tmp_path / "fp16.onnx")
    base = _cli("validate", str(fp32), "--data", str(pages.images), "--labels", str(pages.labels), "-o", "fp32.json", cwd=tmp_path)
    assert base.returncode == 0, base.stderr
    cand = _cli("validate", str(tmp_path / "fp16.onnx"), "--data", str(pages.images), "--labels", str(pages.labels),
                "--reference", str(fp32), "-o", "fp16.json", cwd=tmp_path)
    assert cand.returncode == 0, cand.stderr
    fp32_record, fp16_record = (json.loads((tmp_path / n).read_text()) for n in ("fp32.json", "fp16.json"))
    assert fp32_record["metric"] == "map50" and fp32_record["value"] > 0.6  # 0.82 on 12 such pages
    lo, hi = fp32_record["ci95"]
    assert lo <= fp32_record["value"] <= hi and hi - lo > 0
    assert {"map50", "map50_95"} <= set(fp32_record["metrics"]) and "box_f1" not in fp32_record["metrics"]
    assert fp16_record["metrics"]["box_f1"]["value"] > 0.95  # labels and reference together: mAP and agreement
    # agreement on the boxes a user keeps (score > 0.25), as without labels; mAP on every box down to 0.001
    alone = _cli("validate", str(tmp_path / "fp16.onnx"), "--data", str(pages.images), "--reference", str(fp32), "--task", "detect",
                 "-o", "alone.json", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    alone_record = json.loads((tmp_path / "alone.json").read_text())
    assert alone_record["metrics"]["box_f1"] == fp16_record["metrics"]["box_f1"]
    assert any("agreement with the reference on the boxes scoring above 0.25" in w for w in fp16_record["warnings"])
    assert any("labelled boxes of 6 images" in w for w in fp32_record["warnings"])
    done = _cli("compare", "fp32.json", "fp16.json", "--json", "cmp.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    comparison = json.loads((tmp_path / "cmp.json").read_text())
    assert comparison["metric"] == "map50" and abs(comparison["drop"]) < 1.0 and comparison["verdict"] == "ship"
    assert comparison["drop_ci95"][0] <= comparison["drop"] <= comparison["drop_ci95"][1]
    other = dd.write_set(tmp_path, "layout", 6, seed=2)  # other ground truth: the paired drop refuses
    _cli("validate", str(tmp_path / "fp16.onnx"), "--data", str(pages.images), "--labels", str(other.labels), "-o", "other.json", cwd=tmp_path)
    refused = _cli("compare", "fp32.json", "other.json", cwd=tmp_path)
    assert refused.returncode == 2 and "different ground-truth boxes" in refused.stderr


@pytest.mark.parametrize("seed", [6, 7])
def test_map_agrees_with_pycocotools(seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    preds, truths = _scene(np.random.default_rng(seed), 30, noise=5.0)
    xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]  # noqa: E731
    boxes = [(i, b, c) for i, t in enumerate(truths) for b, c in zip(t.boxes, t.classes)]
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in range(30)], "categories": [{"id": c} for c in range(4)],
                  "annotations": [{"id": k + 1, "image_id": i, "bbox": xywh(b), "category_id": int(c), "iscrowd": 0,
                                   "area": float((b[2] - b[0]) * (b[3] - b[1]))} for k, (i, b, c) in enumerate(boxes)]}
    gt.createIndex()
    found = [{"image_id": i, "bbox": xywh(b), "score": float(s), "category_id": int(c)}
             for i, p in enumerate(preds) for b, s, c in zip(p.boxes, p.scores, p.classes)]
    evaluation = COCOeval(gt, gt.loadRes(found), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    ours = pooled_map(preds, truths)
    assert ours["map50_95"][0] == pytest.approx(evaluation.stats[0], abs=1e-6)
    assert ours["map50"][0] == pytest.approx(evaluation.stats[1], abs=1e-6)

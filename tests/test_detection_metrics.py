"""Detection building blocks: mAP against a brute-force reference, NMS properties, decoders on synthetic heads."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeq.errors import ConfigError
from edgeq.evaluate.detection import DECODERS, Detections, agreement_counts, box_f1, coco_map, detect_layout, iou_matrix, \
    load_user_decoder, nms


def _brute_ap(scores: list[float], hits: list[bool], truths: int) -> float:
    """101-point interpolated AP straight from the definition: max precision at recall >= r."""
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    prec, rec, tp = [], [], 0
    for k, i in enumerate(order, 1):
        tp += hits[i]
        prec.append(tp / k)
        rec.append(tp / truths)
    points = [max([p for p, r in zip(prec, rec) if r >= t - 1e-12], default=0.0) for t in np.linspace(0, 1, 101)]
    return float(np.mean(points))


def test_map_on_a_hand_made_case_matches_the_definition() -> None:
    truth = [Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.ones(2), np.zeros(2))]
    pred = [Detections(np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 31]]), np.array([0.9, 0.8, 0.7]), np.zeros(3))]
    result = coco_map(pred, truth)
    expected = _brute_ap([0.9, 0.8, 0.7], [True, False, True], 2)
    assert result["map50"] == pytest.approx(expected) == pytest.approx((51 + 50 * 2 / 3) / 101)
    # the third box has IoU 100/110 = 0.909: a hit up to the 0.9 threshold, a miss at 0.95
    at_95 = _brute_ap([0.9, 0.8, 0.7], [True, False, False], 2)
    assert result["map50_95"] == pytest.approx((9 * expected + at_95) / 10)


def test_map_averages_classes_and_perfect_predictions_score_one() -> None:
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10]])
    truth = [Detections(boxes, np.ones(2), np.array([0, 1]))]
    assert coco_map([Detections(boxes, np.array([0.9, 0.8]), np.array([0, 1]))], truth) == {"map50": 1.0, "map50_95": 1.0}
    wrong_class = Detections(boxes, np.array([0.9, 0.8]), np.array([1, 0]))
    assert coco_map([wrong_class], truth)["map50"] == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 50), st.floats(0, 50), st.floats(1, 20), st.floats(1, 20), st.floats(0.01, 1),
                          st.integers(0, 2)), min_size=1, max_size=25), st.floats(0.1, 0.9))
def test_nms_keeps_no_same_class_overlap_and_the_best_box(rows, threshold) -> None:
    a = np.array(rows, np.float64)
    boxes = np.stack([a[:, 0], a[:, 1], a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]], axis=1)
    kept = nms(boxes, a[:, 4], a[:, 5], threshold)
    assert int(np.argmax(a[:, 4])) in kept.tolist() or a[kept[0], 4] == a[:, 4].max()
    iou = iou_matrix(boxes[kept], boxes[kept])
    same = a[kept, 5][:, None] == a[kept, 5][None, :]
    assert not (np.triu(iou > threshold, 1) & same).any()
    assert len(set(kept.tolist())) == len(kept)
    assert (np.diff(a[kept, 4]) <= 0).all()


KNOWN = np.array([[10, 20, 50, 60], [100, 40, 140, 120]], np.float32)  # xyxy in a 160 x 160 input
CLASSES = np.array([1, 3])


def _yolo_head(transposed: bool, objectness: bool) -> dict[str, np.ndarray]:
    anchors, classes = 50, 4
    head = np.zeros((1, anchors, 4 + objectness + classes), np.float32)
    head[0, :, :4] = [80, 80, 4, 4]
    for i, (box, c) in enumerate(zip(KNOWN, CLASSES)):
        head[0, 7 + i, :4] = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]]
        head[0, 7 + i, 4 + objectness + c] = 0.9 - 0.1 * i
        if objectness:
            head[0, 7 + i, 4] = 1.0
    return {"out": head if transposed else head.transpose(0, 2, 1)}


def _check(found: list[Detections]) -> None:
    assert len(found) == 1
    order = np.argsort(-found[0].scores)
    np.testing.assert_allclose(found[0].boxes[order], KNOWN, atol=1e-3)
    assert found[0].classes[order].tolist() == CLASSES.tolist()


@pytest.mark.parametrize("transposed", [False, True])
def test_yolo_decoder_gets_known_boxes_back(transposed: bool) -> None:
    _check(DECODERS["yolo"](_yolo_head(transposed, objectness=False), (160, 160), 0.25, 0.45, 300))


def test_yolov5_decoder_multiplies_objectness() -> None:
    _check(DECODERS["yolov5"](_yolo_head(True, objectness=True), (160, 160), 0.25, 0.45, 300))


def test_ssd_decoder_reads_relative_boxes() -> None:
    boxes = np.zeros((1, 30, 4), np.float32)
    scores = np.zeros((1, 30, 4), np.float32)
    boxes[0, 3:5] = KNOWN / 160
    scores[0, 3, CLASSES[0]], scores[0, 4, CLASSES[1]] = 0.9, 0.8
    _check(DECODERS["ssd"]({"boxes": boxes, "scores": scores}, (160, 160), 0.25, 0.5, 300))


def _dfl(distances_in_strides: np.ndarray, bins: int) -> np.ndarray:
    """Logits whose softmax expectation is the given distance: mass split between the two neighbouring bins."""
    logits = np.full((4, bins), -30.0)
    for side, d in enumerate(distances_in_strides):
        lo = int(np.floor(d))
        frac = d - lo
        logits[side, lo] = np.log(max(1 - frac, 1e-12))
        if lo + 1 < bins:
            logits[side, lo + 1] = np.log(max(frac, 1e-12))
    return logits.reshape(-1)


def test_picodet_decoder_gets_known_boxes_back() -> None:
    h, w, bins, classes = 160, 128, 8, 5
    outputs = {}
    for level, stride in enumerate((8, 16, 32, 64)):
        gh, gw = -(-h // stride), -(-w // stride)
        outputs[f"score{level}"] = np.zeros((1, gh * gw, classes), np.float32)
        outputs[f"box{level}"] = np.full((1, gh * gw, 4 * bins), -30.0, np.float32)
    stride, cell = 16, (3, 2)  # row 3, column 2 at stride 16: centre (40, 56)
    cx, cy = (cell[1] + 0.5) * stride, (cell[0] + 0.5) * stride
    box = np.array([cx - 24, cy - 20, cx + 40, cy + 8])
    anchor = cell[0] * (-(-w // stride)) + cell[1]
    outputs["box1"][0, anchor] = _dfl(np.array([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / stride, bins)
    outputs["score1"][0, anchor, 2] = 0.8
    assert detect_layout({k: v.shape for k, v in outputs.items()}) == "picodet"
    found = DECODERS["picodet"](outputs, (h, w), 0.25, 0.5, 300)
    np.testing.assert_allclose(found[0].boxes, box[None], atol=1e-3)
    assert found[0].classes.tolist() == [2]


def test_detect_layout_by_shape() -> None:
    assert detect_layout({"output0": (None, 22, None)}) == "yolo"
    assert detect_layout({"output": (1, 25200, 85)}) == "yolov5"
    assert detect_layout({"boxes": (1, 300, 4), "scores": (1, 300, 21)}) == "ssd"
    assert detect_layout({"logits": (1, 1000)}) is None


def test_agreement_counts_and_pooled_f1() -> None:
    ref = Detections(KNOWN, np.array([0.9, 0.8]), CLASSES)
    half = Detections(KNOWN[:1], np.array([0.9]), CLASSES[:1])
    counts = agreement_counts(half, ref)
    assert counts == {"matched": 1.0, "predicted": 1.0, "reference": 2.0, "matched_iou": 1.0}
    assert float(box_f1(np.array([1.0]), np.array([1.0]), np.array([2.0]))) == pytest.approx(2 / 3)


def test_user_decoder_hook(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_decoder.py").write_text(
        "import numpy as np\nfrom edgeq.evaluate.detection import Detections\n"
        "def good(outputs, hw, s, i, m):\n    return [Detections.empty() for _ in next(iter(outputs.values()))]\n"
        "def bad(outputs, hw, s, i, m):\n    return 'boxes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = {"y": np.zeros((2, 3))}
    assert [len(d) for d in load_user_decoder("my_decoder:good")(out, (8, 8), 0.25, 0.45, 10)] == [0, 0]
    with pytest.raises(ConfigError, match="not a list of 2 Detections"):
        load_user_decoder("my_decoder:bad")(out, (8, 8), 0.25, 0.45, 10)
    with pytest.raises(ConfigError, match="cannot import the decoder module"):
        load_user_decoder("no_such_module_here:f")
    with pytest.raises(ConfigError, match="neither a built-in decoder nor module:function"):
        load_user_decoder("yolo8")

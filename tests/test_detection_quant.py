"""Static INT8 on real detectors: the head is found without node names and the YOLO keeps its boxes by default."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import edgeq
from edgeq.model import load
from edgeq.quantize.detection_head import find_head
from edgeq.quantize.prepare import prepare
from edgeq.demo import detection_data as dd


def _session(proto_or_path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    model = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def _yolo_boxes(output: np.ndarray, score: float = 0.25, iou: float = 0.45) -> list[tuple[np.ndarray, np.ndarray]]:
    """(N, 4+C, anchors) cx, cy, w, h + class scores → per image (x1y1x2y2 boxes, classes) after per-class NMS."""
    found = []
    for rows in output.transpose(0, 2, 1):
        scores, classes = rows[:, 4:].max(1), rows[:, 4:].argmax(1)
        keep = scores >= score
        xywh, scores, classes = rows[keep, :4], scores[keep], classes[keep]
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        chosen = []
        for c in np.unique(classes):
            order = [i for i in np.argsort(-scores) if classes[i] == c]
            while order:
                chosen.append(order[0])
                order = [i for i in order[1:] if _iou(boxes[[order[0]]], boxes[[i]])[0, 0] <= iou]
        found.append((boxes[chosen], classes[chosen]))
    return found


def _box_f1(reference: list, got: list, iou: float = 0.5) -> float:
    matched = total_ref = total_got = 0
    for (rb, rc), (gb, gc) in zip(reference, got):
        total_ref, total_got = total_ref + len(rb), total_got + len(gb)
        if len(rb) and len(gb):
            overlap = _iou(gb, rb) * (gc[:, None] == rc[None])
            used: set[int] = set()
            for i in range(len(gb)):
                j = int(np.argmax([-1 if k in used else v for k, v in enumerate(overlap[i])]))
                if overlap[i, j] >= iou and j not in used:
                    used.add(j)
                    matched += 1
    return 2 * matched / max(total_ref + total_got, 1)


def test_no_head_on_a_classifier():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv"), helper.make_node("Flatten", ["y"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"])]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], [0.1] * 6)])
    assert find_head(helper.make_model(graph)) is None


@pytest.mark.slow
def test_head_found_on_yolov8_and_picodet():
    yolo = find_head(prepare(load(dd.nudenet_model_path()), per_channel=True)[0].proto)
    assert yolo.layout == "single" and yolo.outputs == ["output0"]
    assert len(yolo.last_layers) == 6 and set(yolo.last_layers.values()) == {"separate"}  # box and class branches, 3 levels
    assert {"Softmax", "Sigmoid", "Concat"} <= {n.split("/")[-1].split("_")[0] for n in yolo.decode_nodes}
    pico = find_head(prepare(load(dd.layout_model_path()), per_channel=True)[0].proto)
    assert pico.layout == "per-level" and len(pico.outputs) == 8
    assert set(pico.last_layers.values()) == {"shared"} and len(pico.shared_layers) == 4  # one conv per level, split
    assert set(pico.shared_layers) <= set(pico.float_nodes)


@pytest.mark.slow
def test_default_static_int8_keeps_yolo_boxes(tmp_path):
    calib, held = dd.write_set(tmp_path, "people", 32, seed=0), dd.write_set(tmp_path, "people", 16, seed=1)
    images = np.load(held.images)["images"]
    quantized = edgeq.quantize(dd.nudenet_model_path(), edgeq.Int8Static(), calib=edgeq.Dataset.from_npz(calib.images))
    unprotected = edgeq.quantize(dd.nudenet_model_path(), edgeq.Int8Static(detection_head="off", op_types=quantized_op_types()),
                                 calib=edgeq.Dataset.from_npz(calib.images))
    reference = _yolo_boxes(_session(dd.nudenet_model_path()).run(None, {"images": images})[0])
    assert sum(len(b) for b, _ in reference) >= 24  # a few faces per canvas
    got = _yolo_boxes(_session(quantized.proto).run(None, {"images": images})[0])
    lost = _yolo_boxes(_session(unprotected.proto).run(None, {"images": images})[0])
    assert _box_f1(reference, got) >= 0.95
    assert _box_f1(reference, lost) < _box_f1(reference, got)
    assert any(note.startswith("detector head recognised (single layout") for note in quantized.summary.notes)


def quantized_op_types() -> tuple[str, ...]:
    from edgeq.quantize.config import STATIC_OP_TYPES
    from edgeq.quantize.detection_head import DETECTOR_BACKBONE_OPS

    return STATIC_OP_TYPES + DETECTOR_BACKBONE_OPS


@pytest.mark.slow
def test_picodet_summary_names_the_shared_head_convolutions(tmp_path):
    calib = dd.write_set(tmp_path, "layout", 2, seed=0)
    quantized = edgeq.quantize(dd.layout_model_path(), edgeq.Int8Static(), calib=edgeq.Dataset.from_npz(calib.images))
    head = [e for e in quantized.summary.left_float if e["reason"].startswith("detection head")]
    assert len(head) == 4 and all("coordinates and class scores" in e["reason"] for e in head)
    assert "last convolutions whose one output holds both" in quantized.summary.notes[-1]

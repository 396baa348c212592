"""`auto` on a real detector (YOLOv8n from the nudenet wheel): judged on its boxes after decoding and NMS, with the
head kept float in every candidate as `quantize` keeps it, and latency timed at the validation images' size."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgeq
from edgeq.errors import ConfigError
from edgeq.executors import InProcess
from edgeq.demo import detection_data as dd


@pytest.mark.slow
def test_auto_on_a_yolo_meets_a_box_f1_budget_with_the_head_float(tmp_path):
    calib, val = dd.write_set(tmp_path, "people", 8, seed=0), dd.write_set(tmp_path, "people", 12, seed=1)
    report = edgeq.auto(dd.nudenet_model_path(), edgeq.Dataset.from_npz(calib.images), edgeq.Dataset.from_npz(val.images),
                        budget=5, output=tmp_path / "out", methods=("mse",), refine=False, bench_runs=3, bench_batch=1,
                        executor=InProcess())
    assert report["metric"] == "box_f1" and "F1 ≥ 0.95" in report["metric_note"]
    assert report["verdict"]["status"] == "met"
    candidates = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "candidates").glob("*.json")}
    assert set(candidates) >= {"fp32", "fp16", "int8-mse"}
    for c in candidates.values():
        assert c["metric"] == "box_f1" and c["meets"] == (c["drop"] <= 5)
    winners = [c for c in candidates.values() if c["meets"] and c["kind"] == "int8"]
    assert winners and all(c["metric_value"] >= 0.95 for c in winners)
    assert candidates[report["chosen"]]["meets"]
    int8 = onnx.load(tmp_path / "out" / "candidates" / "int8-mse.onnx")
    producers = {o: n.op_type for n in int8.graph.node for o in n.output}
    dfl = next(n for n in int8.graph.node if n.name == "/model.22/dfl/Softmax")
    assert producers[dfl.input[0]] != "DequantizeLinear"  # the DFL decoding of the head stays float, as in `quantize`
    assert candidates["int8-mse"]["p50_ms"] < candidates["fp32"]["p50_ms"]  # timed at 320x320, the images' size


def test_auto_refuses_detection_labels_for_a_model_that_is_no_detector(tmp_path):
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Softmax", ["f"], ["p"])]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "cls.onnx")
    data = edgeq.Dataset.from_arrays({"x": np.zeros((4, 4), np.float32)}, labels=np.arange(4))
    np.savez(tmp_path / "boxes.npz", boxes=np.zeros((0, 4)), classes=np.zeros(0, np.int64), image=np.zeros(0, np.int64), images=np.int64(4))
    with pytest.raises(ConfigError, match="match no detector head"):
        edgeq.auto(tmp_path / "cls.onnx", data, data, output=tmp_path / "out", labels=tmp_path / "boxes.npz")
    assert not (tmp_path / "out").exists()

"""`validate` for detectors: decode both models' raw outputs the same way and measure box agreement with the reference."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgeq.data import Dataset, open_data
from edgeq.errors import ConfigError, UserError
from edgeq.evaluate.detection import DEFAULT_IOU, detect_layout, resolve_decoder
from edgeq.evaluate.detection.decoders import DEFAULT_MAX_DETECTIONS, DEFAULT_SCORE
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.tasks.detect import detect_columns, detect_metrics
from edgeq.evaluate.validation import _fingerprinted, _load, _Reference, _run, _runs, follow_layout, layout_notes
from edgeq.model import Model


def validate_detection(model: Path | str | Model, data: Dataset | Path | str, reference: Path | str | Model | None,
                       decoder: str | None = None, score_threshold: float = DEFAULT_SCORE, iou: float | None = None,
                       batch_size: int = 8, max_detections: int = DEFAULT_MAX_DETECTIONS) -> ValidationRecord:
    """Box precision / recall / F1 at IoU 0.5 and mean matched IoU against `reference`, after decoding (`decoder`:
    a built-in name, `module:function`, or None to recognise the head by its output shapes), score threshold and NMS.

    >>> validate_detection("320n_fp16.onnx", "images.npz", reference="320n.onnx").metrics["box_f1"]  # doctest: +SKIP
    Estimate(value=0.998, ci95=(0.994, 1.0))
    """
    if reference is None:
        raise UserError("--task detect measures boxes against a reference model", "pass --reference FP32_MODEL")
    data = open_data(data) if isinstance(data, (str, Path)) else data
    subject, label = _load(model)
    names = [o.name for o in subject.outputs]
    notes = []
    if decoder is None:
        decoder = detect_layout({o.name: o.shape for o in subject.outputs})
        if decoder is None:
            raise ConfigError("the model's outputs match no built-in detector head (yolo, yolov5, ssd, picodet)",
                              "name one with --decoder NAME or your own with --decoder module:function")
        notes.append(f"task detect: decoder {decoder} assumed from the output shapes (pass --decoder to choose)")
    decode = resolve_decoder(decoder)
    iou = DEFAULT_IOU.get(decoder, 0.5) if iou is None else iou
    notes.append(f"boxes after score threshold {score_threshold:g}, NMS IoU {iou:g}, at most {max_detections} per image; "
                 "matched at IoU 0.5 within a class")
    ref = _Reference.open(reference)
    follow_layout(subject, data, ref.model)
    ref.match(subject, names)
    digest = hashlib.sha256()
    stream = _fingerprinted(data, digest)
    session = subject.session()
    image_input = next((s for s in subject.inputs if s.rank == 4), subject.inputs[0])
    parts: dict[str, list[np.ndarray]] = {}
    for batch in _runs(stream, subject, batch_size):
        hw = tuple(int(d) for d in batch.inputs[image_input.name].shape[2:4])
        ys = _run(session, names, batch, label, data.description)
        rs = ref.run(batch, data.description)
        cols = detect_columns(decode(ys, hw, score_threshold, iou, max_detections),
                              decode(rs, hw, score_threshold, iou, max_detections))
        for k, v in cols.items():
            parts.setdefault(k, []).append(v)
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    metrics = detect_metrics(cols)
    return ValidationRecord(label, data.description, names[0], "box_f1", len(cols["box_f1"]), metrics,
                            {k: cols[k] for k in metrics}, "sha256:" + digest.hexdigest(), None, ref.label, {},
                            [*data.notes, *stream.notes, *notes, *layout_notes(subject, ref)])


def detector_head(model: Path | str | Model) -> str | None:
    """The built-in decoder a model's outputs look like (None when it is not recognisably a detector)."""
    subject, _ = _load(model)
    return detect_layout({o.name: o.shape for o in subject.outputs})


def raw_tensor_warning(head: str) -> str:
    return (f"this model looks like a detector ({head} head): these are raw-tensor metrics, not the boxes after NMS; "
            "--task detect measures what ships")

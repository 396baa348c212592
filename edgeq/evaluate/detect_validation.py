"""`validate` for detectors: decode both models' raw outputs the same way and measure box agreement with the reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.data import Dataset, open_data
from edgeq.errors import ConfigError, DataError, UserError
from edgeq.evaluate.detection import DEFAULT_IOU, Detections, detect_layout, resolve_decoder
from edgeq.evaluate.detection.decoders import DEFAULT_MAX_DETECTIONS, DEFAULT_SCORE, MAP_SCORE
from edgeq.evaluate.detection.labels import read_detection_labels
from edgeq.evaluate.detection.pooled import detections_record, pooled_map
from edgeq.evaluate.record import ValidationRecord
from edgeq.evaluate.stats import Estimate, contain
from edgeq.evaluate.tasks.detect import detect_columns, detect_metrics
from edgeq.evaluate.fingerprint import Fingerprint
from edgeq.evaluate.validation import _fingerprinted, _load, _Reference, _run, _runs, follow_layout, layout_notes
from edgeq.model import Model


def validate_detection(model: Path | str | Model, data: Dataset | Path | str, reference: Path | str | Model | None = None,
                       decoder: str | None = None, score_threshold: float | None = None, iou: float | None = None,
                       batch_size: int = 8, max_detections: int = DEFAULT_MAX_DETECTIONS,
                       labels: Path | str | None = None) -> ValidationRecord:
    """Boxes after decoding (`decoder`: a built-in name, `module:function`, or None to recognise the head by its output
    shapes), score threshold and NMS, judged on ground truth (`labels`: mAP@0.5 and mAP@0.5:0.95 the COCO way, with
    bootstrap intervals over images) and/or against `reference` (box precision / recall / F1 at IoU 0.5, mean IoU).

    >>> validate_detection("320n_fp16.onnx", "images.npz", reference="320n.onnx").metrics["box_f1"]  # doctest: +SKIP
    Estimate(value=0.998, ci95=(0.994, 1.0))
    """
    if reference is None and labels is None:
        raise UserError("--task detect measures boxes against ground truth or a reference model",
                        "pass --labels BOXES (.npz or COCO .json) or --reference FP32_MODEL")
    truths = read_detection_labels(labels) if labels is not None else None
    # mAP integrates over every score; agreement compares the boxes a user keeps (with both, each at its own default)
    agreement_threshold = DEFAULT_SCORE if score_threshold is None else score_threshold
    if score_threshold is None:
        score_threshold = MAP_SCORE if truths is not None else DEFAULT_SCORE
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
    if reference is not None and agreement_threshold != score_threshold:
        notes.append(f"agreement with the reference on the boxes scoring above {agreement_threshold:g} (mAP uses them all)")
    ref = _Reference.open(reference) if reference is not None else None
    follow_layout(subject, data, None if ref is None else ref.model)
    if ref is not None:
        ref.match(subject, names)
    fingerprint = Fingerprint()
    stream = _fingerprinted(data, fingerprint, subject.inputs)
    session = subject.session()
    image_input = next((s for s in subject.inputs if s.rank == 4), subject.inputs[0])
    found: list[Detections] = []
    referenced: list[Detections] = []
    for batch in _runs(stream, subject, batch_size):
        hw = tuple(int(d) for d in batch.inputs[image_input.name].shape[2:4])
        found += decode(_run(session, names, batch, label, data.description), hw, score_threshold, iou, max_detections)
        if ref is not None:
            referenced += decode(ref.run(batch, data.description), hw, score_threshold, iou, max_detections)
    metrics, per_sample = {}, {}
    if truths is not None:
        if len(truths) != len(found):
            raise DataError(f"the labels hold {len(truths)} images but the data {len(found)}",
                            "give one labels entry per image, in the data's order")
        metrics = {name: contain(Estimate(v, ci)) for name, (v, ci) in pooled_map(found, truths).items()}
        per_sample["boxes"] = np.array([len(d) for d in found], np.float64)
        notes.append(f"mAP on {sum(len(t) for t in truths)} labelled boxes of {len(truths)} images ({labels})")
    if ref is not None:
        cols = detect_columns([d.above(agreement_threshold) for d in found], [d.above(agreement_threshold) for d in referenced])
        agreement = detect_metrics(cols)
        metrics.update(agreement)
        per_sample.update({k: cols[k] for k in agreement})
    primary = "map50" if truths is not None else "box_f1"
    detections = detections_record(found, truths) if truths is not None else None
    return ValidationRecord(label, data.description, names[0], primary, len(found), metrics, per_sample,
                            "sha256:" + fingerprint.hexdigest(), None, None if ref is None else ref.label, {},
                            [*data.notes, *stream.notes, *notes, *layout_notes(subject, ref)], detections=detections)


def detector_head(model: Path | str | Model) -> str | None:
    """The built-in decoder a model's outputs look like (None when it is not recognisably a detector)."""
    subject, _ = _load(model)
    return detect_layout({o.name: o.shape for o in subject.outputs})


def raw_tensor_warning(head: str) -> str:
    return (f"this model looks like a detector ({head} head): these are raw-tensor metrics, not the boxes after NMS; "
            "--task detect measures what ships")

"""Decoders: a detector's raw outputs to `Detections` per image, for the common export layouts.

Every decoder is `decode(outputs, input_hw, score_threshold, iou_threshold, max_detections) -> list[Detections]`,
one per image, boxes xyxy in input pixels:

- `yolo`: YOLOv8/v11, `(N, 4+C, A)` or `(N, A, 4+C)`: cx, cy, w, h in input pixels, then C class scores (sigmoid).
- `yolov5`: `(N, A, 5+C)`: cx, cy, w, h, objectness, C class scores; score = objectness x class score.
- `ssd`: boxes `(N, A, 4)` xyxy (in [0, 1] relative to the input, or in pixels) and scores `(N, A, C)`.
- `picodet`: PP-PicoDet / NanoDet: per level a score map `(N, A_l, C)` and a DFL map `(N, A_l, 4 (reg_max+1))`
  (left, top, right, bottom distances as softmax bins, in strides), grid ceil(H/s) x ceil(W/s) with centres at
  (i + 0.5) s; the stride of a level follows from its anchor count.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import numpy as np

from edgeq.errors import ConfigError
from edgeq.evaluate.detection.boxes import Detections, select

Decoder = Callable[..., list[Detections]]
# NMS IoU defaults: YOLOv5's 0.45 for the YOLO heads, rapid_layout's/PaddleDetection's 0.5 for PicoDet, 0.5 for SSD.
DEFAULT_IOU = {"yolo": 0.45, "yolov5": 0.45, "ssd": 0.5, "picodet": 0.5}
DEFAULT_SCORE = 0.25
MAP_SCORE = 0.001  # mAP integrates the whole precision-recall curve: Ultralytics' and COCO's evaluation threshold
DEFAULT_MAX_DETECTIONS = 300
_MAX_CLASSES = 1000


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    half = b[..., 2:4] / 2
    return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


def _per_anchor(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float,
                max_detections: int, multi_label: bool = False) -> list[Detections]:
    """Boxes (N, A, 4) xyxy and scores (N, A, C): threshold and class-aware NMS per image."""
    return [select(b, s, score_threshold, iou_threshold, max_detections, multi_label=multi_label)
            for b, s in zip(boxes, scores)]


def _single(outputs: dict[str, np.ndarray], rank: int, name: str) -> np.ndarray:
    arrays = [a for a in outputs.values() if a.ndim == rank]
    if not arrays:
        raise ConfigError(f"the {name} decoder needs a rank-{rank} output; the model gives "
                          f"{', '.join(f'{k} {v.shape}' for k, v in outputs.items())}", "choose another --decoder")
    return np.asarray(arrays[0], np.float32)


def decode_yolo(outputs: dict[str, np.ndarray], input_hw: tuple[int, int], score_threshold: float = DEFAULT_SCORE,
                iou_threshold: float = DEFAULT_IOU["yolo"], max_detections: int = DEFAULT_MAX_DETECTIONS) -> list[Detections]:
    head = _single(outputs, 3, "yolo")
    if head.shape[1] < head.shape[2]:  # (N, 4+C, A) → (N, A, 4+C)
        head = head.transpose(0, 2, 1)
    return _per_anchor(_xywh_to_xyxy(head[..., :4]), head[..., 4:], score_threshold, iou_threshold, max_detections)


def decode_yolov5(outputs: dict[str, np.ndarray], input_hw: tuple[int, int], score_threshold: float = DEFAULT_SCORE,
                  iou_threshold: float = DEFAULT_IOU["yolov5"], max_detections: int = DEFAULT_MAX_DETECTIONS) -> list[Detections]:
    head = _single(outputs, 3, "yolov5")
    if head.shape[1] < head.shape[2]:
        head = head.transpose(0, 2, 1)
    return _per_anchor(_xywh_to_xyxy(head[..., :4]), head[..., 4:5] * head[..., 5:], score_threshold, iou_threshold,
                       max_detections)


def decode_ssd(outputs: dict[str, np.ndarray], input_hw: tuple[int, int], score_threshold: float = DEFAULT_SCORE,
               iou_threshold: float = DEFAULT_IOU["ssd"], max_detections: int = DEFAULT_MAX_DETECTIONS) -> list[Detections]:
    rank3 = [np.asarray(a, np.float32) for a in outputs.values() if a.ndim == 3]
    boxes = next((a for a in rank3 if a.shape[2] == 4), None)
    scores = next((a for a in rank3 if a is not boxes and boxes is not None and a.shape[1] == boxes.shape[1]), None)
    if boxes is None or scores is None:
        raise ConfigError("the ssd decoder needs boxes (N, A, 4) and scores (N, A, C) outputs", "choose another --decoder")
    if np.nanmax(np.abs(boxes), initial=0.0) <= 1.5:  # relative to the input
        h, w = input_hw
        boxes = boxes * np.array([w, h, w, h], np.float32)
    return _per_anchor(boxes, scores, score_threshold, iou_threshold, max_detections)


def _grid_stride(anchors: int, input_hw: tuple[int, int]) -> int:
    h, w = input_hw
    for stride in (4, 8, 16, 32, 64, 128):
        if math.ceil(h / stride) * math.ceil(w / stride) == anchors:
            return stride
    raise ConfigError(f"a level with {anchors} anchors matches no stride for a {h}x{w} input",
                      "check the input size, or decode the model with --decoder module:function")


def picodet_levels(outputs: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(score map, DFL map) per level, paired by anchor count, finest level first."""
    rank3 = [np.asarray(a, np.float32) for a in outputs.values() if a.ndim == 3]
    widths = sorted({a.shape[2] for a in rank3})
    if len(widths) != 2 or widths[1] % 4:
        raise ConfigError("the picodet decoder needs score maps (N, A, C) and DFL maps (N, A, 4 bins) per level",
                          "choose another --decoder")
    dfl_width = widths[1] if widths[1] % 4 == 0 and widths[1] > 4 else widths[0]
    scores = {a.shape[1]: a for a in rank3 if a.shape[2] != dfl_width}
    dfl = {a.shape[1]: a for a in rank3 if a.shape[2] == dfl_width}
    if set(scores) != set(dfl):
        raise ConfigError("the picodet score and box maps do not pair up by anchor count", "choose another --decoder")
    return [(scores[n], dfl[n]) for n in sorted(scores, reverse=True)]


def decode_picodet(outputs: dict[str, np.ndarray], input_hw: tuple[int, int], score_threshold: float = DEFAULT_SCORE,
                   iou_threshold: float = DEFAULT_IOU["picodet"], max_detections: int = DEFAULT_MAX_DETECTIONS) -> list[Detections]:
    all_boxes, all_scores = [], []
    h, w = input_hw
    for score, dfl in picodet_levels(outputs):
        stride = _grid_stride(score.shape[1], input_hw)
        rows, cols = np.meshgrid(np.arange(math.ceil(h / stride)), np.arange(math.ceil(w / stride)), indexing="ij")
        cy, cx = (rows.reshape(-1) + 0.5) * stride, (cols.reshape(-1) + 0.5) * stride
        bins = dfl.shape[2] // 4
        logits = dfl.reshape(len(dfl), -1, 4, bins).astype(np.float64)
        prob = np.exp(logits - logits.max(axis=3, keepdims=True))
        dist = (prob / prob.sum(axis=3, keepdims=True) * np.arange(bins)).sum(axis=3) * stride
        centre = np.stack([cx, cy, cx, cy], axis=1)[None]
        all_boxes.append(centre + dist * np.array([-1, -1, 1, 1]))
        all_scores.append(score)
    # every class above the threshold per anchor, as PP-PicoDet's own post-processing does
    return _per_anchor(np.concatenate(all_boxes, axis=1), np.concatenate(all_scores, axis=1), score_threshold,
                       iou_threshold, max_detections, multi_label=True)


DECODERS: dict[str, Decoder] = {"yolo": decode_yolo, "yolov5": decode_yolov5, "ssd": decode_ssd, "picodet": decode_picodet}


def detect_layout(shapes: dict[str, tuple]) -> str | None:
    """The decoder a detector's outputs look like, by shape alone (dims may be None or symbolic); None if none.

    One rank-3 output with a small known axis (4+C or 5+C, C <= 1000) is a YOLO head: `yolo` when the small axis
    comes first (YOLOv8/v11 exports), `yolov5` when it comes last (pass --decoder yolo for a transposed v8 head).
    Rank-3 outputs of two widths pairing up by anchor count, one width a multiple of 4, are PicoDet/NanoDet levels;
    boxes (N, A, 4) with scores (N, A, C) are SSD-style.
    """
    rank3 = [s for s in shapes.values() if len(s) == 3]
    if len(rank3) == 1 and len(shapes) == 1:
        _, a, b = (d if isinstance(d, int) else None for d in rank3[0])
        if a is not None and 5 <= a <= 5 + _MAX_CLASSES and (b is None or b > a):
            return "yolo"
        if b is not None and 6 <= b <= 5 + _MAX_CLASSES and (a is None or a > b):
            return "yolov5"
        return None
    known = [s for s in rank3 if all(isinstance(d, int) for d in s[1:])]
    if len(known) != len(shapes) or len(known) < 2:
        return None
    widths = {s[2] for s in known}
    anchors = {s[2]: sorted(t[1] for t in known if t[2] == s[2]) for s in known}
    if len(widths) == 2 and len(known) == 2 and 4 in widths:
        return "ssd" if anchors[4] == [d for w, d in anchors.items() if w != 4][0] else None
    if len(widths) == 2 and len(known) >= 4 and len(set(map(tuple, anchors.values()))) == 1 and max(widths) % 4 == 0:
        return "picodet"
    return None


def load_user_decoder(spec: str) -> Decoder:
    """Import exactly the callable named `module:function` (only when the user names it) and check it decodes."""
    module_name, _, attr = spec.partition(":")
    fix = "give --decoder as module:function, importable from the current folder or PYTHONPATH, or a built-in name: " \
          + ", ".join(DECODERS)
    if not module_name or not attr:
        raise ConfigError(f"--decoder {spec!r} is neither a built-in decoder nor module:function", fix)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing the user's module is theirs to fix
        raise ConfigError(f"cannot import the decoder module {module_name!r} ({type(exc).__name__}: {exc})".replace("\n", " "), fix) from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ConfigError(f"{module_name} has no callable {attr!r}", fix)
    return _checked(func, spec)


def _checked(func: Decoder, spec: str) -> Decoder:
    def decode(outputs: dict[str, np.ndarray], input_hw: tuple[int, int], score_threshold: float, iou_threshold: float,
               max_detections: int) -> list[Detections]:
        found = func(outputs, input_hw, score_threshold, iou_threshold, max_detections)
        batch = len(next(iter(outputs.values())))
        if not isinstance(found, list) or len(found) != batch or not all(isinstance(d, Detections) for d in found):
            raise ConfigError(f"the decoder {spec} returned {type(found).__name__}, not a list of {batch} Detections",
                              "return one edgeq.evaluate.detection.Detections per image of the batch")
        return found
    return decode


def resolve_decoder(name: str) -> Decoder:
    """A built-in decoder by name, or the user's `module:function`."""
    return DECODERS[name] if name in DECODERS else load_user_decoder(name)

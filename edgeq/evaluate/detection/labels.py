"""Ground-truth boxes for `validate --task detect --labels FILE`, per image in the order of the data's samples.

Two layouts, both in the model's input pixels (the boxes of the images as the model sees them, after any resize):

- an `.npz` with `boxes` float (K, 4) x1, y1, x2, y2; `classes` int (K,) the model's class indices; `image` int (K,)
  the sample each box belongs to; `images` int scalar, the number of samples (images without boxes count);
- a COCO-style `.json`: `images` (their order is the data's order), `annotations` with `image_id`, `bbox`
  [x, y, width, height] and `category_id`. With a `categories` list, a category's class index is its position in
  the list sorted by id (how COCO's 80 ids map to a YOLO's 80 outputs); without one, `category_id` is the index.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from edgeq.errors import DataError
from edgeq.evaluate.detection.boxes import Detections

_NPZ_KEYS = ("boxes", "classes", "image", "images")


def read_detection_labels(path: str | Path) -> list[Detections]:
    """Per image, the ground-truth boxes (scores 1)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"detection labels not found: {path}", "give an .npz or COCO .json of boxes (see `edgeq validate --help`)")
    if path.suffix.lower() == ".json":
        boxes, classes, image, count = _coco(path)
    elif zipfile.is_zipfile(path):
        boxes, classes, image, count = _npz(path)
    else:
        raise DataError(f"{path}: detection labels must be an .npz or a COCO-style .json", "write them in one of those layouts")
    if len(boxes) and (not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any()):
        raise DataError(f"{path}: some boxes are not finite or have x2 < x1 or y2 < y1", "store boxes as x1, y1, x2, y2 in input pixels")
    if len(image) and (image.min() < 0 or image.max() >= count):
        raise DataError(f"{path}: a box belongs to image {int(image.max())} but the labels declare {count} images",
                        "number the images from 0 and set `images` to their count")
    return [Detections(boxes[image == i], np.ones(int((image == i).sum())), classes[image == i]) for i in range(count)]


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in _NPZ_KEYS if k not in data.files]
        if missing:
            raise DataError(f"{path}: detection labels lack {', '.join(missing)}", f"save {', '.join(_NPZ_KEYS)} (see `edgeq validate --help`)")
        boxes, classes, image, count = (data[k] for k in _NPZ_KEYS)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not len(classes) == len(image) == len(boxes) or count.ndim:
        raise DataError(f"{path}: boxes must be (K, 4) with K classes and K image indices, images a scalar",
                        "save boxes (K, 4), classes (K,), image (K,) and images ()")
    if classes.dtype.kind not in "iu" or image.dtype.kind not in "iu":
        raise DataError(f"{path}: classes and image must be integers", "save class indices and image indices as integers")
    return boxes.astype(np.float64), classes.astype(np.int64), image.astype(np.int64), int(count)


def _coco(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        order = {entry["id"]: i for i, entry in enumerate(doc["images"])}
        notes = doc.get("annotations", [])
        index = {c["id"]: i for i, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))} if doc.get("categories") else None
        rows = [(order[a["image_id"]], [float(v) for v in a["bbox"]], a["category_id"]) for a in notes]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not COCO-style detection labels ({type(exc).__name__}: {exc})".replace("\n", " "),
                        "give `images` (with ids), `annotations` (image_id, bbox [x, y, w, h], category_id)") from None
    if any(len(bbox) != 4 for _, bbox, _ in rows):
        raise DataError(f"{path}: every annotation's bbox must be [x, y, width, height]", "fix the annotations' bbox")
    if index is not None and any(c not in index for _, _, c in rows):
        raise DataError(f"{path}: an annotation's category_id is not in `categories`", "list every category used")
    xywh = np.array([bbox for _, bbox, _ in rows], np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    classes = np.array([index[c] if index is not None else c for _, _, c in rows], np.int64)
    return boxes, classes, np.array([i for i, _, _ in rows], np.int64), len(order)

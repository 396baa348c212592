"""Image folders as model inputs: presets that resize, scale, normalise and lay out an image file."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass(frozen=True)
class ImagePreset:
    """How to turn an image file into a model input: resize, scale, normalise, lay out.

    >>> ImagePreset.named("imagenet").size
    (224, 224)
    """

    size: tuple[int, int] | None = None  # (height, width); None keeps the file's size
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    color: str = "RGB"  # RGB, BGR or L (grey)

    @staticmethod
    def named(name: str) -> "ImagePreset":
        """A named preset, optionally with overrides after commas.

        >>> ImagePreset.named("imagenet,size=256x256,layout=NHWC").size
        (256, 256)
        """
        base, *overrides = [part.strip() for part in name.split(",")]
        try:
            preset = PRESETS[base]
        except KeyError:
            raise DataError(f"unknown image preset {base!r}", f"use one of: {', '.join(sorted(PRESETS))}, optionally with "
                            "overrides such as imagenet,size=256x256,layout=NHWC") from None
        return dataclasses.replace(preset, **dict(_preset_override(item) for item in overrides))

    def load(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert(self.color if self.color != "BGR" else "RGB")
                if self.size is not None:
                    img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32)
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {exc}", "remove or replace the file") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.color == "BGR":
            arr = arr[:, :, ::-1]
        channels = arr.shape[2]
        mean = np.asarray(self.mean[:channels], np.float32)
        std = np.asarray(self.std[:channels], np.float32)
        arr = (arr * np.float32(self.scale) - mean) / std
        return np.ascontiguousarray(arr.transpose(2, 0, 1) if self.layout == "NCHW" else arr)


def _preset_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    fix = "write overrides as key=value: size=HxW, scale=0.0039, mean=0.5/0.5/0.5, std=0.5/0.5/0.5, layout=NCHW|NHWC, color=RGB|BGR|L"
    try:
        if not sep:
            raise ValueError
        if key == "size":
            height, width = (int(v) for v in value.lower().split("x"))
            return key, (height, width)
        if key == "scale":
            return key, float(value)
        if key in ("mean", "std"):
            return key, tuple(float(v) for v in value.split("/"))
        if key == "layout" and value in ("NCHW", "NHWC"):
            return key, value
        if key == "color" and value in ("RGB", "BGR", "L"):
            return key, value
    except ValueError:
        pass
    raise DataError(f"bad image preset override {item!r}", fix)


PRESETS = {
    "raw": ImagePreset(),
    "imagenet": ImagePreset(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "ppocr": ImagePreset(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "grey": ImagePreset(color="L", mean=(0.0,), std=(1.0,)),
}

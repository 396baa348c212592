"""Calibration and validation data: .npz files, .npy folders, image folders, or any Python iterable.

A Dataset yields chunks of samples (the sample axis first) and is re-batched and checked against the model's
inputs on the way out, so folders are streamed and never loaded whole.
"""
from __future__ import annotations

import tokenize
import dataclasses
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import DataError
from edgeq.model import TensorSpec

LABELS_KEY = "labels"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass
class Batch:
    """Model feeds for a run (name -> array, sample axis first) and the labels of those samples, if any."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    unbatched: bool = False  # one sample whose arrays lack the sample axis (a .npy file per sample)

    @property
    def size(self) -> int:
        return 1 if self.unbatched else len(next(iter(self.inputs.values())))


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


@dataclass
class Dataset:
    """Samples for calibration or validation, from any iterable (NNCF-style).

    `source` yields items; `transform` turns one item into a Batch (or a dict of arrays, or one array for a
    single-input model). File sources know how many samples they hold (`samples(model inputs)`).

    >>> ds = Dataset.from_arrays({"x": np.zeros((10, 3), np.float32)}, labels=np.arange(10))
    >>> len(ds), next(ds.chunks()).size
    (10, 10)
    """

    source: Callable[[], Iterable[Any]]
    transform: Callable[[Any], Any] | None = None
    length: int | None = None
    description: str = "data"
    notes: list[str] = field(default_factory=list)
    counter: Callable[[list[TensorSpec]], int | None] | None = None  # for sources whose count needs the model

    def samples(self, specs: list[TensorSpec]) -> int | None:
        """How many samples the model will see: the known length, or (a folder of .npy files, each one sample or a
        stack, which only the model's input rank tells apart) the count from the files' headers; None if unknown."""
        return self.counter(specs) if self.counter else self.length

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this dataset does not know its length")
        return self.length

    def chunks(self) -> Iterator[Batch]:
        for item in self.source():
            yield _as_batch(self.transform(item) if self.transform else item)

    # ----- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], labels: np.ndarray | None = None, description: str = "arrays") -> "Dataset":
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        counts = {k: len(v) if v.ndim else 0 for k, v in arrays.items()}
        if labels is not None:
            counts[LABELS_KEY] = len(labels)
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {n}" for k, n in counts.items())
            raise DataError(f"{description}: arrays disagree on the number of samples ({detail})", "give every array (and labels) the same first dimension")
        n = next(iter(counts.values()), 0)
        return cls(lambda: [Batch(arrays, labels)], length=n, description=description)

    @classmethod
    def from_npz(cls, path: str | Path) -> "Dataset":
        """An .npz keyed by input name (optional `labels`), read lazily in bounded chunks (see edgeq.npz)."""
        from edgeq import npz

        path = _existing(path)
        # Without this check np.load would read a .npy file as one array, or try to unpickle any other bytes.
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is not an .npz file (not a zip archive)", "write it with numpy.savez")
        members = npz.read_members(path)
        labels = [m for m in members if m.key == LABELS_KEY]
        if labels and not labels[0].shape:
            raise DataError(f"{path}: 'labels' is a scalar", "save one label per sample, shaped (samples,)")
        if len(labels) == len(members):
            raise DataError(f"{path} holds no input arrays", "save the model inputs keyed by input name")
        if any(not m.shape for m in members):
            raise DataError(f"{path} holds a scalar array; inputs need the sample axis first", "save arrays shaped (samples, ...)")
        counts = {m.key: m.shape[0] for m in members}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {n}" for k, n in counts.items())
            raise DataError(f"{path}: arrays disagree on the number of samples ({detail})", "give every array (and labels) the same first dimension")
        length = next(iter(counts.values()))
        if length == 0:
            raise DataError(f"{path} holds no samples", "give at least one sample")
        return cls(lambda: npz.read_chunks(path, members), length=length, description=str(path))

    @classmethod
    def from_npy_dir(cls, path: str | Path) -> "Dataset":
        """A folder of .npy files: each one sample (or a stack of samples) for a single-input model; an optional
        labels.npy holds one label per sample in file-name order."""
        folder = _existing(path)
        files = sorted(p for p in folder.glob("*.npy") if p.stem != LABELS_KEY)
        if not files:
            raise DataError(f"{folder} holds no .npy files", "put one .npy file per sample in the folder")
        labels_file = folder / f"{LABELS_KEY}.npy"
        labels = _read_npy(labels_file) if labels_file.exists() else None
        if labels is not None and labels.ndim == 0:
            raise DataError(f"{labels_file} is a scalar", "save one label per sample, shaped (samples,)")
        if labels is not None and len(labels) != len(files):
            raise DataError(f"{labels_file} has {len(labels)} labels for {len(files)} samples", "give one label per .npy file")

        def source() -> Iterator[Batch]:
            for i, f in enumerate(files):
                yield Batch({"": _read_npy(f)}, None if labels is None else np.asarray(labels[i:i + 1]), unbatched=True)

        return cls(source, description=str(folder), counter=lambda specs: _npy_sample_count(files, specs))

    @classmethod
    def from_image_dir(cls, path: str | Path, preset: ImagePreset | str = "raw") -> "Dataset":
        """DIR/<class>/*.png|jpg (labels are class indices in sorted folder order) or DIR/*.png (no labels)."""
        folder = _existing(path)
        preset = ImagePreset.named(preset) if isinstance(preset, str) else preset
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if classes:
            items = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        else:
            items = [(f, None) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise DataError(f"{folder} holds no images (.png/.jpg)", "use DIR/<class>/*.png or DIR/*.png")

        def transform(item: tuple[Path, int | None]) -> Batch:
            f, label = item
            arr = preset.load(f)[None]
            return Batch({"": arr}, None if label is None else np.asarray([label]))

        return cls(lambda: iter(items), transform, length=len(items), description=str(folder))


# What numpy and zipfile raise on corrupt, truncated or pickled content: CRC and zlib failures, and a damaged .npy
# header, which numpy parses as a Python literal (hence SyntaxError and tokenize's TokenError).
_UNREADABLE = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, NotImplementedError,
               SyntaxError, tokenize.TokenError)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except _UNREADABLE as exc:
        raise _unreadable(path, exc, "numpy.save") from None


def _npy_sample_count(files: list[Path], specs: list[TensorSpec]) -> int | None:
    """Samples in a folder of .npy files for a single-input model: a file of the input's rank is a stack, one rank
    lower a single sample. None when a file cannot be read or fits neither (reading it will say why)."""
    if len(specs) != 1 or specs[0].rank is None:
        return None
    total = 0
    for path in files:
        try:
            shape = _read_npy(path).shape  # memory-mapped: the header only
        except DataError:
            return None
        if len(shape) == specs[0].rank and shape:
            total += shape[0]
        elif len(shape) == specs[0].rank - 1:
            total += 1
        else:
            return None
    return total


def _unreadable(path: Path, exc: Exception, writer: str) -> DataError:
    if "allow_pickle" in str(exc) or "Python objects" in str(exc):  # np.load's words, with and without mmap
        # allow_pickle stays False: unpickling a data file can run arbitrary code.
        return DataError(f"{path} holds object arrays, which edgeq refuses to load (unpickling can run code)",
                         f"save plain numeric arrays with {writer}")
    detail = " ".join(str(exc).split())[:120]
    return DataError(f"{path} is corrupt or truncated ({type(exc).__name__}: {detail})", f"write it again with {writer}")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}", "check the path")
    return path


def _as_batch(item: Any) -> Batch:
    if isinstance(item, Batch):
        return item
    if isinstance(item, dict):
        item = dict(item)
        labels = item.pop(LABELS_KEY, None)
        return Batch({k: np.asarray(v) for k, v in item.items()}, None if labels is None else np.asarray(labels))
    if isinstance(item, tuple) and len(item) == 2:
        x, y = item
        batch = _as_batch(x)
        return Batch(batch.inputs, np.asarray(y))
    return Batch({"": np.asarray(item)})


def open_data(spec: str | Path, preset: ImagePreset | str = "raw") -> Dataset:
    """Open DATA as the command line gives it: an .npz file, a folder of .npy files, or an image folder."""
    path = _existing(spec)
    if path.is_file():
        if path.suffix == ".npz":
            return Dataset.from_npz(path)
        if path.suffix == ".npy":
            arr = _read_npy(path)
            return Dataset.from_arrays({"": arr}, description=str(path))
        raise DataError(f"{path}: unsupported data file", "give an .npz file, a folder of .npy files, or an image folder")
    entries = list(path.iterdir())
    if any(p.suffix == ".npy" for p in entries):
        return Dataset.from_npy_dir(path)
    if any(p.is_dir() for p in entries) or any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return Dataset.from_image_dir(path, preset)
    raise DataError(f"data folder {path} is empty or holds nothing edgeq can read", "put .npy files or DIR/<class>/*.png images in it")


# ----- binding data to a model's inputs ---------------------------------------------------------------------

def batches(dataset: Dataset, specs: list[TensorSpec], batch_size: int = 32, *, refuse_nonfinite: bool = True,
            max_samples: int | None = None) -> Iterator[Batch]:
    """Stream checked, re-batched model feeds. Batch size follows a fixed batch dimension of the model.

    Raises DataError on names, ranks, dtypes or fixed dims that do not match the model, on empty data, and (when
    `refuse_nonfinite`) on NaN/Inf.
    """
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples is {max_samples}", "give at least 1, or leave it unset to use all samples")
    fixed = {s.shape[0] for s in specs if s.rank and isinstance(s.shape[0], int)}
    fixed_batch = fixed.pop() if len(fixed) == 1 else None
    batch_size = fixed_batch or batch_size
    pending: list[Batch] = []
    pending_n = 0
    seen = 0
    for index, raw in enumerate(dataset.chunks()):
        chunk = conform(raw, specs, dataset.description, index)
        if refuse_nonfinite:
            _refuse_nonfinite(chunk, dataset.description)
        if chunk.size == 0:
            continue  # an empty file adds nothing, and an empty chunk left pending would be "taken" forever
        if max_samples is not None and seen + chunk.size > max_samples:
            chunk = _slice(chunk, 0, max_samples - seen)
        seen += chunk.size
        pending.append(chunk)
        pending_n += chunk.size
        while pending_n >= batch_size:
            out, pending, pending_n = _take(pending, batch_size)
            yield out
        if max_samples is not None and seen >= max_samples:
            break
    if seen == 0:
        raise DataError(f"{dataset.description} holds no samples", "give at least one sample")
    if pending_n:
        if fixed_batch is None:
            while pending:
                out, pending, pending_n = _take(pending, pending_n)
                yield out
        else:
            dataset.notes.append(f"dropped the last {pending_n} samples: the model's batch dimension is fixed at {batch_size}")


def conform(chunk: Batch, specs: list[TensorSpec], where: str, index: int = 0) -> Batch:
    """Map keys to input names and check rank, dtype and fixed dims; add the sample axis to single .npy samples."""
    arrays = _map_names(chunk.inputs, specs, where)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = arrays[spec.name]
        if chunk.unbatched:
            arr = np.asarray(arr)[None] if arr.ndim == spec.rank - 1 else np.asarray(arr)
        out[spec.name] = _conform_array(arr, spec, where)
    sizes = {len(a) for a in out.values()}
    if len(sizes) > 1:
        raise DataError(f"{where}: inputs disagree on the number of samples in chunk {index}", "give every input the same first dimension")
    n = sizes.pop()
    labels = chunk.labels
    if labels is not None and len(labels) != n:
        raise DataError(f"{where}: {len(labels)} labels for {n} samples", "give exactly one label per sample")
    return Batch(out, labels)


def _map_names(arrays: dict[str, np.ndarray], specs: list[TensorSpec], where: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{where}: no data for model input(s) {', '.join(missing)} (data keys: {', '.join(k or '<unnamed>' for k in arrays)})",
                        f"key the arrays by the model's input names: {', '.join(names)}")
    extra = [k for k in arrays if k not in names]
    if extra:
        raise DataError(f"{where}: data keys {', '.join(extra)} match no model input", f"the model's inputs are: {', '.join(names)}")
    return arrays


def _conform_array(arr: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    if arr.ndim != spec.rank:
        raise DataError(f"{where}: input {spec.name!r} has rank {arr.ndim} {tuple(arr.shape)}, the model expects rank {spec.rank} {_dims(spec)}",
                        "reshape the data to the model's input shape, sample axis first")
    for axis, (have, want) in enumerate(zip(arr.shape, spec.shape)):
        if axis > 0 and isinstance(want, int) and have != want:
            raise DataError(f"{where}: input {spec.name!r} has shape {tuple(arr.shape)}, the model expects {_dims(spec)} (axis {axis}: {have} ≠ {want})",
                            "resize or reshape the data to the model's input shape")
    return np.ascontiguousarray(_cast(arr, spec, where))


def _cast(arr: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    if arr.dtype == spec.dtype:
        return arr
    same_kind = (arr.dtype.kind == "f" and spec.dtype.kind == "f") or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu")
    if not same_kind:
        raise DataError(f"{where}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}",
                        f"convert the data, e.g. array.astype(numpy.{spec.dtype})")
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise DataError(f"{where}: input {spec.name!r} holds values outside {spec.dtype}", "check the data")
    # Widening/narrowing within a kind (float64 -> float32, int32 -> int64) is what numpy users expect to work.
    with np.errstate(over="ignore"):  # numpy would warn on stderr; the check below says it in edgeq's one line
        out = arr.astype(spec.dtype)
    if spec.dtype.kind == "f" and np.isinf(out).sum() > np.isinf(arr).sum():
        raise DataError(f"{where}: input {spec.name!r} holds values beyond the range of {spec.dtype}", "check the data or rescale it")
    return out


def _dims(spec: TensorSpec) -> str:
    return "(" + ", ".join("?" if d is None or isinstance(d, str) else str(d) for d in spec.shape) + ")"


def _refuse_nonfinite(chunk: Batch, where: str) -> None:
    for name, arr in chunk.inputs.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{where}: input {name!r} holds {bad} NaN/Inf values", "clean the data; calibration needs finite values")


def count_nonfinite(batch: Batch) -> int:
    return sum(int((~np.isfinite(a)).sum()) for a in batch.inputs.values() if a.dtype.kind == "f")


def _slice(chunk: Batch, start: int, stop: int) -> Batch:
    return Batch({k: v[start:stop] for k, v in chunk.inputs.items()}, None if chunk.labels is None else chunk.labels[start:stop])


def _take(pending: list[Batch], n: int) -> tuple[Batch, list[Batch], int]:
    """Concatenate the first n samples of the pending chunks; same-shape samples only (dynamic dims may differ)."""
    taken: list[Batch] = []
    need = n
    rest: list[Batch] = []
    for i, chunk in enumerate(pending):
        if need == 0:
            rest = pending[i:]
            break
        if taken and any(chunk.inputs[k].shape[1:] != taken[0].inputs[k].shape[1:] for k in chunk.inputs):
            # Different spatial sizes cannot share a batch: emit what we have.
            rest = pending[i:]
            break
        if chunk.size <= need:
            taken.append(chunk)
            need -= chunk.size
        else:
            taken.append(_slice(chunk, 0, need))
            rest = [_slice(chunk, need, chunk.size)] + pending[i + 1:]
            need = 0
            break
    inputs = {k: np.concatenate([c.inputs[k] for c in taken]) if len(taken) > 1 else taken[0].inputs[k] for k in taken[0].inputs}
    labels = None if any(c.labels is None for c in taken) else (np.concatenate([c.labels for c in taken]) if len(taken) > 1 else taken[0].labels)
    out = Batch(inputs, labels)
    return out, rest, sum(c.size for c in rest)

"""Where samples come from: any Python iterable (NNCF-style), an .npz file, a folder of .npy files, an image folder.

A Dataset yields chunks of samples (the sample axis first); `edgeq.data.batching` re-batches and checks them against
the model's inputs on the way out, so folders are streamed and never loaded whole.
"""
from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.data.batch import LABELS_KEY, Batch, as_batch, check_label_dtype
from edgeq.data.files import existing, npy_sample_count, read_npy
from edgeq.data.images import IMAGE_SUFFIXES, ImagePreset
from edgeq.errors import DataError
from edgeq.model import TensorSpec


@dataclass
class Dataset:
    """Samples for calibration or validation, from any iterable (NNCF-style).

    `source` yields items; `transform` turns one item into a Batch (or a dict of arrays, or one array for a
    single-input model). File sources know how many samples they hold (`samples(model inputs)`).

    >>> ds = Dataset.from_arrays({"x": np.zeros((10, 3), np.float32)}, labels=np.arange(10))
    >>> len(ds), next(ds.chunks()).size
    (10, 10)
    """

    source: Callable[[], Iterable[Any]] | Iterable[Any]
    transform: Callable[[Any], Any] | None = None
    length: int | None = None
    description: str = "data"
    notes: list[str] = field(default_factory=list)
    counter: Callable[[list[TensorSpec]], int | None] | None = None  # for sources whose count needs the model
    # samples [start, stop) read without reading those before them (files, arrays): what a data shard reads
    slicer: Callable[[int, int], Iterable[Any]] | None = None
    origin: tuple[str, Any] | None = None  # (path, image preset) a worker reopens the data from (shared storage)

    def __post_init__(self) -> None:
        if callable(self.source):
            return
        items = self.source
        if not isinstance(items, (Iterable, Batch)):
            raise DataError(f"{self.description}: a Dataset source must be an iterable or a function returning one, "
                            f"not {type(items).__name__}", "pass a list of samples, or a function that yields them")
        if isinstance(items, (np.ndarray, dict, Batch)):  # one chunk of samples, not an iterable of chunks
            self.source = lambda: [items]
        elif iter(items) is items:  # a generator or other one-shot iterator: calibration and validation read it once
            self.source = _OneShot(items, self.description)
        else:  # a list, tuple or other re-iterable collection
            self.source = lambda: items

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
            yield as_batch(self.transform(item) if self.transform else item)

    # ----- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], labels: np.ndarray | None = None, description: str = "arrays") -> "Dataset":
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        counts = {k: len(v) if v.ndim else 0 for k, v in arrays.items()}
        if labels is not None:
            labels = np.asarray(labels)
            check_label_dtype(labels.dtype, description)
            counts[LABELS_KEY] = len(labels)
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {n}" for k, n in counts.items())
            raise DataError(f"{description}: arrays disagree on the number of samples ({detail})", "give every array (and labels) the same first dimension")
        n = next(iter(counts.values()), 0)

        def window(start: int, stop: int) -> list[Batch]:
            return [Batch({k: v[start:stop] for k, v in arrays.items()}, None if labels is None else labels[start:stop])]

        return cls(lambda: [Batch(arrays, labels)], length=n, description=description, slicer=window)

    @classmethod
    def from_npz(cls, path: str | Path) -> "Dataset":
        """An .npz keyed by input name (optional `labels`), read lazily in bounded chunks (see edgeq.npz)."""
        from edgeq import npz

        path = existing(path)
        # Without this check np.load would read a .npy file as one array, or try to unpickle any other bytes.
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is not an .npz file (not a zip archive)", "write it with numpy.savez")
        members = npz.read_members(path)
        labels = [m for m in members if m.key == LABELS_KEY]
        if labels and not labels[0].shape:
            raise DataError(f"{path}: 'labels' is a scalar", "save one label per sample, shaped (samples,)")
        if labels:
            check_label_dtype(labels[0].dtype, str(path))
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
        return cls(lambda: npz.read_chunks(path, members), length=length, description=str(path), origin=(str(path), "raw"),
                   slicer=lambda start, stop: npz.read_chunks(path, members, start, stop))

    @classmethod
    def from_npy_dir(cls, path: str | Path) -> "Dataset":
        """A folder of .npy files: each one sample (or a stack of samples) for a single-input model; an optional
        labels.npy holds one label per sample in file-name order."""
        folder = existing(path)
        files = sorted(p for p in folder.glob("*.npy") if p.stem != LABELS_KEY)
        if not files:
            raise DataError(f"{folder} holds no .npy files", "put one .npy file per sample in the folder")
        labels_file = folder / f"{LABELS_KEY}.npy"
        labels = read_npy(labels_file) if labels_file.exists() else None
        if labels is not None and labels.ndim == 0:
            raise DataError(f"{labels_file} is a scalar", "save one label per sample, shaped (samples,)")
        if labels is not None:
            check_label_dtype(labels.dtype, str(labels_file))
        if labels is not None and len(labels) != len(files):
            raise DataError(f"{labels_file} has {len(labels)} labels for {len(files)} samples", "give one label per .npy file")

        def source() -> Iterator[Batch]:
            for i, f in enumerate(files):
                yield Batch({"": read_npy(f)}, None if labels is None else np.asarray(labels[i:i + 1]), unbatched=True)

        return cls(source, description=str(folder), counter=lambda specs: npy_sample_count(files, specs), origin=(str(folder), "raw"))

    @classmethod
    def from_image_dir(cls, path: str | Path, preset: ImagePreset | str = "raw") -> "Dataset":
        """DIR/<class>/*.png|jpg (labels are class indices in sorted folder order) or DIR/*.png (no labels)."""
        folder = existing(path)
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

        return cls(lambda: iter(items), transform, length=len(items), description=str(folder), origin=(str(folder), preset),
                   slicer=lambda start, stop: iter(items[start:stop]))


def open_data(spec: str | Path, preset: ImagePreset | str = "raw") -> Dataset:
    """Open DATA as the command line gives it: an .npz file, a folder of .npy files, or an image folder."""
    path = existing(spec)
    if path.is_file():
        if path.suffix == ".npz":
            return Dataset.from_npz(path)
        if path.suffix == ".npy":
            arr = read_npy(path)
            data = Dataset.from_arrays({"": arr}, description=str(path))
            data.origin = (str(path), "raw")
            return data
        raise DataError(f"{path}: unsupported data file", "give an .npz file, a folder of .npy files, or an image folder")
    entries = list(path.iterdir())
    if any(p.suffix == ".npy" for p in entries):
        return Dataset.from_npy_dir(path)
    if any(p.is_dir() for p in entries) or any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
        return Dataset.from_image_dir(path, preset)
    raise DataError(f"data folder {path} is empty or holds nothing edgeq can read", "put .npy files or DIR/<class>/*.png images in it")


class _OneShot:
    """A one-shot iterator as a Dataset source: the first pass reads it; a second pass says why it cannot."""

    def __init__(self, items: Iterator[Any], description: str) -> None:
        self.items, self.description, self.used = items, description, False

    def __call__(self) -> Iterator[Any]:
        if self.used:
            raise DataError(f"{self.description}: the dataset's source is a one-shot iterator (a generator) that was "
                            "already read once", "pass a list, or a function that returns a fresh iterator each call")
        self.used = True
        return self.items

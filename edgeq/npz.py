""".npz files read lazily: every member's .npy header is checked against the zip directory before any data is read,
then the samples are decompressed in chunks of bounded size, so `--max-samples` bounds memory and a zip bomb or a
header that declares more samples than the file holds is refused before anything is allocated.
"""
from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from edgeq.data.batch import LABELS_KEY, Batch
from edgeq.data.files import UNREADABLE, unreadable
from edgeq.errors import DataError

CHUNK_BYTES = 16 * 2**20            # decompressed bytes per member and chunk (at least one sample)
MAX_EXPANSION = 100                 # compressed members that expand more than this (zip bombs) are refused ...
EXPANSION_CHECKED_ABOVE = 64 * 2**20  # ... when they decompress to more than this; small ones cannot hurt


@dataclass(frozen=True)
class Member:
    """One array of the archive as its header declares it."""

    key: str
    zip_name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header_bytes: int

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def read_members(path: Path) -> list[Member]:
    """The arrays of an .npz file, from their headers only; DataError for anything numpy.savez would not write."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [_member(path, archive, info) for info in archive.infolist()]
    except UNREADABLE as exc:
        raise unreadable(path, exc, "numpy.savez") from None


def _member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    if not info.filename.endswith(".npy"):
        raise DataError(f"{path}: member {info.filename!r} is not a numpy array", "write the file with numpy.savez")
    key = info.filename.removesuffix(".npy")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > EXPANSION_CHECKED_ABOVE \
            and info.file_size > MAX_EXPANSION * max(info.compress_size, 1):
        raise DataError(f"{path}: member {key!r} would decompress from {_size(info.compress_size)} to {_size(info.file_size)} "
                        f"({info.file_size / max(info.compress_size, 1):.0f}:1; edgeq refuses more than {MAX_EXPANSION}:1 above "
                        f"{_size(EXPANSION_CHECKED_ABOVE)}, the mark of a zip bomb)",
                        "if the data is real (mostly zeros, say), save it uncompressed with numpy.savez")
    with archive.open(info) as stream:
        shape, fortran_order, dtype = _header(stream)
        header_bytes = stream.tell()
    if dtype.hasobject:
        # allow_pickle stays False: unpickling a data file can run arbitrary code.
        raise DataError(f"{path} holds object arrays, which edgeq refuses to load (unpickling can run code)",
                        "save plain numeric arrays with numpy.savez")
    declared = math.prod(shape) * dtype.itemsize
    if header_bytes + declared != info.file_size:
        raise DataError(f"{path} is corrupt or truncated: member {key!r} declares shape {shape} {dtype} ({_size(declared)}) "
                        f"but holds {_size(max(info.file_size - header_bytes, 0))}", "write it again with numpy.savez")
    return Member(key, info.filename, shape, dtype, fortran_order, header_bytes)


def _header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def read_chunks(path: Path, members: list[Member], first: int = 0, stop: int | None = None) -> Iterator[Batch]:
    """Batches of at most CHUNK_BYTES per member (one sample at least), read in step from every member: samples
    [first, stop) (a data shard), those before `first` skipped by seeking."""
    samples = members[0].shape[0] if stop is None else min(stop, members[0].shape[0])
    step = max(1, CHUNK_BYTES // max(max(m.sample_bytes for m in members), 1))
    try:
        with zipfile.ZipFile(path) as archive:
            streams = {m.key: _open_data(archive, m) for m in members}
            for m in members:
                if first and not isinstance(streams[m.key], np.ndarray):
                    streams[m.key].seek(first * m.sample_bytes, 1)
            for start in range(first, samples, step):
                count = min(step, samples - start)
                arrays = {m.key: _next(streams[m.key], m, start, count) for m in members}
                labels = arrays.pop(LABELS_KEY, None)
                yield Batch(arrays, labels)
            for stream in streams.values():
                if not isinstance(stream, np.ndarray) and samples == members[0].shape[0]:
                    stream.read(1)  # at the end of a member zipfile checks its CRC
    except UNREADABLE as exc:
        raise unreadable(path, exc, "numpy.savez") from None


def _open_data(archive: zipfile.ZipFile, member: Member) -> IO[bytes] | np.ndarray:
    stream = archive.open(member.zip_name)
    if member.fortran_order and len(member.shape) > 1:
        # Column-major: a sample is not contiguous in the file. The whole array is read (its size was checked).
        return np.lib.format.read_array(stream, allow_pickle=False)
    stream.read(member.header_bytes)
    return stream


def _next(source: IO[bytes] | np.ndarray, member: Member, start: int, count: int) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return np.ascontiguousarray(source[start:start + count])
    out = np.empty((count, *member.shape[1:]), member.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
    filled = 0
    while filled < len(view):
        got = source.readinto(view[filled:])
        if not got:
            raise EOFError(f"member {member.key!r} ends after {filled} of {len(view)} bytes")
        filled += got
    return out

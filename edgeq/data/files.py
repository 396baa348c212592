"""Reading numpy files safely: never unpickled, and every kind of damage is one DataError that names the writer."""
from __future__ import annotations

import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from edgeq.errors import DataError
from edgeq.model import TensorSpec

# What numpy and zipfile raise on corrupt, truncated or pickled content: CRC and zlib failures, and a damaged .npy
# header, which numpy parses as a Python literal (hence SyntaxError and tokenize's TokenError).
UNREADABLE = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, NotImplementedError,
              SyntaxError, tokenize.TokenError)


def read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except UNREADABLE as exc:
        raise unreadable(path, exc, "numpy.save") from None


def npy_sample_count(files: list[Path], specs: list[TensorSpec]) -> int | None:
    """Samples in a folder of .npy files for a single-input model: a file of the input's rank is a stack, one rank
    lower a single sample. None when a file cannot be read or fits neither (reading it will say why)."""
    if len(specs) != 1 or specs[0].rank is None:
        return None
    total = 0
    for path in files:
        try:
            shape = read_npy(path).shape  # memory-mapped: the header only
        except DataError:
            return None
        if len(shape) == specs[0].rank and shape:
            total += shape[0]
        elif len(shape) == specs[0].rank - 1:
            total += 1
        else:
            return None
    return total


def unreadable(path: Path, exc: Exception, writer: str) -> DataError:
    if "allow_pickle" in str(exc) or "Python objects" in str(exc):  # np.load's words, with and without mmap
        # allow_pickle stays False: unpickling a data file can run arbitrary code.
        return DataError(f"{path} holds object arrays, which edgeq refuses to load (unpickling can run code)",
                         f"save plain numeric arrays with {writer}")
    detail = " ".join(str(exc).split())[:120]
    return DataError(f"{path} is corrupt or truncated ({type(exc).__name__}: {detail})", f"write it again with {writer}")


def existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}", "check the path")
    return path

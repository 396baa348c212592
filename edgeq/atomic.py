"""Atomic writes: every file goes to a temporary name in the target folder and is renamed when complete.

A reader (or a crash) therefore sees the old file or the new one, never a partial one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeq.errors import OutputError


def check_writable(path: Path, *, force: bool = False, protect: tuple[Path, ...] = ()) -> Path:
    """Refuse outputs that would overwrite an input, an existing file (unless force), or land in a read-only folder."""
    path = Path(path)
    resolved = path.resolve()
    for p in protect:
        if p is not None and Path(p).resolve() == resolved:
            raise OutputError(f"output {path} is the input model", "choose another output path; edgeq never overwrites its input")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder", "give a file name, e.g. model_int8.onnx")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists", "pass --force to replace it, or choose another path")
    folder = resolved.parent
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {folder}: {exc.strerror}", "choose a writable location") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable", "choose a writable location or fix its permissions")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block completes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

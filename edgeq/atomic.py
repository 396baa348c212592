"""Atomic writes: every file goes to a temporary name in the target folder and is renamed when complete.

A reader (or a crash) therefore sees the old file or the new one, never a partial one. Temporaries are dot-files
named `.<target>.edgeq-<pid>-<random>.tmp`; the ones a killed process left behind are removed on the next write
of the same target.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeq.errors import OutputError

# Errors while writing that the user fixes (free space), as opposed to bugs.
_FULL = {errno.ENOSPC, errno.EDQUOT}


def check_writable(path: Path, *, force: bool = False, protect: tuple[Path, ...] = ()) -> Path:
    """Refuse outputs that would overwrite an input, an existing file (unless force), or land in a read-only folder.

    Nothing is created here: a run that fails later must not leave folders behind.
    """
    path = Path(path)
    for p in protect:
        if p is not None and _same_file(Path(p), path):
            raise OutputError(f"output {path} would overwrite the input {p}", "choose another output path; edgeq never overwrites its inputs")
    if path.is_dir():
        raise OutputError(f"output {path} is a folder", "give a file name, e.g. model_int8.onnx")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists", "pass --force to replace it, or choose another path")
    folder = _nearest_existing(path.resolve().parent)
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder", "choose an output path inside a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable", "choose a writable location or fix its permissions")
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Same path after resolving links, or the same file reached by a hard link."""
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def make_parent(path: Path) -> Path:
    """Create the folder of `path` (at write time, not at check time); returns it resolved."""
    folder = Path(path).resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror}", "choose a writable location") from None
    return folder


def temp_beside(path: Path, *, folder: bool = False) -> Path:
    """Create an empty temporary file (or folder) beside `path`, after clearing stale ones of dead processes."""
    path = Path(path)
    parent = make_parent(path)
    clean_stale(path)
    prefix = f".{path.name}.edgeq-{os.getpid()}-"
    try:
        if folder:
            return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write in {parent}: {exc.strerror}", "choose a writable location or fix its permissions") from None
    os.close(fd)
    return Path(tmp)


def clean_stale(path: Path) -> list[Path]:
    """Remove temporaries beside `path` whose writer no longer runs (killed mid-write); returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.edgeq-(\d+)-[^/]*\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.resolve().parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and not _alive(int(match.group(1))):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def publish(tmp: Path, path: Path) -> None:
    """Make a finished temporary durable and rename it onto `path`: its bytes reach the disk (fsync) before the
    rename, and the folder entry after it, so a power cut leaves the old file or the whole new one under `path`,
    never an empty or partial one. The file gets the permissions of a normal new file."""
    sync_file(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; an output should be as readable as any other
    os.replace(tmp, path)
    sync_folder(Path(path).resolve().parent)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """fsync a folder, which makes the renames and removals in it durable (POSIX; a no-op where folders cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def disk_full_is_user_error(path: Path) -> Iterator[None]:
    """A full disk or quota while writing `path` is for the user to fix, not a bug."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise OutputError(f"cannot write {path}: {exc.strerror}", "free disk space or choose another location") from None
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block completes."""
    path = Path(path)
    tmp_path = temp_beside(path)
    try:
        with disk_full_is_user_error(path):
            yield tmp_path
            publish(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)  # already renamed when the block completed


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

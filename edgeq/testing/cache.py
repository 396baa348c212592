"""Trained fixtures made once per machine: a folder named by the hash of everything the training depends on."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cached_folder(key: str, marker: str, make: Callable[[Path], object], cache: Path | None = None) -> Path:
    """`cache/key` (default cache $EDGEQ_CACHE or ~/.cache/edgeq), made by `make(folder)` when `marker` is not in it
    yet; a cache that cannot be written gives a fresh folder under the system's temporary directory."""
    root = Path(cache or os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq"))
    folder = root / key
    if (folder / marker).is_file():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=f"edgeq-{key}-"))
    make(staging)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, folder.with_suffix(".tmp"), dirs_exist_ok=True)
        os.replace(folder.with_suffix(".tmp"), folder)   # atomic: a concurrent run sees the whole folder or none
    except OSError:
        return staging
    return folder

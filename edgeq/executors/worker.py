"""The worker's side of `Shared` values, and what a worker process keeps between tasks: each shared value read
once, and one opened model (with its inference session) per model file, the few most recently used.

>>> shared_arrays(Shared("memory", {"x": np.zeros(2)}))["x"].shape
(2,)
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.executors import Shared

KEPT = 4   # shared values and opened models (with sessions) a worker keeps: a candidate, its reference, the data
_values: OrderedDict[Any, Any] = OrderedDict()
_models: OrderedDict[tuple, "Opened"] = OrderedDict()


def shared_arrays(shared: Shared) -> dict[str, np.ndarray]:
    """The arrays behind a handle: in this process, in a .npz file (read once per worker), or in Ray's object store."""
    if shared.kind != "npz":
        return shared_value(shared)
    key = _key(shared)
    if key not in _values:
        with np.load(shared.value, allow_pickle=False) as archive:
            _keep(_values, key, {name: archive[name] for name in archive.files}, KEPT)
    return _values[key]


def shared_value(shared: Shared) -> Any:
    """Any other shared value: in this process (sent with the task), or in Ray's object store."""
    if shared.kind == "memory":
        return shared.value
    key = _key(shared)
    if key not in _values:
        import ray

        _keep(_values, key, ray.get(shared.value), KEPT)
    return _values[key]


def shared_model_path(shared: Shared) -> str:
    """A path to the model's file: its own on shared storage, or (Ray) the object-store copy written out once."""
    if shared.kind == "file":
        return str(shared.value)
    key = _key(shared)
    if key not in _values:
        import ray

        ref, main = shared.value
        folder = Path(tempfile.mkdtemp(prefix="edgeq-model-"))
        atexit.register(shutil.rmtree, folder, True)
        for name, data in ray.get(ref).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        _keep(_values, key, str(folder / main), KEPT)
    return _values[key]


class Opened:
    """A model opened in a worker, and its inference session once asked for (after the layout is settled)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._session: Any = None

    def session(self) -> Any:
        if self._session is None:
            self._session = self.model.session()
        return self._session


def opened(path: str) -> Opened:
    """The model at `path`, opened once per process (again when the file changed), the few most recent kept."""
    from edgeq import runtimes

    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _models:
        _keep(_models, key, Opened(runtimes.load(path)), KEPT)
    _models.move_to_end(key)
    return _models[key]


def _key(shared: Shared) -> Any:
    value = shared.value[0] if shared.kind == "ray-files" else shared.value
    return shared.kind, value.hex() if hasattr(value, "hex") and not isinstance(value, (str, bytes)) else value


def _keep(cache: OrderedDict, key: Any, value: Any, limit: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)

"""The Ray executor (`--executor ray`, the optional `edgeq[ray]` extra): tasks run on Ray actors, one task at a time
each, so a worker that dies is known exactly and only its task runs again.

It connects to the cluster `RAY_ADDRESS` names, or starts a Ray instance on this machine (stopped on `close`). Shared
arrays and model files go into Ray's object store once (`ray.put`); tasks carry the references. Each actor is one
long-lived worker process: it keeps one inference session per model (`edgeq.executors.worker`) across tasks.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeq.errors import ConfigError
from edgeq.executors import Retries, Shared
from edgeq.progress import step


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed",
                          "pip install 'edgeq[ray]', or use --executor local") from None
    return ray


class RayCluster:
    """Ray actors: `workers` of them (default: every CPU of the cluster).

    >>> with RayCluster(2) as cluster:                              # doctest: +SKIP
    ...     cluster.map(abs, [-1, -2], "absolute values")
    [1, 2]
    """

    def __init__(self, workers: int | None = None) -> None:
        self._ray = _ray()
        self._started_here = False
        if not self._ray.is_initialized():
            self._start(workers)
        cpus = max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        self.workers = min(workers or cpus, cpus)   # an actor holds a CPU: more than the cluster has would never start
        self.notes: list[str] = []
        if workers and workers > cpus:
            self.notes.append(f"--workers {workers}: the Ray cluster has {cpus} CPUs, so {cpus} workers ran")
        self._actors: list[Any] = []
        self._worker_class: Any = None
        self._models: dict[tuple, Shared] = {}   # each model file's object-store copy

    def _start(self, workers: int | None) -> None:
        """Connect to RAY_ADDRESS, or start a local instance whose workers import this very edgeq."""
        address = os.environ.get("RAY_ADDRESS")
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if not address:
            package_root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
            options.update(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                           runtime_env={"env_vars": {"PYTHONPATH": path}})
        try:
            self._ray.init(address=address or None, **options)
        except ConnectionError as exc:
            raise ConfigError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({exc})",
                              "start it (ray start --head) or unset RAY_ADDRESS to start one here") from None
        self._started_here = True

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], description: str = "tasks") -> list[Any]:
        if not tasks:
            return []
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        results: dict[int, Any] = {}
        retries = Retries(tasks, description)
        waiting = deque(range(len(tasks)))
        idle = list(self._started_actors())
        running: dict[Any, tuple[int, Any]] = {}
        with step(description, total=len(tasks)) as line:
            while waiting or running:
                while waiting and idle:
                    index, actor = waiting.popleft(), idle.pop()
                    retries.started(index)
                    running[actor.run.remote(fn, tasks[index])] = (index, actor)
                ready, _ = self._ray.wait(list(running), num_returns=1)
                index, actor = running.pop(ready[0])
                try:
                    results[index] = self._ray.get(ready[0])
                except RayTaskError as exc:   # the task raised: its own error (a UserError stays one)
                    raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
                except (RayActorError, WorkerCrashedError) as exc:
                    idle.append(self._replace(actor))
                    retries.lost(index, type(exc).__name__)
                    waiting.appendleft(index)
                    continue
                idle.append(actor)
                line.advance()
        self.notes += retries.note()
        return [results[i] for i in range(len(tasks))]

    def share_arrays(self, arrays: dict[str, np.ndarray]) -> Shared:
        return Shared("ray-arrays", self._ray.put(arrays))

    def share(self, value: Any) -> Shared:
        return Shared("ray-value", self._ray.put(value))

    def share_model(self, path: str) -> Shared:
        """The model's files (external data included) into the object store, once per file version; workers write
        them out once each."""
        from edgeq.model import model_files

        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._models:
            folder = Path(path).parent
            files = {str(f.relative_to(folder)): f.read_bytes() for f in model_files(path)}
            self._models[key] = Shared("ray-files", (self._ray.put(files), Path(path).name))
        return self._models[key]

    def _started_actors(self) -> list[Any]:
        if self._worker_class is None:
            self._worker_class = self._ray.remote(num_cpus=1, max_restarts=0)(_Worker)
        while len(self._actors) < self.workers:
            self._actors.append(self._worker_class.remote())
        return self._actors

    def _replace(self, actor: Any) -> Any:
        self._ray.kill(actor)
        self._actors.remove(actor)
        fresh = self._worker_class.remote()
        self._actors.append(fresh)
        return fresh

    def close(self, *, stop_workers: bool = False) -> None:
        """Stop the actors (and the Ray instance, when it was started here)."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started_here:
            self._ray.shutdown()
            self._started_here = False

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Worker:
    """One Ray actor: runs one task at a time; its process keeps the models' sessions between tasks."""

    def run(self, fn: Callable[[Any], Any], task: Any) -> Any:
        return fn(task)

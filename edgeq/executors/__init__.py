"""Where the work of `validate`, `analyze` and `auto` runs: data shards and candidates are plain picklable tasks,
mapped through one interface with two engines behind it.

- `local` (the default): a pool of spawned worker processes on this machine (`LocalPool`);
- `ray`: the actors of a Ray cluster (`RayCluster`: `RAY_ADDRESS`, or a Ray instance started here), from the
  optional `edgeq[ray]` extra.

Large values travel once: `share_arrays` (validation data held in memory), `share_model` (a model's files) and
`share` (any other picklable value: a prepared graph; locally it travels with each task, over the pipe) give a
`Shared` handle that tasks carry and workers resolve (`edgeq.executors.worker`), each worker keeping one inference
session per model. Data given as a file is read by the workers from the path (shared storage), never through the
driver. A task whose worker dies is retried (`RETRIES` times) and said in `notes`; a task that keeps killing its
worker fails the run (`WorkerLost`); an error raised by the task itself (a `UserError` on the user's data) is raised
as it is, at once.

>>> with make_executor("local", workers=2) as pool:        # doctest: +SKIP
...     pool.map(abs, [-1, -2], "absolute values")
[1, 2]
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from edgeq.errors import ConfigError

EXECUTORS = ("local", "ray")
RETRIES = 2   # a task whose worker dies runs at most 1 + RETRIES times


class WorkerLost(Exception):
    """A task killed its worker on every attempt (out of memory, a crash in native code): the run stops, naming it."""


@dataclass(frozen=True)
class Shared:
    """A value put once where the workers can read it: `kind` "memory" (this process), "file" (a path on shared
    storage) or "ray" (an object in Ray's object store)."""

    kind: str
    value: Any


class Executor(Protocol):
    """Runs `fn` on every task and returns the results in task order, with one progress line over them all."""

    workers: int
    notes: list[str]   # what was retried, for the run's output

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], description: str) -> list[Any]: ...

    def share_arrays(self, arrays: dict[str, np.ndarray]) -> Shared: ...

    def share(self, value: Any) -> Shared: ...

    def share_model(self, path: str) -> Shared: ...

    def close(self, *, stop_workers: bool = False) -> None: ...


class InProcess:
    """Runs tasks one after another in this process (debugging, tiny models, the API's default)."""

    workers = 1

    def __init__(self) -> None:
        self.notes: list[str] = []

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], description: str = "tasks") -> list[Any]:
        from edgeq.progress import track

        return [fn(t) for t in track(tasks, description, total=len(tasks))]

    def share_arrays(self, arrays: dict[str, np.ndarray]) -> Shared:
        return Shared("memory", arrays)

    def share(self, value: Any) -> Shared:
        return Shared("memory", value)

    def share_model(self, path: str) -> Shared:
        return Shared("file", str(path))

    def close(self, *, stop_workers: bool = False) -> None:
        """Nothing runs outside this process."""

    def __enter__(self) -> "InProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(kind: str = "local", workers: int | None = None) -> Executor:
    """The executor `--executor` names; `workers` None: the machine's cores (local) or the cluster's CPUs (ray)."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers} is not a positive number of workers", "give 1 or more, or leave it out")
    if kind == "local":
        from edgeq.executors.local import LocalPool

        return LocalPool(workers)
    if kind == "ray":
        from edgeq.executors.ray_cluster import RayCluster

        return RayCluster(workers)
    raise ConfigError(f"unknown executor {kind!r}", f"use one of: {', '.join(EXECUTORS)}")


def as_executor(executor: Executor | str | None, workers: int | None = None) -> tuple[Executor, bool]:
    """The executor to use and whether the caller owns it (made here from a name: the caller closes it)."""
    if executor is None:
        return InProcess(), True
    if isinstance(executor, str):
        return make_executor(executor, workers), True
    return executor, False


@contextmanager
def running(executor: Executor | str | None, workers: int | None = None) -> Iterator[Executor]:
    """The executor to use; one made here from a name is closed after, its workers stopped on an interrupt."""
    pool, own = as_executor(executor, workers)
    if not own:
        yield pool
        return
    try:
        yield pool
    except BaseException as exc:
        pool.close(stop_workers=not isinstance(exc, Exception))
        raise
    pool.close()


class Retries:
    """The attempts of one `map`'s tasks: `lost` counts a task whose worker died and says whether it may run again
    (else raises `WorkerLost` naming it); `note` is what the run's output says about the retried ones."""

    def __init__(self, tasks: Sequence[Any], description: str) -> None:
        self.tasks, self.description = tasks, description
        self.attempts = [0] * len(tasks)
        self.retried: dict[str, int] = {}

    def started(self, index: int) -> None:
        self.attempts[index] += 1

    def lost(self, index: int, why: str) -> None:
        name = task_name(self.tasks[index], index)
        if self.attempts[index] > RETRIES:
            raise WorkerLost(f"task {name} killed its worker on all {self.attempts[index]} attempts ({why}): the run "
                             "stopped — check the worker's memory and logs, or run with fewer --workers")
        self.retried[name] = self.retried.get(name, 0) + 1

    def note(self) -> list[str]:
        if not self.retried:
            return []
        detail = ", ".join(f"{name} ({times}×)" for name, times in self.retried.items())
        return [f"{self.description}: a worker died and its task was run again: {detail}; results are complete"]


def task_name(task: Any, index: int) -> str:
    """How a task is named in notes and errors: its own `name`, else its place."""
    return str(getattr(task, "name", None) or f"#{index + 1}")

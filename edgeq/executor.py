"""Where candidate evaluations run. `auto` only calls `executor.map(fn, tasks)`: a local process pool now; a
distributed engine plugs in by implementing the same method (tasks and results are plain picklable values).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Protocol, Sequence

from edgeq import interrupts


class Executor(Protocol):
    """Runs `fn` on every task, returns the results in task order."""

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]: ...

    def close(self, *, stop_workers: bool = False) -> None: ...


class InProcess:
    """Runs tasks one after another in this process (debugging, tiny models)."""

    workers = 1

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        return [fn(t) for t in tasks]

    def close(self, *, stop_workers: bool = False) -> None:
        """Nothing runs outside this process."""


class LocalPool:
    """A pool of worker processes (spawned, so no ONNX Runtime thread state is forked), started on first use.

    >>> with LocalPool(2) as pool:                              # doctest: +SKIP
    ...     pool.map(abs, [-1, -2])
    [1, 2]
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        if not tasks:
            return []
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=interrupts.ignore_in_worker)
        return list(self._pool.map(fn, tasks))

    def close(self, *, stop_workers: bool = False) -> None:
        """Wait for the running tasks, or (`stop_workers`, on an interrupt) kill the workers first."""
        if self._pool is None:
            return
        if stop_workers:
            # ProcessPoolExecutor has no public way to stop running tasks before Python 3.14 (terminate_workers).
            for process in list(self._pool._processes.values()):
                process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(stop_workers=exc_type is not None and not issubclass(exc_type, Exception))

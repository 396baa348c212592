"""The local executor: a pool of spawned worker processes on this machine (spawned, so no ONNX Runtime thread
state is forked), started on first use, one process per core by default.

A worker that dies takes the pool with it (`BrokenProcessPool` fails every task in flight): the pool is started
again and the tasks that were in flight run again, alone, so the one that kills its worker is the one that runs out
of attempts; results already in are kept.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeq import interrupts
from edgeq.executors import Retries, Shared
from edgeq.progress import step


class LocalPool:
    """Worker processes on this machine.

    >>> with LocalPool(2) as pool:                              # doctest: +SKIP
    ...     pool.map(abs, [-1, -2], "absolute values")
    [1, 2]
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.notes: list[str] = []
        self._pool: ProcessPoolExecutor | None = None
        self._folder: Path | None = None   # shared arrays, as .npz files the workers read

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], description: str = "tasks") -> list[Any]:
        if not tasks:
            return []
        results: dict[int, Any] = {}
        retries = Retries(tasks, description)
        waiting, suspects = deque(range(len(tasks))), deque[int]()
        with step(description, total=len(tasks)) as line:
            while waiting or suspects:
                running: dict[Future, int] = {}
                try:
                    self._run(fn, tasks, waiting, suspects, running, retries, results, line.advance)
                except BrokenProcessPool:
                    self._discard()
                    for index in sorted(running.values()):
                        retries.lost(index, "the worker process died")
                        suspects.append(index)
        self.notes += retries.note()
        return [results[i] for i in range(len(tasks))]

    def _run(self, fn: Callable[[Any], Any], tasks: Sequence[Any], waiting: deque[int], suspects: deque[int],
             running: dict[Future, int], retries: Retries, results: dict[int, Any], advance: Callable[[], None]) -> None:
        """Submit and collect until every task is done; a suspect (in flight when a worker died) runs alone."""
        pool = self._started()
        while waiting or suspects or running:
            while not running and suspects:
                _submit(pool, fn, tasks, suspects.popleft(), running, retries)
            while waiting and not suspects and len(running) < self.workers and not _suspect_running(running, retries):
                _submit(pool, fn, tasks, waiting.popleft(), running, retries)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running[future]] = future.result()   # the task's own error is raised as it is
                del running[future]
                advance()

    def share_arrays(self, arrays: dict[str, np.ndarray]) -> Shared:
        """Written once to a temporary .npz that every worker reads (tasks carry its path, not the arrays)."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="edgeq-shared-"))
        path = self._folder / f"arrays{len(list(self._folder.iterdir()))}.npz"
        np.savez(path, **arrays)
        return Shared("npz", str(path))

    def share(self, value: Any) -> Shared:
        """Sent with each task (pickled over the local pipe): for values a few tasks carry."""
        return Shared("memory", value)

    def share_model(self, path: str) -> Shared:
        return Shared("file", str(path))

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=interrupts.ignore_in_worker)
        return self._pool

    def _discard(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self, *, stop_workers: bool = False) -> None:
        """Wait for the running tasks, or (`stop_workers`, on an interrupt) kill the workers first; remove the
        shared arrays."""
        if self._pool is not None and stop_workers:
            # ProcessPoolExecutor has no public way to stop running tasks before Python 3.14 (terminate_workers).
            for process in list(self._pool._processes.values()):
                process.kill()
        self._discard()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(stop_workers=exc_type is not None and not issubclass(exc_type, Exception))


def _submit(pool: ProcessPoolExecutor, fn: Callable[[Any], Any], tasks: Sequence[Any], index: int,
            running: dict[Future, int], retries: Retries) -> None:
    """One attempt of a task; counted as in flight even when the pool broke before taking it (it runs again)."""
    retries.started(index)
    future: Future = Future()
    try:
        # submit may start the pool's manager thread and processes: an interrupt between creating that thread and
        # starting it left a pool whose shutdown fails ("cannot join thread before it is started", seen in CI).
        with interrupts.deferred():
            future = pool.submit(fn, tasks[index])
    except BrokenProcessPool as exc:
        future.set_exception(exc)
    running[future] = index


def _suspect_running(running: dict[Future, int], retries: Retries) -> bool:
    """A task on its second attempt or later runs alone."""
    return any(retries.attempts[index] > 1 for index in running.values())

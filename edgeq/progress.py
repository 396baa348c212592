"""Progress bars for the steps that can take more than a couple of seconds (calibration passes, validation,
sensitivity analysis, auto's phases, benchmark rounds, training), on stderr and never on stdout.

One live display per process: a step inside another (calibration inside auto's search) adds its own line to the
display already shown and removes it when done, so nested steps never fight over the terminal. Nothing is drawn
under the command line's `--quiet`, when stderr is not an interactive terminal (pipes, CI logs, files), or in a
worker process (its parent draws). Tests inject a console: `configure(console=Console(file=..., force_terminal=True))`.

>>> for batch in track(batches, "calibrating", total=8):    # doctest: +SKIP
...     observe(batch)
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

T = TypeVar("T")
Total = int | Callable[[], int | None] | None


class Step:
    """A running step's line: `advance()` after each unit of work, `describe(text)` when the step moves on."""

    def __init__(self, progress: "Progress | None" = None, task: "TaskID | None" = None) -> None:
        self._progress, self._task = progress, task

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


class _Display:
    """The process's settings and its one live display, shared by every step (threads included)."""

    def __init__(self) -> None:
        self.quiet = False
        self.console: Console | None = None  # injected; otherwise a fresh stderr console per outermost step
        self.lock = threading.Lock()
        self.progress: Progress | None = None
        self.steps = 0


_display = _Display()


def configure(*, quiet: bool | None = None, console: "Console | None" = None) -> None:
    """`quiet`: draw nothing (the CLI's --quiet). `console`: draw on this console instead of stderr's (tests);
    the console decides whether it is a terminal."""
    if quiet is not None:
        _display.quiet = quiet
    if console is not None:
        _display.console = console


def reset() -> None:
    """Back to the defaults: bars on stderr when it is an interactive terminal."""
    _display.quiet, _display.console = False, None


def _console() -> "Console | None":
    """The console to draw on, or None when nothing should be drawn."""
    if _display.quiet or multiprocessing.parent_process() is not None:
        return None
    from rich.console import Console

    console = _display.console or Console(stderr=True)
    return console if console.is_interactive else None


@contextmanager
def step(description: str, total: Total = None) -> Iterator[Step]:
    """A line for a step: a bar when `total` is known, elapsed time and a pulse otherwise. `total` may be a
    function, called only when a line is drawn (counting can cost I/O, e.g. reading every file's header)."""
    with _display.lock:
        progress = _display.progress or _start()
        if progress is not None:
            _display.steps += 1
    if progress is None:
        yield Step()
        return
    task = progress.add_task(description, total=total() if callable(total) else total)
    progress.refresh()  # drawn at once, not at the next tick: a step shorter than a tick still shows what runs
    try:
        yield Step(progress, task)
    finally:
        with _display.lock:
            progress.remove_task(task)
            _display.steps -= 1
            if _display.steps == 0:
                progress.stop()
                _display.progress = None


def _start() -> "Progress | None":
    console = _console()
    if console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    own = _display.console is None
    # Lines written while the bars are drawn would be overwritten by the next redraw, so they are printed above the
    # bars: stderr's always, stdout's only when it is the very terminal the bars are on (a piped or redirected stdout
    # carries results and stays byte for byte the same).
    progress = Progress(*columns, console=console, transient=True, redirect_stderr=own,
                        redirect_stdout=own and _stdout_is_the_same_terminal())
    progress.start()
    _display.progress = progress
    return progress


def _stdout_is_the_same_terminal() -> bool:
    try:
        return sys.stdout.isatty() and os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (AttributeError, OSError, ValueError):  # streams replaced by objects without a file descriptor
        return False


def track(items: Iterable[T], description: str, total: Total = None) -> Iterator[T]:
    """Yield `items` with a line that advances after each one."""
    with step(description, total) as line:
        for item in items:
            yield item
            line.advance()

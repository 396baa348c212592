"""Ctrl-C (SIGINT) and SIGTERM end a run with one line on stderr and exit 130 / 143.

The signal raises `Interrupted` in the main thread; the `finally` blocks it unwinds through remove temporaries,
staged folders and worker processes, so the previous outputs stay exactly as they were. Only the standard library is
imported here: the handlers are installed before the heavy imports, so an interrupt while they load is one line too.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A run stopped by a signal. Not an Exception (so `except Exception` cannot swallow it) and not a
    KeyboardInterrupt (which typer turns into a returned exit code)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)

    def message(self) -> str:
        how = "Ctrl-C (SIGINT)" if self.signum == signal.SIGINT else signal.Signals(self.signum).name
        return f"edgeq: interrupted by {how}; temporary files removed, earlier outputs left as they were"


def install() -> dict[int, Any]:
    """Make SIGINT and SIGTERM raise Interrupted in the main thread; returns the handlers they had, for `restore`."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, _raise)
    return previous


def restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def quiet_startup() -> None:
    """When the process is the edgeq command (`edgeq ...`, or `python -m edgeq.cli` while the package loads, when
    Python sets argv[0] to "-m"), a signal before `main()` installs its handlers ends it with one line: nothing has
    been written yet. A program importing edgeq as a library keeps its own handlers."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program not in ("edgeq", "-m"):
        return
    for signum in SIGNALS:
        signal.signal(signum, _exit_at_once)


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write(Interrupted(signum).message() + "\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _raise(signum: int, frame: FrameType | None) -> None:
    # The clean-up the exception unwinds through must not be cut short by a second Ctrl-C.
    for other in SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def ignore_in_worker() -> None:
    """Worker processes leave interrupts to the main process, which stops them (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while renames that belong together run (a model and its data file, a folder
    swap); a signal that came meanwhile is handled as before when the block ends."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])

"""Progress bars for the long steps (calibration, benchmarking, training); silent when stderr is not a terminal."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | Callable[[], int | None] | None = None) -> Iterator[T]:
    """Yield `items` with a progress bar on a terminal. `total` may be a function, called only when a bar is shown
    (counting can cost I/O, e.g. reading the header of every file in a folder)."""
    if not sys.stderr.isatty():
        yield from items
        return
    if callable(total):
        total = total()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)

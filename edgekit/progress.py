"""Rich progress bars for long work (calibration, training, export steps).

Every bar has the same columns (what, bar, done/total, elapsed, remaining, a status field). On a
terminal it redraws live; in a log (not a terminal) Rich writes each bar once, when its context ends,
so long jobs that want a line per stage in a log open one bar per stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True)


def progress_bar(enabled: bool = True) -> Progress:
    """A bar on stderr; tasks need a ``status`` field (``add_task(..., status="")``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)


@contextmanager
def step(description: str) -> Iterator[None]:
    """A spinner-free one-line step with its elapsed time, for work without a natural count."""
    with progress_bar() as progress:
        task = progress.add_task(description, total=1, status="")
        yield
        progress.advance(task)

"""The one progress-bar layout of onelayer: a title, bar, done/total, elapsed and remaining time."""

from __future__ import annotations


def progress_bar(title: str, enabled: bool = True, info: bool = False):
    """A rich ``Progress`` whose first column is ``title`` (may use ``{task.fields[...]}``); ``info``
    adds a trailing ``{task.fields[info]}`` column for per-step numbers."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(title), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, disable=not enabled)

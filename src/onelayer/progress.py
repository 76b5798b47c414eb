"""The terminal: the one progress-bar layout of onelayer, a live board of a plan's runs, and other libraries'
output kept quiet (their progress bars, notices and warnings tell a user of onelayer nothing; ``--verbose``
brings them back)."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = str(Path(__file__).resolve().parent)

# read by the libraries when they are imported (which the CLI does after it starts): tqdm's bars (the GGUF
# de-quantization bar, dataset downloads), the hub's download bars, transformers' notices (generation-config,
# attention and tokenizer notices, loading reports) and its own bars
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


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


# ----------------------------------------------------------------------------------------- a plan's runs


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass
class RunBoard:
    """Where a plan of runs stands: runs done of all, the run going on, time left (estimated from the runs this
    process finished) and what the caller's ``summary`` says so far (e.g. the best layer). On a terminal it
    is a live table; elsewhere (CI logs, files) one line per finished run; nothing when disabled."""

    label: str
    total: int
    done: int = 0
    enabled: bool = True
    summary: Callable[[], list[tuple[str, str]]] | None = None
    console: object = None  # a rich Console; default: stdout's
    failed: int = 0
    current: str = ""
    _started: float = 0.0
    _finished_here: int = 0
    _live: object = None

    def __post_init__(self) -> None:
        self._started = time.monotonic()

    def __enter__(self) -> RunBoard:
        if self.enabled:
            from rich.console import Console

            self.console = self.console or Console()
            if self.console.is_terminal:
                from rich.live import Live

                self._live = Live(self.table(), console=self.console, refresh_per_second=1)
                self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.__exit__(*exc)

    def seconds_left(self) -> float | None:
        if not self._finished_here:
            return None
        return (time.monotonic() - self._started) / self._finished_here * (self.total - self.done)

    def rows(self) -> list[tuple[str, str]]:
        left = self.seconds_left()
        rows = [("runs done", f"{self.done} of {self.total}" + (f" ({self.failed} failed)" if self.failed else ""))]
        if self.current and self.done < self.total:
            rows.append(("running", self.current))
        rows += self._summary()
        rows.append(("elapsed", _minutes(time.monotonic() - self._started)))
        rows.append(("time left", "estimated after the first run" if left is None else f"about {_minutes(left)}"))
        return rows

    def _summary(self) -> list[tuple[str, str]]:
        try:
            return self.summary() if self.summary else []
        except Exception:  # a half-written result must not stop the plan; the next update reads it whole
            return []

    def table(self):
        from rich.table import Table

        table = Table(title=self.label, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in self.rows():
            table.add_row(key, value)
        return table

    def start(self, name: str) -> None:
        self.current = name
        if self._live is not None:
            self._live.update(self.table())

    def finish(self, name: str, failed: int = 0, count: int = 1) -> None:
        """``count`` runs done under ``name`` (a group trained together is one line), ``failed`` of them failed."""
        self.done += count
        self._finished_here += count
        self.failed += failed
        if self._live is not None:
            self._live.update(self.table())
        elif self.enabled:
            facts = "; ".join(f"{k} {v}" for k, v in self.rows() if k != "running")
            what = "failed" if failed == count else f"finished ({failed} failed)" if failed else "finished"
            self.console.print(f"{self.label}: {name} {what}; {facts}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------- other libraries, quiet


@dataclass
class Hidden:
    """What :func:`quiet_libraries` kept off the terminal."""

    warnings: int = 0


@contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[Hidden]:
    """While active, hide other libraries' progress bars, notices (transformers below errors) and Python
    warnings (counted in the yielded :class:`Hidden`); onelayer's own warnings and every library's errors still
    show. ``verbose`` changes nothing. Everything is put back on exit."""
    hidden = Hidden()
    if verbose:
        yield hidden
        return
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    restore = _quiet_imported_libraries()
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(PACKAGE_DIR):
            show(message, category, filename, lineno, file, line)
        else:
            hidden.warnings += 1

    try:
        with warnings.catch_warnings():
            warnings.showwarning = showwarning  # e.g. dependencies' SyntaxWarnings, when first imported
            yield hidden
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        restore()


def _quiet_imported_libraries() -> Callable[[], None]:
    """Quiet the libraries already imported (the environment reaches only those imported later); returns
    what puts them back (transformers' notices to their default level if it was imported while quiet; bars
    that were off from the start stay off: the libraries read that from the environment once)."""
    transformers_was = "transformers" in sys.modules
    hub_was = "huggingface_hub" in sys.modules
    before = {}
    if transformers_was:
        from transformers.utils import logging as hf_logging

        before["verbosity"], before["bars"] = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if hub_was:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        before["hub_bars"] = not are_progress_bars_disabled()
        disable_progress_bars()

    def restore() -> None:
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(before.get("verbosity", hf_logging.WARNING))
            if before.get("bars"):  # (it enables the hub's bars too)
                hf_logging.enable_progress_bar()
        if before.get("hub_bars"):
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()

    return restore

"""A directory of named runs: where each run lives and what it leaves behind.

Scans and strategy comparisons are both plans of named runs under ``DIR/runs/NAME``. A run is done
when its ``result.json`` exists; a run that raised leaves ``error.txt`` (and is retried the next time,
without redoing the others); a finished run's per-example results are the file its ``result.json``
names. Reading these needs nothing of the training stack.
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path
from typing import Protocol

from ..config import RESUMABLE, TrainConfig, recipe_difference
from ..errors import OneLayerError
from ..jsonl import exists, read_jsonl
from ..profile import parse_reference, profile_file


class NamedRun(Protocol):
    name: str


def run_dir(out: Path, run: NamedRun) -> Path:
    return Path(out) / "runs" / run.name


def run_status(out: Path, run: NamedRun) -> str:
    directory = run_dir(out, run)
    if (directory / "result.json").is_file():
        return "done"
    return "failed" if (directory / "error.txt").is_file() else "pending"


def read_result(out: Path, run: NamedRun) -> dict:
    return json.loads((run_dir(out, run) / "result.json").read_text())


def examples_file(out: Path, run: NamedRun, source: str = "") -> Path:
    """Per-example results of a finished run: in-domain ones (``source`` empty), or those of the
    out-of-domain evaluation named ``source`` (see :mod:`onelayer.experiments.ood`)."""
    directory = run_dir(out, run)
    return directory / "ood" / f"{source}.examples.jsonl" if source else final_examples(directory)


def final_examples(directory: Path) -> Path:
    """The per-example file of the final evaluation that a run directory's ``result.json`` names (it may be
    stored compressed, as ``.jsonl.gz``: :func:`onelayer.jsonl.read_jsonl` reads either)."""
    path = Path(json.loads((Path(directory) / "result.json").read_text())["examples"])
    # older runs stored absolute paths: fall back to the run's own evals/ when the directory was moved
    return path if path.is_absolute() and exists(path) else Path(directory) / "evals" / path.name


def step_examples(directory: Path, step: int) -> Path:
    """The per-example file of a run's evaluation after ``step`` steps (``--eval-every``)."""
    return Path(directory) / "evals" / f"step{step:06d}.examples.jsonl"


def evaluated_steps(directory: Path) -> list[int]:
    """The steps after which a run was evaluated (its per-example files, compressed or not)."""
    found = (re.fullmatch(r"step(\d+)\.examples\.jsonl(\.gz)?", p.name) for p in (Path(directory) / "evals").glob("step*"))
    return sorted({int(m[1]) for m in found if m})


def example_scores(path: Path) -> list[float]:
    """Each example's score: the fraction of its samples judged correct (``.jsonl.gz`` read as well)."""
    rows = read_jsonl(path, missing_ok=False)
    return [sum(r["correct"]) / len(r["correct"]) for r in rows]


def write_error(path: Path, err: BaseException) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = "".join(traceback.format_exception(err))
    path.write_text(f"{type(err).__name__}: {err}\n\n{trace}")


def _moved(name: str, value):
    """A profile reference (``top:10@SCAN``, ``--lr-from SCAN?protocol=best``) as the profile file it reads, without
    its scan's path, which changes when results are copied off the machine that made them or their folder is
    renamed: ``SCAN?protocol=best`` and ``SCAN/profile-best.json`` are one profile, ``SCAN/profile.json`` another.
    (Which scan a comparison reads is its own argument, the same for all its runs.)"""
    if name == "layers" and isinstance(value, str) and "@" in value:
        spec, _, scan = value.partition("@")
        return f"{spec}@{_moved('lr_from', scan)}"
    if name == "lr_from" and isinstance(value, str) and value:
        path, protocol, step, auc = parse_reference(value)
        return path.name if path.suffix == ".json" else profile_file("", protocol, step, auc).name
    return value


def check_finished(directory: Path, recipe: TrainConfig, lr_scale: float = 1.0) -> None:
    """A finished run is kept (and skipped) only if it ran the recipe the command asks for now: a scan or
    comparison resumed with other flags would otherwise mix two experiments in one profile without a word. Fields
    a run may be resumed with are left out, except ``steps`` (a finished run stopped at its own; unless an
    adaptive scan stopped it early on purpose) and ``eval_n`` (profiles pair the runs' final evaluations). Runs
    without a saved recipe (the base model's) are not checked. ``lr_scale``: the run trains at that multiple of the
    command's ``--lr`` (a learning-rate grid, a strategy's ``*k``), which an error about ``--lr`` says."""
    saved = Path(directory) / "config.json"
    if not saved.is_file():
        return
    stopped = "stopped_at" in json.loads((Path(directory) / "result.json").read_text())
    checked = {"eval_n"} if stopped else {"steps", "eval_n"}
    differs = recipe_difference(json.loads(saved.read_text()), recipe, RESUMABLE - checked, _moved)
    if differs:
        scaled = f" (its rate is {lr_scale:g}x --lr)" if differs.startswith("--lr ") and lr_scale != 1 else ""
        raise OneLayerError(f"{directory} finished with another {differs}{scaled}: resume with the "
                            f"flags it was made with, or pass another --out for a new experiment")

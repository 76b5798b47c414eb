"""Score stored completions again with today's scorer, without generating or training anything.

A scorer bug found after the runs (a reward the model could obtain without solving the task) makes every
saved evaluation suspect; their completions are on disk, so the evaluations can be corrected in minutes.
Every per-example file under a path (a run's ``evals/`` and ``ood/``, an ``eval`` output directory, every run
of a scan or comparison) is scored again with its own task and options; the file, its summary beside it, the
run's ``eval.jsonl`` row of that step and ``result.json`` are rewritten, and ``rescored.json`` in the run records
each file's accuracy before and after. A scan's profile is then computed again. Training itself is not
corrected: the runs learned from the rewards of the old scorer (the report says so).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import OneLayerError
from ..evaluate import correctness, example_record
from ..jsonl import read_jsonl, resolve, write_jsonl
from ..tasks import AgentTask, Example, get_task, outcome_fractions

EXAMPLES = re.compile(r"(.+)\.examples\.jsonl(\.gz)?")


@dataclass
class Rescored:
    file: Path
    examples: int
    changed: int  # completions whose correctness changed
    before: float
    after: float
    skipped: str = ""  # why the file was not scored again (then nothing else is set)


def examples_files(path: Path) -> list[Path]:
    """Every per-example result file under ``path`` (a run, an eval directory, a scan or comparison)."""
    files = sorted(p for p in Path(path).rglob("*.examples.jsonl*") if EXAMPLES.fullmatch(p.name)
                   and "checkpoint" not in p.parts)
    if not files:
        raise OneLayerError(f"{path} holds no per-example results (*.examples.jsonl): give a run, scan or eval directory")
    return files


def summary_file(examples: Path) -> Path:
    return examples.with_name(EXAMPLES.fullmatch(examples.name)[1] + ".json")


def run_config(examples: Path) -> dict:
    """The ``config.json`` of the run the file belongs to (the nearest one above it), or {}."""
    for parent in examples.parents:
        if (parent / "config.json").is_file():
            return json.loads((parent / "config.json").read_text())
        if (parent / "runs").is_dir():
            break
    return {}


def task_of(examples: Path, summary: dict, cache: dict):
    """The task that scored ``examples``: named by its summary, with the summary's options (out-of-domain
    files keep them) or else the run's."""
    config = run_config(examples)
    name = summary.get("task") or config.get("task")
    if not name:
        return None
    options = summary.get("task_options", config.get("task_options", {}) if config.get("task") == name else {})
    key = (name, json.dumps(options, sort_keys=True))
    if key not in cache:
        cache[key] = get_task(name, options)
    return cache[key]


def rescore_rows(task, rows: list[dict]) -> tuple[list[dict], list, int]:
    """``rows`` with ``extracted``, ``correct`` and ``rewards`` scored again; also every score and how many
    completions changed correctness."""
    scores, changed, out = [], 0, []
    for row in rows:
        example = Example(row["id"], row["question"], row["answer"])
        own = task.score_all(row["completions"], [example] * len(row["completions"]))
        changed += sum(bool(s.correct) != bool(c) for s, c in zip(own, row["correct"], strict=True))
        scores += own
        out.append({**row, **example_record(example, row["completions"], own)})
    return out, scores, changed


def rescore_file(examples: Path, cache: dict, write: bool = True) -> Rescored | None:
    """Score one per-example file again and update what was computed from it; None for files of votes
    (ensembles: vote again with ``onelayer ensemble``), a skipped :class:`Rescored` for files that cannot be."""
    summary_path = summary_file(examples)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rows = read_jsonl(examples)
    if not rows or "completions" not in rows[0] or "question" not in rows[0]:
        return None
    task = task_of(examples, summary, cache)
    if task is None or isinstance(task, AgentTask):
        why = "agent episodes are not stored as completions" if task else "no task named beside it or in its run"
        return Rescored(examples, len(rows), 0, float("nan"), float("nan"), skipped=why)
    samples = len(rows[0]["correct"])
    before = correctness(rows, samples)["accuracy"]
    rows, scores, changed = rescore_rows(task, rows)
    fields = {**correctness(rows, samples), "mean_reward": sum(s.reward for s in scores) / len(scores),
              "outcomes": outcome_fractions(scores)}
    if write:
        write_jsonl(examples, rows)
        if summary:
            summary_path.write_text(json.dumps({**summary, **fields}, indent=2))
        update_run(examples, fields)
    return Rescored(examples, len(rows), changed, before, fields["accuracy"])


def update_run(examples: Path, fields: dict) -> None:
    """Carry new evaluation numbers into the run's ``eval.jsonl`` row of that step and its ``result.json``."""
    if examples.parent.name != "evals":
        return
    directory = examples.parent.parent
    step = re.fullmatch(r"step(\d+)", EXAMPLES.fullmatch(examples.name)[1])
    if step is not None and (log := resolve(directory / "eval.jsonl")).is_file():  # or its .gz
        rows = [{**r, **fields} if r.get("step") == int(step[1]) else r for r in read_jsonl(log)]
        write_jsonl(log, rows)
    result = directory / "result.json"
    if result.is_file():
        record = json.loads(result.read_text())
        if Path(str(record.get("examples", ""))).name.split(".examples")[0] == EXAMPLES.fullmatch(examples.name)[1]:
            result.write_text(json.dumps({**record, **fields}, indent=2))


def rescore(path: str | Path, write: bool = True, progress=None) -> list[Rescored]:
    """Score every per-example file under ``path`` again (module docstring); ``write=False`` only reports.
    A scan's profile is written again afterwards."""
    path, cache, done = Path(path), {}, []
    for examples in examples_files(path):
        found = rescore_file(examples, cache, write)
        if found is not None:
            done.append(found)
        if progress is not None:
            progress(examples)
    if write:
        by_run: dict[Path, list[Rescored]] = {}
        for item in done:
            if not item.skipped:
                by_run.setdefault(run_root(item.file), []).append(item)
        for root, items in by_run.items():
            record = root / "rescored.json"
            history = json.loads(record.read_text()) if record.is_file() else []
            history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": [
                {"file": str(i.file.relative_to(root)), "examples": i.examples, "changed": i.changed,
                 "accuracy_before": i.before, "accuracy_after": i.after} for i in items]})
            record.write_text(json.dumps(history, indent=2))
        if (path / "scan.json").is_file() and any(i.changed for i in done):
            from .scan import write_profile

            write_profile(path)
    return done


def run_root(examples: Path) -> Path:
    """The run (or eval) directory a per-example file belongs to."""
    return examples.parent.parent if examples.parent.name in ("evals", "ood", "samples") else examples.parent

"""A directory of named runs that survives kills and shares its work over torchrun ranks.

Scans and strategy comparisons are both plans of named runs under ``DIR/runs/NAME``. A run is done
when its ``result.json`` exists; a run that raised leaves ``error.txt`` and is retried the next time,
without redoing the others; a killed training run resumes from its own checkpoint. Under torchrun,
the runs not yet done are dealt out over the ranks (rank r takes the r-th, r + world-th, ...), and
every rank waits for the others at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .analysis.curves import read_jsonl
from .analysis.param_change import relative_change, squared_norms
from .checkpoint import checkpoint_tensors
from .config import TrainConfig
from .errors import FastEngineUnavailable
from .evaluate import evaluate, write_eval
from .layers import select_layers, selected_names
from .models import parameter_layers
from .progress import progress_bar
from .tasks import get_task
from .train import TrainResult, model_for, precision_context, train


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
    out-of-domain evaluation named ``source`` (see :mod:`onelayer.ood`)."""
    directory = run_dir(out, run)
    return directory / "ood" / f"{source}.examples.jsonl" if source else final_examples(directory)


def final_examples(directory: Path) -> Path:
    """The per-example file of the final evaluation that a run directory's ``result.json`` names."""
    path = Path(json.loads((Path(directory) / "result.json").read_text())["examples"])
    # older runs stored absolute paths: fall back to the run's own evals/ when the directory was moved
    return path if path.is_absolute() and path.is_file() else Path(directory) / "evals" / path.name


def example_scores(path: Path) -> list[float]:
    """Each example's score: the fraction of its samples judged correct."""
    return [sum(r["correct"]) / len(r["correct"]) for r in map(json.loads, path.read_text().splitlines())]


@dataclass(frozen=True)
class Shard:
    """This process's share of a plan: runs ``rank``, ``rank + world``, ... of it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process: rank 0 of 1)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def take(self, plan: list) -> list:
        return plan[self.rank::self.world]

    def device(self, requested: str) -> str:
        """One GPU per local rank, wrapping around when there are more processes than GPUs."""
        if requested or not torch.cuda.is_available() or self.world == 1:
            return requested
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"


def barrier(shard: Shard) -> None:
    """Wait for every rank (gloo over torchrun's rendezvous); a no-op for one process."""
    if shard.world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        # ranks that finish their share early wait here for hours-long runs of the others
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dist.barrier()


@dataclass(frozen=True)
class RunGroup:
    """Runs done together by one call of the work (concurrent layer variants)."""

    runs: tuple

    @property
    def name(self) -> str:
        return f"{self.runs[0].name} and {len(self.runs) - 1} more"


def for_each_run(runs: list, work: Callable[[NamedRun], object], error_files: Callable[[NamedRun], list[Path]],
                 label: str, progress: bool = True, done: int = 0) -> None:
    """Call ``work`` on each run (or :class:`RunGroup`) under a progress bar (done / left, elapsed,
    estimate). Its stale error files are removed when it starts; one that raises gets its error
    written to each of ``error_files(run)`` and the others go on."""
    with progress_bar(f"{label} {{task.fields[current]}}", progress) as bar:
        task_id = bar.add_task(label, total=done + len(runs), completed=done, current="")
        for run in runs:
            bar.update(task_id, current=run.name)
            paths = error_files(run)
            for path in paths:
                path.unlink(missing_ok=True)
            try:
                work(run)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one broken run must not cost the others
                for path in paths:
                    write_error(path, err)
            bar.advance(task_id)


def write_error(path: Path, err: BaseException) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = "".join(traceback.format_exception(err))
    path.write_text(f"{type(err).__name__}: {err}\n\n{trace}")


def run_share(runs: list, work: Callable, out: Path, shard: Shard, progress: bool, label: str,
              group_size: int = 1) -> None:
    """Deal the unfinished runs of ``runs`` out over the ranks and do this rank's share, one after the
    other (``work(run)``), or as :class:`RunGroup` s of up to ``group_size`` runs (``work(group)``);
    then wait for the other ranks. Dealing out only what is left keeps a resumed plan balanced."""
    barrier(shard)  # every rank must see the same finished runs before the rest is dealt out
    mine = shard.take([r for r in runs if run_status(out, r) != "done"])
    if group_size > 1 and mine:
        # as few groups as the size allows, of even sizes (30 runs at up to 22: 15 + 15, not 22 + 8)
        count = -(-len(mine) // group_size)
        size = -(-len(mine) // count)
        groups = [RunGroup(tuple(mine[i:i + size])) for i in range(0, len(mine), size)]
        for_each_run(groups, work, lambda g: [run_dir(out, r) / "error.txt" for r in g.runs], label, progress)
    else:
        for_each_run(mine, work, lambda r: [run_dir(out, r) / "error.txt"], label, progress)
    barrier(shard)


def _final_evaluation(recipe: TrainConfig, model, tokenizer, step: int, load_dtype: torch.dtype) -> dict:
    """Evaluate ``model`` (loaded in ``load_dtype``) once on ``recipe.eval_n`` examples, written under
    ``recipe.out/evals``."""
    device = next(model.parameters()).device
    task = get_task(recipe.task, recipe.task_options)
    with precision_context(device, load_dtype):
        result = evaluate(model, tokenizer, task, recipe.eval_n, max_new_tokens=recipe.sampling.max_new_tokens,
                          batch_size=recipe.sampling.generation_batch_size, seed=recipe.seed,
                          engine=recipe.sampling.engine)
    write_eval(result, Path(recipe.out) / "evals", f"step{step:06d}")
    return {"step": step, **result.summary()}


def _trained_summary(recipe: TrainConfig, result: TrainResult, model, before: dict, summary: dict) -> dict:
    """A finished run's summary: its final evaluation, the relative change of its trained tensors
    (``before`` holds their initial values, the run's checkpoint the final ones) and what training cost."""
    costs: dict = {"param_change": None}
    if before:
        after, _ = checkpoint_tensors(model, recipe.out)
        costs["param_change"] = relative_change(squared_norms(before, {n: after[n] for n in before}),
                                                parameter_layers(model))
    costs.update(result.costs, layers=list(result.selection.layers))
    costs["train_seconds"] = sum(row.get("seconds_step", 0.0) for row in read_jsonl(Path(recipe.out) / "log.jsonl"))
    return {"examples": f"evals/step{summary['step']:06d}.examples.jsonl", **summary, **costs}


def _initial_values(model, recipe: TrainConfig) -> dict:
    # LoRA leaves the base weights as they are; their change is the adapters', not measured here
    names = [] if recipe.lora_rank else selected_names(model, select_layers(model, recipe.layers))
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


def train_and_evaluate(recipe: TrainConfig, trained: bool = True, progress: bool = False) -> dict:
    """Train ``recipe`` (or only evaluate the base model when ``trained`` is false), evaluate it once
    on ``recipe.eval_n`` examples, and return the summary: accuracy, the per-example file (relative to
    ``recipe.out``), the relative parameter change of the trained layers, and what training cost."""
    Path(recipe.out).mkdir(parents=True, exist_ok=True)
    _, model, tokenizer = model_for(recipe, None, None)
    load_dtype = next(model.parameters()).dtype  # before training turns trained tensors float32
    if not trained:
        summary = _final_evaluation(recipe, model, tokenizer, 0, load_dtype)
        return {"examples": f"evals/step{summary['step']:06d}.examples.jsonl", **summary, "param_change": None}
    before = _initial_values(model, recipe)
    result = train(recipe, model, tokenizer, progress=progress)
    # final_eval is None when training had already finished (killed before result.json)
    summary = result.final_eval or _final_evaluation(recipe, model, tokenizer, recipe.steps, load_dtype)
    return _trained_summary(recipe, result, model, before, summary)


def _solo(recipe: TrainConfig, progress: bool) -> dict | Exception:
    try:
        return train_and_evaluate(recipe, progress=progress)
    except Exception as err:  # as a concurrent variant fails alone
        return err


def train_and_evaluate_variants(recipes: list[TrainConfig], progress: bool = False) -> list[dict | Exception]:
    """:func:`train_and_evaluate` for single-layer runs of one model trained together
    (:func:`onelayer.concurrent.train_variants`); each run's summary, or the exception that stopped it."""
    from .concurrent import train_variants

    _, model, tokenizer = model_for(recipes[0], None, None)
    before = [_initial_values(model, r) for r in recipes]
    try:
        results = train_variants(recipes, model, tokenizer, progress=progress)
    except FastEngineUnavailable as err:
        print(f"{err}; training these {len(recipes)} runs one at a time instead", file=sys.stderr)
        del model
        return [_solo(recipe, progress) for recipe in recipes]
    # every finished variant has its final evaluation (the recipes evaluate at their last step)
    return [result if isinstance(result, Exception) else
            _trained_summary(recipe, result, model, before[k], result.final_eval)
            for k, (recipe, result) in enumerate(zip(recipes, results, strict=True))]

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
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .analysis.curves import read_jsonl
from .analysis.param_change import relative_change, squared_norms
from .config import TrainConfig
from .evaluate import evaluate, write_eval
from .layers import select_layers, selected_names
from .models import default_device, load_model, load_tokenizer, parameter_layers
from .progress import progress_bar
from .tasks import get_task
from .train import precision_context, train


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


def for_each_run(runs: list, work: Callable[[NamedRun], object], error_file: Callable[[NamedRun], Path],
                 label: str, progress: bool = True, done: int = 0) -> None:
    """Call ``work`` on each run under a progress bar (runs done / left, elapsed, estimate). A run that
    raises gets its error written to ``error_file(run)`` and the others go on; a finished one removes
    a stale error file."""
    with progress_bar(f"{label} {{task.fields[current]}}", progress) as bar:
        task_id = bar.add_task(label, total=done + len(runs), completed=done, current="")
        for run in runs:
            bar.update(task_id, current=run.name)
            path = error_file(run)
            try:
                work(run)
                path.unlink(missing_ok=True)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one broken run must not cost the others
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
            bar.advance(task_id)


def run_share(runs: list, work: Callable[[NamedRun], object], out: Path, shard: Shard, progress: bool,
              label: str) -> None:
    """Deal the unfinished runs of ``runs`` out over the ranks and do this rank's share, one after the
    other; then wait for the other ranks. Dealing out only what is left keeps a resumed plan balanced."""
    barrier(shard)  # every rank must see the same finished runs before the rest is dealt out
    left = [r for r in runs if run_status(out, r) != "done"]
    for_each_run(shard.take(left), work, lambda r: run_dir(out, r) / "error.txt", label, progress)
    barrier(shard)


def train_and_evaluate(recipe: TrainConfig, trained: bool = True, progress: bool = False) -> dict:
    """Train ``recipe`` (or only evaluate the base model when ``trained`` is false), evaluate it once
    on ``recipe.eval_n`` examples, and return the summary: accuracy, the per-example file (relative to
    ``recipe.out``), the relative parameter change of the trained layers, and what training cost."""
    directory = Path(recipe.out)
    directory.mkdir(parents=True, exist_ok=True)
    device = torch.device(recipe.device) if recipe.device else default_device()
    model = load_model(recipe.model, device, recipe.dtype, recipe.attention)
    tokenizer = load_tokenizer(recipe.model)
    load_dtype = next(model.parameters()).dtype

    def final_evaluation(step: int) -> dict:
        task = get_task(recipe.task, recipe.task_options)
        with precision_context(device, load_dtype):
            result = evaluate(model, tokenizer, task, recipe.eval_n, max_new_tokens=recipe.sampling.max_new_tokens,
                              batch_size=recipe.sampling.generation_batch_size, seed=recipe.seed,
                              engine=recipe.sampling.engine)
        write_eval(result, directory / "evals", f"step{step:06d}")
        return {"step": step, **result.summary()}

    costs: dict = {"param_change": None}
    if not trained:
        summary = final_evaluation(0)
    else:
        # LoRA leaves the base weights as they are; their change is the adapters', not measured here
        names = [] if recipe.lora_rank else selected_names(model, select_layers(model, recipe.layers))
        params = dict(model.named_parameters())
        before = {n: params[n].detach().to("cpu", copy=True) for n in names}
        result = train(recipe, model, tokenizer, progress=progress)
        # final_eval is None when training had already finished (killed before result.json)
        summary = result.final_eval or final_evaluation(recipe.steps)
        if names:
            params = dict(model.named_parameters())  # training may have replaced bf16 tensors by fp32 ones
            costs["param_change"] = relative_change(squared_norms(before, {n: params[n] for n in names}),
                                                    parameter_layers(model))
        costs.update(result.costs, layers=list(result.selection.layers))
        costs["train_seconds"] = sum(row.get("seconds_step", 0.0) for row in read_jsonl(directory / "log.jsonl"))
    return {"examples": f"evals/step{summary['step']:06d}.examples.jsonl", **summary, **costs}

"""The layer-contribution scan: plan the runs, run or resume them, and turn their results into a profile.

A scan of a model is: the base model's evaluation, full-parameter training, and one single-layer
training per scanned layer, each seed of each with the same recipe (steps, data order, learning rate:
the study tuned it for full training and reused it for every layer). Every run lives in its own
directory under ``SCAN/runs/``; a run is done when its ``result.json`` exists, and a failed run leaves
``error.txt`` and is retried the next time the scan is started, without redoing the others. A killed
training run resumes from its own checkpoint.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .analysis.contribution import Profile, layer_profile
from .config import TrainConfig, to_dict
from .errors import OneLayerError
from .evaluate import evaluate, write_eval
from .layers import parse_layer_spec
from .models import default_device, load_config, load_model, load_tokenizer, num_layers
from .tasks import get_task
from .train import precision_context, train


@dataclass
class ScanConfig:
    """A scan: ``recipe`` is the training recipe shared by every run. In it, ``layers`` names the layers
    that get a single-layer run and ``out`` is the scan directory."""

    recipe: TrainConfig = field(default_factory=TrainConfig)
    seeds: int = field(default=1, metadata={"help": "seeds per trained configuration"})


@dataclass(frozen=True)
class PlannedRun:
    """One run of a scan: ``kind`` is base, full or layer; ``layer`` is set for single-layer runs."""

    name: str
    kind: str
    seed: int
    layer: int | None = None

    @property
    def layers_spec(self) -> str:
        return "all" if self.kind == "full" else str(self.layer)


def plan_scan(config: ScanConfig, n_layers: int) -> list[PlannedRun]:
    """Base first, then full training, then single layers in depth order, seed by seed."""
    if config.seeds < 1:
        raise OneLayerError(f"--seeds must be >= 1, got {config.seeds}")
    selection = parse_layer_spec(config.recipe.layers, n_layers)
    if not selection.layers:
        raise OneLayerError(f"scan layer spec '{config.recipe.layers}' names no decoder layer to scan")
    seeds = [config.recipe.seed + i for i in range(config.seeds)]
    runs = [PlannedRun("base", "base", config.recipe.seed)]
    runs += [PlannedRun(f"full-s{s}", "full", s) for s in seeds]
    runs += [PlannedRun(f"layer{layer:03d}-s{s}", "layer", s, layer) for layer in selection.layers for s in seeds]
    return runs


def run_dir(scan_dir: Path, run: PlannedRun) -> Path:
    return scan_dir / "runs" / run.name


def run_status(scan_dir: Path, run: PlannedRun) -> str:
    directory = run_dir(scan_dir, run)
    if (directory / "result.json").is_file():
        return "done"
    return "failed" if (directory / "error.txt").is_file() else "pending"


def _recipe_for(config: ScanConfig, run: PlannedRun, scan_dir: Path) -> TrainConfig:
    # one final evaluation per run, on the same examples; no separate base evaluation inside each run
    return replace(config.recipe, layers=run.layers_spec, seed=run.seed, out=str(run_dir(scan_dir, run)),
                   eval_every=config.recipe.steps, eval_at_start=False)


def execute_run(config: ScanConfig, run: PlannedRun, scan_dir: Path, progress: bool = False) -> dict:
    """Train (unless base) and evaluate one run; write and return its ``result.json`` summary."""
    recipe = _recipe_for(config, run, scan_dir)
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
                              batch_size=recipe.sampling.generation_batch_size, seed=recipe.seed)
        write_eval(result, directory / "evals", f"step{step:06d}")
        return {"step": step, **result.summary()}

    if run.kind == "base":
        summary = final_evaluation(0)
    else:
        # None when training had already finished (killed before result.json): the checkpoint is loaded
        summary = train(recipe, model, tokenizer, progress=progress).final_eval or final_evaluation(recipe.steps)
    row = {"name": run.name, "kind": run.kind, "seed": run.seed, "layer": run.layer,
           "examples": str(directory / "evals" / f"step{summary['step']:06d}.examples.jsonl"), **summary}
    (directory / "result.json").write_text(json.dumps(row, indent=2))
    (directory / "error.txt").unlink(missing_ok=True)
    return row


@dataclass(frozen=True)
class Shard:
    """This process's share of a scan: runs ``rank``, ``rank + world``, ... of the plan."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process: rank 0 of 1)."""
        import os

        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def take(self, plan: list[PlannedRun]) -> list[PlannedRun]:
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
        dist.init_process_group("gloo")
    dist.barrier()


def run_scan(config: ScanConfig, progress: bool = True,
             execute: Callable[[ScanConfig, PlannedRun, Path], dict] | None = None) -> list[PlannedRun]:
    """Run every pending or failed run of the scan (this process's share of them, under torchrun);
    finished ones are skipped. A run that raises is recorded (``error.txt``) and the scan goes on.
    Returns the whole plan once every rank is done."""
    shard = Shard.from_env()
    config = replace(config, recipe=replace(config.recipe, device=shard.device(config.recipe.device)))
    scan_dir = Path(config.recipe.out)
    scan_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_scan(config, num_layers(load_config(config.recipe.model)))
    if shard.rank == 0:
        saved = {"config": to_dict(replace(config, recipe=replace(config.recipe, device=""))),
                 "runs": [r.__dict__ for r in plan]}
        (scan_dir / "scan.json").write_text(json.dumps(saved, indent=2))
    execute = execute or (lambda c, r, d: execute_run(c, r, d))
    todo = [r for r in shard.take(plan) if run_status(scan_dir, r) != "done"]
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("scan {task.fields[current]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), disable=not progress) as bar:
        mine = shard.take(plan)
        task_id = bar.add_task("scan", total=len(mine), completed=len(mine) - len(todo), current="")
        for run in todo:
            bar.update(task_id, current=run.name)
            try:
                execute(config, run, scan_dir)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one broken run must not cost the others
                directory = run_dir(scan_dir, run)
                directory.mkdir(parents=True, exist_ok=True)
                (directory / "error.txt").write_text(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
            bar.advance(task_id)
    barrier(shard)
    return plan


def _correct(row: dict) -> list[float]:
    examples = Path(row["examples"])
    return [sum(r["correct"]) / len(r["correct"]) for r in map(json.loads, examples.read_text().splitlines())]


def scan_profile(scan_dir: str | Path, n_resamples: int = 2000) -> tuple[Profile, dict]:
    """The contribution profile of a (possibly unfinished) scan from its finished runs, and a summary
    of which runs are done, failed or pending."""
    scan_dir = Path(scan_dir)
    if not (scan_dir / "scan.json").is_file():
        raise OneLayerError(f"{scan_dir} is not a scan directory (no scan.json): pass the --out of onelayer scan")
    saved = json.loads((scan_dir / "scan.json").read_text())
    plan = [PlannedRun(**r) for r in saved["runs"]]
    results = {r.name: json.loads((run_dir(scan_dir, r) / "result.json").read_text())
               for r in plan if run_status(scan_dir, r) == "done"}
    status = {r.name: run_status(scan_dir, r) for r in plan}
    base = [_correct(results[r.name]) for r in plan if r.kind == "base" and r.name in results]
    full = [_correct(results[r.name]) for r in plan if r.kind == "full" and r.name in results]
    layers: dict[int, list[list[float]]] = {}
    for r in plan:
        if r.kind == "layer" and r.name in results:
            layers.setdefault(r.layer, []).append(_correct(results[r.name]))
    if not base or not full or not layers:
        raise OneLayerError(f"{scan_dir} needs the base, a full and at least one layer run finished for a profile "
                            "(rerun onelayer scan to continue it)")
    n_layers = num_layers(load_config(saved["config"]["recipe"]["model"]))
    return layer_profile(base, full, layers, n_layers, n_resamples=n_resamples), status

"""Out-of-domain evaluation of a scan: every finished run's checkpoint on other tasks.

The study asks whether the layers that carry in-domain gains also carry transfer. Each run of the
scan (base, full, single layers, at every rate of a learning-rate grid) is evaluated on each task with the scan's eval settings;
results go to ``runs/NAME/ood/SLUG.json`` and ``SLUG.examples.jsonl``, so an interrupted evaluation
resumes, a run whose evaluation failed has the error in ``runs/NAME/ood/error.txt``, and the contribution profile on a task is
computed exactly like the in-domain one (:func:`onelayer.experiments.scan.scan_profile` with ``source=SLUG``).
The base model is loaded once; each run's trained tensors are swapped in and back out.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..analysis.rank import RankCorrelation, compare_profiles
from ..checkpoint import assign, checkpoint_tensors, find_checkpoint
from ..config import OODConfig
from ..errors import OneLayerError
from ..evaluate import evaluate, write_eval
from ..models import default_device, load_model, load_tokenizer, precision_context
from ..profile import Profile
from ..rollout import make_generator
from ..tasks import get_task, parse_task_ref, split_task_list
from .rundir import run_dir, run_status
from .scan import PlannedRun, load_plan, scan_profile
from .sharding import Shard, barrier, for_each_run


def task_refs(config: OODConfig) -> list[tuple[str, dict]]:
    """The tasks of ``config.tasks``, each with its own options over the common ones."""
    refs = [parse_task_ref(t) for t in split_task_list(config.tasks)]
    if not refs:
        raise OneLayerError("analyze ood needs --tasks, e.g. --tasks rg:chain_sum,rg:gcd?max_value=20")
    return [(name, {**config.task_options, **options}) for name, options in refs]


def task_slug(name: str, options: dict) -> str:
    """A file-name-safe key for a task and its options (a short hash tells option sets apart)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    if options:
        slug += "-" + hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return slug


def ood_file(scan_dir: Path, run: PlannedRun, slug: str, suffix: str = ".json") -> Path:
    return run_dir(scan_dir, run) / "ood" / f"{slug}{suffix}"


class _Swapper:
    """Applies one run's checkpoint to the shared base model and undoes it before the next."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.saved = model, {}

    def load(self, scan_dir: Path, run: PlannedRun) -> None:
        assign(self.model, self.saved)
        self.saved = {}
        if run.kind == "base":
            return
        if find_checkpoint(run_dir(scan_dir, run)) is None:
            raise OneLayerError(f"run {run.name} has no checkpoint in {run_dir(scan_dir, run)}: out-of-domain "
                                "evaluation needs the scan's checkpoints (rerun that run to recreate it)")
        tensors, _ = checkpoint_tensors(self.model, run_dir(scan_dir, run))
        params = dict(self.model.named_parameters())
        self.saved = {n: params[n].detach().clone() for n in tensors}
        assign(self.model, tensors)


def run_ood(scan_dir: str | Path, config: OODConfig, progress: bool = True) -> list[str]:
    """Evaluate every finished run of the scan on every task that it has not been evaluated on yet
    (this process's share of the runs under torchrun). Returns the task slugs."""
    scan_dir = Path(scan_dir)
    saved, plan = load_plan(scan_dir)
    recipe = saved["recipe"]
    refs = task_refs(config)
    tasks = {task_slug(name, options): (name, options, get_task(name, options)) for name, options in refs}
    shard = Shard.from_env()
    runs = [r for r in plan if run_status(scan_dir, r) == "done"]
    todo = [r for r in shard.take(runs) if any(not ood_file(scan_dir, r, s).is_file() for s in tasks)]
    n = config.eval_n or recipe["eval_n"]
    sampling = recipe["sampling"]
    if todo:
        chosen = config.device or shard.device("")
        device = torch.device(chosen) if chosen else default_device()
        model = load_model(recipe["model"], device, config.dtype or recipe["dtype"], recipe.get("attention", ""))
        tokenizer = load_tokenizer(recipe["model"])
        precision = precision_context(device, next(model.parameters()).dtype)
        swapper = _Swapper(model)
        generator = make_generator(model, tokenizer, config.generation_batch_size or sampling["generation_batch_size"],
                                   sampling.get("engine", "auto"))

        def work(run: PlannedRun) -> None:
            swapper.load(scan_dir, run)
            for slug, (name, options, task) in tasks.items():
                if ood_file(scan_dir, run, slug).is_file():
                    continue
                with precision:
                    result = evaluate(model, tokenizer, task, n,
                                      max_new_tokens=config.max_new_tokens or sampling["max_new_tokens"],
                                      seed=recipe["seed"], generator=generator)
                write_eval(result, run_dir(scan_dir, run) / "ood", slug)
                summary = json.loads(ood_file(scan_dir, run, slug).read_text())
                ood_file(scan_dir, run, slug).write_text(json.dumps(
                    {"task": name, "task_options": options, **summary}, indent=2))

        for_each_run(todo, work, lambda r: [run_dir(scan_dir, r) / "ood" / "error.txt"],
                     "ood", progress, done=len(shard.take(runs)) - len(todo))
    barrier(shard)
    return list(tasks)


@dataclass(frozen=True)
class OODResult:
    slug: str
    task: str
    options: dict
    base_accuracy: float
    full_accuracy: float
    profile: Profile | None
    correlation: RankCorrelation | None  # with the in-domain profile, on the measured layers
    note: str = ""


def ood_results(scan_dir: str | Path, n_resamples: int = 2000) -> list[OODResult]:
    """Every out-of-domain task the scan was evaluated on, with its profile and its rank correlation
    with the in-domain profile (None with a note when a profile cannot be formed yet)."""
    scan_dir = Path(scan_dir)
    _, plan = load_plan(scan_dir)
    base = next(r for r in plan if r.kind == "base")
    # per-example files may be stored compressed (.examples.jsonl.gz)
    found = sorted({p.name.split(".examples.jsonl")[0] for p in (run_dir(scan_dir, base) / "ood").glob("*.examples.jsonl*")})
    in_domain, _ = scan_profile(scan_dir, n_resamples)
    rate = in_domain.full_lr_scale  # transfer is read at the in-domain protocol's rate, not re-picked per task
    results = []
    for slug in found:
        head = json.loads(ood_file(scan_dir, base, slug).read_text())
        fulls = [json.loads(ood_file(scan_dir, r, slug).read_text())["accuracy"] for r in plan
                 if r.kind == "full" and r.lr_scale == rate and ood_file(scan_dir, r, slug).is_file()]
        try:
            profile, _ = scan_profile(scan_dir, n_resamples, source=slug, lr_scales=[rate])
            correlation, note = compare_profiles(in_domain, profile), profile.warning
        except OneLayerError as err:
            profile, correlation, note = None, None, str(err)
        results.append(OODResult(slug, head.get("task", slug), head.get("task_options", {}), head["accuracy"],
                                 sum(fulls) / len(fulls) if fulls else float("nan"), profile, correlation, note))
    return results

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
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..analysis.contribution import (
    bootstrap_indices,
    contribution_estimate,
    layer_profile,
    per_example_scores,
)
from ..analysis.figures import plot_profile, profile_table
from ..analysis.rank import layer_ranks, measured
from ..config import ScanConfig, TrainConfig, check_out_dir, to_dict
from ..errors import OneLayerError
from ..layers import parse_layer_spec
from ..models import default_device, load_skeleton, model_num_layers
from ..profile import Profile
from .rundir import example_scores, examples_file, read_result, run_dir, run_status, write_error
from .sharding import Shard, run_share


@dataclass(frozen=True)
class PlannedRun:
    """One run of a scan: ``kind`` is base, full, layer or probe (a single-layer run with the learning
    rate times ``lr_scale``); ``layer`` is set for layer and probe runs."""

    name: str
    kind: str
    seed: int
    layer: int | None = None
    lr_scale: float = 1.0

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


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OneLayerError(f"--lr-scales '{text}' must be comma-separated numbers, e.g. 0.5,2") from None
    if any(not x > 0 or x == 1 for x in scales):
        raise OneLayerError(f"--lr-scales '{text}': each scale must be > 0 and not 1 (1 is the scan itself)")
    return scales


def probe_layers(spec: str, contributions: dict[int, float], n_layers: int) -> list[int]:
    """The layers named by ``spec``: ``best`` and ``worst`` are the measured layers of highest and
    lowest contribution; other terms are a layer spec of measured layers."""
    terms = [t.strip().lower() for t in spec.split(",") if t.strip()]
    chosen: set[int] = set()
    if "best" in terms:
        chosen.add(max(contributions, key=lambda k: (contributions[k], -k)))
    if "worst" in terms:
        chosen.add(min(contributions, key=lambda k: (contributions[k], k)))
    rest = [t for t in terms if t not in ("best", "worst")]
    if rest:
        named = parse_layer_spec(",".join(rest), n_layers).layers
        unmeasured = [layer for layer in named if layer not in contributions]
        if unmeasured:
            raise OneLayerError(f"--probe-layers names layer {unmeasured[0]}, which the scan did not measure: "
                                f"probe measured layers ({sorted(contributions)}) or add it to --layers")
        chosen.update(named)
    if not chosen:
        raise OneLayerError(f"--probe-layers '{spec}' names no layer: use best, worst and/or a layer spec")
    return sorted(chosen)


def plan_probes(config: ScanConfig, profile: Profile) -> list[PlannedRun]:
    """Reruns of the chosen layers at each scaled learning rate, seed by seed."""
    scales = parse_scales(config.lr_scales)
    measured = {p.layer: p.contribution for p in profile.points if not p.interpolated}
    layers = probe_layers(config.probe_layers, measured, len(profile.points))
    seeds = [config.recipe.seed + i for i in range(config.seeds)]
    return [PlannedRun(f"layer{layer:03d}-lr{scale:g}x-s{s}", "probe", s, layer, scale)
            for layer in layers for scale in scales for s in seeds]


def _recipe_for(config: ScanConfig, run: PlannedRun, scan_dir: Path) -> TrainConfig:
    # one final evaluation per run, on the same examples; no separate base evaluation inside each run
    return replace(config.recipe, layers=run.layers_spec, seed=run.seed, out=str(run_dir(scan_dir, run)),
                   lr=config.recipe.lr * run.lr_scale, eval_every=config.recipe.steps, eval_at_start=False)


def execute_run(config: ScanConfig, run: PlannedRun, scan_dir: Path, progress: bool = False) -> dict:
    """Train (unless base) and evaluate one run; write and return its ``result.json`` summary."""
    from .recipes import train_and_evaluate  # training loads only to run: reading a profile needs none of it

    recipe = _recipe_for(config, run, scan_dir)
    return _write_result(run, recipe, train_and_evaluate(recipe, trained=run.kind != "base", progress=progress))


def execute_group(config: ScanConfig, runs: list[PlannedRun], scan_dir: Path, progress: bool = False) -> None:
    """Train single-layer runs together (:func:`onelayer.concurrent.train_variants`) and evaluate
    them; each writes its ``result.json``, or its ``error.txt`` when it alone failed."""
    from .recipes import train_and_evaluate_variants

    recipes = [_recipe_for(config, run, scan_dir) for run in runs]
    for run, recipe, summary in zip(runs, recipes, train_and_evaluate_variants(recipes, progress), strict=True):
        if isinstance(summary, Exception):
            write_error(Path(recipe.out) / "error.txt", summary)
        else:
            _write_result(run, recipe, summary)


def _write_result(run: PlannedRun, recipe: TrainConfig, summary: dict) -> dict:
    row = {"name": run.name, "kind": run.kind, "seed": run.seed, "layer": run.layer, "lr_scale": run.lr_scale,
           **summary}
    Path(recipe.out).mkdir(parents=True, exist_ok=True)
    (Path(recipe.out) / "result.json").write_text(json.dumps(row, indent=2))
    return row


def concurrency(config: ScanConfig) -> int:
    """How many single-layer runs to train together: ``config.concurrent``, or for 0 as many as fit
    in the free memory of the scan's GPU (1 on a CPU, or where concurrent training cannot run)."""
    from ..rollout.fast import unsupported_reason
    from ..tasks import AgentTask, get_task
    from ..training.concurrent import auto_concurrency, check_group

    recipe = config.recipe
    if config.concurrent < 0:
        raise OneLayerError(f"--concurrent must be >= 0 (0 = automatic), got {config.concurrent}")
    device = torch.device(recipe.device) if recipe.device else default_device()
    if config.concurrent == 1 or (config.concurrent == 0 and device.type != "cuda"):
        return 1
    skeleton = load_skeleton(recipe.model)
    reason = unsupported_reason(skeleton)
    task = get_task(recipe.task, recipe.task_options)
    agentic = isinstance(task, AgentTask)
    if config.concurrent > 1:
        check_group([recipe])
        if reason or agentic:
            why = reason or f"{recipe.task} is a multi-turn agent task"
            raise OneLayerError(f"--concurrent {config.concurrent} is not possible because {why}: use --concurrent 1")
        return config.concurrent
    if reason or agentic or recipe.lora_rank or recipe.sampling.engine == "plain":
        return 1
    element = 4 if recipe.dtype == "fp32" else 2
    weights = sum(p.numel() for p in skeleton.parameters()) * element
    return auto_concurrency(recipe, torch.cuda.mem_get_info(device)[0] - 2 * weights, _prompt_tokens(recipe, task))


def _prompt_tokens(recipe: TrainConfig, task, sample: int = 64) -> int:
    """A generous prompt length for ``task``: the longest of its first ``sample`` train prompts, plus 25%."""
    from ..models import load_tokenizer
    from ..rollout import render_prompts

    tokenizer = load_tokenizer(recipe.model)
    prompts = render_prompts(tokenizer, [task.messages(e) for e in task.examples("train")[:sample]])
    return int(1.25 * max(len(tokenizer(p)["input_ids"]) for p in prompts))


def _save_plan(config: ScanConfig, plan: list[PlannedRun], scan_dir: Path) -> None:
    saved = {"config": to_dict(replace(config, recipe=replace(config.recipe, device=""))),
             "runs": [r.__dict__ for r in plan]}
    (scan_dir / "scan.json").write_text(json.dumps(saved, indent=2))


def run_scan(config: ScanConfig, progress: bool = True,
             execute: Callable[[ScanConfig, PlannedRun, Path], dict] | None = None) -> list[PlannedRun]:
    """Run every pending or failed run of the scan (this process's share of them, under torchrun);
    finished ones are skipped. A run that raises is recorded (``error.txt``) and the scan goes on.
    Single-layer runs are trained ``concurrent`` at a time (:func:`concurrency`); base and full runs
    alone. With ``lr_scales``, the probe runs follow once the profile exists. Then rank 0 writes the profile
    (:func:`write_profile`). Returns the whole plan once every rank is done. ``execute`` replaces the work of
    one run (tests)."""
    shard = Shard.from_env()
    config = replace(config, recipe=replace(config.recipe, device=shard.device(config.recipe.device)))
    scan_dir = Path(config.recipe.out)
    check_out_dir(scan_dir)
    scan_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_scan(config, model_num_layers(config.recipe.model))
    if config.lr_scales:
        parse_scales(config.lr_scales)  # a typo should fail now, not after hours of scanning
    group_size = concurrency(config)  # and so should an impossible --concurrent, before the plan is saved
    if shard.rank == 0:
        _save_plan(config, plan, scan_dir)
    execute = execute or (lambda c, r, d: execute_run(c, r, d))

    def share(runs: list[PlannedRun], label: str) -> None:
        solo = [r for r in runs if r.kind in ("base", "full") or group_size == 1]

        def board() -> list[tuple[str, str]]:
            return scan_so_far(scan_dir, plan)

        run_share(solo, lambda r: execute(config, r, scan_dir), scan_dir, shard, progress, label, summary=board)
        grouped = [r for r in runs if r not in solo]
        if grouped:
            if shard.rank == 0:
                print(f"{label}: {len(grouped)} single-layer runs, up to {group_size} trained together", file=sys.stderr)
            run_share(grouped, lambda g: execute_group(config, list(g.runs), scan_dir), scan_dir, shard, progress, label,
                      group_size, board)

    share(plan, "scan")
    if config.lr_scales:
        # every rank reads the same finished runs after the barrier, so they plan the same probes
        profile, _ = scan_profile(scan_dir)
        probes = plan_probes(config, profile)
        if shard.rank == 0:
            _save_plan(config, plan + probes, scan_dir)
        share(probes, "lr probes")
        plan = plan + probes
    if shard.rank == 0:
        try:
            write_profile(scan_dir)
        except OneLayerError as err:  # too few runs finished (the failed ones are retried by the same command)
            print(f"no profile written: {err}", file=sys.stderr)
    return plan


def scan_so_far(scan_dir: Path, plan: list[PlannedRun]) -> list[tuple[str, str]]:
    """What a scan's finished runs say so far, for its live board: base and full accuracy, and the single
    layer of highest accuracy (seeds averaged) with its point contribution once base and full are in."""
    accuracy: dict[tuple[str, int | None], list[float]] = {}
    for r in plan:
        if r.kind != "probe" and run_status(scan_dir, r) == "done":
            accuracy.setdefault((r.kind, r.layer), []).append(read_result(scan_dir, r)["accuracy"])
    mean = {key: sum(v) / len(v) for key, v in accuracy.items()}
    base, full = mean.get(("base", None)), mean.get(("full", None))
    rows = [("base / full", " / ".join("-" if v is None else f"{v:.3f}" for v in (base, full)) + " accuracy")]
    layers = {layer: v for (kind, layer), v in mean.items() if kind == "layer"}
    if layers:
        best = max(layers, key=lambda k: (layers[k], -k))
        text = f"layer {best}: accuracy {layers[best]:.3f}"
        if base is not None and full is not None and full != base:
            text += f", contribution {(layers[best] - base) / (full - base):+.2f} (point estimate)"
        rows.append(("best layer so far", f"{text}; {len(layers)} layer(s) measured"))
    return rows


def load_plan(scan_dir: str | Path) -> tuple[dict, list[PlannedRun]]:
    """A scan directory's saved config (as a dict) and plan."""
    scan_dir = Path(scan_dir)
    if not (scan_dir / "scan.json").is_file():
        raise OneLayerError(f"{scan_dir} is not a scan directory (no scan.json): pass the --out of onelayer scan")
    saved = json.loads((scan_dir / "scan.json").read_text())
    return saved["config"], [PlannedRun(**r) for r in saved["runs"]]


def scan_profile(scan_dir: str | Path, n_resamples: int = 2000, source: str = "",
                 seeds: list[int] | None = None) -> tuple[Profile, dict]:
    """The contribution profile of a (possibly unfinished) scan from its finished runs, and each run's
    status (done, failed or pending). ``source`` picks an out-of-domain evaluation instead of the
    in-domain one; ``seeds`` restricts the trained runs to those seeds."""
    scan_dir = Path(scan_dir)
    config, plan = load_plan(scan_dir)
    status = {r.name: run_status(scan_dir, r) for r in plan}

    def scores(kind: str) -> dict:
        found: dict = {}
        for r in plan:
            if r.kind == kind and status[r.name] == "done" and (seeds is None or kind == "base" or r.seed in seeds):
                path = examples_file(scan_dir, r, source)
                if path.is_file():
                    found.setdefault(r.layer, []).append(example_scores(path))
        return found

    base, full, layers = scores("base").get(None), scores("full").get(None), scores("layer")
    if not base or not full or not layers:
        what = f"evaluated on {source} (run onelayer analyze ood)" if source else "finished"
        raise OneLayerError(f"{scan_dir} needs the base, a full and at least one layer run {what} for a profile "
                            "(rerun onelayer scan to continue it)")
    n_layers = model_num_layers(config["recipe"]["model"])
    return layer_profile(base, full, layers, n_layers, n_resamples=n_resamples), status


def probe_results(scan_dir: str | Path, n_resamples: int = 2000) -> list[dict]:
    """For each probed layer and learning-rate scale: its contribution at the scan's learning rate and
    at the scaled one (against the same base and full runs), and its rank among the measured layers
    at both (the probed value replacing the layer's own)."""
    scan_dir = Path(scan_dir)
    _, plan = load_plan(scan_dir)
    done = [r for r in plan if r.kind == "probe" and run_status(scan_dir, r) == "done"]
    if not done:
        return []
    profile, _ = scan_profile(scan_dir, n_resamples)
    at_base = measured(profile)
    points = {p.layer: p for p in profile.points}

    def seed_scores(kind: str, layer=None, scale=1.0) -> np.ndarray:
        rows = [example_scores(examples_file(scan_dir, r)) for r in plan if r.kind == kind and r.layer == layer
                and r.lr_scale == scale and run_status(scan_dir, r) == "done"]
        return per_example_scores(rows)

    base, full = seed_scores("base"), seed_scores("full")
    indices = bootstrap_indices(base.size, n_resamples, 0)
    rows = []
    for layer, scale in sorted({(r.layer, r.lr_scale) for r in done}):
        est = contribution_estimate(base, full, seed_scores("probe", layer, scale), indices)
        ranks_after = layer_ranks({**at_base, layer: est.value})
        rows.append({"layer": layer, "lr_scale": scale, "contribution": at_base[layer],
                     "low": points[layer].low, "high": points[layer].high, "rank": layer_ranks(at_base)[layer],
                     "probe_contribution": est.value, "probe_low": est.low, "probe_high": est.high,
                     "probe_rank": ranks_after[layer], "measured_layers": len(at_base)})
    return rows


def write_profile(scan_dir: str | Path) -> Profile:
    """Compute a scan's profile from its finished runs and write ``profile.json``, ``profile.md`` (the table)
    and ``profile.png`` into it."""
    scan_dir = Path(scan_dir)
    profile, status = scan_profile(scan_dir)
    (scan_dir / "profile.json").write_text(json.dumps({**asdict(profile), "runs": status}, indent=2))
    (scan_dir / "profile.md").write_text(profile_table(profile))
    plot_profile(profile, scan_dir / "profile.png", title=f"layer contribution: {scan_dir.name}")
    return profile

"""The layer-contribution scan: plan the runs, run or resume them, and turn their results into a profile.

A scan of a model is: the base model's evaluation, full-parameter training, and one single-layer
training per scanned layer, each seed of each with the same recipe (steps, data order, learning rate:
the study tuned it for full training and reused it for every layer). With ``--lr-grid 1,3,10`` every
configuration (full training too) is trained at each multiple of ``--lr``, and the profile reads each
under a protocol (:mod:`onelayer.analysis.contribution`); with ``--eval-every N`` every run is evaluated
on the same examples every N steps, so profiles exist at each evaluated step and as areas under the
learning curves. Every run lives in its own directory under ``SCAN/runs/``; a run is done when its
``result.json`` exists, and a failed run leaves ``error.txt`` and is retried the next time the scan is
started, without redoing the others. A killed training run resumes from its own checkpoint.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..analysis.contribution import area_under_curve, contribution_profile
from ..analysis.figures import plot_profile, profile_table
from ..analysis.rank import RankCorrelation, measured, rank_correlation
from ..config import ScanConfig, TrainConfig, check_out_dir, to_dict
from ..errors import OneLayerError
from ..jsonl import exists
from ..layers import parse_layer_spec
from ..models import default_device, model_num_layers
from ..profile import Profile, profile_file
from ..tracking import open_tracker
from . import adaptive
from .rundir import (
    check_finished,
    example_scores,
    examples_file,
    read_result,
    run_dir,
    run_status,
    step_examples,
)
from .rundir import evaluated_steps as run_steps
from .sharding import Shard, run_groups, run_share, run_width, trains_many_layers


@dataclass(frozen=True)
class PlannedRun:
    """One run of a scan: ``kind`` is base, full or layer (``layer`` set); ``lr_scale`` multiplies the
    recipe's learning rate (``--lr-grid``)."""

    name: str
    kind: str
    seed: int
    layer: int | None = None
    lr_scale: float = 1.0

    @property
    def layers_spec(self) -> str:
        return "all" if self.kind == "full" else str(self.layer)


def parse_lr_grid(text: str) -> tuple[float, ...]:
    """``--lr-grid 1,3,10`` -> (1.0, 3.0, 10.0): the multiples of ``--lr`` every configuration is trained at
    (empty: 1 alone)."""
    try:
        scales = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise OneLayerError(f"--lr-grid '{text}' must be comma-separated multiples of --lr, e.g. 1,3,10") from None
    if any(not (x > 0 and np.isfinite(x)) for x in scales):
        raise OneLayerError(f"--lr-grid '{text}': each multiple of --lr must be a finite number > 0")
    if len(set(scales)) != len(scales):
        raise OneLayerError(f"--lr-grid '{text}' lists a rate twice: list each multiple once")
    return tuple(sorted(scales)) or (1.0,)


def run_name(kind: str, seed: int, layer: int | None = None, lr_scale: float = 1.0) -> str:
    """``full-s0``, ``layer014-s0``; at another rate ``layer014-lr3x-s0`` (the names of older scans' probes)."""
    stem = "full" if kind == "full" else f"layer{layer:03d}"
    return stem + ("" if lr_scale == 1 else f"-lr{lr_scale:g}x") + f"-s{seed}"


def plan_scan(config: ScanConfig, n_layers: int) -> list[PlannedRun]:
    """Base first, then full training at each rate of the grid, then single layers in depth order at each rate,
    seed by seed."""
    if config.seeds < 1:
        raise OneLayerError(f"--seeds must be >= 1, got {config.seeds}")
    scales = parse_lr_grid(config.lr_grid)
    selection = parse_layer_spec(config.recipe.layers, n_layers)
    if not selection.layers:
        raise OneLayerError(f"scan layer spec '{config.recipe.layers}' names no decoder layer to scan")
    seeds = [config.recipe.seed + i for i in range(config.seeds)]
    runs = [PlannedRun("base", "base", config.recipe.seed)]
    runs += [PlannedRun(run_name("full", s, None, x), "full", s, None, x) for x in scales for s in seeds]
    runs += [PlannedRun(run_name("layer", s, layer, x), "layer", s, layer, x)
             for layer in selection.layers for x in scales for s in seeds]
    return runs


def _recipe_for(config: ScanConfig, run: PlannedRun, scan_dir: Path) -> TrainConfig:
    return replace(config.recipe, layers=run.layers_spec, seed=run.seed, out=str(run_dir(scan_dir, run)),
                   lr=config.recipe.lr * run.lr_scale, **evaluation_schedule(config.recipe))


def evaluation_schedule(recipe: TrainConfig) -> dict:
    """A scan's or comparison's runs evaluate on the same examples at the end (what profiles read) and, with
    ``--eval-every``, every that many steps too (learning curves), before step 1 with ``--eval-at-start``.
    Without it, once at the end: the base run is every run's evaluation before training."""
    if recipe.eval_every:
        return {"eval_every": recipe.eval_every, "eval_at_start": recipe.eval_at_start}
    return {"eval_every": recipe.steps, "eval_at_start": False}


def execute_run(config: ScanConfig, run: PlannedRun, scan_dir: Path, progress: bool = False,
                final: bool = True, world=None) -> dict:
    """Train (unless base) and evaluate one run; write (unless not ``final``: an adaptive scan's rung) and
    return its ``result.json`` summary. ``world``: the processes training it together (each calls this; rank 0
    writes the result)."""
    from .recipes import train_and_evaluate  # training loads only to run: reading a profile needs none of it

    recipe = _recipe_for(config, run, scan_dir)
    summary = train_and_evaluate(recipe, trained=run.kind != "base", progress=progress,
                                 **({"world": world} if world is not None else {}))
    main = world is None or world.is_main
    return _write_result(run, recipe, summary) if final and main else summary if main else {}


def execute_group(config: ScanConfig, runs: list[PlannedRun], scan_dir: Path, progress: bool = False,
                  final: bool = True) -> None:
    """Train single-layer runs together (:func:`onelayer.concurrent.train_variants`) and evaluate
    them; each writes its ``result.json`` (unless not ``final``), or its ``error.txt`` when it alone failed."""
    from .recipes import train_group

    recipes = [_recipe_for(config, run, scan_dir) for run in runs]
    train_group(recipes, lambda k, summary: _write_result(runs[k], recipes[k], summary) if final else None, progress)


def _write_result(run: PlannedRun, recipe: TrainConfig, summary: dict) -> dict:
    row = {"name": run.name, "kind": run.kind, "seed": run.seed, "layer": run.layer, "lr_scale": run.lr_scale,
           **summary}
    Path(recipe.out).mkdir(parents=True, exist_ok=True)
    (Path(recipe.out) / "result.json").write_text(json.dumps(row, indent=2))
    return row


def concurrency(config: ScanConfig) -> int:
    """How many single-layer runs to train together: ``config.concurrent``, or for 0 as many as fit
    in the free memory of the scan's GPU (1 on a CPU, or where concurrent training cannot run)."""
    from ..training.concurrent import group_size

    return group_size(config.recipe, config.concurrent)


def run_widths(config: ScanConfig, plan: list[PlannedRun]) -> dict[str, int]:
    """How many GPUs (processes) train each run of ``plan`` together: one for base and single-layer runs;
    for full runs ``--group-gpus``, or as many as their memory estimate needs (:func:`.sharding.run_width`)."""
    n_layers = model_num_layers(config.recipe.model)
    widths, full = {}, {}
    for run in plan:
        recipe = _recipe_for(config, run, Path("."))
        large = run.kind == "full" and trains_many_layers(recipe, n_layers)
        if large and not full:  # every full run has the same recipe but its seed
            full["width"] = run_width(recipe, config.group_gpus, True)
        widths[run.name] = full["width"] if large else 1
    return widths


def check_kept_runs(config: ScanConfig, plan: list[PlannedRun], scan_dir: Path) -> None:
    """The finished runs a resumed scan keeps must have run the recipe it asks for now (see
    :func:`onelayer.experiments.rundir.check_finished`)."""
    for run in plan:
        if run.kind != "base" and run_status(scan_dir, run) == "done":
            check_finished(run_dir(scan_dir, run), _recipe_for(config, run, scan_dir), run.lr_scale)


def plan_lines(config: ScanConfig, processes: int) -> list[str]:
    """What a scan would do, without training: its runs, which of them a group of GPUs trains together and
    which one GPU, and (for a GPU) the memory estimate of a full and a single-layer run."""
    from ..memory import NoEstimate, estimate, prompt_tokens
    from .sharding import group_ranks

    plan = plan_scan(config, model_num_layers(config.recipe.model))
    check_kept_runs(config, plan, Path(config.recipe.out))
    widths = run_widths(config, plan)
    kinds = {kind: [r for r in plan if r.kind == kind] for kind in ("base", "full", "layer")}
    lines = [f"scan of {config.recipe.model}: {len(plan)} runs ({len(kinds['full'])} full, {len(kinds['layer'])} "
             f"single-layer, the base model) over {processes} process(es)"]
    wide = [r for r in plan if widths[r.name] > 1]
    if wide:
        width = max(widths[r.name] for r in wide)
        groups = group_ranks(processes, width, len(wide), config.recipe.prompts_per_step)
        lines.append(f"first {', '.join(r.name for r in wide)}: each trained by {len(groups[0])} GPUs together "
                     f"(sharded; needs {width}), {len(groups)} at a time on ranks "
                     + ", ".join(f"{g[0]}-{g[-1]}" for g in groups))
    lines.append(f"then {'the other runs' if wide else 'every run'} one per GPU (single layers {concurrency(config)} "
                 "at a time per process)")
    device = torch.device(config.recipe.device) if config.recipe.device else default_device()
    if device.type == "cuda":
        tokens, gpu = prompt_tokens(config.recipe), torch.cuda.get_device_properties(device).total_memory
        for kind in ("full", "layer"):
            run = kinds[kind][0]
            try:
                found = estimate(_recipe_for(config, run, Path(".")), widths[run.name], tokens, gpu)
            except NoEstimate as err:
                lines.append(f"{run.name}: {err}")
                continue
            lines.append(f"{run.name} on {widths[run.name]} GPU(s): {found.line()}, "
                         f"{'fits' if found.fits(gpu) else 'does NOT fit'} {gpu / 2**30:.0f} GB")
    return lines


def _save_plan(config: ScanConfig, plan: list[PlannedRun], scan_dir: Path, widths: dict | None = None) -> None:
    saved = {"config": to_dict(replace(config, recipe=replace(config.recipe, device=""))),
             "runs": [r.__dict__ for r in plan],
             # which runs a group of GPUs trains together, and how many (recomputed when the scan resumes)
             "placement": {name: width for name, width in (widths or {}).items() if width > 1}}
    (scan_dir / "scan.json").write_text(json.dumps(saved, indent=2))


def run_scan(config: ScanConfig, progress: bool = True,
             execute: Callable[[ScanConfig, PlannedRun, Path], dict] | None = None) -> list[PlannedRun]:
    """Run every pending or failed run of the scan (this process's share of them, under torchrun);
    finished ones are skipped. A run that raises is recorded (``error.txt``) and the scan goes on.
    Single-layer runs (at every rate of ``lr_grid``) are trained ``concurrent`` at a time
    (:func:`concurrency`); base and full runs alone. Then rank 0 writes the profiles (:func:`write_profile`).
    Returns the whole plan once every rank is done. ``execute`` replaces the work of one run (tests)."""
    shard = Shard.from_env()
    config = replace(config, recipe=replace(config.recipe, device=shard.device(config.recipe.device)))
    scan_dir = Path(config.recipe.out)
    check_out_dir(scan_dir)
    plan = plan_scan(config, model_num_layers(config.recipe.model))  # a typo in --lr-grid fails here, before work
    scan_dir.mkdir(parents=True, exist_ok=True)
    group_size = concurrency(config)  # and so does an impossible --concurrent, before the plan is saved
    if config.adaptive_top:
        adaptive.rungs(config)  # and an adaptive scan without evaluations to decide at
    widths = run_widths(config, plan)  # and a run that fits no GPUs
    check_kept_runs(config, plan, scan_dir)  # and a resumed scan whose flags changed what its runs computed
    if shard.rank == 0:
        _save_plan(config, plan, scan_dir, widths)
    execute = execute or (lambda c, r, d: execute_run(c, r, d))

    def board() -> list[tuple[str, str]]:
        return scan_so_far(scan_dir, plan)

    # runs that take a group of GPUs first (full training of a large model), each group training its share
    wide = [r for r in plan if widths.get(r.name, 1) > 1]
    for width in sorted({widths[r.name] for r in wide}, reverse=True):
        run_groups([r for r in wide if widths[r.name] == width], width,
                   lambda r, world: execute_run(config, r, scan_dir, world=world), scan_dir, shard, progress, "scan",
                   config.recipe.prompts_per_step, config.recipe.device, board)
    if config.adaptive_top:
        _run_adaptive(config, plan, scan_dir, shard, progress, group_size, execute, wide, board)
    else:
        solo = [r for r in plan if r not in wide and (r.kind in ("base", "full") or group_size == 1)]
        run_share(solo, lambda r: execute(config, r, scan_dir), scan_dir, shard, progress, "scan", summary=board)
        _run_groups(config, [r for r in plan if r not in solo and r not in wide], scan_dir, shard, progress,
                    group_size, board)
    if shard.rank == 0:
        try:
            write_profile(scan_dir)
        except OneLayerError as err:  # too few runs finished (the failed ones are retried by the same command)
            print(f"no profile written: {err}", file=sys.stderr)
    return plan


def _run_groups(config: ScanConfig, runs: list[PlannedRun], scan_dir: Path, shard: Shard, progress: bool,
                group_size: int, board: Callable[[], list[tuple[str, str]]] | None = None) -> None:
    if runs:
        if shard.rank == 0:
            print(f"scan: {len(runs)} single-layer runs, up to {group_size} trained together", file=sys.stderr)
        run_share(runs, lambda g: execute_group(config, list(g.runs), scan_dir), scan_dir, shard, progress, "scan",
                  group_size, board)


def _run_adaptive(config: ScanConfig, plan: list[PlannedRun], scan_dir: Path, shard: Shard, progress: bool,
                  group_size: int, execute, wide: list[PlannedRun],
                  board: Callable[[], list[tuple[str, str]]] | None = None) -> None:
    """Base and full runs first (the decisions need them; ``wide`` ones were trained by groups of GPUs), then
    the layers rung by rung (:mod:`onelayer.experiments.adaptive`), then the layers that can still reach the top
    to the last step."""
    fixed = [r for r in plan if r.kind != "layer" and r not in wide]
    layers = [r for r in plan if r.kind == "layer"]
    run_share(fixed, lambda r: execute(config, r, scan_dir), scan_dir, shard, progress, "scan", summary=board)

    def rung(c: ScanConfig, runs: list[PlannedRun]) -> None:
        if group_size > 1:
            execute_group(c, runs, scan_dir, final=False)
        else:
            execute_run(c, runs[0], scan_dir, final=False)

    adaptive.run_rungs(config, plan, scan_dir, model_num_layers(config.recipe.model), shard, progress, group_size,
                       rung)
    if group_size > 1:
        _run_groups(config, layers, scan_dir, shard, progress, group_size, board)
    else:
        run_share(layers, lambda r: execute(config, r, scan_dir), scan_dir, shard, progress, "scan", summary=board)


def replay_adaptive(scan_dir: str | Path, top: int) -> dict:
    """:func:`onelayer.experiments.adaptive.replay` on a scan directory."""
    config, plan = load_plan(scan_dir)
    return adaptive.replay(Path(scan_dir), config, plan, model_num_layers(config["recipe"]["model"]), top)


def scan_so_far(scan_dir: Path, plan: list[PlannedRun]) -> list[tuple[str, str]]:
    """What a scan's finished runs say so far, for its live board: base and full accuracy (full training at its
    best rate of ``--lr-grid``), and the single layer of highest accuracy (seeds averaged; at its best rate) with
    its point contribution once base and full are in."""
    accuracy: dict[tuple[str, int | None, float], list[float]] = {}
    for r in plan:
        if run_status(scan_dir, r) == "done":
            accuracy.setdefault((r.kind, r.layer, r.lr_scale), []).append(read_result(scan_dir, r)["accuracy"])
    mean = {key: sum(v) / len(v) for key, v in accuracy.items()}
    several = len({r.lr_scale for r in plan if r.kind != "base"}) > 1

    def at(rate: float) -> str:
        return f" at {rate:g}x --lr" if several else ""

    base = next((v for (kind, _, _), v in mean.items() if kind == "base"), None)
    fulls = {rate: v for (kind, _, rate), v in mean.items() if kind == "full"}
    full_rate = max(fulls, key=lambda x: (fulls[x], -x)) if fulls else None
    full = fulls.get(full_rate)
    rows = [("base / full", " / ".join("-" if v is None else f"{v:.3f}" for v in (base, full)) + " accuracy"
             + (at(full_rate) if full_rate is not None else ""))]
    layers = {(layer, rate): v for (kind, layer, rate), v in mean.items() if kind == "layer"}
    if layers:
        (best, rate) = max(layers, key=lambda k: (layers[k], -k[0], -k[1]))
        text = f"layer {best}{at(rate)}: accuracy {layers[best, rate]:.3f}"
        if base is not None and full is not None and full != base:
            text += f", contribution {(layers[best, rate] - base) / (full - base):+.2f} (point estimate)"
        rows.append(("best layer so far", f"{text}; {len({k for k, _ in layers})} layer(s) measured"))
    return rows


def load_plan(scan_dir: str | Path) -> tuple[dict, list[PlannedRun]]:
    """A scan directory's saved config (as a dict) and plan. Older scans' learning-rate probes (kind
    ``probe``) read as single-layer runs at their rate: a grid with only those layers and rates."""
    scan_dir = Path(scan_dir)
    if not (scan_dir / "scan.json").is_file():
        raise OneLayerError(f"{scan_dir} is not a scan directory (no scan.json): pass the --out of onelayer scan")
    saved = json.loads((scan_dir / "scan.json").read_text())
    runs = [{**r, "kind": "layer" if r["kind"] == "probe" else r["kind"]} for r in saved["runs"]]
    return saved["config"], [PlannedRun(**r) for r in runs]


def lr_scales(plan: list[PlannedRun]) -> tuple[float, ...]:
    """The learning-rate multiples a scan's plan trains at."""
    return tuple(sorted({r.lr_scale for r in plan if r.kind != "base"}))


def evaluated_steps(scan_dir: str | Path, seeds: list[int] | None = None) -> list[int]:
    """The steps after which every finished trained run of the scan was evaluated, with 0 (before training:
    the base model, or each run's own evaluation there), in order."""
    scan_dir = Path(scan_dir)
    _, plan = load_plan(scan_dir)
    trained = [r for r in plan if r.kind != "base" and run_status(scan_dir, r) == "done"
               and (seeds is None or r.seed in seeds)]
    common = set.intersection(*(set(run_steps(run_dir(scan_dir, r))) for r in trained)) if trained else set()
    return sorted(common | {0})


def _run_scores(scan_dir: Path, run: PlannedRun, base: Path, source: str, step: int | None,
                auc_steps: list[int]) -> list[float] | None:
    """A finished run's per-example scores: at its final evaluation, after ``step`` steps, or their area over
    ``auc_steps``; None when that evaluation does not exist. Before training every run is the base model: a run
    without an evaluation at step 0 is read there from the base run's."""
    directory = run_dir(scan_dir, run)

    def at(s: int | None) -> list[float] | None:
        if s is None or run.kind == "base":
            path = examples_file(scan_dir, run, source)
        else:
            path = step_examples(directory, s)
            if s == 0 and not exists(path):
                path = base
        return example_scores(path) if exists(path) else None

    if not auc_steps:
        return at(step)
    curve = [at(s) for s in auc_steps]
    return None if any(c is None for c in curve) else area_under_curve(auc_steps, curve).tolist()


def scan_scores(scan_dir: str | Path, source: str = "", seeds: list[int] | None = None, step: int | None = None,
                auc: bool = False, lr_scales: list[float] | None = None) -> tuple[list, dict, dict, dict, list[int]]:
    """The per-example scores of a scan's finished runs, as :func:`contribution_profile` takes them: base runs,
    ``full[rate][seed]``, ``layers[layer][rate][seed]``; each run's status; and the steps of an area under the
    curve (``auc``; empty otherwise). See :func:`scan_profile` for the arguments."""
    scan_dir = Path(scan_dir)
    _, plan = load_plan(scan_dir)
    status = {r.name: run_status(scan_dir, r) for r in plan}
    if source and (step is not None or auc):
        raise OneLayerError("out-of-domain evaluations are made once, of each run's final checkpoint: drop --step/--auc")
    steps = evaluated_steps(scan_dir, seeds) if auc else []
    if auc and len(steps) < 3:
        raise OneLayerError(f"{scan_dir}: an area under the learning curve needs evaluations during training (rerun "
                            "the scan with --eval-every N); its runs were evaluated only at the end")
    if step is not None and step not in evaluated_steps(scan_dir, seeds):
        raise OneLayerError(f"step {step} was not evaluated by every finished run of {scan_dir}: evaluated steps are "
                            f"{', '.join(map(str, evaluated_steps(scan_dir, seeds)))} (scan with --eval-every N)")
    base_run = next(r for r in plan if r.kind == "base")
    base_file = examples_file(scan_dir, base_run)
    base, full, layers = [], {}, {}
    for r in plan:
        if status[r.name] != "done" or r.kind != "base" and (seeds is not None and r.seed not in seeds
                                                             or lr_scales is not None and r.lr_scale not in lr_scales):
            continue
        scores = _run_scores(scan_dir, r, base_file, source, step, steps)
        if scores is None:
            continue
        if r.kind == "base":
            base.append(scores)
        elif r.kind == "full":
            full.setdefault(r.lr_scale, {})[r.seed] = scores
        else:
            layers.setdefault(r.layer, {}).setdefault(r.lr_scale, {})[r.seed] = scores
    if not base or not full or not layers:
        what = f"evaluated on {source} (run onelayer analyze ood)" if source else "finished"
        raise OneLayerError(f"{scan_dir} needs the base, a full and at least one layer run {what} for a profile "
                            "(rerun onelayer scan to continue it)")
    return base, full, layers, status, steps


def scan_profile(scan_dir: str | Path, n_resamples: int = 2000, source: str = "", seeds: list[int] | None = None,
                 step: int | None = None, auc: bool = False, protocol: str = "study",
                 lr_scales: list[float] | None = None) -> tuple[Profile, dict]:
    """The contribution profile of a (possibly unfinished) scan from its finished runs, and each run's
    status (done, failed or pending). ``source`` picks an out-of-domain evaluation instead of the
    in-domain one; ``seeds`` restricts the trained runs to those seeds, ``lr_scales`` to those rates; ``step``
    reads every run's evaluation after that many steps instead of its final one, ``auc`` the area under each
    run's learning curve; ``protocol`` the learning rate each configuration is read at (``study`` or ``best``,
    see :mod:`onelayer.analysis.contribution`)."""
    config, _ = load_plan(scan_dir)
    base, full, layers, status, steps = scan_scores(scan_dir, source, seeds, step, auc, lr_scales)
    n_layers = model_num_layers(config["recipe"]["model"])
    profile = contribution_profile(base, full, layers, n_layers, protocol=protocol, n_resamples=n_resamples)
    return replace(profile, step=step, auc_steps=tuple(steps)), status


def finished_results(scan_dir: Path, plan: list[PlannedRun] | None = None) -> dict[str, dict]:
    """Each finished run's ``result.json``, by run name (``plan``: the scan's, where the caller has it)."""
    plan = load_plan(scan_dir)[1] if plan is None else plan
    return {r.name: read_result(scan_dir, r) for r in plan if run_status(scan_dir, r) == "done"}


def param_change(scan_dir: Path, profile: Profile | None = None
                 ) -> tuple[dict, dict, Profile, RankCorrelation, RankCorrelation] | None:
    """Each measured layer's mean relative weight change in its own single-layer run and inside full training,
    the profile (``profile``, else the scan's), and the rank correlation of contribution with each change (None
    when no single-layer run recorded its change)."""
    _, plan = load_plan(scan_dir)
    results = finished_results(scan_dir, plan)
    own: dict[int, list[float]] = {}
    full: dict[int, list[float]] = {}
    for r in plan:
        change = results.get(r.name, {}).get("param_change")
        if not change:
            continue
        if r.kind == "layer":
            own.setdefault(r.layer, []).append(change[str(r.layer)])
        elif r.kind == "full":
            for key, value in change.items():
                if key.isdigit():
                    full.setdefault(int(key), []).append(value)
    if not own:
        return None
    own_mean = {k: sum(v) / len(v) for k, v in own.items()}
    full_mean = {k: sum(v) / len(v) for k, v in full.items()}
    profile = profile or scan_profile(scan_dir)[0]
    contrib = measured(profile)
    layers = sorted(set(own_mean) & set(contrib))
    vs_own = rank_correlation([own_mean[k] for k in layers], [contrib[k] for k in layers])
    in_full = [k for k in layers if k in full_mean]
    vs_full = rank_correlation([full_mean[k] for k in in_full], [contrib[k] for k in in_full])
    return own_mean, full_mean, profile, vs_own, vs_full


def write_profile(scan_dir: str | Path, step: int | None = None, auc: bool = False) -> Profile:
    """Compute a scan's profile from its finished runs and write ``profile.json``, ``profile.md`` (the table)
    and ``profile.png`` into it; with several learning rates also ``profile-best.*`` (each configuration at its
    own best rate). ``step`` or ``auc`` write ``profile-step000020.*`` or ``profile-auc.*`` instead. With no
    ``step`` or ``auc``, a scan that evaluated during training also gets its ``profile-auc.*``. Returns the
    study-protocol profile."""
    scan_dir = Path(scan_dir)
    _, plan = load_plan(scan_dir)
    protocols = ["study", "best"] if len(lr_scales(plan)) > 1 else ["study"]
    variants = [(step, auc)]
    if step is None and not auc and len(evaluated_steps(scan_dir)) >= 3:
        variants.append((None, True))
    written = {}
    for at, area in variants:
        for protocol in protocols:
            profile, status = scan_profile(scan_dir, step=at, auc=area, protocol=protocol)
            profile = adaptive.with_adaptive_note(profile, scan_dir)
            file = profile_file(scan_dir, protocol, at, area)
            file.write_text(json.dumps({**asdict(profile), "runs": status}, indent=2))
            file.with_suffix(".md").write_text(profile_table(profile))
            plot_profile(profile, file.with_suffix(".png"), title=f"layer contribution: {scan_dir.name}")
            written[at, area, protocol] = profile
    if step is None and not auc:
        report_profile(scan_dir, written[None, False, "study"])
    return written[step, auc, "study"]


def report_profile(scan_dir: Path, profile: Profile) -> None:
    """Send the profile to the scan's ``--report-to`` trackers (into ``SCAN/tensorboard``, ...): contribution
    and interval at each layer index (interpolated layers marked), the full-training gain, table and figure.
    A profile written again replaces the one sent before."""
    config, _ = load_plan(scan_dir)
    tracker = open_tracker(config["recipe"].get("report_to", "none"), scan_dir, config)
    try:
        g = profile.full_gain
        for p in profile.points:  # in layer order, the full-training gain with layer 0 (wandb's steps only rise)
            gain = {"full_gain": g.value, "full_gain_low": g.low, "full_gain_high": g.high} if p.layer == 0 else {}
            tracker.log("profile", {"contribution": p.contribution, "low": p.low, "high": p.high,
                                    "interpolated": p.interpolated, **gain}, p.layer)
        tracker.text("profile/table", profile_table(profile))
        tracker.image("profile/figure", scan_dir / "profile.png")
    finally:
        tracker.close()

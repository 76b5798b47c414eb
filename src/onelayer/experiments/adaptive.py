"""Adaptive scans: spend single-layer runs where the answer is still uncertain (successive halving).

With ``--adaptive-top K`` a scan trains its base and full runs as usual, then every single-layer run only to
its first evaluation (``--eval-every``). There, each layer's contribution and interval are computed exactly as
the profile would compute them at that step; a layer whose interval's upper end is below the lower ends of K
other layers cannot be among the top K, so its runs stop there (their ``result.json`` says ``stopped_at``); the
others train on to the next evaluation, and so on to the last step. ``adaptive.json`` records every decision.
The final profile reads stopped layers at the step they stopped, and says so in its notes: their values are
early, so only the layers trained to the end compete for the top K.

:func:`replay` applies the same rule to an exhaustive scan that evaluated during training, so the saving and
whether the top K would have come out the same can be measured on scans already run.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from ..analysis.contribution import contribution_profile
from ..config import ScanConfig
from ..errors import OneLayerError
from ..jsonl import exists
from ..profile import Estimate, Profile
from .rundir import example_scores, examples_file, run_dir, run_status, step_examples
from .sharding import Shard, barrier, run_share

DECISIONS = "adaptive.json"


def could_be_top(estimates: dict[int, Estimate], top: int) -> set[int]:
    """The layers that may still be among the ``top`` highest: all but those whose interval's upper end is
    below the ``top``-th highest lower end (ties kept). Layers with an undefined estimate are kept."""
    if len(estimates) <= top:
        return set(estimates)
    lows = sorted((e.low for e in estimates.values() if math.isfinite(e.low)), reverse=True)
    if len(lows) < top:
        return set(estimates)
    bar = lows[top - 1]
    return {layer for layer, e in estimates.items() if not math.isfinite(e.high) or e.high >= bar}


def rungs(config: ScanConfig) -> list[int]:
    """The evaluations before the last step at which an adaptive scan decides."""
    recipe = config.recipe
    if config.adaptive_top < 0:
        raise OneLayerError(f"--adaptive-top must be >= 0 (0 = train every layer to the end), got {config.adaptive_top}")
    if not recipe.eval_every or recipe.eval_every >= recipe.steps:
        raise OneLayerError("--adaptive-top decides at evaluations during training: add --eval-every N with N below "
                            f"--steps ({recipe.steps}), e.g. --eval-every {max(1, recipe.steps // 3)}")
    return list(range(recipe.eval_every, recipe.steps, recipe.eval_every))


def estimates_at(scan_dir: Path, plan: list, step: int, layers: set[int], num_layers: int) -> dict[int, Estimate]:
    """Each of ``layers``' contribution at evaluation ``step`` (study protocol, the profile's intervals), from
    whatever runs of the scan's ``plan`` have evaluated there, finished or not."""
    base_run = next(r for r in plan if r.kind == "base")
    base = [example_scores(examples_file(scan_dir, base_run))]
    full: dict = {}
    found: dict = {}
    for r in plan:
        if r.kind == "base" or (r.kind == "layer" and r.layer not in layers):
            continue
        path = step_examples(run_dir(scan_dir, r), step)
        if not exists(path):
            continue
        target = full.setdefault(r.lr_scale, {}) if r.kind == "full" else \
            found.setdefault(r.layer, {}).setdefault(r.lr_scale, {})
        target[r.seed] = example_scores(path)
    if not full or not found:
        raise OneLayerError(f"{scan_dir}: no full run and single-layer runs evaluated at step {step} to decide on")
    points, _ = contribution_profile(base, full, found, num_layers).ranking()  # by gain where full training lost
    return {p.layer: Estimate(p.contribution, p.low, p.high) for p in points if p.layer in found
            and not p.interpolated}


def run_rungs(config: ScanConfig, plan: list, scan_dir: Path, num_layers: int, shard: Shard, progress: bool,
              group_size: int, train) -> None:
    """Train the plan's unfinished single-layer runs rung by rung, stopping the layers that can no longer be in
    the top K. ``train(runs, steps)`` trains runs (or a group of them) to ``steps`` without finishing them."""
    decisions = _read_decisions(scan_dir)
    layers = [r for r in plan if r.kind == "layer"]
    for step in rungs(config):
        if str(step) in decisions:
            continue  # decided before the scan was interrupted: its stopped runs are finished
        active = [r for r in layers if run_status(scan_dir, r) != "done"]
        if not active:
            return
        rung_config = replace(config, recipe=replace(config.recipe, steps=step))
        if group_size > 1:
            run_share(active, lambda g, c=rung_config: train(c, list(g.runs)), scan_dir, shard, progress,
                      f"rung {step}", group_size)
        else:
            run_share(active, lambda r, c=rung_config: train(c, [r]), scan_dir, shard, progress, f"rung {step}")
        candidates = {r.layer for r in active}
        estimates = estimates_at(scan_dir, plan, step, candidates, num_layers)
        keep = could_be_top(estimates, config.adaptive_top)
        stopped = sorted(candidates - keep)
        if shard.rank == 0:
            for r in active:
                if r.layer in stopped:
                    _finish_early(scan_dir, r, step)
            decisions[str(step)] = {"kept": sorted(keep), "stopped": stopped,
                                    "estimates": {str(k): [e.value, e.low, e.high] for k, e in estimates.items()}}
            (scan_dir / DECISIONS).write_text(json.dumps({"top": config.adaptive_top, "rungs": decisions}, indent=2))
        barrier(shard)  # every rank sees the same stopped runs before the next rung is dealt out


def _read_decisions(scan_dir: Path) -> dict:
    path = scan_dir / DECISIONS
    return json.loads(path.read_text())["rungs"] if path.is_file() else {}


def _finish_early(scan_dir: Path, run, step: int) -> None:
    """Write a stopped run's ``result.json`` from its evaluation at ``step``."""
    directory = run_dir(scan_dir, run)
    summary = json.loads((directory / "evals" / f"step{step:06d}.json").read_text())
    row = {"name": run.name, "kind": run.kind, "seed": run.seed, "layer": run.layer, "lr_scale": run.lr_scale,
           "examples": f"evals/step{step:06d}.examples.jsonl", "step": step, **summary, "stopped_at": step,
           "param_change": None}
    (directory / "result.json").write_text(json.dumps(row, indent=2))


def stopped_note(scan_dir: Path) -> str | None:
    """The profile's note on layers an adaptive scan stopped early (None for an exhaustive scan)."""
    decisions = _read_decisions(Path(scan_dir))
    stopped = {layer: int(step) for step, d in decisions.items() for layer in d["stopped"]}
    if not stopped:
        return None
    parts = ", ".join(f"{layer} (step {step})" for layer, step in sorted(stopped.items()))
    top = json.loads((Path(scan_dir) / DECISIONS).read_text())["top"]
    return (f"adaptive scan (--adaptive-top {top}): layers {parts} stopped early, and their contributions are read "
            "there, not at the last step; only the layers trained to the end compete for the top")


def with_adaptive_note(profile: Profile, scan_dir: Path) -> Profile:
    note = stopped_note(scan_dir)
    return replace(profile, notes=(*profile.notes, note)) if note else profile


def replay(scan_dir: Path, config: dict, plan: list, num_layers: int, top: int) -> dict:
    """What ``--adaptive-top top`` would have done on an exhaustive scan (its saved ``config`` and ``plan``) that
    evaluated during training: the layers stopped at each evaluation, the share of single-layer training steps
    saved, and whether the final top ``top`` (among the layers it would have trained to the end) equals the
    exhaustive scan's."""
    recipe = config["recipe"]
    steps, every = recipe["steps"], recipe.get("eval_every") or 0
    if not every or every >= steps:
        raise OneLayerError(f"{scan_dir} evaluated only at the end: a replay needs a scan run with --eval-every N")
    layers = {r.layer for r in plan if r.kind == "layer" and run_status(scan_dir, r) == "done"}
    active, stopped_at = set(layers), {}
    for step in range(every, steps, every):
        keep = could_be_top(estimates_at(scan_dir, plan, step, active, num_layers), top)
        for layer in active - keep:
            stopped_at[layer] = step
        active = keep
    final = estimates_at(scan_dir, plan, steps, layers, num_layers)

    def best(candidates) -> list[int]:
        return sorted(sorted(candidates, key=lambda layer: (-final[layer].value, layer))[:top])

    trained = sum(stopped_at.get(layer, steps) for layer in layers)
    return {"top": top, "stopped_at": {str(k): v for k, v in sorted(stopped_at.items())},
            "layer_steps_saved": 1 - trained / (steps * len(layers)),
            "exhaustive_top": best(layers), "adaptive_top": best(active), "same_top": best(layers) == best(active)}

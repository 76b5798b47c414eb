"""Training strategies compared under one budget: the same recipe, steps, seeds and data order for
each, only the choice of what to train differs.

Strategies (comma-separated):

    full           every layer (full-parameter RL)
    top:k          the k highest-contribution layers of the profile
    lr-guided      every layer, per-layer learning rates from the profile (``--lr-from``)
    lora[:r]       LoRA on every layer's linear maps; rank r, or by default the rank whose parameter
                   count matches one layer; learning rate times ``--lora-lr-scale``
    random:k       k random layers, drawn anew for each seed (the control for top:k)
    any layer spec middle:10, 16, 10-19, ... (see onelayer.layers)

Runs live in ``OUT/runs/STRATEGY-sSEED`` (plus ``base``, the untrained model) and resume like a
scan's. A base or full run of the profile's scan made with the same recipe is copied instead of
repeated: it is the same computation.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import adapters
from ..analysis.contribution import (
    Resampled,
    ResamplePlan,
    bootstrap_indices,
    difference_estimate,
    ratio_estimate,
    resampled,
    seed_draws,
)
from ..config import (
    DEFAULT_STRATEGIES,
    NOT_SCIENCE,
    CompareConfig,
    TrainConfig,
    check_out_dir,
    from_dict,
    recipe_difference,
    to_dict,
)
from ..errors import OneLayerError
from ..layers import parse_layer_spec
from ..models import load_skeleton, model_num_layers
from ..profile import Estimate, read_profile, reference_path
from .rundir import check_finished, example_scores, examples_file, read_result, run_dir, run_status
from .scan import evaluation_schedule, load_plan
from .sharding import RunGroup, Shard, run_groups, run_share, run_width, trains_many_layers


@dataclass(frozen=True)
class Strategy:
    label: str  # as written by the user
    layers: str = "all"
    lr_from: str = ""
    lora_rank: int = 0
    lr_scale: float = 1.0
    per_seed_draw: bool = False  # random:k without a seed: each seed draws its own layers

    @property
    def slug(self) -> str:  # top:10*3 -> top_10-lr3x
        return re.sub(r"[^A-Za-z0-9.\-]+", "_", re.sub(r"\*(.*)$", r"-lr\1x", self.label)).strip("_")


@dataclass(frozen=True)
class StrategyRun:
    name: str
    strategy: Strategy | None  # None: the untrained base model
    seed: int


def _count(text: str, term: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise OneLayerError(f"strategy '{term}': the count must be a positive integer, e.g. top:10")
    return int(text)


def strategy_term(label: str) -> str:
    """The strategy a label names, without its rate multiple (``top:10*3`` -> ``top:10``)."""
    return label.partition("*")[0]


def _multiple(text: str, written: str) -> float:
    try:
        value = float(text.removesuffix("x"))  # top:10*3 or top:10*3x
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise OneLayerError(f"strategy '{written}': after * comes the learning-rate multiple, a positive number, "
                            "e.g. top:10*3 (top:10 at 3x --lr)")
    return value


def parse_strategies(config: CompareConfig, n_layers: int, matched_rank: int) -> list[Strategy]:
    """The strategies of ``config.strategies``; ``matched_rank`` is the LoRA rank used by ``lora``. ``TERM*K`` is
    strategy TERM at K times the recipe's rate (single layers' best rate is often above full training's)."""
    profile = config.profile

    def need_profile(term: str) -> str:
        if not profile:
            raise OneLayerError(f"strategy '{term}' needs a profile: give a scan directory (onelayer compare SCAN)")
        return profile

    strategies = []
    for written in (t.strip() for t in config.strategies.split(",")):
        if not written:
            continue
        term, star, multiple = written.partition("*")  # TERM*K: that strategy at K times --lr
        name, _, arg = term.partition(":")
        if term in ("full", "all"):
            strategy = Strategy(term)
        elif name == "top":
            strategy = Strategy(term, layers=f"top:{_count(arg, term)}@{need_profile(term)}")
        elif term == "lr-guided":
            strategy = Strategy(term, lr_from=need_profile(term))
        elif name == "lora":
            rank = _count(arg, term) if arg else (config.recipe.lora_rank or matched_rank)
            strategy = Strategy(term, lora_rank=rank, lr_scale=config.lora_lr_scale)
        else:
            parse_layer_spec(term, n_layers)  # a malformed spec fails now, with the grammar in the message
            strategy = Strategy(term, layers=term, per_seed_draw=name == "random" and arg.count(":") == 0)
        if star:
            k = _multiple(multiple, written)
            strategy = replace(strategy, label=f"{term}*{k:.15g}", lr_scale=strategy.lr_scale * k)
        strategies.append(strategy)
    if not strategies:
        raise OneLayerError(f"--strategies names nothing; e.g. {DEFAULT_STRATEGIES}")
    slugs = [s.slug for s in strategies]
    repeated = sorted({s for s in slugs if slugs.count(s) > 1})
    if repeated:
        raise OneLayerError(f"strategy {repeated[0]} is listed twice: name each strategy once")
    if profile:
        read_profile(profile)  # a missing or unfinished profile fails before any training
    return strategies


def plan_comparison(strategies: list[Strategy], seeds: list[int]) -> list[StrategyRun]:
    """The base model, then each strategy seed by seed, in the order given."""
    return [StrategyRun("base", None, seeds[0])] + [
        StrategyRun(f"{s.slug}-s{seed}", s, seed) for s in strategies for seed in seeds]


def recipe_for(config: CompareConfig, run: StrategyRun, out: Path) -> TrainConfig:
    s = run.strategy or Strategy("base")
    layers = f"{s.layers}:{run.seed}" if s.per_seed_draw else s.layers
    return replace(config.recipe, layers=layers, lr_from=s.lr_from, lora_rank=s.lora_rank,
                   lr=config.recipe.lr * s.lr_scale, seed=run.seed, out=str(run_dir(out, run)),
                   **evaluation_schedule(config.recipe))


def reuse_from_scan(config: CompareConfig, run: StrategyRun, out: Path) -> bool:
    """Copy the scan's base run, or its full run of the same seed, when the scan used the same recipe
    (a full run only with its checkpoint, which ensembles and out-of-domain evaluation need)."""
    scan = reference_path(config.profile) if config.profile else None
    if scan is None or not (scan / "scan.json").is_file():
        return False
    if run.strategy is not None and (run.strategy.layers != "all" or run.strategy.lr_from or run.strategy.lora_rank):
        return False  # only full training (at any rate) is in a scan
    saved, plan = load_plan(scan)
    mine = recipe_for(config, run, out)
    kind = "base" if run.strategy is None else "full"
    for scan_run in plan:
        source = run_dir(scan, scan_run)
        if (scan_run.kind != kind or run_status(scan, scan_run) != "done"
                or (kind == "full" and (scan_run.seed != run.seed or not (source / "checkpoint").is_dir()))):
            continue
        theirs = {**saved["recipe"], "seed": scan_run.seed, "lr": saved["recipe"]["lr"] * scan_run.lr_scale}
        # what the run computes; a scan's saved recipe names its scanned layers, not its full run's (the kind of
        # run is matched above). With --lr-grid, the scan's full run at another rate may be the same computation.
        if recipe_difference(theirs, mine, NOT_SCIENCE | {"layers"}):
            continue
        target = run_dir(out, run)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        result = json.loads((target / "result.json").read_text())
        (target / "result.json").write_text(json.dumps({**result, "name": run.name, "layers_spec": "all", "copied_from": str(source)},
                                                       indent=2))
        return True
    return False


def _write_result(run: StrategyRun, recipe: TrainConfig, summary: dict) -> dict:
    row = {"name": run.name, "strategy": run.strategy.label if run.strategy else "base", "seed": run.seed,
           "layers_spec": recipe.layers, **summary}
    (Path(recipe.out) / "result.json").write_text(json.dumps(row, indent=2))
    return row


def groupable(config: CompareConfig, run: StrategyRun, out: Path, n_layers: int) -> bool:
    """Whether ``run`` can train with others in one process (:mod:`onelayer.training.concurrent`): a strategy
    of decoder layers only: not the base model, full training (which a scan's run may stand in for), lr-guided
    (per-layer rates) or LoRA, nor a spec that names embeddings or the head."""
    s = run.strategy
    if s is None or s.layers == "all" or s.lr_from or s.lora_rank:
        return False
    selection = parse_layer_spec(recipe_for(config, run, out).layers, n_layers)
    return bool(selection.layers) and not selection.extras


def trained_state_bytes(config: CompareConfig, runs: list[StrategyRun], out: Path) -> int:
    """The most that one run of ``runs`` holds for its trained layers: a float32 copy, its gradient and Adam's
    two moments (16 bytes a parameter)."""
    from ..memory import model_shapes

    shapes = model_shapes(config.recipe.model, config.recipe.attention)
    return max((16 * sum(shapes.per_id[i] for i in parse_layer_spec(recipe_for(config, r, out).layers,
                                                                    shapes.layers).layers)
                for r in runs), default=0)


def execute_group(config: CompareConfig, runs: list[StrategyRun], out: Path, progress: bool = False) -> None:
    """Train the strategy runs ``runs`` together; each writes its ``result.json``, or its ``error.txt``."""
    from .recipes import train_group

    recipes = [recipe_for(config, run, out) for run in runs]
    train_group(recipes, lambda k, summary: _write_result(runs[k], recipes[k], summary), progress)


def execute(config: CompareConfig, run: StrategyRun, out: Path, progress: bool = False, world=None) -> dict:
    """Train (unless base) and evaluate one run, or copy it from the scan; write and return its result.
    ``world``: the processes training it together (each calls this; rank 0 copies and writes)."""
    main = world is None or world.is_main
    reused = reuse_from_scan(config, run, out) if main else False
    if world is not None:
        reused = not world.all(not reused)  # what rank 0 did
    if reused:
        return read_result(out, run) if main else {}
    from .recipes import train_and_evaluate  # training loads only to run: reading results needs none of it

    recipe = recipe_for(config, run, out)
    summary = train_and_evaluate(recipe, trained=run.strategy is not None, progress=progress,
                                 **({"world": world} if world is not None else {}))
    return _write_result(run, recipe, summary) if main else {}


def run_widths(config: CompareConfig, plan: list[StrategyRun], out: Path, n_layers: int) -> dict[str, int]:
    """How many GPUs (processes) train each run together: one for the base model and single layers; for
    strategies of more layers ``--group-gpus``, or as many as their memory estimate needs."""
    by_strategy: dict[str, int] = {}
    widths = {}
    for run in plan:
        if run.strategy is None:
            widths[run.name] = 1
            continue
        if run.strategy.label not in by_strategy:  # the seeds of a strategy need the same
            recipe = recipe_for(config, run, out)
            by_strategy[run.strategy.label] = run_width(recipe, config.group_gpus, trains_many_layers(recipe, n_layers))
        widths[run.name] = by_strategy[run.strategy.label]
    return widths


def recipe_from_profile(profile: str) -> TrainConfig | None:
    """The recipe of the scan behind ``profile`` (a scan directory, with or without a query such as
    ``?protocol=best``), or None for a bare profile.json."""
    if not profile or not (reference_path(profile) / "scan.json").is_file():
        return None
    return from_dict(TrainConfig, load_plan(reference_path(profile))[0]["recipe"])


def run_comparison(config: CompareConfig, progress: bool = True) -> list[StrategyRun]:
    """Run every pending or failed run of the comparison (this rank's share under torchrun)."""
    if config.seeds < 1:
        raise OneLayerError(f"--seeds must be >= 1, got {config.seeds}")
    config.recipe.validate()
    check_out_dir(config.recipe.out)
    shard = Shard.from_env()
    config = replace(config, recipe=replace(config.recipe, device=shard.device(config.recipe.device)))
    out = Path(config.recipe.out)
    n_layers = model_num_layers(config.recipe.model)
    strategies = parse_strategies(config, n_layers, adapters.matched_rank(load_skeleton(config.recipe.model)))
    plan = plan_comparison(strategies, [config.recipe.seed + i for i in range(config.seeds)])
    out.mkdir(parents=True, exist_ok=True)
    widths = run_widths(config, plan, out, n_layers)
    for run in plan:  # a comparison resumed with flags that change what its finished runs computed fails now
        if run.strategy is not None and run_status(out, run) == "done":
            recipe = recipe_for(config, run, out)
            check_finished(run_dir(out, run), recipe, run.strategy.lr_scale)
            kept = read_result(out, run).get("layers")
            if "@" in recipe.layers and kept is not None:  # top:k picks from the profile as it is now
                now = parse_layer_spec(recipe.layers, n_layers).layers
                if list(kept) != list(now):
                    raise OneLayerError(f"{run_dir(out, run)} trained layers {kept}, but {run.strategy.label} of "
                                        f"the profile now picks {list(now)}: the profile changed since; pass another "
                                        "--out to compare with the new one")
    if shard.rank == 0:
        saved = {"config": to_dict(replace(config, recipe=replace(config.recipe, device=""))),
                 "strategies": [s.__dict__ for s in strategies],
                 "runs": [{"name": r.name, "strategy": r.strategy.label if r.strategy else None, "seed": r.seed}
                          for r in plan],
                 # which runs a group of GPUs trains together, and how many (recomputed when it resumes)
                 "placement": {name: width for name, width in widths.items() if width > 1}}
        (out / "compare.json").write_text(json.dumps(saved, indent=2))
    narrow = [r for r in plan if widths[r.name] == 1]
    together = [r for r in narrow if groupable(config, r, out, n_layers)]
    size = together_size(config, together, out)
    for width in sorted({w for w in widths.values() if w > 1}, reverse=True):
        run_groups([r for r in plan if widths[r.name] == width], width,
                   lambda r, world: execute(config, r, out, world=world), out, shard, progress, "compare",
                   config.recipe.prompts_per_step, config.recipe.device)
    run_share([r for r in narrow if r not in together], lambda r: execute(config, r, out), out, shard, progress,
              "compare")
    pending = [r for r in together if run_status(out, r) != "done"]
    if size > 1 and pending and shard.rank == 0:
        print(f"compare: {len(pending)} runs of decoder layers, up to {size} trained together", file=sys.stderr)
    # every rank deals out the same list, whatever its own GPU's free memory made of the size
    run_share(together, lambda g: execute_group(config, list(g.runs), out) if isinstance(g, RunGroup)
              else execute(config, g, out), out, shard, progress, "compare", size)
    return plan


def together_size(config: CompareConfig, together: list[StrategyRun], out: Path) -> int:
    """How many of ``together`` to train at once (:func:`onelayer.training.concurrent.group_size`), decided before
    any training, so that an impossible ``--concurrent`` fails at once."""
    if not together:
        return 1
    from ..training.concurrent import group_size  # training loads only to run

    return group_size(recipe_for(config, together[0], out), config.concurrent, trained_state_bytes(config, together, out))


@dataclass(frozen=True)
class StrategyResult:
    label: str
    seeds: list[int]
    accuracies: list[float]  # one per finished seed
    layers: list[list[int]]  # trained layers per seed
    trainable_parameters: int
    optimizer_state_bytes: int
    train_seconds: float  # mean over seeds
    peak_memory_bytes: int | None
    mean: float
    std: float  # across seeds (0 for one seed)
    gain_over_full: float  # mean accuracy minus full training's, with a paired bootstrap interval
    gain_low: float
    gain_high: float
    share_of_full_gain: float  # (S - S_base) / (S_full - S_base), the contribution of the strategy
    share_low: float
    share_high: float


def _load(out: Path) -> tuple[dict, list[dict]]:
    path = out / "compare.json"
    if not path.is_file():
        raise OneLayerError(f"{out} is not a comparison directory (no compare.json): pass the --out of onelayer compare")
    saved = json.loads(path.read_text())
    return saved, saved["runs"]


def _recorded_layers(spec: str, n_layers: int) -> list[int]:
    """The layers of an older result (without "layers") from its recorded spec; none when the spec reads a
    profile that is not where it was (results copied off the machine that made them)."""
    try:
        return list(parse_layer_spec(spec, n_layers).layers)
    except OneLayerError:
        return []


@dataclass(frozen=True)
class Comparison:
    base_accuracy: float
    full_gain: Estimate | None  # full training over the base model (None without a finished full run)
    strategies: list[StrategyResult]


def comparison_results(out: str | Path, n_resamples: int = 2000) -> Comparison:
    """Base accuracy, full training's gain, and one result per strategy with a finished seed. Gains over full
    training and shares of its gain come with intervals from one hierarchical bootstrap plan for every
    strategy (:mod:`onelayer.analysis.contribution`): seeds resampled (one draw for all strategies, so runs of
    one seed stay paired), then eval examples (paired: every strategy is scored on the same examples)."""
    out = Path(out)
    saved, runs = _load(out)
    n_layers = model_num_layers(saved["config"]["recipe"]["model"])
    done = {}
    for r in runs:
        run = StrategyRun(r["name"], None, r["seed"])
        if run_status(out, run) == "done":
            result = read_result(out, run)
            done[r["name"]] = (r, result, example_scores(examples_file(out, run)))
    if "base" not in done:
        raise OneLayerError(f"{out}: the base run has not finished; rerun onelayer compare to continue")
    labels = [s["label"] for s in saved["strategies"]]
    by_label = {label: [v for v in done.values() if v[0]["strategy"] == label] for label in labels}
    base_scores = np.asarray(done["base"][2])
    indices = bootstrap_indices(base_scores.size, n_resamples, 0)
    # seeds resampled too (runs of one seed share data order across strategies: one draw for all, paired)
    plan = ResamplePlan(indices, seed_draws(max(len(v) for v in by_label.values()), n_resamples, 0))

    def scores_of(found: list) -> Resampled:
        return resampled([v[2] for v in sorted(found, key=lambda v: v[0]["seed"])], plan)

    base = resampled(base_scores, plan)
    # full training at any rate (full, full*3): the first such strategy listed that finished
    full_label = next((label for label in labels if strategy_term(label) in ("full", "all") and by_label[label]), None)
    full = scores_of(by_label[full_label]) if full_label else None
    results = []
    for label in labels:
        found = by_label[label]
        if not found:
            continue
        accuracies = [v[1]["accuracy"] for v in found]
        scores = scores_of(found)
        nan = float("nan")
        gain = difference_estimate(scores, full) if full is not None else None
        share = ratio_estimate(scores, base, full) if full is not None else None
        meta_layers = [v[1].get("layers") or _recorded_layers(v[1]["layers_spec"], n_layers) for v in found]
        peaks = [v[1].get("peak_memory_bytes") for v in found if v[1].get("peak_memory_bytes")]
        results.append(StrategyResult(
            label, [v[0]["seed"] for v in found], accuracies, meta_layers,
            int(found[0][1].get("trainable_parameters") or 0), int(found[0][1].get("optimizer_state_bytes") or 0),
            float(np.mean([v[1].get("train_seconds") or 0.0 for v in found])), max(peaks) if peaks else None,
            float(np.mean(accuracies)), float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
            gain.value if gain else nan, gain.low if gain else nan, gain.high if gain else nan,
            share.value if share else nan, share.low if share else nan, share.high if share else nan))
    return Comparison(base.value, difference_estimate(full, base) if full is not None else None, results)


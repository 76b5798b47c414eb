"""The ``onelayer`` command: parse flags into the config dataclasses, call the library, print.

Flags are generated from the dataclasses in :mod:`onelayer.config`, so the CLI and the Python API
cannot drift apart: ``TrainConfig.lr`` is ``--lr``, ``SamplingConfig.max_new_tokens`` is
``--max-new-tokens``, a dict field ``task_options`` is a repeatable ``--task-option KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields, is_dataclass, replace
from pathlib import Path

from .config import (
    GROUPS,
    CompareConfig,
    EvalConfig,
    OODConfig,
    PredictConfig,
    SamplingConfig,
    ScanConfig,
    TrainConfig,
    check_out_dir,
    config_fields,
    flag,
)
from .errors import OneLayerError


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_config_flags(parser: argparse.ArgumentParser, cls, defaults=None, only_given: bool = False,
                     nested_from: str = "", _from: str = "", _sections: dict | None = None) -> None:
    """Add one flag per field of dataclass ``cls`` (nested dataclasses flattened), listed under the section
    its metadata names. With ``only_given``, flags the user did not pass stay out of the namespace (see
    :func:`config_with_overrides`); ``nested_from`` names where the nested dataclasses' defaults then come
    from (e.g. "the scan's")."""
    defaults = defaults if defaults is not None else cls()
    if _sections is None:  # one argparse group per section, in the order of GROUPS
        groups = {f.metadata.get("group") for _, f in config_fields(cls)}
        _sections = {g: parser.add_argument_group(f"{g} options") for g in GROUPS if g in groups}
    for f in fields(cls):
        value = getattr(defaults, f.name)
        if is_dataclass(value):
            add_config_flags(parser, type(value), value, only_given, nested_from, _from or nested_from, _sections)
            continue
        section = _sections[f.metadata["group"]]
        help_text = f.metadata.get("help", "")
        choices = [c for c in f.metadata.get("choices", ()) if c]
        metavar = "{" + ",".join(choices) + "}" if choices else None
        default = argparse.SUPPRESS if only_given else value
        shown = f" (default: {_from}, else {value})" if _from else f" (default: {value})"
        if isinstance(value, bool):
            section.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                 help=help_text + shown)
        elif isinstance(value, dict):
            section.add_argument(flag(f.name, repeatable=True), dest=f.name, action="append", type=_parse_option,
                                 default=argparse.SUPPRESS if only_given else [], metavar="KEY=VALUE", help=help_text)
        else:
            section.add_argument(flag(f.name), dest=f.name, type=type(value), default=default, metavar=metavar,
                                 help=help_text + shown)


def config_with_overrides(config, args: argparse.Namespace):
    """``config`` with the fields whose flags were given (flags made with ``only_given``) replaced."""
    changes = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            changes[f.name] = config_with_overrides(value, args)
        elif hasattr(args, f.name):
            given = getattr(args, f.name)
            changes[f.name] = dict(given) if isinstance(value, dict) else given
    return replace(config, **changes)


def config_from_args(cls, args: argparse.Namespace):
    """Build ``cls`` from parsed flags made by :func:`add_config_flags`."""
    kwargs = {}
    for f in fields(cls):
        factory = f.default_factory if f.default_factory is not MISSING else None
        sample = factory() if factory is not None else f.default
        if is_dataclass(sample):
            kwargs[f.name] = config_from_args(type(sample), args)
        elif isinstance(sample, dict):
            kwargs[f.name] = dict(getattr(args, f.name))
        else:
            kwargs[f.name] = getattr(args, f.name)
    return cls(**kwargs)


LAYERS_FORMATS = ("table", "names", "regex", "freeze-regex", "peft", "json")


def cmd_layers(args: argparse.Namespace) -> None:
    from .layers import parameter_counts, parse_layer_spec
    from .models import decoder_layers, head_is_tied, load_skeleton, num_layers

    model = load_skeleton(args.model)
    selection = parse_layer_spec(args.select, num_layers(model.config))
    counts = parameter_counts(model, selection)
    prefix, _ = decoder_layers(model)
    report = {"model": args.model, "architecture": type(model).__name__, "num_layers": selection.num_layers,
              "layers_module": prefix, "spec": args.select, "layers": list(selection.layers),
              "extras": list(selection.extras), "notes": list(selection.notes), "tied_head": head_is_tied(model),
              **counts}
    fmt = "json" if args.json else args.format
    if fmt != "table":
        print(layers_export(model, selection, fmt, report))
        return
    from rich.console import Console
    from rich.table import Table

    # the title on a line of its own: a table title wraps to the width of the (narrow) table
    table = Table()
    table.add_column("layer")
    table.add_column("trainable parameters", justify="right")
    for layer, count in counts["per_layer"].items():
        table.add_row(layer, f"{count:,}")
    console = Console()
    console.print(f"{args.model} ({report['architecture']}, {selection.num_layers} layers), spec {args.select}:",
                  highlight=False, soft_wrap=True)
    console.print(table)
    for note in selection.notes:
        console.print(f"note: {note}")
    console.print(f"selected: {selection.describe()}; trainable {counts['trainable']:,} of {counts['total']:,} "
                  f"({100 * counts['trainable_fraction']:.2f}%)")


def layers_export(model, selection, fmt: str, report: dict) -> str:
    """``onelayer layers --format FMT``: the selection as text another trainer takes."""
    from .interop import frozen_regex, peft_options, trainable_regex
    from .layers import selected_names

    if fmt == "names":
        return "\n".join(selected_names(model, selection))
    if fmt == "regex":
        return trainable_regex(model, selection)
    if fmt == "freeze-regex":
        return frozen_regex(model, selection)
    if fmt == "peft":
        return json.dumps(peft_options(model, selection), indent=2)
    peft = peft_options(model, selection) if selection.layers else None
    return json.dumps({**report, "names": selected_names(model, selection), "regex": trainable_regex(model, selection),
                       "freeze_regex": frozen_regex(model, selection), "peft": peft}, indent=2)


def cmd_plan(args: argparse.Namespace) -> None:
    """The memory per GPU of a training run, from its config alone (nothing loads)."""
    import torch

    from .memory import GB, estimate, plan_lines, prompt_tokens

    config = config_from_args(TrainConfig, args)
    config.validate()
    if args.gpus < 1:
        raise OneLayerError(f"--gpus must be >= 1, got {args.gpus}")
    gpu = args.gpu_memory_gb * GB if args.gpu_memory_gb else None
    if gpu is None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(torch.device(config.device or "cuda")).total_memory
    if gpu is None:
        gpu = 80 * GB
        print("no GPU here: assuming GPUs of 80 GB (--gpu-memory-gb)", file=sys.stderr)
    tokens = args.prompt_tokens or prompt_tokens(config)
    gpus = sorted({1, args.gpus})
    if args.json:
        found = {n: estimate(config, n, tokens, gpu) for n in gpus}
        print(json.dumps({"model": config.model, "layers": config.layers, "prompt_tokens": tokens, "gpu_bytes": gpu,
                          "gpus": {n: {"parts": e.parts, "rollout_phase": e.rollout_phase, "update_phase": e.update_phase,
                                       "peak": e.peak, "fits": e.fits(gpu)} for n, e in found.items()}}, indent=2))
        return
    print("\n".join(plan_lines(config, gpus, tokens, gpu)))


def cmd_train(args: argparse.Namespace) -> None:
    from .experiments.sharding import Shard
    from .training import train

    if args.dry_run:
        args.gpus, args.gpu_memory_gb, args.prompt_tokens, args.json = Shard.from_env().world, 0, 0, False
        cmd_plan(args)
        return
    config = config_from_args(TrainConfig, args)
    result = train(config, progress=not args.no_progress)
    if Shard.from_env().rank != 0:
        return  # rank 0 reports for every process of the run
    print(f"trained layers {result.selection.describe()} for {result.steps_done} steps; "
          f"checkpoint in {result.out / 'checkpoint'}")
    if result.final_eval:
        print(f"final eval: accuracy {result.final_eval['accuracy']:.3f} "
              f"[{result.final_eval['ci_low']:.3f}, {result.final_eval['ci_high']:.3f}]")


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoint import read_meta
    from .evaluate import resolve_task, run_eval

    config = config_from_args(EvalConfig, args)
    config.validate()
    if config.checkpoint:
        read_meta(config.checkpoint)  # a missing checkpoint fails before anything is said about its task
    config, note = resolve_task(config)
    print(note)
    result = run_eval(config)
    print(result.line())
    if config.samples > 1:
        print("pass@k: " + ", ".join(f"@{k} {v:.3f} [{result.pass_at_ci[k][0]:.3f}, {result.pass_at_ci[k][1]:.3f}]"
                                     for k, v in result.pass_at.items()))
    if result.outcomes:
        print("outcomes: " + ", ".join(f"{k} {v:.1%}" for k, v in result.outcomes.items()))
    if result.mean_reward_ci:  # agent tasks: accuracy is the success rate
        low, high = result.mean_reward_ci
        print(f"mean return {result.mean_reward:.3f} [{low:.3f}, {high:.3f}]")
    if config.out:
        print(f"results in {config.out}/eval.json and eval.examples.jsonl")


# Sums and differences of two small numbers: hard enough that SmolLM2-135M often fails, easy
# enough that its groups disagree, which is what gives GRPO a learning signal.
EASY_ARITHMETIC = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"],
                   "allow_parentheses": False, "allow_negation": False}


# The committed GPU scan the CPU demo points to (relative to the repository)
GPU_SCAN_REPORT = "docs/results/2026-12-02-trusted-scan-smollm2/scan/report/report.md"


def demo_config(out: str, gpu: bool) -> ScanConfig:
    """The demo scan. On a GPU: every layer of the embedded model with the recipe of
    docs/results/2026-11-22-scan-smollm2 (about 16 minutes on one H200 on 2026-11-30; an estimated 10-11 with
    the update defaults of docs/results/2026-12-02-speed-h200). On a CPU: one middle layer and full
    training, each at the learning rate where full training gains most in 4 steps and at 4x it (one layer
    needs a larger rate than full training), with a recipe that moves accuracy in 4 steps; measured in
    docs/results/2026-12-02-cpu-demo-smollm2."""
    if gpu:
        # micro-batches of 256 rows: with Liger, 1.48x faster updates than 128 and the same loss
        # (docs/results/2026-12-02-speed-h200)
        recipe = TrainConfig(layers="all", steps=30, prompts_per_step=64, group_size=8, lr=2e-5, micro_batch_size=256,
                             eval_n=500, save_every=10, attention="eager",
                             sampling=SamplingConfig(max_new_tokens=96, generation_batch_size=512))
        options: dict = {"eval_size": 500}
    else:
        # One-digit sums and differences, answers capped at 24 tokens: the model's greedy answer ("To calculate
        # 4 - 1, we need to ...") mostly runs past the cap, while a one-line "4 - 1 = 3" fits; sampled at
        # temperature 0.6 about a quarter of completions are right, so most groups carry a signal (at 1.0 and
        # 32 tokens of 1-2 digit problems none did). Full training collapses above lr 5e-5 in 4 steps; a single
        # layer barely moves at 5e-5 but does at 2e-4: the grid's two rates show both. One layer: each more
        # costs about 3 minutes on 2 cores, and the demo should take under 10.
        recipe = TrainConfig(layers="15", steps=4, prompts_per_step=8, group_size=8, lr=5e-5,
                             micro_batch_size=32, eval_n=100, save_every=4,
                             sampling=SamplingConfig(max_new_tokens=24, temperature=0.6))
        options = {"max_digits": 1, "eval_size": 100}
    recipe.model, recipe.task, recipe.algo, recipe.out = "smollm2", "rg:basic_arithmetic", "grpo", str(Path(out) / "scan")
    recipe.task_options = {**EASY_ARITHMETIC, **options}
    recipe.keep_optimizer = "none"  # a demo is looked at, not continued: a third of the disk
    return ScanConfig(recipe=recipe, lr_grid="" if gpu else "1,4")


def cmd_demo(args: argparse.Namespace) -> None:
    """A real scan of the embedded model: base, full and single-layer runs, profile, report."""
    import torch

    from .experiments.report import build_report
    from .experiments.scan import run_scan
    from .profile import profile_file, read_profile

    gpu = torch.cuda.is_available() and not args.cpu_scale
    config = demo_config(args.out, gpu)
    r = config.recipe
    rates = f" at {config.lr_grid.replace(',', 'x and ')}x lr {r.lr:g}" if config.lr_grid else ""
    print(f"demo: scan of {r.model} on {r.task}, layers {r.layers}, {r.steps} steps each{rates}, into {r.out} "
          "(rerun to resume)" + ("" if gpu else "; on a GPU this command scans all 30 layers"))
    run_scan(config, progress=True)
    scan_dir = Path(r.out)
    print_profile(scan_dir)
    best = profile_file(scan_dir, "best")
    if best.is_file():
        print(f"each configuration at its own best rate: {best.with_suffix('.md')}")
        print("\n".join(demo_summary(read_profile(scan_dir), read_profile(best), r.lr, r.eval_n)))
    report = build_report(scan_dir)
    print(f"report: {report.with_suffix('.html')}")
    if not gpu:
        print(f"Which layers matter is a question for a longer scan: a GPU scan of the same model (8 layers at 2 "
              f"learning rates and 2 seeds, 30 steps, 500 examples) is in {gpu_scan_report()}")


def gpu_scan_report() -> str:
    """Where the committed GPU scan's report is: in this checkout, or in the onelayer repository."""
    committed = Path(__file__).resolve().parents[2] / GPU_SCAN_REPORT
    return str(committed) if committed.is_file() else f"{GPU_SCAN_REPORT} in the onelayer repository"


def demo_summary(study, best, lr: float, eval_n: int) -> list[str]:
    """What a scan with a learning-rate grid shows, in words (``study`` and ``best``: its profiles under both
    protocols): full training's accuracy gain at its best rate and its accuracy at the others, and each layer's
    gain at full training's rate and at its own best; measured gains with 95% intervals."""
    def gain(value: float, low: float, high: float) -> str:
        verdict = "above the noise" if low > 0 else "below the noise" if high < 0 else "within the noise"
        return f"{value:+.3f} [{low:+.3f}, {high:+.3f}], {verdict}"

    f, rate = study.full_gain, study.full_lr_scale
    noise = ("one seed, so training noise is not in them" if study.seeds == 1 else
             f"{study.seeds} seeds, training noise included")
    lines = [f"What this shows: accuracy gains over the base model on {eval_n} held-out examples (95% intervals; "
             f"{noise}):",
             f"  full training at lr {lr * rate:g}: {gain(f.value, f.low, f.high)}"]
    r = study.robustness
    for x, accuracy in zip(r.lr_scales, r.full_accuracy, strict=True) if r else ():
        if x != rate:
            lines.append(f"  full training at lr {lr * x:g}: accuracy {accuracy:.3f}, against "
                         f"{r.full_accuracy[r.lr_scales.index(rate)]:.3f} at lr {lr * rate:g}")
    at_best = {g.layer: g for g in best.layer_gains}
    for g in study.layer_gains:
        line = f"  layer {g.layer} alone at lr {lr * g.lr_scale:g}: {gain(g.contribution, g.low, g.high)}"
        b = at_best.get(g.layer)
        if b is not None and b.lr_scale != g.lr_scale:
            line += f"; at its own best lr {lr * b.lr_scale:g}: {gain(b.contribution, b.low, b.high)}"
        lines.append(line)
    return lines


def print_profile(scan_dir: Path, file: Path | None = None) -> None:
    """Print the profile a scan wrote (its table, any warning, where the files are); ``file``: another of its
    profiles than ``profile.json``."""
    from .profile import read_profile

    file = file or scan_dir / "profile.json"
    if not file.is_file():
        return  # the scan said why there is none
    profile = read_profile(file)
    print(file.with_suffix(".md").read_text())
    if not profile.reliable:
        print(f"WARNING: {profile.warning}")
    print(f"profile in {file.with_suffix('.md')}, {file.name} and {file.with_suffix('.png').name}")


def cmd_scan(args: argparse.Namespace) -> int:
    from .experiments.scan import run_scan
    from .experiments.sharding import Shard

    config = config_from_args(ScanConfig, args)
    if args.dry_run:
        from .experiments.scan import plan_lines

        print("\n".join(plan_lines(config, Shard.from_env().world)))
        return 0
    run_scan(config, progress=not args.no_progress)
    if Shard.from_env().rank != 0:
        return 0  # rank 0 reports for everyone
    scan_dir = Path(config.recipe.out)
    print_profile(scan_dir)
    return failed_runs(scan_dir)


def failed_runs(out: Path) -> int:
    """Say which runs of a scan or comparison failed; the exit status: 1 when any did, else 0."""
    failed = sorted(p.parent.name for p in (out / "runs").glob("*/error.txt"))
    if failed:
        print(f"{len(failed)} run(s) failed, see {out}/runs/NAME/error.txt: {', '.join(failed)}; rerun the same "
              "command to retry them (finished runs are kept)", file=sys.stderr)
    return 1 if failed else 0


def cmd_profile(args: argparse.Namespace) -> None:
    from .experiments.scan import write_profile
    from .profile import profile_file

    write_profile(args.scan, step=args.step, auc=args.auc)
    print_profile(Path(args.scan), profile_file(args.scan, step=args.step, auc=args.auc))


def cmd_rescore(args: argparse.Namespace) -> None:
    """Score saved completions again with the current scorer; print what changed."""
    from .experiments.rescore import rescore

    for path in args.paths:
        found = rescore(path, write=not args.dry_run)
        done, skipped = [i for i in found if not i.skipped], [i for i in found if i.skipped]
        for item in skipped:
            print(f"skipped {item.file.relative_to(path)}: {item.skipped}")
        changed = [item for item in done if item.changed]
        for item in changed:
            print(f"{item.file.relative_to(path)}: {item.changed} of {item.examples} changed, accuracy "
                  f"{item.before:.3f} -> {item.after:.3f}")
        total = sum(item.changed for item in done)
        verb = "would change" if args.dry_run else "changed"
        print(f"{path}: {len(done)} evaluation file(s) scored again, {total} completion(s) {verb} in {len(changed)}"
              + ("" if args.dry_run or not total else "; training is not redone: runs learned from the old rewards")
              + (" (profile written again)" if not args.dry_run and total and (Path(path) / "scan.json").is_file()
                 else ""))


def _write_analysis(title: str, section, out_dir: Path, stem: str) -> None:
    from .analysis.document import Table
    from .experiments.report import write_sections

    md, page, _ = write_sections(title, [section], out_dir, stem)
    for block in section.blocks:
        if isinstance(block, Table):
            print(" | ".join(block.header))
            for row in block.rows:
                print(" | ".join(row))
        elif isinstance(block, str):
            print(block)
    print(f"written: {md}, {page} and {md.with_suffix('.json')}")


def cmd_analyze_rank(args: argparse.Namespace) -> None:
    from .experiments.report import rank_of_scans

    # like every analysis, inside the (first) scan's analysis/ folder unless --out says otherwise
    out = Path(args.out) if args.out else Path(args.scans[0]) / "analysis"
    check_out_dir(out)
    _write_analysis("Rank correlation of layer profiles", rank_of_scans(args.scans, out), out, "rank")


def cmd_analyze_params(args: argparse.Namespace) -> None:
    from .experiments.report import params_section

    scan = Path(args.scan)
    section = params_section(scan, scan / "analysis" / "figures")
    if section is None:
        raise OneLayerError(f"{scan} has no finished single-layer run with a recorded parameter change: run or "
                            "resume onelayer scan first")
    _write_analysis(f"Parameter change: {scan.name}", section, scan / "analysis", "params")


def cmd_analyze_ood(args: argparse.Namespace) -> None:
    from .experiments.ood import ood_results, run_ood
    from .experiments.report import ood_section
    from .experiments.sharding import Shard

    scan = Path(args.scan)
    run_ood(scan, config_from_args(OODConfig, args), progress=not args.no_progress)
    if Shard.from_env().rank != 0:
        return
    section = ood_section(scan, scan / "analysis" / "figures", ood_results(scan))
    if section is None:
        raise OneLayerError(f"no run of {scan} could be evaluated: see runs/*/ood/error.txt (a run without its "
                            "checkpoint cannot be evaluated; rerun onelayer scan for it)")
    _write_analysis(f"Out-of-domain transfer: {scan.name}", section, scan / "analysis", "ood")


def cmd_predict(args: argparse.Namespace) -> None:
    from .experiments.predict import run_predict

    config = config_from_args(PredictConfig, args)
    result = run_predict(config, progress=not args.no_progress)
    names = list(result["signals"])
    print("layer | " + " | ".join(names))
    for layer in result["layers"]:
        cells = [result["signals"][n].get(str(layer)) for n in names]
        print(f"{layer} | " + " | ".join("n/a" if v is None else f"{v:.4g}" for v in cells))
    print("seconds | " + " | ".join(f"{result['seconds'][n]:.1f}" for n in names))
    print(f"predicted.json (profile from {result['signal']}) and predicted.png in {config.out}; use it as "
          f"top:k@{config.out} or --lr-from {config.out}, and score it with onelayer analyze predictors SCAN "
          f"{config.out}")


def cmd_analyze_predictors(args: argparse.Namespace) -> None:
    from .experiments.predict import PREDICTED, config_for_scan, read_prediction, run_predict
    from .experiments.report import predictors_section
    from .profile import parse_reference, reference_path

    scan = reference_path(args.scan)  # a scan, or the profile a reference names: SCAN?protocol=best&step=N
    directory = Path(args.predictions) if args.predictions else scan / "predict"
    if not (directory / PREDICTED).is_file():
        if args.predictions:
            raise OneLayerError(f"no {PREDICTED} in {directory}: run onelayer predict --out {directory} first")
        print(f"no prediction for {scan} yet: computing one with the scan's model, task and rollout settings into "
              f"{directory}")
        run_predict(config_for_scan(scan, directory), progress=not args.no_progress)
    _, protocol, step, auc = parse_reference(args.scan)
    stem = "predictors" + (f"-{protocol}" if protocol != "study" else "") + (f"-step{step:06d}" if step is not None
                                                                             else "") + ("-auc" if auc else "")
    section = predictors_section(args.scan, scan / "analysis" / "figures", read_prediction(directory))
    _write_analysis(f"Predictors of the profile: {args.scan}", section, scan / "analysis", stem)


def cmd_analyze_adaptive(args: argparse.Namespace) -> None:
    from .experiments.scan import replay_adaptive

    result = replay_adaptive(args.scan, args.top)
    stopped = ", ".join(f"{layer} at step {step}" for layer, step in result["stopped_at"].items()) or "none"
    print(f"--adaptive-top {args.top} on {args.scan}, replayed: stopped {stopped}; "
          f"{100 * result['layer_steps_saved']:.0f}% of single-layer training steps saved; top {args.top} "
          f"{result['adaptive_top']} vs exhaustive {result['exhaustive_top']}: "
          + ("the same" if result["same_top"] else "different"))
    out = Path(args.scan) / "analysis" / f"adaptive-top{args.top}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")


def cmd_report(args: argparse.Namespace) -> None:
    from .experiments.report import build_report

    md = build_report(args.scan, args.compare, args.out or None)
    print(f"report: {md} and {md.with_suffix('.html')} (self-contained), numbers in {md.with_suffix('.json')}")


def cmd_claims(args: argparse.Namespace) -> None:
    from collections import Counter

    from .experiments.claims import default_out, study_claims, write_claims

    claims = study_claims(args.scan, args.math, args.code, args.compare or None, args.ensemble or None,
                          args.self_consistency or None, ood_scan=args.ood or None)
    md = write_claims(claims, args.out or default_out(args.scan))
    counts = Counter(c.verdict for c in claims)
    print(f"claims: {md} and {md.with_suffix('.json')}: " + ", ".join(f"{n} {v}" for v, n in counts.most_common()))


def cmd_ensemble(args: argparse.Namespace) -> None:
    from .experiments.specialists import (
        ensemble_task_line,
        run_ensemble,
        run_self_consistency,
        self_consistency_temperature,
        summary_lines,
    )

    base = config_from_args(EvalConfig, args)
    out = Path(args.out or "ensemble-out")
    check_out_dir(out)
    if not args.runs and not args.self_consistency:
        raise OneLayerError("ensemble needs run directories to vote over, and/or --self-consistency RUN --k K")
    written = []
    if args.self_consistency:
        print(ensemble_task_line(args.self_consistency, base))
        summary = run_self_consistency(args.self_consistency, args.k, base, out)
        title = f"self-consistency of {args.self_consistency} (k={args.k}, temperature {self_consistency_temperature(base):g})"
        print("\n".join(summary_lines(title, summary)))
        written.append("self_consistency.json, self_consistency.examples.jsonl, samples/")
    if args.runs:
        print(ensemble_task_line(args.runs[0], base))
        summary = run_ensemble(args.runs, base, out)
        print("\n".join(summary_lines(f"ensemble of {len(args.runs)} specialists", summary)))
        written.append("ensemble.json, ensemble.examples.jsonl, members/")
    print(f"results in {out}/: {', '.join(written)}")


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.compare import recipe_from_profile, run_comparison
    from .experiments.report import compare_section
    from .experiments.sharding import Shard
    from .profile import reference_path, reference_suffix

    for name in ("layers", "lr_from"):
        if hasattr(args, name):
            raise OneLayerError(f"compare sets --{name.replace('_', '-')} per strategy: name what to train in "
                                "--strategies (e.g. full,top:10,lr-guided,middle:10)")
    profile = args.scan or getattr(args, "profile", "")
    # the scan's own recipe unless flags say otherwise: the comparison then has the scan's budget
    defaults = CompareConfig(recipe=recipe_from_profile(profile) or TrainConfig(), profile=profile)
    config = config_with_overrides(defaults, args)
    if not hasattr(args, "out"):
        scan = reference_path(profile) if profile else None
        # each profile reference its own comparison: top:k of ?protocol=best trains other layers
        folder = "compare" + reference_suffix(profile)
        out = scan / folder if scan and scan.is_dir() else Path(folder + "-out")
        config = replace(config, recipe=replace(config.recipe, out=str(out)))
    run_comparison(config, progress=not args.no_progress)
    if Shard.from_env().rank != 0:
        return 0
    out = Path(config.recipe.out)
    _write_analysis(f"Strategy comparison: {out.name}", compare_section(out, out / "figures"), out, "results")
    return failed_runs(out)


def cmd_plot(args: argparse.Namespace) -> None:
    from .analysis import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, args.smooth)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onelayer", description="RL post-training of chosen transformer layers")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="show which layers a spec selects, with parameter counts")
    p.add_argument("model", help="hub id, local directory, .gguf file or 'smollm2'")
    p.add_argument("--select", default="all", help="layer spec (default: all)")
    p.add_argument("--format", default="table", choices=LAYERS_FORMATS, help=(
        "table (default); names: trained parameter names, one a line; regex: one expression re.search finds in "
        "exactly the trained parameter names; freeze-regex: its complement, the frozen ones (verl's "
        "freeze_module_pattern); peft: LoraConfig arguments (layers_to_transform, layers_pattern); json: all of it"))
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("train", help="RL-train a layer selection (under torchrun: one run over its GPUs, sharded)")
    add_config_flags(p, TrainConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="print the memory estimate per GPU (onelayer plan) and stop")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="estimated memory per GPU of a training run, and whether it fits (loads nothing)")
    add_config_flags(p, TrainConfig)
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run is sharded over (default: 1)")
    p.add_argument("--gpu-memory-gb", type=float, default=0, help="memory per GPU (default: this machine's GPU, else 80)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="prompt length (default: from the task's prompts)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="evaluate a model or checkpoint on a task's eval split")
    add_config_flags(p, EvalConfig)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("scan", help="measure every layer's contribution (resumable; --layers picks the layers, "
                                     "--out the scan directory)")
    add_config_flags(p, ScanConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="print which run goes where (and, on a GPU, memory) and stop")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("profile", help="(re)compute a scan's contribution profile from its finished runs")
    p.add_argument("scan", help="scan directory")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--step", type=int, default=None, help="every run's evaluation after N steps (scans with "
                                                               "--eval-every): writes profile-stepNNNNNN.*")
    when.add_argument("--auc", action="store_true", help="area under each run's learning curve: writes profile-auc.*")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("rescore", help="score the saved completions of runs, scans or evals again with the current "
                                       "scorer (after a scorer fix), rewriting their evaluations and profile")
    p.add_argument("paths", nargs="+", help="run, scan, comparison or eval directories")
    p.add_argument("--dry-run", action="store_true", help="only report what would change")
    p.set_defaults(func=cmd_rescore)

    p = sub.add_parser("analyze", help="analyses of scans: rank, params, ood, predictors, adaptive")
    analyses = p.add_subparsers(dest="analysis", required=True)
    q = analyses.add_parser("rank", help="Spearman and Kendall rank correlation of two or more scans' profiles")
    q.add_argument("scans", nargs="+", help="scan directories")
    q.add_argument("--out", default="", help="directory for rank.md/.html/.json and the heatmap (default: the first "
                                             "scan's analysis/, where every analysis of a scan goes)")
    q.set_defaults(func=cmd_analyze_rank)
    q = analyses.add_parser("params", help="relative weight change per layer against contribution")
    q.add_argument("scan", help="scan directory")
    q.set_defaults(func=cmd_analyze_params)
    q = analyses.add_parser("ood", help="evaluate every run of a scan on other tasks; transfer of contributions")
    q.add_argument("scan", help="scan directory")
    add_config_flags(q, OODConfig)
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_analyze_ood)

    q = analyses.add_parser("predictors", help="score cheap per-layer signals (onelayer predict) against a scan's "
                                                "measured profile")
    q.add_argument("scan", help="scan directory, or a profile reference: SCAN?protocol=best, SCAN?step=20, SCAN?auc")
    q.add_argument("predictions", nargs="?", default="", help="onelayer predict directory (default: SCAN/predict, "
                                                               "computed with the scan's recipe when missing)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_analyze_predictors)

    q = analyses.add_parser("adaptive", help="replay --adaptive-top K on an exhaustive scan that evaluated during "
                                              "training: what it would have stopped, saved, and found")
    q.add_argument("scan", help="scan directory (run with --eval-every N)")
    q.add_argument("--top", type=int, default=3, help="K of --adaptive-top K (default: 3)")
    q.set_defaults(func=cmd_analyze_adaptive)

    p = sub.add_parser("predict", help="per-layer signals of the base model that predict a scan's profile, in "
                                       "seconds to minutes (predicted.json: usable as top:k@DIR, --lr-from DIR)")
    add_config_flags(p, PredictConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="HTML + markdown report of a scan with every figure and table")
    p.add_argument("scan", help="scan directory")
    p.add_argument("--compare", nargs="*", default=[], help="other scans to rank-correlate with")
    p.add_argument("--out", default="", help="directory (default: SCAN/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("claims", help="the study's claims, one by one, checked against a scan and the runs beside it")
    p.add_argument("scan", help="the main scan (a directory, or a profile reference such as SCAN?protocol=best)")
    p.add_argument("--math", nargs="*", default=[], help="scans of other math tasks (rank correlation)")
    p.add_argument("--code", nargs="*", default=[], help="scans of code tasks (rank correlation)")
    p.add_argument("--compare", default="", help="an onelayer compare directory (strategies against full training)")
    p.add_argument("--ood", default="", help="a scan evaluated out of domain (onelayer analyze ood), where it is not "
                   "the main scan: its in-domain profile against its out-of-domain ones")
    p.add_argument("--ensemble", default="", help="an onelayer ensemble directory holding the specialists' vote and "
                   "self-consistency")
    p.add_argument("--self-consistency", default="", help="the self-consistency directory, where it is not "
                   "--ensemble's")
    p.add_argument("--out", default="", help="directory (default: SCAN/claims, SCAN/claims-protocol-best for "
                   "SCAN?protocol=best, ...)")
    p.set_defaults(func=cmd_claims)

    p = sub.add_parser("ensemble", help="majority vote of layer specialists, and/or self-consistency of one model")
    p.add_argument("runs", nargs="*", help="member run directories, best first (ties go to the earliest)")
    p.add_argument("--self-consistency", default="", metavar="RUN_OR_MODEL", help="vote over k samples of one model")
    p.add_argument("--k", type=int, default=7, help="samples for self-consistency (default: 7)")
    add_config_flags(p, EvalConfig, EvalConfig(n=500))
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("compare", help="train strategies (full, top:k, lr-guided, middle:k, random:k, lora) with one "
                                       "budget and seeds; table and figure (resumable)")
    p.add_argument("scan", nargs="?", default="", help="scan directory (or a profile reference such as "
                                                        "SCAN?protocol=best): its profile and, unless flags override "
                                                        "it, its recipe; without one, strategies that need no profile")
    add_config_flags(p, CompareConfig, only_given=True, nested_from="the scan's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="plot reward and eval curves of runs")
    p.add_argument("runs", nargs="+", help="run directories (--out of train)")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window over steps")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="a real scan of the embedded model (CPU: 1 layer in minutes; GPU: all layers)")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--cpu-scale", action="store_true", help="the small CPU scan even when a GPU is present")
    p.set_defaults(func=cmd_demo)
    _add_verbose(parser, sub)
    return parser


VERBOSE_HELP = ("show other libraries' progress bars, notices and warnings (hidden by default: model-loading and "
                "GGUF de-quantization bars, transformers' generation, attention and tokenizer notices, "
                "dependencies' warnings)")


def _add_verbose(parser: argparse.ArgumentParser, sub) -> None:
    """``--verbose`` before or after the command (``onelayer --verbose train ...`` or ``onelayer train ...
    --verbose``): on the top parser and on every command's."""
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    pending = [sub]
    while pending:
        for command in pending.pop().choices.values():
            command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
            pending += [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]


def main(argv: list[str] | None = None) -> int:
    from .progress import quiet_libraries

    args = build_parser().parse_args(argv)
    with quiet_libraries(args.verbose) as hidden:
        try:
            code = args.func(args) or 0
        except OneLayerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: finished steps are checkpointed every --save-every steps; rerun to resume",
                  file=sys.stderr)
            return 130
    if hidden.warnings:
        print(f"({hidden.warnings} warning(s) from other libraries hidden; --verbose shows them)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

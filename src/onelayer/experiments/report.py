"""Analyses of a finished (or partial) scan, and the report that gathers them.

Each analysis is a function from a scan directory to a :class:`Section` (paragraphs, tables, figures
and its numbers as ``data``). ``onelayer analyze ...`` writes one section on its own;
``onelayer report`` writes all that apply into one markdown file and one self-contained HTML page.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..analysis.curves import plot_learning_curves, plot_scan_rewards
from ..analysis.document import Callout, Figure, Section, Table, to_html, to_markdown
from ..analysis.figures import (
    plot_change_vs_contribution,
    plot_profile,
    plot_rank_heatmap,
    plot_rate_robustness,
)
from ..analysis.rank import compare_profiles, correlation_matrix, measured
from ..errors import OneLayerError
from ..jsonl import read_jsonl
from ..profile import Profile, read_profile, reference_path
from .rundir import read_result, run_dir, run_status
from .scan import (
    evaluated_steps,
    finished_results,
    load_plan,
    lr_scales,
    param_change,
    scan_profile,
    scan_scores,
)


def _f(x, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2g}"


def seed_profiles(scan_dir: Path) -> dict[str, Profile]:
    """One profile per seed when the scan has several (seeds whose runs are unfinished are left out), each at
    the learning rate the pooled profile reads (as its seed rank correlation is)."""
    _, plan = load_plan(scan_dir)
    seeds = sorted({r.seed for r in plan if r.kind == "full"})
    found = {}
    rate = [scan_profile(scan_dir)[0].full_lr_scale] if len(seeds) > 1 else None
    for s in seeds if len(seeds) > 1 else []:
        try:
            found[f"seed {s}"] = scan_profile(scan_dir, seeds=[s], lr_scales=rate)[0]
        except OneLayerError:
            pass  # that seed has not finished the runs a profile needs
    return found


def _accuracy(results: dict[str, dict], kind: str, lr_scale: float) -> list[float]:
    return [v["accuracy"] for v in results.values() if v["kind"] == kind and v.get("lr_scale", 1.0) == lr_scale]


def separation_rows(profile: Profile, up_to: int = 5) -> list[list[str]]:
    """For k = 1 .. up_to: the top k measured layers and which of them are distinguishable from the (k+1)-th
    (what ``top:k@SCAN`` notes)."""
    from ..layers import top_separation

    ranked = sorted(measured(profile).items(), key=lambda x: (-x[1], x[0]))
    return [[str(k), ", ".join(str(layer) for layer, _ in ranked[:k]), top_separation(profile, k)]
            for k in range(1, min(up_to, len(ranked) - 1) + 1)]


def profile_section(scan_dir: Path, figures: Path, per_seed: dict[str, Profile]) -> Section:
    """``per_seed``: :func:`seed_profiles` of the scan."""
    config, plan = load_plan(scan_dir)
    profile, status = scan_profile(scan_dir)
    results = finished_results(scan_dir, plan)
    figure = plot_profile(profile, figures / "profile.png", f"layer contribution: {scan_dir.name}", per_seed)
    base = next(v["accuracy"] for v in results.values() if v["kind"] == "base")
    fulls = _accuracy(results, "full", profile.full_lr_scale)
    done = measured(profile)
    ranked = sorted(done, key=lambda k: -done[k])
    g = profile.full_gain
    blocks: list = [] if profile.reliable else [Callout(profile.warning)]
    if profile.seeds < 2:
        blocks.append(Callout("one seed per configuration: these intervals omit training noise (seed-to-seed "
                              "variation), which can be as large as the gaps between neighbouring layers; rerun the "
                              "scan with --seeds 2 or more before acting on the ranking"))
    summary = (f"Base accuracy {base:.3f}; full-parameter training {sum(fulls) / len(fulls):.3f} (mean of "
               f"{len(fulls)} seed(s) at {profile.full_lr_scale:g}x --lr): a gain of {g.value:+.3f} [{g.low:+.3f}, "
               f"{g.high:+.3f}]. {len(done)} of {len(profile.points)} layers measured with a finite contribution. "
               f"This profile reads the {profile.describe()}.")
    if ranked:
        summary += (f" Highest contribution: layer {ranked[0]} (relative depth "
                    f"{(ranked[0] + 0.5) / len(profile.points):.2f}) with C = {done[ranked[0]]:.3f}; lowest: layer "
                    f"{ranked[-1]} with C = {done[ranked[-1]]:.3f}. Top layers: "
                    + ", ".join(f"{k} ({done[k]:.2f})" for k in ranked[:5]) + ".")
    blocks.append(summary)
    blocks.append(f"Intervals: {profile.method}." if profile.method else "Intervals: paired bootstrap over eval "
                  "examples (a profile written by an older onelayer; rerun onelayer profile SCAN for more).")
    if profile.seed_rank_correlation is not None:
        blocks.append(f"Seed-to-seed rank correlation of the profile: Spearman {_f(profile.seed_rank_correlation, 2, True)} "
                      f"between the profiles of single seeds ({profile.seeds} seeds; mean over pairs). A ranking "
                      "claim can be no firmer than this: it is how well one seed's profile predicts another's (the "
                      "mean of the seeds agrees better).")
    blocks += [f"Note: {note}." for note in profile.notes if not note.startswith("one seed per configuration")]
    blocks.append(Figure(figure, profile_caption(profile)))
    n = len(profile.points)
    grid = profile.robustness is not None
    blocks.append(Table(["layer", "relative depth", "C(l)", "95% interval", "measured"] + (["lr"] if grid else []),
                        [[str(p.layer), f"{(p.layer + 0.5) / n:.2f}", _f(p.contribution),
                          f"[{_f(p.low)}, {_f(p.high)}]", "interpolated" if p.interpolated else "yes"]
                         + ([f"{p.lr_scale:g}x"] if grid else []) for p in profile.points]))
    separation = separation_rows(profile)
    if separation:
        blocks.append("Which top-k selections the data supports: for each k, the k highest measured layers (what "
                      "top:k@SCAN trains) and whether each is distinguishable from the next measured layer (the 95% "
                      "interval of the difference of their contributions, from the same resamples, excludes 0).")
        blocks.append(Table(["k", "top k layers", "against the (k+1)-th"], separation))
    recipe = config["recipe"]
    data = {"profile": asdict(profile), "runs": status, "base_accuracy": base, "full_accuracy": fulls,
            "per_seed": {k: asdict(v) for k, v in per_seed.items()}, "recipe": recipe, "seeds": config["seeds"],
            "top_k": separation}
    return Section("Contribution profile", blocks, data)


def setup_section(scan_dir: Path) -> Section:
    config, plan = load_plan(scan_dir)
    r = config["recipe"]
    status = [run_status(scan_dir, p) for p in plan]
    options = ", ".join(f"{k}={json.dumps(v)}" for k, v in r.get("task_options", {}).items()) or "defaults"
    scales = lr_scales(plan)
    rate = (f"learning rate {r['lr']:g} ({r['lr_schedule']}) for every run" if scales == (1.0,) else
            f"learning rates {', '.join(f'{x:g}x' for x in scales)} of {r['lr']:g} ({r['lr_schedule']}) for every "
            "configuration")
    when = (f"every {r['eval_every']} steps" + (" and before training" if r.get("eval_at_start") else "")
            + " and at the end") if r.get("eval_every") else "at the end"
    blocks = [f"Model {r['model']}; task {r['task']} ({options}); algorithm {r['algo']}; {r['steps']} steps of "
              f"{r['prompts_per_step']} prompts x {r['group_size']} samples; {rate}; {config['seeds']} seed(s) from "
              f"{r['seed']}; layers scanned: {r['layers']}; eval on {r['eval_n']} examples, greedy, {when}.",
              f"Runs: {status.count('done')} done, {status.count('failed')} failed, {status.count('pending')} "
              "pending." + ("" if "failed" not in status else " Failed runs are listed at the end; rerun the "
                            "scan command to retry them.")]
    return Section("Setup", blocks, {"config": config})


def curves_section(scan_dir: Path, figures: Path) -> Section | None:
    config, plan = load_plan(scan_dir)
    runs = [{**r.__dict__, "steps": read_jsonl(run_dir(scan_dir, r) / "log.jsonl")} for r in plan if r.kind != "base"]
    runs = [r for r in runs if r["steps"]]
    if not runs:
        return None
    from ..models import model_num_layers

    n_layers = model_num_layers(config["recipe"]["model"])
    figure = plot_scan_rewards(runs, n_layers, figures / "rewards.png")
    return Section("Training curves", [Figure(figure, "Train reward per step (moving mean of 5) of every run; "
                                                      "runs at other learning rates than --lr dashed.")])


def learning_curves_section(scan_dir: Path, figures: Path) -> Section | None:
    """Held-out accuracy and contribution at every evaluated step (``--eval-every``), the profile as an area
    under the curve, and how the ranking moves with training length."""
    steps = evaluated_steps(scan_dir)
    if len(steps) < 3:
        return None
    final, _ = scan_profile(scan_dir)
    at = {s: scan_profile(scan_dir, step=s)[0] for s in steps if s > 0}
    area, _ = scan_profile(scan_dir, auc=True)
    rate = final.full_lr_scale
    accuracy: dict[str, list[float]] = {}
    for s in steps:  # mean over seeds at the rate the profile reads
        base, full, layers, _, _ = scan_scores(scan_dir, step=s, lr_scales=[rate])
        accuracy.setdefault("base", []).append(float(np.mean(base[0])))
        accuracy.setdefault("full", []).append(_mean_runs(full[rate]))
        for layer, by_rate in layers.items():
            accuracy.setdefault(f"layer {layer}", []).append(_mean_runs(by_rate[rate]))
    shown = sorted(measured(final))
    contributions = {layer: [{p.layer: p.contribution for p in at[s].points}[layer] for s in at] for layer in shown}
    figure = plot_learning_curves(list(at), contributions, steps, accuracy, len(final.points),
                                  figures / "learning_curves.png")
    rows = []
    for layer in shown:
        points = [next(p for p in at[s].points if p.layer == layer) for s in at]
        a = next(p for p in area.points if p.layer == layer)
        rows.append([str(layer)] + [_f(p.contribution) for p in points] + [f"{_f(a.contribution)} [{_f(a.low)}, {_f(a.high)}]"])
    agreement = [compare_profiles(at[s], final) for s in at]
    rows.append(["Spearman vs final"] + [_f(c.spearman, 2, True) for c in agreement]
                + [_f(compare_profiles(area, final).spearman, 2, True)])
    gains = [at[s].full_gain for s in at]
    rows.append(["full gain"] + [f"{_f(g.value, sign=True)}" for g in gains] + [_f(area.full_gain.value, sign=True)])
    blocks = [f"Every run was evaluated on the same {len(base[0])} examples after steps {', '.join(map(str, steps))} "
              "(step 0: the base model; a run without its own evaluation there is read from the base run's). C at a "
              "step uses every run's evaluation after that many steps; the area under the curve (AUC) is each "
              "example's mean score over training (trapezoids over the evaluated steps), so C(AUC) is the share of "
              "full training's area above the base model that a layer recovers: it rewards layers that learn early. "
              f"All at the {final.describe().split(';')[0]}.",
              Figure(figure, "Left: contribution of every measured layer after each evaluated step (colour: relative "
                             "depth). Right: held-out accuracy over training, mean over seeds."),
              Table(["layer"] + [f"C at step {s}" for s in at] + ["C (AUC) [95%]"], rows)]
    if any(not p.reliable for p in at.values()):
        early = [s for s, p in at.items() if not p.reliable]
        blocks.insert(1, Callout(f"full training's gain is within noise at step(s) {', '.join(map(str, early))}: "
                                 "contributions there are not meaningful"))
    data = {"steps": steps, "accuracy": accuracy, "contributions": {str(k): v for k, v in contributions.items()},
            "auc_profile": asdict(area), "spearman_vs_final": [c.spearman for c in agreement]}
    return Section("Learning curves", blocks, data)


def _mean_runs(by_seed: dict) -> float:
    return float(np.mean([np.mean(v) for v in by_seed.values()]))


def params_section(scan_dir: Path, figures: Path) -> Section | None:
    """Relative weight change per layer (the run's own layer; every layer of the full run) against
    contribution."""
    found = param_change(scan_dir)
    if found is None:
        return None
    own_mean, full_mean, profile, vs_own, vs_full = found
    contrib = measured(profile)
    layers = sorted(set(own_mean) & set(contrib))
    figure = plot_change_vs_contribution(profile, own_mean, full_mean, figures / "param_change.png", vs_own)
    blocks = [
        "Relative change ||W_after - W_before||_F / ||W_before||_F of each layer's tensors pooled. Does a layer "
        "contribute because it moves further (distance) or because the same movement matters more there "
        f"(leverage)? Contribution vs the layer's change in its own single-layer run: Spearman "
        f"{_f(vs_own.spearman, 2, True)} (p={_p(vs_own.spearman_p)}, n={vs_own.n}); vs its change inside full "
        f"training: Spearman {_f(vs_full.spearman, 2, True)} (p={_p(vs_full.spearman_p)}, n={vs_full.n}).",
        Figure(figure, "Left: how far each layer moved. Right: single-layer change against contribution."),
        Table(["layer", "C(l)", "change, own run", "change, in full run"],
              [[str(k), _f(contrib[k]), f"{own_mean[k]:.2e}",
                f"{full_mean[k]:.2e}" if k in full_mean else "n/a"] for k in layers]),
    ]
    data = {"own": own_mean, "full": full_mean, "vs_own": asdict(vs_own), "vs_full": asdict(vs_full)}
    return Section("Parameter change: distance or leverage?", blocks, data)


def ood_section(scan_dir: Path, figures: Path, results: list) -> Section | None:
    """``results``: :func:`onelayer.ood.ood_results` of the scan."""
    if not results:
        return None
    in_domain, _ = scan_profile(scan_dir)
    rows, data = [], {}
    for r in results:
        c = r.correlation
        rows.append([r.task, json.dumps(r.options) if r.options else "", _f(r.base_accuracy), _f(r.full_accuracy),
                     _f(r.full_accuracy - r.base_accuracy, sign=True),
                     "n/a" if c is None else f"{_f(c.spearman, 2, True)} (p={_p(c.spearman_p)})",
                     "n/a" if c is None else f"{_f(c.kendall, 2, True)} (p={_p(c.kendall_p)})", r.note])
        data[r.slug] = {"task": r.task, "options": r.options, "base_accuracy": r.base_accuracy,
                        "full_accuracy": r.full_accuracy, "profile": asdict(r.profile) if r.profile else None,
                        "correlation": asdict(c) if c else None, "note": r.note}
    others = {f"{r.task} (out of domain)": r.profile for r in results if r.profile is not None}
    blocks = ["Every run's checkpoint evaluated on other tasks; contribution there uses the same formula with the "
              "base and full runs' accuracy on that task, every run read at the learning rate the in-domain profile "
              f"chose ({in_domain.full_lr_scale:g}x --lr). Correlations are with the in-domain profile over the "
              "measured layers. A note says when a task's full-training gain is within noise.",
              Table(["task", "options", "base", "full", "full gain", "Spearman vs in-domain",
                     "Kendall vs in-domain", "note"], rows)]
    if others:
        figure = plot_profile(in_domain, figures / "ood_profiles.png", "in-domain and out-of-domain contribution",
                              others)
        blocks.append(Figure(figure, "In-domain profile (band) with each out-of-domain profile (lines)."))
    return Section("Out-of-domain transfer", blocks, data)


def robustness_section(scan_dir: Path, figures: Path) -> Section | None:
    """Learning-rate robustness (``--lr-grid``): the profile under the study's protocol and under
    per-configuration best rates, their rank agreement, and the layers whose rank depends on the rate."""
    profile, _ = scan_profile(scan_dir)
    r = profile.robustness
    if r is None:
        return None
    figure = plot_rate_robustness(r, len(profile.points), figures / "lr_robustness.png")
    rows = [[str(c.layer), ", ".join(f"{x:g}x" for x in c.lr_scales),
             f"{_f(c.study.value)} [{_f(c.study.low)}, {_f(c.study.high)}]", str(c.rank_study),
             f"{c.best_lr_scale:g}x", f"{_f(c.best.value)} [{_f(c.best.low)}, {_f(c.best.high)}]", str(c.rank_best),
             f"{_f(c.gain.value, sign=True)} [{_f(c.gain.low, sign=True)}, {_f(c.gain.high, sign=True)}]",
             "yes" if c.rank_study != c.rank_best else ""] for c in r.layers]
    moved = r.rate_dependent
    beyond = [c.layer for c in r.layers if c.gain.low > 0]
    every = {x for c in r.layers for x in c.lr_scales} | set(r.lr_scales)
    uniform = all(set(c.lr_scales) == every for c in r.layers) and set(r.lr_scales) == every
    tried = (f"Every configuration was trained at {', '.join(f'{x:g}x' for x in sorted(every))} --lr. " if uniform
             else f"Rates tried: {', '.join(f'{x:g}x' for x in sorted(every))} --lr, not every configuration at every "
                  f"rate (full training at {', '.join(f'{x:g}x' for x in r.lr_scales)}; each layer's in the table). ")
    text = (tried + "Full training reached " + ", ".join(f"{a:.3f} at {x:g}x" for x, a in zip(r.lr_scales, r.full_accuracy, strict=True))
            + f" (mean over seeds): its best rate, {r.full_lr_scale:g}x, is the study's protocol for every run "
            "(profile.json; what top:k@SCAN and --lr-from read by default). Under per-configuration best rates "
            "(profile-best.json; SCAN?protocol=best) each layer is read at its own best rate and full training at "
            f"its best. Rank agreement of the two profiles over {len(r.layers)} layers: Spearman "
            f"{_f(r.spearman, 2, True)}, Kendall {_f(r.kendall, 2, True)}. ")
    text += (f"Layers whose rank depends on the rate: {', '.join(map(str, moved))}. " if moved else
             "No layer's rank depends on the rate. ")
    text += (f"Layers whose own best rate beats the study's beyond noise: {', '.join(map(str, beyond))}. " if beyond
             else "No layer's own best rate beats the study's beyond noise. ")
    text += ("Rates are picked again inside each bootstrap resample, so the intervals include which rate is best; a "
             "best-of-rates score is still biased upward by the picking.")
    table = Table(["layer", "rates tried", "C, study protocol [95%]", "rank", "own best rate", "C, own best rate [95%]", "rank",
                   "gain from own rate [95%]", "rank depends on rate"], rows)
    return Section("Learning-rate robustness", [text, table, Figure(figure, "Contribution per measured layer under "
                   "both protocols (95% intervals); right: full training's accuracy at each rate.")],
                   {"robustness": asdict(r)})


def _bytes(n) -> str:
    if not n:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def compare_section(compare_dir: Path, figures: Path) -> Section:
    """``onelayer compare``: every strategy's accuracy over seeds, its gain over full training, and
    what it cost."""
    from ..analysis.figures import plot_strategies
    from ..layers import compact_layers
    from .compare import comparison_results

    comparison = comparison_results(compare_dir)
    base, results = comparison.base_accuracy, comparison.strategies
    if not results:
        raise OneLayerError(f"{compare_dir}: no strategy has a finished run yet; rerun onelayer compare to continue")
    rows = []
    for r in results:
        layer_sets = {tuple(x) for x in r.layers}
        layers = " / ".join(compact_layers(x) or "-" for x in sorted(layer_sets))
        spread = f"{r.mean:.3f} ± {r.std:.3f}" if len(r.seeds) > 1 else f"{r.mean:.3f}"
        rows.append([r.label, layers, f"{r.trainable_parameters:,}", _bytes(r.optimizer_state_bytes), spread,
                     ", ".join(f"{a:.3f}" for a in r.accuracies),
                     f"{_f(r.gain_over_full, sign=True)} [{_f(r.gain_low, sign=True)}, {_f(r.gain_high, sign=True)}]",
                     f"{_f(r.share_of_full_gain, 2)} [{_f(r.share_low, 2)}, {_f(r.share_high, 2)}]",
                     f"{r.train_seconds:.1f}", _bytes(r.peak_memory_bytes)])
    header = ["strategy", "layers (per seed)", "trainable params", "optimizer state", "accuracy (mean ± sd)",
              "per seed", "gain over full [95% CI]", "share of full gain [95% CI]", "train s/run", "peak memory"]
    figure = plot_strategies([r.label for r in results], [r.accuracies for r in results],
                             [r.trainable_parameters for r in results], base, figures / "compare.png",
                             f"strategies: {compare_dir.name}")
    blocks = [f"Base model accuracy {base:.3f}. Every strategy ran the same recipe (steps, rollouts, data order "
              "and learning rate, LoRA's scaled as stated in compare.json) for each seed. Gains over full training "
              "and shares of its gain ((S - S_base) / (S_full - S_base)) use seed-averaged per-example scores with "
              "a paired bootstrap over the eval examples; sd is across seeds. Peak memory is per process (CUDA).",
              Table(header, rows), Figure(figure, "Accuracy per seed and mean; accuracy against trained parameters.")]
    gain = comparison.full_gain
    if gain is not None and not gain.low > 0:
        blocks.insert(1, Callout(f"full training's gain over the base model ({_f(gain.value, sign=True)} "
                                 f"[{_f(gain.low, sign=True)}, {_f(gain.high, sign=True)}]) is within noise: shares "
                                 "of its gain are not meaningful; compare accuracies instead"))
    return Section("Strategies at the same budget", blocks,
                   {"base_accuracy": base, "full_gain": asdict(gain) if gain else None,
                    "strategies": [asdict(r) for r in results]})


def rank_section(profiles: dict[str, Profile], figures: Path, stem: str = "rank") -> Section | None:
    if len(profiles) < 2:
        return None
    pairs = correlation_matrix(profiles)
    figure = plot_rank_heatmap(list(profiles), pairs, figures / f"{stem}.png")
    rows = [[a, b, c.method, str(c.n), f"{_f(c.spearman, 2, True)}", _p(c.spearman_p), f"{_f(c.kendall, 2, True)}",
             _p(c.kendall_p)] for (a, b), c in pairs.items()]
    blocks = ["Rank agreement of layer contributions (measured layers only; profiles of different depth are "
              "compared at relative depth).",
              Table(["profile A", "profile B", "paired on", "n", "Spearman", "p", "Kendall", "p"], rows),
              Figure(figure, "Spearman (upper triangle) and Kendall (lower triangle) between profiles.")]
    return Section("Rank correlations", blocks, {f"{a} | {b}": asdict(c) for (a, b), c in pairs.items()})


def runs_section(scan_dir: Path) -> Section:
    _, plan = load_plan(scan_dir)
    rows = []
    for r in plan:
        status = run_status(scan_dir, r)
        result = read_result(scan_dir, r) if status == "done" else {}
        log = read_jsonl(run_dir(scan_dir, r) / "log.jsonl")
        tail = log[-5:]
        change = result.get("param_change") or {}
        own = change.get(str(r.layer)) if r.layer is not None else (
            math.sqrt(sum(v * v for v in change.values()) / len(change)) if change else None)
        error = ""
        if status == "failed":
            error = (run_dir(scan_dir, r) / "error.txt").read_text().splitlines()[0][:120]
        rows.append([r.name, r.kind, "" if r.layer is None else str(r.layer), str(r.seed), f"{r.lr_scale:g}", status,
                     _f(result.get("accuracy")),
                     f"[{_f(result.get('ci_low'))}, {_f(result.get('ci_high'))}]" if result else "",
                     _f(sum(x["reward"] for x in tail) / len(tail)) if tail else "",
                     f"{own:.2e}" if own is not None else "",
                     f"{sum(x.get('seconds_step', 0) for x in log):.0f}" if log else "", error])
    header = ["run", "kind", "layer", "seed", "lr scale", "status", "accuracy", "95% CI",
              "final reward (last 5)", "relative change", "train seconds", "error"]
    return Section("Every run", [Table(header, rows)], {"runs": [dict(zip(header, row, strict=True))
                                                                  for row in rows]})


def write_sections(title: str, sections: list[Section], out_dir: Path, stem: str) -> tuple[Path, Path, Path]:
    """``STEM.md`` (figures linked), ``STEM.html`` (figures embedded) and ``STEM.json`` (numbers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page, data = out_dir / f"{stem}.md", out_dir / f"{stem}.html", out_dir / f"{stem}.json"
    md.write_text(to_markdown(title, sections, out_dir))
    page.write_text(to_html(title, sections))
    data.write_text(json.dumps({s.title: s.data for s in sections}, indent=2, default=str))
    return md, page, data


def profile_caption(profile) -> str:
    """What the profile figure shows: an unreliable profile's draws accuracy gains, not C(l) (plot_profile)."""
    if not profile.reliable and profile.layer_gains:
        return ("Accuracy gain over the base model of each measured single layer and of full training, with 95% "
                "intervals: full training's gain is within the noise, so contributions are not drawn.")
    return ("Contribution C(l) per layer with its 95% interval; hollow points are interpolated, not measured; thin "
            "lines are per-seed profiles.")


def build_report(scan_dir: str | Path, compare: list[str] | None = None, out: str | Path | None = None) -> Path:
    """Every analysis that applies to the scan, in ``out`` (default ``SCAN/report``). ``compare`` adds
    other scans to the rank correlations."""
    scan_dir = Path(scan_dir)
    out_dir = Path(out) if out else scan_dir / "report"
    figures = out_dir / "figures"
    from .ood import ood_results

    per_seed, transfer = seed_profiles(scan_dir), ood_results(scan_dir)
    sections = [setup_section(scan_dir), profile_section(scan_dir, figures, per_seed),
                robustness_section(scan_dir, figures), learning_curves_section(scan_dir, figures),
                curves_section(scan_dir, figures), params_section(scan_dir, figures),
                ood_section(scan_dir, figures, transfer)]
    from .claims import claims_section, study_claims

    sections.append(claims_section(study_claims(str(scan_dir), ood=transfer)))
    profiles = {scan_dir.name: scan_profile(scan_dir)[0]}
    profiles.update({f"{scan_dir.name} {k}": v for k, v in per_seed.items()})
    profiles.update({f"{r.task} (ood)": r.profile for r in transfer if r.profile is not None})
    for other in compare or []:
        profiles[Path(other).name] = scan_profile(other)[0]
    predicted = scan_dir / "predict" / "predicted.json"
    if predicted.is_file():
        sections.append(predictors_section(scan_dir, figures, json.loads(predicted.read_text())))
    sections += [rank_section(profiles, figures), runs_section(scan_dir)]
    stamp = datetime.date.today().isoformat()
    title = f"onelayer scan report: {scan_dir.name} ({stamp})"
    md, _, _ = write_sections(title, [s for s in sections if s is not None], out_dir, "report")
    return md


def predictors_section(reference: str | Path, figures: Path, prediction: dict) -> Section:
    """How well each cheap signal of :mod:`onelayer.experiments.predict` predicted the measured profile that
    ``reference`` names (a scan, or ``SCAN?protocol=best&step=N``)."""
    from ..analysis.figures import plot_predictor_scores
    from .predict import score_prediction

    scan_dir = reference_path(reference)
    rho = read_profile(reference).seed_rank_correlation  # the ceiling: one seed's agreement with another's
    ceiling = float("nan") if rho is None else rho
    scores = score_prediction(reference, prediction, ceiling)
    rows = [[s.signal, f"{_f(s.spearman, 2, True)} (p={_p(s.p_value)})", _f(s.partial_spearman, 2, True),
             f"{_f(s.over_position[0], 2, True)} [{_f(s.over_position[1], 2, True)}, {_f(s.over_position[2], 2, True)}]",
             str(s.top1), f"{s.top3} ({_f(s.top3_chance, 1)})", f"{s.top20} of {s.top20_k} ({_f(s.top20_chance, 1)})",
             _f(s.regret, 2), _f(s.share_of_ceiling, 2), _f(s.seconds, 1)] for s in scores]
    figure = plot_predictor_scores(scores, figures / "predictors.png", ceiling, f"predictors of {scan_dir.name}")
    ceiling_text = (f"The scan's own seed-to-seed rank correlation is {_f(ceiling, 2, True)}: no predictor can be "
                    "expected to agree with one seed's profile better than another seed does."
                    if math.isfinite(ceiling) else "The scan has one seed, so the ceiling (its seed-to-seed rank "
                    "correlation) is unknown, and the measured profile itself carries training noise.")
    text = (f"Signals of the base model ({prediction['config']['model']}, {prediction['config']['task']}), each "
            "oriented a priori so that higher predicts a larger contribution, against the scan's measured layers. "
            "Partial rho controls for |depth - 0.5|; 'over position' is rho minus the position baseline's, with a "
            "95% interval from resampling layers; top-k counts are against what chance gives (in brackets); "
            "regret is C(predicted best) / C(best); seconds are what computing the signal cost. " + ceiling_text)
    return Section("Predicting the profile without the scan", [text, Table(
        ["signal", "Spearman rho", "partial rho", "over position", "top-1", "top-3 (chance)", "top-20% (chance)",
         "regret", "of ceiling", "seconds"], rows), Figure(figure, "Spearman rho of each signal (position baseline "
                                                                   "in grey); dashed: the seed-to-seed ceiling.")],
        {"ceiling": ceiling, "scores": [asdict(s) for s in scores]})


def rank_of_scans(scans: list[str], out: str | Path) -> Section:
    """``onelayer analyze rank``: the in-domain profiles of several scans against each other."""
    profiles: dict[str, Profile] = {}
    for scan in scans:
        name = Path(scan).name if Path(scan).name not in profiles else str(scan)
        profiles[name] = scan_profile(scan)[0]
    section = rank_section(profiles, Path(out) / "figures")
    if section is None:
        raise OneLayerError("analyze rank needs at least two scan directories")
    return section


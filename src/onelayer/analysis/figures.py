"""Figures of a scan (contribution profile, parameter change, rank correlations) and the profile table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..profile import Profile, RateRobustness
from .rank import RankCorrelation


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    pyplot().close(fig)
    return out


def plot_profile(profile: Profile, out: str | Path, title: str = "",
                 others: Mapping[str, Profile] | None = None) -> Path:
    """Contribution per layer (x: index, top axis: relative depth) with its interval as a band, the
    full-training level at 1.0, and interpolated layers drawn hollow (beyond the first and last measured layers,
    where the profile only repeats its end values, without band or line); ``others`` (e.g. per-seed or
    out-of-domain profiles) are drawn as thin lines through their measured layers. When full training's gain
    is not above the noise, contributions mean nothing: the figure then shows what was measured instead
    (:func:`plot_gains`) and says so."""
    if not profile.reliable and profile.layer_gains:
        return plot_gains(profile, out, title)
    plt = pyplot()
    points = profile.points
    n = len(points)
    fig, ax = plt.subplots(figsize=(9, 4))
    measured = [p for p in points if not p.interpolated]
    guessed = [p for p in points if p.interpolated]
    span = [p for p in points if measured and measured[0].layer <= p.layer <= measured[-1].layer]
    xs = [p.layer for p in span]
    ax.fill_between(xs, [p.low for p in span], [p.high for p in span], alpha=0.2, label="95% interval")
    ax.plot(xs, [p.contribution for p in span], color="C0")
    ax.scatter([p.layer for p in measured], [p.contribution for p in measured], color="C0", zorder=3, label="measured")
    if guessed:
        ax.scatter([p.layer for p in guessed], [p.contribution for p in guessed], facecolors="none",
                   edgecolors="C0", zorder=3, label="interpolated")
    for i, (name, other) in enumerate((others or {}).items()):
        shown = [p for p in other.points if not p.interpolated]
        ax.plot([p.layer for p in shown], [p.contribution for p in shown], marker=".", linewidth=1, alpha=0.8,
                color=f"C{(i + 4) % 10}", label=name)
    ax.axhline(1.0, color="C3", linestyle="--", label="full training")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel="layer", ylabel="contribution C(l)", title=title or "layer contribution")
    top = ax.secondary_xaxis("top", functions=(lambda x: (x + 0.5) / n, lambda d: d * n - 0.5))
    top.set_xlabel("relative depth")
    if not profile.reliable:
        ax.text(0.5, 0.5, "full-training gain within noise:\ncontributions not meaningful", transform=ax.transAxes,
                ha="center", va="center", color="C3", fontsize=13, alpha=0.8)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_gains(profile: Profile, out: str | Path, title: str = "") -> Path:
    """Each measured layer's accuracy gain over the base model with its 95% interval, full training's gain as a
    band, and a note that contributions are not shown because full training's gain is not above the noise."""
    plt = pyplot()
    n = len(profile.points)
    gains, full = profile.layer_gains, profile.full_gain
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.axhspan(full.low, full.high, color="C3", alpha=0.12, label="full training: 95% interval")
    ax.axhline(full.value, color="C3", linestyle="--", label=f"full training {full.value:+.3f}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.errorbar([g.layer for g in gains], [g.contribution for g in gains],
                yerr=[[g.contribution - g.low for g in gains], [g.high - g.contribution for g in gains]],
                fmt="o", color="C0", capsize=3, label="single layer (95% interval)")
    ax.set_xlim(-0.5, n - 0.5)
    spread = max([abs(full.low), abs(full.high), *(abs(v) for g in gains for v in (g.low, g.high))], default=0)
    ax.set_ylim(-max(spread, 0.05) * 1.3, max(spread, 0.05) * 1.6)
    ax.set(xlabel="layer", ylabel="accuracy gain over the base model", title=title or "layer contribution")
    top = ax.secondary_xaxis("top", functions=(lambda x: (x + 0.5) / n, lambda d: d * n - 0.5))
    top.set_xlabel("relative depth")
    ax.text(0.5, 0.97, f"full training's gain {full.value:+.3f} [{full.low:+.3f}, {full.high:+.3f}] is not above the "
            "noise:\ncontributions C(l) would be ratios of noise; shown are the measured gains",
            transform=ax.transAxes, ha="center", va="top", color="C3", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def profile_table(profile: Profile) -> str:
    """A markdown table of every layer's contribution, with how its intervals were made, what they omit, the
    seed-to-seed rank correlation and, with a learning-rate grid, both protocols side by side."""
    g = profile.full_gain
    lines = [f"Full-training gain: {g.value:+.4f} [{g.low:+.4f}, {g.high:+.4f}]"
             + ("" if profile.reliable else f"\n\n**Warning:** {profile.warning}"), "",
             f"Profile: {profile.describe()}."]
    if profile.method:
        lines.append(f"Intervals: {profile.method}.")
    if profile.seed_rank_correlation is not None:
        lines.append(f"Seed-to-seed rank correlation (Spearman between single seeds' profiles): "
                     f"{profile.seed_rank_correlation:+.2f}.")
    lines += [f"Note: {note}." for note in profile.notes]
    grid = profile.robustness is not None
    lines += ["", "| layer | relative depth | contribution | 95% interval | measured |" + (" lr |" if grid else ""),
              "|---|---|---|---|---|" + ("---|" if grid else "")]
    n = len(profile.points)
    for p in profile.points:
        lines.append(f"| {p.layer} | {(p.layer + 0.5) / n:.2f} | {p.contribution:.3f} | [{p.low:.3f}, {p.high:.3f}] | "
                     f"{'interpolated' if p.interpolated else 'yes'} |"
                     + ((" - |" if p.interpolated else f" {p.lr_scale:g}x |") if grid else ""))  # no rate of its own
    r = profile.robustness
    if r is not None:
        lines += ["", f"Learning-rate grid {', '.join(f'{x:g}x' for x in r.lr_scales)}: full training "
                  + ", ".join(f"{a:.3f} at {x:g}x" for x, a in zip(r.lr_scales, r.full_accuracy, strict=True))
                  + f"; study protocol at {r.full_lr_scale:g}x. Rank agreement with per-configuration best rates: "
                  f"Spearman {_signed(r.spearman)}, Kendall {_signed(r.kendall)}; rank depends on the rate for layers "
                  f"{', '.join(map(str, r.rate_dependent)) or 'none'}.", "",
                  "| layer | C, study | rank | own best rate | C, own best | rank | gain from own rate |",
                  "|---|---|---|---|---|---|---|"]
        for c in r.layers:
            lines.append(f"| {c.layer} | {c.study.value:.3f} [{c.study.low:.3f}, {c.study.high:.3f}] | {c.rank_study} | "
                         f"{c.best_lr_scale:g}x | {c.best.value:.3f} [{c.best.low:.3f}, {c.best.high:.3f}] | "
                         f"{c.rank_best} | {c.gain.value:+.3f} [{c.gain.low:+.3f}, {c.gain.high:+.3f}] |")
    return "\n".join(lines) + "\n"


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.2f}"  # a rank correlation of fewer than two layers is undefined


def plot_change_vs_contribution(profile: Profile, own_change: Mapping[int, float],
                                full_change: Mapping[int, float], out: str | Path,
                                correlation: RankCorrelation | None = None) -> Path:
    """Left: relative weight change per layer over depth, in the full run and in each layer's own
    single-layer run. Right: a single-layer run's change against its contribution ("distance or
    leverage?")."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if full_change:
        xs = sorted(full_change)
        left.plot(xs, [full_change[x] for x in xs], marker=".", color="black", label="full-parameter run")
    xs = sorted(own_change)
    left.plot(xs, [own_change[x] for x in xs], marker="o", linestyle="none", color="C0", label="single-layer run")
    left.set(xlabel="layer", ylabel="||W_after - W_before|| / ||W_before||", title="how far each layer moved")
    left.legend(fontsize=8)
    by_layer = {p.layer: p for p in profile.points}
    shown = [x for x in xs if x in by_layer and not by_layer[x].interpolated]
    scatter = right.scatter([own_change[x] for x in shown], [by_layer[x].contribution for x in shown],
                            c=[(x + 0.5) / len(profile.points) for x in shown], cmap="viridis", vmin=0, vmax=1)
    for x in shown:
        right.annotate(str(x), (own_change[x], by_layer[x].contribution), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
    fig.colorbar(scatter, ax=right, label="relative depth")
    title = "distance vs contribution"
    if correlation is not None and not math.isnan(correlation.spearman):
        title += f" (Spearman {correlation.spearman:+.2f}, p={correlation.spearman_p:.2g})"
    right.set(xlabel="relative change of the trained layer", ylabel="contribution C(l)", title=title)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_rank_heatmap(names: Sequence[str], pairs: Mapping[tuple[str, str], RankCorrelation],
                      out: str | Path) -> Path:
    """Spearman's rho between every two profiles (lower triangle also shows Kendall's tau)."""
    plt = pyplot()
    n = len(names)
    size = max(4.0, 1.1 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    grid = [[1.0 if i == j else float("nan") for j in range(n)] for i in range(n)]
    texts = [["1" if i == j else "n/a" for j in range(n)] for i in range(n)]
    for i, p in enumerate(names):
        for j, q in enumerate(names):
            pair = pairs.get((p, q)) or pairs.get((q, p))
            if i == j or pair is None:
                continue
            value, p_value = (pair.spearman, pair.spearman_p) if i < j else (pair.kendall, pair.kendall_p)
            grid[i][j] = value
            if not math.isnan(value):
                texts[i][j] = f"{value:+.2f}\np={p_value:.2g}"
    image = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, texts[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_title("rank agreement: Spearman (upper), Kendall (lower)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_strategies(labels: Sequence[str], accuracies: Sequence[Sequence[float]], trainable: Sequence[int],
                    base: float, out: str | Path, title: str = "") -> Path:
    """Left: each strategy's accuracy per seed (dots) and mean (bar), with the base model and full
    training as lines. Right: mean accuracy against trainable parameters (log scale)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    means = [sum(a) / len(a) for a in accuracies]
    xs = range(len(labels))
    left.bar(xs, means, color="C0", alpha=0.35)
    for x, seeds in zip(xs, accuracies, strict=True):
        left.scatter([x] * len(seeds), seeds, color="C0", zorder=3, s=18)
    left.axhline(base, color="grey", linestyle=":", label=f"base {base:.3f}")
    if "full" in labels or "all" in labels:
        full = means[list(labels).index("full" if "full" in labels else "all")]
        left.axhline(full, color="C3", linestyle="--", label=f"full {full:.3f}")
    left.set_xticks(list(xs), labels, rotation=20, ha="right")
    left.set(ylabel="eval accuracy", title=title or "strategies at the same budget")
    left.legend(fontsize=8, loc="lower right")
    left.grid(axis="y", alpha=0.3)
    for label, mean, count in zip(labels, means, trainable, strict=True):
        if count:
            right.scatter(count, mean, color="C0")
            right.annotate(label, (count, mean), fontsize=8, xytext=(3, 3), textcoords="offset points")
    right.axhline(base, color="grey", linestyle=":")
    right.set_xscale("log")
    right.set(xlabel="trainable parameters", ylabel="mean eval accuracy", title="accuracy vs. trained parameters")
    right.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_signals(values: dict[str, dict[int, float]], num_layers: int, path: Path, title: str) -> Path:
    """Every signal over depth, each min-max scaled to [0, 1] so that they share one axis."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, by_layer in values.items():
        layers = sorted(layer for layer, v in by_layer.items() if math.isfinite(v))
        if not layers:
            continue
        ys = np.array([by_layer[layer] for layer in layers])
        span = np.ptp(ys)
        ax.plot(layers, (ys - ys.min()) / span if span > 0 else np.zeros_like(ys), marker="o", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("signal, scaled to [0, 1] (higher: predicted to matter more)")
    ax.set_xlim(-0.5, num_layers - 0.5)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_predictor_scores(scores: Sequence, out: str | Path, ceiling: float = float("nan"), title: str = "") -> Path:
    """Spearman's rho of each predictor with the measured profile (the position baseline in grey), and the
    scan's own seed-to-seed rho as the ceiling when known."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [s.signal for s in scores]
    rhos = [s.spearman if math.isfinite(s.spearman) else 0.0 for s in scores]
    colours = ["0.6" if s.signal == "position" else "C0" for s in scores]
    ax.bar(range(len(names)), rhos, color=colours)
    ax.axhline(0, color="black", lw=0.8)
    if math.isfinite(ceiling):
        ax.axhline(ceiling, color="C3", ls="--", label=f"seed-to-seed rho of the scan ({ceiling:+.2f})")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Spearman rho with measured C(l)")
    ax.set_ylim(-1, 1)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_rate_robustness(robustness: RateRobustness, num_layers: int, out: str | Path) -> Path:
    """Left: each measured layer's contribution under the study's protocol (the full run's best rate) and at
    its own best rate, with 95% intervals; the own best rate is written above. Right: full training's
    accuracy at each rate of the grid."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    layers = [c.layer for c in robustness.layers]
    for offset, name, colour, label in ((-0.15, "study", "C0", f"study protocol ({robustness.full_lr_scale:g}x)"),
                                        (0.15, "best", "C1", "own best rate")):
        estimates = [getattr(c, name) for c in robustness.layers]
        left.errorbar([x + offset for x in layers], [e.value for e in estimates],
                      yerr=[[e.value - e.low for e in estimates], [e.high - e.value for e in estimates]],
                      fmt="o", capsize=3, color=colour, label=label)
    for c in robustness.layers:
        left.annotate(f"{c.best_lr_scale:g}x", (c.layer + 0.15, c.best.high), fontsize=7, ha="center",
                      xytext=(0, 3), textcoords="offset points")
    left.axhline(1.0, color="C3", linestyle="--", linewidth=1)
    left.axhline(0.0, color="grey", linewidth=0.8)
    title = "contribution by learning-rate protocol"
    if not math.isnan(robustness.spearman):
        title += f" (Spearman {robustness.spearman:+.2f})"
    left.set(xlabel="layer", ylabel="contribution C(l)", title=title, xlim=(-0.5, num_layers - 0.5))
    left.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    left.legend(fontsize=8)
    xs = range(len(robustness.lr_scales))
    right.bar(list(xs), robustness.full_accuracy, color=["C3" if x == robustness.full_lr_scale else "C7"
                                                         for x in robustness.lr_scales])
    right.set_xticks(list(xs), [f"{x:g}x" for x in robustness.lr_scales])
    right.set(xlabel="learning rate (x --lr)", ylabel="full training accuracy", title="full training")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)

"""The contribution profile over depth, as a figure and as a markdown table."""

from __future__ import annotations

from pathlib import Path

from .contribution import Profile


def plot_profile(profile: Profile, out: str | Path, title: str = "") -> Path:
    """Contribution per layer (x: index, top axis: relative depth) with its interval as a band, the
    full-training level at 1.0, and interpolated layers drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = profile.points
    n = len(points)
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = [p.layer for p in points]
    ax.fill_between(xs, [p.low for p in points], [p.high for p in points], alpha=0.2, label="95% interval")
    ax.plot(xs, [p.contribution for p in points], color="C0")
    measured = [p for p in points if not p.interpolated]
    guessed = [p for p in points if p.interpolated]
    ax.scatter([p.layer for p in measured], [p.contribution for p in measured], color="C0", zorder=3, label="measured")
    if guessed:
        ax.scatter([p.layer for p in guessed], [p.contribution for p in guessed], facecolors="none",
                   edgecolors="C0", zorder=3, label="interpolated")
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def profile_table(profile: Profile) -> str:
    """A markdown table of every layer's contribution."""
    g = profile.full_gain
    lines = [f"Full-training gain: {g.value:+.4f} [{g.low:+.4f}, {g.high:+.4f}]"
             + ("" if profile.reliable else f"\n\n**Warning:** {profile.warning}"), "",
             "| layer | relative depth | contribution | 95% interval | measured |", "|---|---|---|---|---|"]
    n = len(profile.points)
    for p in profile.points:
        lines.append(f"| {p.layer} | {(p.layer + 0.5) / n:.2f} | {p.contribution:.3f} | [{p.low:.3f}, {p.high:.3f}] | "
                     f"{'interpolated' if p.interpolated else 'yes'} |")
    return "\n".join(lines) + "\n"

"""Training curves: reward per step and evaluation accuracy (with its interval) for one or more runs."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import OneLayerError
from ..jsonl import exists, read_jsonl
from .figures import pyplot, save_figure


def load_run_logs(run_dir: str | Path) -> dict:
    """A run's name (its layer spec), per-step log rows and eval rows."""
    run = Path(run_dir)
    if not exists(run / "log.jsonl"):
        raise OneLayerError(f"{run} has no log.jsonl: pass run directories written by onelayer train")
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    return {"name": f"{run.name} ({config.get('layers', '?')})", "steps": read_jsonl(run / "log.jsonl"),
            "evals": read_jsonl(run / "eval.jsonl")}


def _smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_runs(run_dirs: list[str | Path], out: str | Path, smooth: int = 5) -> Path:
    """Draw train reward (moving average over ``smooth`` steps) and eval accuracy of the runs into
    one PNG at ``out``."""
    plt = pyplot()
    runs = [load_run_logs(r) for r in run_dirs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps = [row["step"] for row in run["steps"]]
        left.plot(steps, _smooth([row["reward"] for row in run["steps"]], smooth), label=run["name"])
        if run["evals"]:
            x = [row["step"] for row in run["evals"]]
            acc = [row["accuracy"] for row in run["evals"]]
            err = [[a - row["ci_low"] for a, row in zip(acc, run["evals"], strict=True)],
                   [row["ci_high"] - a for a, row in zip(acc, run["evals"], strict=True)]]
            right.errorbar(x, acc, yerr=err, marker="o", capsize=3, label=run["name"])
    left.set(xlabel="step", ylabel=f"train reward (mean of {smooth} steps)", title="reward")
    right.set(xlabel="step", ylabel="eval accuracy (95% CI)", title="evaluation")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)


def plot_scan_rewards(runs: list[dict], num_layers: int, out: str | Path, smooth: int = 5) -> Path:
    """Train reward of every trained run of a scan: single-layer runs coloured by relative depth, the
    full-parameter runs in black, runs at another learning rate than ``--lr`` dashed. ``runs`` rows: kind,
    layer, lr_scale and ``steps`` (log rows)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    cmap = plt.get_cmap("viridis")
    for run in runs:
        steps = [row["step"] for row in run["steps"]]
        rewards = _smooth([row["reward"] for row in run["steps"]], smooth)
        style = "-" if run.get("lr_scale", 1.0) == 1 else "--"
        if run["kind"] == "full":
            ax.plot(steps, rewards, color="black", linewidth=2, linestyle=style, label="full" if "full" not in
                    ax.get_legend_handles_labels()[1] else None)
        else:
            ax.plot(steps, rewards, color=cmap((run["layer"] + 0.5) / num_layers), linewidth=1, linestyle=style,
                    alpha=0.9)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(mappable, ax=ax, label="relative depth of the trained layer")
    ax.set(xlabel="step", ylabel=f"train reward (mean of {smooth} steps)",
           title="reward of every run (dashed: other learning rates than --lr)")
    ax.grid(alpha=0.3)
    if any(r["kind"] == "full" for r in runs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_learning_curves(contribution_steps: list[int], contributions: dict[int, list[float]],
                         accuracy_steps: list[int], accuracy: dict[str, list[float]], num_layers: int,
                         out: str | Path) -> Path:
    """Left: each layer's contribution after each evaluated step (``contributions[layer][j]`` at
    ``contribution_steps[j]``), coloured by relative depth, full training at 1. Right: held-out accuracy over
    training (``accuracy[name]`` at ``accuracy_steps``: ``base``, ``full`` and ``layer N`` curves)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for layer, values in sorted(contributions.items()):
        colour = cmap((layer + 0.5) / num_layers)
        left.plot(contribution_steps, values, marker="o", color=colour, linewidth=1.2)
        left.annotate(str(layer), (contribution_steps[-1], values[-1]), fontsize=7, color=colour, xytext=(3, 0),
                      textcoords="offset points")
        if f"layer {layer}" in accuracy:
            right.plot(accuracy_steps, accuracy[f"layer {layer}"], marker=".", color=colour, linewidth=1)
    left.axhline(1.0, color="C3", linestyle="--", label="full training")
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set(xlabel="step", ylabel="contribution C(l)", title="contribution over training")
    left.legend(fontsize=8)
    if "full" in accuracy:
        right.plot(accuracy_steps, accuracy["full"], marker="o", color="black", linewidth=2, label="full")
    if "base" in accuracy:
        right.plot(accuracy_steps, accuracy["base"], color="grey", linestyle=":", label="base")
    right.set(xlabel="step", ylabel="held-out accuracy (mean over seeds)", title="evaluation over training")
    right.legend(fontsize=8)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(mappable, ax=right, label="relative depth of the trained layer")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    return save_figure(fig, out)

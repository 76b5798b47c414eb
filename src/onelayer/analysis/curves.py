"""Training curves: reward per step and evaluation accuracy (with its interval) for one or more runs."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import OneLayerError


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def load_run_logs(run_dir: str | Path) -> dict:
    """A run's name (its layer spec), per-step log rows and eval rows."""
    run = Path(run_dir)
    if not (run / "log.jsonl").is_file():
        raise OneLayerError(f"{run} has no log.jsonl: pass run directories written by onelayer train")
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    return {"name": f"{run.name} ({config.get('layers', '?')})", "steps": _jsonl(run / "log.jsonl"),
            "evals": _jsonl(run / "eval.jsonl")}


def _smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_runs(run_dirs: list[str | Path], out: str | Path, smooth: int = 5) -> Path:
    """Draw train reward (moving average over ``smooth`` steps) and eval accuracy of the runs into
    one PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

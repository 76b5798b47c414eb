"""Layers 0, 5 and 9 at 10x (scans/main-10x) against the main scan: their C against full training at its tuned
rate (1x), and 10x minus 3x. The edge scan's own profile reads C against full training at 10x, which collapsed.
Hierarchical bootstrap over seeds and the 500 problems, paired, as the profiles use (onelayer.analysis.contribution).
Run from the repository root: python docs/results/2026-12-02-reproduction-smollm2/edge-vs-full.py"""
from pathlib import Path

from onelayer.analysis.contribution import (ResamplePlan, bootstrap_indices, difference_estimate, ratio_estimate,
                                            resampled, seed_draws)
from onelayer.experiments.rundir import example_scores, final_examples

HERE = Path(__file__).parent
MAIN, EDGE = HERE / "scans/main/runs", HERE / "scans/main-10x/runs"


def scores(runs: Path, *names: str):
    return [example_scores(final_examples(runs / name)) for name in names]


plan = ResamplePlan(bootstrap_indices(500, 2000, 0), seed_draws(2, 2000, 0))
base = resampled(scores(MAIN, "base"), plan)
full = resampled(scores(MAIN, "full-s0", "full-s1"), plan)
print("| layer | accuracy at 3x | accuracy at 10x | C at 10x, against full at 1x | 10x minus 3x |")
print("|---|---|---|---|---|")
for layer in (0, 5, 9):
    at3 = resampled(scores(MAIN, f"layer{layer:03d}-lr3x-s0", f"layer{layer:03d}-lr3x-s1"), plan)
    at10 = resampled(scores(EDGE, f"layer{layer:03d}-lr10x-s0", f"layer{layer:03d}-lr10x-s1"), plan)
    c, d = ratio_estimate(at10, base, full), difference_estimate(at10, at3)
    print(f"| {layer} | {at3.value:.3f} | {at10.value:.3f} | {c.value:.3f} [{c.low:.3f}, {c.high:.3f}] "
          f"| {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] |")

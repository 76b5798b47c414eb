"""Layer contribution C(l) = (S_l - S_base) / (S_full - S_base), with its noise.

Data. Every run is evaluated on the same n eval examples; ``x[c][s][i]`` is the score of example i (the fraction
of its samples judged correct) after training configuration c (full training, or layer l alone, at a learning
rate r times ``--lr``) with seed s. The base model is evaluated once (greedy: no training noise). S_c is the mean
over seeds and examples.

Intervals: a percentile bootstrap of B resamples (default 2000) from one plan that every configuration shares:

1. seeds, for a configuration with m >= 2 seeds: m of its seeds drawn with replacement. The draw is made once
   per resample for all configurations (uniform numbers u_bj; seed index floor(u_bj * m)), so configurations
   with the same seeds draw the same ones: the runs of one seed share data order and sampling streams and
   stay paired;
2. examples: n of the n examples drawn with replacement, the same indices for base, full and every layer (a
   paired bootstrap: shared example difficulty cancels in S_l - S_base and S_full - S_base).

In resample b, S_c^b is the mean over the drawn seeds of the mean over the drawn examples, and
C^b = (S_l^b - S_base^b) / (S_full^b - S_base^b) (resamples where full training gained exactly 0 are dropped).
The interval is the (1 - level)/2 and (1 + level)/2 percentiles of the C^b (linear between order statistics,
numpy's default). With one seed step 1 is a no-op and the interval omits training noise; with seeds but no seed
plan (``seeds=None``) it is the bootstrap of seed-averaged per-example scores, which omits it too. With k seeds
the seed level is a bootstrap of k values, whose variance is (k - 1)/k of the usual estimate: 2 seeds
understate the training noise.

Learning rates (``scan --lr-grid``). A configuration trained at several rates is read at one of them:

- protocol ``study`` (the study's): every configuration at the rate where full training scored highest;
- protocol ``best``: each configuration at its own highest-scoring rate (full training at its best too).

Ties go to the lower rate. The rate is picked again inside each resample, from that resample's S, so the
interval includes the uncertainty of which rate is best. The highest of several noisy scores is biased upward
(winner's curse): more so with more rates and fewer examples.

Differences D_ab = C_a - C_b come from the same resamples (``top:k@SCAN`` says which chosen layers are
distinguishable from the (k+1)-th: D's interval excludes 0). The seed rank correlation is Spearman's rho
between the profiles of single seeds (each seed's own full and layer runs, at the rates the pooled protocol
chose), averaged over pairs of seeds: the ceiling for any claim about the ranking.

When the full-training gain's own interval includes 0 the ratio is meaningless, and :class:`Profile` says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OneLayerError
from ..profile import Estimate, LayerDifference, LayerPoint, Profile, RateChoice, RateRobustness, interpolate
from .rank import layer_ranks, rank_correlation

#: one configuration's runs: {seed: per-example scores}, or a list of per-example scores (seeds by position)
Runs = Mapping[int, Sequence[float]] | Sequence[Sequence[float]]


def contribution(s_layer: float, s_base: float, s_full: float) -> float:
    """C = (S_l - S_base) / (S_full - S_base); 1 matches full training, > 1 beats it, < 0 hurts.
    NaN when full training gained nothing."""
    gain = s_full - s_base
    return float("nan") if gain == 0 else (s_layer - s_base) / gain


def per_example_scores(runs: Sequence[Sequence[float]]) -> np.ndarray:
    """Mean per-example score over the seeds of one configuration (``runs[seed][example]``)."""
    array = np.asarray(runs, dtype=float)
    if array.ndim != 2 or array.shape[1] == 0:
        raise OneLayerError("per-example scores must be a non-empty table of seeds x examples")
    return array.mean(axis=0)


def _interval(samples: np.ndarray, value: float, level: float) -> Estimate:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return Estimate(value, float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    return Estimate(value, float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))


def bootstrap_indices(n_examples: int, n_resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_examples, size=(n_resamples, n_examples))


def seed_draws(n_seeds: int, n_resamples: int, seed: int) -> np.ndarray | None:
    """Uniform numbers in [0, 1) for the seed level of the plan (None when there is one seed to draw)."""
    return np.random.default_rng([seed, 1]).random((n_resamples, n_seeds)) if n_seeds > 1 else None


@dataclass(frozen=True)
class ResamplePlan:
    """One bootstrap plan for every configuration: ``examples`` (B x n example indices) and ``seeds`` (B x k
    uniform numbers: a configuration of m <= k seeds draws seed floor(u * m) for each of the first m columns),
    or None to average seeds instead of resampling them."""

    examples: np.ndarray
    seeds: np.ndarray | None = None

    def means(self, runs: np.ndarray) -> np.ndarray:
        """The B resampled means of ``runs`` (seeds x examples)."""
        runs = np.atleast_2d(np.asarray(runs, dtype=float))
        m = runs.shape[0]
        per_seed = runs[:, self.examples].mean(axis=2)  # (m, B): each seed's mean over the drawn examples
        if m == 1 or self.seeds is None:
            return per_seed.mean(axis=0)
        if self.seeds.shape[1] < m:
            raise OneLayerError(f"the resample plan draws {self.seeds.shape[1]} seeds, a configuration has {m}")
        drawn = np.floor(self.seeds[:, :m] * m).astype(int)  # (B, m) seed indices
        return per_seed[drawn, np.arange(per_seed.shape[1])[:, None]].mean(axis=1)


@dataclass(frozen=True)
class Resampled:
    """A configuration's score: its point estimate and its value in every resample."""

    value: float
    samples: np.ndarray


def resampled(runs, plan: ResamplePlan) -> Resampled:
    runs = np.atleast_2d(np.asarray(runs, dtype=float))
    return Resampled(float(runs.mean()), plan.means(runs))


def ratio_estimate(layer: Resampled, base: Resampled, full: Resampled, level: float = 0.95) -> Estimate:
    """C with its percentile interval over the resamples (those where full gained exactly 0 dropped)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.where(full.samples != base.samples,
                           (layer.samples - base.samples) / (full.samples - base.samples), np.nan)
    return _interval(samples, contribution(layer.value, base.value, full.value), level)


def difference_estimate(a: Resampled, b: Resampled, level: float = 0.95) -> Estimate:
    """S_a - S_b with its percentile interval over the shared resamples."""
    return _interval(a.samples - b.samples, a.value - b.value, level)


def gain_estimate(base: np.ndarray, other: np.ndarray, indices: np.ndarray, level: float = 0.95) -> Estimate:
    """S_other - S_base with a paired bootstrap interval over examples (one run each)."""
    plan = ResamplePlan(indices)
    return difference_estimate(resampled(other, plan), resampled(base, plan), level)


def contribution_estimate(base: np.ndarray, full: np.ndarray, layer: np.ndarray, indices: np.ndarray,
                          level: float = 0.95) -> Estimate:
    """C(l) with a paired bootstrap interval over examples (one run each; resamples where full gained exactly 0
    are dropped)."""
    plan = ResamplePlan(indices)
    return ratio_estimate(resampled(layer, plan), resampled(base, plan), resampled(full, plan), level)


def pick_rate(by_rate: Mapping[float, Resampled]) -> tuple[float, Resampled, np.ndarray]:
    """The highest-scoring rate (ties: the lower one), the score there (in each resample: the highest of that
    resample) and the rate picked in each resample."""
    rates = sorted(by_rate)
    best = rates[int(np.argmax([by_rate[r].value for r in rates]))]
    stacked = np.stack([by_rate[r].samples for r in rates])
    return best, Resampled(by_rate[best].value, stacked.max(axis=0)), np.asarray(rates)[stacked.argmax(axis=0)]


def at_rates(by_rate: Mapping[float, Resampled], rate: float, per_resample: np.ndarray) -> Resampled | None:
    """A configuration read at ``rate`` (its point estimate) and at ``per_resample[b]`` in resample b (NaN where
    it was not trained at that rate); None when it was not trained at ``rate``."""
    if rate not in by_rate:
        return None
    samples = np.full(per_resample.shape, np.nan)
    for r, scores in by_rate.items():
        chosen = per_resample == r
        samples[chosen] = scores.samples[chosen]
    return Resampled(by_rate[rate].value, samples)


def area_under_curve(steps: Sequence[int], scores: Sequence[Sequence[float]]) -> np.ndarray:
    """Each example's mean score over training: the trapezoid area under its score at ``steps`` (``scores[j]``
    holds every example's score after ``steps[j]`` steps; the first is normally step 0, the base model), divided
    by the steps it spans. With two points it is their mean; a contribution computed from these areas is the
    share of full training's area above the base model that a layer recovers."""
    xs = np.asarray(steps, dtype=float)
    ys = np.asarray(scores, dtype=float)
    if xs.ndim != 1 or xs.size < 2 or ys.shape[0] != xs.size or np.any(np.diff(xs) <= 0):
        raise OneLayerError(f"an area under the curve needs at least two increasing steps, got {list(steps)}")
    widths = np.diff(xs)[:, None]
    return ((ys[1:] + ys[:-1]) / 2 * widths).sum(axis=0) / (xs[-1] - xs[0])


def _runs(runs: Runs) -> dict[int, np.ndarray]:
    pairs = runs.items() if isinstance(runs, Mapping) else enumerate(runs)
    return {int(s): np.asarray(x, dtype=float) for s, x in pairs}


def _stack(runs: dict[int, np.ndarray]) -> np.ndarray:
    return np.stack([runs[s] for s in sorted(runs)])


def _method(seeds: int, n_examples: int, n_resamples: int, level: float, rates: int) -> tuple[str, list[str]]:
    what = f"{level:.0%} percentile bootstrap ({n_resamples} resamples)"
    examples = (f"the {n_examples} eval examples drawn with replacement, the same draw for base, full and every "
                "layer (paired)")
    notes = []
    if seeds > 1:
        method = (f"{what}, hierarchical: in each resample, each configuration's seeds drawn with replacement (the "
                  f"same draw for every configuration, so runs of one seed stay paired), then {examples}; the "
                  "intervals include seed-to-seed training noise")
        notes.append(f"the seed level resamples only {seeds} seeds, which understates training noise (its variance "
                     f"by a factor of about {(seeds - 1) / seeds:.2f}); more seeds give a truer interval")
    else:
        method = f"{what} over {examples}"
        notes.append("one seed per configuration: the intervals omit training noise (seed-to-seed variation, which "
                     "can be as large as the gaps between neighbouring layers); run the scan with --seeds 2 or more")
    if rates > 1:
        method += ("; the learning rate of each configuration is picked again inside each resample, so the "
                   "intervals include which rate is best")
    return method, notes


def contribution_profile(base: Runs, full: Mapping[float, Runs], layers: Mapping[int, Mapping[float, Runs]],
                         num_layers: int, protocol: str = "study", n_resamples: int = 2000, level: float = 0.95,
                         seed: int = 0) -> Profile:
    """The contribution profile from per-example scores of the base model, full training at each learning rate
    (``full[rate]``) and each measured layer at each rate (``layers[layer][rate]``), read under ``protocol``
    (``study`` or ``best``, see the module docstring); unmeasured layers are interpolated. With more than one
    rate the profile carries the comparison of both protocols (``robustness``)."""
    if protocol not in ("study", "best"):
        raise OneLayerError(f"unknown protocol '{protocol}': use study or best")
    if not full:
        raise OneLayerError("a profile needs a full-training run")
    base_runs = _runs(base)
    full_runs = {float(r): _runs(x) for r, x in full.items()}
    layer_runs = {int(k): {float(r): _runs(x) for r, x in v.items()} for k, v in layers.items()}
    everything = [*base_runs.values(), *(x for v in full_runs.values() for x in v.values()),
                  *(x for v in layer_runs.values() for rate in v.values() for x in rate.values())]
    n = everything[0].size
    if any(x.shape != (n,) for x in everything):
        raise OneLayerError("every run must be scored on the same eval examples: rerun eval with the same --n")
    k = max(len(x) for v in [full_runs, *layer_runs.values()] for x in v.values())
    examples = bootstrap_indices(n, n_resamples, seed)
    plan = ResamplePlan(examples, seed_draws(k, examples.shape[0], seed))
    b = resampled(_stack(base_runs), plan)
    full_scores = {r: resampled(_stack(x), plan) for r, x in full_runs.items()}
    layer_scores = {layer: {r: resampled(_stack(x), plan) for r, x in v.items()} for layer, v in layer_runs.items()}
    full_rate, f, full_picks = pick_rate(full_scores)

    def read(layer: int, how: str) -> tuple[Resampled | None, float]:
        if how == "study":
            return at_rates(layer_scores[layer], full_rate, full_picks), full_rate
        rate, scores, _ = pick_rate(layer_scores[layer])
        return scores, rate

    def estimates(how: str) -> tuple[dict[int, Estimate], dict[int, np.ndarray], dict[int, float]]:
        values, samples, rates = {}, {}, {}
        for layer in layer_scores:
            scores, rate = read(layer, how)
            if scores is None:
                continue  # not trained at the rate this protocol reads
            with np.errstate(divide="ignore", invalid="ignore"):
                samples[layer] = np.where(f.samples != b.samples, (scores.samples - b.samples) / (f.samples - b.samples),
                                          np.nan)
            values[layer] = _interval(samples[layer], contribution(scores.value, b.value, f.value), level)
            rates[layer] = rate
        return values, samples, rates

    def gains(how: str) -> tuple[LayerPoint, ...]:
        """Each layer's S_l - S_base at the rate ``how`` reads it: what was measured, even where C(l) is not
        defined."""
        points = []
        for layer in sorted(layer_scores):
            scores, rate = read(layer, how)
            if scores is not None:
                g = difference_estimate(scores, b, level)
                points.append(LayerPoint(layer, g.value, g.low, g.high, False, rate))
        return tuple(points)

    gain = difference_estimate(f, b, level)
    reliable = gain.low > 0  # C(l) reads as a share of full training's gain only when that gain is above the noise
    change = f"{gain.value:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}]"
    if reliable:
        warning = ""
    elif gain.high < 0:
        warning = (f"full training lowered the metric by {change}: contributions would rank the layers that hurt "
                   "most first; lower --lr or train longer before reading them")
    else:
        warning = (f"full training changed the metric by {change}, within noise: contributions are not meaningful; "
                   "train longer or with more learning signal (the runs' log.jsonl says when groups had none), or "
                   "use more eval examples or seeds")
    values, samples, rates = estimates(protocol)
    if not values:
        raise OneLayerError(f"no layer was trained at the full run's best learning rate ({full_rate:g}x --lr)")
    points = _points(values, rates, full_rate, num_layers)
    finite = sorted(layer for layer, e in values.items() if math.isfinite(e.value))
    differences = tuple(LayerDifference(a, c, *_difference(samples[a], samples[c], values[a], values[c], level))
                        for i, a in enumerate(finite) for c in finite[i + 1:])
    n_rates = len({r for v in layer_scores.values() for r in v} | set(full_scores))
    method, notes = _method(k, n, n_resamples, level, n_rates)
    robustness = None
    if n_rates > 1:
        robustness = _robustness(estimates("study"), estimates("best"), full_scores, full_rate, level,
                                 {layer: tuple(sorted(v)) for layer, v in layer_scores.items()})
        if protocol == "best":
            notes.append("each layer at its own best rate: picking the highest of several noisy scores biases these "
                         "contributions upward (more with more rates); the study protocol does not pick per layer")
    missing = sorted(set(layer_scores) - set(values))
    if missing:
        notes.append(f"layers {missing} have no run at {full_rate:g}x --lr, the rate this protocol reads: not measured")
    return Profile(points, gain, reliable, warning, method=method, seeds=k,
                   seed_rank_correlation=_seed_rank_correlation(base_runs, full_runs, layer_runs, full_rate, rates),
                   protocol=protocol, full_lr_scale=full_rate, differences=differences, robustness=robustness,
                   notes=tuple(notes), layer_gains=gains(protocol))


def _difference(a: np.ndarray, c: np.ndarray, ea: Estimate, ec: Estimate, level: float) -> tuple[float, float, float]:
    d = _interval(a - c, ea.value - ec.value, level)
    return d.value, d.low, d.high


def _points(values: Mapping[int, Estimate], rates: Mapping[int, float], full_rate: float,
            num_layers: int) -> tuple[LayerPoint, ...]:
    interpolated = [interpolate({k: getattr(e, name) for k, e in values.items()}, num_layers)
                    for name in ("value", "low", "high")]
    return tuple(LayerPoint(layer, v, lo, hi, flag, rates.get(layer, full_rate))
                 for layer, ((v, flag), (lo, _), (hi, _)) in enumerate(zip(*interpolated, strict=True)))


def _robustness(study, best, full_scores: Mapping[float, Resampled], full_rate: float, level: float,
                tried: Mapping[int, tuple[float, ...]]) -> RateRobustness:
    """Both protocols side by side over the layers measured under both."""
    (s_values, s_samples, _), (b_values, b_samples, b_rates) = study, best
    common = sorted(layer for layer in s_values if layer in b_values
                    and math.isfinite(s_values[layer].value) and math.isfinite(b_values[layer].value))
    ranks_study = layer_ranks({layer: s_values[layer].value for layer in common})
    ranks_best = layer_ranks({layer: b_values[layer].value for layer in common})
    choices = tuple(RateChoice(layer, b_rates[layer], s_values[layer], b_values[layer],
                               _interval(b_samples[layer] - s_samples[layer],
                                         b_values[layer].value - s_values[layer].value, level),
                               ranks_study[layer], ranks_best[layer], tried[layer]) for layer in common)
    agreement = rank_correlation([s_values[x].value for x in common], [b_values[x].value for x in common])
    rates = tuple(sorted(full_scores))
    return RateRobustness(rates, tuple(full_scores[r].value for r in rates), full_rate, agreement.spearman,
                          agreement.kendall, choices)


def _seed_rank_correlation(base: dict[int, np.ndarray], full: dict[float, dict[int, np.ndarray]],
                           layers: dict[int, dict[float, dict[int, np.ndarray]]], full_rate: float,
                           rates: Mapping[int, float]) -> float | None:
    """Mean Spearman's rho between single seeds' profiles (None with one seed; NaN when fewer than 3 layers
    were measured in both seeds of every pair)."""
    seeds = sorted(full[full_rate])
    if len(seeds) < 2:
        return None
    s_base = float(_stack(base).mean())
    per_seed = {}
    for s in seeds:
        s_full = float(full[full_rate][s].mean())
        per_seed[s] = {layer: contribution(float(by_rate[rates[layer]][s].mean()), s_base, s_full)
                       for layer, by_rate in layers.items() if layer in rates and s in by_rate[rates[layer]]}
    rhos = []
    for i, s in enumerate(seeds):
        for t in seeds[i + 1:]:
            common = sorted(x for x in per_seed[s] if x in per_seed[t]
                            and math.isfinite(per_seed[s][x]) and math.isfinite(per_seed[t][x]))
            rhos.append(rank_correlation([per_seed[s][x] for x in common], [per_seed[t][x] for x in common]).spearman)
    finite = [r for r in rhos if math.isfinite(r)]
    return float(np.mean(finite)) if finite else float("nan")


def layer_profile(base: Sequence[Sequence[float]], full: Runs, layers: Mapping[int, Runs], num_layers: int,
                  n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Profile:
    """The contribution profile from per-example scores (``[seed][example]``) of the base model, the
    full-parameter run and each measured single-layer run, all at one learning rate; unmeasured layers are
    interpolated (see :func:`contribution_profile`)."""
    return contribution_profile(base, {1.0: full}, {layer: {1.0: runs} for layer, runs in layers.items()},
                                num_layers, n_resamples=n_resamples, level=level, seed=seed)

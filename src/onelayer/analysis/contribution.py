"""Layer contribution C(l) = (S_l - S_base) / (S_full - S_base), with its noise.

S is a metric (eval accuracy by default) over the *same* eval examples for every run. Uncertainty
comes from resampling those examples (a paired bootstrap: one set of resampled indices is applied to
base, full and layer alike, so their shared example difficulty cancels) after averaging each example's
score over seeds. When the full-training gain's own interval includes 0 the ratio is meaningless, and
:class:`Profile` says so instead of reporting it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import OneLayerError
from ..profile import Estimate, LayerPoint, Profile


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


def gain_estimate(base: np.ndarray, other: np.ndarray, indices: np.ndarray, level: float = 0.95) -> Estimate:
    """S_other - S_base with a paired bootstrap interval."""
    samples = other[indices].mean(axis=1) - base[indices].mean(axis=1)
    return _interval(samples, float(other.mean() - base.mean()), level)


def contribution_estimate(base: np.ndarray, full: np.ndarray, layer: np.ndarray, indices: np.ndarray,
                          level: float = 0.95) -> Estimate:
    """C(l) with a paired bootstrap interval (resamples where full gained exactly 0 are dropped)."""
    b, f, s = (x[indices].mean(axis=1) for x in (base, full, layer))
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.where(f != b, (s - b) / (f - b), np.nan)
    return _interval(samples, contribution(float(layer.mean()), float(base.mean()), float(full.mean())), level)


def interpolate(measured: Mapping[int, float], num_layers: int) -> list[tuple[float, bool]]:
    """Values for layers ``0..num_layers-1`` from the measured ones: linear between measured layers,
    the nearest measured value beyond the ends; the flag marks interpolated layers."""
    if not measured:
        raise OneLayerError("cannot interpolate a profile with no measured layer")
    xs = sorted(measured)
    if xs[0] < 0 or xs[-1] >= num_layers:
        raise OneLayerError(f"measured layers {xs} fall outside 0-{num_layers - 1}")
    values = np.interp(np.arange(num_layers), xs, [measured[x] for x in xs])
    return [(float(v), layer not in measured) for layer, v in enumerate(values)]


def layer_profile(base: Sequence[Sequence[float]], full: Sequence[Sequence[float]],
                  layers: Mapping[int, Sequence[Sequence[float]]], num_layers: int, n_resamples: int = 2000,
                  level: float = 0.95, seed: int = 0) -> Profile:
    """The contribution profile from per-example scores (``[seed][example]``) of the base model, the
    full-parameter run and each measured single-layer run; unmeasured layers are interpolated."""
    b, f = per_example_scores(base), per_example_scores(full)
    per_layer = {layer: per_example_scores(runs) for layer, runs in layers.items()}
    if any(x.shape != b.shape for x in [f, *per_layer.values()]):
        raise OneLayerError("every run must be scored on the same eval examples: rerun eval with the same --n")
    indices = bootstrap_indices(b.size, n_resamples, seed)
    gain = gain_estimate(b, f, indices, level)
    # C(l) reads as the share of full training's gain a layer recovers: that needs a gain above the noise
    reliable = gain.low > 0
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
    estimates = {layer: contribution_estimate(b, f, s, indices, level) for layer, s in per_layer.items()}
    values = interpolate({k: e.value for k, e in estimates.items()}, num_layers)
    lows = interpolate({k: e.low for k, e in estimates.items()}, num_layers)
    highs = interpolate({k: e.high for k, e in estimates.items()}, num_layers)
    points = tuple(LayerPoint(layer, v, lo, hi, flag)
                   for layer, ((v, flag), (lo, _), (hi, _)) in enumerate(zip(values, lows, highs, strict=True)))
    gains = tuple(LayerPoint(layer, e.value, e.low, e.high, False)
                  for layer, e in sorted((k, gain_estimate(b, s, indices, level)) for k, s in per_layer.items()))
    return Profile(points, gain, reliable, warning, gains)

"""Do layer rankings agree? Spearman and Kendall rank correlations between contribution profiles.

Profiles may come from different datasets, tasks, algorithms or models. Only measured layers count
(interpolated ones would inflate agreement). Two profiles of the same depth are compared on the layers
both measured; profiles of different depths are compared at relative depth (l + 0.5) / L: the measured
layers of the shallower model are the points, and the deeper model's measured profile is linearly
interpolated there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import OneLayerError
from ..profile import Profile


@dataclass(frozen=True)
class RankCorrelation:
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    n: int
    method: str  # "same layers" or "relative depth"


EXACT_UP_TO = 8  # pairs; beyond this the usual approximations are good and permutations too many


def rank_correlation(a, b, method: str = "same layers") -> RankCorrelation:
    """Spearman's rho and Kendall's tau-b with two-sided p-values (ties get average ranks). Up to
    ``EXACT_UP_TO`` pairs the p-values are exact, from all permutations (scans often measure only a
    few layers, where the t approximation claims p = 0 for a perfect n = 3 ranking). NaN when fewer
    than 3 pairs, or when one side is constant."""
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise OneLayerError(f"rank correlation needs paired values, got {x.size} and {y.size}")
    nan = float("nan")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return RankCorrelation(nan, nan, nan, nan, int(x.size), method)
    rho, rho_p = stats.spearmanr(x, y)
    tau, tau_p = stats.kendalltau(x, y)
    if x.size <= EXACT_UP_TO:
        rho_p, tau_p = exact_p_values(x, y)
    return RankCorrelation(float(rho), float(rho_p), float(tau), float(tau_p), int(x.size), method)


def exact_p_values(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Two-sided permutation p-values of Spearman's rho and Kendall's tau-b over all n! pairings.
    Ties stay tied under permutation, so only the numerators change: rho is the correlation of the
    ranks and tau-b's numerator is sum_ij sign(x_i - x_j) sign(y_i - y_j)."""
    from itertools import permutations

    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    perms = np.array(list(permutations(range(x.size))))
    py = ry[perms]                                           # (n!, n)
    cx = rx - rx.mean()
    rhos = ((py - py.mean(axis=1, keepdims=True)) @ cx) / (np.linalg.norm(cx) * np.linalg.norm(ry - ry.mean()))
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[perms][:, :, None] - y[perms][:, None, :])  # (n!, n, n)
    taus = (sy * sx).sum(axis=(1, 2))
    eps = 1e-9
    return (float(np.mean(np.abs(rhos) >= abs(rhos[0]) - eps)), float(np.mean(np.abs(taus) >= abs(taus[0]) - eps)))


def measured(profile: Profile) -> dict[int, float]:
    return {p.layer: p.contribution for p in profile.points if not p.interpolated and math.isfinite(p.contribution)}


def relative_depth(layer: int, num_layers: int) -> float:
    return (layer + 0.5) / num_layers


def align(a: Profile, b: Profile) -> tuple[list[float], list[float], str]:
    """Paired contributions of two profiles (see the module docstring for the rule)."""
    ma, mb = measured(a), measured(b)
    na, nb = len(a.points), len(b.points)
    if na == nb:
        common = sorted(set(ma) & set(mb))
        return [ma[layer] for layer in common], [mb[layer] for layer in common], "same layers"
    swap = na > nb  # points come from the shallower model
    short, long_, n_short, n_long = (mb, ma, nb, na) if swap else (ma, mb, na, nb)
    xs = sorted(long_)
    depths = [relative_depth(layer, n_long) for layer in xs]
    at = [float(np.interp(relative_depth(layer, n_short), depths, [long_[x] for x in xs])) for layer in sorted(short)]
    mine = [short[layer] for layer in sorted(short)]
    return (at, mine, "relative depth") if swap else (mine, at, "relative depth")


def compare_profiles(a: Profile, b: Profile) -> RankCorrelation:
    x, y, method = align(a, b)
    return rank_correlation(x, y, method)


def correlation_matrix(profiles: Mapping[str, Profile]) -> dict[tuple[str, str], RankCorrelation]:
    """Every unordered pair of named profiles (keys in the order given)."""
    names = list(profiles)
    return {(p, q): compare_profiles(profiles[p], profiles[q])
            for i, p in enumerate(names) for q in names[i + 1:]}


def layer_ranks(values: Mapping[int, float]) -> dict[int, int]:
    """Rank 1 = the highest value; ties share the better rank."""
    ordered = sorted(values.values(), reverse=True)
    return {layer: ordered.index(v) + 1 for layer, v in values.items()}

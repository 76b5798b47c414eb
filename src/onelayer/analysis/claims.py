"""The study's claims, checked one by one against measurements: each a :class:`Claim` with our number, its 95%
interval and a verdict by a rule stated beside it.

Verdicts are three-way from the interval, never from the point alone: *reproduced* when the whole interval
lies where the claim says, *not reproduced* when it lies where the claim is false, *inconclusive* when it
straddles the line (more seeds, layers or eval examples would settle it); *not measured* when the runs it needs
are missing (the row says which). The lines are the study's own numbers where it gives one, else the
qualitative statement made numeric by the rule in the row.

Everything here is a pure function of profiles, correlations and estimates; :mod:`onelayer.experiments.claims`
reads them from scan, comparison and ensemble directories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..profile import Estimate, Profile
from .rank import RankCorrelation, measured, relative_depth

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_MEASURED = "reproduced", "not reproduced", "inconclusive", "not measured"


@dataclass(frozen=True)
class Claim:
    claim: str                # what the study says
    study: str                # the study's number ("" where it gives none)
    measure: str              # what was measured here
    estimate: Estimate | None  # our number with its 95% interval (None: not measured)
    verdict: str
    why: str                  # the reason for the verdict, with the numbers it rests on
    rule: str                 # the verdict rule
    source: str = ""          # where the number came from (scan, comparison or ensemble directory)
    unit: str = ""            # "points": an accuracy difference, shown x100
    ours: str = ""            # what the table shows instead of the estimate (a location, such as the peak's depth)


def side(estimate: Estimate, line: float, claim_above: bool = True) -> str:
    """The verdict of a claim that the quantity lies above ``line`` (or below it, ``claim_above=False``)."""
    if not (math.isfinite(estimate.low) and math.isfinite(estimate.high)):
        return INCONCLUSIVE
    above, below = estimate.low > line, estimate.high < line
    if claim_above:
        return REPRODUCED if above else NOT_REPRODUCED if below else INCONCLUSIVE
    return REPRODUCED if below else NOT_REPRODUCED if above else INCONCLUSIVE


def spearman_interval(rho: float, n: int, level: float = 0.95) -> Estimate:
    """Spearman's rho with a Fisher-z interval, variance 1.06 / (n - 3) (Fieller, Hartley and Pearson, 1957).
    It treats the ranked values as exact, so it omits the noise of the profiles themselves. A perfect ranking
    (|rho| = 1, where z is infinite) is taken one adjacent swap from perfect, the nearest value rho takes below 1
    (1 - 12 / (n^3 - n)): over 4 layers that interval still reaches below 0, as the exact p of 0.083 says it
    should; over 5 it does not (exact p 0.017). NaN below 4 pairs."""
    from scipy import stats

    if n < 4 or not math.isfinite(rho):
        return Estimate(rho, float("nan"), float("nan"))
    nearest = 1 - 12 / (n ** 3 - n)
    z = math.atanh(float(np.clip(rho, -nearest, nearest)))
    half = stats.norm.ppf((1 + level) / 2) * math.sqrt(1.06 / (n - 3))
    return Estimate(rho, math.tanh(z - half), math.tanh(z + half))


def _e(e: Estimate, digits: int = 3) -> str:
    return f"{e.value:+.{digits}f} [{e.low:+.{digits}f}, {e.high:+.{digits}f}]"


def _unreliable(profile: Profile) -> str:
    return "" if profile.reliable else f"full training's gain is within noise ({profile.warning}); "


def missing(claim: str, study: str, measure: str, rule: str, what: str) -> Claim:
    """A claim whose runs do not exist yet: ``what`` says which command would make them."""
    return Claim(claim, study, measure, None, NOT_MEASURED, what, rule)


DEPTH_RULE = ("peak = the measured layer of highest C; reproduced if it sits in the middle third of depth and beats "
              "the best measured layer of each outer third beyond noise (their difference's interval above 0); not "
              "reproduced if the best outer layer beats the best middle one beyond noise")


def depth_claim(profile: Profile) -> Claim:
    """The inverted U: gains concentrate in the middle layers."""
    num_layers = len(profile.points)
    claim, study, measure = ("RL gains concentrate in a few middle layers (an inverted U over depth)",
                             "peak in the middle layers", "relative depth of the best layer")
    values = {k: v for k, v in measured(profile).items() if math.isfinite(v)}
    thirds: dict[str, list[int]] = {"lower": [], "middle": [], "upper": []}
    for layer in values:
        d = relative_depth(layer, num_layers)
        thirds["lower" if d < 1 / 3 else "upper" if d > 2 / 3 else "middle"].append(layer)
    if not all(thirds.values()):
        return missing(claim, study, measure, DEPTH_RULE, "needs measured layers in each third of depth: scan more "
                       "layers (e.g. --layers every:3 or all)")
    best = {name: max(layers, key=lambda k: (values[k], -k)) for name, layers in thirds.items()}
    peak = max(values, key=lambda k: (values[k], -k))
    depth = relative_depth(peak, num_layers)
    where = next(name for name, layers in thirds.items() if peak in layers)
    diffs = {name: profile.difference(best["middle"], best[name]) for name in ("lower", "upper")}
    said = "; ".join(f"C({best['middle']}) - C({best[n]}) [{n} third's best] = {_e(d) if d else 'n/a'}"
                     for n, d in diffs.items())
    if not profile.differences:
        said += " (this profile.json has no layer differences, written by an older onelayer: onelayer profile SCAN)"
    if not profile.reliable:
        verdict = INCONCLUSIVE
    elif where == "middle" and all(d is not None and d.low > 0 for d in diffs.values()):
        verdict = REPRODUCED
    elif any(d is not None and d.high < 0 for d in diffs.values()):
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    why = (f"{_unreliable(profile)}peak at layer {peak}, the best of {len(values)} measured of {num_layers} ({where} "
           f"third, relative depth {depth:.2f}, C = {values[peak]:+.3f}); {said}")
    return Claim(claim, study, measure, None, verdict, why, DEPTH_RULE, ours=f"{depth:.2f} (layer {peak})")


BEST_RULE = ("reproduced if the best layer's C has its interval above 0.5 (most of the gain); not reproduced if below "
             "0.5; C's interval including 1 means matching full training within noise. The best of many noisy "
             "layers is biased upward (winner's curse)")


def best_layer_claim(profile: Profile) -> Claim:
    """One well-chosen layer recovers most of full training's gain (sometimes more)."""
    claim, study = ("one well-chosen layer recovers most of the full-parameter gain, sometimes more",
                    "most of the gain; sometimes C > 1")
    points = [p for p in profile.points if not p.interpolated and math.isfinite(p.contribution)]
    if not points:
        return missing(claim, study, "C of the best layer", BEST_RULE, "no measured layer: run onelayer scan")
    best = max(points, key=lambda p: (p.contribution, -p.layer))
    estimate = Estimate(best.contribution, best.low, best.high)
    verdict = side(estimate, 0.5) if profile.reliable else INCONCLUSIVE
    match = ("matches full training within noise" if best.low <= 1 <= best.high else
             "beats full training beyond noise" if best.low > 1 else "falls short of full training beyond noise")
    why = (f"{_unreliable(profile)}layer {best.layer}, the best of {len(points)} measured of {len(profile.points)}: "
           f"C = {_e(estimate)}; it {match}")
    return Claim(claim, study, f"C of the best layer (layer {best.layer})", estimate, verdict, why, BEST_RULE)


RATE_RULE = ("the worst quarter of the measured layers (by C at the full run's best rate), each one's gain in C from "
             "reading it at its own best rate instead: reproduced if every one's interval lies below 0.02, not "
             "reproduced if any one's lies above 0.02")


def rate_claim(profile: Profile) -> Claim:
    """Learning-rate insensitivity of the ranking: a higher rate barely moves the worst layers."""
    claim, study, measure = ("layer rankings are insensitive to the learning rate",
                             "3x the rate moves the worst layers by <= 0.02",
                             "largest own-rate gain among the worst quarter of layers")
    r = profile.robustness
    if r is None or not r.layers:
        return missing(claim, study, measure, RATE_RULE, "needs a scan with a learning-rate grid (--lr-grid 1,3)")
    ranked = sorted(r.layers, key=lambda c: (c.study.value, c.layer))
    worst = ranked[:max(1, len(ranked) // 4)]
    top = max(worst, key=lambda c: (c.gain.value, c.gain.high))  # shown: the largest gain among them
    gains = [c.gain for c in worst]
    if not profile.reliable or not all(math.isfinite(g.low) and math.isfinite(g.high) for g in gains):
        verdict = INCONCLUSIVE
    elif any(g.low > 0.02 for g in gains):
        verdict = NOT_REPRODUCED
    elif all(g.high < 0.02 for g in gains):
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    why = (f"{_unreliable(profile)}worst layers {', '.join(str(c.layer) for c in worst)} of {len(r.layers)}: gains "
           + ", ".join(f"{c.layer}: {_e(c.gain)}" for c in worst) + f"; layer {top.layer}'s own best rate is "
           f"{top.best_lr_scale:g}x; rank agreement of the two protocols: Spearman {r.spearman:+.2f}")
    return Claim(claim, study, measure, top.gain, verdict, why, RATE_RULE)


CORRELATION_RULE = ("Spearman's rho over the layers both profiles measured, 95% Fisher-z interval (it omits the "
                    "profiles' own noise; a perfect ranking counts as one swap from perfect): reproduced if the "
                    "interval lies above 0 (a shared ranking; 'weaker' when it also lies below the study's value); "
                    "not reproduced if it lies below the study's value and reaches 0; inconclusive when either "
                    "profile's full-training gain is within noise")


def correlation_claim(claim: str, study_value: float, correlation: RankCorrelation | None, note: str = "",
                      source: str = "", reliable: bool = True, study: str = "") -> Claim:
    """Layer rankings correlate (across tasks, or in and out of domain) at about ``study_value`` (``study``: how
    the study puts it, by default "Spearman <value>"). ``reliable``: whether both profiles are (full training's
    gain above noise in each); if not, the ranks mean nothing and the verdict is inconclusive, ``note`` saying
    why."""
    study = study or f"Spearman {study_value:.2f}"
    measure = "Spearman's rho of the two profiles"
    if correlation is None or not math.isfinite(correlation.spearman):
        return Claim(claim, study, measure, None, NOT_MEASURED if correlation is None else INCONCLUSIVE,
                     note or "the profiles share fewer than 3 measured layers, or one is constant", CORRELATION_RULE,
                     source)
    estimate = spearman_interval(correlation.spearman, correlation.n)
    if not reliable or not math.isfinite(estimate.low):
        verdict = INCONCLUSIVE
    elif estimate.low > 0:
        verdict = REPRODUCED
    elif estimate.high < study_value:
        verdict = NOT_REPRODUCED
    else:
        verdict = INCONCLUSIVE
    if verdict == REPRODUCED and estimate.high < study_value:
        verdict = f"{REPRODUCED} (weaker)"
    why = (f"rho = {_e(estimate, 2)} over {correlation.n} layers ({correlation.method})"
           + (f"; {note}" if note else ""))
    return Claim(claim, study, measure, estimate, verdict, why, CORRELATION_RULE, source)


LEVERAGE_RULE = ("Spearman's rho of a layer's relative weight change (its own single-layer run) against its C, "
                 "95% Fisher-z interval: not reproduced if it lies above 0 (layers that move more contribute more: "
                 "distance); reproduced if it reaches 0 or below and stays below 0.5 (no strong link); "
                 "inconclusive otherwise, or when full training's gain is within noise")


def leverage_claim(correlation: RankCorrelation | None, source: str = "", reliable: bool = True,
                   absent: str = "the scan's runs recorded no parameter change") -> Claim:
    """Middle layers do not move more than others: leverage, not distance. ``absent``: why there is no
    correlation, when there is none."""
    claim, study, measure = ("contributing layers do not move more than others (leverage, not distance)",
                             "no positive link of change and contribution", "Spearman's rho of change vs C")
    if correlation is None:
        return missing(claim, study, measure, LEVERAGE_RULE, absent)
    if not math.isfinite(correlation.spearman):
        return Claim(claim, study, measure, None, INCONCLUSIVE, "fewer than 3 layers, or a constant side",
                     LEVERAGE_RULE, source)
    estimate = spearman_interval(correlation.spearman, correlation.n)
    if not reliable or not math.isfinite(estimate.low):
        verdict = INCONCLUSIVE
    elif estimate.low > 0:
        verdict = NOT_REPRODUCED
    elif estimate.high < 0.5:
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    why = ("" if reliable else "full training's gain is within noise; ") + \
        f"rho = {_e(estimate, 2)} over {correlation.n} layers"
    return Claim(claim, study, measure, estimate, verdict, why, LEVERAGE_RULE, source)


STRATEGY_RULE = ("accuracy minus full training's, paired bootstrap over seeds and examples: reproduced if the "
                 "interval lies above 0, not reproduced if below")


def strategy_claim(label: str, gain: Estimate, seeds: int, study_points: float | None, source: str = "") -> Claim:
    """A layer-selection strategy beats full-parameter training (``study_points``: its gain in the study, in
    accuracy points, where the study gives one)."""
    kind = label.partition("*")[0]  # top:10*3: top:10 at 3x the rate
    what = ("training the top-k layers" if kind.startswith("top:") else
            "contribution-scaled learning rates" if kind == "lr-guided" else "training the geometric middle layers")
    study = f"{study_points:+.2f} points" if study_points is not None else "beats full"
    why = f"{label}: {gain.value * 100:+.2f} points [{gain.low * 100:+.2f}, {gain.high * 100:+.2f}] over {seeds} seed(s)"
    return Claim(f"{what} ({label}) beats full-parameter training", study, "accuracy gain over full training",
                 gain, side(gain, 0.0), why, STRATEGY_RULE, source, "points")


ENSEMBLE_RULE = ("vote accuracy of the specialists minus self-consistency's at the same k, paired bootstrap over "
                 "examples: reproduced if the interval lies above 0, not reproduced if below")


def ensemble_claim(gain: Estimate, ensemble: float, self_consistency: float, k: int, best_single: str = "",
                   source: str = "") -> Claim:
    """A majority vote of layer specialists beats self-consistency of one model."""
    why = (f"specialists {ensemble:.3f} vs self-consistency {self_consistency:.3f} at k = {k}: "
           f"{gain.value * 100:+.2f} points [{gain.low * 100:+.2f}, {gain.high * 100:+.2f}]"
           + (f"; {best_single}" if best_single else ""))
    return Claim("a majority vote of layer specialists beats self-consistency", "33.6 vs 31.3 (+2.3 points)",
                 "vote accuracy minus self-consistency's", gain, side(gain, 0.0), why, ENSEMBLE_RULE, source, "points")

import importlib
import math

import numpy as np
import pytest

from onelayer.analysis.contribution import (
    contribution,
    contribution_estimate,
    gain_estimate,
    interpolate,
    layer_profile,
    per_example_scores,
)
from onelayer.errors import OneLayerError


def test_contribution_by_hand():
    assert contribution(0.5, 0.2, 0.6) == pytest.approx(0.75)
    assert contribution(0.7, 0.2, 0.6) == pytest.approx(1.25)  # beats full training
    assert contribution(0.1, 0.2, 0.6) == pytest.approx(-0.25)  # worse than the start: kept negative
    assert math.isnan(contribution(0.3, 0.2, 0.2))


def test_seed_average_per_example():
    assert per_example_scores([[1, 0, 1], [0, 0, 1]]).tolist() == [0.5, 0.0, 1.0]
    with pytest.raises(OneLayerError):
        per_example_scores([[]])


def test_bootstrap_without_resampling_noise_is_exact():
    # every resample is the identity: the interval collapses onto the point estimate
    base, full, layer = np.array([0.0, 0, 1, 0]), np.array([1.0, 1, 1, 0]), np.array([1.0, 0, 1, 0])
    identity = np.tile(np.arange(4), (5, 1))
    g = gain_estimate(base, full, identity)
    assert (g.value, g.low, g.high) == (0.5, 0.5, 0.5)
    c = contribution_estimate(base, full, layer, identity)
    assert (c.value, c.low, c.high) == (0.5, 0.5, 0.5)  # (0.5 - 0.25) / (0.75 - 0.25)


def test_interpolation_marks_and_fills():
    out = interpolate({0: 0.0, 3: 0.9, 6: 0.3}, 8)
    assert [round(v, 6) for v, _ in out] == [0.0, 0.3, 0.6, 0.9, 0.7, 0.5, 0.3, 0.3]
    assert [flag for _, flag in out] == [False, True, True, False, True, True, False, True]
    with pytest.raises(OneLayerError):
        interpolate({9: 1.0}, 8)


def test_profile_is_flagged_when_full_training_gained_nothing():
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 2, 200).tolist()]
    full = [list(base[0])]
    full[0][0] = 1 - full[0][0]  # one example differs: a gain far inside the noise
    profile = layer_profile(base, full, {1: full, 3: base}, 5, n_resamples=300)
    assert not profile.reliable and "within noise" in profile.warning


def test_profile_is_flagged_when_full_training_lost_accuracy():
    """A significant loss makes C(l) rank the most harmful layers first: flagged, not read as gains."""
    n = 400
    base = [[1] * (n // 2) + [0] * (n // 2)]
    full = [[0] * n]  # -0.5
    profile = layer_profile(base, full, {0: full, 2: base}, 4, n_resamples=300)
    assert profile.full_gain.high < 0
    assert not profile.reliable and "lowered the metric" in profile.warning and "--lr" in profile.warning
    assert {p.layer: p.contribution for p in profile.points}[0] == pytest.approx(1.0)


def test_profile_with_a_real_gain():
    n = 400
    base = [[0] * n]
    full = [[1] * (n // 2) + [0] * (n // 2)]  # +0.5
    layer2 = [[1] * (n // 4) + [0] * (3 * n // 4), [1] * (n // 4) + [0] * (3 * n // 4)]  # +0.25 in both seeds
    profile = layer_profile(base, full, {0: base, 2: layer2}, 4, n_resamples=500)
    assert profile.reliable and profile.warning == ""
    assert profile.full_gain.value == pytest.approx(0.5)
    c = {p.layer: p for p in profile.points}
    assert c[2].contribution == pytest.approx(0.5) and c[2].low < 0.5 < c[2].high and not c[2].interpolated
    assert c[1].contribution == pytest.approx(0.25) and c[1].interpolated
    assert c[3].contribution == pytest.approx(0.5) and c[3].interpolated
    with pytest.raises(OneLayerError, match="same eval examples"):
        layer_profile(base, full, {1: [[0] * 10]}, 4)


# Four examples and six fixed resamples (rows of example indices). By hand, per resample (S_base, S_full, S_layer):
# (.25, .75, .5) -> C 0.5; (0, 1, .5) -> 0.5; (.25, 1, 1) -> 1.0; (.25, .75, .25) -> 0; (0, 0, 0) -> dropped
# (full gained 0); (0, 1, .25) -> 0.25. Sorted: 0, .25, .5, .5, 1. The gains S_full - S_base: .5, 1, .75, .5, 0, 1.
BASE, FULL, LAYER = np.array([0.0, 0, 1, 0]), np.array([1.0, 1, 1, 0]), np.array([1.0, 0, 1, 0])
PLAN = np.array([[0, 1, 2, 3], [0, 0, 1, 1], [0, 0, 0, 2], [1, 1, 2, 3], [3, 3, 3, 3], [0, 1, 1, 1]])


def test_interval_ends_from_a_fixed_resample_plan_by_hand():
    c = contribution_estimate(BASE, FULL, LAYER, PLAN)
    # 95%: percentiles 2.5 and 97.5 of the 5 finite values, linear between order statistics at 0.1 and 3.9
    assert c.value == pytest.approx(0.5)
    assert c.low == pytest.approx(0 + 0.1 * 0.25) and c.high == pytest.approx(0.5 + 0.9 * 0.5)
    c90 = contribution_estimate(BASE, FULL, LAYER, PLAN, level=0.9)  # at 0.2 and 3.8
    assert c90.low == pytest.approx(0.05) and c90.high == pytest.approx(0.9)
    g = gain_estimate(BASE, FULL, PLAN)  # 6 values, order statistics at 0.125 and 4.875
    assert (g.value, g.low, g.high) == pytest.approx((0.5, 0.0625, 1.0))


def test_the_bootstrap_is_paired_one_resample_for_base_full_and_layer():
    # resampling the layer's examples apart from base's and full's would give other values
    shuffled = contribution_estimate(BASE, FULL, LAYER[[1, 0, 3, 2]], PLAN)
    assert (shuffled.low, shuffled.high) != pytest.approx((0.025, 0.95))
    assert contribution_estimate(BASE, FULL, LAYER, PLAN[:, ::-1]).low == pytest.approx(0.025)  # order within a row


def test_a_profile_uses_the_plan_for_every_layer_and_its_level(monkeypatch):
    contribution_module = importlib.import_module("onelayer.analysis.contribution")  # the package exports a
    # function of the same name
    monkeypatch.setattr(contribution_module, "bootstrap_indices", lambda n, r, seed: PLAN)
    profile = layer_profile([BASE], [FULL], {0: [LAYER], 2: [BASE]}, 3)
    points = {p.layer: p for p in profile.points}
    assert (points[0].low, points[0].high) == pytest.approx((0.025, 0.95))
    assert points[2].contribution == 0 and (points[2].low, points[2].high) == (0, 0)
    assert points[1].interpolated and points[1].high == pytest.approx(0.475)  # halfway between layers 0 and 2
    assert profile.full_gain.low == pytest.approx(0.0625) and profile.reliable  # the gain's low end is above 0
    narrow = layer_profile([BASE], [FULL], {0: [LAYER]}, 1, level=0.9)
    assert narrow.points[0].low == pytest.approx(0.05)


@pytest.mark.parametrize("plan, reliable", [
    (PLAN, True),  # the gain's interval is [0.0625, 1]
    (np.array([[3, 3, 3, 3]] * 2 + [[0, 1, 2, 3]] * 4), False),  # gains 0, 0, .5 x 4: low end exactly 0
    (np.array([[2, 2, 2, 2]] + [[0, 1, 2, 3]] * 5), True),  # gains 0, .5 x 5: low end 0.0625
])
def test_a_profile_is_reliable_only_when_the_gains_low_end_is_above_zero(monkeypatch, plan, reliable):
    contribution_module = importlib.import_module("onelayer.analysis.contribution")
    monkeypatch.setattr(contribution_module, "bootstrap_indices", lambda n, r, seed: plan)
    profile = layer_profile([BASE], [FULL], {0: [LAYER]}, 1)
    assert profile.reliable is reliable and (profile.warning == "") is reliable
    assert profile.full_gain.value == pytest.approx(0.5)


# Two seeds, four examples, four fixed resamples (example rows, and seed draws u: seed floor(2u)). Per-seed means of
# each resample by hand (base has one run):
#   resample          base   full s0  full s1  layer s0  layer s1   seeds drawn
#   [0,1,2,3]         .25    .75      .5       .5        .25        (.1, .6) -> 0, 1
#   [0,0,2,2]         .5     1        1        1         .5         (.2, .3) -> 0, 0
#   [1,1,3,3]         0      .5       0        0         0          (.7, .9) -> 1, 1
#   [0,1,2,3]         .25    .75      .5       .5        .25        (.6, .4) -> 1, 0
# so per resample (S_base, S_full, S_layer) = (.25, .625, .375), (.5, 1, 1), (0, 0, 0), (.25, .625, .375):
# C = 1/3, 1, dropped (full gained 0), 1/3; gains .375, .5, 0, .375.
TWO_SEEDS = {"base": [[0.0, 0, 1, 0]], "full": [[1.0, 1, 1, 0], [1.0, 0, 1, 0]], "layer": [[1.0, 0, 1, 0], [0.0, 0, 1, 0]]}
EXAMPLES = np.array([[0, 1, 2, 3], [0, 0, 2, 2], [1, 1, 3, 3], [0, 1, 2, 3]])
SEEDS = np.array([[0.1, 0.6], [0.2, 0.3], [0.7, 0.9], [0.6, 0.4]])


def _fixed_plan(monkeypatch, examples, seeds):
    module = importlib.import_module("onelayer.analysis.contribution")
    monkeypatch.setattr(module, "bootstrap_indices", lambda n, r, seed: examples)
    monkeypatch.setattr(module, "seed_draws", lambda k, r, seed: seeds if k > 1 else None)


def test_the_hierarchical_bootstrap_resamples_seeds_then_examples_by_hand(monkeypatch):
    from onelayer.analysis.contribution import ResamplePlan

    plan = ResamplePlan(EXAMPLES, SEEDS)
    assert plan.means(TWO_SEEDS["full"]).tolist() == [0.625, 1.0, 0.0, 0.625]
    assert plan.means(TWO_SEEDS["base"]).tolist() == [0.25, 0.5, 0.0, 0.25]
    assert ResamplePlan(EXAMPLES).means(TWO_SEEDS["full"]).tolist() == [0.625, 1.0, 0.25, 0.625]  # seeds averaged
    _fixed_plan(monkeypatch, EXAMPLES, SEEDS)
    profile = layer_profile(TWO_SEEDS["base"], TWO_SEEDS["full"], {0: TWO_SEEDS["layer"]}, 1)
    point = profile.points[0]
    # point: S_full = .625, S_layer = .375, S_base = .25 -> 1/3. Finite resamples sorted 1/3, 1/3, 1: the 2.5th and
    # 97.5th percentiles sit at order statistics 0.05 and 1.95
    assert point.contribution == pytest.approx(1 / 3)
    assert point.low == pytest.approx(1 / 3) and point.high == pytest.approx(1 / 3 + 0.95 * (2 / 3))
    # gains sorted 0, .375, .375, .5: order statistics 0.075 and 2.925
    g = profile.full_gain
    assert (g.value, g.low, g.high) == pytest.approx((0.375, 0.075 * 0.375, 0.375 + 0.925 * 0.125))
    assert profile.seeds == 2 and "hierarchical" in profile.method and "seed" in profile.method
    assert not any("omit training noise" in n for n in profile.notes)
    assert any("only 2 seeds" in n for n in profile.notes)


def test_with_seeds_averaged_the_interval_omits_training_noise_and_says_so(monkeypatch):
    _fixed_plan(monkeypatch, EXAMPLES, None)
    # seeds averaged first: per resample (S_base, S_full, S_layer) = (.25, .625, .375), (.5, 1, .75), (0, .25, 0),
    # (.25, .625, .375): C = 1/3, .5, 0, 1/3 -> sorted 0, 1/3, 1/3, .5
    profile = layer_profile(TWO_SEEDS["base"], [np.mean(TWO_SEEDS["full"], axis=0)],
                            {0: [np.mean(TWO_SEEDS["layer"], axis=0)]}, 1)
    assert profile.points[0].low == pytest.approx(0.075 / 3) and profile.points[0].high == pytest.approx(
        1 / 3 + 0.925 / 6)
    assert profile.seeds == 1 and profile.seed_rank_correlation is None
    assert any("omit training noise" in n and "--seeds 2" in n for n in profile.notes)


def test_the_seed_rank_correlation_of_a_two_seed_profile_by_hand():
    # base 0; full 0.5 (seed 0) and 1.0 (seed 1). Per seed C: layer 0 .5/.75, layer 1 0/1, layer 2 1/.25,
    # layer 3 1.5/.5: seed 0 (.5, 0, 1, 1.5) ranks 2,1,3,4; seed 1 (.75, 1, .25, .5) ranks 3,4,1,2;
    # sum d^2 = 1 + 9 + 4 + 4 = 18: rho = 1 - 6 * 18 / (4 * 15) = -0.8
    base = [[0, 0, 0, 0]]
    full = {0: [1, 1, 0, 0], 1: [1, 1, 1, 1]}
    layers = {0: {0: [1, 0, 0, 0], 1: [1, 1, 1, 0]}, 1: {0: [0, 0, 0, 0], 1: [1, 1, 1, 1]},
              2: {0: [1, 1, 0, 0], 1: [1, 0, 0, 0]}, 3: {0: [1, 1, 1, 0], 1: [1, 1, 0, 0]}}
    profile = layer_profile(base, full, layers, 4, n_resamples=50)
    assert profile.seed_rank_correlation == pytest.approx(-0.8)
    # the pooled profile: S_full .75, layers .5, .5, .375, .625 -> C 2/3, 2/3, 1/2, 5/6
    assert [p.contribution for p in profile.points] == pytest.approx([2 / 3, 2 / 3, 0.5, 5 / 6])
    # seeds are paired by name, not position: a layer with only seed 1 is compared with seed 1
    partial = layer_profile(base, full, {**layers, 3: {1: [1, 1, 0, 0]}}, 4, n_resamples=50)
    assert partial.seed_rank_correlation == pytest.approx(-1.0)  # layers 0-2: (.5, 0, 1) vs (.75, 1, .25)


# One seed, base 0, four examples, a grid of two rates. Resamples [0,1,2,3], [0,0,0,0], [2,2,2,2], [1,1,3,3]:
#   full 1x [1,1,0,0]: .5, 1, 0, .5     full 3x [1,1,1,0]: .75, 1, 1, .5  -> picked 3x, 1x (tie), 3x, 1x (tie)
#   layer A 1x [1,0,0,0]: .25, 1, 0, 0    3x [0,0,0,0]: 0, 0, 0, 0
GRID_PLAN = np.array([[0, 1, 2, 3], [0, 0, 0, 0], [2, 2, 2, 2], [1, 1, 3, 3]])
GRID_FULL = {1.0: [[1, 1, 0, 0]], 3.0: [[1, 1, 1, 0]]}
GRID_LAYERS = {0: {1.0: [[1, 0, 0, 0]], 3.0: [[0, 0, 0, 0]]},          # A
          1: {1.0: [[1, 0, 0, 0]], 3.0: [[1, 1, 0, 0]]},          # B: study 2/3, best 2/3 (3x)
          2: {1.0: [[1, 1, 1, 0]], 3.0: [[1, 0, 0, 0]]}}          # C: study 1/3, best 1 (1x)


def test_the_study_and_best_rate_protocols_by_hand(monkeypatch):
    from onelayer.analysis.contribution import contribution_profile

    _fixed_plan(monkeypatch, GRID_PLAN, None)
    study = contribution_profile([[0, 0, 0, 0]], GRID_FULL, GRID_LAYERS, 3)
    best = contribution_profile([[0, 0, 0, 0]], GRID_FULL, GRID_LAYERS, 3, protocol="best")
    assert study.full_lr_scale == best.full_lr_scale == 3.0  # full: .75 at 3x beats .5 at 1x
    # full per resample: the best rate of that resample, max(.5, .75), max(1, 1), max(0, 1), max(.5, .5)
    assert (study.full_gain.value, study.full_gain.low) == pytest.approx((0.75, 0.5 + 0.075 * 0.25))
    a = study.points[0]
    # layer A under the study protocol: at the rate full picked in each resample: 0 (3x), 1 (1x), 0 (3x), 0 (1x)
    # over 0.75, 1, 1, 0.5 -> C 0, 1, 0, 0: point 0 (3x), interval ends at order statistics 0.075 and 2.925
    assert (a.contribution, a.low, a.high, a.lr_scale) == pytest.approx((0.0, 0.0, 0.925, 3.0))
    # best: its own best rate in each resample, max(.25, 0), 1, 0, 0 -> C 1/3, 1, 0, 0; point .25/.75 at 1x
    b = best.points[0]
    assert (b.contribution, b.low, b.high, b.lr_scale) == pytest.approx((1 / 3, 0.0, 1 / 3 + 0.925 * 2 / 3, 1.0))
    choices = {c.layer: c for c in study.robustness.layers}
    # gain of its own rate (best - study per resample): 1/3, 0, 0, 0 -> sorted 0, 0, 0, 1/3: high at 2.925 -> 0.925 / 3
    assert (choices[0].gain.value, choices[0].gain.low, choices[0].gain.high) == pytest.approx((1 / 3, 0, 0.925 / 3))
    assert [(c.rank_study, c.rank_best, c.best_lr_scale) for c in study.robustness.layers] == [
        (3, 3, 1.0), (1, 2, 3.0), (2, 1, 1.0)]
    # study (0, 2/3, 1/3) vs best (1/3, 2/3, 1): ranks 1,3,2 vs 1,2,3, sum d^2 = 2: rho = 0.5
    assert study.robustness.spearman == pytest.approx(0.5) and study.robustness.rate_dependent == [1, 2]
    assert best.robustness == study.robustness and any("biases" in n for n in best.notes)
    assert "picked again inside each resample" in study.method


def test_differences_between_layers_come_from_the_same_resamples(monkeypatch):
    from onelayer.analysis.contribution import contribution_profile

    _fixed_plan(monkeypatch, GRID_PLAN, None)
    study = contribution_profile([[0, 0, 0, 0]], GRID_FULL, GRID_LAYERS, 3)
    # B under the study protocol per resample: .5 (3x), 1 (1x), 0 (3x), 0 (1x) over .75, 1, 1, .5 -> 2/3, 1, 0, 0;
    # B - A = 2/3, 0, 0, 0: point 2/3, interval [0, 0.925 * 2/3]: not distinguishable (the low end is 0)
    d = study.difference(1, 0)
    assert (d.value, d.low, d.high) == pytest.approx((2 / 3, 0.0, 0.925 * 2 / 3))
    back = study.difference(0, 1)
    assert (back.value, back.low, back.high) == pytest.approx((-2 / 3, -0.925 * 2 / 3, 0.0))
    assert len(study.differences) == 3 and study.difference(0, 7) is None


def test_area_under_the_curve_is_the_mean_score_over_training_by_hand():
    from onelayer.analysis.contribution import area_under_curve

    # steps 0, 10, 30: ex0 scores 0, 1, 1 -> (0+1)/2*10 + (1+1)/2*20 = 25 -> /30; ex1 1, 0, 1 -> 5 + 10 = 15 -> /30
    assert area_under_curve([0, 10, 30], [[0, 1], [1, 0], [1, 1]]).tolist() == pytest.approx([25 / 30, 0.5])
    assert area_under_curve([0, 30], [[0, 1], [1, 1]]).tolist() == [0.5, 1.0]  # two points: their mean
    with pytest.raises(OneLayerError, match="increasing steps"):
        area_under_curve([0, 0], [[1], [1]])


def test_top_k_says_which_chosen_layers_are_distinguishable_from_the_next(monkeypatch):
    from onelayer.layers import top_separation
    from onelayer.profile import Estimate, LayerDifference, LayerPoint, Profile

    points = tuple(LayerPoint(i, c, 0, 1, False) for i, c in enumerate([0.9, 0.8, 0.7, 0.2]))
    differences = (LayerDifference(0, 3, 0.7, 0.1, 1.2), LayerDifference(1, 3, 0.6, -0.1, 1.0),
                   LayerDifference(2, 3, 0.5, 0.05, 0.9), LayerDifference(0, 2, 0.2, -0.2, 0.5),
                   LayerDifference(1, 2, 0.1, -0.3, 0.4))
    profile = Profile(points, Estimate(0.3, 0.2, 0.4), True, "", differences=differences)
    assert top_separation(profile, 3) == ("against the next measured layer (3, C = 0.200): layers 0,2 are above it "
                                          "beyond noise (the interval of the difference excludes 0); layer 1 is not "
                                          "distinguishable from it")
    assert top_separation(profile, 2).endswith("layers 0-1 are not distinguishable from it")
    assert "nothing to tell them apart" in top_separation(profile, 4)
    assert "older onelayer" in top_separation(Profile(points, profile.full_gain, True, ""), 1)

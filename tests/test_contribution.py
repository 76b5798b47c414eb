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

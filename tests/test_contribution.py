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

"""GiGPO advantages against numbers worked out by hand."""

import math

import pytest
import torch

from onelayer.algorithms import grpo_advantages
from onelayer.algorithms.gigpo import (
    anchor_key,
    discounted_returns,
    episode_advantages,
    episode_grpo_advantages,
    gigpo_advantages,
    step_advantages,
)

# Three episodes from one seed. States: A (the start, shared by all), B (reached by 0 and 1), C and D
# (each seen once). Rewards: 0 and 1 reach the goal (reward 1 on their last step), 2 does not.
REWARDS = [[0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0]]
OBS = [["room A", "room B"], ["room A", "room C", "room  B\n"], ["room A", "room D"]]
ANCHORS = [[anchor_key(o) for o in ep] for ep in OBS]


def test_discounted_returns_by_hand():
    assert discounted_returns([0.0, 0.0, 1.0], 0.5) == [0.25, 0.5, 1.0]
    assert discounted_returns([1.0, -0.1, 2.0], 0.9) == pytest.approx([1 - 0.09 + 1.62, -0.1 + 1.8, 2.0])
    assert discounted_returns([], 0.9) == []


def test_anchor_states_ignore_whitespace_only():
    assert anchor_key("room  B\n") == anchor_key("room B") != anchor_key("room b")


def test_step_advantages_within_anchor_groups_singletons_get_zero():
    returns = [discounted_returns(r, 0.5) for r in REWARDS]  # [[.5, 1], [.25, .5, 1], [0, 0]]
    # anchor A: returns .5, .25, 0 -> mean .25 -> .25, 0, -.25; B: 1 and 1 -> 0; C, D: alone -> 0
    assert step_advantages(returns, ANCHORS, "mean") == [[0.25, 0.0], [0.0, 0.0, 0.0], [-0.25, 0.0]]
    # with std: A's std is .25 (unbiased), so 1, 0, -1
    std = step_advantages(returns, ANCHORS, "std")
    assert std[0] == pytest.approx([1.0, 0.0], abs=1e-5) and std[2] == pytest.approx([-1.0, 0.0], abs=1e-5)
    with pytest.raises(ValueError, match="anchors"):
        step_advantages(returns, [ANCHORS[0], ANCHORS[1][:2], ANCHORS[2]])


def test_gigpo_combined_advantages_by_hand():
    # episode returns 1, 1, 0: mean 2/3 -> A^E = 1/3, 1/3, -2/3 (mean-only)
    mean_mode = gigpo_advantages(REWARDS, ANCHORS, gamma=0.5, omega=1.0, normalize="mean")
    assert mean_mode[0] == pytest.approx([1 / 3 + 0.25, 1 / 3])
    assert mean_mode[1] == pytest.approx([1 / 3] * 3)
    assert mean_mode[2] == pytest.approx([-2 / 3 - 0.25, -2 / 3])
    assert gigpo_advantages(REWARDS, ANCHORS, 0.5, 2.0, "mean")[0][0] == pytest.approx(1 / 3 + 0.5)
    # with std: the returns' unbiased std is sqrt(1/3), so A^E = 1/sqrt(3) * (1, 1, -2); A's A^S = 1, 0, -1
    e = 1 / math.sqrt(3)
    std_mode = gigpo_advantages(REWARDS, ANCHORS, gamma=0.5, omega=1.0, normalize="std")
    assert std_mode[0] == pytest.approx([e + 1, e], abs=1e-5)
    assert std_mode[1] == pytest.approx([e, e, e], abs=1e-5)
    assert std_mode[2] == pytest.approx([-2 * e - 1, -2 * e], abs=1e-5)


def test_episode_level_only_is_grpo_on_whole_episodes():
    returns = torch.tensor([1.0, 1.0, 0.0])
    assert episode_advantages(returns, "std").tolist() == pytest.approx(grpo_advantages(returns, 3).tolist(), abs=1e-5)
    per_turn = episode_grpo_advantages(REWARDS, "mean")
    assert [len(a) for a in per_turn] == [2, 3, 2]
    assert [a[0] for a in per_turn] == pytest.approx([1 / 3, 1 / 3, -2 / 3]) and all(len(set(a)) == 1 for a in per_turn)


def test_groups_without_spread_get_exactly_zero():
    # 0.3 repeated: a float32 mean misses it by an ulp, which a std of the same size used to blow up
    flat = torch.full((8,), 0.3)
    assert grpo_advantages(flat, 8).abs().max().item() == 0.0
    assert episode_advantages(flat.double(), "std").abs().max().item() == 0.0
    same = [[0.1, 0.2], [0.1, 0.2]]
    assert gigpo_advantages(same, [["a", "b"], ["a", "b"]]) == [[0.0, 0.0], [0.0, 0.0]]


def test_turn_advantages_count_only_turns_that_share_their_state():
    from onelayer.algorithms.gigpo import turn_advantages

    # A is seen by all three episodes, B by two, C and D once: 5 of the 7 turns are anchored; the second group (a
    # copy) adds as many; without step-level advantages nothing is counted
    advantages, anchored = turn_advantages(REWARDS * 2, OBS * 2, 3, step_level=True, gamma=0.5, normalize="mean")
    assert anchored == 10
    assert advantages[:3] == advantages[3:] == gigpo_advantages(REWARDS, ANCHORS, 0.5, 1.0, "mean")
    assert turn_advantages(REWARDS, OBS, 3, step_level=False)[1] == 0

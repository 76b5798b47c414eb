import math

import pytest
import torch

from onelayer.algorithms import (
    Normalizer,
    aggregate,
    dr_grpo_advantages,
    get_algorithm,
    grpo_advantages,
    k3_kl,
    policy_loss,
    zero_signal_fraction,
)
from onelayer.errors import OneLayerError


def test_grpo_advantages_by_hand():
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    # group 2: all equal -> 0 (no signal)
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    expected = [0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)


def test_grpo_advantages_three_values():
    # r = 0, 1, 5: mean 2, std sqrt((4 + 1 + 9) / 2) = sqrt(7) = 2.645751
    adv = grpo_advantages(torch.tensor([0.0, 1.0, 5.0]), group_size=3, eps=0.0)
    assert adv.tolist() == pytest.approx([-2 / math.sqrt(7), -1 / math.sqrt(7), 3 / math.sqrt(7)], abs=1e-6)


def test_dr_grpo_advantages_are_mean_centred_only():
    adv = dr_grpo_advantages(torch.tensor([0.0, 1.0, 5.0, 3.0, 3.0, 3.0]), group_size=3)
    assert adv.tolist() == pytest.approx([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])


def test_zero_signal_fraction():
    assert zero_signal_fraction(torch.tensor([1.0, 1, 0, 1, 0, 0, 2, 2]), 2) == 0.75


def test_bad_group_shape():
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(5), 2)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregations_by_hand():
    assert aggregate(PER_TOKEN, MASK, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(PER_TOKEN, MASK, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))
    norm = Normalizer(num_sequences=4, num_tokens=8, max_len=5)
    assert aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm", norm).item() == pytest.approx(10 / 20)
    assert aggregate(PER_TOKEN, MASK, "token-mean", norm).item() == pytest.approx(10 / 8)
    assert aggregate(PER_TOKEN, MASK, "seq-mean-token-mean", norm).item() == pytest.approx(6 / 4)
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, MASK, "sum")


def test_clipped_objective_by_hand():
    old = torch.zeros(2, 1)
    new = torch.log(torch.tensor([[1.5], [1.5]]))
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(new, old, adv, torch.ones(2, 1), "token-mean")
    # A=+1: min(1.5, 1.2) = 1.2 -> -1.2 ; A=-1: min(-1.5, -1.2) = -1.5 -> +1.5 ; mean 0.15
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clip_fraction"].item() == 0.5
    assert stats["ratio_mean"].item() == pytest.approx(1.5)


def test_asymmetric_clip():
    new = torch.log(torch.tensor([[1.5]]))
    loss, _ = policy_loss(new, torch.zeros(1, 1), torch.tensor([2.0]), torch.ones(1, 1), "token-mean",
                          clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.28 * 2)


def test_the_lower_clip_bound_binds_a_negative_advantage_below_one():
    # ratio 0.5, A = -1: min(-0.5, -(1 - 0.2)) = -0.8 -> loss +0.8, clipped; ratio 0.5, A = +1: min(0.5, 0.8) = 0.5
    new = torch.log(torch.tensor([[0.5], [0.5]]))
    loss, stats = policy_loss(new, torch.zeros(2, 1), torch.tensor([-1.0, 1.0]), torch.ones(2, 1), "token-mean",
                              clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((0.8 - 0.5) / 2)
    assert stats["clip_fraction"].item() == 0.5
    loss, _ = policy_loss(new[:1], torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), "token-mean",
                          clip_low=0.4)
    assert loss.item() == pytest.approx(0.6)


def test_one_update_has_ratio_one_and_the_policy_gradient():
    logits = torch.tensor([[0.3, -0.2, 0.9]], requires_grad=True)
    logp = torch.log_softmax(logits, -1)  # treat the 3 entries as 3 tokens of one sequence
    loss, stats = policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 3), "seq-mean-token-mean")
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_fraction"].item() == 0.0
    loss.backward()
    expected = torch.autograd.grad(-(2.0 * torch.log_softmax(logits, -1)).mean(), logits)[0]
    assert torch.allclose(logits.grad, expected)


def test_k3_kl_by_hand():
    new, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    # delta = ref - new = log 0.5; exp(delta) - delta - 1 = 0.5 + 0.693147 - 1
    assert k3_kl(new, ref).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    loss, stats = policy_loss(new[None], new[None].detach(), torch.tensor([0.0]), torch.ones(1, 1), "token-mean",
                              logp_ref=ref[None], beta=0.1)
    assert loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1), abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(mode):
    torch.manual_seed(0)
    w = torch.randn(4, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    full, _ = policy_loss(torch.log_softmax(w, -1), torch.zeros(4, 5), adv, mask, mode)
    g_full = torch.autograd.grad(full, w)[0]
    norm = Normalizer(4, int(mask.sum()), 5)
    g_acc = torch.zeros_like(w)
    for rows in (slice(0, 1), slice(1, 4)):
        part, _ = policy_loss(torch.log_softmax(w, -1)[rows], torch.zeros(4, 5)[rows], adv[rows], mask[rows], mode,
                              norm=norm)
        g_acc += torch.autograd.grad(part, w)[0]
    assert torch.allclose(g_full, g_acc, atol=1e-6)


def test_algorithm_registry():
    assert get_algorithm("grpo").default_aggregation == "seq-mean-token-mean"
    assert get_algorithm("Dr-GRPO").default_aggregation == "seq-mean-token-sum-norm"
    assert get_algorithm("GiGPO").step_level and get_algorithm("gigpo").advantages is None
    with pytest.raises(OneLayerError, match="unknown algorithm 'ppo': use one of grpo, dr_grpo, gigpo"):
        get_algorithm("ppo")

"""Advantages: how much better each completion did than its group.

Rewards arrive flat, ``[num_prompts * group_size]``, the ``group_size`` completions of one prompt
contiguous (the order rollouts produce them in).
"""

from __future__ import annotations

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    # float64 stays float64 (GiGPO's returns); anything else computes in float32
    return (rewards if rewards.dtype == torch.float64 else rewards.float()).view(-1, group_size)


def _centred(grouped: torch.Tensor) -> torch.Tensor:
    """``r - mean(r)`` per group, exactly 0 where a group's rewards are all equal: a float mean of
    equal values can miss them by an ulp, and dividing that by a std of the same size would turn
    a group with no signal into advantages of +-1."""
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    flat = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return centred.masked_fill(flat, 0.0)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): ``(r - mean(r)) / (std(r) + eps)`` within each group.

    ``std`` is the unbiased sample std (Bessel's correction), as in TRL's and verl's GRPO. A group of
    one has no spread and gets advantage 0.
    """
    grouped = _grouped(rewards, group_size)
    centred = _centred(grouped)
    if group_size == 1:
        return centred.view(-1)
    return (centred / (grouped.std(dim=1, keepdim=True) + eps)).view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): ``r - mean(r)``; no division by the std, which up-weights
    too-easy and too-hard prompts."""
    return _centred(_grouped(rewards, group_size)).view(-1)


def zero_signal_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal: their advantages are 0, so they teach nothing."""
    grouped = _grouped(rewards, group_size)
    return (grouped == grouped[:, :1]).all(dim=1).float().mean().item()

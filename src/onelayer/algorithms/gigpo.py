"""GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training") as pure
functions over one group of episodes started from the same environment state.

- Episode level: ``A^E_i = (R_i - mean_j R_j) / F`` over the group's episode returns.
- Step level: steps whose observations are identical (after :func:`normalize_observation`) across
  the group's episodes form an anchor group; each step's discounted return
  ``R_t = sum_{k>=t} gamma^(k-t) r_k`` is compared within its anchor group:
  ``A^S = (R_t - mean) / F``; a step alone in its anchor group gets 0.
- Combined: ``A = A^E + omega * A^S``, applied to every token of that step's action.

``F`` is the unbiased std plus ``eps`` (``normalize="std"``, the reference's default) or 1
(``normalize="mean"``). Defaults ``gamma=0.95`` and ``omega=1`` follow the reference code.
GRPO on whole episodes is :func:`episode_advantages` alone, broadcast to every step.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import torch

from .advantages import dr_grpo_advantages, grpo_advantages

NORMALIZATIONS = ("std", "mean")


def _centred(values: torch.Tensor, normalize: str, eps: float) -> torch.Tensor:
    """One group's values compared as GRPO (``std``) or Dr. GRPO (``mean``) compare rewards: a group
    of one, or of equal values, gets 0."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation '{normalize}': use std or mean")
    size = values.numel()
    return grpo_advantages(values, size, eps) if normalize == "std" else dr_grpo_advantages(values, size)


def episode_advantages(returns: torch.Tensor, normalize: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """``[N]`` episode returns of one group -> ``[N]`` episode-level advantages."""
    return _centred(returns, normalize, eps)


def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """``R_t = r_t + gamma * R_{t+1}`` for one episode's step rewards."""
    out, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def normalize_observation(text: str) -> str:
    """Whitespace collapsed and ends stripped: observations equal up to layout are one state."""
    return re.sub(r"\s+", " ", text).strip()


def anchor_key(observation: str) -> str:
    """Hash of the normalised observation: the anchor-state identity."""
    return hashlib.sha1(normalize_observation(observation).encode()).hexdigest()


def step_advantages(step_returns: list[list[float]], anchors: list[list[str]], normalize: str = "std",
                    eps: float = 1e-6) -> list[list[float]]:
    """Per-step advantages within anchor groups. ``step_returns[i][t]`` and ``anchors[i][t]`` are
    episode ``i``'s discounted return and anchor key at step ``t``."""
    members: dict[str, list[tuple[int, int]]] = {}
    for i, keys in enumerate(anchors):
        if len(keys) != len(step_returns[i]):
            raise ValueError(f"episode {i} has {len(keys)} anchors for {len(step_returns[i])} steps")
        for t, key in enumerate(keys):
            members.setdefault(key, []).append((i, t))
    out = [[0.0] * len(r) for r in step_returns]
    for group in members.values():
        values = torch.tensor([step_returns[i][t] for i, t in group], dtype=torch.float64)
        for (i, t), advantage in zip(group, _centred(values, normalize, eps).tolist(), strict=True):
            out[i][t] = advantage
    return out


def gigpo_advantages(step_rewards: list[list[float]], anchors: list[list[str]], gamma: float = 0.95,
                     omega: float = 1.0, normalize: str = "std", eps: float = 1e-6) -> list[list[float]]:
    """Combined GiGPO advantage of every step of one group: ``A^E_i + omega * A^S_(i,t)``.
    The episode return is the undiscounted sum of its step rewards."""
    returns = torch.tensor([sum(r) for r in step_rewards], dtype=torch.float64)
    episode = episode_advantages(returns, normalize, eps).tolist()
    step = step_advantages([discounted_returns(r, gamma) for r in step_rewards], anchors, normalize, eps)
    return [[episode[i] + omega * a for a in step[i]] for i in range(len(step_rewards))]


def episode_grpo_advantages(step_rewards: list[list[float]], normalize: str = "std",
                            eps: float = 1e-6) -> list[list[float]]:
    """GRPO on whole episodes: each step gets its episode's group-relative advantage."""
    returns = torch.tensor([sum(r) for r in step_rewards], dtype=torch.float64)
    episode = episode_advantages(returns, normalize, eps).tolist()
    return [[episode[i]] * len(r) for i, r in enumerate(step_rewards)]


def turn_advantages(step_rewards: list[list[float]], observations: list[list[str]], group_size: int,
                    step_level: bool, gamma: float = 0.95, omega: float = 1.0, normalize: str = "std",
                    eps: float = 1e-6) -> tuple[list[list[float]], int]:
    """Every turn's advantage, for episodes in groups of ``group_size`` consecutive ones (each group started
    from one state): GiGPO's :func:`gigpo_advantages` when ``step_level``, else :func:`episode_grpo_advantages`.
    ``observations[i][t]`` is what episode ``i`` acted on at turn ``t``. Also returns how many turns share
    their anchor state with another turn of their group."""
    out, anchored = [], 0
    for g in range(0, len(step_rewards), group_size):
        rewards = step_rewards[g:g + group_size]
        if step_level:
            anchors = [[anchor_key(o) for o in episode] for episode in observations[g:g + group_size]]
            out += gigpo_advantages(rewards, anchors, gamma, omega, normalize, eps)
            anchored += sum(c for c in Counter(k for keys in anchors for k in keys).values() if c > 1)
        else:
            out += episode_grpo_advantages(rewards, normalize, eps)
    return out, anchored

"""RL algorithms as pure tensor functions: advantages and policy losses.

An :class:`Algorithm` pairs an advantage estimator with a default loss aggregation:

- ``grpo``: group-normalised advantages, per-sequence token mean (Shao et al. 2024);
- ``dr_grpo``: mean-centred advantages, token sum over a constant (Liu et al. 2025);
- ``gigpo``: episode plus anchor-state step advantages of multi-turn episodes (Feng et al. 2025),
  for agent tasks only (:mod:`.gigpo`).

On agent tasks, ``grpo`` and ``dr_grpo`` are the same estimators over whole episodes: every turn of
an episode gets its episode's group-relative advantage (``episode_normalize`` says std or mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import OneLayerError
from .advantages import dr_grpo_advantages, grpo_advantages, zero_signal_fraction
from .losses import AGGREGATIONS, Normalizer, aggregate, k3_kl, policy_loss


@dataclass(frozen=True)
class Algorithm:
    name: str
    advantages: Callable[[torch.Tensor, int], torch.Tensor] | None  # None: episodes only
    default_aggregation: str
    episode_normalize: str  # std or mean, for advantages over episode returns
    step_level: bool = False  # anchor-state step advantages (GiGPO)


ALGORITHMS = {
    "grpo": Algorithm("grpo", grpo_advantages, "seq-mean-token-mean", "std"),
    "dr_grpo": Algorithm("dr_grpo", dr_grpo_advantages, "seq-mean-token-sum-norm", "mean"),
    "gigpo": Algorithm("gigpo", None, "seq-mean-token-mean", "std", step_level=True),
}


def get_algorithm(name: str) -> Algorithm:
    key = name.lower().replace("-", "_").replace(".", "")
    if key not in ALGORITHMS:
        raise OneLayerError(f"unknown algorithm '{name}': use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[key]


__all__ = ["AGGREGATIONS", "ALGORITHMS", "Algorithm", "Normalizer", "aggregate", "dr_grpo_advantages",
           "get_algorithm", "grpo_advantages", "k3_kl", "policy_loss", "zero_signal_fraction"]

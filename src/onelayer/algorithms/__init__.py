"""RL algorithms as pure tensor functions: advantages and policy losses.

An :class:`Algorithm` pairs an advantage estimator with a default loss aggregation:

- ``grpo``: group-normalised advantages, per-sequence token mean (Shao et al. 2024);
- ``dr_grpo``: mean-centred advantages, token sum over a constant (Liu et al. 2025).

GiGPO (Feng et al. 2025) computes per-step advantages of multi-turn episodes from anchor states that
trajectories of a group share; it needs episodes rather than flat completions, so it will sit in
``algorithms/gigpo.py`` beside the multi-turn rollouts of agent tasks, and feed :func:`policy_loss`
per-token advantages (``[B, T]``), which it already accepts.
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
    advantages: Callable[[torch.Tensor, int], torch.Tensor]
    default_aggregation: str


ALGORITHMS = {
    "grpo": Algorithm("grpo", grpo_advantages, "seq-mean-token-mean"),
    "dr_grpo": Algorithm("dr_grpo", dr_grpo_advantages, "seq-mean-token-sum-norm"),
}


def get_algorithm(name: str) -> Algorithm:
    key = name.lower().replace("-", "_").replace(".", "")
    if key not in ALGORITHMS:
        hint = " (gigpo needs a multi-turn agent task, which onelayer does not have yet)" if key == "gigpo" else ""
        raise OneLayerError(f"unknown algorithm '{name}'{hint}: use one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[key]


__all__ = ["AGGREGATIONS", "ALGORITHMS", "Algorithm", "Normalizer", "aggregate", "dr_grpo_advantages",
           "get_algorithm", "grpo_advantages", "k3_kl", "policy_loss", "zero_signal_fraction"]

"""How far training moved each layer: ||W_after - W_before||_F / ||W_before||_F.

The study's "leverage, not distance" finding is that the layers that contribute most to RL gains do
not move more than the others. This measures the distance side: per layer, the Frobenius norm of the
change of all its trained tensors together, relative to the norm of those tensors before training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import OneLayerError


def squared_norms(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per tensor: (||W_after - W_before||^2, ||W_before||^2), computed in float64."""
    missing = sorted(set(after) - set(before))
    if missing:
        raise OneLayerError(f"no weights before training for {missing[0]}: compare against the run's base model")
    result = {}
    for name, new in after.items():
        old = before[name].detach().to("cpu", torch.float64)
        delta = new.detach().to("cpu", torch.float64) - old
        result[name] = (float(delta.pow(2).sum()), float(old.pow(2).sum()))
    return result


def relative_change(norms: Mapping[str, tuple[float, float]], group_of: Mapping[str, object]) -> dict[str, float]:
    """Relative change per group (a layer index, embed, head or norm), all tensors of a group pooled:
    sqrt(sum ||dW||^2) / sqrt(sum ||W||^2). Keys are strings so the result is JSON as written."""
    pooled: dict[str, list[float]] = {}
    for name, (delta, size) in norms.items():
        acc = pooled.setdefault(str(group_of[name]), [0.0, 0.0])
        acc[0] += delta
        acc[1] += size
    return {group: (math.sqrt(d / s) if s > 0 else float("nan")) for group, (d, s) in pooled.items()}

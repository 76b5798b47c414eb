"""The clipped policy-gradient loss, its token aggregation, and the k3 KL penalty.

Per token t of completion i: ``rho = exp(logp_new - logp_old)`` and the objective
``min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)``; the loss is its negative plus
``beta * KL``. How per-token losses become one number is the only place GRPO and Dr. GRPO differ
in the loss, so it is an explicit, separate choice (:func:`aggregate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class Normalizer:
    """Batch-wide totals an aggregation divides by.

    With gradient accumulation each micro-batch must divide by the totals of the *whole* batch, so
    that the accumulated gradient equals the one-batch gradient; these carry them.
    """

    num_sequences: int
    num_tokens: int
    max_len: int  # the Dr. GRPO constant: usually max_new_tokens


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm: Normalizer | None = None) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token quantity over the tokens where ``mask`` is 1.

    - ``seq-mean-token-mean`` (original GRPO): mean over each sequence's tokens, then sum / sequences;
    - ``token-mean`` (DAPO, verl's default): sum over all tokens / number of tokens;
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): sum over all tokens / (sequences * max_len).

    ``norm`` defaults to this batch's own totals (and ``max_len`` = ``T``).
    """
    mask = mask.to(per_token.dtype)
    if norm is None:
        norm = Normalizer(per_token.shape[0], int(mask.sum().item()), per_token.shape[1])
    masked = per_token * mask
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / max(norm.num_sequences, 1)
    if mode == "token-mean":
        return masked.sum() / max(norm.num_tokens, 1)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / max(norm.num_sequences * norm.max_len, 1)
    raise ValueError(f"unknown loss aggregation '{mode}': use one of {', '.join(AGGREGATIONS)}")


def k3_kl(logp_new: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(new || ref): ``exp(ref - new) - (ref - new) - 1`` (>= 0)."""
    delta = logp_ref - logp_new
    return torch.exp(delta) - delta - 1


def policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    logp_ref: torch.Tensor | None = None,
    beta: float = 0.0,
    norm: Normalizer | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss over ``[B, T]`` token log-probs; ``advantages`` is ``[B]`` (one per
    sequence, GRPO/Dr. GRPO) or ``[B, T]`` (per token, GiGPO).

    Returns the loss and detached statistics as 0-dim tensors (reading one waits for the GPU, so a training
    loop reads them once per optimizer step): ``clip_fraction`` (tokens where the clipped branch was taken),
    ``ratio_mean`` and ``kl`` (token-mean k3, 0 without a reference).
    """
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    ratio = torch.exp(logp_new - logp_old)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    unclipped_obj, clipped_obj = ratio * adv, clipped * adv
    per_token = -torch.minimum(unclipped_obj, clipped_obj)
    kl = None
    if logp_ref is not None and beta != 0:
        kl = k3_kl(logp_new, logp_ref)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, norm)
    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        stats = {
            "clip_fraction": ((clipped_obj < unclipped_obj) & m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "kl": (kl * m).sum() / n if kl is not None else torch.zeros((), device=loss.device),
        }
    return loss, stats

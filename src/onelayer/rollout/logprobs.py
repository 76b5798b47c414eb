"""Per-token log-probs of given completions, without full-vocabulary float32 logits for the batch.

The backbone runs once over the batch; the output head and log-softmax then run over the completion
tokens in chunks of ``chunk_tokens``. Under autograd each chunk is checkpointed, so the backward pass
recomputes one chunk's logits at a time instead of keeping all of them (``[B, T, V]`` in float32 is
B*T*V*4 bytes: 3 GB for 64 x 256 tokens of a 49k vocabulary).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import compat

DEFAULT_LOGIT_BYTES = 256 * 2**20  # float32 logits held at once


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def head_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Float32 next-token logits from final hidden states, softcapped as the model does (Gemma 2/3)."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def logit_softcap(model: nn.Module) -> float | None:
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def _token_logprobs(head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                    softcap: float | None) -> torch.Tensor:
    logits = head_logits(head, hidden, softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs ``[B, T]`` of the completion tokens ``input_ids[:, prompt_length:]`` under ``model``
    (logits divided by ``temperature``, as the sampler saw them); 0 where ``completion_mask`` is 0.

    ``lengths``: each row's completion tokens on the CPU when its mask is that many leading ones (a
    :class:`RolloutBatch`'s ``host_lengths``): the tokens are then picked without waiting for the GPU.

    Differentiable when gradients are enabled and the model has trainable parameters.
    """
    hidden = compat.backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask), use_cache=False,
    ).last_hidden_state
    # the hidden state at position p predicts token p + 1
    hidden = hidden[:, prompt_length - 1:-1]
    tokens = input_ids[:, prompt_length:]
    if lengths is None:
        where = completion_mask.bool()  # selecting by a mask on the GPU waits for it, to size the result
    else:
        where = torch.arange(tokens.shape[1]) < lengths[:, None]
        where = tuple(i.to(tokens.device) for i in where.nonzero(as_tuple=True))
    picked_hidden, picked_tokens = hidden[where], tokens[where]
    head = model.get_output_embeddings()
    softcap = logit_softcap(model)
    if chunk_tokens is None:
        chunk_tokens = max(1, DEFAULT_LOGIT_BYTES // (4 * head.weight.shape[0]))
    needs_grad = torch.is_grad_enabled() and picked_hidden.requires_grad
    pieces = []
    for start in range(0, picked_tokens.shape[0], chunk_tokens):
        args = (head, picked_hidden[start:start + chunk_tokens], picked_tokens[start:start + chunk_tokens],
                temperature, softcap)
        pieces.append(checkpoint(_token_logprobs, *args, use_reentrant=False) if needs_grad
                      else _token_logprobs(*args))
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    if pieces:
        out = out.masked_scatter(where, torch.cat(pieces)) if lengths is None else out.index_put(where, torch.cat(pieces))
    return out

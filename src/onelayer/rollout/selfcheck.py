"""The fast engine checks itself against the model's own forward before a run trusts it.

The fast engine drives transformers' attention modules through a cache and an attention function of its
own (:mod:`onelayer.compat` lists what that assumes). A transformers release that changes those internals
can make it fail outright or, worse, sample from the wrong distribution. So on first use in a process, for
each kind of model (class, dtypes, device, kernels), it generates a few greedy tokens for two prompts of
different lengths (left padding included) and compares them with a plain forward over the same sequences:

- every greedy token must be the forward's most likely token, up to ``tolerance`` nats (ties in low
  precision may go either way);
- every token's log-prob must equal the forward's within ``tolerance``, and on average within half of it.

``tolerance`` is 1e-3 nats in float32 and 0.25 in bf16/fp16, where the two computations round differently
(on SmolLM2 both are ~0.035 nats from float32 on average). A broken cache or mask is off by far more.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..errors import first_line
from .fast import FastGenerator, _autocast_dtype
from .logprobs import position_ids_from_mask

CHECK_PROMPTS = ("Question: what is 12 + 30?\nAnswer:", "The quick brown fox")
CHECK_TOKENS = 12
TOLERANCE = {torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 0.25

_verdicts: dict[tuple, str | None] = {}


def _key(model: nn.Module, kernels: bool | None) -> tuple:
    device = next(model.parameters()).device
    dtypes = tuple(sorted(str(d) for d in {p.dtype for p in model.parameters()}))
    return type(model).__name__, dtypes, device.type, kernels


def fast_engine_problem(model: nn.Module, tokenizer, kernels: bool | None = None) -> str | None:
    """Why the fast engine must not be used for ``model`` in this process (None: its check passed).

    Checked once per process for each kind of model (class, parameter dtypes, device, ``kernels``);
    later calls return the first verdict."""
    key = _key(model, kernels)
    if key not in _verdicts:
        _verdicts[key] = _check(model, tokenizer, kernels)
    return _verdicts[key]


def _check(model: nn.Module, tokenizer, kernels: bool | None) -> str | None:
    try:
        batch = FastGenerator(model, tokenizer, batch_size=len(CHECK_PROMPTS), kernels=kernels).generate(
            list(CHECK_PROMPTS), 1, CHECK_TOKENS, temperature=0.0)
    except Exception as err:  # an incompatible cache or attention protocol fails here
        return f"it raised {type(err).__name__}: {first_line(err)[:160]}"
    device = batch.input_ids.device
    dtype = _autocast_dtype(model, device.type)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with torch.no_grad(), autocast:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=position_ids_from_mask(batch.attention_mask)).logits
    # the logits at position p predict token p + 1
    logp = logits[:, batch.prompt_length - 1:-1].float().log_softmax(-1)
    tokens = batch.input_ids[:, batch.prompt_length:]
    where = batch.completion_mask.bool()
    forward = logp.gather(-1, tokens[..., None])[..., 0][where]
    best = logp.max(dim=-1).values[where]
    low_precision = dtype is not None or next(model.parameters()).dtype != torch.float32
    tolerance = LOW_PRECISION_TOLERANCE if low_precision else TOLERANCE[torch.float32]
    error = (batch.logprobs.to(device)[where] - forward).abs()
    margin = float((best - forward).max())
    if margin > tolerance:
        return f"its greedy tokens are not the model's most likely ones (a {margin:.3g}-nat gap)"
    if float(error.max()) > tolerance or float(error.mean()) > tolerance / 2:
        return (f"its log-probs differ from the model's forward by up to {float(error.max()):.3g} nats "
                f"(mean {float(error.mean()):.3g})")
    return None

"""The plain sampling path: transformers ``generate``. Works for every model on every device; on a
GPU it is slow (40-100 ms per decode step whatever the batch), which is why :mod:`.fast` exists."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .batch import RolloutBatch, assemble_batch, encode_prompts, eos_token_ids, pad_columns


class Generator(Protocol):
    """Turns rendered prompts into ``num_samples`` completions each."""

    def generate(self, prompts: list[str], num_samples: int, max_new_tokens: int,
                 temperature: float, top_p: float, seeds: list[int] | None = None, first_row: int = 0
                 ) -> RolloutBatch: ...


class HFGenerator:
    """Sampling with ``model.generate`` in row batches of at most ``batch_size``; ``ignore_eos`` generates
    exactly ``max_new_tokens`` per row (EOS is never sampled), for benchmarks."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 256, ignore_eos: bool = False):
        self.model, self.tokenizer, self.batch_size, self.ignore_eos = model, tokenizer, batch_size, ignore_eos
        self.eos_ids = eos_token_ids(model, tokenizer)

    @torch.no_grad()
    def generate(self, prompts: list[str], num_samples: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seeds: list[int] | None = None,
                 first_row: int = 0) -> RolloutBatch:
        """``seeds``: one seed re-seeds the global generator that ``generate`` samples from (offset by
        ``first_row``: a share of a batch draws a stream of its own, not the rows it has in the whole batch);
        blocks of rows with their own streams need the fast engine."""
        from transformers import GenerationConfig

        if seeds and len(seeds) > 1:
            raise ValueError("per-block random streams need the fast engine (--engine fast)")
        if seeds:
            torch.manual_seed(seeds[0] if not first_row else (seeds[0] * 1_000_033 + first_row) % 2**63)

        tok = self.tokenizer
        prompt_ids, prompt_mask = encode_prompts(tok, prompts, num_samples, next(self.model.parameters()).device)
        greedy = temperature <= 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=tok.pad_token_id,
            eos_token_id=self.eos_ids, min_new_tokens=max_new_tokens if self.ignore_eos else 0,
            # sample from the model's own distribution: no top-k or repetition tricks from its config
            **({} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}),
        )
        was_training = self.model.training
        self.model.eval()
        pieces = []
        for start in range(0, prompt_ids.shape[0], self.batch_size):
            end = start + self.batch_size
            out = self.model.generate(input_ids=prompt_ids[start:end], attention_mask=prompt_mask[start:end],
                                      generation_config=config)
            pieces.append(out[:, prompt_ids.shape[1]:])
        self.model.train(was_training)
        return assemble_batch(tok, prompt_ids, prompt_mask, pad_columns(pieces, tok.pad_token_id), self.eos_ids)

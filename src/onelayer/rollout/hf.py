"""The plain sampling path: transformers ``generate``. Works everywhere; on a GPU it is slow
(~100 ms per decode step whatever the batch), so a faster engine may replace it behind
:class:`Generator`."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .batch import RolloutBatch


class Generator(Protocol):
    """Turns rendered prompts into ``num_samples`` completions each."""

    def generate(self, prompts: list[str], num_samples: int, max_new_tokens: int,
                 temperature: float, top_p: float) -> RolloutBatch: ...


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def completion_mask(completions: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of each row's tokens up to and including its first EOS, and whether the row has none."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # an EOS strictly earlier
    return (~seen_before).long(), ~is_eos.any(dim=1)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


class HFGenerator:
    """Sampling with ``model.generate`` in row batches of at most ``batch_size``."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)

    @torch.no_grad()
    def generate(self, prompts: list[str], num_samples: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0) -> RolloutBatch:
        from transformers import GenerationConfig

        tok, device = self.tokenizer, next(self.model.parameters()).device
        encoded = tok(prompts, add_special_tokens=False)["input_ids"]
        rows = [ids for ids in encoded for _ in range(num_samples)]
        prompt_ids, prompt_mask = left_pad(rows, tok.pad_token_id, device)
        greedy = temperature <= 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=tok.pad_token_id,
            eos_token_id=self.eos_ids,
            # sample from the model's own distribution: no top-k or repetition tricks from its config
            **({} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}),
        )
        was_training = self.model.training
        self.model.eval()
        pieces = []
        for start in range(0, len(rows), self.batch_size):
            end = start + self.batch_size
            out = self.model.generate(input_ids=prompt_ids[start:end], attention_mask=prompt_mask[start:end],
                                      generation_config=config)
            pieces.append(out[:, prompt_ids.shape[1]:])
        self.model.train(was_training)
        width = max(1, max(p.shape[1] for p in pieces))
        completions = torch.cat([nn.functional.pad(p, (0, width - p.shape[1]), value=tok.pad_token_id)
                                 for p in pieces])
        mask, truncated = completion_mask(completions, self.eos_ids)
        completions = completions.masked_fill(mask == 0, tok.pad_token_id)
        texts = tok.batch_decode([c[m.bool()] for c, m in zip(completions, mask, strict=True)], skip_special_tokens=True)
        return RolloutBatch(
            input_ids=torch.cat([prompt_ids, completions], dim=1),
            attention_mask=torch.cat([prompt_mask, mask], dim=1),
            completion_mask=mask, prompt_length=prompt_ids.shape[1], texts=texts, truncated=truncated,
        )

"""What a rollout produces: prompts and completions as one padded batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    """``B = prompts * samples`` rows, the samples of one prompt contiguous.

    ``input_ids`` holds left-padded prompts (``prompt_length`` columns) followed by right-padded
    completions (``T`` columns); ``completion_mask`` marks completion tokens up to and including EOS.
    ``logprobs`` are the sampling policy's per-token log-probs (``[B, T]``) once computed.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int
    texts: list[str]
    truncated: torch.Tensor  # [B] bool: hit max_new_tokens without EOS
    logprobs: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def rows(self, index: slice | torch.Tensor) -> RolloutBatch:
        """A micro-batch of rows, trimmed of all-padding completion columns."""
        mask = self.completion_mask[index]
        width = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
        end = self.prompt_length + max(width, 1)
        texts = [self.texts[i] for i in range(self.size)[index]] if isinstance(index, slice) else \
            [self.texts[i] for i in index.tolist()]
        return RolloutBatch(
            input_ids=self.input_ids[index, :end], attention_mask=self.attention_mask[index, :end],
            completion_mask=mask[:, :end - self.prompt_length], prompt_length=self.prompt_length,
            texts=texts, truncated=self.truncated[index],
            logprobs=None if self.logprobs is None else self.logprobs[index, :end - self.prompt_length],
        )

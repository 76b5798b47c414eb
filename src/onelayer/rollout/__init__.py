"""Rollouts: prompts in, completions with token ids, masks and log-probs out."""

from .batch import RolloutBatch
from .hf import Generator, HFGenerator, completion_mask, eos_token_ids
from .logprobs import completion_logprobs, position_ids_from_mask
from .prompts import render_prompts

__all__ = ["Generator", "HFGenerator", "RolloutBatch", "completion_logprobs", "completion_mask",
           "eos_token_ids", "position_ids_from_mask", "render_prompts"]

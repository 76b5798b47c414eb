"""Rollouts: prompts in, completions with token ids, masks and log-probs out."""

from .batch import RolloutBatch, assemble_batch, completion_mask, encode_prompts, eos_token_ids
from .engine import make_generator
from .fast import FastGenerator
from .hf import Generator, HFGenerator
from .logprobs import completion_logprobs, position_ids_from_mask
from .prompts import render_prompts

__all__ = ["FastGenerator", "Generator", "HFGenerator", "RolloutBatch", "assemble_batch", "completion_logprobs",
           "completion_mask", "encode_prompts", "eos_token_ids", "make_generator", "position_ids_from_mask",
           "render_prompts"]

"""Choosing the rollout engine: the fast path where it runs, transformers ``generate`` elsewhere."""

from __future__ import annotations

import sys

from torch import nn

from ..config import ENGINES
from ..errors import OneLayerError
from .fast import FastGenerator, unsupported_reason
from .hf import Generator, HFGenerator
from .selfcheck import fast_engine_problem


def make_generator(model: nn.Module, tokenizer, batch_size: int = 256, engine: str = "auto",
                   compile_decode: bool = False, fused_kernels: bool = True) -> Generator:
    """``fast`` (static KV cache; CUDA graphs on CUDA), ``plain`` (transformers ``generate``), or ``auto``:
    fast on CUDA, plain on CPU. Where the fast engine cannot run the model, a one-line notice says why
    and the plain engine is used. ``compile_decode``: the fast engine's decode steps go through torch.compile;
    ``fused_kernels``: its attention and sampling run as Triton kernels where they can (False: never).
    The fast engine checks itself against the model's forward on first use (:mod:`.selfcheck`); if that
    fails, a one-line notice says why and the plain engine is used."""
    if engine not in ENGINES:
        raise OneLayerError(f"unknown rollout engine '{engine}': use {', '.join(ENGINES)}")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if engine == "plain" or (engine == "auto" and not on_cuda):
        return HFGenerator(model, tokenizer, batch_size)
    kernels = None if fused_kernels else False
    reason = unsupported_reason(model)
    if reason:
        print(f"rollouts: the fast engine is off because {reason}; using transformers generate", file=sys.stderr)
        return HFGenerator(model, tokenizer, batch_size)
    problem = fast_engine_problem(model, tokenizer, kernels)
    if problem:
        print(f"rollouts: the fast engine failed its self-check against the model's forward ({problem}); using "
              "transformers generate for this run", file=sys.stderr)
        return HFGenerator(model, tokenizer, batch_size)
    return FastGenerator(model, tokenizer, batch_size, compiled=compile_decode, kernels=kernels)

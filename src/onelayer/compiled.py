"""torch.compile for updates: each decoder layer's forward (and so its backward) fused by Inductor.

An update of a small model is bound by memory traffic, not by matmuls: on an H100, SmolLM2's
single-layer update spent ~25% of its kernel time in matmuls and the rest in norms (upcast to float32
and back), rotary embeddings, activations, residuals and casts, each a kernel reading and writing
the whole batch. Compiling a decoder layer fuses those into a few kernels.

Every decoder layer runs the same code, so the layers share compiled graphs (parameters are graph
inputs): a graph for frozen layers below the trained ones (no autograd), one for frozen layers above
them (activation gradients only), one for trained layers (float32 weights), each with dynamic batch
and sequence sizes. Compiling them takes about a minute at the first step of a process; later runs
in the same process (a scan's) reuse them, and Inductor caches code on disk for later processes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from . import compat
from .errors import OneLayerError, first_line
from .models import decoder_layers

BACKEND = "inductor"  # tests use "aot_eager": the same graphs and autograd, without code generation
RECOMPILES = 64  # graphs kept per function: layer kinds x gradient patterns x shapes x dtypes


def allow_recompiles() -> None:
    """Keep up to ``RECOMPILES`` graphs per compiled function (torch's default, 8, evicts them: every
    batch shape, window, layer kind and gradient pattern is a graph of its own)."""
    compat.allow_recompiles(RECOMPILES)


@contextmanager
def compiled_layers(model: nn.Module, enabled: bool = True):
    """Within the block, ``model``'s decoder layers (those in its layer list now) run compiled.

    Only for the block: generation keeps its own path (CUDA graphs, layer variants' routed twins),
    and checkpoints see the plain modules."""
    if not enabled:
        yield model
        return
    allow_recompiles()
    _, layers = decoder_layers(model)
    for layer in layers:
        # the wrapper is cheap to make, and the graphs live on the shared code, so every layer reuses them
        compat.set_compiled_call(layer, torch.compile(compat.plain_call(layer), backend=BACKEND, dynamic=True))
    try:
        yield model
    except Exception as err:
        if not compat.raised_by_compiler(err):
            raise
        cause = getattr(err, "inner_exception", None) or err  # a backend's own error, when it raised one
        first = f"{type(cause).__name__}: {first_line(cause)}"
        raise OneLayerError(f"compiling the decoder layers failed ({first[:200]}): drop --compile-layers "
                            "(the last checkpoint is intact and --out resumes from it)") from err
    finally:
        for layer in layers:
            compat.set_compiled_call(layer, None)

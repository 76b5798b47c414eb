"""Counter-based random numbers for sampling: the uniform of row ``r``'s ``t``-th token is a hash of
(seed, r, t), not the next draw of a generator.

So a run's samples do not depend on how its rows are batched, chunked or stopped, or on what other
rows share the batch: a layer variant trained inside a batch of many variants draws exactly what it
draws alone with the same seed. The hash is 32-bit "lowbias32" (Wellons) on int64 tensors, with each
multiplication split in 16-bit halves so nothing overflows; a token's uniform has 24 random bits.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for ``x`` in [0, 2**32) without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + ((x * high) & 0xFFFF) * 65536) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with good avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seeds: list[int], rows_per_seed: int, device: torch.device | str = "cpu", first_row: int = 0) -> torch.Tensor:
    """One 32-bit key per row: rows ``[k * rows_per_seed, (k + 1) * rows_per_seed)`` are rows ``first_row``,
    ``first_row + 1``, ... of the stream of ``seeds[k]`` (a process with a share of a batch passes its first
    row, so its rows draw what they draw in the whole batch). Returns int64 ``[len(seeds) * rows_per_seed]``."""
    words = torch.tensor([[s & MASK32, (s >> 32) & MASK32] for s in (x % 2**64 for x in seeds)], dtype=torch.int64)
    per_seed = mix32(mix32(words[:, 0]) ^ words[:, 1])
    rows = mix32((torch.arange(first_row, first_row + rows_per_seed, dtype=torch.int64) + 0x9E3779B9) & MASK32)
    return mix32(per_seed[:, None] ^ rows[None, :]).reshape(-1).to(device)


def uniforms(keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in (0, 1), one per row: the ``step``-th draw of each row's stream (``step`` is a
    one-element int64 tensor, so this runs inside a captured CUDA graph)."""
    bits = mix32(keys ^ mix32(step & MASK32))
    return ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24

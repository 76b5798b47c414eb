"""Layer variants: K models that differ from one base model only in some decoder layers, held as one.

A scan trains every layer alone; the runs share every frozen weight. Here the frozen weights exist
once, and each variant owns a float32 copy of the layers it trains. Two ways to run the model:

- ``variant(k)``: variant k's layers sit in the decoder list, so the model *is* variant k: its
  parameter names, gradients, optimizer groups and checkpoints are exactly those of a solo run.
- ``joint(variants, block_rows)``: every trained layer is replaced by a routed twin whose weighted
  leaves (linear maps, norms) send each block of rows through its variant's copy and the other rows
  through the shared weights. Attention, caches and masks are untouched (they hold no weights), so
  the fast engine's static cache and CUDA graphs work as they are; routing is by contiguous row
  slices, fixed for a batch shape, so a captured step replays it (a batch compacted to its unfinished
  rows keeps them in order, so each variant's rows stay contiguous).
"""

from __future__ import annotations

import bisect
import copy
from contextlib import contextmanager

import torch
from torch import nn

from . import compat
from .errors import OneLayerError
from .models import decoder_layers


class RoutedLeaf(nn.Module):
    """A weighted module whose rows go through ``copies[k]`` for blocks of variant k, else ``shared``."""

    def __init__(self, shared: nn.Module, copies: dict[int, nn.Module], owner: LayerVariants):
        super().__init__()
        self.shared = shared
        self.copies = nn.ModuleDict({str(k): m for k, m in copies.items()})
        self._owner = owner

    def _module(self, variant: int | None) -> nn.Module:
        key = str(variant)
        return self.copies[key] if key in self.copies else self.shared

    def forward(self, x: torch.Tensor, *args, **kwargs):
        pieces: list[tuple[int, int, nn.Module]] = []
        for start, stop, variant in self._owner.segments:
            module = self._module(variant)
            if pieces and pieces[-1][2] is module and pieces[-1][1] == start:
                pieces[-1] = (pieces[-1][0], stop, module)  # neighbours on the same weights: one call
            else:
                pieces.append((start, stop, module))
        if len(pieces) == 1:
            return pieces[0][2](x, *args, **kwargs)
        outputs = [module(x[start:stop], *args, **kwargs) for start, stop, module in pieces]
        # a float32 copy next to bf16 shared weights can return a wider dtype: keep the widest (a plain
        # loop, which torch.compile traces without a graph break)
        dtype = outputs[0].dtype
        for output in outputs[1:]:
            dtype = torch.promote_types(dtype, output.dtype)
        return torch.cat([o.to(dtype) for o in outputs])

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # code that reads e.g. ``module.weight.dtype`` sees the shared module's
            return getattr(self._modules["shared"], name)


def _routed(shared: nn.Module, copies: dict[int, nn.Module], owner: LayerVariants) -> nn.Module:
    """A twin of ``shared`` whose weighted modules are :class:`RoutedLeaf`; weightless ones are shared."""
    if next(shared.parameters(recurse=False), None) is not None:
        return RoutedLeaf(shared, copies, owner)
    if next(shared.parameters(), None) is None:
        return shared
    twin = copy.copy(shared)  # same attributes (layer_idx, config, ...) but its own child table
    twin._modules = {name: _routed(child, {k: c._modules[name] for k, c in copies.items()}, owner)
                     for name, child in shared._modules.items()}
    return twin


def _trainable_copy(layer: nn.Module) -> nn.Module:
    twin = copy.deepcopy(layer)
    for param in twin.parameters():
        # float32 master weights, as a solo run keeps its trained tensors (see train.fp32_trained_tensors)
        param.data = param.data.float()
    return twin


class LayerVariants:
    """``layer_sets[k]`` are the decoder layers variant k trains; every other weight is shared."""

    def __init__(self, model: nn.Module, layer_sets: list[tuple[int, ...]]):
        _, self.layers = decoder_layers(model)
        self.model = model
        self.layer_sets = [tuple(sorted(set(s))) for s in layer_sets]
        for layers in self.layer_sets:
            bad = [i for i in layers if not 0 <= i < len(self.layers)]
            if not layers or bad:
                raise OneLayerError(f"variant layers {list(layers)} must name decoder layers 0-{len(self.layers) - 1}")
        self.shared = {i: self.layers[i] for i in sorted({i for s in self.layer_sets for i in s})}
        self.copies = [{i: _trainable_copy(self.layers[i]) for i in layers} for layers in self.layer_sets]
        self.routed = {i: _routed(layer, {k: c[i] for k, c in enumerate(self.copies) if i in c}, self)
                       for i, layer in self.shared.items()}
        self.segments: list[tuple[int, int, int | None]] = [(0, 0, None)]
        self._blocks: list[int] = []
        self._block_rows = 0

    @contextmanager
    def variant(self, k: int):
        """The model as variant ``k`` alone (its own layers in the decoder list)."""
        for i, layer in self.copies[k].items():
            self.layers[i] = layer
        try:
            yield self.model
        finally:
            for i in self.copies[k]:
                self.layers[i] = self.shared[i]

    @contextmanager
    def joint(self, variants: list[int], block_rows: int):
        """Forward passes in which rows ``[b * block_rows, (b + 1) * block_rows)`` are variant
        ``variants[b]``; call :meth:`set_rows` before each with the rows it covers."""
        for i, layer in self.routed.items():
            self.layers[i] = layer
        self._blocks, self._block_rows = list(variants), block_rows
        self.set_rows(0, len(variants) * block_rows)
        try:
            yield self.model
        finally:
            for i, layer in self.shared.items():
                self.layers[i] = layer

    def set_rows(self, start: int, stop: int, rows: list[int] | None = None) -> None:
        """The next forward covers rows ``[start, stop)`` of the joint batch, or, for a batch compacted to
        some of its rows (ascending indices ``rows`` in the joint batch), rows ``[start, stop)`` of those."""
        rows = range(len(self._blocks) * self._block_rows) if rows is None else rows
        segments, i = [], start
        while i < stop:
            block = rows[i] // self._block_rows
            end = bisect.bisect_left(rows, (block + 1) * self._block_rows, i, stop)  # the block's last row, + 1
            segments.append((i - start, end - start, self._blocks[block]))
            i = end
        self.segments = segments


class SkippedLayer(nn.Module):
    """A decoder layer replaced by the identity (the layer's attributes the model's loop reads kept)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for name in ("attention_type", "layer_idx"):
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))
        self._layer = [layer]  # not a submodule: its parameters are not the model's while it is skipped

    def forward(self, hidden_states, *args, **kwargs):
        return compat.skipped_layer_output(hidden_states, self._layer[0])


@contextmanager
def skipped(model: nn.Module, layer: int):
    """The model without decoder layer ``layer`` (its input passes straight to the next one)."""
    _, layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise OneLayerError(f"layer {layer} is out of range; layers are 0-{len(layers) - 1}")
    original = layers[layer]
    layers[layer] = SkippedLayer(original)
    try:
        yield model
    finally:
        layers[layer] = original

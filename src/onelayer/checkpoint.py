"""Checkpoints that hold only what training changed.

A checkpoint directory holds ``trained.safetensors`` (the trained tensors, under the model's own
parameter names; for LoRA, the adapter tensors), ``onelayer.json`` (base model, layer spec and layers,
step, full config, the adapter if any) and, for resuming, ``optimizer.pt``. Applying one to its base
model reproduces the trained model.
Writes go to a temporary directory that replaces the old one by rename, so a kill mid-write loses
nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import OneLayerError

TENSORS, META, OPTIMIZER = "trained.safetensors", "onelayer.json", "optimizer.pt"
FORMAT_VERSION = 1


def save_checkpoint(directory: str | Path, model: nn.Module, names: list[str], meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write the tensors ``names`` of ``model`` and ``meta`` to ``directory``, atomically."""
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in names}
    return write_checkpoint(directory, tensors, meta, optimizer.state_dict() if optimizer is not None else None)


def write_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict,
                     optimizer_state: dict | None = None) -> Path:
    """Write trained ``tensors`` (by parameter name), ``meta`` and an optimizer's ``state_dict()`` to
    ``directory``, atomically."""
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / TENSORS))
    (tmp / META).write_text(json.dumps({"format": FORMAT_VERSION, **meta, "trained": list(tensors)}, indent=2))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIMIZER)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory for a run directory or a checkpoint directory, or None.

    A run killed between the two renames of :func:`save_checkpoint` left only ``checkpoint.old``:
    that one is used.
    """
    path = Path(path)
    for candidate in (path, path / "checkpoint", path / "checkpoint.old"):
        if (candidate / META).is_file() and (candidate / TENSORS).is_file():
            return candidate
    return None


def read_meta(path: str | Path) -> dict:
    found = find_checkpoint(path)
    if found is None:
        raise OneLayerError(f"no onelayer checkpoint in {path}: pass a run directory (--out of train) or its "
                            "checkpoint/ folder")
    return json.loads((found / META).read_text())


def checkpoint_tensors(model: nn.Module, path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The values a checkpoint gives ``model``'s parameters, under ``model``'s own names, and its
    metadata. A LoRA checkpoint applied to a model without adapters gives its merged weights."""
    found = find_checkpoint(path)
    meta = read_meta(path)
    tensors = load_file(str(found / TENSORS))
    params = dict(model.named_parameters())
    adapter = meta.get("adapter")
    if adapter and not all(name in params for name in tensors):
        from .adapters import merged_weights

        tensors = merged_weights(tensors, adapter, params)
    for name, value in tensors.items():
        if name not in params or params[name].shape != value.shape:
            raise OneLayerError(f"checkpoint {found} does not fit this model (tensor {name}): apply it to its "
                                f"base model {meta.get('base_model')}")
    return tensors, meta


def apply_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load a checkpoint's trained tensors into ``model`` in place; returns its metadata."""
    tensors, meta = checkpoint_tensors(model, path)
    assign(model, tensors)
    return meta


def assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model``'s parameters of the same names (each keeps its dtype)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: str | Path) -> bool:
    """Load the checkpoint's optimizer state into ``optimizer``; False when it has none (dropped by
    ``--keep-optimizer none``)."""
    found = find_checkpoint(path)
    if found is None or not (found / OPTIMIZER).is_file():
        return False
    optimizer.load_state_dict(torch.load(found / OPTIMIZER, map_location="cpu", weights_only=True))
    return True

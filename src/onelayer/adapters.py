"""LoRA adapters (through PEFT) on the linear maps of selected decoder layers.

The baseline users ask about: instead of training one whole layer, train a low-rank update
``W + (alpha / r) B A`` of every linear map of every layer, with a rank that gives about the same
trainable-parameter count (:func:`matched_rank`). The adapters go into the model in place
(``peft.inject_adapter_in_model``), so the training loop, sampling and evaluation see the same
model object. A checkpoint holds only the adapter tensors; :func:`merged_weights` folds them into
the base weights, so evaluation, out-of-domain swaps and ensembles apply a LoRA checkpoint to a
plain base model like any other.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import OneLayerError
from .layers import LayerSelection, param_groups
from .models import LayerId, decoder_layers, parameter_layers

ADAPTER = "default"  # PEFT's adapter name; it appears in the parameter names
_A, _B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def lora_targets(model: nn.Module, layers: tuple[int, ...] | list[int]) -> list[str]:
    """Full names of the ``nn.Linear`` modules inside the decoder layers ``layers``."""
    prefix, _ = decoder_layers(model)
    starts = tuple(f"{prefix}.{layer}." for layer in layers)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name.startswith(starts)]


def matched_rank(model: nn.Module, layers: int = 1) -> int:
    """The LoRA rank on every linear map of every decoder layer whose trainable-parameter count is
    closest to that of ``layers`` whole decoder layers (at least 1)."""
    _, blocks = decoder_layers(model)
    per_layer = sum(p.numel() for p in blocks[0].parameters())
    per_rank = sum(m.in_features + m.out_features for name in lora_targets(model, range(len(blocks)))
                   for m in [model.get_submodule(name)])
    if not per_rank:
        raise OneLayerError(f"{type(model).__name__} has no nn.Linear inside its decoder layers for LoRA")
    return max(1, round(layers * per_layer / per_rank))


def add_lora(model: nn.Module, selection: LayerSelection, rank: int, alpha: float, weight_decay: float = 0.0,
             lr_scales: Mapping[LayerId, float] | None = None) -> tuple[list[dict], dict]:
    """Put LoRA adapters of ``rank`` on every linear map of the selected layers, freeze everything
    else, and return the optimizer groups of the adapters and the adapter's description (for the
    checkpoint). The base weights are not changed."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise OneLayerError("LoRA needs PEFT: pip install peft") from None
    if selection.extras:
        raise OneLayerError(f"LoRA adapts the linear maps of decoder layers, not {', '.join(selection.extras)}: "
                            "drop them from --layers")
    if rank < 1:
        raise OneLayerError(f"--lora-rank must be >= 1, got {rank}")
    targets = lora_targets(model, selection.layers)
    if not targets:
        raise OneLayerError(f"layer spec '{selection.spec}' selects no decoder layer for LoRA")
    # B starts at zero (PEFT's default), so training starts from the base model exactly
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                       bias="none"), model, adapter_name=ADAPTER)
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith((_A, _B)))
        if param.requires_grad:
            chosen.append((name, param))
    description = {"type": "lora", "rank": rank, "alpha": alpha, "scaling": alpha / rank, "targets": targets}
    return param_groups(chosen, parameter_layers(model), weight_decay, lr_scales), description


def merged_weights(adapters: Mapping[str, torch.Tensor], adapter: dict,
                   base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights ``W + scaling * B @ A`` of every adapted module, under the plain model's
    parameter names (``...q_proj.weight``), computed in float32 and returned in the base dtype."""
    merged = {}
    for name, a in adapters.items():
        if not name.endswith(_A):
            continue
        module = name[:-len(_A)]
        weight_name, b = module + ".weight", adapters.get(module + _B)
        if b is None or weight_name not in base:
            raise OneLayerError(f"LoRA checkpoint does not fit this model (module {module}): apply it to its base model")
        w = base[weight_name]
        delta = adapter["scaling"] * (b.float() @ a.float())
        merged[weight_name] = (w.detach().float() + delta.to(w.device)).to(w.dtype)
    return merged

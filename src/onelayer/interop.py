"""onelayer's layer selection for other trainers (TRL, verl, PEFT, a plain torch loop).

:func:`select_layers` freezes all but a spec's layers of any loaded Hugging Face model and returns what
it kept trainable, with optimizer parameter groups (per-layer learning rates from a scan with
``lr_from``) that any torch optimizer takes, e.g. TRL's ``GRPOTrainer(optimizers=(optimizer, None))``.

For trainers configured by text, the same selection as text (``onelayer layers MODEL --format ...``):

- :func:`trainable_regex`: one regular expression that ``re.search`` finds in the name of every trained
  parameter and of no frozen one;
- :func:`frozen_regex`: its complement, the frozen parameters, for a pattern of what to freeze (verl's
  proposed ``freeze_module_pattern``, which freezes each parameter whose full name the pattern is found in);
- :func:`peft_options`: PEFT ``LoraConfig`` arguments (``layers_to_transform``, ``layers_pattern``) that put
  adapters on the selected decoder layers only.

Both expressions name whole units: a decoder layer (``model\\.layers\\.(?:3|7)``) or an embedding, head or
final-norm module, each followed by a dot or the end. A unit may start the name or follow a dot, so the
expression still works on the names a wrapper prefixes (``module.``, ``base_model.model.``, ``_orig_mod.``);
it also matches the names of the units' modules and their submodules, never a module holding a tensor of
the other side. Each expression is checked against every parameter name of the model (tied aliases
included) before it is returned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import compat
from .checkpoint import save_checkpoint
from .errors import OneLayerError
from .layers import (
    LayerSelection,
    apply_selection,
    lr_scales_from_profile,
    param_groups,
    parameter_counts,
    selected_ids,
    selected_names,
)
from .layers import select_layers as parse_for_model
from .models import LayerId, decoder_layers, parameter_layers
from .profile import Profile, read_profile

NOTHING = "(?!)"  # a regular expression that matches no string (an empty one would match every name)


def all_parameter_layers(model: nn.Module) -> dict[str, LayerId]:
    """Every parameter name, tied aliases included (``lm_head.weight`` when the head is the embedding
    matrix), mapped to the layer id of its tensor (see :func:`onelayer.models.parameter_layers`)."""
    primary = parameter_layers(model)
    params = dict(model.named_parameters())
    of_tensor = {id(params[name]): layer for name, layer in primary.items()}
    return {name: of_tensor[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def _units(model: nn.Module, ids: set[LayerId], layer_of: dict[str, LayerId]) -> list[str]:
    """Escaped regex units covering exactly the parameters of ``ids``: the decoder layers as one unit, then
    the modules owning the extras' tensors (the parameter's own name where its module also holds others)."""
    prefix, _ = decoder_layers(model)
    units = []
    indices = sorted(i for i in ids if isinstance(i, int))
    if indices:
        alternatives = "|".join(map(str, indices))
        units.append(re.escape(prefix) + r"\." + (alternatives if len(indices) == 1 else f"(?:{alternatives})"))
    for name, layer in layer_of.items():
        if isinstance(layer, int) or layer not in ids:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        inside = [n for n in layer_of if n.startswith(owner + ".")] if owner else []
        unit = owner if inside and all(layer_of[n] in ids for n in inside) else name
        if re.escape(unit) not in units:
            units.append(re.escape(unit))
    return units


def _exact(pattern: str, model: nn.Module, ids: set[LayerId], layer_of: dict[str, LayerId]) -> bool:
    """Whether ``pattern`` is found in exactly the parameter names of ``ids``, and in no module name holding a
    parameter outside them."""
    compiled = re.compile(pattern)
    if any(bool(compiled.search(name)) != (layer in ids) for name, layer in layer_of.items()):
        return False
    for name, module in model.named_modules():
        if name and compiled.search(name):
            inside = {f"{name}.{n}" for n, _ in module.named_parameters(remove_duplicate=False)}
            if any(layer_of[n] not in ids for n in inside):
                return False
    return True


def names_regex(model: nn.Module, ids: set[LayerId]) -> str:
    """One regular expression that ``re.search`` finds in the parameter names of the layer ids ``ids`` and in
    no other parameter name of ``model`` (:data:`NOTHING` for no ids). Units may follow a wrapper's prefix;
    where that would also match another name of this model, they are anchored at the start, and failing
    that the names are listed one by one."""
    layer_of = all_parameter_layers(model)
    wanted = [name for name, layer in layer_of.items() if layer in ids]
    if not wanted:
        return NOTHING
    body = "|".join(_units(model, ids, layer_of))
    for pattern in (rf"(?:^|\.)(?:{body})(?:\.|$)", rf"^(?:{body})(?:\.|$)",
                    "^(?:" + "|".join(map(re.escape, wanted)) + ")$"):
        if _exact(pattern, model, ids, layer_of):
            return pattern
    raise AssertionError(f"no exact expression for {sorted(map(str, ids))}")  # the last one is exact by construction


def trainable_regex(model: nn.Module, selection: LayerSelection) -> str:
    """The expression ``re.search`` finds in the name of every parameter ``selection`` trains, and in no other."""
    return names_regex(model, selected_ids(model, selection))


def frozen_regex(model: nn.Module, selection: LayerSelection) -> str:
    """The complement of :func:`trainable_regex`: found in the name of every parameter ``selection`` leaves
    frozen, and in no trained one (:data:`NOTHING` when everything is trained)."""
    every = set(all_parameter_layers(model).values())
    return names_regex(model, every - selected_ids(model, selection))


def peft_options(model: nn.Module, selection: LayerSelection) -> dict:
    """``peft.LoraConfig`` arguments that adapt every linear map of the selected decoder layers and no other:
    ``layers_to_transform`` (the indices), ``layers_pattern`` (the name of the model's block list) and
    ``target_modules`` (the names of the linear maps inside those layers; PEFT applies ``layers_to_transform``
    only to a list of them, not to ``"all-linear"``); selected extras (embed, head, norm) are trained whole through
    ``modules_to_save``."""
    if not selection.layers:
        raise OneLayerError(f"layer spec '{selection.spec}' selects no decoder layer: PEFT's layers_to_transform "
                            "needs at least one (an empty list would adapt every layer)")
    prefix, blocks = decoder_layers(model)
    kinds = compat.linear_maps()
    targets = sorted({name.rsplit(".", 1)[-1] for layer in selection.layers
                      for name, module in blocks[layer].named_modules() if name and isinstance(module, kinds)})
    if not targets:
        raise OneLayerError(f"{type(model).__name__} has no linear map inside its decoder layers for PEFT to adapt")
    options = {"target_modules": targets, "layers_to_transform": list(selection.layers),
               "layers_pattern": prefix.rsplit(".", 1)[-1]}
    if selection.extras:
        layer_of = parameter_layers(model)
        extras = selected_ids(model, selection) - set(range(selection.num_layers))
        options["modules_to_save"] = sorted({name.rsplit(".", 1)[0] for name, layer in layer_of.items()
                                             if layer in extras and "." in name})
    return options


@dataclass
class TrainableLayers:
    """What :func:`select_layers` left trainable in ``model``.

    ``names`` are the trained parameters (the model's own names), ``parameters`` their element count,
    ``layers``/``extras`` the selected decoder layers and embed/head/norm, ``counts`` the trainable count per
    layer id with the model's total, ``notes`` how a profile-driven choice was made (ties, interpolation).
    """

    model: nn.Module = field(repr=False)
    selection: LayerSelection
    names: list[str]
    counts: dict

    @property
    def layers(self) -> tuple[int, ...]:
        return self.selection.layers

    @property
    def extras(self) -> tuple[str, ...]:
        return self.selection.extras

    @property
    def notes(self) -> tuple[str, ...]:
        return self.selection.notes

    @property
    def parameters(self) -> int:
        return self.counts["trainable"]

    def __str__(self) -> str:
        return (f"layers {self.selection.describe()}: {self.parameters:,} of {self.counts['total']:,} parameters "
                f"trainable ({100 * self.counts['trainable_fraction']:.2f}%)")

    def param_groups(self, lr: float, lr_from: str | Path | Profile | None = None,
                     weight_decay: float = 0.0) -> list[dict]:
        """Optimizer parameter groups of the trained tensors, one per (layer id, decays?) pair, each with its
        ``lr``: ``lr`` times the layer's ``lr_scale``, which is 1, or with ``lr_from`` (a scan directory,
        profile.json or :class:`~onelayer.profile.Profile`) the contribution rule of ``onelayer train
        --lr-from`` (max(C, 0) / mean over the trained layers of max(C, 0); embed, head and norm keep 1).
        Weight decay applies to matrices only. Every group also carries ``layer``, ``lr_scale`` and ``names``,
        which torch optimizers keep and ignore."""
        if not lr > 0:
            raise OneLayerError(f"lr must be > 0, got {lr}")
        scales: dict = {}
        if lr_from is not None and lr_from != "":
            profile = lr_from if isinstance(lr_from, Profile) else read_profile(lr_from)
            scales, _ = lr_scales_from_profile(profile, self.layers)
        wanted = set(self.names)
        named = [(n, p) for n, p in self.model.named_parameters() if n in wanted]
        groups = param_groups(named, parameter_layers(self.model), weight_decay, scales)
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
        return groups

    def regex(self) -> str:
        """See :func:`trainable_regex`."""
        return trainable_regex(self.model, self.selection)

    def freeze_regex(self) -> str:
        """See :func:`frozen_regex`."""
        return frozen_regex(self.model, self.selection)

    def peft_options(self) -> dict:
        """See :func:`peft_options`."""
        return peft_options(self.model, self.selection)

    def save(self, directory: str | Path, base_model: str, step: int | None = None) -> Path:
        """Write the trained tensors as a onelayer checkpoint (a small fraction of a full ``save_pretrained``):
        ``onelayer eval --checkpoint DIR`` evaluates it on ``base_model`` (the hub id, directory or
        ``smollm2`` the model was loaded from) and ``onelayer.checkpoint.apply_checkpoint`` loads it back."""
        meta = {"base_model": base_model, "layers_spec": self.selection.spec, "layers": list(self.layers),
                "extras": list(self.extras), "trainable_parameters": self.parameters,
                **({"step": step} if step is not None else {})}
        return save_checkpoint(directory, self.model, self.names, meta)


def select_layers(model: nn.Module, spec: str) -> TrainableLayers:
    """Freeze every parameter of ``model`` except those of the layers ``spec`` selects (the grammar of
    ``--layers``: ``14``, ``10-19``, ``middle:4``, ``top:5@scans/arith``, ``embed``, ...), in place, and
    return what stays trainable. Works on any Hugging Face causal LM onelayer finds the decoder layers of.

    Trained tensors keep the dtype they were loaded in: Adam steps of ~1e-6 vanish in bfloat16 weights, so
    load the model in float32 and train under bf16 autocast (TRL/Trainer: ``bf16=True``), as onelayer does.

    Raises :class:`~onelayer.errors.OneLayerError` for a bad spec, or one that selects nothing.
    """
    selection = parse_for_model(model, spec)
    if selection.is_empty:
        raise OneLayerError(f"layer spec '{spec}' selects nothing to train: name at least one layer")
    apply_selection(model, selection)
    return TrainableLayers(model, selection, selected_names(model, selection), parameter_counts(model, selection))

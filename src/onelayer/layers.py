"""Layer selection: a small spec grammar, freezing, and per-layer learning-rate parameter groups.

Grammar: comma-separated terms, united.

    all            every decoder layer            none           nothing (e.g. evaluate the base)
    7              one layer (0-based)            3-9            a range, both ends included
    middle:k       the k geometrically central layers: floor((L-k)/2) .. floor((L-k)/2)+k-1
    frac:a-b       layers whose centre (l+0.5)/L lies in [a, b] (relative depth, 0 = first)
    every:n        layers 0, n, 2n, ...
    top:k@SCAN     the k highest-contribution layers of a scan's profile (SCAN: scan dir or profile.json;
                   SCAN?protocol=best, ?step=N, ?auc pick another of its profiles, see onelayer.profile)
    random:k[:s]   k layers drawn at random with seed s (default 0): the control for top:k
    embed, head, norm   the embeddings, the output head, the final norm

A layer is one decoder block (attention, MLP and their norms). Frozen layers still pass gradients
through to the layers below them; only the selected tensors get ``requires_grad``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from .errors import OneLayerError
from .models import LayerId, decoder_layers, head_is_tied, num_layers, parameter_layers
from .profile import read_profile

EXTRAS = ("embed", "head", "norm")
SPEC_FORMS = ("all, none, 7, 3,7,11, 10-19, middle:k, frac:0.33-0.66, every:3, top:k@SCAN, random:k[:seed], "
              "embed, head, norm")


@dataclass(frozen=True)
class LayerSelection:
    """The outcome of a spec on a model with ``num_layers`` decoder layers."""

    spec: str
    num_layers: int
    layers: tuple[int, ...]
    extras: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # how a profile-driven choice was made (ties, interpolated layers)

    @property
    def is_empty(self) -> bool:
        return not self.layers and not self.extras

    @property
    def is_all(self) -> bool:
        return len(self.layers) == self.num_layers

    def describe(self) -> str:
        parts = [compact_layers(self.layers)] if self.layers else []
        return ", ".join(parts + list(self.extras)) or "nothing"


def compact_layers(layers: tuple[int, ...]) -> str:
    """``(1, 2, 3, 7)`` -> ``"1-3,7"``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _bad(term: str, why: str, n: int) -> OneLayerError:
    return OneLayerError(f"bad layer spec term '{term}': {why}; layers are 0-{n - 1}; valid forms: {SPEC_FORMS}")


def _index(text: str, term: str, n: int) -> int:
    if not re.fullmatch(r"\d+", text):
        raise _bad(term, f"'{text}' is not a layer index", n)
    value = int(text)
    if value >= n:
        raise _bad(term, f"layer {value} is out of range", n)
    return value


def _middle(arg: str, term: str, n: int, notes: list[str]) -> list[int]:
    if not re.fullmatch(r"\d+", arg) or not 1 <= int(arg) <= n:
        raise _bad(term, f"middle:k needs 1 <= k <= {n}", n)
    k = int(arg)
    start = (n - k) // 2
    return list(range(start, start + k))


def _frac(arg: str, term: str, n: int, notes: list[str]) -> list[int]:
    match = re.fullmatch(r"(\d*\.?\d+)-(\d*\.?\d+)", arg)
    if not match:
        raise _bad(term, "frac:a-b needs two numbers in [0, 1], e.g. frac:0.33-0.66", n)
    low, high = float(match[1]), float(match[2])
    if not 0 <= low <= high <= 1:
        raise _bad(term, "frac:a-b needs 0 <= a <= b <= 1", n)
    chosen = [layer for layer in range(n) if low <= (layer + 0.5) / n <= high]
    if not chosen:
        raise _bad(term, "no layer centre falls in that depth interval; widen it", n)
    return chosen


def _every(arg: str, term: str, n: int, notes: list[str]) -> list[int]:
    if not re.fullmatch(r"\d+", arg) or int(arg) < 1:
        raise _bad(term, "every:n needs a whole number n >= 1", n)
    return list(range(0, n, int(arg)))


def _top(arg: str, term: str, n: int, notes: list[str]) -> list[int]:
    count, at, path = arg.partition("@")
    if not at or not re.fullmatch(r"\d+", count) or not 1 <= int(count) <= n or not path:
        raise _bad(term, f"top:k@SCAN needs 1 <= k <= {n} and a scan directory or profile.json, e.g. top:4@scans/a", n)
    profile = read_profile(path)
    if len(profile.points) != n:
        raise _bad(term, f"the profile at {path} is for a model of {len(profile.points)} layers", n)
    chosen, more = top_layers(profile, int(count))
    notes.extend(more)
    notes.append(f"top:{count} of {path} reads its {profile.describe()}")
    notes.append(top_separation(profile, int(count)))
    return chosen


def top_layers(profile, k: int) -> tuple[list[int], list[str]]:
    """The ``k`` highest-contribution layers of ``profile``: measured layers first (interpolated values
    are not evidence), interpolated ones only to fill up; equal contributions go to the shallower layer.
    Returns the layers and notes on how ties and interpolation decided."""
    points, ranked_by = profile.ranking()
    finite = [p for p in points if math.isfinite(p.contribution)]
    order = sorted(finite, key=lambda p: (p.interpolated, -p.contribution, p.layer))
    chosen = order[:k]
    if len(chosen) < k:
        raise OneLayerError(f"the profile has only {len(chosen)} layers with a finite contribution, {k} asked: "
                            "measure more layers (onelayer scan --layers) or ask for fewer")
    notes = [ranked_by] if ranked_by else []
    if not profile.reliable and not ranked_by:  # the warning speaks of contributions
        notes.append(f"the profile is unreliable: {profile.warning}")
    what = "gain" if ranked_by else "C"
    filled = [p.layer for p in chosen if p.interpolated]
    if filled:
        notes.append(f"only {k - len(filled)} measured layers; interpolated layers {filled} fill the top {k}")
    if len(order) > k and order[k].interpolated == chosen[-1].interpolated \
            and order[k].contribution == chosen[-1].contribution:
        notes.append(f"layers {chosen[-1].layer} and {order[k].layer} tie at {what} = {chosen[-1].contribution:.3f}; "
                     "the shallower one is taken")
    return sorted(p.layer for p in chosen), notes


def top_separation(profile, k: int) -> str:
    """Which of the top ``k`` measured layers are distinguishable from the (k+1)-th: the interval of
    C(l) - C(k+1-th) (from the profile's resamples) excludes 0."""
    if profile.ranking()[1]:
        return "full training did not gain, so the profile's intervals (of differences in contribution) cannot " \
               "tell the chosen layers apart from the next"
    order = sorted((p for p in profile.points if not p.interpolated and math.isfinite(p.contribution)),
                   key=lambda p: (-p.contribution, p.layer))
    if len(order) <= k:
        return f"no measured layer ranks below the top {k}: nothing to tell them apart from"
    chosen, following = order[:k], order[k]
    if not profile.differences:
        return ("the profile has no intervals of differences between layers (written by an older onelayer): rerun "
                "onelayer profile SCAN to see which chosen layers are distinguishable from the next")
    apart = [p.layer for p in chosen if (d := profile.difference(p.layer, following.layer)) and d.low > 0]
    close = [p.layer for p in chosen if p.layer not in apart]

    def named(layers: list[int]) -> str:
        many = len(layers) > 1
        return f"layer{'s' if many else ''} {compact_layers(tuple(sorted(layers)))} {'are' if many else 'is'}"

    parts = [f"{named(apart)} above it beyond noise (the interval of the difference excludes 0)"] if apart else []
    parts += [f"{named(close)} not distinguishable from it"] if close else []
    return f"against the next measured layer ({following.layer}, C = {following.contribution:.3f}): " + "; ".join(parts)


def _random(arg: str, term: str, n: int, notes: list[str]) -> list[int]:
    match = re.fullmatch(r"(\d+)(?::(\d+))?", arg)
    if not match or not 1 <= int(match[1]) <= n:
        raise _bad(term, f"random:k[:seed] needs 1 <= k <= {n}, e.g. random:4 or random:4:7", n)
    import random

    return sorted(random.Random(int(match[2] or 0)).sample(range(n), int(match[1])))


# Prefixed terms: one function each, so a new form is one entry here.
PREFIXED: dict[str, Callable[[str, str, int, list[str]], list[int]]] = {
    "middle": _middle, "frac": _frac, "every": _every, "top": _top, "random": _random}


def parse_layer_spec(spec: str, n_layers: int) -> LayerSelection:
    """Parse a layer spec for a model of ``n_layers`` decoder layers.

    Raises :class:`OneLayerError` with the valid range and forms when the spec is malformed, out of
    range, or selects nothing (other than ``none``).
    """
    if n_layers < 1:
        raise OneLayerError(f"a model needs at least one layer, got {n_layers}")
    terms = [t.strip() for t in str(spec).split(",")]  # case kept: top:k@PATH holds a path
    if not spec or not str(spec).strip() or any(not t for t in terms):
        raise OneLayerError(f"empty layer spec '{spec}': valid forms: {SPEC_FORMS}")
    layers: set[int] = set()
    extras: set[str] = set()
    notes: list[str] = []
    for term in terms:
        if ":" not in term:
            term = term.lower()
        if term == "all":
            layers.update(range(n_layers))
        elif term == "none":
            continue
        elif term in EXTRAS:
            extras.add(term)
        elif ":" in term:
            kind, _, arg = term.partition(":")
            kind = kind.lower()
            if kind not in PREFIXED:
                raise _bad(term, f"unknown form '{kind}:'", n_layers)
            layers.update(PREFIXED[kind](arg, term, n_layers, notes))
        elif re.fullmatch(r"\d+-\d+", term):
            low, high = (_index(x, term, n_layers) for x in term.split("-"))
            if low > high:
                raise _bad(term, "a range needs start <= end", n_layers)
            layers.update(range(low, high + 1))
        else:
            layers.add(_index(term, term, n_layers))
    return LayerSelection(str(spec), n_layers, tuple(sorted(layers)), tuple(e for e in EXTRAS if e in extras),
                          tuple(notes))


def lr_scales_from_profile(profile, layers: tuple[int, ...] | list[int]) -> tuple[dict[int, float], str]:
    """Contribution-guided learning-rate scales for ``layers``: proportional to the layer's contribution (its
    own gain where full training did not gain: :meth:`~onelayer.profile.Profile.ranking`) clipped at 0 (harmful
    layers do not move), normalised to a mean of 1 over the trained layers (so the total step size matches
    uniform training at the same --lr). Unmeasured layers use their interpolated value. Returns the scales and
    the rule, stated for the run's metadata."""
    points, ranked_by = profile.ranking()
    by_layer = {p.layer: p.contribution for p in points}
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise OneLayerError(f"the profile has no layer {missing[0]}: it was made for another model")
    clipped = {layer: max(by_layer[layer], 0.0) if math.isfinite(by_layer[layer]) else 0.0 for layer in layers}
    total = sum(clipped.values())
    what = "gain" if ranked_by else "contribution"
    if total <= 0:
        raise OneLayerError(f"no trained layer has a positive {what} in that profile: contribution-guided "
                            "learning rates would train nothing; use another profile or plain --lr")
    scales = {layer: c * len(clipped) / total for layer, c in clipped.items()}
    c = "G" if ranked_by else "C"
    rule = (f"lr_l = lr * max({c}_l, 0) / mean over trained layers of max({c}, 0); {c} from the profile's "
            f"{profile.describe()}" + (f" ({ranked_by})" if ranked_by else ""))
    return scales, rule


def select_layers(model: nn.Module, spec: str) -> LayerSelection:
    """Parse ``spec`` against ``model``'s layer count."""
    return parse_layer_spec(spec, num_layers(model.config))


def selected_ids(model: nn.Module, selection: LayerSelection) -> set[LayerId]:
    """The layer ids (decoder-layer indices, ``embed``/``head``/``norm``) whose tensors a selection trains."""
    wanted: set[LayerId] = set(selection.layers) | set(selection.extras)
    if "head" in wanted and head_is_tied(model):
        wanted.add("embed")  # a tied head *is* the embedding matrix
    return wanted


def selected_names(model: nn.Module, selection: LayerSelection) -> list[str]:
    """Names of the parameters a selection trains."""
    layer_of, wanted = parameter_layers(model), selected_ids(model, selection)
    return [name for name, _ in model.named_parameters() if layer_of[name] in wanted]


def parameter_counts(model: nn.Module, selection: LayerSelection) -> dict:
    """Trainable parameter counts of a selection: per selected layer id, in total, and the model's."""
    layer_of = parameter_layers(model)
    wanted = selected_ids(model, selection)
    per_layer: dict[str, int] = {}
    for name, param in model.named_parameters():
        if layer_of[name] in wanted:
            key = str(layer_of[name])
            per_layer[key] = per_layer.get(key, 0) + param.numel()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(per_layer.values())
    return {"per_layer": per_layer, "trainable": trainable, "total": total,
            "trainable_fraction": trainable / total if total else 0.0}


def apply_selection(
    model: nn.Module,
    selection: LayerSelection,
    weight_decay: float = 0.0,
    lr_scales: Mapping[LayerId, float] | None = None,
) -> list[dict]:
    """Freeze everything but ``selection`` and return optimizer parameter groups.

    One group per (layer id, decays?) pair. Each group carries ``layer`` and ``lr_scale`` (the factor
    the training loop multiplies the scheduled learning rate by; 1.0 unless ``lr_scales`` says
    otherwise) and ``names``. Weight decay applies to matrices only, not to norms and biases.
    """
    if selection.num_layers != len(decoder_layers(model)[1]):
        raise OneLayerError(f"the selection was made for {selection.num_layers} layers, the model has "
                            f"{len(decoder_layers(model)[1])}: parse the spec against this model")
    layer_of = parameter_layers(model)
    wanted = selected_ids(model, selection)
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(layer_of[name] in wanted)
        if param.requires_grad:
            chosen.append((name, param))
    return param_groups(chosen, layer_of, weight_decay, lr_scales)


def param_groups(named: list[tuple[str, nn.Parameter]], layer_of: Mapping[str, LayerId], weight_decay: float = 0.0,
                 lr_scales: Mapping[LayerId, float] | None = None) -> list[dict]:
    """Optimizer groups of the trained tensors ``named``: one per (layer id, decays?) pair, each with
    ``layer``, ``lr_scale`` and ``names``. Weight decay applies to matrices only."""
    lr_scales = dict(lr_scales or {})
    groups: dict[tuple, dict] = {}
    for name, param in named:
        layer = layer_of[name]
        scale = float(lr_scales.get(layer, 1.0))
        if not math.isfinite(scale) or scale < 0:
            raise OneLayerError(f"learning-rate scale {scale} for layer {layer} must be finite and >= 0")
        decay = weight_decay if param.ndim >= 2 else 0.0
        group = groups.setdefault((str(layer), decay), {
            "params": [], "names": [], "layer": layer, "lr_scale": scale, "weight_decay": decay})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that currently require gradients."""
    return [name for name, p in model.named_parameters() if p.requires_grad]

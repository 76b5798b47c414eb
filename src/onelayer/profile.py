"""A layer-contribution profile: what a scan measured, as a data type every part of onelayer reads.

Computed by :func:`onelayer.analysis.contribution.contribution_profile`; written by a scan as ``profile.json``
(and, beside it, the same profile under other protocols or evaluations: ``profile-best.json``,
``profile-auc.json``, ``profile-step000020.json``, ... see :func:`profile_file`); read here by layer selection
(``top:k@SCAN``), learning-rate guidance (``--lr-from``) and the analyses.

A profile reference is a scan directory or a profile JSON file, optionally with a query naming which of a scan's
profiles: ``SCAN?protocol=best`` (each configuration at its own best learning rate; default ``study``: every run
at the full run's best rate), ``SCAN?step=20`` (the evaluation after 20 steps), ``SCAN?auc`` (area under the
curve over the evaluated steps); they combine, ``SCAN?protocol=best&auc``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .errors import OneLayerError

PROTOCOLS = ("study", "best")


def interpolate(measured: Mapping[int, float], num_layers: int) -> list[tuple[float, bool]]:
    """Values for layers ``0..num_layers-1`` from the measured ones: linear between measured layers,
    the nearest measured value beyond the ends; the flag marks interpolated layers."""
    if not measured:
        raise OneLayerError("cannot interpolate a profile with no measured layer")
    xs = sorted(measured)
    if xs[0] < 0 or xs[-1] >= num_layers:
        raise OneLayerError(f"measured layers {xs} fall outside 0-{num_layers - 1}")
    values = np.interp(np.arange(num_layers), xs, [measured[x] for x in xs])
    return [(float(v), layer not in measured) for layer, v in enumerate(values)]


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class LayerPoint:
    layer: int
    contribution: float
    low: float
    high: float
    interpolated: bool
    lr_scale: float = 1.0  # the learning rate (times --lr) this layer's runs are read at


@dataclass(frozen=True)
class LayerDifference:
    """C(first) - C(second) of two measured layers, its interval from the same resamples as the profile's."""

    first: int
    second: int
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class RateChoice:
    """One layer under both protocols: at the full run's best rate (``study``) and at its own best (``best``);
    ``gain`` is best minus study (never below 0); ranks are among the layers measured under both (1 = highest)."""

    layer: int
    best_lr_scale: float
    study: Estimate
    best: Estimate
    gain: Estimate
    rank_study: int
    rank_best: int
    lr_scales: tuple[float, ...] = ()  # the rates this layer was trained at


@dataclass(frozen=True)
class RateRobustness:
    """How much a scan's answer depends on the learning rate (scans with ``--lr-grid``)."""

    lr_scales: tuple[float, ...]      # the rates full training was trained at
    full_accuracy: tuple[float, ...]  # the full run's mean accuracy at each rate, in the order of lr_scales
    full_lr_scale: float              # its best rate: the study's protocol reads every run there
    spearman: float                   # rank agreement of the two protocols' profiles (measured layers)
    kendall: float
    layers: tuple[RateChoice, ...]

    @property
    def rate_dependent(self) -> list[int]:
        """Layers whose rank differs between the protocols."""
        return [c.layer for c in self.layers if c.rank_study != c.rank_best]


@dataclass(frozen=True)
class Profile:
    """A contribution profile over all layers; ``reliable`` is False unless full training's gain is above
    the noise (its interval excludes 0 and it is positive); ``warning`` then says why. ``method`` says how the
    intervals were made, ``notes`` what they omit; ``seed_rank_correlation`` is the mean Spearman correlation
    between the profiles of single seeds (None with one seed): the ceiling for any claim about the ranking.
    ``layer_gains`` holds each measured layer's own gain over the base model (S_l - S_base, in the
    ``contribution`` field, with its interval, read at the same rate as its point): defined even when
    contributions are not."""

    points: tuple[LayerPoint, ...]
    full_gain: Estimate
    reliable: bool
    warning: str
    method: str = ""
    seeds: int = 1
    seed_rank_correlation: float | None = None
    protocol: str = "study"
    full_lr_scale: float = 1.0
    step: int | None = None  # the evaluation read: after this many steps; None = each run's final one
    auc_steps: tuple[int, ...] = ()  # non-empty: area under the curve over these evaluated steps
    differences: tuple[LayerDifference, ...] = ()
    robustness: RateRobustness | None = None
    notes: tuple[str, ...] = ()
    layer_gains: tuple[LayerPoint, ...] = ()

    def describe(self) -> str:
        """Which protocol and evaluation the profile reads, in words (for selection notes and reports)."""
        rate = "the full run's best" if self.robustness else "the scan's"
        protocol = (f"study protocol (every run at {rate} learning rate, {self.full_lr_scale:g}x --lr)"
                    if self.protocol == "study" else
                    f"per-configuration best learning rates (full training at {self.full_lr_scale:g}x --lr)")
        if self.auc_steps:
            when = f"area under the curve over steps {', '.join(map(str, self.auc_steps))}"
        else:
            when = "final evaluation" if self.step is None else f"evaluation after {self.step} steps"
        return f"{protocol}; {when}"

    def ranking(self) -> tuple[tuple[LayerPoint, ...], str]:
        """What ranks the layers for selection (``top:k``) and guidance (``--lr-from``), and a note on it: the
        contributions where full training gained (C then orders layers as their own gains do); otherwise each
        layer's own gain over the base model, S_l - S_base (in ``contribution``; unmeasured layers linearly
        between measured ones), because C's sign flips when full training lost and C is undefined when it did
        not move: ranking by it would put the layers that hurt most first. A profile without a measured full
        gain (NaN: a prediction, :mod:`onelayer.experiments.predict`) ranks by its points."""
        gain = self.full_gain.value
        if not gain <= 0:
            return self.points, ""
        if not self.layer_gains:
            raise OneLayerError(f"full training did not gain over the base model ({gain:+.4f}), so contributions "
                                "cannot rank layers, and this profile (from an older onelayer) has no per-layer "
                                "gains: rerun onelayer profile SCAN")
        measured = {g.layer: g for g in self.layer_gains}
        value, low, high = (interpolate({k: getattr(g, name) for k, g in measured.items()}, len(self.points))
                            for name in ("contribution", "low", "high"))
        points = tuple(measured.get(p.layer) or LayerPoint(p.layer, value[p.layer][0], low[p.layer][0],
                                                           high[p.layer][0], True, p.lr_scale)
                       for p in self.points)
        return points, (f"full training did not gain over the base model ({gain:+.4f}): layers are ranked by "
                        "their own gain over it, S_l - S_base, not by contribution")

    def difference(self, first: int, second: int) -> LayerDifference | None:
        """C(first) - C(second) with its interval, when both layers were measured."""
        for d in self.differences:
            if (d.first, d.second) == (first, second):
                return d
            if (d.first, d.second) == (second, first):
                return LayerDifference(first, second, -d.value, -d.high, -d.low)
        return None


def _build(cls, data: Mapping):
    """A dataclass from ``asdict`` output, nested records included; keys it does not know are ignored."""
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            continue
        kind = {"full_gain": Estimate, "study": Estimate, "best": Estimate, "gain": Estimate,
                "robustness": RateRobustness}.get(key)
        if kind is not None and value is not None:
            value = _build(kind, value)
        elif key in ("points", "layer_gains", "differences", "layers"):
            item = {"points": LayerPoint, "layer_gains": LayerPoint, "differences": LayerDifference,
                    "layers": RateChoice}[key]
            value = tuple(_build(item, v) for v in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def profile_from_dict(data: Mapping) -> Profile:
    """The inverse of ``dataclasses.asdict`` on a :class:`Profile` (as in ``profile.json``); profiles written
    by older versions (without the newer fields) read with their defaults."""
    return _build(Profile, data)


def profile_file(scan_dir: str | Path, protocol: str = "study", step: int | None = None, auc: bool = False) -> Path:
    """Where a scan keeps its profile under ``protocol`` at evaluation ``step`` (None: final) or as an area under
    the curve: ``profile.json``, ``profile-best.json``, ``profile-step000020.json``, ``profile-best-auc.json``."""
    if protocol not in PROTOCOLS:
        raise OneLayerError(f"unknown profile protocol '{protocol}': use {' or '.join(PROTOCOLS)}")
    if auc and step is not None:
        raise OneLayerError("a profile is either at one step or the area under the curve, not both")
    parts = ["profile"] + (["best"] if protocol == "best" else []) + (["auc"] if auc else []) + (
        [f"step{step:06d}"] if step is not None else [])
    return Path(scan_dir) / ("-".join(parts) + ".json")


def parse_reference(reference: str | Path) -> tuple[Path, str, int | None, bool]:
    """``PATH[?protocol=study|best][&step=N][&auc]`` -> (path, protocol, step, auc)."""
    text = str(reference)
    path, _, query = text.partition("?")
    protocol, step, auc = "study", None, False
    for pair in filter(None, query.split("&")):
        key, _, value = pair.partition("=")
        if key == "protocol" and value in PROTOCOLS:
            protocol = value
        elif key == "step" and value.isdigit():
            step = int(value)
        elif key == "auc" and value in ("", "1", "true"):
            auc = True
        else:
            raise OneLayerError(f"'{pair}' in profile reference '{text}' is not one of protocol=study|best, step=N, "
                                "auc: e.g. scans/a?protocol=best")
    return Path(path), protocol, step, auc


def reference_path(reference: str | Path) -> Path:
    """The scan directory or file a profile reference names, without its query."""
    return parse_reference(reference)[0]


def reference_suffix(reference: str | Path) -> str:
    """A file-name suffix for a profile reference's query (``SCAN?protocol=best`` -> ``-protocol-best``; none
    without one), so that what is read from each reference gets a folder of its own."""
    query = str(reference).partition("?")[2]
    return "-" + query.replace("&", "-").replace("=", "-") if query else ""


def read_profile(reference: str | Path) -> Profile:
    """A profile from a scan directory (its ``profile.json``, or the profile a query names), an onelayer predict
    directory (its ``predicted.json``) or a profile JSON file."""
    path, protocol, step, auc = parse_reference(reference)
    queried = (protocol, step, auc) != ("study", None, False)
    if path.is_dir():
        file = profile_file(path, protocol, step, auc)
        predicted = path / "predicted.json"
        if not queried and not file.is_file() and predicted.is_file():
            file = predicted  # an onelayer predict directory: its profile is a prediction
    elif queried:
        raise OneLayerError(f"'{reference}': a query (?protocol=, ?step=, ?auc) needs a scan directory, not a file")
    else:
        file = path
    if not file.is_file():
        fix = (f"write it with onelayer profile {path}" + (f" --step {step}" if step is not None else "")
               + (" --auc" if auc else "") + (" (a best-rate profile needs a scan with --lr-grid)"
                                               if protocol == "best" else "")) if queried else \
            ("pass a scan directory whose profile exists (onelayer profile SCAN writes it), an onelayer predict "
             "directory or a profile.json")
        raise OneLayerError(f"no contribution profile at {file}: {fix}")
    try:
        return profile_from_dict(json.loads(file.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise OneLayerError(f"{file} is not a onelayer profile.json ({err})") from err

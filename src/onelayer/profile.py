"""A layer-contribution profile: what a scan measured, as a data type every part of onelayer reads.

Computed by :func:`onelayer.analysis.contribution.layer_profile`; written by a scan as ``profile.json``;
read here by layer selection (``top:k@SCAN``), learning-rate guidance (``--lr-from``) and the analyses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import OneLayerError


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


@dataclass(frozen=True)
class Profile:
    """A contribution profile over all layers; ``reliable`` is False unless full training's gain is above
    the noise (its interval excludes 0 and it is positive); ``warning`` then says why. ``layer_gains`` holds
    each measured layer's own gain over the base model (S_l - S_base, as ``contribution``, with its
    interval): defined even when contributions are not."""

    points: tuple[LayerPoint, ...]
    full_gain: Estimate
    reliable: bool
    warning: str
    layer_gains: tuple[LayerPoint, ...] = ()


def profile_from_dict(data: Mapping) -> Profile:
    """The inverse of ``dataclasses.asdict`` on a :class:`Profile` (as in ``profile.json``)."""
    return Profile(tuple(LayerPoint(**p) for p in data["points"]), Estimate(**data["full_gain"]),
                   bool(data["reliable"]), str(data["warning"]),
                   tuple(LayerPoint(**p) for p in data.get("layer_gains", ())))


def read_profile(path: str | Path) -> Profile:
    """A profile from a scan directory (its ``profile.json``) or from a profile JSON file."""
    path = Path(path)
    file = path / "profile.json" if path.is_dir() else path
    if not file.is_file():
        raise OneLayerError(f"no contribution profile at {file}: pass a scan directory whose profile exists "
                            "(onelayer profile SCAN writes it) or a profile.json")
    try:
        return profile_from_dict(json.loads(file.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise OneLayerError(f"{file} is not a onelayer profile.json ({err})") from err

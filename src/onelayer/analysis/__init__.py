"""Analyses and figures over finished runs (reading their log.jsonl / eval.jsonl, never training)."""

from ..profile import Profile
from .contribution import contribution, layer_profile
from .curves import load_run_logs, plot_runs

__all__ = ["Profile", "contribution", "layer_profile", "load_run_logs", "plot_runs"]

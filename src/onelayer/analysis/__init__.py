"""Analyses and figures over finished runs (reading their log.jsonl / eval.jsonl, never training)."""

from .curves import load_run_logs, plot_runs

__all__ = ["load_run_logs", "plot_runs"]

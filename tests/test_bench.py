"""The benchmark scripts' bookkeeping (their timings need a GPU; what they read from a run does not)."""
import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import pytest

from onelayer.cli import main

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_sections_phases_come_from_the_scans_run_logs(tmp_path, saved_tiny):
    # a real scan on disk: full training alone, two single-layer runs trained together
    scan = tmp_path / "scan"
    assert main(["scan", "--model", str(saved_tiny), "--task", "toy:repeat", "--layers", "0,2", "--steps", "2",
                 "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--eval-n", "6",
                 "--lr", "1e-2", "--device", "cpu", "--engine", "fast", "--no-progress", "--concurrent", "2",
                 "--out", str(scan)]) == 0
    phases = bench_module("rl_speed").demo_phases(scan)
    logs = {d.name: [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
            for d in (scan / "runs").iterdir() if (d / "log.jsonl").exists()}
    assert sorted(logs) == ["full-s0", "layer000-s0", "layer002-s0"]
    assert phases["variant_steps"] == 4 and phases["full_steps"] == 2
    # a joint generation is counted once per step, not once per variant
    joint = defaultdict(set)
    for name in ("layer000-s0", "layer002-s0"):
        for r in logs[name]:
            assert r["concurrent_variants"] == 2
            joint[r["step"]].add(r["seconds_generation"])
    assert all(len(v) == 1 for v in joint.values())
    generation = sum(r["seconds_generation"] for r in logs["full-s0"]) + sum(v.pop() for v in joint.values())
    assert phases["generation"] == pytest.approx(generation)
    assert phases["update"] == pytest.approx(sum(r["seconds_update"] for rows in logs.values() for r in rows))
    assert phases["mean_completion_tokens_single_layer"] == pytest.approx(
        sum(r["completion_tokens"] for n in ("layer000-s0", "layer002-s0") for r in logs[n]) / 4)

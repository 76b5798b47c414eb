import json

import pytest

from onelayer.cli import main
from onelayer.config import SamplingConfig, TrainConfig
from onelayer.errors import OneLayerError
from onelayer.experiments.rundir import run_dir, run_status
from onelayer.experiments.scan import (
    PlannedRun,
    ScanConfig,
    plan_scan,
    probe_layers,
    probe_results,
    run_scan,
    scan_profile,
)


def scan_config(out, model, **recipe):
    base = dict(model=str(model), task="toy:repeat", layers="1,3", out=str(out), steps=2, prompts_per_step=2,
                group_size=4, lr=1e-2, sampling=SamplingConfig(max_new_tokens=6), eval_n=6, device="cpu")
    return ScanConfig(recipe=TrainConfig(**{**base, **recipe}))


def test_plan_is_exact():
    config = ScanConfig(recipe=TrainConfig(layers="every:2", seed=5), seeds=2)
    names = [r.name for r in plan_scan(config, 4)]
    assert names == ["base", "full-s5", "full-s6", "layer000-s5", "layer000-s6", "layer002-s5", "layer002-s6"]
    assert plan_scan(config, 4)[3] == PlannedRun("layer000-s5", "layer", 5, 0)
    with pytest.raises(OneLayerError, match="names no decoder layer"):
        plan_scan(ScanConfig(recipe=TrainConfig(layers="embed")), 4)
    with pytest.raises(OneLayerError, match="--seeds must be >= 1"):
        plan_scan(ScanConfig(seeds=0), 4)


def _fake_execute(calls, scores, fail=(), interrupt=None):
    """Stands in for training: writes per-example results as a finished run would."""
    def execute(config, run, scan_dir):
        calls.append(run.name)
        if run.name == interrupt:
            raise KeyboardInterrupt
        if run.name in fail:
            raise RuntimeError("CUDA out of memory")
        directory = run_dir(scan_dir, run)
        (directory / "evals").mkdir(parents=True, exist_ok=True)
        examples = directory / "evals" / "final.examples.jsonl"
        correct = scores.get((run.kind, run.layer, run.lr_scale)) or scores[run.kind, run.layer]
        examples.write_text("".join(json.dumps({"correct": [bool(c)]}) + "\n" for c in correct))
        (directory / "result.json").write_text(json.dumps({"examples": str(examples), "kind": run.kind,
                                                           "accuracy": sum(correct) / len(correct)}))
        return {}
    return execute


SCORES = {("base", None): [0] * 40, ("full", None): [1] * 20 + [0] * 20,
          ("layer", 1): [1] * 10 + [0] * 30, ("layer", 3): [1] * 20 + [0] * 20}


def test_a_killed_scan_resumes_without_repeating_finished_runs(tmp_path, saved_tiny):
    config = scan_config(tmp_path / "scan", saved_tiny)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_scan(config, progress=False, execute=_fake_execute(calls, SCORES, interrupt="layer001-s0"))
    assert calls == ["base", "full-s0", "layer001-s0"]
    calls.clear()
    run_scan(config, progress=False, execute=_fake_execute(calls, SCORES))
    assert calls == ["layer001-s0", "layer003-s0"]
    profile, status = scan_profile(tmp_path / "scan", n_resamples=200)
    assert set(status.values()) == {"done"}
    c = {p.layer: p for p in profile.points}
    assert c[1].contribution == pytest.approx(0.5) and c[3].contribution == pytest.approx(1.0)
    assert c[2].interpolated and c[2].contribution == pytest.approx(0.75)
    assert c[0].interpolated and c[0].contribution == pytest.approx(0.5)


def test_a_failed_run_is_recorded_and_retried_alone(tmp_path, saved_tiny):
    config = scan_config(tmp_path / "scan", saved_tiny)
    calls = []
    plan = run_scan(config, progress=False, execute=_fake_execute(calls, SCORES, fail={"layer001-s0"}))
    assert calls == ["base", "full-s0", "layer001-s0", "layer003-s0"]
    failed = [r for r in plan if run_status(tmp_path / "scan", r) == "failed"]
    assert [r.name for r in failed] == ["layer001-s0"]
    assert "CUDA out of memory" in (run_dir(tmp_path / "scan", failed[0]) / "error.txt").read_text()
    profile, _ = scan_profile(tmp_path / "scan", n_resamples=100)  # a partial profile from what finished
    assert [p.interpolated for p in profile.points] == [True, True, True, False]
    calls.clear()
    run_scan(config, progress=False, execute=_fake_execute(calls, SCORES))
    assert calls == ["layer001-s0"]


def test_probes_rerun_the_best_and_worst_layers_at_scaled_learning_rates(tmp_path, saved_tiny):
    config = ScanConfig(recipe=scan_config(tmp_path / "scan", saved_tiny).recipe, lr_scales="0.5,2")
    scores = {**SCORES, ("probe", 3, 2.0): [1] * 30 + [0] * 10, ("probe", 3, 0.5): [1] * 5 + [0] * 35,
              ("probe", 1, 2.0): [1] * 25 + [0] * 15, ("probe", 1, 0.5): [0] * 40}
    calls = []
    plan = run_scan(config, progress=False, execute=_fake_execute(calls, scores))
    # the profile says layer 3 (C = 1.0) is best and layer 1 (C = 0.5) worst
    assert calls[4:] == ["layer001-lr0.5x-s0", "layer001-lr2x-s0", "layer003-lr0.5x-s0", "layer003-lr2x-s0"]
    assert plan[-1] == PlannedRun("layer003-lr2x-s0", "probe", 0, 3, 2.0)
    rows = {(r["layer"], r["lr_scale"]): r for r in probe_results(tmp_path / "scan", n_resamples=200)}
    # C = accuracy / 0.5 (base 0, full 0.5); rank among layers {1, 3} with the probed value swapped in
    assert rows[3, 2.0]["contribution"] == pytest.approx(1.0) and rows[3, 2.0]["rank"] == 1
    assert rows[3, 2.0]["probe_contribution"] == pytest.approx(1.5) and rows[3, 2.0]["probe_rank"] == 1
    assert rows[3, 0.5]["probe_contribution"] == pytest.approx(0.25) and rows[3, 0.5]["probe_rank"] == 2
    assert rows[1, 2.0]["rank"] == 2 and rows[1, 2.0]["probe_contribution"] == pytest.approx(1.25)
    assert rows[1, 2.0]["probe_rank"] == 1 and rows[1, 0.5]["probe_contribution"] == 0.0
    profile, _ = scan_profile(tmp_path / "scan", n_resamples=100)  # probes do not enter the profile
    assert {p.layer: p.contribution for p in profile.points if not p.interpolated} == {1: 0.5, 3: 1.0}
    calls.clear()
    run_scan(config, progress=False, execute=_fake_execute(calls, scores))
    assert calls == []  # resumed: nothing left to do


def test_probe_layer_choice_and_bad_scales(tmp_path, saved_tiny):
    contributions = {0: 0.2, 4: 0.9, 8: -0.1}
    assert probe_layers("best,worst", contributions, 12) == [4, 8]
    assert probe_layers("best,0", contributions, 12) == [0, 4]
    with pytest.raises(OneLayerError, match="did not measure"):
        probe_layers("5", contributions, 12)
    with pytest.raises(OneLayerError, match="names no layer"):
        probe_layers("", contributions, 12)
    config = ScanConfig(recipe=scan_config(tmp_path / "scan", saved_tiny).recipe, lr_scales="2,x")
    with pytest.raises(OneLayerError, match="comma-separated numbers"):
        run_scan(config, progress=False, execute=_fake_execute([], SCORES))


def test_scan_end_to_end_from_the_command_line(tmp_path, saved_tiny, capsys):
    out = tmp_path / "scan"
    code = main(["scan", "--model", str(saved_tiny), "--task", "toy:repeat", "--layers", "1,3", "--steps", "2",
                 "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--eval-n", "6",
                 "--lr", "1e-2", "--device", "cpu", "--out", str(out), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert all((out / "runs" / name / "result.json").is_file() for name in ("base", "full-s0", "layer001-s0",
                                                                             "layer003-s0"))
    profile = json.loads((out / "profile.json").read_text())
    assert [p["layer"] for p in profile["points"]] == [0, 1, 2, 3]
    assert (out / "profile.png").stat().st_size > 10_000 and "| layer |" in (out / "profile.md").read_text()
    # each trained run evaluated once, at its last step, on the same examples as the base
    rows = [json.loads(x) for x in (out / "runs" / "layer001-s0" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and rows[0]["n"] == 6
    # each run records how far its trained layers moved, and only those
    change = json.loads((out / "runs" / "layer001-s0" / "result.json").read_text())["param_change"]
    assert list(change) == ["1"] and change["1"] > 0
    full = json.loads((out / "runs" / "full-s0" / "result.json").read_text())["param_change"]
    assert sorted(full) == ["0", "1", "2", "3"] and all(v > 0 for v in full.values())
    assert json.loads((out / "runs" / "base" / "result.json").read_text())["param_change"] is None
    code = main(["profile", str(out)])
    assert code == 0
    # the same scan from Python leaves the same files, its profile included
    python = tmp_path / "python"
    run_scan(scan_config(python, saved_tiny), progress=False)

    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(python) == files(out)
    assert json.loads((python / "profile.json").read_text()) == profile
    assert main(["profile", str(tmp_path)]) == 2


def _run(command: list[str], seconds: float):
    """Run ``command`` in its own process group; a hang past ``seconds`` kills the group and fails the test
    (instead of stalling CI)."""
    import os
    import signal
    import subprocess

    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... did not finish in {seconds} s")
    assert process.returncode == 0, err[-2000:]


def test_two_process_scan_gives_the_same_profile_as_one(tmp_path, saved_tiny):
    import sys

    args = ["scan", "--model", str(saved_tiny), "--task", "toy:repeat", "--layers", "1,3", "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--eval-n", "6", "--lr", "1e-2",
            "--device", "cpu", "--no-progress"]
    _run([sys.executable, "-m", "onelayer", *args, "--out", str(tmp_path / "solo")], seconds=300)
    # --standalone: a rendezvous on a free port, so concurrent test runs on one machine do not collide
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "onelayer",
          *args, "--out", str(tmp_path / "duo")], seconds=300)
    a = json.loads((tmp_path / "solo" / "profile.json").read_text())
    b = json.loads((tmp_path / "duo" / "profile.json").read_text())
    assert a["points"] == b["points"] and a["full_gain"] == b["full_gain"]
    def science(run_dir):  # everything but wall-clock timings
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("seconds", "tokens_per"))}
                for line in (run_dir / "log.jsonl").read_text().splitlines()]

    for name in ("full-s0", "layer001-s0", "layer003-s0"):
        assert science(tmp_path / "solo" / "runs" / name) == science(tmp_path / "duo" / "runs" / name)


def test_a_scan_whose_full_training_gained_nothing_reports_it_loudly(tmp_path, saved_tiny):
    from onelayer.experiments.report import build_report

    flat = {("base", None): [1] * 10 + [0] * 30, ("full", None): [1] * 10 + [0] * 30,
            ("layer", 1): [1] * 12 + [0] * 28, ("layer", 3): [1] * 10 + [0] * 30}
    run_scan(scan_config(tmp_path / "scan", saved_tiny), progress=False, execute=_fake_execute([], flat))
    profile, _ = scan_profile(tmp_path / "scan", n_resamples=100)
    assert not profile.reliable and "within noise" in profile.warning
    md = build_report(tmp_path / "scan").read_text()
    assert "> **Warning:** full training changed the metric by +0.0000" in md
    assert "0 of 4 layers measured with a finite contribution" in md


def test_a_concurrent_scan_gives_the_runs_of_a_scan_one_at_a_time(tmp_path, saved_tiny):
    args = ["scan", "--model", str(saved_tiny), "--task", "toy:repeat", "--layers", "0-3", "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--eval-n", "6", "--lr", "1e-2",
            "--device", "cpu", "--engine", "fast", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "alone"), "--concurrent", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "together"), "--concurrent", "3"]) == 0
    a = json.loads((tmp_path / "alone" / "profile.json").read_text())
    b = json.loads((tmp_path / "together" / "profile.json").read_text())
    assert [p["contribution"] for p in a["points"]] == [p["contribution"] for p in b["points"]]

    def science(run):
        return [{k: round(v, 5) if isinstance(v, float) else v for k, v in json.loads(line).items()
                 if not k.startswith(("seconds", "tokens_per", "concurrent"))}
                for line in (run / "log.jsonl").read_text().splitlines()]

    for layer in range(4):
        name = f"layer{layer:03d}-s0"
        assert science(tmp_path / "alone" / "runs" / name) == science(tmp_path / "together" / "runs" / name)
        logs = [json.loads(x) for x in (tmp_path / "together" / "runs" / name / "log.jsonl").read_text().splitlines()]
        assert [r["concurrent_variants"] for r in logs] == [2, 2]  # 4 runs at up to 3: two groups of 2
        together = json.loads((tmp_path / "together" / "runs" / name / "result.json").read_text())
        alone = json.loads((tmp_path / "alone" / "runs" / name / "result.json").read_text())
        assert together["accuracy"] == alone["accuracy"] and list(together["param_change"]) == [str(layer)]
        assert together["param_change"][str(layer)] == pytest.approx(alone["param_change"][str(layer)], rel=1e-4)


def test_a_failed_variant_is_recorded_alone_and_the_group_retried(tmp_path, saved_tiny, monkeypatch):
    import onelayer.experiments.recipes as recipes

    calls = []

    def group(recipes, progress):
        calls.append([r.layers for r in recipes])
        return [RuntimeError("boom") if r.layers == "1" and len(calls) == 1 else {"examples": "x", "accuracy": 0.5}
                for r in recipes]

    monkeypatch.setattr(recipes, "train_and_evaluate_variants", group)
    config = scan_config(tmp_path / "scan", saved_tiny, layers="0-3")
    config.concurrent = 2
    run_scan(config, progress=False, execute=_fake_execute([], {**SCORES, ("layer", 0): [0] * 40,
                                                                 ("layer", 2): [0] * 40}))
    assert calls == [["0", "1"], ["2", "3"]]
    assert run_status(tmp_path / "scan", PlannedRun("layer001-s0", "layer", 0, 1)) == "failed"
    assert "boom" in (tmp_path / "scan" / "runs" / "layer001-s0" / "error.txt").read_text()
    assert run_status(tmp_path / "scan", PlannedRun("layer000-s0", "layer", 0, 0)) == "done"
    run_scan(config, progress=False, execute=_fake_execute([], SCORES))
    assert calls[-1] == ["1"]  # only the failed one is retried
    assert not (tmp_path / "scan" / "runs" / "layer001-s0" / "error.txt").exists()


def test_concurrent_flag_checks(tmp_path, saved_tiny):
    from onelayer.experiments.scan import concurrency

    config = scan_config(tmp_path, saved_tiny)
    assert concurrency(config) == 1  # automatic on a CPU: one at a time
    config.concurrent = -1
    with pytest.raises(OneLayerError, match="must be >= 0"):
        concurrency(config)
    config.concurrent = 2
    config.recipe.task = "maze:3"
    with pytest.raises(OneLayerError, match="multi-turn agent task: use --concurrent 1"):
        concurrency(config)

import json
import re
from dataclasses import replace

import pytest

from onelayer.cli import main
from onelayer.config import SamplingConfig, TrainConfig
from onelayer.errors import OneLayerError
from onelayer.experiments.rundir import run_dir, run_status
from onelayer.experiments.scan import (
    PlannedRun,
    ScanConfig,
    evaluated_steps,
    parse_lr_grid,
    plan_lines,
    plan_scan,
    run_scan,
    scan_profile,
)
from onelayer.layers import parse_layer_spec
from onelayer.profile import read_profile


def scan_config(out, model, lr_grid="", seeds=1, **recipe):
    base = dict(model=str(model), task="toy:repeat", layers="1,3", out=str(out), steps=2, prompts_per_step=2,
                group_size=4, lr=1e-2, sampling=SamplingConfig(max_new_tokens=6), eval_n=6, device="cpu")
    return ScanConfig(recipe=TrainConfig(**{**base, **recipe}), lr_grid=lr_grid, seeds=seeds)


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


def _grid_execute(calls, scores):
    """Stands in for training a scan with a learning-rate grid and evaluations during training: ``scores`` maps
    (kind, layer, lr_scale) or (kind, layer, lr_scale, seed) to the correct flags of each example, or to
    {step: flags} for runs evaluated at several steps (the last is the final evaluation)."""
    def execute(config, run, scan_dir):
        calls.append(run.name)
        found = scores.get((run.kind, run.layer, run.lr_scale, run.seed)) or scores[run.kind, run.layer, run.lr_scale]
        by_step = found if isinstance(found, dict) else {config.recipe.steps if run.kind != "base" else 0: found}
        directory = run_dir(scan_dir, run)
        (directory / "evals").mkdir(parents=True, exist_ok=True)
        for step, correct in by_step.items():
            file = directory / "evals" / f"step{step:06d}.examples.jsonl"
            file.write_text("".join(json.dumps({"correct": [bool(c)]}) + "\n" for c in correct))
        final = by_step[max(by_step)]
        (directory / "result.json").write_text(json.dumps({
            "examples": f"evals/step{max(by_step):06d}.examples.jsonl", "kind": run.kind, "lr_scale": run.lr_scale,
            "accuracy": sum(final) / len(final)}))
        return {}
    return execute


def n_of(k, n=40):
    return [1] * k + [0] * (n - k)


# base 0; full 0.5 at 1x, 0.75 at 3x (its best); layer 0: 0.9 / 0.3; layer 1: 0.25 / 0; layer 3: 0.5 / 0.75
GRID = {("base", None, 1.0): n_of(0), ("full", None, 1.0): n_of(20), ("full", None, 3.0): n_of(30),
        ("layer", 0, 1.0): n_of(36), ("layer", 0, 3.0): n_of(12), ("layer", 1, 1.0): n_of(10),
        ("layer", 1, 3.0): n_of(0), ("layer", 3, 1.0): n_of(20), ("layer", 3, 3.0): n_of(30)}


def test_a_learning_rate_grid_trains_every_configuration_at_every_rate(tmp_path, saved_tiny):
    config = ScanConfig(recipe=TrainConfig(layers="every:2", seed=5), seeds=2, lr_grid="3,1")
    names = [r.name for r in plan_scan(config, 4)]
    assert names == ["base", "full-s5", "full-s6", "full-lr3x-s5", "full-lr3x-s6", "layer000-s5", "layer000-s6",
                     "layer000-lr3x-s5", "layer000-lr3x-s6", "layer002-s5", "layer002-s6", "layer002-lr3x-s5",
                     "layer002-lr3x-s6"]
    assert plan_scan(config, 4)[3] == PlannedRun("full-lr3x-s5", "full", 5, None, 3.0)
    assert parse_lr_grid("") == (1.0,) and parse_lr_grid("10, 0.5") == (0.5, 10.0)
    for bad, message in (("2,x", "comma-separated"), ("0,1", "> 0"), ("1,3,1", "twice"), ("nan", "> 0")):
        with pytest.raises(OneLayerError, match=message):
            parse_lr_grid(bad)
    with pytest.raises(OneLayerError, match="comma-separated"):  # before any run starts
        run_scan(scan_config(tmp_path / "bad", saved_tiny, lr_grid="2,x"), progress=False,
                 execute=_grid_execute([], GRID))
    assert not (tmp_path / "bad").exists()


def test_the_profile_reads_a_grid_under_both_protocols(tmp_path, saved_tiny):
    from onelayer.layers import lr_scales_from_profile
    from onelayer.profile import read_profile

    scan = tmp_path / "scan"
    calls = []
    config = scan_config(scan, saved_tiny, layers="0,1,3", lr_grid="1,3")
    run_scan(config, progress=False, execute=_grid_execute(calls, GRID))
    assert len(calls) == 1 + 2 + 6 and "layer001-lr3x-s0" in calls
    study, best = read_profile(scan), read_profile(f"{scan}?protocol=best")
    assert (study.protocol, study.full_lr_scale, best.protocol, best.full_lr_scale) == ("study", 3.0, "best", 3.0)
    # study: every layer at 3x, against full at 3x (0.75): 0.3/0.75, 0, 0.75/0.75
    c = {p.layer: p for p in study.points}
    assert (c[0].contribution, c[1].contribution, c[3].contribution) == pytest.approx((0.4, 0.0, 1.0))
    assert {c[k].lr_scale for k in (0, 1, 3)} == {3.0}
    # best: layer 0 at 1x (0.9/0.75), layer 1 at 1x (0.25/0.75), layer 3 at 3x
    b = {p.layer: p for p in best.points}
    assert (b[0].contribution, b[1].contribution, b[3].contribution) == pytest.approx((1.2, 1 / 3, 1.0))
    assert (b[0].lr_scale, b[1].lr_scale, b[3].lr_scale) == (1.0, 1.0, 3.0)
    r = study.robustness
    assert r.lr_scales == (1.0, 3.0) and r.full_accuracy == pytest.approx((0.5, 0.75)) and r.full_lr_scale == 3.0
    ranks = {x.layer: (x.rank_study, x.rank_best) for x in r.layers}
    assert ranks == {0: (2, 1), 1: (3, 3), 3: (1, 2)} and r.rate_dependent == [0, 3]
    # study values (0.4, 0, 1) and best (1.2, 1/3, 1): ranks 2,1,3 and 3,1,2, sum d^2 = 2 -> rho 1 - 12/24
    assert r.spearman == pytest.approx(0.5)
    gains = {x.layer: x.gain.value for x in r.layers}
    assert gains == pytest.approx({0: 0.8, 1: 1 / 3, 3: 0.0})
    # what top:k and --lr-from read, and say they read
    assert parse_layer_spec(f"top:1@{scan}", 4).layers == (3,)
    selection = parse_layer_spec(f"top:1@{scan}?protocol=best", 4)
    assert selection.layers == (0,) and any("per-configuration best learning rates" in n for n in selection.notes)
    assert any("study protocol" in n and "3x --lr" in n for n in parse_layer_spec(f"top:1@{scan}", 4).notes)
    _, rule = lr_scales_from_profile(read_profile(f"{scan}?protocol=best"), [0, 1])
    assert "per-configuration best" in rule
    assert (scan / "profile-best.md").is_file() and "| lr |" in (scan / "profile.md").read_text()
    best_rows = (scan / "profile-best.md").read_text().splitlines()
    rates = {r.split(" | ")[0]: r.split("|")[-2].strip() for r in best_rows if r.count("|") == 7}  # first table
    assert [rates[f"| {k}"] for k in range(4)] == ["1x", "1x", "-", "3x"]  # layer 2 was not trained
    with pytest.raises(OneLayerError, match="protocol=study"):
        read_profile(f"{scan}?protocol=fast")
    calls.clear()
    run_scan(config, progress=False, execute=_grid_execute(calls, GRID))
    assert calls == []  # resumed: nothing left to do


def test_a_scan_made_with_learning_rate_probes_still_reads(tmp_path, saved_tiny):
    """Scans of older versions reran the best and worst layers at other rates ("probes"): they read as a grid
    with only those layers at those rates."""
    scan = tmp_path / "scan"
    run_scan(scan_config(scan, saved_tiny), progress=False, execute=_fake_execute([], SCORES))
    probe = PlannedRun("layer001-lr2x-s0", "layer", 0, 1, 2.0)
    _grid_execute([], {("layer", 1, 2.0): n_of(30)})(scan_config(scan, saved_tiny), probe, scan)
    saved = json.loads((scan / "scan.json").read_text())
    saved["runs"].append({**probe.__dict__, "kind": "probe"})
    saved["config"].update(lr_scales="2", probe_layers="worst")
    (scan / "scan.json").write_text(json.dumps(saved))
    assert main(["profile", str(scan)]) == 0
    study, best = read_profile(scan), read_profile(f"{scan}?protocol=best")
    assert {p.layer: p.contribution for p in study.points if not p.interpolated} == pytest.approx({1: 0.5, 3: 1.0})
    assert {p.layer: p.contribution for p in best.points if not p.interpolated} == pytest.approx({1: 1.5, 3: 1.0})
    assert study.robustness.full_lr_scale == 1.0 and study.robustness.rate_dependent == [1, 3]


def test_profiles_at_each_evaluated_step_and_as_an_area_under_the_curve(tmp_path, saved_tiny):
    scan = tmp_path / "scan"
    steps = {("base", None, 1.0): n_of(0, 4),
             ("full", None, 1.0): {1: [1, 1, 0, 0], 3: [1, 1, 1, 1]},
             ("layer", 1, 1.0): {1: [1, 0, 0, 0], 3: [1, 1, 0, 0]},
             ("layer", 3, 1.0): {0: [1, 0, 0, 0], 1: [0, 0, 0, 0], 3: [1, 1, 1, 0]}}
    run_scan(scan_config(scan, saved_tiny, steps=3, eval_every=1), progress=False, execute=_grid_execute([], steps))
    assert evaluated_steps(scan) == [0, 1, 3]
    final, _ = scan_profile(scan)
    assert {p.layer: p.contribution for p in final.points if not p.interpolated} == pytest.approx({1: 0.5, 3: 0.75})
    early, _ = scan_profile(scan, step=1)
    assert early.step == 1 and {p.layer: p.contribution for p in early.points if not p.interpolated} == \
        pytest.approx({1: 0.5, 3: 0.0})
    area, _ = scan_profile(scan, auc=True)
    # each example's trapezoid area over steps 0, 1, 3 (widths 1 and 2), divided by 3; step 0 is the base (0)
    # unless the run has its own evaluation there. full: ex0 (0+1)/2*1 + (1+1)/2*2 = 2.5, ex1 2.5, ex2 (0+1)/2*2
    # = 1, ex3 1: mean 7/12. layer 1: 2.5, 1, 0, 0: 3.5/12. layer 3 (own step 0 = [1,0,0,0]): ex0 (1+0)/2 +
    # (0+1)/2*2 = 1.5, ex1 1, ex2 1, ex3 0: 3.5/12. C = 3.5/7 for both
    assert area.auc_steps == (0, 1, 3)
    assert {p.layer: p.contribution for p in area.points if not p.interpolated} == pytest.approx({1: 0.5, 3: 0.5})
    assert (scan / "profile-auc.json").is_file()  # written with the scan, as its curves exist
    assert read_profile(f"{scan}?auc").auc_steps == (0, 1, 3)
    assert main(["profile", str(scan), "--step", "1"]) == 0
    assert read_profile(f"{scan}?step=1").points[3].contribution == 0.0
    assert main(["profile", str(scan), "--step", "2"]) == 2  # step 2 was not evaluated
    with pytest.raises(OneLayerError, match="write it with onelayer profile"):
        read_profile(f"{scan}?step=3")


def test_scan_runs_evaluate_on_the_schedule_asked_for(tmp_path, saved_tiny):
    from onelayer.experiments.scan import _recipe_for

    config = scan_config(tmp_path, saved_tiny, steps=30)
    run = PlannedRun("layer001-lr3x-s0", "layer", 0, 1, 3.0)
    recipe = _recipe_for(config, run, tmp_path)
    assert (recipe.eval_every, recipe.eval_at_start, recipe.lr) == (30, False, pytest.approx(3e-2))
    config = scan_config(tmp_path, saved_tiny, steps=30, eval_every=10, eval_at_start=True)
    assert (_recipe_for(config, run, tmp_path).eval_every, _recipe_for(config, run, tmp_path).eval_at_start) == (10, True)
    config.recipe.eval_at_start = False
    assert _recipe_for(config, run, tmp_path).eval_at_start is False


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


def _run(command: list[str], seconds: float) -> str:
    """Run ``command`` in its own process group and return its stderr; a hang past ``seconds`` kills the group
    and fails the test (instead of stalling CI)."""
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
    return err


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
    # variants at two learning rates trained together, evaluated jointly after every step
    args = ["scan", "--model", str(saved_tiny), "--task", "toy:repeat", "--layers", "0,2", "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6", "--eval-n", "6", "--lr", "1e-2",
            "--device", "cpu", "--engine", "fast", "--no-progress", "--lr-grid", "1,3", "--eval-every", "1",
            "--no-eval-at-start"]
    assert main([*args, "--out", str(tmp_path / "alone"), "--concurrent", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "together"), "--concurrent", "3"]) == 0
    a = json.loads((tmp_path / "alone" / "profile.json").read_text())
    b = json.loads((tmp_path / "together" / "profile.json").read_text())
    assert [p["contribution"] for p in a["points"]] == [p["contribution"] for p in b["points"]]

    def science(run):
        return [{k: round(v, 5) if isinstance(v, float) else v for k, v in json.loads(line).items()
                 if not k.startswith(("seconds", "tokens_per", "concurrent"))}
                for line in (run / "log.jsonl").read_text().splitlines()]

    for layer, name in [(k, f"layer{k:03d}{rate}-s0") for k in (0, 2) for rate in ("", "-lr3x")]:
        assert science(tmp_path / "alone" / "runs" / name) == science(tmp_path / "together" / "runs" / name)
        logs = [json.loads(x) for x in (tmp_path / "together" / "runs" / name / "log.jsonl").read_text().splitlines()]
        assert [r["concurrent_variants"] for r in logs] == [2, 2]  # 4 runs at up to 3: two groups of 2
        evals = [json.loads(x) for x in (tmp_path / "together" / "runs" / name / "eval.jsonl").read_text().splitlines()]
        alone_evals = [json.loads(x) for x in (tmp_path / "alone" / "runs" / name / "eval.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [1, 2] and [e["accuracy"] for e in evals] == [
            e["accuracy"] for e in alone_evals]
        together = json.loads((tmp_path / "together" / "runs" / name / "result.json").read_text())
        alone = json.loads((tmp_path / "alone" / "runs" / name / "result.json").read_text())
        assert together["accuracy"] == alone["accuracy"] and list(together["param_change"]) == [str(layer)]
        assert together["param_change"][str(layer)] == pytest.approx(alone["param_change"][str(layer)], rel=1e-4)


def test_a_failed_variant_is_recorded_alone_and_the_group_retried(tmp_path, saved_tiny, monkeypatch, capsys):
    import onelayer.experiments.recipes as recipes

    calls = []

    def group(recipes, progress):
        calls.append([r.layers for r in recipes])
        return [RuntimeError("boom") if r.layers == "1" and len(calls) == 1 else {"examples": "x", "accuracy": 0.5}
                for r in recipes]

    monkeypatch.setattr(recipes, "train_and_evaluate_variants", group)
    config = scan_config(tmp_path / "scan", saved_tiny, layers="0-3")
    config.concurrent = 2
    capsys.readouterr()
    run_scan(config, progress=True, execute=_fake_execute([], {**SCORES, ("layer", 0): [0] * 40,
                                                                ("layer", 2): [0] * 40}))
    assert calls == [["0", "1"], ["2", "3"]]
    shown = capsys.readouterr()
    board = [x for x in (shown.out + shown.err).splitlines() if x.startswith("scan: layer")]
    # one line a group, its lone failure counted
    assert [x.split("; base")[0] for x in board] == [
        "scan: layer000-s0 and 1 more finished (1 failed); runs done 2 of 4 (1 failed)",
        "scan: layer002-s0 and 1 more finished; runs done 4 of 4 (1 failed)"]
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


def test_a_scan_grows_by_more_layers_and_trains_only_the_new_ones(tmp_path, saved_tiny):
    # long scans are filled over several sessions: each call keeps every finished run
    calls = []
    run_scan(scan_config(tmp_path / "scan", saved_tiny, layers="1"), progress=False, execute=_fake_execute(calls, SCORES))
    assert calls == ["base", "full-s0", "layer001-s0"]
    calls.clear()
    run_scan(scan_config(tmp_path / "scan", saved_tiny, layers="1,3"), progress=False,
             execute=_fake_execute(calls, SCORES))
    assert calls == ["layer003-s0"]
    c = {p.layer: p.contribution for p in read_profile(tmp_path / "scan").points if not p.interpolated}
    assert c == {1: pytest.approx(0.5), 3: pytest.approx(1.0)}


def test_a_scan_resumed_with_another_recipe_is_refused_and_one_grown_is_not(tmp_path, saved_tiny, capsys):
    config = scan_config(tmp_path / "scan", saved_tiny, layers="1", steps=1)
    run_scan(config, progress=False)
    layer1 = run_dir(tmp_path / "scan", PlannedRun("layer001-s0", "layer", 0, 1))
    before = (layer1 / "result.json").stat().st_mtime_ns
    # finished runs are kept and skipped: with other flags they would mix two experiments in one profile
    for change, named in (({"steps": 2}, "steps (1, now 2)"), ({"lr": 5e-3}, "lr (0.01, now 0.005)"),
                          ({"group_size": 2}, "group-size (4, now 2)"), ({"eval_n": 4}, "eval-n (6, now 4)")):
        other = replace(config, recipe=replace(config.recipe, **change))
        with pytest.raises(OneLayerError, match=f"full-s0 finished with another --{re.escape(named)}: resume with"):
            run_scan(other, progress=False)
        with pytest.raises(OneLayerError, match="finished with another"):  # a dry run says so as well
            plan_lines(other, 1)
    # a run of a learning-rate grid: its rate is a multiple of --lr, which the error says
    grid = scan_config(tmp_path / "grid", saved_tiny, lr_grid="3", layers="1", steps=1)
    run_scan(grid, progress=False)
    with pytest.raises(OneLayerError, match=r"full-lr3x-s0 finished with another --lr \(0\.03, now 0\.015\) \(its "
                                            r"rate is 3x --lr\): resume with"):
        run_scan(replace(grid, recipe=replace(grid.recipe, lr=5e-3)), progress=False)
    # what a run may be resumed with (its evaluation schedule, device) and more layers grow the same scan
    grown = replace(config, recipe=replace(config.recipe, layers="1,2", eval_every=1, save_every=5))
    run_scan(grown, progress=False)
    assert (layer1 / "result.json").stat().st_mtime_ns == before  # kept, not trained again
    assert run_status(tmp_path / "scan", PlannedRun("layer002-s0", "layer", 0, 2)) == "done"
    code = main(["scan", "--model", str(saved_tiny), "--task", "toy:repeat", "--layers", "1,2", "--steps", "3",
                 "--prompts-per-step", "2", "--group-size", "4", "--lr", "1e-2", "--max-new-tokens", "6",
                 "--eval-n", "6", "--device", "cpu", "--out", str(tmp_path / "scan"), "--no-progress"])
    assert code == 2 and "finished with another --steps (1, now 3)" in capsys.readouterr().err

"""Adaptive scans: the successive-halving rule by hand, a scan that stops the layers that can no longer reach
the top, and the replay of the rule on an exhaustive scan."""

import json
import sys
from dataclasses import replace

import pytest

import onelayer.experiments.scan as scan_module
from onelayer.config import to_dict
from onelayer.errors import OneLayerError
from onelayer.experiments.adaptive import could_be_top
from onelayer.experiments.rundir import run_dir
from onelayer.experiments.scan import replay_adaptive, run_scan
from onelayer.profile import Estimate, read_profile

from .test_scan import scan_config


def test_a_layer_stops_only_when_its_upper_end_is_below_the_kth_lower_end():
    estimates = {0: Estimate(0.9, 0.7, 1.1), 1: Estimate(0.6, 0.5, 0.8), 2: Estimate(0.3, 0.1, 0.49),
                 3: Estimate(0.45, 0.2, 0.5), 4: Estimate(float("nan"), float("nan"), float("nan"))}
    # top 2: the 2nd highest lower end is 0.5; layer 2 reaches 0.49 at most, layer 3 exactly 0.5 (kept)
    assert could_be_top(estimates, 2) == {0, 1, 3, 4}
    assert could_be_top(estimates, 1) == {0, 1, 4}  # layer 1 reaches 0.8 >= 0.7; layers 2 and 3 do not
    assert could_be_top(estimates, 5) == set(estimates)


# per step, each run's 40 per-example scores (1 = correct): the base run and full training, layer by layer
CURVES = {("base", None): {0: 0}, ("full", None): {2: 16, 4: 20},
          ("layer", 0): {2: 0, 4: 1}, ("layer", 1): {2: 8, 4: 10}, ("layer", 2): {2: 12, 4: 18},
          ("layer", 3): {2: 1, 4: 15}}


def _examples(correct: int) -> str:
    return "".join(json.dumps({"correct": [i < correct]}) + "\n" for i in range(40))


def _write_eval(directory, step, correct):
    (directory / "evals").mkdir(parents=True, exist_ok=True)
    (directory / "evals" / f"step{step:06d}.examples.jsonl").write_text(_examples(correct))
    (directory / "evals" / f"step{step:06d}.json").write_text(json.dumps({"step": step, "accuracy": correct / 40,
                                                                          "n": 40}))


def _fake_training(calls):
    """Stands in for training and evaluation: a run trained to ``steps`` has the evaluations CURVES gives."""
    def execute_run(config, run, scan_dir, progress=False, final=True):
        steps = config.recipe.steps
        calls.append((run.name, steps, final))
        directory = run_dir(scan_dir, run)
        if run.kind != "base":  # the recipe it trained with, as training saves it (a rung's: its steps)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "config.json").write_text(json.dumps(to_dict(scan_module._recipe_for(config, run, scan_dir))))
        curve = CURVES[run.kind, run.layer]
        for step in curve:
            if 0 < step <= steps or run.kind == "base":
                _write_eval(directory, step, curve[step])
        last = max(s for s in curve if s <= steps or run.kind == "base")
        if final:
            (directory / "result.json").write_text(json.dumps({
                "examples": f"evals/step{last:06d}.examples.jsonl", "step": last, "accuracy": curve[last] / 40}))
        return {}
    return execute_run


def test_an_adaptive_scan_stops_the_layers_that_cannot_reach_the_top_and_says_so(tmp_path, saved_tiny, monkeypatch):
    calls = []
    fake = _fake_training(calls)
    monkeypatch.setattr(scan_module, "execute_run", fake)
    config = scan_config(tmp_path / "scan", saved_tiny, layers="0-3", steps=4, eval_every=2)
    config.adaptive_top = 1
    config.concurrent = 1
    run_scan(config, progress=False, execute=lambda c, r, d: fake(c, r, d))
    decisions = json.loads((tmp_path / "scan" / "adaptive.json").read_text())
    # at step 2 (full 16/40): C = 0, 0.5, 0.75, 0.0625; layer 2's lower end bars layers 0 and 3, not layer 1
    assert decisions["top"] == 1 and decisions["rungs"]["2"]["stopped"] == [0, 3]
    assert decisions["rungs"]["2"]["kept"] == [1, 2]
    trained = {name: max(s for n, s, _ in calls if n == name) for name, _, _ in calls}
    assert trained["layer000-s0"] == trained["layer003-s0"] == 2  # stopped at the rung
    assert trained["layer001-s0"] == trained["layer002-s0"] == trained["full-s0"] == 4
    stopped = json.loads((run_dir(tmp_path / "scan", scan_module.PlannedRun("layer000-s0", "layer", 0, 0))
                          / "result.json").read_text())
    assert stopped["stopped_at"] == 2 and stopped["examples"] == "evals/step000002.examples.jsonl"
    profile = read_profile(tmp_path / "scan")
    assert any("stopped early" in note and "0 (step 2)" in note for note in profile.notes)
    assert {p.layer: round(p.contribution, 4) for p in profile.points} == {0: 0.0, 1: 0.5, 2: 0.9, 3: 0.05}


def test_an_interrupted_adaptive_scan_keeps_its_decisions(tmp_path, saved_tiny, monkeypatch):
    calls = []
    fake = _fake_training(calls)
    monkeypatch.setattr(scan_module, "execute_run", fake)
    config = scan_config(tmp_path / "scan", saved_tiny, layers="0-3", steps=4, eval_every=2)
    config.adaptive_top, config.concurrent = 1, 1
    run_scan(config, progress=False, execute=lambda c, r, d: fake(c, r, d))
    calls.clear()
    run_scan(config, progress=False, execute=lambda c, r, d: fake(c, r, d))
    assert calls == []  # every run finished or stopped: nothing is trained again
    # a stopped run's recipe names its rung's steps, which is no change of recipe; other steps are
    with pytest.raises(OneLayerError, match="full-s0 finished with another --steps \\(4, now 6\\)"):
        run_scan(replace(config, recipe=replace(config.recipe, steps=6)), progress=False,
                 execute=lambda c, r, d: fake(c, r, d))


def test_adaptive_scans_need_evaluations_to_decide_at(tmp_path, saved_tiny):
    config = scan_config(tmp_path / "scan", saved_tiny, layers="0-3", steps=4)
    config.adaptive_top = 1
    with pytest.raises(OneLayerError, match="--adaptive-top decides at evaluations during training: add --eval-every"):
        run_scan(config, progress=False)
    assert not (tmp_path / "scan" / "scan.json").exists()  # nothing saved before the error


def test_replaying_the_rule_on_an_exhaustive_scan_by_hand(tmp_path, saved_tiny, monkeypatch):
    calls = []
    fake = _fake_training(calls)
    config = scan_config(tmp_path / "scan", saved_tiny, layers="0-3", steps=4, eval_every=2)
    run_scan(config, progress=False, execute=lambda c, r, d: fake(c, r, d))  # exhaustive: every layer to step 4
    replayed = replay_adaptive(tmp_path / "scan", 1)
    assert replayed["stopped_at"] == {"0": 2, "3": 2}
    assert replayed["layer_steps_saved"] == pytest.approx(1 - (2 + 4 + 4 + 2) / 16)
    # at step 4 (full 20/40): C = 0.05, 0.5, 0.9, 0.75; layer 2 is the best either way
    assert replayed["exhaustive_top"] == replayed["adaptive_top"] == [2] and replayed["same_top"]
    two = replay_adaptive(tmp_path / "scan", 2)  # top 2 exhaustive: layers 2 and 3; layer 3 was stopped early
    assert two["exhaustive_top"] == [2, 3] and two["adaptive_top"] == [1, 2] and not two["same_top"]


def test_where_full_training_lost_at_a_rung_the_layers_are_judged_by_their_own_gain(tmp_path, saved_tiny,
                                                                                     monkeypatch):
    from onelayer.experiments.adaptive import estimates_at
    from onelayer.experiments.scan import load_plan

    # base 20 of 40 right; full training at step 2: 10 (lost 0.25); layer 0 gains +0.25, layer 1 loses 0.375
    monkeypatch.setattr(sys.modules[__name__], "CURVES", {
        ("base", None): {0: 20}, ("full", None): {2: 10}, ("layer", 0): {2: 30}, ("layer", 1): {2: 5}})
    config = scan_config(tmp_path / "scan", saved_tiny, layers="0-1", steps=2, eval_every=2)
    run_scan(config, progress=False, execute=_fake_training([]))
    found = estimates_at(tmp_path / "scan", load_plan(tmp_path / "scan")[1], 2, {0, 1}, 4)
    # contributions would be -1 and +1.5 (the layer that hurt most first); the gains rank them the right way
    assert found[0].value == pytest.approx(0.25) and found[1].value == pytest.approx(-0.375)
    assert could_be_top(found, 1) == {0}


"""onelayer compare: strategies parsed into exact runs, run under one budget, reported with costs."""

import json
import math
import re
from dataclasses import replace

import pytest

from onelayer.checkpoint import read_meta
from onelayer.cli import main
from onelayer.config import CompareConfig, SamplingConfig, ScanConfig, TrainConfig
from onelayer.errors import OneLayerError
from onelayer.experiments.compare import comparison_results, parse_strategies, plan_comparison, recipe_for
from onelayer.experiments.scan import run_scan
from onelayer.layers import parse_layer_spec

from .test_strategies import hand_profile, write_profile

PROFILE = hand_profile({0: 0.1, 1: 0.8, 2: 0.5, 3: -0.2}, 4)


def recipe(out, model, **overrides):
    base = dict(model=str(model), task="toy:repeat", out=str(out), steps=2, prompts_per_step=2, group_size=4,
                lr=1e-2, sampling=SamplingConfig(max_new_tokens=6), eval_n=6, device="cpu")
    return TrainConfig(**{**base, **overrides})


def test_strategies_become_exact_training_recipes(tmp_path):
    scan = write_profile(tmp_path / "scan", PROFILE)
    config = CompareConfig(recipe=TrainConfig(lr=1e-3, seed=3, steps=7), profile=str(scan), lora_lr_scale=10,
                           strategies="full,top:2,lr-guided,middle:2,random:2,random:2:9,lora,lora:4,3")
    strategies = parse_strategies(config, 4, matched_rank=5)
    plan = plan_comparison(strategies, [3, 4])
    assert [r.name for r in plan[:5]] == ["base", "full-s3", "full-s4", "top_2-s3", "top_2-s4"]
    assert len(plan) == 1 + 9 * 2
    # TERM*K: the same strategy at K times the rate
    scaled = parse_strategies(replace(config, strategies="top:2*3,lora*0.5,full*2x"), 4, matched_rank=5)
    assert [(s.label, s.slug, s.layers, s.lr_scale) for s in scaled] == [
        ("top:2*3", "top_2-lr3x", f"top:2@{scan}", 3.0), ("lora*0.5", "lora-lr0.5x", "all", 5.0),
        ("full*2", "full-lr2x", "all", 2.0)]
    assert recipe_for(config, plan_comparison(scaled, [3])[1], tmp_path / "c").lr == pytest.approx(3e-3)
    by_name = {r.name: recipe_for(config, r, tmp_path / "c") for r in plan}
    assert by_name["full-s4"].layers == "all" and by_name["full-s4"].seed == 4 and by_name["full-s4"].lr == 1e-3
    assert parse_layer_spec(by_name["top_2-s3"].layers, 4).layers == (1, 2)
    assert by_name["lr-guided-s3"].layers == "all" and by_name["lr-guided-s3"].lr_from == str(scan)
    assert by_name["middle_2-s3"].layers == "middle:2"
    # random:k draws per seed; random:k:s keeps its own draw for every seed
    assert (by_name["random_2-s3"].layers, by_name["random_2-s4"].layers) == ("random:2:3", "random:2:4")
    assert by_name["random_2_9-s3"].layers == by_name["random_2_9-s4"].layers == "random:2:9"
    assert (by_name["lora-s3"].lora_rank, by_name["lora-s3"].lr) == (5, pytest.approx(1e-2))
    assert by_name["lora_4-s3"].lora_rank == 4 and by_name["3-s3"].layers == "3"
    assert by_name["base"].steps == 7 and by_name["3-s4"].eval_every == 7 and not by_name["3-s4"].eval_at_start


@pytest.mark.parametrize("strategies, message", [
    ("full,top:2", "needs a profile"),
    ("full,lr-guided", "needs a profile"),
    ("full,middle:x", "middle:k"),
    ("full,top:0", "positive integer"),
    ("full,full", "listed twice"),
    ("full,middle:2*x", "learning-rate multiple"),
    ("full,full*0", "learning-rate multiple"),
    ("full*-1", "learning-rate multiple"),
    ("full,full*1e999", "learning-rate multiple"),
    (",", "names nothing"),
])
def test_bad_strategies_fail_before_any_training(strategies, message):
    with pytest.raises(OneLayerError, match=message):
        parse_strategies(CompareConfig(strategies=strategies), 4, 5)


def test_comparison_runs_every_strategy_and_reports_costs(tmp_path, saved_tiny):
    from onelayer.experiments.compare import run_comparison
    from onelayer.experiments.report import compare_section

    scan = write_profile(tmp_path / "scan", PROFILE)
    out = tmp_path / "compare"
    config = CompareConfig(recipe=recipe(out, saved_tiny), profile=str(scan), seeds=2,
                           strategies="full,top:1,lr-guided,random:1,lora:2")
    run_comparison(config, progress=False)
    comparison = comparison_results(out)
    rows = {r.label: r for r in comparison.strategies}
    assert list(rows) == ["full", "top:1", "lr-guided", "random:1", "lora:2"]
    assert all(r.seeds == [0, 1] and len(r.accuracies) == 2 for r in rows.values())
    assert rows["top:1"].layers == [[1], [1]]
    assert rows["random:1"].layers == [list(parse_layer_spec(f"random:1:{s}", 4).layers) for s in (0, 1)]
    # tiny llama: 9280 parameters per layer, 4 layers, tied 88 x 32 embedding, final norm 32
    assert rows["top:1"].trainable_parameters == 9280
    assert rows["full"].trainable_parameters == 4 * 9280
    assert rows["lora:2"].trainable_parameters == 2 * 512 * 4
    for r in rows.values():  # AdamW: two float32 moments per trained parameter, plus one step count per tensor
        assert 8 * r.trainable_parameters <= r.optimizer_state_bytes <= 8 * r.trainable_parameters + 8 * 64
        assert r.train_seconds > 0 and r.peak_memory_bytes is None  # CPU: no CUDA peak
    full = rows["full"]
    assert full.gain_over_full == 0
    assert full.share_of_full_gain == 1.0 or (math.isnan(full.share_of_full_gain) and comparison.full_gain.value == 0)
    mean = sum(rows["top:1"].accuracies) / 2
    assert rows["top:1"].gain_over_full == pytest.approx(mean - full.mean)
    # lr-guided: layer 3 has a negative contribution, so its scale is 0 and it must not move
    meta = read_meta(out / "runs" / "lr-guided-s0")
    assert meta["lr_scales"]["3"] == 0.0

    section = compare_section(out, out / "figures")
    table = next(b for b in section.blocks if hasattr(b, "header"))
    assert [row[0] for row in table.rows] == list(rows) and (out / "figures" / "compare.png").is_file()
    stamps = {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")}
    run_comparison(config, progress=False)  # everything finished: nothing is redone
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")} == stamps


def test_strategies_trained_together_give_the_runs_they_give_one_at_a_time(tmp_path, saved_tiny, capsys):
    from onelayer.experiments.compare import run_comparison, trained_state_bytes

    scan = write_profile(tmp_path / "scan", PROFILE)
    strategies = "full,top:2,middle:1,random:1,2-3,lora:2"
    fast = recipe(tmp_path / "alone", saved_tiny, sampling=SamplingConfig(max_new_tokens=6, engine="fast"))
    alone = CompareConfig(recipe=fast, profile=str(scan), seeds=2, strategies=strategies, concurrent=1)
    run_comparison(alone, progress=False)
    assert "trained together" not in capsys.readouterr().err
    together = replace(alone, recipe=replace(fast, out=str(tmp_path / "together")), concurrent=3)
    run_comparison(together, progress=False)
    # 8 runs of decoder layers (4 strategies x 2 seeds) at up to 3: groups of 3, 3 and 2
    assert "compare: 8 runs of decoder layers, up to 3 trained together" in capsys.readouterr().err

    def log(out, name):
        return [json.loads(x) for x in (out / "runs" / name / "log.jsonl").read_text().splitlines()]

    def science(rows):
        return [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()
                 if not k.startswith(("seconds", "tokens_per", "concurrent"))} for r in rows]

    a, b = comparison_results(tmp_path / "alone"), comparison_results(tmp_path / "together")
    assert [(r.label, r.accuracies, r.layers) for r in a.strategies] == [
        (r.label, r.accuracies, r.layers) for r in b.strategies]
    widths = {}
    for name in ("full", "top_2", "middle_1", "random_1", "2-3", "lora_2"):
        for seed in (0, 1):
            run = f"{name}-s{seed}"
            assert science(log(tmp_path / "alone", run)) == science(log(tmp_path / "together", run)), run
            widths[run] = [r.get("concurrent_variants", 1) for r in log(tmp_path / "together", run)]
    assert {run for run, w in widths.items() if w != [1, 1]} == {
        f"{n}-s{s}" for n in ("top_2", "middle_1", "random_1", "2-3") for s in (0, 1)}
    assert sorted(w[0] for w in widths.values() if w != [1, 1]) == [2, 2, 3, 3, 3, 3, 3, 3]
    # an impossible --concurrent fails before anything trains
    plain = replace(together, recipe=replace(fast, out=str(tmp_path / "plain"), sampling=replace(
        fast.sampling, engine="plain")))
    with pytest.raises(OneLayerError, match="concurrent variants need the fast rollout engine"):
        run_comparison(plain, progress=False)
    assert not list((tmp_path / "plain").glob("runs/*/result.json"))
    # what auto concurrency reserves per run: the largest trained set (top:2, 2-3: two layers of 9280), 16 B each
    runs = [r for r in plan_comparison(parse_strategies(together, 4, 2), [0, 1]) if r.strategy]
    assert trained_state_bytes(together, runs[2:4], tmp_path) == 16 * 2 * 9280  # top:2
    assert trained_state_bytes(together, runs[4:6], tmp_path) == 16 * 9280  # middle:1


def test_compare_takes_the_scans_recipe_and_copies_its_base_and_full_runs(tmp_path, saved_tiny, capsys):
    scan_dir = tmp_path / "scan"
    run_scan(ScanConfig(recipe=recipe(scan_dir, saved_tiny, layers="1,2"), lr_grid="1,3"), progress=False)
    assert main(["profile", str(scan_dir)]) == 0
    code = main(["compare", str(scan_dir), "--strategies", "full,full*3,middle:1", "--seeds", "1", "--no-progress"])
    assert code == 0
    out = scan_dir / "compare"
    saved = json.loads((out / "compare.json").read_text())
    assert saved["config"]["recipe"]["steps"] == 2 and saved["config"]["recipe"]["task"] == "toy:repeat"
    # full training at 3x --lr is the scan's full run at 3x
    for name, source in (("base", "base"), ("full-s0", "full-s0"), ("full-lr3x-s0", "full-lr3x-s0")):
        result = json.loads((out / "runs" / name / "result.json").read_text())
        original = json.loads((scan_dir / "runs" / source / "result.json").read_text())
        assert result["copied_from"].endswith(source) and result["accuracy"] == original["accuracy"]
    assert "copied_from" not in json.loads((out / "runs" / "middle_1-s0" / "result.json").read_text())
    printed = capsys.readouterr().out
    assert "middle:1" in printed and "gain over full" in printed and (out / "results.md").is_file()

    # at the own-best protocol: top:1 ranks the layers by their contribution at their own best rates
    best = json.loads((scan_dir / "profile-best.json").read_text())
    top = max((p for p in best["points"] if not p["interpolated"]), key=lambda p: (p["contribution"], -p["layer"]))
    code = main(["compare", f"{scan_dir}?protocol=best", "--strategies", "top:1*3", "--seeds", "1", "--no-progress"])
    assert code == 0  # into a folder of its own: the study comparison's top:k trained other layers
    meta = read_meta(scan_dir / "compare-protocol-best" / "runs" / "top_1-lr3x-s0")
    assert meta["layers"] == [top["layer"]] and meta["config"]["lr"] == pytest.approx(3e-2)
    capsys.readouterr()
    code = main(["compare", f"{scan_dir}?protocol=best", "--strategies", "top:1*3", "--seeds", "1", "--lr", "0.02",
                 "--no-progress"])
    assert code == 2 and re.search(r"top_1-lr3x-s0 finished with another --lr \(0\.03\d*, now 0\.06\d*\) \(its rate "
                                   r"is 3x --lr\)", capsys.readouterr().err)

    # another recipe is another experiment: nothing is copied
    code = main(["compare", str(scan_dir), "--strategies", "full", "--seeds", "1", "--steps", "1",
                 "--out", str(tmp_path / "other"), "--no-progress"])
    assert code == 0
    assert "copied_from" not in json.loads((tmp_path / "other" / "runs" / "full-s0" / "result.json").read_text())
    assert json.loads((tmp_path / "other" / "compare.json").read_text())["config"]["recipe"]["steps"] == 1
    # resumed with another recipe, its finished runs would mix two experiments in one table: refused, by name
    capsys.readouterr()
    code = main(["compare", str(scan_dir), "--strategies", "full", "--seeds", "1", "--steps", "2",
                 "--out", str(tmp_path / "other"), "--no-progress"])
    assert code == 2 and "full-s0 finished with another --steps (1, now 2)" in capsys.readouterr().err
    # results moved elsewhere (off the GPU machine) resume: top:1@SCAN names the scan by its new path
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(scan_dir, moved)
    kept = moved / "compare-protocol-best" / "runs" / "top_1-lr3x-s0" / "result.json"
    before = kept.stat().st_mtime_ns
    code = main(["compare", f"{moved}?protocol=best", "--strategies", "top:1*3", "--seeds", "1", "--no-progress"])
    assert code == 0 and kept.stat().st_mtime_ns == before  # kept, not trained again
    # a profile that now ranks another layer first: the kept top:1 run trained the old one, refused
    profile = json.loads((moved / "profile-best.json").read_text())
    for p in profile["points"]:
        p["contribution"] = 5.0 if p["layer"] != top["layer"] and not p["interpolated"] else -5.0
    (moved / "profile-best.json").write_text(json.dumps(profile))
    capsys.readouterr()
    code = main(["compare", f"{moved}?protocol=best", "--strategies", "top:1*3", "--seeds", "1", "--no-progress"])
    assert code == 2 and "the profile now picks" in capsys.readouterr().err


def test_ensemble_members_from_a_scan_reuse_their_final_evaluation(tmp_path, saved_tiny, monkeypatch):
    from onelayer.config import EvalConfig
    from onelayer.experiments.specialists import run_ensemble, run_self_consistency

    scan_dir = tmp_path / "scan"
    run_scan(ScanConfig(recipe=recipe(scan_dir, saved_tiny, layers="1,2", steps=1)), progress=False)
    members = [str(scan_dir / "runs" / name) for name in ("layer001-s0", "layer002-s0")]

    def no_eval(config):
        raise AssertionError(f"{config.checkpoint} was evaluated again")

    monkeypatch.setattr("onelayer.experiments.specialists.run_eval", no_eval)
    same = EvalConfig(task="toy:repeat", n=5, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0))
    summary = run_ensemble(members, same, tmp_path / "vote")
    assert len(summary.votes) == 5
    own = [json.loads(x) for x in (scan_dir / "runs" / "layer001-s0" / "evals" / "step000001.examples.jsonl")
           .read_text().splitlines()]
    member = [json.loads(x) for x in (tmp_path / "vote" / "members" / "layer001-s0" / "eval.examples.jsonl")
              .read_text().splitlines()]
    assert member == own[:5]
    # a run kept without its checkpoint (results copied off a GPU machine) still votes with its own answers
    import shutil

    for m in members:
        shutil.rmtree(f"{m}/checkpoint")
    again = run_ensemble(members, same, tmp_path / "vote-again")
    assert [v.answer for v in again.votes] == [v.answer for v in summary.votes]
    # another completion cap, or more examples than the run evaluated, is another evaluation, which a run without
    # its checkpoint cannot make: the error names the run's own settings
    for other, named in (
            (EvalConfig(task="toy:repeat", n=5, sampling=SamplingConfig(max_new_tokens=8, temperature=0.0)),
             "pass --max-new-tokens 6 "),
            (EvalConfig(task="toy:repeat", n=7, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0)),
             "pass --n at most 6 ")):
        with pytest.raises(OneLayerError, match=f"kept without its checkpoint.*{named}"):
            run_ensemble(members, other, tmp_path / f"vote-{other.n}-{other.sampling.max_new_tokens}")
    with pytest.raises(OneLayerError, match="self-consistency samples the model, so it needs the checkpoint"):
        run_self_consistency(members[0], 3, same, tmp_path / "sc")
    # with its checkpoint, another evaluation is made
    run_scan(ScanConfig(recipe=recipe(tmp_path / "scan2", saved_tiny, layers="1", steps=1)), progress=False)
    with pytest.raises(AssertionError, match="evaluated again"):
        run_ensemble([str(tmp_path / "scan2" / "runs" / "layer001-s0"), members[1]],
                     EvalConfig(task="toy:repeat", n=5, sampling=SamplingConfig(max_new_tokens=8, temperature=0.0)),
                     tmp_path / "vote-cap")


def test_compare_refuses_a_layer_spec_outside_strategies(capsys):
    assert main(["compare", "--strategies", "full", "--layers", "3"]) == 2
    assert "--strategies" in capsys.readouterr().err


def test_an_ensemble_refuses_a_member_whose_training_stopped_early(tmp_path, saved_tiny, tokenizer, monkeypatch):
    import onelayer.training.step as train_module
    from onelayer.config import EvalConfig
    from onelayer.experiments.specialists import run_ensemble
    from onelayer.training import train

    from .test_train import config

    finished = tmp_path / "finished"
    train(config(tmp_path, out=str(finished), model=str(saved_tiny), steps=2, save_every=2), progress=False)
    real_update = train_module.policy_update

    def dies_at_step_3(*args, **kwargs):
        if args[6] == 2:  # the third step (index 2), after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(train_module, "policy_update", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, out=str(tmp_path / "early"), model=str(saved_tiny), steps=4, save_every=2),
              progress=False)
    base = EvalConfig(model=str(saved_tiny), task="toy:repeat", n=4, device="cpu")
    with pytest.raises(OneLayerError, match=r"early stopped at step 2 of 4: finish its training"):
        run_ensemble([str(finished), str(tmp_path / "early")], base, tmp_path / "vote")


@pytest.mark.parametrize("full, slug", [("full", "full"), ("full*3", "full-lr3x")])  # full training at any rate
def test_comparison_intervals_resample_seeds_then_examples_by_hand(full, slug, tmp_path, monkeypatch):
    """The same fixed plan as tests/test_contribution.py's two-seed profile: the strategy's share of full
    training's gain must come out with the same seed-level interval."""
    import importlib

    from .test_contribution import EXAMPLES, SEEDS, TWO_SEEDS

    out = tmp_path / "compare"
    runs = [("base", None, 0, TWO_SEEDS["base"][0])] + [
        (f"{name}-s{s}", label, s, TWO_SEEDS[kind][s]) for label, name, kind in ((full, slug, "full"), ("3", "3", "layer"))
        for s in (0, 1)]
    for name, _, _, correct in runs:
        directory = out / "runs" / name
        (directory / "evals").mkdir(parents=True)
        (directory / "evals" / "final.examples.jsonl").write_text(
            "".join(json.dumps({"correct": [bool(c)]}) + "\n" for c in correct))
        (directory / "result.json").write_text(json.dumps({"examples": "evals/final.examples.jsonl",
                                                           "accuracy": sum(correct) / 4, "layers_spec": "3"}))
    saved = {"config": {"recipe": {"model": "unused"}}, "strategies": [{"label": full}, {"label": "3"}],
             "runs": [{"name": n, "strategy": st, "seed": s} for n, st, s, _ in runs]}
    (out / "compare.json").write_text(json.dumps(saved))
    compare = importlib.import_module("onelayer.experiments.compare")
    monkeypatch.setattr(compare, "model_num_layers", lambda model: 4)
    monkeypatch.setattr(compare, "bootstrap_indices", lambda n, r, seed: EXAMPLES)
    monkeypatch.setattr(compare, "seed_draws", lambda k, r, seed: SEEDS)
    result = comparison_results(out)
    layer = next(r for r in result.strategies if r.label == "3")
    assert (layer.share_of_full_gain, layer.share_low, layer.share_high) == pytest.approx(
        (1 / 3, 1 / 3, 1 / 3 + 0.95 * 2 / 3))
    # gain over full per resample: S_layer - S_full = -.25, 0, 0, -.25 -> sorted -.25, -.25, 0, 0
    assert (layer.gain_over_full, layer.gain_low, layer.gain_high) == pytest.approx((-0.25, -0.25, 0.0))
    assert (result.full_gain.value, result.full_gain.low) == pytest.approx((0.375, 0.075 * 0.375))


def test_comparison_runs_evaluate_every_eval_every_steps(tmp_path):
    config = CompareConfig(recipe=TrainConfig(steps=30, eval_every=10, eval_at_start=False), strategies="full,3")
    plan = plan_comparison(parse_strategies(config, 4, 5), [0])
    recipe = recipe_for(config, plan[1], tmp_path)
    assert (recipe.eval_every, recipe.eval_at_start) == (10, False)
    config.recipe.eval_at_start = True
    assert recipe_for(config, plan[1], tmp_path).eval_at_start is True


def test_a_kept_run_reads_its_profile_by_file_wherever_the_scan_now_lies(tmp_path):
    from onelayer.config import TrainConfig, to_dict
    from onelayer.experiments.rundir import check_finished

    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text("{}")
    made = TrainConfig(layers="top:3@/gpu/w/scans/main?protocol=best", lr_from="/gpu/w/scans/main?protocol=best")
    (run / "config.json").write_text(json.dumps(to_dict(made)))
    here = str(tmp_path / "results" / "main")
    for layers, lr_from in ((f"top:3@{here}?protocol=best", f"{here}/profile-best.json"),
                            (f"top:3@{here}/profile-best.json", f"{here}?protocol=best")):
        check_finished(run, TrainConfig(layers=layers, lr_from=lr_from))  # the same profile: kept
    with pytest.raises(OneLayerError, match=r"another --layers \('top:3@/gpu/w/scans/main\?protocol=best', now 'top:3@/"):
        check_finished(run, TrainConfig(layers=f"top:3@{here}", lr_from=f"{here}?protocol=best"))
    with pytest.raises(OneLayerError, match=r"another --lr-from \('/gpu/w/scans/main\?protocol=best', now '/.*\?protocol=best&auc'\)"):
        check_finished(run, TrainConfig(layers=f"top:3@{here}?protocol=best", lr_from=f"{here}?protocol=best&auc"))

"""First run and everyday use (issue 25): a quiet terminal and a live scan board, a learning signal that is
said to be missing, evaluations on the run's own task, errors before loading, directories a failed run does
not block, an offline hub that fails fast, checkpoints without optimizer state, and small things."""

import json
import socket
import subprocess
import sys
import time
import warnings
from io import StringIO
from pathlib import Path

import numpy as np
import pytest

from onelayer.cli import main
from onelayer.config import EvalConfig, SamplingConfig, TrainConfig
from onelayer.errors import OneLayerError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_args(model, out, *extra, task="toy:repeat", steps=2):
    return ["train", "--model", model, "--task", task, "--layers", "1", "--steps", steps, "--prompts-per-step", 2,
            "--group-size", 4, "--max-new-tokens", 6, "--lr", 1e-2, "--eval-n", 4, "--out", out, "--device", "cpu",
            "--no-progress", *extra]


def no_load(monkeypatch):
    """Make loading a model fail loudly, to show that a check came before it."""
    def loaded(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("onelayer.models.load_model", loaded)
    monkeypatch.setattr("onelayer.training.setup.load_model", loaded)


# ------------------------------------------------------------------------------------------- a quiet terminal


def test_other_libraries_warnings_are_hidden_and_counted_onelayers_shown(monkeypatch):
    from onelayer import progress

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *_args, **_kw: shown.append(str(message)))
    warnings.simplefilter("default")  # (pytest's own filters restore the state after the test)
    with progress.quiet_libraries() as hidden:
        warnings.warn_explicit("a dependency's notice", SyntaxWarning, "/site-packages/dep/mod.py", 3)
        warnings.warn_explicit("a dependency's notice", DeprecationWarning, "/site-packages/dep/mod.py", 4)
        warnings.warn_explicit("onelayer's own", UserWarning, str(Path(progress.__file__)), 10)
        import os

        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and os.environ["TQDM_DISABLE"] == "1"
        from transformers.utils import logging as hf_logging

        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    assert hidden.warnings == 2 and shown == ["onelayer's own"]
    assert "TQDM_DISABLE" not in os.environ and hf_logging.get_verbosity() == hf_logging.WARNING
    with progress.quiet_libraries(verbose=True) as hidden:
        warnings.warn_explicit("a dependency's notice", SyntaxWarning, "/site-packages/dep/other.py", 3)
    assert hidden.warnings == 0 and shown == ["onelayer's own", "a dependency's notice"]


def test_third_party_progress_bars_stay_off_the_terminal_unless_verbose():
    # tqdm reads the switch when it is imported, as in the onelayer command (the GGUF de-quantization bar)
    script = ("import sys\nfrom onelayer.progress import quiet_libraries\n"
              "with quiet_libraries(verbose=sys.argv[1] == 'v'):\n"
              "    from tqdm.auto import tqdm\n    list(tqdm(range(3), desc='Converting and de-quantizing'))\n")
    quiet = subprocess.run([sys.executable, "-c", script, "q"], capture_output=True, text=True, check=True)
    loud = subprocess.run([sys.executable, "-c", script, "v"], capture_output=True, text=True, check=True)
    assert "de-quantizing" not in quiet.stderr and "de-quantizing" in loud.stderr


def test_the_command_summarises_hidden_warnings_and_verbose_shows_them(capsys, saved_tiny, monkeypatch):
    import onelayer.models

    real = onelayer.models.load_skeleton

    def noisy(name):
        warnings.warn_explicit("clean_up_tokenization_spaces will change", FutureWarning, "/site-packages/tok.py", 1)
        return real(name)

    monkeypatch.setattr(onelayer.models, "load_skeleton", noisy)
    # warnings as the terminal shows them outside pytest, every time
    monkeypatch.setattr(warnings, "showwarning", lambda message, *_args, **_kw: print(message, file=sys.stderr))
    warnings.simplefilter("always")
    code, out, err = run(capsys, "layers", saved_tiny)
    assert code == 0 and "clean_up" not in err
    assert err.strip() == "(1 warning(s) from other libraries hidden; --verbose shows them)"
    for argv in (["--verbose", "layers", saved_tiny], ["layers", saved_tiny, "--verbose"]):
        code, out, err = run(capsys, *argv)
        assert code == 0 and "clean_up_tokenization_spaces will change" in err and "hidden" not in err


def test_layers_prints_its_title_on_one_line(capsys, saved_tiny):
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "0,2")
    first = out.splitlines()[0]
    assert code == 0 and first == f"{saved_tiny} (LlamaForCausalLM, 4 layers), spec 0,2:"


# ------------------------------------------------------------------------------------- the scan's live board


def test_run_board_counts_estimates_and_prints_a_line_per_run_off_a_terminal(monkeypatch):
    from rich.console import Console

    from onelayer import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    out = StringIO()
    summary = lambda: [("best layer so far", "layer 3")]  # noqa: E731
    with progress.RunBoard("scan", total=5, done=1, console=Console(file=out, width=300), summary=summary) as board:
        board.start("layer001-s0")
        now[0] = 130.0
        board.finish("layer001-s0")  # 30 s for one run: 3 runs left, about 90 s, shown as 2 min
        board.start("layer002-s0")
        now[0] = 160.0
        board.finish("layer002-s0", failed=True)  # 60 s for two: 2 left, about 60 s
        board.start("layer003-s0 and 1 more")
        now[0] = 200.0
        board.finish("layer003-s0 and 1 more", failed=1, count=2)  # a group trained together: one line
    lines = out.getvalue().splitlines()
    assert lines == [
        "scan: layer001-s0 finished; runs done 2 of 5; best layer so far layer 3; elapsed 30 s; time left about 2 min",
        "scan: layer002-s0 failed; runs done 3 of 5 (1 failed); best layer so far layer 3; elapsed 60 s; "
        "time left about 60 s",
        "scan: layer003-s0 and 1 more finished (1 failed); runs done 5 of 5 (2 failed); best layer so far layer 3; "
        "elapsed 2 min; time left about 0 s"]


def test_run_board_is_a_live_table_on_a_terminal():
    from rich.console import Console

    from onelayer.progress import RunBoard

    out = StringIO()
    with RunBoard("scan", total=2, console=Console(file=out, force_terminal=True, width=120),
                  summary=lambda: [("base / full", "0.250 / 0.500 accuracy")]) as board:
        board.start("base")
        board.finish("base")
    shown = out.getvalue()
    assert "runs done" in shown and "1 of 2" in shown and "0.250 / 0.500" in shown and "time left" in shown


def _result(scan, name, **row):
    (scan / "runs" / name).mkdir(parents=True)
    (scan / "runs" / name / "result.json").write_text(json.dumps(row))


def test_scan_so_far_names_the_best_layer_with_its_point_contribution(tmp_path):
    from onelayer.experiments.scan import PlannedRun, scan_so_far

    plan = [PlannedRun("base", "base", 0), PlannedRun("full-s0", "full", 0), PlannedRun("layer001-s0", "layer", 0, 1),
            PlannedRun("layer001-s1", "layer", 1, 1), PlannedRun("layer002-s0", "layer", 0, 2),
            PlannedRun("layer003-s0", "layer", 0, 3)]
    assert scan_so_far(tmp_path, plan) == [("base / full", "- / - accuracy")]
    _result(tmp_path, "layer001-s0", accuracy=0.30)
    _result(tmp_path, "layer001-s1", accuracy=0.40)
    _result(tmp_path, "layer002-s0", accuracy=0.33)
    assert scan_so_far(tmp_path, plan)[1] == ("best layer so far", "layer 1: accuracy 0.350; 2 layer(s) measured")
    _result(tmp_path, "base", accuracy=0.25)
    _result(tmp_path, "full-s0", accuracy=0.45)
    # (0.35 - 0.25) / (0.45 - 0.25) = 0.5; layer 3 is still pending
    assert scan_so_far(tmp_path, plan) == [
        ("base / full", "0.250 / 0.450 accuracy"),
        ("best layer so far", "layer 1: accuracy 0.350, contribution +0.50 (point estimate); 2 layer(s) measured")]


def test_a_scan_reports_each_finished_run_in_ci_logs(capsys, saved_tiny, tmp_path):
    code, out, err = run(capsys, "scan", "--model", saved_tiny, "--task", "toy:repeat", "--layers", "1", "--steps", 1,
                         "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 4, "--eval-n", 3,
                         "--device", "cpu", "--out", tmp_path / "scan")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("scan: ")]
    assert [line.split(";")[0] for line in lines] == ["scan: base finished", "scan: full-s0 finished",
                                                     "scan: layer001-s0 finished"]
    assert "runs done 3 of 3" in lines[-1] and "best layer so far layer 1: accuracy" in lines[-1]


def test_scan_so_far_reads_full_training_at_its_best_rate_and_each_layer_at_its_own(tmp_path):
    from onelayer.experiments.scan import PlannedRun, scan_so_far

    plan = [PlannedRun("base", "base", 0), PlannedRun("full-s0", "full", 0),
            PlannedRun("full-lr4x-s0", "full", 0, None, 4.0), PlannedRun("layer001-s0", "layer", 0, 1),
            PlannedRun("layer001-lr4x-s0", "layer", 0, 1, 4.0), PlannedRun("layer002-s0", "layer", 0, 2)]
    for name, accuracy in [("base", 0.2), ("full-s0", 0.55), ("full-lr4x-s0", 0.09), ("layer001-s0", 0.26),
                           ("layer001-lr4x-s0", 0.65), ("layer002-s0", 0.30)]:
        _result(tmp_path, name, accuracy=accuracy)
    # full training at 1x (0.55 beats 0.09 at 4x); layer 1 at 4x: (0.65 - 0.2) / (0.55 - 0.2) = 1.29
    assert scan_so_far(tmp_path, plan) == [
        ("base / full", "0.200 / 0.550 accuracy at 1x --lr"),
        ("best layer so far", "layer 1 at 4x --lr: accuracy 0.650, contribution +1.29 (point estimate); "
                              "2 layer(s) measured")]


def test_the_cpu_demo_trains_at_two_rates_and_points_to_the_gpu_scan(capsys, saved_tiny, tmp_path, monkeypatch):
    import onelayer.cli as cli

    real = cli.demo_config

    def tiny_demo(out, gpu):
        config = real(out, gpu)
        assert not gpu and config.lr_grid == "1,4" and config.recipe.layers == "15"
        assert config.recipe.keep_optimizer == "none" and config.recipe.lr == 5e-5
        recipe = TrainConfig(**{**config.recipe.__dict__, "model": str(saved_tiny), "task": "toy:repeat",
                                "task_options": {}, "layers": "1", "steps": 1, "prompts_per_step": 2,
                                "group_size": 2, "eval_n": 3, "device": "cpu",
                                "sampling": SamplingConfig(max_new_tokens=4)})
        return type(config)(**{**config.__dict__, "recipe": recipe})

    monkeypatch.setattr(cli, "demo_config", tiny_demo)
    code, out, err = run(capsys, "demo", "--cpu-scale", "--out", tmp_path / "demo")
    assert code == 0, err
    runs = tmp_path / "demo" / "scan" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["base", "full-lr4x-s0", "full-s0", "layer001-lr4x-s0",
                                                      "layer001-s0"]
    assert not list(runs.glob("*/checkpoint/optimizer.pt"))
    assert (tmp_path / "demo" / "scan" / "profile-best.json").is_file()
    summary = out[out.index("What this shows:"):].splitlines()
    assert summary[1].startswith("  full training at lr 5e-05: ")
    assert summary[2].startswith("  full training at lr 0.0002: accuracy ")
    assert summary[3].startswith("  layer 1 alone at lr ")
    assert cli.GPU_SCAN_REPORT in out and (Path(cli.__file__).parents[2] / cli.GPU_SCAN_REPORT).is_file()


def test_the_demo_summary_says_which_gains_are_above_the_noise():
    from onelayer.cli import demo_summary
    from onelayer.profile import Estimate, LayerPoint, Profile, RateRobustness

    points = (LayerPoint(0, 0.2, 0.0, 0.4, False),)
    robustness = RateRobustness((1.0, 4.0), (0.55, 0.09), 1.0, float("nan"), float("nan"), ())
    study = Profile(points, Estimate(0.35, 0.24, 0.45), True, "", robustness=robustness,
                    layer_gains=(LayerPoint(15, 0.06, -0.01, 0.14, False, 1.0),
                                 LayerPoint(29, -0.08, -0.15, -0.01, False, 1.0)))
    best = Profile(points, Estimate(0.35, 0.24, 0.45), True, "", protocol="best", robustness=robustness,
                   layer_gains=(LayerPoint(15, 0.45, 0.35, 0.56, False, 4.0),
                                LayerPoint(29, -0.08, -0.15, -0.01, False, 1.0)))
    assert demo_summary(study, best, 5e-5, 100) == [
        "What this shows: accuracy gains over the base model on 100 held-out examples (95% intervals; one seed, so "
        "training noise is not in them):",
        "  full training at lr 5e-05: +0.350 [+0.240, +0.450], above the noise",
        "  full training at lr 0.0002: accuracy 0.090, against 0.550 at lr 5e-05",
        "  layer 15 alone at lr 5e-05: +0.060 [-0.010, +0.140], within the noise; at its own best lr 0.0002: "
        "+0.450 [+0.350, +0.560], above the noise",
        "  layer 29 alone at lr 5e-05: -0.080 [-0.150, -0.010], below the noise"]


# ------------------------------------------------------------------------------------- no learning signal


def test_group_size_1_is_refused_before_loading(capsys, monkeypatch, tmp_path):
    no_load(monkeypatch)
    for task in (["--task", "toy:repeat"], ["--task", "maze:3", "--algo", "gigpo"]):
        code, _, err = run(capsys, "train", *task, "--group-size", 1, "--out", tmp_path / "r")
        assert code == 2 and err.startswith("error: --group-size 1 gives no learning signal") and err.count("\n") == 1


def test_no_signal_notice_names_the_likely_cause_and_fix():
    from onelayer.training.step import no_signal_notice

    config = TrainConfig(out="runs/x", group_size=4, sampling=SamplingConfig(max_new_tokens=32))
    row = {"step": 3, "zero_signal_fraction": 1.0, "accuracy": 0.0, "truncated_fraction": 0.9}
    text = no_signal_notice(config, row, 3)
    assert text.startswith("no learning signal in runs/x: in 3 step(s) in a row (to step 3) 100% of groups gave all "
                           "4 completions the same reward")
    assert "raise --max-new-tokens (now 32)" in text and "\n" not in text
    assert "easier task options" in no_signal_notice(config, {**row, "truncated_fraction": 0.1}, 3)
    assert "too easy" in no_signal_notice(config, {**row, "accuracy": 1.0}, 3)
    assert "--group-size (now 4)" in no_signal_notice(config, {**row, "accuracy": 0.5}, 3)


def test_a_run_without_learning_signal_says_so_once(capsys, saved_tiny, tmp_path):
    data = tmp_path / "hard.jsonl"  # a tiny random model never writes these answers: every reward is 0
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "98765"}) + "\n" for i in range(20)))
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(saved_tiny, out, task=str(data), steps=4))
    assert code == 0, err
    assert err.count("warning: no learning signal") == 1 and "100% of groups" in err
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [("warning" in r) for r in rows] == [False, False, True, False]  # after 3 flat steps, once
    assert rows[2]["warning"].startswith(f"no learning signal in {out}: in 3 step(s) in a row (to step 3)")
    code, _, err = run(capsys, *train_args(saved_tiny, tmp_path / "short", task=str(data), steps=1))
    assert code == 0 and err.count("warning: no learning signal") == 1  # a 1-step run: after its one step
    code, _, err = run(capsys, *train_args(saved_tiny, tmp_path / "toy", steps=3))  # rewards differ within groups
    assert code == 0 and "no learning signal" not in err


# ------------------------------------------------------------------------- evaluations on the run's own task


def _fake_checkpoint(path: Path, task: str, options: dict) -> Path:
    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "trained.safetensors").write_bytes(b"")
    (path / "checkpoint" / "onelayer.json").write_text(json.dumps({"step": 1, "config": {
        "task": task, "task_options": options, "steps": 1}}))
    return path


def test_resolve_task_takes_the_checkpoints_task_unless_told_otherwise(tmp_path):
    from onelayer.evaluate import resolve_task

    run_dir = str(_fake_checkpoint(tmp_path / "run", "rg:chain_sum", {"max_terms": 2, "min_digits": 1}))
    own, line = resolve_task(EvalConfig(checkpoint=run_dir))
    assert (own.task, own.task_options) == ("rg:chain_sum", {"max_terms": 2, "min_digits": 1})
    assert line == f"evaluating on rg:chain_sum (max_terms=2, min_digits=1): the task {run_dir} was trained on"
    same, line = resolve_task(EvalConfig(checkpoint=run_dir, task="rg:chain_sum", task_options={"max_terms": 3}))
    assert same.task_options == {"max_terms": 3, "min_digits": 1} and line.endswith("with the task options given")
    other, line = resolve_task(EvalConfig(checkpoint=run_dir, task="rg:gcd"))
    assert (other.task, other.task_options) == ("rg:gcd", {}) and line.endswith(": as given")
    plain, line = resolve_task(EvalConfig(model="m"))
    assert plain.task == "rg:basic_arithmetic" and "the default task" in line
    assert resolve_task(own)[0] == own  # resolving twice changes nothing


def test_eval_of_a_checkpoint_uses_its_tasks_options(capsys, saved_tiny, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, *train_args(saved_tiny, out, "--task-option", "size=5", steps=1))[0] == 0
    code, stdout, err = run(capsys, "eval", "--checkpoint", out, "--n", 100, "--max-new-tokens", 4,
                            "--device", "cpu", "--out", tmp_path / "ev")
    assert code == 0, err
    assert stdout.splitlines()[0] == f"evaluating on toy:repeat (size=5): the task {out} was trained on"
    assert "on 5 examples x 1" in stdout  # the run's 5 examples, not the default 256
    code, stdout, _ = run(capsys, "eval", "--checkpoint", out, "--task-option", "size=7", "--n", 100,
                          "--max-new-tokens", 4, "--device", "cpu")
    assert code == 0 and "on 7 examples x 1" in stdout and "with the task options given" in stdout


def test_an_ensemble_votes_on_its_members_task_and_names_what_it_wrote(capsys, saved_tiny, tmp_path):
    for name in ("a", "b"):
        assert run(capsys, *train_args(saved_tiny, tmp_path / name, "--task-option", "size=3", steps=1))[0] == 0
    vote = tmp_path / "vote"
    code, out, err = run(capsys, "ensemble", tmp_path / "a", tmp_path / "b", "--n", 50, "--max-new-tokens", 4,
                         "--device", "cpu", "--out", vote)
    assert code == 0, err
    assert f"evaluating on toy:repeat (size=3): the task {tmp_path / 'a'} was trained on" in out
    assert len((vote / "ensemble.examples.jsonl").read_text().splitlines()) == 3
    assert out.splitlines()[-1] == f"results in {vote}/: ensemble.json, ensemble.examples.jsonl, members/"
    assert not (vote / "self_consistency.json").exists()
    # a member trained on another task is refused unless --task says which one to vote on
    assert run(capsys, *train_args(saved_tiny, tmp_path / "c", "--task-option", "size=4", steps=1))[0] == 0
    code, _, err = run(capsys, "ensemble", tmp_path / "a", tmp_path / "c", "--device", "cpu", "--out", vote)
    assert code == 2 and "were trained on different tasks" in err


def test_jaccard_of_two_empty_sets_is_undefined():
    from onelayer.analysis.ensemble import ensemble, jaccard
    from onelayer.experiments.specialists import summary_lines

    assert jaccard(set(), set()) is None and jaccard({1}, set()) == 0.0 and jaccard({1, 2}, {2}) == 0.5
    same = lambda a, b: a == b  # noqa: E731
    nobody = ensemble({"a": (["1", "2"], [False, False]), "b": (["3", "4"], [False, False])}, same)
    assert nobody.overlap == {("a", "b"): None}
    assert summary_lines("t", nobody)[-1] == ("  mean pairwise overlap (Jaccard of solved sets) n/a (1 pair(s) where "
                                              "neither solved anything left out)")
    some = ensemble({"a": (["1", "2"], [True, False]), "b": (["1", "4"], [True, False]),
                     "c": (["5", "6"], [False, False]), "d": (["7", "8"], [False, False])}, same)
    # pairs: a|b 1, a|c a|d b|c b|d 0, c|d undefined -> mean of five 0.2
    assert summary_lines("t", some)[-1] == ("  mean pairwise overlap (Jaccard of solved sets) 0.200 (1 pair(s) "
                                            "where neither solved anything left out)")


# ------------------------------------------------------------------------------ errors before loading


@pytest.mark.parametrize("command", ["train", "scan", "compare", "eval", "ensemble"])
def test_an_out_that_is_a_file_or_cannot_be_made_fails_before_loading(capsys, monkeypatch, tmp_path, command,
                                                                      saved_tiny):
    no_load(monkeypatch)
    monkeypatch.setattr("onelayer.experiments.scan.model_num_layers", lambda _: 4)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = {"train": ["train", "--model", saved_tiny, "--task", "toy:repeat"],
            "scan": ["scan", "--model", saved_tiny, "--task", "toy:repeat", "--layers", "1"],
            "compare": ["compare", "--model", saved_tiny, "--task", "toy:repeat", "--strategies", "full"],
            "eval": ["eval", "--model", saved_tiny, "--task", "toy:repeat"],
            "ensemble": ["ensemble", "--self-consistency", saved_tiny, "--task", "toy:repeat"]}[command]
    code, _, err = run(capsys, *args, "--out", blocker)
    assert code == 2 and err == f"error: --out {blocker} is a file, not a directory: pass a directory (it is " \
                                "created if missing)\n"
    code, _, err = run(capsys, *args, "--out", blocker / "sub" / "dir")
    assert code == 2 and err == f"error: --out {blocker / 'sub' / 'dir'} cannot be created: {blocker} is a file; " \
                                "pass another --out\n"


def test_check_out_dir_accepts_new_and_existing_directories(tmp_path):
    from onelayer.config import check_out_dir

    check_out_dir(tmp_path)
    check_out_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ------------------------------------------------------------------------------ failed runs, resuming, disk


def test_an_empty_task_file_is_named_and_does_not_block_the_corrected_command(capsys, saved_tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, *train_args(saved_tiny, out, task=str(empty)))
    assert code == 2 and err.startswith(f"error: task file {empty} has no examples") and err.count("\n") == 1
    code, _, err = run(capsys, *train_args(saved_tiny, out))
    assert code == 0, err


def test_an_empty_train_split_is_refused_before_loading(capsys, monkeypatch, tmp_path):
    no_load(monkeypatch)
    # 100 one-digit sums, all of them drawn into the 1000 eval examples: nothing is left to train on
    code, _, err = run(capsys, "train", "--task", "rg:basic_arithmetic", "--task-option", "max_terms=2",
                       "--task-option", "max_digits=1", "--task-option", 'operators=["+"]', "--task-option",
                       "allow_negation=false", "--task-option", "allow_parentheses=false", "--out", tmp_path / "r")
    assert code == 2 and err.startswith("error: the train split of rg:basic_arithmetic is empty") and "eval_size" in err
    assert not (tmp_path / "r").exists()


def test_a_run_that_never_started_is_no_experiment_but_one_that_did_is(capsys, saved_tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # what a run that failed between writing config.json and its first step leaves behind
    (out / "config.json").write_text(json.dumps({**TrainConfig(task="rg:gcd").__dict__, "sampling": {}}))
    code, _, err = run(capsys, *train_args(saved_tiny, out))
    assert code == 0, err
    code, _, err = run(capsys, *train_args(saved_tiny, out, "--lr", 0.5))
    assert code == 2 and "holds a run with another --lr" in err


def test_resuming_says_so_and_keep_optimizer_none_drops_the_state_of_finished_runs(capsys, saved_tiny, tmp_path,
                                                                                    monkeypatch):
    import onelayer.training.step as step_module

    out = tmp_path / "run"
    real_update = step_module.policy_update

    def dies_at_step_3(*args, **kwargs):
        if args[6] == 2:
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    monkeypatch.setattr(step_module, "policy_update", dies_at_step_3)
    code, _, _ = run(capsys, *train_args(saved_tiny, out, "--keep-optimizer", "none", "--save-every", 1, steps=4))
    assert code == 130
    assert (out / "checkpoint" / "optimizer.pt").is_file()  # an unfinished run keeps it: it resumes exactly
    monkeypatch.setattr(step_module, "policy_update", real_update)
    code, _, err = run(capsys, *train_args(saved_tiny, out, "--keep-optimizer", "none", "--save-every", 1, steps=4))
    assert code == 0 and f"resuming {out} from step 2 of 4\n" in err
    assert not (out / "checkpoint" / "optimizer.pt").exists()  # finished: dropped
    code, _, err = run(capsys, *train_args(saved_tiny, out, "--keep-optimizer", "none", steps=4))
    assert code == 0 and f"{out} has trained 4 of 4 steps already: nothing left to train" in err
    code, _, err = run(capsys, *train_args(saved_tiny, out, "--keep-optimizer", "none", steps=5))
    assert code == 0 and f"resuming {out} from step 4 of 5 without optimizer state" in err
    assert json.loads((out / "checkpoint" / "onelayer.json").read_text())["step"] == 5
    kept = tmp_path / "kept"
    assert run(capsys, *train_args(saved_tiny, kept))[0] == 0
    assert (kept / "checkpoint" / "optimizer.pt").is_file()  # the default, last: kept


# --------------------------------------------------------------------------------------------- offline hub


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_fails_fast_in_one_line(capsys, monkeypatch, tmp_path):
    from onelayer.models import hub_unreachable

    hub_unreachable.cache_clear()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    code, _, err = run(capsys, "layers", "onelayer-tests/not-a-model")
    assert code == 2 and err.count("\n") == 1 and "Retrying" not in err
    assert err.startswith("error: cannot load model 'onelayer-tests/not-a-model': the Hugging Face hub cannot be "
                          "reached (http://127.0.0.1:")
    assert time.monotonic() - started < 20  # transformers alone retries for about a minute
    hub_unreachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "layers", "onelayer-tests/not-a-model")
    assert code == 2 and "cannot be reached (HF_HUB_OFFLINE is set)" in err


def test_a_cached_hub_model_is_read_from_the_cache_when_the_hub_is_unreachable(monkeypatch):
    import onelayer.models as models

    monkeypatch.setattr(models, "hub_unreachable", lambda endpoint: f"{endpoint}: refused")
    monkeypatch.setattr(models, "_in_hub_cache", lambda repo: repo == "org/cached")
    source = models._loadable("org/cached")
    assert source.offline and models._hub_kwargs(source) == {"local_files_only": True}
    with pytest.raises(OneLayerError, match="not in the local cache"):
        models._loadable("org/elsewhere")
    monkeypatch.setattr(models, "hub_unreachable", lambda endpoint: None)
    assert models._hub_kwargs(models._loadable("org/elsewhere")) == {}


# ------------------------------------------------------------------------------------------------- small


def test_typos_get_a_suggestion_and_bad_option_values_name_the_option():
    from onelayer.tasks import get_task

    cases = [("rg:basic_arithmetc", None, "did you mean 'rg:basic_arithmetic'?"),
             ("basic_arithmetic", None, "did you mean 'rg:basic_arithmetic'?"),
             ("rgg:chain_sum", None, "did you mean 'rg:chain_sum'?"),
             ("rg:basic_arithmetic", {"max_term": 3}, "has no task option 'max_term'; did you mean 'max_terms'?"),
             ("rg:basic_arithmetic", {"max_terms": "abc"},
              "task option max_terms=abc of rg:basic_arithmetic must be an integer (default 6)"),
             ("rg:basic_arithmetic", {"allow_negation": 1}, "allow_negation=1 of rg:basic_arithmetic must be true"),
             ("rg:basic_arithmetic", {"format_style": "fancy"}, "must be one of simple, natural")]
    for name, options, message in cases:
        with pytest.raises(OneLayerError) as err:
            get_task(name, options)
        assert message in str(err.value) and "\n" not in str(err.value), (name, options)
    assert get_task("rg:basic_arithmetic", {"max_terms": 2, "operators": ["+"], "allow_negation": False})


def test_unreliable_profiles_draw_the_measured_gains_and_say_why(tmp_path, monkeypatch):
    from dataclasses import asdict

    from onelayer.analysis import figures
    from onelayer.analysis.contribution import layer_profile
    from onelayer.profile import profile_from_dict

    base = [[0, 1, 0, 1]]
    profile = layer_profile(base, base, {1: [[1, 1, 0, 1]], 3: [[0, 0, 0, 1]]}, 4, n_resamples=200)
    assert not profile.reliable and np.isnan(profile.points[1].contribution)  # full gained nothing: C undefined
    assert [(g.layer, g.contribution) for g in profile.layer_gains] == [(1, 0.25), (3, -0.25)]
    assert profile_from_dict(json.loads(json.dumps(asdict(profile)))).layer_gains == profile.layer_gains
    drawn = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, out: drawn.setdefault("fig", fig))
    figures.plot_profile(profile, tmp_path / "profile.png", title="layer contribution: demo")
    ax = drawn["fig"].axes[0]
    points = [line for line in ax.lines if line.get_marker() == "o"][0]
    assert list(points.get_xdata()) == [1, 3] and list(points.get_ydata()) == [0.25, -0.25]
    assert "not above the noise" in " ".join(t.get_text() for t in ax.texts)
    assert ax.get_ylabel() == "accuracy gain over the base model"
    from onelayer.experiments.report import profile_caption

    assert profile_caption(profile).startswith("Accuracy gain over the base model")  # the report says what is drawn
    reliable = layer_profile([[0] * 8], [[1] * 8], {1: [[1, 1, 0, 1, 0, 0, 1, 0]]}, 4, n_resamples=200)
    assert reliable.reliable
    assert profile_caption(reliable).startswith("Contribution C(l)")


def test_layer_gains_are_read_at_the_rate_each_protocol_reads():
    from onelayer.analysis.contribution import contribution_profile

    base = [[0, 0, 1, 0]]
    full = {1.0: [[1, 1, 1, 0]], 4.0: [[0, 0, 0, 0]]}  # full training is best at 1x
    layers = {2: {1.0: [[0, 1, 1, 0]], 4.0: [[1, 1, 1, 1]]}}
    study = contribution_profile(base, full, layers, 4, protocol="study", n_resamples=200)
    best = contribution_profile(base, full, layers, 4, protocol="best", n_resamples=200)
    # at 1x: 2/4 - 1/4; at its own best rate, 4x: 4/4 - 1/4
    assert [(g.layer, g.contribution, g.lr_scale) for g in study.layer_gains] == [(2, 0.25, 1.0)]
    assert [(g.layer, g.contribution, g.lr_scale) for g in best.layer_gains] == [(2, 0.75, 4.0)]
    assert best.layer_gains[0].low <= 0.75 <= best.layer_gains[0].high


def test_a_grid_profile_of_one_layer_says_its_rank_agreement_is_undefined_not_nan():
    from onelayer.analysis.contribution import contribution_profile
    from onelayer.analysis.figures import profile_table

    base = [[0, 0, 1, 0]]
    full = {1.0: [[1, 1, 1, 0]], 4.0: [[0, 0, 0, 0]]}
    one = contribution_profile(base, full, {2: {1.0: [[0, 1, 1, 0]], 4.0: [[1, 1, 1, 1]]}}, 4, n_resamples=50)
    assert "Spearman n/a, Kendall n/a" in profile_table(one) and "nan" not in profile_table(one)
    three = contribution_profile(base, full, {0: {1.0: [[1, 1, 1, 0]], 4.0: [[0, 0, 1, 0]]},
                                              1: {1.0: [[0, 1, 1, 0]], 4.0: [[1, 1, 1, 1]]},
                                              2: {1.0: [[0, 0, 1, 0]], 4.0: [[0, 1, 1, 0]]}}, 4, n_resamples=50)
    # study (1x): C = 1.0, 0.5, 0.0; own best: 1.0 (1x), 1.5 (4x), 0.5 (4x): ranks 1,2,3 vs 2,1,3, so
    # rho = 1 - 6 * 2 / (3 * 8) = 0.5 and tau = (2 - 1) / 3
    assert "Spearman +0.50, Kendall +0.33" in profile_table(three)

"""--report-to: every step row, evaluation and scan profile reaches TensorBoard (read back from the event files)
or wandb, next to the JSON-lines logs, for solo, resumed and concurrent runs alike."""

import importlib.machinery
import importlib.util
import json
import sys
import time
import types

import pytest

from onelayer.cli import main
from onelayer.config import TrainConfig
from onelayer.errors import OneLayerError
from onelayer.experiments.scan import run_scan, write_profile
from onelayer.profile import read_profile
from onelayer.tracking import parse_report_to, scalars
from onelayer.training import train
from onelayer.training.concurrent import train_variants

from .test_concurrent import config as concurrent_config
from .test_scan import SCORES, _fake_execute, scan_config
from .test_train import config
from .tiny import tiny_model


def read_events(directory) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """Scalars by tag as (step, value) from the TensorBoard event files in ``directory``, and all tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}, tags


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_rows_sent(events: dict, rows: list[dict], section: str) -> None:
    """Every number of every row is in ``events`` at the row's step, and no other step is."""
    expected = {}
    for row in rows:
        for tag, value in scalars(row, section).items():
            expected.setdefault(tag, []).append((row["step"], value))
    sent = {tag: points for tag, points in events.items() if tag.startswith(section + "/")}
    assert sorted(sent) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in sent[tag]] == [s for s, _ in points], tag
        assert [v for _, v in sent[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-12), tag


def test_scalars_of_a_row_are_its_finite_numbers_under_the_section():
    row = {"step": 3, "reward": 0.5, "outcomes": {"passed": 0.25, "timeout": 0.75}, "truncated": True,
           "kl": float("nan"), "nonfinite_grad_layers": [1, 2], "note": "text", "lr": 1e-6, "n": 16}
    assert scalars(row, "train") == {"train/reward": 0.5, "train/outcomes/passed": 0.25,
                                     "train/outcomes/timeout": 0.75, "train/truncated": 1.0, "train/lr": 1e-6,
                                     "train/n": 16.0}


def test_report_to_names_trackers_and_refuses_unknown_or_missing_ones(monkeypatch):
    assert parse_report_to("none") == () and parse_report_to("") == ()
    assert parse_report_to(" TensorBoard,tensorboard ") == ("tensorboard",)
    with pytest.raises(OneLayerError, match="unknown --report-to 'mlflow': use none, tensorboard, wandb"):
        parse_report_to("tensorboard,mlflow")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(OneLayerError, match=r"--report-to wandb needs the wandb package, which is not installed: "
                                            r"pip install wandb"):
        TrainConfig(report_to="wandb").validate()


def test_train_refuses_an_unknown_tracker_before_loading_anything(capsys, tmp_path):
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--report-to", "mlflow",
                 "--out", str(tmp_path / "run")])
    assert code == 2 and capsys.readouterr().err.startswith("error: unknown --report-to 'mlflow'")
    assert not (tmp_path / "run").exists()


def test_a_run_sends_every_step_row_and_evaluation_to_tensorboard(tmp_path, tokenizer):
    result = train(config(tmp_path, steps=4, eval_every=2, eval_n=4, report_to="tensorboard"), tiny_model("llama"),
                   tokenizer, progress=False)
    events, tags = read_events(result.out / "tensorboard")
    rows, evals = jsonl(result.out / "log.jsonl"), jsonl(result.out / "eval.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    assert_rows_sent(events, rows, "train")
    assert_rows_sent(events, evals, "eval")
    assert {"train/reward", "train/loss", "train/grad_norm", "eval/accuracy", "eval/ci_low"} <= set(events)


def test_a_resumed_run_shows_each_step_once_with_its_redone_values(tmp_path, tokenizer, monkeypatch):
    import onelayer.training.step as step_module

    real_update = step_module.policy_update

    def dies_at_step_3(*args, **kwargs):
        if args[6] == 3:
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    run = config(tmp_path, steps=6, save_every=2, eval_every=2, eval_n=4, report_to="tensorboard")
    monkeypatch.setattr(step_module, "policy_update", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(run, tiny_model("llama"), tokenizer, progress=False)
    before, _ = read_events(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in before["train/reward"]] == [1, 2, 3]  # step 3 was logged, then lost with the kill
    monkeypatch.setattr(step_module, "policy_update", real_update)
    train(run, tiny_model("llama"), tokenizer, progress=False)
    events, _ = read_events(tmp_path / "run" / "tensorboard")
    assert_rows_sent(events, jsonl(tmp_path / "run" / "log.jsonl"), "train")
    assert_rows_sent(events, jsonl(tmp_path / "run" / "eval.jsonl"), "eval")


def test_variants_trained_together_each_send_their_own_rows(tmp_path, tokenizer):
    configs = [concurrent_config(tmp_path / f"v{k}", layers, report_to="tensorboard", steps=2, eval_every=2)
               for k, layers in enumerate(["1", "2"])]
    results = train_variants(configs, tiny_model("llama"), tokenizer, progress=False)
    assert all(not isinstance(r, Exception) for r in results)
    for k in range(2):
        out = tmp_path / f"v{k}"
        events, _ = read_events(out / "tensorboard")
        assert_rows_sent(events, jsonl(out / "log.jsonl"), "train")
        assert_rows_sent(events, jsonl(out / "eval.jsonl"), "eval")
        assert [v for _, v in events["train/concurrent_variants"]] == [2.0, 2.0]
    assert jsonl(tmp_path / "v0" / "log.jsonl") != jsonl(tmp_path / "v1" / "log.jsonl")


def test_a_scan_sends_its_profile_and_a_rewritten_profile_replaces_it(tmp_path, saved_tiny):
    scan = tmp_path / "scan"
    run_scan(scan_config(scan, saved_tiny, report_to="tensorboard"), progress=False, execute=_fake_execute([], SCORES))
    events, tags = read_events(scan / "tensorboard")
    # layer 1: 0.5 and layer 3: 1.0 measured (SCORES), layers 0 and 2 interpolated at 0.5 and 0.75
    assert events["profile/contribution"] == [(0, 0.5), (1, 0.5), (2, 0.75), (3, 1.0)]
    assert events["profile/interpolated"] == [(0, 1.0), (1, 0.0), (2, 1.0), (3, 0.0)]
    profile = read_profile(scan)
    assert [v for _, v in events["profile/low"]] == pytest.approx([p.low for p in profile.points])
    assert events["profile/full_gain"] == [(0, pytest.approx(profile.full_gain.value))]
    assert "profile/table/text_summary" in tags["tensors"] and "profile/figure" in tags["images"]
    write_profile(scan)  # as `onelayer profile SCAN` does: the view shows the new profile once, not twice
    again, _ = read_events(scan / "tensorboard")
    assert again["profile/contribution"] == events["profile/contribution"]


def test_a_scan_without_report_to_writes_no_tracker_files(tmp_path, saved_tiny):
    scan = tmp_path / "scan"
    run_scan(scan_config(scan, saved_tiny), progress=False, execute=_fake_execute([], SCORES))
    assert (scan / "profile.json").is_file() and not (scan / "tensorboard").exists()


class FakeWandb:
    """Stands in for the wandb package: records what onelayer hands it."""

    def __init__(self):
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], summary={}, finished=False)
        run.log = lambda values, step=None: run.logged.append((step, values))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def fake_wandb(monkeypatch) -> FakeWandb:
    fake = FakeWandb()
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init, module.Image = fake.init, lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return fake


def test_wandb_gets_an_offline_run_per_run_directory_with_every_row(tmp_path, tokenizer, monkeypatch):
    fake = fake_wandb(monkeypatch)
    result = train(config(tmp_path, steps=3, eval_every=3, eval_n=4, report_to="wandb"), tiny_model("llama"),
                   tokenizer, progress=False)
    (run,) = fake.runs
    assert run.kwargs["mode"] == "offline" and run.kwargs["dir"] == str(result.out) and run.finished
    assert run.kwargs["config"]["report_to"] == "wandb" and run.kwargs["config"]["steps"] == 3
    rows, evals = jsonl(result.out / "log.jsonl"), jsonl(result.out / "eval.jsonl")
    expected = [(r["step"], scalars(r, "train")) for r in rows] + [(r["step"], scalars(r, "eval")) for r in evals]
    assert sorted(run.logged, key=lambda x: (x[0], next(iter(x[1])))) == \
        sorted(expected, key=lambda x: (x[0], next(iter(x[1]))))


def test_wandb_gets_the_profile_in_rising_steps(tmp_path, saved_tiny, monkeypatch):
    fake = fake_wandb(monkeypatch)
    scan = tmp_path / "scan"
    run_scan(scan_config(scan, saved_tiny, report_to="wandb"), progress=False, execute=_fake_execute([], SCORES))
    (run,) = fake.runs
    assert run.kwargs["dir"] == str(scan) and run.finished and "profile/table" in run.summary
    steps = [step for step, _ in run.logged if step is not None]
    assert steps == [0, 1, 2, 3]  # wandb drops a step lower than one already logged
    assert [values["profile/contribution"] for step, values in run.logged if step is not None] == [0.5, 0.5, 0.75, 1.0]
    assert run.logged[0][1]["profile/full_gain"] == pytest.approx(read_profile(scan).full_gain.value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_a_real_wandb_offline_run_holds_the_step_rows(tmp_path, tokenizer, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for seed in (0, 1):  # two runs in one process, as a scan makes them
        train(config(tmp_path / str(seed), steps=2, seed=seed, report_to="wandb"), tiny_model("llama"), tokenizer,
              progress=False)
        (history,) = (tmp_path / str(seed) / "run" / "wandb").glob("offline-run-*/run-*.wandb")
        rows = jsonl(tmp_path / str(seed) / "run" / "log.jsonl")
        wanted = [b"train/reward"] + [repr(row["grad_norm"]).encode() for row in rows]
        for _ in range(100):  # wandb's service writes the file after finish() returns
            if all(w in history.read_bytes() for w in wanted):
                break
            time.sleep(0.1)
        assert all(w in history.read_bytes() for w in wanted)

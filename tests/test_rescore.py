"""onelayer rescore: saved completions scored again after a scorer fix, and everything computed from them."""

import gzip
import json

import pytest

from onelayer.cli import main
from onelayer.config import SamplingConfig, TrainConfig
from onelayer.errors import OneLayerError
from onelayer.experiments.rescore import rescore
from onelayer.experiments.rundir import run_dir
from onelayer.experiments.scan import ScanConfig, run_scan
from onelayer.profile import read_profile

TASK = "rg:basic_arithmetic"
OPTIONS = {"max_terms": 2, "max_digits": 1, "train_size": 10, "eval_size": 10}
# (question, answer, completion, what the old scorer said)
ROWS = [("Calculate 4 - 1.", "3", "4 - 1 = 3\n\nThe answer is \\boxed{4 - 1}", True),  # the loophole
        ("Calculate 2 + 2.", "4", "2 + 2 = 4", True),
        ("Calculate 5 - 9.", "-4", "5 - 9 = -4, so \\boxed{-4}", True),
        ("Calculate 1 + 1.", "2", "\\boxed{3}", False)]


def write_eval(directory, step, rows, gz=True):
    """Per-example file, its summary and the run's log row as a run leaves them."""
    evals = directory / "evals"
    evals.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": f"e{i}", "question": q, "answer": a, "completions": [c], "extracted": ["?"],
                                "correct": [old], "rewards": [float(old)]}) + "\n"
                    for i, (q, a, c, old) in enumerate(rows))
    name = evals / f"step{step:06d}.examples.jsonl"
    if gz:
        with gzip.open(f"{name}.gz", "wt") as f:
            f.write(lines)
    else:
        name.write_text(lines)
    accuracy = sum(r[3] for r in rows) / len(rows)
    summary = {"task": TASK, "n": len(rows), "samples": 1, "accuracy": accuracy, "mean_reward": accuracy}
    (evals / f"step{step:06d}.json").write_text(json.dumps(summary))
    with open(directory / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **summary}) + "\n")
    return accuracy


def fake_run(directory, steps=(2, 4)):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"task": TASK, "task_options": OPTIONS}))
    for step in steps:
        accuracy = write_eval(directory, step, ROWS if step == max(steps) else ROWS[1:])
    (directory / "result.json").write_text(json.dumps({"examples": f"evals/step{max(steps):06d}.examples.jsonl",
                                                       "accuracy": accuracy, "train_seconds": 1.5}))


def read_gz(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_a_run_is_scored_again_and_every_number_from_it_follows(tmp_path):
    run = tmp_path / "run"
    fake_run(run)
    done = rescore(run)
    final = run / "evals" / "step000004.examples.jsonl.gz"
    assert [(d.file.name, d.changed, d.before, d.after) for d in done] == [
        ("step000002.examples.jsonl.gz", 0, 2 / 3, 2 / 3), ("step000004.examples.jsonl.gz", 1, 0.75, 0.5)]
    rows = read_gz(final)  # still compressed, scored again
    assert [r["correct"] for r in rows] == [[False], [True], [True], [False]]
    assert [r["extracted"] for r in rows] == [["4 - 1"], ["4"], ["-4"], ["3"]]
    assert [r["rewards"] for r in rows] == [[0.0], [1.0], [1.0], [0.0]]
    summary = json.loads((run / "evals" / "step000004.json").read_text())
    assert summary["accuracy"] == 0.5 and summary["mean_reward"] == 0.5 and summary["task"] == TASK
    log = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in log] == [(2, pytest.approx(2 / 3)), (4, 0.5)]
    result = json.loads((run / "result.json").read_text())
    assert result["accuracy"] == 0.5 and result["train_seconds"] == 1.5
    record = json.loads((run / "rescored.json").read_text())
    assert [(f["file"], f["changed"], f["accuracy_after"]) for f in record[0]["files"]] == [
        ("evals/step000002.examples.jsonl.gz", 0, pytest.approx(2 / 3)), ("evals/step000004.examples.jsonl.gz", 1, 0.5)]
    assert [d.changed for d in rescore(run)] == [0, 0]  # scoring again changes nothing more
    assert len(json.loads((run / "rescored.json").read_text())) == 2


def test_a_compressed_log_is_updated_in_place(tmp_path):
    run = tmp_path / "run"
    fake_run(run, steps=(3,))
    log = run / "eval.jsonl"
    with gzip.open(f"{log}.gz", "wt") as f:
        f.write(log.read_text())
    log.unlink()
    rescore(run)
    assert [r["accuracy"] for r in read_gz(f"{log}.gz")] == [0.5] and not log.exists()


def test_a_dry_run_reports_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    fake_run(run, steps=(3,))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert [(d.changed, d.after) for d in rescore(run, write=False)] == [(1, 0.5)]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_path_without_results_is_a_one_line_error(tmp_path):
    with pytest.raises(OneLayerError, match="holds no per-example results"):
        rescore(tmp_path)


def test_a_scan_whose_full_run_used_the_loophole_gets_its_profile_again(tmp_path, saved_tiny, capsys):
    # base 1 of 4 right; full "4 of 4" by the old scorer, 2 of 4 in truth; layer 1: 2 of 4
    base_right = [False, True, False, False]
    truth = {"layer": [ROWS[0][:3] + (False,)] + ROWS[1:]}

    def execute(config, run, scan_dir):
        directory = run_dir(scan_dir, run)
        if run.kind == "base":
            rows = [(q, a, c if ok else "\\boxed{0}", ok) for (q, a, c, _), ok in zip(ROWS, base_right, strict=True)]
        else:
            rows = [(q, a, c, True) for q, a, c, _ in ROWS] if run.kind == "full" else truth["layer"]
        directory.mkdir(parents=True)
        write_eval(directory, 2, rows, gz=False)
        (directory / "result.json").write_text(json.dumps({"examples": "evals/step000002.examples.jsonl",
                                                           "kind": run.kind}))
        return {}

    recipe = TrainConfig(model=str(saved_tiny), task=TASK, task_options=OPTIONS, layers="1", out=str(tmp_path / "scan"),
                         steps=2, prompts_per_step=2, group_size=2, eval_n=4, device="cpu",
                         sampling=SamplingConfig(max_new_tokens=4))
    run_scan(ScanConfig(recipe=recipe), progress=False, execute=execute)
    scan = tmp_path / "scan"
    assert read_profile(scan).full_gain.value == pytest.approx(0.75)  # 1.0 - 0.25: the loophole counted
    assert main(["rescore", str(scan)]) == 0
    out = capsys.readouterr().out
    assert "runs/full-s0/evals/step000002.examples.jsonl: 2 of 4 changed, accuracy 1.000 -> 0.500" in out
    assert "(profile written again)" in out and "runs learned from the old rewards" in out
    profile = read_profile(scan)
    assert profile.full_gain.value == pytest.approx(0.25)
    assert {p.layer: p.contribution for p in profile.points if not p.interpolated} == {1: pytest.approx(1.0)}


def test_files_whose_task_is_unknown_are_skipped_and_said(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "a", steps=(2,))
    orphan = tmp_path / "members" / "b"
    write_eval(orphan, 2, ROWS)
    (orphan / "evals" / "step000002.json").write_text("{}")  # an ensemble member's copy names no task
    assert main(["rescore", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped members/b/evals/step000002.examples.jsonl.gz: no task named beside it or in its run" in out
    assert "runs/a/evals/step000002.examples.jsonl.gz: 1 of 4 changed, accuracy 0.750 -> 0.500" in out
    assert read_gz(orphan / "evals" / "step000002.examples.jsonl.gz")[0]["correct"] == [True]  # left as it was

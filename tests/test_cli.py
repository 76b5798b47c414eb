import json

import pytest

from onelayer.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_layers_json_on_a_local_directory(capsys, saved_tiny):
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "middle:2", "--json")
    report = json.loads(out)
    assert code == 0 and report["layers"] == [1, 2] and report["num_layers"] == 4
    assert report["layers_module"] == "model.layers" and report["trainable"] == sum(report["per_layer"].values())


def test_layers_table(capsys, saved_tiny):
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "0,embed")
    assert code == 0 and "selected: 0, embed" in out


@pytest.mark.parametrize("argv,message", [
    (["layers", "{m}", "--select", "7"], "error: bad layer spec term '7': layer 7 is out of range; layers are 0-3"),
    (["layers", "/no/such/model", "--select", "1"], "error: model path /no/such/model does not exist"),
    (["eval", "--checkpoint", "/no/run", "--task", "toy:repeat"], "error: no onelayer checkpoint in /no/run"),
    (["train", "--model", "{m}", "--task", "toy:nope", "--out", "{tmp}/r"], "error: unknown toy task 'nope'"),
    (["train", "--model", "{m}", "--algo", "ppo", "--task", "toy:repeat", "--out", "{tmp}/r"],
     "error: unknown algorithm 'ppo'"),
])
def test_bad_input_gets_one_line_and_exit_2(capsys, saved_tiny, tmp_path, argv, message):
    code, _, err = run(capsys, *[a.format(m=saved_tiny, tmp=tmp_path) for a in argv])
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_train_then_eval_from_the_command_line(capsys, saved_tiny, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", saved_tiny, "--task", "toy:repeat", "--layers", "2",
                            "--steps", 2, "--prompts-per-step", 2, "--group-size", 4, "--max-new-tokens", 6,
                            "--lr", 1e-2, "--out", out, "--device", "cpu", "--no-progress",
                            "--task-option", "size=32")
    assert code == 0, err
    assert "trained layers 2 for 2 steps" in stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["task_options"] == {"size": 32} and saved["sampling"]["max_new_tokens"] == 6
    code, stdout, err = run(capsys, "eval", "--checkpoint", out, "--task", "toy:repeat", "--n", 3,
                            "--max-new-tokens", 4, "--out", tmp_path / "ev", "--device", "cpu")
    assert code == 0, err
    assert "toy:repeat:a: accuracy" in stdout and "on 3 examples x 1" in stdout
    rows = (tmp_path / "ev" / "eval.examples.jsonl").read_text().splitlines()
    assert len(rows) == 3 and json.loads((tmp_path / "ev" / "eval.json").read_text())["n"] == 3


def test_plot_runs(capsys, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"layers": "3"}))
    (run_dir / "log.jsonl").write_text("".join(json.dumps({"step": i, "reward": i / 10}) + "\n" for i in range(1, 6)))
    (run_dir / "eval.jsonl").write_text(json.dumps({"step": 0, "accuracy": 0.2, "ci_low": 0.1, "ci_high": 0.3}) + "\n")
    code, _, _ = run(capsys, "plot", run_dir, "--out", tmp_path / "c.png")
    assert code == 0 and (tmp_path / "c.png").stat().st_size > 10_000
    code, _, err = run(capsys, "plot", tmp_path / "none")
    assert code == 2 and "has no log.jsonl" in err


def test_ensemble_and_self_consistency_from_the_command_line(tmp_path, saved_tiny, capsys):
    common = ["--task", "toy:repeat", "--max-new-tokens", "6", "--device", "cpu"]
    for name, layer in (("l1", "1"), ("l3", "3")):
        assert main(["train", "--model", str(saved_tiny), "--layers", layer, "--steps", "1", "--prompts-per-step", "2",
                     "--group-size", "4", "--lr", "1e-2", "--out", str(tmp_path / name), "--no-progress", *common]) == 0
    out = tmp_path / "vote"
    args = ["ensemble", str(tmp_path / "l1"), str(tmp_path / "l3"), "--self-consistency", str(tmp_path / "l1"),
            "--k", "3", "--n", "5", "--out", str(out), *common]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "ensemble of 2 specialists: vote accuracy" in stdout and "self-consistency" in stdout
    summary = json.loads((out / "ensemble.json").read_text())
    rows = [json.loads(x) for x in (out / "ensemble.examples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]["answers"]) == {"l1", "l3"}
    assert summary["vote_accuracy"] == sum(r["correct"] for r in rows) / 5
    # the member's own greedy answers are what it voted with
    member = [json.loads(x) for x in (out / "members" / "l1" / "eval.examples.jsonl").read_text().splitlines()]
    assert [r["answers"]["l1"] for r in rows] == [m["extracted"][0] for m in member]
    sc = [json.loads(x) for x in (out / "self_consistency.examples.jsonl").read_text().splitlines()]
    assert len(sc) == 5 and len(sc[0]["answers"]) == 3
    # evaluation's greedy default would make every sample agree: self-consistency samples at 1 then, and at the
    # temperature asked for otherwise (it used to ignore --temperature)
    assert json.loads((out / "self_consistency.json").read_text())["temperature"] == 1.0
    assert "(k=3, temperature 1)" in stdout
    cooler = tmp_path / "vote-cool"
    assert main(["ensemble", "--self-consistency", str(tmp_path / "l1"), "--k", "2", "--n", "3", "--temperature",
                 "0.5", "--out", str(cooler), *common]) == 0
    assert json.loads((cooler / "self_consistency.json").read_text())["temperature"] == 0.5
    assert "(k=2, temperature 0.5)" in capsys.readouterr().out
    # into the same folder at another temperature: drawn again, not the cached samples of the first
    cached = (cooler / "samples" / "eval.examples.jsonl").stat().st_mtime_ns
    assert main(["ensemble", "--self-consistency", str(tmp_path / "l1"), "--k", "2", "--n", "3", "--temperature",
                 "0.9", "--out", str(cooler), *common]) == 0
    assert (cooler / "samples" / "eval.examples.jsonl").stat().st_mtime_ns != cached
    assert main(["ensemble", str(tmp_path / "l1"), *common]) == 2  # one member is not an ensemble


def test_code_tasks_train_scan_and_eval_from_the_command_line(capsys, saved_tiny, tmp_path):
    common = ["--model", saved_tiny, "--task", "code:synth", "--task-option", "timeout=2", "--steps", 1,
              "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 8, "--device", "cpu", "--no-progress"]
    code, stdout, err = run(capsys, "train", *common, "--layers", "1", "--out", tmp_path / "run")
    assert code == 0, err
    row = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert sum(row["outcomes"].values()) == pytest.approx(1.0)  # e.g. {"error": 1.0}: the tiny model writes no code
    code, stdout, err = run(capsys, "scan", *common, "--layers", "1", "--eval-n", 2, "--out", tmp_path / "scan")
    assert code == 0, err
    base = json.loads((tmp_path / "scan" / "runs" / "base" / "result.json").read_text())
    assert base["n"] == 2 and sum(base["outcomes"].values()) == pytest.approx(1.0)
    code, stdout, err = run(capsys, "eval", "--checkpoint", tmp_path / "run", "--task", "code:humaneval", "--n", 2,
                            "--max-new-tokens", 4, "--device", "cpu", "--out", tmp_path / "ev")
    assert code == 0, err
    rows = [json.loads(r) for r in (tmp_path / "ev" / "eval.examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["HumanEval/0", "HumanEval/1"] and all(len(r["outcomes"]) == 1 for r in rows)

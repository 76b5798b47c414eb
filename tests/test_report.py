"""Analyses and the report on a real (tiny, CPU) scan with learning-rate probes."""

import json
import shutil

import pytest
import torch

from onelayer.cli import main
from onelayer.experiments.ood import _Swapper, task_slug
from onelayer.experiments.scan import load_plan
from onelayer.models import load_model

ARGS = ["--task", "toy:repeat", "--layers", "0,1,3", "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
        "--max-new-tokens", "6", "--eval-n", "8", "--lr", "1e-2", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory, saved_tiny):
    out = tmp_path_factory.mktemp("report") / "scan"
    assert main(["scan", "--model", str(saved_tiny), *ARGS, "--lr-scales", "2", "--out", str(out)]) == 0
    return out


def _correct(path):
    return [json.loads(line)["correct"] for line in path.read_text().splitlines()]


def test_ood_evaluates_every_run_and_reproduces_in_domain_results(scan, capsys):
    tasks = "toy:repeat,toy:repeat:b?size=16"
    assert main(["analyze", "ood", str(scan), "--tasks", tasks, "--device", "cpu", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "toy:repeat:b" in stdout and (scan / "analysis" / "ood.html").is_file()
    _, plan = load_plan(scan)
    slug = task_slug("toy:repeat", {})
    assert task_slug("toy:repeat:b", {"size": 16}).startswith("toy_repeat_b-")
    for run in plan:  # the in-domain task again: same answers as the scan's own evaluation of every run
        own = json.loads((scan / "runs" / run.name / "result.json").read_text())
        again = scan / "runs" / run.name / "ood" / f"{slug}.examples.jsonl"
        assert _correct(again) == _correct(scan / "runs" / run.name / own["examples"]), run.name
    summary = json.loads((scan / "analysis" / "ood.json").read_text())["Out-of-domain transfer"]
    in_domain = json.loads((scan / "profile.json").read_text())
    assert summary[slug]["profile"]["points"] == in_domain["points"]  # the same numbers, the same profile
    before = (scan / "runs" / "base" / "ood" / f"{slug}.json").stat().st_mtime_ns
    assert main(["analyze", "ood", str(scan), "--tasks", tasks, "--device", "cpu", "--no-progress"]) == 0
    assert (scan / "runs" / "base" / "ood" / f"{slug}.json").stat().st_mtime_ns == before  # done work is kept


def test_swapping_runs_restores_the_base_weights(scan, saved_tiny):
    model = load_model(str(saved_tiny), "cpu")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, plan = load_plan(scan)
    runs = {r.name: r for r in plan}
    swapper = _Swapper(model)
    swapper.load(scan, runs["full-s0"])
    layer0 = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(model.named_parameters())[layer0], original[layer0])
    swapper.load(scan, runs["layer001-s0"])  # only layer 1 differs from the base now
    for name, param in model.named_parameters():
        assert torch.equal(param, original[name]) == (not name.startswith("model.layers.1.")), name
    swapper.load(scan, runs["base"])
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_params_and_rank_analyses(scan, tmp_path, capsys):
    assert main(["analyze", "params", str(scan)]) == 0
    params = json.loads((scan / "analysis" / "params.json").read_text())
    section = params["Parameter change: distance or leverage?"]
    assert sorted(section["own"]) == ["0", "1", "3"] and sorted(section["full"]) == ["0", "1", "2", "3"]
    copy = tmp_path / "again"
    shutil.copytree(scan, copy)
    out = tmp_path / "rank"
    assert main(["analyze", "rank", str(scan), str(copy), "--out", str(out)]) == 0
    pair = json.loads((out / "rank.json").read_text())["Rank correlations"]["scan | again"]
    assert pair["n"] == 3 and pair["method"] == "same layers"
    assert (out / "figures" / "rank.png").is_file()
    # without --out, like analyze params: into the (first) scan's analysis/
    assert main(["analyze", "rank", str(scan), str(copy)]) == 0
    assert (scan / "analysis" / "rank.json").is_file() and (scan / "analysis" / "figures" / "rank.png").is_file()
    assert main(["analyze", "rank", str(scan)]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["analyze", "params", str(tmp_path)]) == 2


def test_report_has_every_section_and_is_self_contained(scan):
    assert main(["analyze", "ood", str(scan), "--tasks", "toy:repeat:b", "--device", "cpu", "--no-progress"]) == 0
    assert main(["report", str(scan)]) == 0
    md = (scan / "report" / "report.md").read_text()
    for title in ("Setup", "Contribution profile", "Training curves", "Parameter change", "Out-of-domain transfer",
                  "Learning-rate probes", "Rank correlations", "Every run"):
        assert f"## {title}" in md, title
    for name in ("base", "full-s0", "layer000-s0", "layer003-s0", "lr2x"):
        assert name in md
    page = (scan / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((scan / "report" / "figures").glob("*.png"))) >= 5
    numbers = json.loads((scan / "report" / "report.json").read_text())
    assert numbers["Contribution profile"]["runs"]["layer001-s0"] == "done"

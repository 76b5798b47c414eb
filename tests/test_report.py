"""Analyses and the report on a real (tiny, CPU) scan with two seeds, a learning-rate grid and learning curves."""

import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch

from onelayer.cli import main
from onelayer.experiments.ood import _Swapper, task_slug
from onelayer.experiments.scan import load_plan, scan_profile
from onelayer.models import load_model

ARGS = ["--task", "toy:repeat", "--layers", "0,1,3", "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
        "--max-new-tokens", "6", "--eval-n", "8", "--lr", "1e-2", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory, saved_tiny):
    out = tmp_path_factory.mktemp("report") / "scan"
    assert main(["scan", "--model", str(saved_tiny), *ARGS, "--seeds", "2", "--lr-grid", "1,2", "--eval-every", "1",
                 "--no-eval-at-start", "--out", str(out)]) == 0
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
    # the same numbers, the same profile, read at the rate the in-domain profile chose (fixed, not re-picked)
    fixed, _ = scan_profile(scan, lr_scales=[in_domain["full_lr_scale"]])
    assert summary[slug]["profile"]["points"] == [asdict(p) for p in fixed.points]
    assert [p["contribution"] for p in summary[slug]["profile"]["points"]] == [
        p["contribution"] for p in in_domain["points"]]
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
    for title in ("Setup", "Contribution profile", "Learning-rate robustness", "Learning curves", "Training curves",
                  "Parameter change", "Out-of-domain transfer", "The study's claims", "Rank correlations", "Every run"):
        assert f"## {title}" in md, title
    for name in ("base", "full-s0", "full-lr2x-s1", "layer000-s0", "layer003-lr2x-s1"):
        assert name in md
    page = (scan / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((scan / "report" / "figures").glob("*.png"))) >= 5
    numbers = json.loads((scan / "report" / "report.json").read_text())
    assert numbers["Contribution profile"]["runs"]["layer001-s0"] == "done"
    claims = numbers["The study's claims"]["claims"]
    assert claims[0]["claim"].startswith("RL gains concentrate") and claims[0]["source"] == str(scan)


def test_claims_table_reads_the_scan_and_the_runs_beside_it(scan, tmp_path, capsys):
    from onelayer.analysis.rank import measured
    from onelayer.experiments.scan import param_change
    from onelayer.profile import read_profile

    assert main(["analyze", "ood", str(scan), "--tasks", "toy:repeat:b", "--device", "cpu", "--no-progress"]) == 0
    copy = tmp_path / "other-math"
    shutil.copytree(scan, copy)
    votes = tmp_path / "vote"
    votes.mkdir()
    for stem, correct in (("ensemble", [1, 1, 0, 1] * 5), ("self_consistency", [1, 0, 0, 1] * 5)):
        (votes / f"{stem}.examples.jsonl").write_text("".join(
            json.dumps({"answers": {str(j): "x" for j in range(3)}, "correct": bool(c)}) + "\n" for c in correct))
    out = tmp_path / "claims"
    assert main(["claims", str(scan), "--math", str(copy), "--ensemble", str(votes), "--out", str(out)]) == 0
    assert "claims.md" in capsys.readouterr().out
    rows = {r["claim"].split(" (")[0]: r for r in json.loads((out / "claims.json").read_text())}
    values = measured(read_profile(scan))
    peak = max(values, key=lambda k: (values[k], -k))
    best = rows["one well-chosen layer recovers most of the full-parameter gain, sometimes more"]
    assert best["measure"] == f"C of the best layer (layer {peak})" and best["estimate"]["value"] == values[peak]
    depth = rows["RL gains concentrate in a few middle layers"]
    assert depth["ours"] == f"{(peak + 0.5) / 4:.2f} (layer {peak})" and depth["source"] == str(scan)
    same = rows["layer rankings correlate across math datasets"]  # a copy ranks the layers identically
    assert same["estimate"]["value"] == pytest.approx(1.0) and same["verdict"] == "inconclusive"  # 3 layers: no interval
    assert rows["layer rankings are insensitive to the learning rate"]["verdict"] != "not measured"  # --lr-grid 1,2
    code = rows["layer rankings correlate between math and code"]
    assert (code["verdict"], code["study"], same["study"]) == ("not measured", "Spearman 0.59", "Spearman 0.76")
    vote = rows["a majority vote of layer specialists beats self-consistency"]
    assert vote["estimate"]["value"] == pytest.approx(0.25) and vote["source"] == str(votes)
    assert rows["layer rankings hold out of domain"]["verdict"] != "not measured"  # analyze ood ran above
    leverage = rows["contributing layers do not move more than others"]
    assert leverage["estimate"]["value"] == pytest.approx(param_change(scan)[3].spearman)
    assert "onelayer compare" in rows["top-k layers, contribution-scaled rates or the geometric middle beat full "
                                      "training"]["why"]
    md = (out / "claims.md").read_text()
    assert md.count("\n| ") == len(json.loads((out / "claims.json").read_text())) + 1  # header + one row per claim
    assert main(["claims", str(tmp_path / "nothing")]) == 2
    assert "no contribution profile" in capsys.readouterr().err
    # a main profile whose full-training gain is within noise leaves every rank row inconclusive
    stored = json.loads((copy / "profile.json").read_text())
    (copy / "profile.json").write_text(json.dumps({**stored, "reliable": False, "warning": "within noise"}))
    assert main(["claims", str(copy)]) == 0
    shaky = json.loads((copy / "claims" / "claims.json").read_text())
    ranked = [r for r in shaky if r["claim"].startswith(("layer rankings hold out", "contributing layers"))]
    assert len(ranked) >= 2 and all(r["verdict"] == "inconclusive" for r in ranked), ranked
    assert "within noise" in ranked[-1]["why"]
    # a profile query gets a table of its own, read at that profile throughout
    assert main(["claims", f"{scan}?protocol=best"]) == 0
    best = {r["claim"].split(" (")[0]: r for r in json.loads((scan / "claims-protocol-best" / "claims.json").read_text())}
    assert best["contributing layers do not move more than others"]["estimate"]["value"] == pytest.approx(
        param_change(scan, read_profile(f"{scan}?protocol=best"))[3].spearman)
    assert best["RL gains concentrate in a few middle layers"]["source"] == f"{scan}?protocol=best"


def _gzip_examples(root):
    """Compress every per-example file under ``root`` as committed results are kept (x.jsonl -> x.jsonl.gz)."""
    import gzip

    files = list(root.rglob("*.examples.jsonl"))
    for path in files:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    return files


def test_every_reader_works_on_a_scan_whose_examples_are_compressed(scan, tmp_path, monkeypatch):
    from onelayer.config import CompareConfig, EvalConfig, SamplingConfig
    from onelayer.experiments.compare import comparison_results, run_comparison
    from onelayer.experiments.ood import ood_results
    from onelayer.experiments.rundir import example_scores, final_examples
    from onelayer.experiments.specialists import run_ensemble
    from onelayer.profile import read_profile

    assert main(["analyze", "ood", str(scan), "--tasks", "toy:repeat:b", "--device", "cpu", "--no-progress"]) == 0
    packed = tmp_path / "packed"
    shutil.copytree(scan, packed)
    assert len(_gzip_examples(packed)) > 3 * 17  # every evaluation of every run, ood ones too
    assert not list(packed.rglob("*.examples.jsonl"))
    run = packed / "runs" / "layer001-s1"
    assert final_examples(run).name == "step000002.examples.jsonl" and not final_examples(run).exists()
    assert example_scores(final_examples(run)) == example_scores(final_examples(scan / "runs" / "layer001-s1"))
    for query in ("", "?protocol=best", "?auc", "?protocol=best&auc"):
        assert _same(scan_profile(packed, **_query(query))[0], scan_profile(scan, **_query(query))[0]), query
    assert _same(scan_profile(packed, step=1)[0], scan_profile(scan, step=1)[0])
    assert main(["profile", str(packed)]) == 0 and _same(read_profile(packed), read_profile(scan))
    ours, original = ood_results(packed), ood_results(scan)
    assert [r.slug for r in ours] == [r.slug for r in original] and len(ours) >= 2
    assert all(_same(a.profile, b.profile) for a, b in zip(ours, original, strict=True))
    assert main(["report", str(packed)]) == 0
    mine = json.loads((packed / "report" / "report.json").read_text())
    theirs = json.loads((scan / "report" / "report.json").read_text()) if (scan / "report").is_dir() else None
    if theirs is None:
        assert main(["report", str(scan)]) == 0
        theirs = json.loads((scan / "report" / "report.json").read_text())
    for title in ("Contribution profile", "Learning-rate robustness", "Learning curves"):
        assert mine[title] == theirs[title], title

    # specialists vote with the compressed final evaluations instead of evaluating again
    def no_eval(config):
        raise AssertionError(f"{config.checkpoint} was evaluated again")

    monkeypatch.setattr("onelayer.experiments.specialists.run_eval", no_eval)
    same = EvalConfig(task="toy:repeat", n=8, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0))
    members = [str(packed / "runs" / n) for n in ("layer000-s0", "layer003-s0")]
    assert len(run_ensemble(members, same, tmp_path / "vote").votes) == 8
    monkeypatch.undo()

    # a comparison copies the compressed base and full runs of the scan and reads them
    recipe = json.loads((packed / "scan.json").read_text())["config"]["recipe"]
    from onelayer.config import TrainConfig, from_dict

    config = CompareConfig(recipe=replace(from_dict(TrainConfig, recipe), out=str(tmp_path / "compare")),
                           profile=str(packed), strategies="full", seeds=2)
    run_comparison(config, progress=False)
    assert json.loads((tmp_path / "compare" / "runs" / "full-s1" / "result.json").read_text())["copied_from"]
    _gzip_examples(tmp_path / "compare")
    full = comparison_results(tmp_path / "compare").strategies[0]
    assert full.accuracies == [json.loads((scan / "runs" / f"full-s{s}" / "result.json").read_text())["accuracy"]
                               for s in (0, 1)]


def _same(a, b) -> bool:
    return json.dumps(asdict(a)) == json.dumps(asdict(b))  # NaN equal to NaN


def _query(text: str) -> dict:
    return {"protocol": "best" if "best" in text else "study", "auc": "auc" in text}

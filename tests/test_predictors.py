"""Predicting a profile without the scan: each signal on hand-computed cases, the prediction as a profile
that layer selection reads, and the scoring of predictors against a measured scan."""

import json
import math

import pytest
import torch

from onelayer.analysis import predictors as p
from onelayer.cli import main
from onelayer.config import PredictConfig, SamplingConfig
from onelayer.errors import OneLayerError
from onelayer.experiments.predict import prediction_profile, representation_signals, run_predict, skip_signal
from onelayer.layers import lr_scales_from_profile, parse_layer_spec
from onelayer.models import decoder_layers
from onelayer.profile import read_profile
from onelayer.tasks import get_task

from .test_scan import SCORES, _fake_execute, scan_config
from .tiny import tiny_model


def test_block_influence_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert p.block_influence(x, x) == pytest.approx(0.0)
    assert p.block_influence(x, -x) == pytest.approx(2.0)
    # cosines 0 (turned a right angle) and 1 (unchanged): 1 - 0.5
    assert p.block_influence(x, torch.tensor([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.5)


def test_linear_cka_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    assert p.linear_cka(x, 3 * x @ rotation) == pytest.approx(1.0)  # equal up to rotation and scale
    # dropping the second feature: ||Y'X||^2 = 4, ||X'X|| = sqrt(8), ||Y'Y|| = 2
    y = x * torch.tensor([1.0, 0.0])
    assert p.linear_cka(x, y) == pytest.approx(4 / (math.sqrt(8) * 2))
    assert p.cka_influence(x, y) == pytest.approx(1 - 4 / (math.sqrt(8) * 2))


def test_gradient_moments_by_hand():
    moments = p.GradientMoments.zeros(2)
    for g in ([1.0, 0.0], [1.0, 2.0], [1.0, -2.0]):
        moments.add(torch.tensor(g))
    # mean (1, 0); sum of squared norms 11; unbiased trace of the covariance (11 - 3 * 1) / 2 = 4
    out = p.gradient_signals(moments, weight_norm=2.0)
    assert out["grad_norm"] == pytest.approx(0.5)
    assert out["grad_snr"] == pytest.approx(1 / (4 / 3))
    assert out["grad_sign_agreement"] == pytest.approx((1 + 0) / 2)  # signs (+,+,+) and (0,+,-)
    one = p.GradientMoments.zeros(2)
    one.add(torch.tensor([1.0, 1.0]))
    assert all(math.isnan(v) for v in p.gradient_signals(one, 1.0).values())


def test_spectrum_snr_by_hand():
    # singular values 1..7 and 10: quartiles 2.75 and 6.25 (linear), sigma = 3.5 / 1.349, edge = 2 sigma
    # (a square matrix: beta = 1); above the edge 6 + 7 + 10, below 1 + ... + 5
    w = torch.diag(torch.tensor([10.0, 1, 2, 3, 4, 5, 6, 7]))
    edge = 2 * 3.5 / 1.349
    assert 5 < edge < 6
    assert p.spectrum_snr(w) == pytest.approx(23 / 15)
    rotated = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))[0] @ w
    assert p.spectrum_snr(rotated) == pytest.approx(23 / 15, rel=1e-6)  # a property of the singular values


def test_spectrum_scores_z_score_each_kind_across_layers():
    snr = {(0, "q"): math.e, (1, "q"): math.e ** 2, (2, "q"): math.e ** 3,  # logs 1, 2, 3: z -1.22, 0, 1.22
           (0, "k"): 1.0, (1, "k"): 1.0, (2, "k"): math.inf}  # logs 0, 0, inf -> 0, 0, 0 (inf as the largest)
    scores = p.spectrum_scores(snr)
    z = math.sqrt(1.5)
    assert scores == pytest.approx({0: -z / 2, 1: 0.0, 2: z / 2})


def test_position_baseline_and_the_scores_of_a_predictor_by_hand():
    assert p.position_baseline(4) == {0: -0.375, 1: -0.125, 2: -0.125, 3: -0.375}
    predicted = {0: 3.0, 1: 2.0, 2: 1.0, 3: 0.0}
    measured = {0: 0.1, 1: 0.5, 2: 0.2, 3: 0.0}
    assert p.top_overlap(predicted, measured, 1) == (0, 0.25)
    assert p.top_overlap(predicted, measured, 2) == (1, 1.0)  # {0, 1} vs {1, 2}; chance 2 * 2 / 4
    assert p.regret(predicted, measured) == pytest.approx(0.1 / 0.5)
    score = p.score_predictor("x", predicted, measured, 4, seconds=1.5)
    assert score.n == 4 and score.spearman == pytest.approx(0.4) and score.top1 == 0 and score.seconds == 1.5
    assert score.p_value == pytest.approx(0.75)  # exact over the 24 orders: |rho| >= 0.4 in 18 of them
    same = p.rho_difference(measured, measured, measured)
    assert same == (0.0, 0.0, 0.0)


def test_partial_spearman_removes_what_depth_explains():
    depth = [0, 1, 2, 3, 4, 5]
    # x rises with depth and nothing else: nothing is left of it once depth is controlled for
    assert math.isnan(p.partial_spearman([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 12, 10], depth))
    # the same wiggle around the trend in both: perfectly correlated once depth is removed, though the raw
    # correlation is below 1 for neither reason
    assert p.partial_spearman([1, 3, 2, 4, 6, 5], [1, 3, 2, 4, 6, 5], depth) == pytest.approx(1.0)
    # wiggles against each other around the same trend: x swaps pairs (1,2), (3,4), (5,6) downwards, y swaps
    # (2,3), (4,5) upwards: strongly negative once depth is removed, though both correlate with depth
    assert p.partial_spearman([2, 1, 4, 3, 6, 5], [1, 3, 2, 5, 4, 6], depth) < -0.9


def _identity_layer(model, layer: int):
    """Zero the layer's output projections: attention and MLP add nothing to the residual stream."""
    block = decoder_layers(model)[1][layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return model


def test_a_layer_that_is_the_identity_has_no_influence_and_skipping_it_changes_nothing(tokenizer):
    model = _identity_layer(tiny_model("llama"), 2)
    prompts = ["abc", "x y z", "hello there", "1+2="]
    found = representation_signals(model, tokenizer, prompts, [1, 2], batch_size=3)
    assert found["block_influence"][2] == pytest.approx(0.0, abs=1e-6)
    assert found["cka_influence"][2] == pytest.approx(0.0, abs=1e-6)
    assert found["block_influence"][1] > 0.01 and found["cka_influence"][1] > 0.001
    task = get_task("toy:repeat")
    config = PredictConfig(eval_n=8, device="cpu", sampling=SamplingConfig(max_new_tokens=6))
    drops = skip_signal(model, tokenizer, task, config, [1, 2])
    assert drops[2] == 0.0
    with torch.no_grad():  # skipping does change what the model says when the layer does something
        before = model(torch.tensor([[5, 6, 7]])).logits
        from onelayer.variants import skipped

        with skipped(model, 1):
            assert not torch.allclose(model(torch.tensor([[5, 6, 7]])).logits, before)
        with skipped(model, 2):
            assert torch.allclose(model(torch.tensor([[5, 6, 7]])).logits, before, atol=1e-6)
        assert torch.equal(model(torch.tensor([[5, 6, 7]])).logits, before)  # restored


def test_a_prediction_is_a_profile_that_layer_selection_and_guided_rates_read(tmp_path):
    profile = prediction_profile({0: 0.5, 1: 2.0, 3: 1.0}, 4, "block_influence")
    assert [x.contribution for x in profile.points] == pytest.approx([1 / 3, 1.0, 5 / 6, 2 / 3])
    assert [x.interpolated for x in profile.points] == [False, False, True, False]
    assert not profile.reliable and "prediction" in profile.warning
    out = tmp_path / "pred"
    out.mkdir()
    from dataclasses import asdict

    (out / "predicted.json").write_text(json.dumps({"kind": "prediction", **asdict(profile)}))
    selection = parse_layer_spec(f"top:2@{out}", 4)
    assert selection.layers == (1, 3) and any("prediction" in note for note in selection.notes)
    scales, _ = lr_scales_from_profile(read_profile(out), (0, 1))
    assert scales == pytest.approx({0: 2 * (1 / 3) / (4 / 3), 1: 2 * 1.0 / (4 / 3)})


def test_predict_and_score_against_a_scan_from_the_command_line(tmp_path, saved_tiny, capsys):
    from onelayer.experiments.scan import run_scan

    scan = tmp_path / "scan"
    scores = {**SCORES, ("layer", 0): [1] * 5 + [0] * 35, ("layer", 2): [1] * 15 + [0] * 25}
    run_scan(scan_config(scan, saved_tiny, layers="0-3"), progress=False, execute=_fake_execute([], scores))
    pred = tmp_path / "pred"
    code = main(["predict", "--model", str(saved_tiny), "--task", "toy:repeat", "--prompts", "6", "--group-size", "4",
                 "--eval-n", "6", "--max-new-tokens", "6", "--device", "cpu", "--out", str(pred), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((pred / "predicted.json").read_text())
    assert set(result["signals"]) == {"block_influence", "cka_influence", "skip_drop", "grad_norm", "grad_snr",
                                      "grad_sign_agreement", "spectrum_snr", "position"}
    assert all(set(v) == {"0", "1", "2", "3"} for v in result["signals"].values())
    assert all(s >= 0 for s in result["seconds"].values()) and (pred / "predicted.png").stat().st_size > 5000
    assert "layer | block_influence" in out and f"top:k@{pred}" in out
    assert main(["analyze", "predictors", str(scan), str(pred)]) == 0
    table = capsys.readouterr().out
    assert "position" in table and "Spearman" in table
    data = json.loads((scan / "analysis" / "predictors.json").read_text())
    scored = {s["signal"]: s for s in next(iter(data.values()))["scores"]}
    # the fake scan measured C = (0.25, 0.5, 0.75, 1.0) for layers 0-3 by construction: position ranks the
    # middle first (ties shared), so its rho is exactly that of (1.5, 3.5, 3.5, 1.5) with those values
    assert scored["position"]["spearman"] == pytest.approx(0.0, abs=1e-9)
    assert scored["position"]["over_position"][0] == pytest.approx(0.0)
    assert (scan / "analysis" / "figures" / "predictors.png").is_file()
    # any profile of the scan can be the yardstick, by reference; its file is read, not recomputed
    assert main(["analyze", "predictors", f"{scan}?protocol=best", str(pred)]) == 2  # a usage error
    assert "a best-rate profile needs a scan with --lr-grid" in capsys.readouterr().err
    best = json.loads((scan / "profile.json").read_text())
    best["points"] = [{**p, "contribution": 1 - p["contribution"]} for p in best["points"]]  # reversed ranking
    (scan / "profile-best.json").write_text(json.dumps(best))
    assert main(["analyze", "predictors", f"{scan}?protocol=best", str(pred)]) == 0
    data = json.loads((scan / "analysis" / "predictors-best.json").read_text())
    reversed_scores = {s["signal"]: s["spearman"] for s in next(iter(data.values()))["scores"]}
    assert reversed_scores["block_influence"] == pytest.approx(-scored["block_influence"]["spearman"])


def test_bad_predict_input_gets_one_line_errors(tmp_path):
    with pytest.raises(OneLayerError, match="unknown --signals 'nope'"):
        PredictConfig(signals="nope").validate()
    with pytest.raises(OneLayerError, match="--group-size must be >= 2"):
        PredictConfig(group_size=1).validate()
    with pytest.raises(OneLayerError, match="unknown --signal 'x'"):
        PredictConfig(signal="x").validate()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OneLayerError, match="is a file"):
        run_predict(PredictConfig(out=str(tmp_path / "file"), task="toy:repeat"))

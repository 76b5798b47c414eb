"""Profile-driven layer choices: top:k@SCAN, random:k and contribution-guided learning rates."""

import json
from dataclasses import asdict

import pytest
import torch

from onelayer.checkpoint import read_meta
from onelayer.errors import OneLayerError
from onelayer.layers import lr_scales_from_profile, parse_layer_spec, top_layers
from onelayer.models import parameter_layers
from onelayer.profile import Estimate, LayerPoint, Profile, read_profile
from onelayer.training import train

from .test_train import config
from .tiny import tiny_model


def hand_profile(measured: dict[int, float], n: int, interpolated: dict[int, float] | None = None,
                 reliable: bool = True) -> Profile:
    guesses = interpolated or {}
    points = tuple(LayerPoint(i, measured.get(i, guesses.get(i, 0.0)), 0.0, 1.0, i not in measured) for i in range(n))
    return Profile(points, Estimate(0.3, 0.1, 0.5), reliable, "" if reliable else "within noise")


def write_profile(directory, profile: Profile):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "profile.json").write_text(json.dumps(asdict(profile)))
    return directory


PROFILE = hand_profile({0: 0.2, 4: 0.9, 8: 0.5, 12: 0.5}, 16, interpolated={6: 0.7, 10: 0.5, 14: 0.3})


def test_top_k_takes_measured_layers_by_contribution_and_reports_ties():
    assert top_layers(PROFILE, 1) == ([4], [])
    layers, notes = top_layers(PROFILE, 2)
    assert layers == [4, 8] and notes == ["layers 8 and 12 tie at C = 0.500; the shallower one is taken"]
    assert top_layers(PROFILE, 4) == ([0, 4, 8, 12], [])
    layers, notes = top_layers(PROFILE, 5)  # one more than measured: the best interpolated layer (6, C 0.7)
    assert layers == [0, 4, 6, 8, 12] and "interpolated layers [6]" in notes[0]
    assert "unreliable" in top_layers(hand_profile({1: 0.4}, 4, reliable=False), 1)[1][0]


def test_top_k_spec_reads_a_scan_profile_with_its_path_case_kept(tmp_path):
    scan = write_profile(tmp_path / "Scans" / "Arith", PROFILE)
    assert parse_layer_spec(f"top:3@{scan}", 16).layers == (4, 8, 12)
    selection = parse_layer_spec(f"top:2@{scan}", 16)
    assert selection.layers == (4, 8) and "tie" in selection.notes[0]
    assert parse_layer_spec(f"top:1@{scan / 'profile.json'},0", 16).layers == (0, 4)
    with pytest.raises(OneLayerError, match="for a model of 16 layers"):
        parse_layer_spec(f"top:1@{scan}", 30)
    with pytest.raises(OneLayerError, match="no contribution profile"):
        parse_layer_spec(f"top:1@{tmp_path / 'nothing'}", 16)
    with pytest.raises(OneLayerError, match="top:k@SCAN needs"):
        parse_layer_spec("top:3", 16)


def test_random_k_is_seeded():
    a = parse_layer_spec("random:4", 16).layers
    assert len(a) == 4 and a == parse_layer_spec("random:4:0", 16).layers
    assert parse_layer_spec("random:4:1", 16).layers != a
    assert parse_layer_spec("random:16:3", 16).layers == tuple(range(16))
    with pytest.raises(OneLayerError, match="random:k"):
        parse_layer_spec("random:17", 16)


def test_learning_rate_scales_follow_the_rule_on_hand_numbers():
    profile = hand_profile({0: 0.2, 1: -0.1, 2: 0.6}, 3)
    scales, rule = lr_scales_from_profile(profile, [0, 1, 2])
    # clipped 0.2, 0, 0.6; mean 0.8 / 3 -> scales 0.2 / (0.8/3) = 0.75, 0, 2.25 (mean 1)
    assert scales == {0: pytest.approx(0.75), 1: 0.0, 2: pytest.approx(2.25)} and "max(C_l, 0)" in rule
    assert lr_scales_from_profile(profile, [2]) == ({2: 1.0}, rule)
    with pytest.raises(OneLayerError, match="no trained layer has a positive contribution"):
        lr_scales_from_profile(profile, [1])


def test_training_with_guided_learning_rates_leaves_harmful_layers_unmoved(tmp_path, tokenizer):
    scan = write_profile(tmp_path / "scan", hand_profile({0: 0.5, 1: -0.2, 2: 0.1, 3: 0.3}, 4))
    model, before = tiny_model("llama"), tiny_model("llama")
    train(config(tmp_path, layers="0,1", steps=2, save_every=2, lr_from=str(scan)), model, tokenizer, progress=False)
    layer_of, after = parameter_layers(model), dict(model.named_parameters())
    for name, p in before.named_parameters():
        assert (not torch.equal(p, after[name])) == (layer_of[name] == 0), name  # layer 1 has lr 0
    meta = read_meta(tmp_path / "run")
    assert meta["lr_scales"] == {"0": pytest.approx(2.0), "1": 0.0} and meta["lr_rule"]
    assert read_profile(scan).points[1].contribution == -0.2


def test_where_full_training_lost_layers_are_chosen_and_guided_by_their_own_gain():
    from onelayer.analysis.contribution import layer_profile

    base = [[1, 1, 1, 1, 0, 0, 0, 0]]
    lost = [[1, 0, 0, 0, 0, 0, 0, 0]]  # full training: 1/8 - 4/8 = -3/8
    layers = {1: [[1, 1, 1, 1, 1, 1, 0, 0]], 3: [[0, 0, 0, 1, 0, 0, 0, 0]]}  # gains +2/8 and -3/8
    profile = layer_profile(base, lost, layers, 4, n_resamples=200)
    # C(3) = (-3/8) / (-3/8) = 1 and C(1) = -2/3: contributions would pick the layer that hurts most
    assert profile.points[3].contribution == pytest.approx(1.0) and profile.points[1].contribution < 0
    layers_chosen, notes = top_layers(profile, 1)
    assert layers_chosen == [1] and "ranked by their own gain" in notes[0] and "-0.3750" in notes[0]
    # measured layers first, then the unmeasured filled in from the gains: 0 at its neighbour's +2/8, 2 at -1/16
    layers_chosen, notes = top_layers(profile, 3)
    assert layers_chosen == [0, 1, 3] and any("interpolated layers [0]" in n for n in notes)
    scales, rule = lr_scales_from_profile(profile, [1, 3])
    assert scales == {1: 2.0, 3: 0.0} and "max(G_l, 0)" in rule and "own gain" in rule
    with pytest.raises(OneLayerError, match="no trained layer has a positive gain"):
        lr_scales_from_profile(profile, [3])
    # full training that did not move: C undefined everywhere, the gains still rank
    still = layer_profile(base, base, layers, 4, n_resamples=200)
    assert top_layers(still, 1)[0] == [1] and "+0.0000" in top_layers(still, 1)[1][0]
    # where full training gained, contributions rank as before (the same order as the gains)
    gained = layer_profile(base, [[1] * 8], layers, 4, n_resamples=200)
    assert top_layers(gained, 1) == ([1], [])
    old = Profile(profile.points, profile.full_gain, False, "lost")  # written before layer gains were kept
    with pytest.raises(OneLayerError, match="rerun onelayer profile SCAN"):
        top_layers(old, 1)

"""The claims table: verdict rules on hand-built profiles and estimates, and the ensemble row from files."""

import json
import types

import pytest

from onelayer.analysis.claims import (
    INCONCLUSIVE,
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    best_layer_claim,
    correlation_claim,
    depth_claim,
    leverage_claim,
    rate_claim,
    side,
    spearman_interval,
    strategy_claim,
)
from onelayer.analysis.rank import RankCorrelation
from onelayer.errors import OneLayerError
from onelayer.experiments.claims import ensemble_claims, write_claims
from onelayer.profile import (
    Estimate,
    LayerDifference,
    LayerPoint,
    Profile,
    RateChoice,
    RateRobustness,
    read_profile,
)

GAIN = Estimate(0.3, 0.2, 0.4)


def profile(values: dict[int, tuple[float, float, float]], differences=(), num_layers: int = 9, reliable=True,
            robustness=None) -> Profile:
    points = tuple(LayerPoint(k, *values.get(k, (0.0, 0.0, 0.0)), k not in values) for k in range(num_layers))
    return Profile(points, GAIN, reliable, "" if reliable else "within noise", differences=tuple(differences),
                   robustness=robustness)


def test_side_is_three_way_on_the_interval():
    assert side(Estimate(0.1, 0.01, 0.2), 0.0) == REPRODUCED
    assert side(Estimate(-0.1, -0.2, -0.01), 0.0) == NOT_REPRODUCED
    assert side(Estimate(0.1, -0.01, 0.2), 0.0) == INCONCLUSIVE
    assert side(Estimate(0.01, 0.0, 0.015), 0.02, claim_above=False) == REPRODUCED
    assert side(Estimate(0.05, 0.03, 0.08), 0.02, claim_above=False) == NOT_REPRODUCED
    assert side(Estimate(0.0, float("nan"), float("nan")), 0.0) == INCONCLUSIVE
    assert side(Estimate(0.05, 0.0, 0.1), 0.0) == INCONCLUSIVE  # touching the line is not beyond it


def test_spearman_interval_is_fisher_z_with_fiellers_variance():
    e = spearman_interval(0.5, 13)  # z = atanh(0.5), half-width 1.95996 * sqrt(1.06 / 10), by hand
    assert (e.value, round(e.low, 4), round(e.high, 4)) == (0.5, -0.0886, 0.8298)
    assert spearman_interval(1.0, 3).low != spearman_interval(1.0, 3).low  # NaN below 4 pairs
    # a perfect ranking counts as one adjacent swap from perfect: rho 0.8 over 4 layers (exact p 0.083), 0.9 over 5
    assert spearman_interval(1.0, 4).low == pytest.approx(spearman_interval(0.8, 4).low)
    assert spearman_interval(1.0, 4).low < 0 < spearman_interval(1.0, 5).low
    assert spearman_interval(1.0, 5).low == pytest.approx(spearman_interval(0.9, 5).low)
    assert spearman_interval(-1.0, 4).high == pytest.approx(-spearman_interval(0.8, 4).low)


def test_depth_claim_reads_the_peak_and_its_differences_to_the_outer_thirds():
    # 9 layers: relative depths (l + 0.5) / 9, thirds {0, 1, 2}, {3, 4, 5}, {6, 7, 8}
    # the lower third holds two measured layers: its best (1), not its worst (0), is the one compared
    values = {0: (0.1, 0.0, 0.2), 1: (0.2, 0.1, 0.3), 4: (0.8, 0.6, 1.0), 7: (0.3, 0.2, 0.4)}
    clear = [LayerDifference(0, 4, -0.7, -0.8, 0.1), LayerDifference(1, 4, -0.6, -0.8, -0.4),
             LayerDifference(4, 7, 0.5, 0.3, 0.7), LayerDifference(1, 7, -0.1, -0.2, 0.0)]
    c = depth_claim(profile(values, clear))
    assert c.verdict == REPRODUCED and c.estimate is None and c.ours == f"{4.5 / 9:.2f} (layer 4)"
    assert "C(4) - C(1) [lower third's best] = +0.600 [+0.400, +0.800]" in c.why  # the stored pair, turned round
    assert "layer 4, the best of 4 measured of 9" in c.why
    close = [LayerDifference(1, 4, -0.6, -0.8, -0.4), LayerDifference(4, 7, 0.5, -0.1, 0.7)]
    assert depth_claim(profile(values, close)).verdict == INCONCLUSIVE
    assert depth_claim(profile(values, clear, reliable=False)).verdict == INCONCLUSIVE
    # the peak at the bottom, beating the best middle layer beyond noise
    low_peak = {1: (0.9, 0.8, 1.0), 4: (0.3, 0.2, 0.4), 7: (0.2, 0.1, 0.3)}
    diffs = [LayerDifference(1, 4, 0.6, 0.4, 0.8), LayerDifference(4, 7, 0.1, 0.0, 0.2)]
    c = depth_claim(profile(low_peak, diffs))
    assert c.verdict == NOT_REPRODUCED and "lower third" in c.why
    assert depth_claim(profile({1: (0.2, 0.1, 0.3), 4: (0.8, 0.6, 1.0)})).verdict == NOT_MEASURED


def test_best_layer_claim_against_half_the_gain():
    c = best_layer_claim(profile({2: (0.4, 0.1, 0.7), 5: (0.9, 0.6, 1.2)}))
    assert (c.verdict, c.estimate) == (REPRODUCED, Estimate(0.9, 0.6, 1.2)) and "matches full training" in c.why
    assert "best of 2 measured of 9" in c.why
    assert best_layer_claim(profile({5: (0.7, 0.52, 0.9)})).verdict == REPRODUCED
    tie = best_layer_claim(profile({2: (0.7, 0.6, 0.8), 6: (0.7, 0.5, 0.9)}))
    assert tie.estimate == Estimate(0.7, 0.6, 0.8)  # ties go to the lower layer
    c = best_layer_claim(profile({2: (0.2, 0.1, 0.3), 5: (0.3, 0.1, 0.45)}))
    assert c.verdict == NOT_REPRODUCED and "layer 5" in c.measure and "falls short" in c.why
    assert best_layer_claim(profile({5: (0.6, 0.3, 0.9)})).verdict == INCONCLUSIVE
    assert best_layer_claim(profile({5: (0.9, 0.6, 1.2)}, reliable=False)).verdict == INCONCLUSIVE


def _choice(layer, study, gain):
    return RateChoice(layer, 3.0, Estimate(study, study - 0.1, study + 0.1), Estimate(study + gain[0], 0, 1),
                      Estimate(*gain), 1, 1, (1.0, 3.0))


def _rates(*layers):
    return RateRobustness((1.0, 3.0), (0.5, 0.4), 1.0, 0.9, 0.8, layers)


FINE = (_choice(4, 0.9, (0.3, 0.2, 0.4)), _choice(6, 0.7, (0.0, 0.0, 0.0)), _choice(8, 0.6, (0.0, 0.0, 0.0)),
        _choice(5, 0.4, (0.0, 0.0, 0.0)))


def test_rate_claim_judges_every_layer_of_the_worst_quarter():
    # 8 layers: the worst quarter is layers 2 and 0 by C at the full run's rate (0.05, 0.1); layer 7 is third worst
    worst = (_choice(0, 0.1, (0.01, 0.0, 0.015)), _choice(2, 0.05, (0.005, 0.0, 0.01)))
    c = rate_claim(profile({}, robustness=_rates(*worst, _choice(7, 0.3, (0.5, 0.4, 0.6)), _choice(3, 0.5, (0, 0, 0)),
                                                 *FINE)))
    assert c.verdict == REPRODUCED and c.estimate == Estimate(0.01, 0.0, 0.015) and "worst layers 2, 0 of 8" in c.why
    # one worst layer straddling the line is enough to leave it open, one above it to refute it
    straddling = (worst[0], _choice(2, 0.05, (0.005, 0.0, 0.2)))
    assert rate_claim(profile({}, robustness=_rates(*straddling, _choice(7, 0.3, (0, 0, 0)), _choice(3, 0.5, (0, 0, 0)),
                                                    *FINE))).verdict == INCONCLUSIVE
    moved = (_choice(0, 0.1, (0.05, 0.03, 0.08)), worst[1])
    c = rate_claim(profile({}, robustness=_rates(*moved, _choice(7, 0.3, (0, 0, 0)), _choice(3, 0.5, (0, 0, 0)), *FINE)))
    assert c.verdict == NOT_REPRODUCED and c.estimate == Estimate(0.05, 0.03, 0.08)
    assert rate_claim(profile({}, reliable=False, robustness=_rates(*moved, *FINE))).verdict == INCONCLUSIVE
    assert rate_claim(profile({})).verdict == NOT_MEASURED


def _corr(rho, n):
    return RankCorrelation(rho, 0.0, rho, 0.0, n, "same layers")


def test_correlation_and_leverage_verdicts():
    assert correlation_claim("x", 0.76, _corr(0.9, 30)).verdict == REPRODUCED
    assert correlation_claim("x", 0.76, _corr(0.9, 30), "full lowered it", reliable=False).verdict == INCONCLUSIVE
    weaker = correlation_claim("x", 0.76, _corr(0.45, 30))  # [0.10, 0.70]: positive, below the study's 0.76
    assert weaker.verdict == "reproduced (weaker)"
    assert correlation_claim("x", 0.76, _corr(0.72, 30)).verdict == REPRODUCED  # [0.48, 0.86] reaches 0.76
    # [-0.05, 0.62]: not above 0, and below the study's value
    assert correlation_claim("x", 0.76, _corr(0.33, 30)).verdict == NOT_REPRODUCED
    assert correlation_claim("x", 0.76, _corr(0.0, 30)).verdict == NOT_REPRODUCED
    assert correlation_claim("x", 0.76, _corr(0.5, 6)).verdict == INCONCLUSIVE
    assert correlation_claim("x", 0.76, _corr(float("nan"), 2)).verdict == INCONCLUSIVE
    assert correlation_claim("x", 0.76, None, "no scan").verdict == NOT_MEASURED
    assert leverage_claim(_corr(0.9, 30)).verdict == NOT_REPRODUCED  # distance explains contribution
    assert leverage_claim(_corr(-0.3, 30)).verdict == REPRODUCED
    assert leverage_claim(_corr(0.3, 8)).verdict == INCONCLUSIVE
    assert leverage_claim(_corr(0.2, 30)).verdict == INCONCLUSIVE  # [-0.18, 0.53]: not below 0.5
    assert leverage_claim(_corr(0.4, 60)).verdict == NOT_REPRODUCED  # [0.16, 0.59]: a positive link
    assert leverage_claim(_corr(-0.3, 30), reliable=False).verdict == INCONCLUSIVE
    assert leverage_claim(None).verdict == NOT_MEASURED


def test_strategy_claim_in_points():
    c = strategy_claim("top:10", Estimate(0.027, 0.005, 0.05), 2, 2.7)
    assert c.verdict == REPRODUCED and c.study == "+2.70 points" and "+2.70 points [+0.50, +5.00]" in c.why
    assert strategy_claim("middle:4", Estimate(-0.03, -0.05, -0.01), 2, 1.76).verdict == NOT_REPRODUCED
    assert strategy_claim("lr-guided", Estimate(0.01, -0.01, 0.03), 1, None).study == "beats full"
    # a strategy at another rate (TERM*K) is the same claim
    assert strategy_claim("lr-guided*3", Estimate(0.01, -0.01, 0.03), 1, None).claim.startswith(
        "contribution-scaled learning rates (lr-guided*3)")


def _votes(path, correct, k):
    path.write_text("".join(json.dumps({"answers": {f"m{j}": "1" for j in range(k)}, "correct": c}) + "\n"
                            for c in correct))


def test_ensemble_row_is_a_paired_difference_and_refuses_unequal_k(tmp_path):
    _votes(tmp_path / "ensemble.examples.jsonl", [True, True, False, True] * 25, 7)
    _votes(tmp_path / "self_consistency.examples.jsonl", [True, False, False, True] * 25, 7)
    (tmp_path / "ensemble.json").write_text(json.dumps({"best_member": "layer015-s0",
                                                        "member_accuracy": {"layer015-s0": 0.6}}))
    [c] = ensemble_claims(str(tmp_path))
    # the vote is right wherever self-consistency is, and on a quarter more: every resample gains > 0
    assert c.estimate.value == pytest.approx(0.25) and c.estimate.low > 0 and c.verdict == REPRODUCED
    assert "best single specialist layer015-s0 0.600" in c.why and "the vote minus it" not in c.why
    # with the best member's own answers, the vote is also set against it, paired; self-consistency's temperature
    # is named where its summary gives it
    (tmp_path / "members" / "layer015-s0").mkdir(parents=True)
    (tmp_path / "members" / "layer015-s0" / "eval.examples.jsonl").write_text(
        "".join(json.dumps({"correct": [c]}) + "\n" for c in [True, True, True, False] * 25))
    (tmp_path / "self_consistency.json").write_text(json.dumps({"temperature": 0.7}))
    [c] = ensemble_claims(str(tmp_path))
    # the vote is right on examples 0, 1, 3 of every four, the member on 0, 1, 2: the same accuracy, a paired 0
    assert "(the vote minus it: +0.00 points [" in c.why and "self-consistency sampled at temperature 0.7" in c.why
    assert c.estimate.value == pytest.approx(0.25)  # the claim itself is still against self-consistency
    md = write_claims([c], tmp_path / "out").read_text()
    assert "+25.00 points [" in md and "| reproduced |" in md
    _votes(tmp_path / "self_consistency.examples.jsonl", [True, False, False, True] * 25, 5)
    [c] = ensemble_claims(str(tmp_path))
    assert c.verdict == INCONCLUSIVE and "7 specialists against 5 samples" in c.why
    apart = tmp_path / "sc"
    apart.mkdir()
    (tmp_path / "self_consistency.examples.jsonl").rename(apart / "self_consistency.examples.jsonl")
    [c] = ensemble_claims(str(tmp_path), str(apart))
    assert c.source == f"{tmp_path} vs {apart}" and "against 5 samples" in c.why
    with pytest.raises(OneLayerError, match="self_consistency.examples.jsonl does not exist"):
        ensemble_claims(str(tmp_path))


def _write_profile(path, reliable=True, values=((1, 0.2), (4, 0.8), (7, 0.3), (8, 0.1))):
    from dataclasses import asdict

    p = profile({k: (v, v - 0.1, v + 0.1) for k, v in values}, reliable=reliable)
    path.write_text(json.dumps(asdict(p)))
    return str(path)


def test_rank_rows_of_other_scans_need_both_profiles_reliable(tmp_path):
    from onelayer.experiments.claims import correlation_claims

    main = read_profile(_write_profile(tmp_path / "main.json"))
    same = _write_profile(tmp_path / "same.json")
    shaky = _write_profile(tmp_path / "shaky.json", reliable=False)
    rows = correlation_claims(main, [same, shaky], "math", 0.76, "")
    assert [r.estimate.value for r in rows] == [pytest.approx(1.0)] * 2 and [r.source for r in rows] == [same, shaky]
    assert rows[0].verdict == INCONCLUSIVE  # a perfect ranking of 4 layers: one swap from perfect reaches below 0
    assert rows[1].verdict == INCONCLUSIVE and "within noise" in rows[1].why
    [row] = correlation_claims(main, [], "math", 0.76, "scan a second math task")
    assert (row.verdict, row.study, row.why) == (NOT_MEASURED, "Spearman 0.76", "scan a second math task")


def test_strategy_rows_keep_the_claimed_strategies_with_the_study_numbers(monkeypatch):
    from onelayer.experiments import claims, compare

    def result(label, gain):
        return types.SimpleNamespace(label=label, gain_over_full=gain, gain_low=gain - 0.01, gain_high=gain + 0.01,
                                     seeds=[0, 1])

    found = types.SimpleNamespace(full_gain=Estimate(0.3, 0.2, 0.4), strategies=[
        result("full", 0.0), result("top:10", 0.03), result("middle:4", -0.05), result("lr-guided", 0.0),
        result("random:10", 0.1), result("lora", 0.1), result("top:10*3", 0.03), result("full*3", 0.2)])
    monkeypatch.setattr(compare, "comparison_results", lambda out: found)
    rows = claims.strategy_claims("cmp")
    assert [r.claim.split("(")[1].split(")")[0] for r in rows] == ["top:10", "middle:4", "lr-guided", "top:10*3"]
    assert [r.study for r in rows] == ["+2.70 points", "+1.76 points", "beats full", "+2.70 points"]
    assert [r.verdict for r in rows] == [REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, REPRODUCED]
    found.full_gain = None  # no finished full run: nothing to compare with
    [row] = claims.strategy_claims("cmp")
    assert row.verdict == NOT_MEASURED and "no finished full-training run" in row.why


def test_ensemble_files_that_are_not_votes_fail_in_one_line(tmp_path):
    _votes(tmp_path / "ensemble.examples.jsonl", [True, False] * 5, 3)
    (tmp_path / "self_consistency.examples.jsonl").write_text("")
    with pytest.raises(OneLayerError, match="holds no examples"):
        ensemble_claims(str(tmp_path))
    (tmp_path / "self_consistency.examples.jsonl").write_text(json.dumps({"answers": {"a": "1"}}) + "\n")
    with pytest.raises(OneLayerError, match="lacks 'correct'"):
        ensemble_claims(str(tmp_path))
    _votes(tmp_path / "self_consistency.examples.jsonl", [True] * 9, 3)
    with pytest.raises(OneLayerError, match="covers 10 examples and self-consistency 9"):
        ensemble_claims(str(tmp_path))
    _votes(tmp_path / "self_consistency.examples.jsonl", [True] * 10, 3)
    (tmp_path / "ensemble.json").write_text(json.dumps({"best_member": "gone", "member_accuracy": {}}))
    [row] = ensemble_claims(str(tmp_path))  # a summary without the member's accuracy: the row, without that line
    assert row.verdict == NOT_REPRODUCED and "best single" not in row.why
    with pytest.raises(OneLayerError, match="pass --ensemble DIR too"):
        ensemble_claims(None, str(tmp_path))


def test_out_of_domain_rows_need_both_profiles_reliable(tmp_path, monkeypatch):
    from onelayer.experiments import claims, ood

    six = tuple((k, 0.1 * k) for k in range(1, 7))
    (tmp_path / "scan.json").write_text("{}")
    _write_profile(tmp_path / "profile.json", values=six)
    there = {True: profile({k: (v, v - 0.1, v + 0.1) for k, v in six}),
             False: profile({k: (v, v - 0.1, v + 0.1) for k, v in six}, reliable=False)}
    monkeypatch.setattr(ood, "ood_results", lambda scan: [
        types.SimpleNamespace(task=f"t{ok}", slug=f"t{ok}", profile=there[ok], note="" if ok else "lowered it")
        for ok in (True, False)])
    good, bad = claims.ood_claims(str(tmp_path), read_profile(tmp_path))
    assert good.study == "Spearman > 0.6"
    assert good.estimate.value == pytest.approx(1.0) and good.verdict == REPRODUCED  # 6 layers ranked alike
    assert bad.verdict == INCONCLUSIVE and "lowered it" in bad.why


def test_out_of_domain_rows_may_come_from_a_scan_of_their_own(tmp_path, monkeypatch):
    from onelayer.experiments import claims, ood

    six = tuple((k, 0.1 * k) for k in range(1, 7))
    for name, values in (("main", tuple((k, 0.1 * (7 - k)) for k in range(1, 7))), ("ood-scan", six)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scan.json").write_text("{}")
        _write_profile(tmp_path / name / "profile.json", values=values)
    asked = []

    def results(scan):
        asked.append(scan)
        return [types.SimpleNamespace(task="t", slug="t", note="",
                                      profile=profile({k: (v, v - 0.1, v + 0.1) for k, v in six}))]

    monkeypatch.setattr(ood, "ood_results", results)
    # these hand-written scans have no runs for the parameter-change row
    monkeypatch.setattr(claims, "parameter_claim", lambda main, profile: types.SimpleNamespace(claim="change"))
    rows = {c.claim: c for c in claims.study_claims(str(tmp_path / "main"), ood_scan=str(tmp_path / "ood-scan"))}
    row = rows["layer rankings hold out of domain (t)"]
    # read against the other scan's own in-domain profile (ranked like its out-of-domain one), not the main one's
    assert asked == [tmp_path / "ood-scan"] and row.verdict == REPRODUCED
    assert row.estimate.value == pytest.approx(1.0) and str(tmp_path / "ood-scan") in row.source
    # a protocol query on the main scan is not carried over: the other scan's profiles out of domain are read at
    # its study protocol's rate, and so is its own in domain
    _write_profile(tmp_path / "main" / "profile-best.json", values=tuple((k, 0.1 * (7 - k)) for k in range(1, 7)))
    rows = {c.claim: c for c in claims.study_claims(f"{tmp_path / 'main'}?protocol=best",
                                                    ood_scan=str(tmp_path / "ood-scan"))}
    assert rows["layer rankings hold out of domain (t)"].estimate.value == pytest.approx(1.0)
    # not there yet: a row saying how to make it, not a failed table
    rows = {c.claim: c for c in claims.study_claims(str(tmp_path / "main"), ood_scan=str(tmp_path / "no-scan"))}
    assert rows["layer rankings hold out of domain"].verdict == NOT_MEASURED
    # without it, the main scan's own out-of-domain results
    rows = {c.claim: c for c in claims.study_claims(str(tmp_path / "main"))}
    assert asked[-1] == tmp_path / "main"
    assert rows["layer rankings hold out of domain (t)"].estimate.value == pytest.approx(-1.0)

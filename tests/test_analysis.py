import math

import pytest
import torch

from onelayer.analysis.document import Callout, Figure, Section, Table, to_html, to_markdown
from onelayer.analysis.param_change import relative_change, squared_norms
from onelayer.analysis.rank import align, correlation_matrix, layer_ranks, rank_correlation
from onelayer.errors import OneLayerError
from onelayer.profile import Estimate, LayerPoint, Profile


def profile(values: dict[int, float], n: int) -> Profile:
    """A profile measured at ``values``' layers (the others interpolated with a sentinel)."""
    points = tuple(LayerPoint(i, values.get(i, 99.0), 0.0, 0.0, i not in values) for i in range(n))
    return Profile(points, Estimate(0.3, 0.2, 0.4), True, "")


def test_rank_correlation_by_hand():
    # one adjacent swap in 4: sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8; 1 discordant of 6 pairs: tau = 4/6.
    # Exact p: of the 24 orderings, |rho| >= 0.8 (and |tau| >= 2/3) holds for the identity, the three adjacent
    # swaps and their four reversals: 8/24.
    c = rank_correlation([1, 2, 3, 4], [10, 30, 20, 40])
    assert c.spearman == pytest.approx(0.8) and c.kendall == pytest.approx(4 / 6)
    assert c.spearman_p == pytest.approx(1 / 3) and c.kendall_p == pytest.approx(1 / 3)
    reverse = rank_correlation([1, 2, 3], [3, 2, 1])
    assert reverse.spearman == pytest.approx(-1) and reverse.spearman_p == pytest.approx(2 / 6)
    assert math.isnan(rank_correlation([1, 2], [1, 2]).spearman)  # too few pairs
    assert math.isnan(rank_correlation([1, 2, 3], [5, 5, 5]).kendall)  # constant side
    big = rank_correlation(list(range(12)), list(range(12)))  # beyond exact enumeration: scipy's approximation
    assert big.spearman == pytest.approx(1) and big.spearman_p < 1e-6
    with pytest.raises(OneLayerError, match="paired"):
        rank_correlation([1, 2, 3], [1, 2])


def test_profiles_of_the_same_depth_pair_on_layers_both_measured():
    a = profile({0: 0.1, 2: 0.5, 3: 0.2}, 4)
    b = profile({0: 0.3, 1: 0.9, 3: 0.1}, 4)
    x, y, how = align(a, b)
    assert (x, y, how) == ([0.1, 0.2], [0.3, 0.1], "same layers")


def test_profiles_of_different_depths_pair_at_relative_depth():
    short = profile({0: 1.0, 1: 2.0}, 2)                 # relative depths 0.25, 0.75
    deep = profile({0: 0.0, 1: 4.0, 2: 8.0, 3: 12.0}, 4)  # relative depths 0.125, 0.375, 0.625, 0.875
    x, y, how = align(deep, short)
    # 0.25 lies halfway between depths 0.125 (0) and 0.375 (4): 2; 0.75 halfway between 8 and 12: 10
    assert how == "relative depth" and x == pytest.approx([2.0, 10.0]) and y == [1.0, 2.0]
    assert align(short, deep)[:2] == ([1.0, 2.0], pytest.approx([2.0, 10.0]))
    pairs = correlation_matrix({"a": short, "b": deep, "c": short})
    assert list(pairs) == [("a", "b"), ("a", "c"), ("b", "c")] and pairs[("a", "b")].n == 2


def test_layer_ranks_share_the_better_rank_on_ties():
    assert layer_ranks({0: 0.1, 4: 0.9, 8: 0.5, 12: 0.5}) == {4: 1, 8: 2, 12: 2, 0: 4}


def test_relative_change_pools_the_tensors_of_a_layer():
    before = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 0.0, 12.0]), "c": torch.tensor([1.0])}
    after = {"a": torch.tensor([3.0, 5.0]), "b": torch.tensor([0.0, 0.0, 14.0]),
             "c": torch.tensor([1.0], dtype=torch.bfloat16)}
    norms = squared_norms(before, after)
    assert norms["a"] == (1.0, 25.0) and norms["b"] == (4.0, 144.0)
    change = relative_change(norms, {"a": 0, "b": 0, "c": "norm"})
    assert change == {"0": pytest.approx(math.sqrt(5) / 13), "norm": 0.0}
    with pytest.raises(OneLayerError, match="no weights before training"):
        squared_norms({}, after)


def test_document_renders_markdown_with_links_and_html_with_embedded_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    (tmp_path / "figs").mkdir()
    fig.savefig(tmp_path / "figs" / "f.png")
    plt.close(fig)
    sections = [Section("One", ["a <b> paragraph", Callout("careful"), Table(["x", "y"], [["1", "2"], ["a | b", "3"]]),
                                Figure(tmp_path / "figs" / "f.png", "a figure")])]
    md = to_markdown("Title", sections, tmp_path / "report")
    assert "## One" in md and "| x | y |\n|---|---|\n| 1 | 2 |\n| a \\| b | 3 |" in md and "> **Warning:** careful" in md
    assert "![a figure](../figs/f.png)" in md
    page = to_html("Title", sections)
    assert "a &lt;b&gt; paragraph" in page and "<td>1</td><td>2</td>" in page
    assert "src='data:image/png;base64," in page and "f.png" not in page  # self-contained


def test_majority_vote_groups_equivalent_answers_and_breaks_ties_by_member_order():
    from onelayer.analysis.ensemble import majority_vote
    from onelayer.tasks.answers import answers_match

    # "1/2" and "0.5" are one class (2 votes) and beat "3" (1 vote)
    vote = majority_vote(["3", "1/2", "0.5"], [False, True, True], answers_match)
    assert (vote.answer, vote.correct, vote.votes, vote.tied) == ("1/2", True, 2, False)
    # 1-1 tie: the earliest member's class wins; abstentions do not vote
    vote = majority_vote([None, "7", "8"], [False, False, True], answers_match)
    assert (vote.answer, vote.correct, vote.votes, vote.tied) == ("7", False, 1, True)
    assert majority_vote([None, None], [False, False], answers_match).answer is None


def test_ensemble_accuracy_overlap_and_oracle_by_hand():
    from onelayer.analysis.ensemble import ensemble

    same = str.__eq__
    members = {  # 4 examples; reference answers are "a", "b", "c", "d"
        "l13": (["a", "x", "c", "y"], [True, False, True, False]),
        "l14": (["a", "b", "z", "y"], [True, True, False, False]),
        "l15": (["q", "b", "c", "w"], [False, True, True, False]),
    }
    s = ensemble(members, same)
    # votes: a (2 of 3) right, b (2) right, c (2) right, {y: 2, w: 1} -> y wrong: 3/4
    assert s.vote_accuracy == 0.75 and s.ties == 0
    assert s.member_accuracy == {"l13": 0.5, "l14": 0.5, "l15": 0.5} and s.best_member == "l13"
    assert s.oracle == 0.75  # example 4 nobody solved
    # solved sets {0,2}, {0,1}, {1,2}: every pair shares 1 of 3
    assert s.overlap == {("l13", "l14"): 1 / 3, ("l13", "l15"): 1 / 3, ("l14", "l15"): 1 / 3}

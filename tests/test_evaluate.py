import pytest

from onelayer.evaluate import evaluate, mean_interval, pass_at_k, wilson_interval
from onelayer.tasks import get_task

from .tiny import tiny_model


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100: centre 0.5, half = 1.96 * sqrt(0.0025 + 0.000096) / 1.038416 = 0.096170
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.5 - 0.096170, abs=1e-5) and high == pytest.approx(0.5 + 0.096170, abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-4)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 / 4) * (2 / 3))  # = 0.5
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_evaluate_reports_per_example_results(tokenizer):
    task = get_task("toy:repeat", {"size": 6})
    result = evaluate(tiny_model("llama"), tokenizer, task, n=4, samples=3, max_new_tokens=5, temperature=1.0)
    assert result.n == 4 and len(result.per_example) == 4 and set(result.pass_at) == {1, 2, 3}
    assert all(len(row["completions"]) == 3 for row in result.per_example)
    means = [sum(r["correct"]) / 3 for r in result.per_example]
    assert result.accuracy == pytest.approx(sum(means) / 4)
    assert result.pass_at[1] == pytest.approx(result.accuracy)
    assert result.ci_low <= result.accuracy <= result.ci_high
    assert result.pass_at_ci[1] == [result.ci_low, result.ci_high]
    assert all(low <= result.pass_at[k] <= high for k, (low, high) in result.pass_at_ci.items())


def test_mean_interval_by_hand():
    # values 0, 0.5, 1: mean 0.5, sd 0.5, half width 1.96 * 0.5 / sqrt(3) = 0.5658 -> clipped to [0, 1]
    assert mean_interval([0.0, 0.5, 1.0]) == (0.0, 1.0)
    low, high = mean_interval([0.5, 0.5, 0.75, 0.25])  # sd = sqrt(0.125 / 3) = 0.2041
    assert low == pytest.approx(0.5 - 1.96 * 0.2041241 / 2) and high == pytest.approx(0.5 + 1.96 * 0.2041241 / 2)

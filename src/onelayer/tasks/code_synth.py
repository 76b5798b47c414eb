"""``code:synth``: small Python functions described in words, with hidden tests, generated offline.

Each problem composes ``difficulty`` steps from three families, e.g. (difficulty 3)

    Write a Python function `list_sum_even_times3(xs)` that takes a list of integers `xs`, keeps the
    elements that are even, multiplies each by 3, then returns their sum (0 for an empty list).

- lists of integers: keep (even, odd, positive, negative, divisible by k, greater/less than k),
  transform (add/multiply/modulo k, square, negate, absolute value), then reduce (sum, count,
  max, min, product, or the list itself);
- integers: a chain of arithmetic steps (add, multiply, integer-divide, modulo, square, absolute
  value, digit sum);
- strings: a chain of string steps (reverse, upper/lower case, remove or replace a letter, reverse
  word order, ...), optionally ending in a count.

The reference function is generated with the description and run in this process to make the
hidden tests' expected values; only the call expressions reach the sandbox. One visible example
is in the prompt, drawn apart from the hidden inputs. Train and eval problems are disjoint: the
split hashes each problem's name (one name per problem).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from itertools import product

from ..errors import OneLayerError
from ..sandbox import Call, TestSuite
from .base import Example
from .code import CodeTask
from .sources import check_split, hash_percent

KS = range(2, 10)


@dataclass(frozen=True)
class Step:
    """One step: its words, its code (``{v}`` is the value it applies to) and a name fragment."""

    words: str
    code: str
    slug: str


def _list_filters() -> list[Step]:
    fixed = [Step("are even", "{v} % 2 == 0", "even"), Step("are odd", "{v} % 2 == 1", "odd"),
             Step("are positive", "{v} > 0", "positive"), Step("are negative", "{v} < 0", "negative")]
    return fixed + [s for k in KS for s in (Step(f"are divisible by {k}", f"{{v}} % {k} == 0", f"div{k}"),
                                            Step(f"are greater than {k}", f"{{v}} > {k}", f"gt{k}"),
                                            Step(f"are less than {k}", f"{{v}} < {k}", f"lt{k}"))]


def _list_maps() -> list[Step]:
    fixed = [Step("squares each", "{v} * {v}", "squared"), Step("negates each", "-{v}", "negated"),
             Step("takes the absolute value of each", "abs({v})", "abs")]
    return fixed + [s for k in KS for s in (Step(f"adds {k} to each", f"{{v}} + {k}", f"plus{k}"),
                                            Step(f"multiplies each by {k}", f"{{v}} * {k}", f"times{k}"),
                                            Step(f"takes each modulo {k}", f"{{v}} % {k}", f"mod{k}"))]


LIST_REDUCERS = [
    Step("returns their sum (0 for an empty list)", "sum({v})", "sum"),
    Step("returns how many there are", "len({v})", "count"),
    Step("returns the largest (None for an empty list)", "max({v}) if {v} else None", "max"),
    Step("returns the smallest (None for an empty list)", "min({v}) if {v} else None", "min"),
    Step("returns their product (1 for an empty list)", "math.prod({v})", "product"),
    Step("returns them as a list, in order", "{v}", ""),
]


def _int_steps() -> list[Step]:
    fixed = [Step("square it", "{v} * {v}", "sq"), Step("take its absolute value", "abs({v})", "abs"),
             Step("replace it by the sum of its decimal digits (ignoring the sign)",
                  "sum(int(d) for d in str(abs({v})))", "digitsum")]
    return fixed + [s for k in KS for s in (Step(f"add {k}", f"{{v}} + {k}", f"plus{k}"),
                                            Step(f"subtract {k}", f"{{v}} - {k}", f"minus{k}"),
                                            Step(f"multiply it by {k}", f"{{v}} * {k}", f"times{k}"),
                                            Step(f"floor-divide it by {k}", f"{{v}} // {k}", f"div{k}"),
                                            Step(f"take it modulo {k}", f"{{v}} % {k}", f"mod{k}"))]


def _string_steps() -> list[Step]:
    fixed = [Step("reverse it", "{v}[::-1]", "rev"), Step("make it upper case", "{v}.upper()", "upper"),
             Step("make it lower case", "{v}.lower()", "lower"),
             Step("reverse the order of its words (words are separated by single spaces)",
                  "' '.join(reversed({v}.split(' ')))", "revwords"),
             Step("swap the case of every letter", "{v}.swapcase()", "swapcase"),
             Step("remove every space", "{v}.replace(' ', '')", "nospace")]
    letters = "aeiost"
    return fixed + [Step(f"remove every '{c}'", f"{{v}}.replace('{c}', '')", f"no{c}") for c in letters] + [
        Step(f"replace every '{a}' by '{b}'", f"{{v}}.replace('{a}', '{b}')", f"{a}to{b}")
        for a, b in zip(letters, "xyzqwk", strict=True)]


STRING_ENDINGS = [Step("return the result", "{v}", ""), Step("return its length", "len({v})", "len"),
                  Step("return how many vowels (aeiou, either case) it has",
                       "sum(ch in 'aeiouAEIOU' for ch in {v})", "vowels")]


@dataclass(frozen=True)
class Problem:
    """A generated problem: the function's name and argument, the description, the reference
    source, and the kind of input it takes (``list``, ``int`` or ``str``)."""

    name: str
    argument: str
    description: str
    source: str
    kind: str


def _words_list(steps: list[str]) -> str:
    return steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + ", then " + steps[-1]


def _list_problems(difficulty: int) -> list[Problem]:
    shapes = {1: [("f",), ("m",), ("r",)], 2: [("f", "r"), ("m", "r"), ("f", "m")], 3: [("f", "m", "r")]}
    # the identity reducer only ends shapes without "r", so no problem appears twice across levels
    pools = {"f": _list_filters(), "m": _list_maps(), "r": LIST_REDUCERS[:-1]}
    problems = []
    for shape in shapes[difficulty]:
        for steps in product(*(pools[s] for s in shape)):
            chosen = dict(zip(shape, steps, strict=True))
            lines, words = ["    ys = list(xs)"], []
            if "f" in chosen:
                lines.append(f"    ys = [x for x in ys if {chosen['f'].code.format(v='x')}]")
                words.append(f"keeps the elements that {chosen['f'].words}")
            if "m" in chosen:
                lines.append(f"    ys = [{chosen['m'].code.format(v='x')} for x in ys]")
                words.append(chosen["m"].words)
            reducer = chosen.get("r", LIST_REDUCERS[-1])
            lines.append(f"    return {reducer.code.format(v='ys')}")
            words.append(reducer.words)
            name = "_".join(filter(None, ["list", reducer.slug] + [chosen[s].slug for s in ("f", "m") if s in chosen]))
            problems.append(Problem(name, "xs", f"takes a list of integers `xs`, {_words_list(words)}",
                                    "\n".join(lines), "list"))
    return problems


def _chain_problems(difficulty: int, kind: str) -> list[Problem]:
    steps, argument = (_int_steps(), "n") if kind == "int" else (_string_steps(), "s")
    endings = STRING_ENDINGS if kind == "str" else [Step("return the result", "{v}", "")]
    rng = random.Random(f"{kind}-{difficulty}")  # chains grow fast: sample a fixed subset of them
    chains = list(product(steps, repeat=difficulty))
    chains = [c for c in chains if len({s.slug for s in c}) == len(c)]
    if len(chains) > 4000:
        chains = rng.sample(chains, 4000)
    problems = []
    for chain in chains:
        for ending in endings:
            body = argument
            for step in chain:
                body = step.code.format(v=f"({body})" if body != argument else body)
            body = ending.code.format(v=f"({body})" if ending.slug else body)
            name = "_".join([kind] + [s.slug for s in chain] + ([ending.slug] if ending.slug else []))
            what = "an integer" if kind == "int" else "a string"
            words = _words_list([s.words for s in chain] + [ending.words])
            problems.append(Problem(name, argument, f"takes {what} `{argument}`: {words}",
                                    f"    return {body}", kind))
    return problems


CONSTANT_DRAWS = 200  # inputs tried to vary the expected values of a problem's tests


def _varied(inputs: list, reference, draw) -> list | None:
    """``inputs`` with no expected value shared by more than half of them, which a constant program would pass:
    inputs of the commonest value (after the first, the empty case) swapped for drawn ones of another value. None
    when ``CONSTANT_DRAWS`` draws do not get there: a function constant in practice is no problem to learn from."""
    inputs, values, draws = list(inputs), [repr(reference(v)) for v in inputs], 0
    while True:
        common, count = Counter(values).most_common(1)[0]
        if count <= len(inputs) // 2:
            return inputs
        spot = max(i for i, v in enumerate(values) if v == common and i > 0)  # count >= 2: there is one
        while draws < CONSTANT_DRAWS:
            draws += 1
            candidate = draw()
            if (value := repr(reference(candidate))) != common:
                inputs[spot], values[spot] = candidate, value
                break
        else:
            return None


def _draw_input(kind: str, rng: random.Random):
    if kind == "list":
        return [rng.randint(-20, 20) for _ in range(rng.randint(0, 8))]
    if kind == "int":
        return rng.randint(-100, 100)
    words = ["".join(rng.choice("abcdeiostuAEST") for _ in range(rng.randint(1, 6)))
             for _ in range(rng.randint(1, 4))]
    return " ".join(words)


class SynthCodeTask(CodeTask):
    """``code:synth``. Options: ``difficulty`` (1, 2, 3 or a list of them: steps per problem),
    ``families`` (``list``, ``int``, ``str``), ``tests`` (hidden tests per problem, at least 2), ``seed``,
    ``train_size``/``eval_size`` (caps), ``eval_percent`` (share of problems held out), and the
    :class:`CodeTask` options (``reward``, ``timeout``, ...)."""

    def __init__(self, difficulty: int | list[int] = 1, families: str | list[str] = ("list", "int", "str"),
                 tests: int = 8, seed: int = 0, train_size: int = 5_000, eval_size: int = 500,
                 eval_percent: float = 20.0, **options):
        levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
        families = [families] if isinstance(families, str) else list(families)
        if not levels or any(d not in (1, 2, 3) for d in levels):
            raise OneLayerError(f"code:synth difficulty {difficulty!r} is not 1, 2, 3 or a list of them")
        unknown = set(families) - {"list", "int", "str"}
        if unknown or not families:
            raise OneLayerError(f"code:synth families {families!r}: use list, int and/or str")
        if int(tests) < 2:  # the one test would be the empty input, whose answer the description gives away
            raise OneLayerError(f"code:synth needs at least 2 tests per problem (alone, the always-tested empty input "
                                f"pays a constant answer), got tests={tests}")
        super().__init__(f"code:synth:d{'-'.join(map(str, levels))}", **options)
        self.tests, self.seed = int(tests), int(seed)
        problems = []
        for level in levels:
            for family in families:
                problems += _list_problems(level) if family == "list" else _chain_problems(level, family)
        random.Random(seed).shuffle(problems)
        made = [(p, e) for p in problems if (e := self._example(p)) is not None]
        held = [e for p, e in made if hash_percent(p.name) < eval_percent][:eval_size]
        kept = [e for p, e in made if hash_percent(p.name) >= eval_percent][:train_size]
        self._splits = {"train": kept, "eval": held}

    def _example(self, problem: Problem) -> Example | None:
        source = f"def {problem.name}({problem.argument}):\n{problem.source}\n"
        if "math." in source:
            source = "import math\n\n" + source
        namespace: dict = {}
        exec(compile(source, f"<reference {problem.name}>", "exec"), namespace)  # our own code, not the model's
        reference = namespace[problem.name]
        rng = random.Random(f"{self.seed}/{problem.name}")
        shown = _draw_input(problem.kind, rng)
        edge = {"list": [], "int": 0, "str": ""}[problem.kind]  # the empty case is always tested
        inputs = _varied([edge] + [_draw_input(problem.kind, rng) for _ in range(self.tests - 1)], reference,
                         lambda: _draw_input(problem.kind, rng))
        if inputs is None:
            return None
        calls = tuple(Call(f"candidate({value!r})", reference(value)) for value in inputs[:self.tests])
        question = (f"Write a Python function `{problem.name}({problem.argument})` that {problem.description}.\n"
                    f"For example, `{problem.name}({shown!r})` returns `{reference(shown)!r}`.")
        return Example(f"code:synth/{problem.name}", question, source,
                       {"suite": TestSuite(problem.name, calls), "prompt_code": ""})

    def examples(self, split: str) -> list[Example]:
        return self._splits[check_split(split)]

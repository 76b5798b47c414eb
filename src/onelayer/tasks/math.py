"""Math tasks: reasoning-gym generators, local JSONL files and Hugging Face datasets with
question/answer columns, scored by :mod:`.answers` plus an optional format reward; a reasoning-gym task
whose reference is not a number by its generator's own verifier."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from ..errors import OneLayerError, did_you_mean, first_line
from .answers import answers_match, extract_answer, last_boxed, numeric_value, units_differ
from .base import Example, Score, Task, dedup_against
from .sources import check_split, dataset_splits, file_splits, read_jsonl

MATH_SYSTEM_PROMPT = ("Solve the problem. Reason briefly, then give the final answer "
                      "in the form \\boxed{answer}.")


class MathTask(Task):
    """Shared scoring: reward = correct + ``format_weight`` * (answer given in ``\\boxed{}``)."""

    system_prompt = MATH_SYSTEM_PROMPT

    def __init__(self, name: str, format_weight: float = 0.0, system_prompt: str | None = None):
        self.name, self.format_weight = name, float(format_weight)
        if system_prompt is not None:
            self.system_prompt = system_prompt or None

    def score(self, completion: str, example: Example) -> Score:
        extracted = extract_answer(completion)
        correct = self.is_correct(extracted, example)
        formatted = bool((last_boxed(completion) or "").strip())  # an empty \boxed{} is no answer to format
        return Score(float(correct) + self.format_weight * formatted, correct, extracted)

    def is_correct(self, extracted: str | None, example: Example) -> bool:
        """Whether the answer read off a completion answers ``example``."""
        return answers_match(extracted, example.answer)


def reasoning_gym_names() -> list[str]:
    """The names of reasoning-gym's generators (``rg:NAME``)."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _fits(value, hint) -> bool:
    """Whether a JSON-parsed option ``value`` has the type a dataclass field's ``hint`` asks for (hints this
    does not know are left to the generator)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list | tuple)
    return True


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint) or ("a list like [1, 2]" if hint in (list, tuple) or origin in (list, tuple) else str(hint))


def check_generator_options(generator: str, options: dict, own: tuple[str, ...] = ()) -> None:
    """One-line errors, before reasoning-gym sees them, for a generator it does not have, an option its
    config does not have (``own`` names the options onelayer takes itself) or a value of the wrong type."""
    from reasoning_gym.factory import DATASETS

    if generator not in DATASETS:
        guess = did_you_mean(generator, DATASETS).replace("'", "'rg:", 1)
        raise OneLayerError(f"unknown task 'rg:{generator}': reasoning-gym has no generator '{generator}'"
                            + (guess or f" (it has {len(DATASETS)}, e.g. basic_arithmetic, chain_sum, gcd)"))
    config_class = DATASETS[generator][1]
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.name not in ("seed", "size")}
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    for key, value in options.items():
        if key not in fields:
            raise OneLayerError(f"rg:{generator} has no task option '{key}'{did_you_mean(key, [*fields, *own])} "
                                f"(its options: {', '.join([*fields, *own])})")
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            default = fields[key].default
            shown = value if isinstance(value, str) else json.dumps(value)
            raise OneLayerError(f"task option {key}={shown} of rg:{generator} must be {_describe(hint)}"
                                + ("" if default is dataclasses.MISSING else f" (default {json.dumps(default)})"))


# answers no problem has: a verifier that pays one of them pays anything (checked on this many held-out problems)
NON_ANSWERS = ("zq", "-987654321.125")
PROBED = 16


class ReasoningGymTask(MathTask):
    """``rg:NAME``: any reasoning-gym generator. Options other than those below go to its config.

    The eval split is ``eval_size`` examples generated with ``seed + 1``; the train split is
    ``train_size`` examples generated with ``seed``, minus any question the eval split has.

    A numeric reference is matched by :mod:`.answers`' exact rules. Any other (an expression, a list, a cipher's
    text) is judged by the generator's own ``score_answer``, which knows what the task asks: that a countdown
    or 24-game expression uses the given numbers (a value checker accepts the boxed target, which the question
    prints), that roots or factors may come in any order, that a sorted list keeps its order.
    """

    def __init__(self, generator: str, seed: int = 0, train_size: int = 10_000, eval_size: int = 1_000,
                 format_weight: float = 0.0, system_prompt: str | None = None, **config):
        super().__init__(f"rg:{generator}", format_weight, system_prompt)
        import reasoning_gym

        check_generator_options(generator, config, ("seed", "train_size", "eval_size", "format_weight",
                                                    "system_prompt"))
        try:
            self._make = lambda size, s: reasoning_gym.create_dataset(generator, size=size, seed=s, **config)
            self._verifier = self._make(1, seed)
        except Exception as err:
            raise OneLayerError(f"reasoning-gym cannot make '{generator}' with options {config}: "
                                f"{first_line(err)}") from err
        self.seed, self.train_size, self.eval_size = seed, train_size, eval_size
        self._splits: dict[str, list[Example]] = {}

    def _generate(self, size: int, seed: int, split: str) -> list[Example]:
        return [Example(f"{self.name}/{split}/{seed}/{i}", str(e["question"]), str(e["answer"]), {"entry": e})
                for i, e in enumerate(self._make(size, seed))]

    def is_correct(self, extracted: str | None, example: Example) -> bool:
        entry = example.meta.get("entry")
        if entry is None:
            return super().is_correct(extracted, example)
        if numeric_value(example.answer, reference=True) is not None:  # a generator's numbers are exact
            return answers_match(extracted, example.answer, rounded=False)
        if extracted is None or units_differ(extracted, example.answer):
            return False
        try:
            return self._verifier.score_answer(extracted, entry) >= 1.0
        except Exception:  # some verifiers raise on an answer they cannot parse: a wrong answer
            return False

    def examples(self, split: str) -> list[Example]:
        if split not in self._splits:
            held_out = self._generate(self.eval_size, self.seed + 1, "eval")
            self._check_no_free_reward(held_out[:PROBED])  # before the train split is made, or kept for a retry
            self._splits["eval"] = held_out
            self._splits["train"] = dedup_against(self._generate(self.train_size, self.seed, "train"), held_out)
        return self._splits[check_split(split)]

    def _check_no_free_reward(self, examples: list[Example]) -> None:
        """Refuse a generator whose verifier pays an answer that answers nothing: a policy would learn to give
        it (reasoning-gym 0.1.25's game_of_life_halting compares ``bool(answer)``, true for any text)."""
        for answer in NON_ANSWERS:
            paid = [e for e in examples if self.is_correct(answer, e)]
            if paid:
                raise OneLayerError(
                    f"{self.name}: its verifier marks the non-answer '{answer}' correct on {len(paid)} of "
                    f"{len(examples)} held-out problems (e.g. {paid[0].id}, whose answer is '{paid[0].answer}'): a "
                    "reward the policy can get without solving the task; train on another task")


def reference_answer(answer) -> str:
    """A dataset's reference answer as text; GSM8K-style ``reasoning #### 42`` keeps what follows ####."""
    text = str(answer)
    return text.split("####")[-1].strip() if "####" in text else text.strip()


def _rows_to_examples(rows, name: str, question_key: str, answer_key: str) -> list[Example]:
    examples = []
    for i, row in enumerate(rows):
        if question_key not in row or answer_key not in row:
            raise OneLayerError(f"{name}: row {i} lacks '{question_key}' or '{answer_key}' "
                                "(set the question_key / answer_key task options)")
        examples.append(Example(f"{name}/{i}", str(row[question_key]), reference_answer(row[answer_key])))
    return examples


class JsonlTask(MathTask):
    """``jsonl:PATH`` (or any ``*.jsonl`` path): one JSON object per line with question and answer.

    With ``eval_file`` the two files are the splits; otherwise ``eval_percent`` of the questions, by
    hash, are held out.
    """

    def __init__(self, path: str, question_key: str = "question", answer_key: str = "answer",
                 eval_file: str | None = None, eval_percent: float = 10.0, format_weight: float = 0.0,
                 system_prompt: str | None = None):
        super().__init__(f"jsonl:{path}", format_weight, system_prompt)
        self.keys = (question_key, answer_key)
        self._splits = file_splits(self._read, path, eval_file, eval_percent)

    def _read(self, path: str) -> list[Example]:
        return _rows_to_examples(read_jsonl(path), f"jsonl:{Path(path).expanduser().name}", *self.keys)

    def examples(self, split: str) -> list[Example]:
        return self._splits[check_split(split)]


class HFDatasetTask(MathTask):
    """``hf:DATASET`` through ``datasets.load_dataset``: a hub id (e.g. ``hf:openai/gsm8k`` with
    option ``config=main``) or a local dataset folder or file. ``train_split`` and ``eval_split``
    name the dataset's splits."""

    def __init__(self, dataset: str, config: str | None = None, train_split: str = "train",
                 eval_split: str = "test", question_key: str = "question", answer_key: str = "answer",
                 format_weight: float = 0.0, system_prompt: str | None = None):
        super().__init__(f"hf:{dataset}", format_weight, system_prompt)
        self._splits = dataset_splits(lambda rows, where: _rows_to_examples(rows, f"hf:{where}", question_key,
                                                                           answer_key),
                                      dataset, config, train_split, eval_split)

    def examples(self, split: str) -> list[Example]:
        return self._splits[check_split(split)]

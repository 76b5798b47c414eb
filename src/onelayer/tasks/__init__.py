"""The task registry: a task is named ``FAMILY:ARG`` and built from options.

    rg:basic_arithmetic       a reasoning-gym generator (options go to its config)
    jsonl:data/train.jsonl    a local file of question/answer lines (also: any path ending .jsonl)
    hf:openai/gsm8k           a Hugging Face dataset (hub id or local folder)
    toy:repeat                a dense-reward task for tests (toy:repeat:b for another letter)
    code:humaneval            HumanEval; code:synth (generated functions); code:FILE.jsonl or
                              code:DATASET (prompt/tests/entry point): see :mod:`.code`
    tw:coin_collector         multi-turn agent tasks: TextWorld games, maze:4 grid mazes (see :mod:`.agent`)
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import OneLayerError, did_you_mean
from .agent import AgentTask, _maze, _tw
from .base import Example, Score, Task, outcome_fractions
from .code import CodeDatasetTask, HumanEvalTask
from .code_synth import SynthCodeTask
from .math import HFDatasetTask, JsonlTask, MathTask, ReasoningGymTask
from .toy import RepeatTask


def _toy(arg: str, **options) -> Task:
    kind, _, char = arg.partition(":")
    if kind != "repeat":
        raise OneLayerError(f"unknown toy task '{arg}': use toy:repeat or toy:repeat:LETTER")
    return RepeatTask(char or "a", **options)


def _code(arg: str, **options) -> Task:
    if arg == "humaneval":
        return HumanEvalTask(**options)
    return SynthCodeTask(**options) if arg == "synth" else CodeDatasetTask(arg, **options)


FAMILIES: dict[str, Callable[..., Task]] = {
    "rg": ReasoningGymTask, "jsonl": JsonlTask, "hf": HFDatasetTask, "toy": _toy, "code": _code,
    "tw": _tw, "maze": _maze,
}


def register_task_family(prefix: str, factory: Callable[..., Task]) -> None:
    """Make ``PREFIX:ARG`` build ``factory(ARG, **options)``."""
    FAMILIES[prefix] = factory


def get_task(name: str, options: dict | None = None) -> Task:
    """Build the task ``name`` with ``options`` (see the module docstring)."""
    options = dict(options or {})
    if name.endswith(".jsonl") and name.partition(":")[0] not in FAMILIES:
        name = f"jsonl:{name}"
    prefix, sep, arg = name.partition(":")
    if not sep or prefix not in FAMILIES or not arg:
        family = did_you_mean(prefix, FAMILIES)
        guess = (family[:-2] + f":{arg}'?" if family and arg else family) if sep else _bare_name_guess(name)
        raise OneLayerError(f"unknown task '{name}': use one of {', '.join(p + ':...' for p in FAMILIES)} "
                            f"or a .jsonl path{guess}")
    try:
        return FAMILIES[prefix](arg, **options)
    except TypeError as err:
        raise OneLayerError(f"bad options for task '{name}': {err}") from err


def _bare_name_guess(name: str) -> str:
    """For a task name without its family (``basic_arithmetic``): the family it belongs to, if any."""
    from .math import reasoning_gym_names

    guess = did_you_mean(name, reasoning_gym_names())
    return guess.replace("'", "'rg:", 1) if guess else ""


def split_task_list(text: str) -> list[str]:
    """Split ``a,b?k=[1,2],c`` at the commas that are not inside brackets or quotes."""
    parts, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    parts.append(current.strip())
    return [p for p in parts if p]


def parse_task_ref(text: str) -> tuple[str, dict]:
    """``NAME?KEY=VALUE&KEY=VALUE`` -> (NAME, options); values are JSON when they parse as JSON
    (``max_terms=3``, ``operators=["+"]``), strings otherwise."""
    import json

    name, _, query = text.partition("?")
    options: dict = {}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OneLayerError(f"task option '{pair}' in '{text}' is not KEY=VALUE: write TASK?KEY=VALUE&KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


__all__ = ["AgentTask", "Example", "FAMILIES", "HFDatasetTask", "JsonlTask", "MathTask", "ReasoningGymTask",
           "RepeatTask", "Score", "Task", "get_task", "outcome_fractions", "parse_task_ref",
           "register_task_family", "split_task_list"]

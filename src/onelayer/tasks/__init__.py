"""The task registry: a task is named ``FAMILY:ARG`` and built from options.

    rg:basic_arithmetic       a reasoning-gym generator (options go to its config)
    jsonl:data/train.jsonl    a local file of question/answer lines (also: any path ending .jsonl)
    hf:openai/gsm8k           a Hugging Face dataset (hub id or local folder)
    toy:repeat                a dense-reward task for tests (toy:repeat:b for another letter)
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import OneLayerError
from .base import Example, Score, Task
from .math import HFDatasetTask, JsonlTask, MathTask, ReasoningGymTask
from .toy import RepeatTask


def _toy(arg: str, **options) -> Task:
    kind, _, char = arg.partition(":")
    if kind != "repeat":
        raise OneLayerError(f"unknown toy task '{arg}': use toy:repeat or toy:repeat:LETTER")
    return RepeatTask(char or "a", **options)


FAMILIES: dict[str, Callable[..., Task]] = {
    "rg": ReasoningGymTask, "jsonl": JsonlTask, "hf": HFDatasetTask, "toy": _toy,
}


def register_task_family(prefix: str, factory: Callable[..., Task]) -> None:
    """Make ``PREFIX:ARG`` build ``factory(ARG, **options)``."""
    FAMILIES[prefix] = factory


def get_task(name: str, options: dict | None = None) -> Task:
    """Build the task ``name`` with ``options`` (see the module docstring)."""
    options = dict(options or {})
    if name.endswith(".jsonl") and not name.startswith("jsonl:"):
        name = f"jsonl:{name}"
    prefix, sep, arg = name.partition(":")
    if not sep or prefix not in FAMILIES or not arg:
        raise OneLayerError(f"unknown task '{name}': use one of {', '.join(p + ':...' for p in FAMILIES)} "
                            "or a .jsonl path")
    try:
        return FAMILIES[prefix](arg, **options)
    except TypeError as err:
        raise OneLayerError(f"bad options for task '{name}': {err}") from err


__all__ = ["Example", "FAMILIES", "HFDatasetTask", "JsonlTask", "MathTask", "ReasoningGymTask",
           "RepeatTask", "Score", "Task", "get_task", "register_task_family"]

"""What every task is: examples in two non-overlapping splits, chat messages, and a scorer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One problem. ``id`` is stable across runs, so per-example results can be joined later."""

    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Score:
    """``reward`` drives training; ``correct`` is the metric; ``extracted`` is the answer read off;
    ``outcome`` names how scoring went where it can go several ways (code: passed, failed, timeout...)."""

    reward: float
    correct: bool
    extracted: str | None
    outcome: str | None = None


class Task(ABC):
    """A named source of examples with a verifier. Subclasses set ``name`` and ``system_prompt``."""

    name: str
    system_prompt: str | None = None

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """All examples of ``split`` (``train`` or ``eval``); the two never share a question."""

    @abstractmethod
    def score(self, completion: str, example: Example) -> Score:
        """Score one completion of ``example``."""

    def messages(self, example: Example) -> list[dict]:
        """The chat turns that pose ``example``."""
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return turns + [{"role": "user", "content": example.question}]

    def same_answer(self, a: str, b: str) -> bool:
        """Whether two extracted answers are the same answer (used to pool votes); math equivalence by
        default, tasks with other answers override it."""
        from .answers import answers_match

        return answers_match(a, b)

    def score_all(self, completions: list[str], examples: list[Example]) -> list[Score]:
        return [self.score(c, e) for c, e in zip(completions, examples, strict=True)]

    def rewards(self, prompts: list[str], completions: list[str], examples: list[Example]) -> list[float]:
        """TRL-style reward function: one float per completion."""
        return [s.reward for s in self.score_all(completions, examples)]


def outcome_fractions(scores: list[Score]) -> dict[str, float]:
    """Share of ``scores`` per outcome (e.g. ``{"failed": 0.5, "passed": 0.25, "timeout": 0.25}``);
    empty for tasks that do not name outcomes."""
    counts: dict[str, int] = {}
    for score in scores:
        if score.outcome:
            counts[score.outcome] = counts.get(score.outcome, 0) + 1
    return {k: counts[k] / len(scores) for k in sorted(counts)}


def dedup_against(train: list[Example], held_out: list[Example]) -> list[Example]:
    """``train`` without any question that ``held_out`` has, nor repeats of its own."""
    seen = {e.question.strip() for e in held_out}
    kept = []
    for example in train:
        key = example.question.strip()
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept

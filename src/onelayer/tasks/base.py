"""What every task is: examples in two non-overlapping splits, chat messages, and a scorer."""

from __future__ import annotations

import signal
import sys
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
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


class ScoreTimeout(BaseException):
    """A completion's scoring ran past its CPU-time limit (a BaseException, as KeyboardInterrupt: a checker's
    ``except Exception`` must not swallow it)."""


@contextmanager
def cpu_time_limits():
    """Within the block, ``limit(seconds)`` arms a limit on this process's CPU time from now (``limit(0)``
    disarms it); past it, :class:`ScoreTimeout` is raised wherever the code is, a regex match included.
    A CPU-time timer (SIGVTALRM), not SIGALRM, which math-verify's own timeouts set and clear; a timer or
    handler that was there before (a profiler's) is put back after. Only in the main thread of a Unix process
    (signals are delivered there); elsewhere ``limit`` does nothing."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield lambda seconds: None
        return

    def expired(signum, frame):
        raise ScoreTimeout

    previous_timer = signal.getitimer(signal.ITIMER_VIRTUAL)
    previous = signal.signal(signal.SIGVTALRM, expired)
    try:
        yield lambda seconds: signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        # None: a handler installed from C, which Python cannot put back; the default then
        signal.signal(signal.SIGVTALRM, signal.SIG_DFL if previous is None else previous)
        if previous_timer[0] > 0:
            signal.setitimer(signal.ITIMER_VIRTUAL, *previous_timer)


class Task(ABC):
    """A named source of examples with a verifier. Subclasses set ``name`` and ``system_prompt``."""

    name: str
    system_prompt: str | None = None
    # scoring a completion takes milliseconds; far longer is a checker's bug on unusual output, which would
    # otherwise hang a run with the GPU idle: such a completion scores 0, with a warning
    score_cpu_seconds: float = 20.0
    _warned = False  # said once per task object

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
        """Every completion's score, each within ``score_cpu_seconds`` of CPU time (after one has run past it,
        the rest of the batch within 1 s each: a policy stuck in one degenerate output would otherwise cost
        the limit for every completion). A completion whose scoring raises or runs past its limit scores 0,
        with a warning (the first time): one odd output must not end a run. When every completion raises,
        the task itself is broken and the first error is raised."""
        scores, errors, seconds = [], [], self.score_cpu_seconds
        with cpu_time_limits() as limit:
            for completion, example in zip(completions, examples, strict=True):
                try:  # the timer may fire anywhere in here, the handler of a checker's error included
                    limit(seconds)
                    try:
                        score = self.score(completion, example)
                    except Exception as err:
                        errors.append(err)
                        score = Score(0.0, False, None)
                        self.warn_once(completion, example, f"raised {type(err).__name__}: {str(err)[:120]}")
                except ScoreTimeout:
                    score = Score(0.0, False, None)
                    self.warn_once(completion, example, f"took over {seconds:g} s of CPU")
                    seconds = min(seconds, 1.0)
                finally:
                    limit(0)
                scores.append(score)
        if errors and len(errors) == len(completions):
            raise errors[0]
        return scores

    def warn_once(self, completion: str, example: Example, what: str) -> None:
        if not self._warned:
            self._warned = True
            print(f"warning: scoring one completion of {example.id} on {self.name} {what}, so it scores 0 "
                  f"(further ones silently): a bug in the task's checker on this output, please report it with the "
                  f"completion, which starts {completion[:80]!r}", file=sys.stderr)

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

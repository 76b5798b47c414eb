"""Majority votes over answers: layer-specialist ensembles and self-consistency, with overlap and oracle.

Both are the same vote. An ensemble votes over the greedy answers of several checkpoints (one
answer per member per example); self-consistency votes over k sampled answers of one model. Answers
are grouped into classes with the task's own equivalence (``same``: math-verify, then normalised
text), so "0.5" and "1/2" vote together. Missing answers abstain. Ties go to the class whose first
vote comes earliest in member order, so list the members best first (a tie then falls to the best
member's answer, the natural fallback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Vote:
    answer: str | None  # the winning class's first answer; None when every member abstained
    correct: bool
    votes: int          # size of the winning class
    tied: bool          # another class had as many votes


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool], same: Callable[[str, str], bool]) -> Vote:
    """The vote of one example: ``answers[i]`` and ``correct[i]`` are member i's answer and verdict."""
    classes: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        home = next((c for c in classes if same(answer, answers[c[0]])), None)
        if home is None:
            classes.append([i])
        else:
            home.append(i)
    if not classes:
        return Vote(None, False, 0, False)
    most = max(len(c) for c in classes)
    winner = next(c for c in classes if len(c) == most)  # classes are in order of their first vote
    return Vote(answers[winner[0]], bool(correct[winner[0]]), most, sum(len(c) == most for c in classes) > 1)


def jaccard(a: set, b: set) -> float | None:
    """|a & b| / |a | b|; None (undefined) for two empty sets: members that solved nothing do not overlap
    perfectly, there is nothing to compare."""
    return len(a & b) / len(a | b) if a | b else None


@dataclass(frozen=True)
class EnsembleSummary:
    vote_accuracy: float
    member_accuracy: dict[str, float]
    best_member: str
    oracle: float                       # share of examples at least one member solved
    overlap: dict[tuple[str, str], float | None]  # Jaccard of solved-example sets (None: both solved none)
    ties: int
    votes: list[Vote]


def ensemble(members: dict[str, tuple[Sequence[str | None], Sequence[bool]]],
             same: Callable[[str, str], bool]) -> EnsembleSummary:
    """Vote example by example over ``members`` (name -> per-example answers and verdicts, all over the
    same examples, in member order)."""
    names = list(members)
    n = len(members[names[0]][0])
    if any(len(a) != n or len(c) != n for a, c in members.values()):
        raise ValueError("every member must answer the same examples")
    votes = [majority_vote([members[m][0][i] for m in names], [members[m][1][i] for m in names], same)
             for i in range(n)]
    solved = {m: {i for i in range(n) if members[m][1][i]} for m in names}
    accuracy = {m: len(solved[m]) / n for m in names}
    return EnsembleSummary(
        vote_accuracy=sum(v.correct for v in votes) / n, member_accuracy=accuracy,
        best_member=max(names, key=lambda m: accuracy[m]), oracle=len(set().union(*solved.values())) / n,
        overlap={(a, b): jaccard(solved[a], solved[b]) for i, a in enumerate(names) for b in names[i + 1:]},
        ties=sum(v.tied for v in votes), votes=votes)

"""The environment interface every agent task drives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvStep:
    """What the environment says after a reset or an action.

    ``observation`` is the state as the agent sees it (identical states give identical text, which
    GiGPO's anchor groups rely on); ``reward`` is for this step only; ``won`` says the goal was
    reached; ``admissible`` lists the valid actions when the environment knows them (else None).
    """

    observation: str
    reward: float = 0.0
    done: bool = False
    won: bool = False
    admissible: tuple[str, ...] | None = None


class Env(ABC):
    """One episode at a time. ``goal`` describes the task in words (for the system prompt)."""

    goal: str = ""

    @abstractmethod
    def reset(self, seed: int) -> EnvStep:
        """Start the game that ``seed`` names; the same seed always gives the same game."""

    @abstractmethod
    def step(self, action: str) -> EnvStep:
        """Apply one action (a command from ``admissible`` where the environment lists them)."""

    def close(self) -> None:  # noqa: B027 - most environments hold nothing
        """Release what the environment holds (processes, files)."""

"""Agent tasks: multi-turn episodes in an environment instead of one completion per question.

    tw:coin_collector     TextWorld games (also tw:treasure_hunter, tw:cooking); option level
    maze:4                a 4 x 4 grid maze (any size >= 2)

An example is an environment seed: train seeds and eval seeds never overlap. Each turn the model
sees the goal, a window of recent turns (observation and action) and the current observation
with the admissible actions, through the chat template, and answers with
``<action>COMMAND</action>``. A reply without that tag is also accepted when its first line is an
admissible command, or when it names exactly one admissible command. Anything else, or a command the environment does not list, is invalid: the
turn is a no-op (the state does not change) and costs ``invalid_penalty``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable

from ..envs.base import Env, EnvStep
from ..errors import OneLayerError
from .base import Example, Score, Task
from .sources import check_split

EVAL_SEED_OFFSET = 1_000_000


def _plain_words(text: str) -> str:
    """Lower-case words without punctuation or articles, space-padded: "Take the coin." -> " take coin "."""
    kept = [w for w in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if w not in ("the", "a", "an")]
    return " " + " ".join(kept) + " "


def last_tagged(text: str, tag: str) -> str | None:
    """The content of the last complete ``<tag>...</tag>`` (case-insensitive): from the last opening tag that a
    closing one follows, to the first closing tag after it. Found in linear time: a lazy regex over a reply of
    repeated opening tags took the square of its length (160k characters: 28 s)."""
    closes = [m.start() for m in re.finditer(f"</{re.escape(tag)}>", text, re.IGNORECASE)]
    if not closes:
        return None
    opening = next(reversed([*re.finditer(f"<{re.escape(tag)}>", text[:closes[-1]], re.IGNORECASE)]), None)
    if opening is None:
        return None
    return text[opening.end():closes[bisect.bisect_left(closes, opening.end())]]


def parse_action(text: str, admissible: tuple[str, ...] | None) -> str | None:
    """The command in ``text``: the last ``<action>...</action>``; without a tag, a first line that
    is an admissible command, or else the one admissible command the reply names (when it names
    exactly one, ignoring articles and punctuation). None when it is missing, ambiguous or not
    admissible."""
    found = last_tagged(text, "action")
    if found is not None:
        command = " ".join(found.split()).strip(" .")
        if admissible is None:
            return command or None
        return {a.lower(): a for a in admissible}.get(command.lower())
    if admissible is None:
        return None
    lowered = {a.lower(): a for a in admissible}
    first = " ".join(text.strip().split("\n")[0].split()).strip(" .`'\"").lower()
    if first in lowered:
        return lowered[first]
    words = _plain_words(text)
    named = [a for key, a in lowered.items() if _plain_words(key).strip() and _plain_words(key) in words]
    named = [a for a in named if not any(a != b and a.lower() in b.lower() for b in named)]  # "go" within "go east"
    return named[0] if len(named) == 1 else None


class AgentTask(Task):
    """Options: ``max_steps`` per episode, ``history`` (turns shown), ``invalid_penalty``,
    ``train_size``/``eval_size`` (seeds), ``seed`` (which seeds). The tokens per turn are the
    sampling settings' ``max_new_tokens``."""

    def __init__(self, name: str, make_env: Callable[[], Env], max_steps: int = 10, history: int = 4,
                 invalid_penalty: float = 0.1, train_size: int = 1000, eval_size: int = 200, seed: int = 0,
                 prepare: Callable[[list[int]], None] | None = None):
        if max_steps < 1 or history < 0:
            raise OneLayerError(f"{name}: max_steps must be >= 1 and history >= 0")
        self.name, self.make_env, self.max_steps, self.history = name, make_env, int(max_steps), int(history)
        self.invalid_penalty, self._prepare = float(invalid_penalty), prepare
        self.goal = make_env().goal
        self.system_prompt = (f"{self.goal} Each turn, reply with exactly one command from the admissible "
                              "actions, written as <action>COMMAND</action>.")
        self._seeds = {"train": [seed * 10_000_019 + i for i in range(train_size)],
                       "eval": [EVAL_SEED_OFFSET + seed * 10_000_019 + i for i in range(eval_size)]}

    def examples(self, split: str) -> list[Example]:
        return [Example(f"{self.name}/{split}/{s}", self.goal, "", {"seed": s}) for s in self._seeds[check_split(split)]]

    def prepare(self, seeds: list[int]) -> None:
        """Make whatever the seeds' games need before they are played (TextWorld compiles games)."""
        if self._prepare:
            self._prepare(seeds)

    def turn_messages(self, history: list[tuple[str, str]], current: EnvStep) -> list[dict]:
        """The chat turns for one decision: recent (observation, action) pairs and the current state."""
        lines = []
        shown = history[-self.history:] if self.history else []
        if shown:
            lines.append("Recent turns:")
            start = len(history) - len(shown) + 1
            lines += [f"[{start + k}] Observation: {o}\nAction: {a}" for k, (o, a) in enumerate(shown)]
            lines.append("")
        lines.append(f"Current observation: {current.observation}")
        if current.admissible:  # the choices last, next to the answer: small models copy from there
            lines.append(f"Admissible actions: {', '.join(current.admissible)}")
            lines.append("Choose one admissible action and answer with <action>ACTION</action>.")
        else:
            lines.append("Answer with one command as <action>COMMAND</action>.")
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": "\n".join(lines)}]

    def parse_action(self, text: str, admissible: tuple[str, ...] | None) -> str | None:
        return parse_action(text, admissible)

    def score(self, completion: str, example: Example) -> Score:
        raise OneLayerError(f"{self.name} is an agent task, scored by playing episodes: use train, eval or scan")


def _tw(arg: str, level: int = 1, **options) -> AgentTask:
    from ..envs.textworld import TextWorldEnv, make_games

    challenge = arg.replace("-", "_")
    TextWorldEnv(challenge, level)  # fail fast on a bad challenge or a missing TextWorld
    return AgentTask(f"tw:{challenge}:L{level}", lambda: TextWorldEnv(challenge, level),
                     prepare=lambda seeds: make_games(challenge, level, seeds), **options)


def _maze(arg: str, **options) -> AgentTask:
    from ..envs.maze import MazeEnv

    try:
        size = int(arg)
    except ValueError:
        raise OneLayerError(f"maze:{arg}: give the maze size, e.g. maze:4") from None
    if size < 2:
        raise OneLayerError(f"maze:{arg}: the size must be >= 2")
    options.setdefault("max_steps", 4 * size)
    return AgentTask(f"maze:{size}", lambda: MazeEnv(size), **options)

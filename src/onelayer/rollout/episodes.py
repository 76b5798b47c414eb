"""Multi-turn rollouts: groups of episodes played in lockstep, one batched generation per turn.

Every live episode of every environment advances by one action per turn: the turn's prompts are
rendered together, sampled in one call of the generator, parsed, and applied. The result is the
episodes (for advantages and metrics) and one :class:`RolloutBatch` whose rows are the turns, so
the policy update treats each action as a completion of its own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .batch import RolloutBatch, concat_batches
from .hf import Generator
from .prompts import render_prompts


class EpisodeTask(Protocol):
    """What :func:`play_episodes` needs of an agent task (see ``tasks.agent.AgentTask``)."""

    max_steps: int
    invalid_penalty: float

    def make_env(self): ...
    def prepare(self, seeds: list[int]) -> None: ...
    def turn_messages(self, history: list[tuple[str, str]], current) -> list[dict]: ...
    def parse_action(self, text: str, admissible) -> str | None: ...


@dataclass
class Episode:
    """One played episode. Lists are per turn: the observation acted on, the reply, the parsed
    command (None when invalid), the reward, and the row of the turn in the rollout batch."""

    seed: int
    observations: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    actions: list[str | None] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    won: bool = False

    @property
    def total_return(self) -> float:
        return sum(self.rewards)

    @property
    def invalid_actions(self) -> int:
        return sum(a is None for a in self.actions)


def play_episodes(generator: Generator, tokenizer, task: EpisodeTask, seeds: list[int], group_size: int,
                  max_new_tokens: int, temperature: float, top_p: float) -> tuple[list[Episode], RolloutBatch]:
    """Play ``group_size`` episodes from each seed (the episodes of a seed contiguous). Returns the
    episodes and the batch of all turns."""
    task.prepare(seeds)
    episodes = [Episode(seed) for seed in seeds for _ in range(group_size)]
    envs = [task.make_env() for _ in episodes]
    current = [env.reset(e.seed) for env, e in zip(envs, episodes, strict=True)]
    history: list[list[tuple[str, str]]] = [[] for _ in episodes]
    live = [i for i, step in enumerate(current) if not step.done]
    batches, rows = [], 0
    try:
        for _turn in range(task.max_steps):
            if not live:
                break
            prompts = render_prompts(tokenizer, [task.turn_messages(history[i], current[i]) for i in live])
            batch = generator.generate(prompts, 1, max_new_tokens, temperature, top_p)
            batches.append(batch)
            for k, i in enumerate(live):
                episode, reply = episodes[i], batch.texts[k]
                action = task.parse_action(reply, current[i].admissible)
                episode.observations.append(current[i].observation)
                episode.replies.append(reply)
                episode.actions.append(action)
                episode.rows.append(rows + k)
                if action is None:  # a no-op: the state stays, the turn costs the penalty
                    episode.rewards.append(-task.invalid_penalty)
                    history[i].append((current[i].observation, f"{reply.strip()[:80]} (invalid)"))
                    continue
                result = envs[i].step(action)
                episode.rewards.append(result.reward)
                history[i].append((current[i].observation, action))
                current[i] = result
                episode.won = episode.won or result.won
            rows += len(live)
            live = [i for i in live if not current[i].done]
    finally:
        for env in envs:
            env.close()
    if not batches:
        raise ValueError("every episode ended at reset: nothing to play")
    return episodes, concat_batches(batches, tokenizer.pad_token_id)

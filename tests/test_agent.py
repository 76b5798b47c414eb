"""Agent tasks: environments, action parsing, multi-turn rollouts, GiGPO training and evaluation."""

import json

import pytest
import torch

from onelayer.envs.maze import MazeEnv, carve_maze
from onelayer.errors import OneLayerError
from onelayer.evaluate import evaluate
from onelayer.rollout.batch import RolloutBatch
from onelayer.rollout.episodes import play_episodes
from onelayer.tasks import get_task
from onelayer.tasks.agent import parse_action

from .tiny import tiny_model


def test_maze_is_a_deterministic_perfect_maze():
    a, b = carve_maze(5, seed=7), carve_maze(5, seed=7)
    assert a == b and a != carve_maze(5, seed=8)
    assert sum(len(v) for v in a.values()) == 2 * (25 - 1)  # a tree: 24 passages, each open from both sides
    first, again = MazeEnv(5).reset(3), MazeEnv(5).reset(3)
    assert first == again and not first.done and first.admissible


def test_maze_moves_walls_and_exit():
    env = MazeEnv(3)
    start = env.reset(0)
    wall = next(d for d in ("north", "south", "east", "west") if f"go {d}" not in start.admissible)
    assert env.step(f"go {wall}").observation == start.observation  # a wall: nowhere to go, same state
    # follow the shortest path by breadth-first search over the revealed openings
    path, steps = _solve(env), 0
    env.reset(0)
    for move in path:
        result = env.step(f"go {move}")
        steps += 1
    assert result.won and result.done and result.reward == 1.0 and steps == env.shortest


def _solve(env):
    from onelayer.envs.maze import MOVES

    frontier, seen = [(env.position, [])], {env.position}
    while frontier:
        cell, path = frontier.pop(0)
        if cell == env.exit:
            return path
        for d in sorted(env.opening[cell]):
            nxt = (cell[0] + MOVES[d][0], cell[1] + MOVES[d][1])
            if nxt not in seen:
                seen.add(nxt)
                frontier.append((nxt, path + [d]))
    raise AssertionError("no path")


def test_parse_action_format_and_invalid_actions():
    admissible = ("go north", "take coin")
    assert parse_action("I will move.\n<action>Go  North</action>", admissible) == "go north"
    assert parse_action("<action>x</action> then <action>take coin</action>", admissible) == "take coin"
    assert parse_action("take coin", admissible) == "take coin"  # a bare admissible command
    assert parse_action("<action>fly away</action>", admissible) is None  # not admissible
    assert parse_action("I go north, please", admissible) == "go north"  # names one admissible command
    assert parse_action("take coin or go north", admissible) is None and parse_action("", admissible) is None
    assert parse_action("<action>open door</action>", None) == "open door"  # no list: any tagged command
    assert parse_action("open door", None) is None
    assert parse_action("<ACTION>go north</Action>", admissible) == "go north"  # tags in any case
    # the last complete pair: a stray closing tag after it, an unclosed opening one, an opening one inside it
    assert parse_action("<action>go north</action> I wrap my choice in </action> tags.", admissible) == "go north"
    assert parse_action("<action>take coin</action> or <action>go north", admissible) == "take coin"
    assert parse_action("<action>take coin<action>go north</action>", admissible) == "go north"


@pytest.mark.timeout(10)
def test_a_reply_of_repeated_tags_parses_in_linear_time():
    # the lazy regex this replaces took 28 s on 160k characters of "<action>", the square of the length
    admissible = ("go north", "take coin")
    for reply in ("<action>" * 200_000, "<action>" * 200_000 + "go north</action>", "</action>" * 200_000):
        assert parse_action(reply, admissible) == ("go north" if reply.endswith("north</action>") else None)


def test_agent_task_seeds_and_prompts():
    task = get_task("maze:3", {"train_size": 5, "eval_size": 3})
    train, held = task.examples("train"), task.examples("eval")
    assert len(train) == 5 and len(held) == 3
    assert not {e.meta["seed"] for e in train} & {e.meta["seed"] for e in held}
    assert task.max_steps == 12  # 4 x size by default
    env = task.make_env()
    step = env.reset(train[0].meta["seed"])
    messages = task.turn_messages([("obs one", "go north"), ("obs two", "go east")], step)
    assert messages[0]["role"] == "system" and "<action>COMMAND</action>" in messages[0]["content"]
    user = messages[1]["content"]
    assert "[1] Observation: obs one\nAction: go north" in user and f"Current observation: {step.observation}" in user
    assert "Admissible actions: " + ", ".join(step.admissible) in user and user.endswith("<action>ACTION</action>.")
    only_last = get_task("maze:3", {"history": 1}).turn_messages([("obs one", "a"), ("obs two", "b")], step)[1]
    assert "obs one" not in only_last["content"] and "[2] Observation: obs two" in only_last["content"]
    for bad in ("maze:x", "maze:1"):
        with pytest.raises(OneLayerError, match="maze"):
            get_task(bad)
    with pytest.raises(OneLayerError, match="scored by playing episodes"):
        task.score("x", train[0])


class ScriptedGenerator:
    """Replies from a script per call (one reply per prompt), as token-free batches."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def generate(self, prompts, num_samples, max_new_tokens, temperature, top_p):
        texts = [self.replies.pop(0) for _ in prompts]
        self.calls.append(prompts)
        n = len(prompts)
        return RolloutBatch(torch.ones(n, 3, dtype=torch.long), torch.ones(n, 3, dtype=torch.long),
                            torch.ones(n, 1, dtype=torch.long), 2, texts, torch.zeros(n, dtype=torch.bool))


class TokenizerStub:
    pad_token_id = 0
    chat_template = None


def test_episodes_play_in_lockstep_with_invalid_actions_as_penalised_no_ops():
    task = get_task("maze:2", {"max_steps": 3, "invalid_penalty": 0.5})
    env = task.make_env()
    start = env.reset(11)
    good = start.admissible[0]
    # turn 1: episode 0 acts, episode 1 writes nonsense; turn 2: both act; turn 3 (if still going)
    generator = ScriptedGenerator([f"<action>{good}</action>", "hmm", "<action>bad</action>",
                                   f"<action>{good}</action>"] + ["nope"] * 4)
    episodes, batch = play_episodes(generator, TokenizerStub(), task, [11], 2, 8, 1.0, 1.0)
    first, second = episodes
    assert second.actions[0] is None and second.rewards[0] == -0.5
    assert second.observations[1] == start.observation  # the state did not change
    assert first.actions[0] == good and first.observations[0] == start.observation
    assert batch.size == sum(len(e.actions) for e in episodes)
    rows = sorted(r for e in episodes for r in e.rows)
    assert rows == list(range(batch.size))
    assert [batch.texts[r] for r in first.rows] == first.replies
    assert len(generator.calls[0]) == 2  # both episodes decided in one generation call


def test_gigpo_train_and_eval_on_a_maze_from_the_command_line(tmp_path, saved_tiny, capsys):
    from onelayer.cli import main

    code = main(["train", "--model", str(saved_tiny), "--task", "maze:2", "--algo", "gigpo", "--layers", "1",
                 "--steps", "2", "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "6", "--lr", "1e-2",
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress", "--eval-every", "2",
                 "--eval-n", "3", "--task-option", "max_steps=3"])
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["turns"] <= 3 and 0 <= r["anchored_turn_fraction"] <= 1 for r in rows)
    final = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    assert final["n"] == 3 and len(final["mean_reward_ci"]) == 2
    code = main(["scan", "--model", str(saved_tiny), "--task", "maze:2", "--algo", "gigpo", "--layers", "1",
                 "--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
                 "--eval-n", "2", "--device", "cpu", "--out", str(tmp_path / "scan"), "--no-progress",
                 "--task-option", "max_steps=2"])
    assert code == 0, capsys.readouterr().err
    layer = json.loads((tmp_path / "scan" / "runs" / "layer001-s0" / "result.json").read_text())
    assert layer["task"] == "maze:2" and layer["n"] == 2 and "anchored_turn_fraction" in json.loads(
        (tmp_path / "scan" / "runs" / "layer001-s0" / "log.jsonl").read_text().splitlines()[0])
    assert main(["train", "--model", str(saved_tiny), "--task", "toy:repeat", "--algo", "gigpo",
                 "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    assert "needs a multi-turn agent task" in capsys.readouterr().err


def test_agent_eval_reports_success_and_return_with_intervals(tokenizer):
    task = get_task("maze:2", {"max_steps": 2})
    result = evaluate(tiny_model("llama"), tokenizer, task, n=4, samples=2, max_new_tokens=4, temperature=1.0,
                      engine="plain")
    assert result.n == 4 and result.samples == 2 and len(result.per_example) == 4
    assert result.mean_reward_ci[0] <= result.mean_reward <= result.mean_reward_ci[1]
    assert all(len(p["actions"]) == 2 and all(1 <= t <= 2 for t in p["turns"]) for p in result.per_example)
    assert set(result.pass_at) == {1, 2}


def test_textworld_games_are_deterministic_per_seed(tmp_path, monkeypatch):
    import textworld  # noqa: F401  (a test dependency: CI must run this test, not skip it)
    monkeypatch.setenv("ONELAYER_CACHE", str(tmp_path))
    task = get_task("tw:coin_collector", {"level": 1, "train_size": 2})
    seeds = [e.meta["seed"] for e in task.examples("train")]
    task.prepare(seeds)
    first, again, other = task.make_env(), task.make_env(), task.make_env()
    a, b = first.reset(seeds[0]), again.reset(seeds[0])
    assert a == b and "coin" in a.observation and "$$" not in a.observation and "take coin" in a.admissible
    assert other.reset(seeds[1]).observation != a.observation  # another seed, another game
    result = first.step("take coin")
    assert result.won and result.done and result.reward == 1.0
    for env in (first, again, other):
        env.close()
    with pytest.raises(OneLayerError, match="unknown TextWorld challenge"):
        get_task("tw:chess")
    with pytest.raises(OneLayerError, match="tw:cooking level 7 is not 1-4"):
        get_task("tw:cooking", {"level": 7})
    hunter = get_task("tw:treasure_hunter", {"level": 1, "train_size": 1})
    seed = hunter.examples("train")[0].meta["seed"]
    hunter.prepare([seed])
    one, two = hunter.make_env(), hunter.make_env()
    assert one.reset(seed) == two.reset(seed)
    one.close()
    two.close()


def test_the_trainer_gives_each_turn_its_gigpo_advantage_with_the_configured_gamma_and_step_weight():
    """Two episodes of one maze, scripted: (move, invalid, invalid) and (invalid, move, invalid); an invalid
    turn is a no-op costing 0.5. Both returns are -1, so the episode advantages are 0 and every turn's
    advantage is omega times its anchor-state advantage, by hand with gamma 0.5 and omega 0.25:
    discounted returns (-0.375, -0.75, -0.5) and (-0.625, -0.25, -0.5); the start state holds (-0.375,
    -0.625, -0.25), the state after the move (-0.75, -0.5, -0.5), each normalised by its mean and std."""
    from types import SimpleNamespace

    from onelayer.algorithms import get_algorithm
    from onelayer.config import SamplingConfig, TrainConfig
    from onelayer.tasks import Example
    from onelayer.training.distributed import SOLO
    from onelayer.training.setup import PromptSampler
    from onelayer.training.step import episode_step

    task = get_task("maze:3", {"max_steps": 3, "invalid_penalty": 0.5})
    seed = 11
    start = task.make_env().reset(seed)
    move = f"<action>{start.admissible[0]}</action>"
    generator = ScriptedGenerator([move, "nope", "nope", move, "nope", "nope"])
    cfg = TrainConfig(algo="gigpo", prompts_per_step=1, group_size=2, gamma=0.5, step_weight=0.25,
                      sampling=SamplingConfig(max_new_tokens=8))
    run = SimpleNamespace(config=cfg, task=task, algorithm=get_algorithm("gigpo"), world=SOLO,
                          sampler=PromptSampler([Example("x", "", "", {"seed": seed})], 0))
    rollouts = episode_step(run, TokenizerStub(), generator, 0)
    batch, advantages, metrics = rollouts.batch, rollouts.advantages, rollouts.metrics
    assert batch.size == 6 and metrics["reward"] == -1.0 and metrics["accuracy"] == 0.0
    # turns are batched in lockstep, episodes in order: rows 0, 1 are turn 1, rows 2, 3 turn 2, rows 4, 5 turn 3
    rows = advantages.tolist()
    first, second = rows[0::2], rows[1::2]
    assert first == pytest.approx([0.25 * 0.21822, 0.25 * -1.15470, 0.25 * 0.57735], abs=1e-5)
    assert second == pytest.approx([0.25 * -1.09109, 0.25 * 0.87287, 0.25 * 0.57735], abs=1e-5)
    assert metrics["anchored_turn_fraction"] == 1.0

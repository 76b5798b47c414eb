"""TextWorld's generated games (``tw:coin_collector``, ``tw:treasure_hunter``, ``tw:cooking``).

TextWorld makes and compiles games locally (its wheel carries the Inform 7 compiler) and plays
them with Jericho. Making a game takes seconds, so each (challenge, level, seed) is made once,
cached under ``~/.cache/onelayer/textworld`` (``ONELAYER_CACHE`` moves it), and made in parallel
processes when a batch of seeds is missing. The same seed always names the same game.

The observation is TextWorld's feedback text without the opening banner; the step reward is the
game's score change divided by its maximum score, so an episode's return is in [0, 1]; winning or
losing ends the episode.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..errors import OneLayerError
from ..sandbox import default_workers
from .base import Env, EnvStep

CHALLENGES = ("coin_collector", "treasure_hunter", "cooking")


def _cooking_settings(level: int) -> dict:
    """Cooking difficulty: more ingredients, rooms and preparation steps per level (1-4)."""
    table = {1: dict(recipe=1, take=1, go=1), 2: dict(recipe=1, take=1, go=6, open=True),
             3: dict(recipe=2, take=2, go=6, open=True, cut=True), 4: dict(recipe=3, take=3, go=9, open=True,
                                                                          cut=True, cook=True)}
    if level not in table:
        raise OneLayerError(f"tw:cooking level {level} is not 1-4: pick one of 1, 2, 3, 4")
    return {"open": False, "cut": False, "cook": False, "drop": False, "split": "train", "recipe_seed": 0,
            **table[level]}


def cache_dir() -> Path:
    root = os.environ.get("ONELAYER_CACHE") or Path.home() / ".cache" / "onelayer"
    return Path(root) / "textworld"


def game_path(challenge: str, level: int, seed: int) -> Path:
    return cache_dir() / f"{challenge}-L{level}-{seed}.z8"


def _made(path: Path) -> bool:
    """TextWorld plays a game from its .z8 and reads its facts from the .json beside it."""
    return path.is_file() and path.with_suffix(".json").is_file()


def make_game(challenge: str, level: int, seed: int) -> str:
    """Make and compile one game (if not cached); returns its path."""
    path = game_path(challenge, level, seed)
    if _made(path):
        return str(path)
    import textworld
    import textworld.challenges

    path.parent.mkdir(parents=True, exist_ok=True)
    options = textworld.GameOptions()
    options.seeds = seed
    partial = path.with_name(f"{path.stem}.{os.getpid()}.z8")  # compile beside, then rename: no half files
    options.path = str(partial)
    options.force_recompile = True
    module = getattr(textworld.challenges, challenge)
    settings = _cooking_settings(level) if challenge == "cooking" else {"level": level}
    game = module.make(settings, options)
    textworld.generator.compile_game(game, options)
    # TextWorld reads the game's facts from the .json beside the .z8: keep both, z8 renamed last
    os.replace(partial.with_suffix(".json"), path.with_suffix(".json"))
    os.replace(partial, path)
    for leftover in path.parent.glob(f"{path.stem}.{os.getpid()}.*"):
        leftover.unlink()
    return str(path)


def make_games(challenge: str, level: int, seeds: list[int], workers: int | None = None) -> None:
    """Make every missing game of ``seeds``, in parallel processes."""
    missing = [s for s in seeds if not _made(game_path(challenge, level, s))]
    if not missing:
        return
    workers = min(len(missing), workers or default_workers())
    print(f"making {len(missing)} TextWorld {challenge} level {level} games in {workers} processes "
          f"(cached in {cache_dir()})", file=sys.stderr)
    if workers <= 1:
        for seed in missing:
            make_game(challenge, level, seed)
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(make_game, [challenge] * len(missing), [level] * len(missing), missing))


_BANNER_END = re.compile(r"^.*\$\$\s*$", re.MULTILINE)


def clean_feedback(text: str) -> str:
    """TextWorld's feedback without the ASCII-art banner of the first observation, the prompt
    character, or runs of blank lines."""
    ends = [m.end() for m in _BANNER_END.finditer(text)]
    if ends:
        text = text[ends[-1]:]
    text = re.sub(r"^\s*>.*$", "", text, flags=re.MULTILINE)  # the prompt and the status bar
    return re.sub(r"\n\s*\n+", "\n", text).strip()


class TextWorldEnv(Env):
    def __init__(self, challenge: str, level: int = 1):
        if challenge not in CHALLENGES:
            raise OneLayerError(f"unknown TextWorld challenge '{challenge}': use tw:{', tw:'.join(CHALLENGES)}")
        try:
            import textworld  # noqa: F401
        except ImportError as err:
            raise OneLayerError("tw: tasks need TextWorld: pip install 'onelayer[agent]'") from err
        if challenge == "cooking":
            _cooking_settings(int(level))  # a bad level fails here, not in a worker making games
        self.challenge, self.level, self._env = challenge, int(level), None
        self.goal = ("You are playing a text adventure game. Read each observation and reach the game's goal "
                     "with text commands.")

    def reset(self, seed: int) -> EnvStep:
        import textworld

        self.close()
        path = make_game(self.challenge, self.level, seed)
        infos = textworld.EnvInfos(admissible_commands=True, won=True, lost=True, score=True, max_score=True,
                                   objective=True)
        with warnings.catch_warnings():  # Jericho cannot score TextWorld games; TextWorld scores them itself
            warnings.simplefilter("ignore")
            self._env = textworld.start(path, request_infos=infos)
            state = self._env.reset()
        self._score, self._max = state["score"] or 0, max(state["max_score"] or 1, 1)
        return self._observe(state, 0.0)

    def _observe(self, state, reward: float) -> EnvStep:
        done = bool(state["won"] or state["lost"])
        admissible = tuple(state["admissible_commands"] or ()) or None
        return EnvStep(clean_feedback(state.feedback), reward, done, bool(state["won"]), None if done else admissible)

    def step(self, action: str) -> EnvStep:
        state, _, _ = self._env.step(action)
        score = state["score"] or 0
        reward, self._score = (score - self._score) / self._max, score
        return self._observe(state, reward)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

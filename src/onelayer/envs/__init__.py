"""Multi-turn text environments for agent tasks: a seeded reset, text actions, text observations.

    maze.py        procedurally generated grid mazes (no dependencies)
    textworld.py   TextWorld's generated games (coin collector, treasure hunter, cooking)
"""

from .base import Env, EnvStep
from .maze import MazeEnv

__all__ = ["Env", "EnvStep", "MazeEnv"]

"""``maze:SIZE``: find the exit of a SIZE x SIZE grid maze generated from the seed.

The maze is a perfect maze (one path between any two cells) carved by a seeded depth-first
search; start and exit are the two ends of a long path. The observation depends only on the
agent's cell: its position, the open directions, and where the exit lies relative to it, so
revisited cells give identical observations (GiGPO's anchor states). Reaching the exit gives
reward 1 and ends the episode.
"""

from __future__ import annotations

import random

from .base import Env, EnvStep

MOVES = {"north": (-1, 0), "south": (1, 0), "west": (0, -1), "east": (0, 1)}


def carve_maze(size: int, seed: int) -> dict[tuple[int, int], set[str]]:
    """Open directions of every cell of a perfect ``size`` x ``size`` maze."""
    rng = random.Random(seed)
    opening = {(r, c): set() for r in range(size) for c in range(size)}
    stack, seen = [(0, 0)], {(0, 0)}
    opposite = {"north": "south", "south": "north", "west": "east", "east": "west"}
    while stack:
        r, c = stack[-1]
        options = [(d, (r + dr, c + dc)) for d, (dr, dc) in MOVES.items()
                   if (r + dr, c + dc) in opening and (r + dr, c + dc) not in seen]
        if not options:
            stack.pop()
            continue
        direction, cell = rng.choice(options)
        opening[(r, c)].add(direction)
        opening[cell].add(opposite[direction])
        seen.add(cell)
        stack.append(cell)
    return opening


def _farthest(opening: dict, start: tuple[int, int]) -> tuple[tuple[int, int], int]:
    distance, frontier = {start: 0}, [start]
    while frontier:
        cell = frontier.pop(0)
        for d in sorted(opening[cell]):
            nxt = (cell[0] + MOVES[d][0], cell[1] + MOVES[d][1])
            if nxt not in distance:
                distance[nxt] = distance[cell] + 1
                frontier.append(nxt)
    far = max(sorted(distance), key=distance.get)
    return far, distance[far]


class MazeEnv(Env):
    def __init__(self, size: int = 4):
        if size < 2:
            raise ValueError(f"a maze needs size >= 2, got {size}")
        self.size = size
        self.goal = (f"You are in a {size} x {size} maze of rooms. Find the exit by moving north, south, east "
                     "or west; walls block some directions.")

    def reset(self, seed: int) -> EnvStep:
        self.opening = carve_maze(self.size, seed)
        rng = random.Random(seed + 1)
        corner = rng.choice(sorted(self.opening))
        self.position, _ = _farthest(self.opening, corner)
        self.exit, self.shortest = _farthest(self.opening, self.position)
        return self._observe(0.0)

    def _observe(self, reward: float) -> EnvStep:
        if self.position == self.exit:
            return EnvStep("You found the exit.", reward, True, True, ())
        r, c = self.position
        dr, dc = self.exit[0] - r, self.exit[1] - c
        where = " and ".join(f"{abs(n)} {word}" for n, word in (
            (dr, "south" if dr > 0 else "north"), (dc, "east" if dc > 0 else "west")) if n)
        exits = sorted(self.opening[self.position], key=list(MOVES).index)
        text = (f"You are in the room at row {r + 1}, column {c + 1}. Open directions: {', '.join(exits)}. "
                f"The exit is {where} of you.")
        return EnvStep(text, reward, False, False, tuple(f"go {d}" for d in exits))

    def step(self, action: str) -> EnvStep:
        direction = action.strip().lower().removeprefix("go ").strip()
        if direction in self.opening[self.position]:
            self.position = (self.position[0] + MOVES[direction][0], self.position[1] + MOVES[direction][1])
        return self._observe(1.0 if self.position == self.exit else 0.0)

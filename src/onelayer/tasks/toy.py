"""``toy:repeat``: a task with a dense reward that even a tiny random model learns in a few CPU steps.

The prompt asks for one character many times; the reward is the fraction of the completion's
non-space characters that are that character. It exists to test that training moves a model in
the direction its reward points, quickly and without real weights.
"""

from __future__ import annotations

from .base import Example, Score, Task


class RepeatTask(Task):
    def __init__(self, char: str = "a", size: int = 256):
        self.name, self.char, self.size = f"toy:repeat:{char}", char, int(size)

    def examples(self, split: str) -> list[Example]:
        offset = 0 if split == "train" else 1_000_000  # disjoint question numbers
        return [Example(f"{self.name}/{split}/{i}", f"Write the letter {self.char} many times. #{offset + i}",
                        self.char) for i in range(self.size)]

    def score(self, completion: str, example: Example) -> Score:
        chars = [c for c in completion if not c.isspace()]
        reward = sum(c == self.char for c in chars) / len(chars) if chars else 0.0
        return Score(reward, reward >= 0.5, completion[:20])

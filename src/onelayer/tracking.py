"""Experiment tracking (``--report-to tensorboard,wandb``): a run's rows sent where users look, besides its
JSON-lines logs, which stay the record onelayer itself reads.

One :class:`Tracker` per directory (a run, or a scan for its profile). Each step row of ``log.jsonl`` goes
out as ``train/KEY`` scalars at its step, each evaluation as ``eval/KEY``, a scan's profile as
``profile/contribution`` (and its interval) at each layer index, with the profile's table and figure.
Only numbers are sent (nested ones as ``outer/inner``; lists and text stay in the JSON logs).

- TensorBoard: event files in ``DIR/tensorboard``, so ``tensorboard --logdir SCAN`` shows every run of a scan
  and its profile. A resumed run's writer purges the steps it is about to redo, as its ``log.jsonl`` drops them.
- Weights & Biases: offline (``DIR/wandb``; ``wandb sync`` uploads it) unless ``WANDB_MODE`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from .errors import OneLayerError

REPORTERS = {"tensorboard": "pip install tensorboard (or onelayer[tensorboard])", "wandb": "pip install wandb"}


def parse_report_to(text: str) -> tuple[str, ...]:
    """The trackers named by ``--report-to`` (comma-separated; ``none`` or empty: none), each checked to be
    installed, in a one-line error naming the install command otherwise."""
    names = [t.strip().lower() for t in str(text or "").split(",") if t.strip()]
    if names in ([], ["none"]):
        return ()
    for name in names:
        if name not in REPORTERS:
            raise OneLayerError(f"unknown --report-to '{name}': use none, tensorboard, wandb or tensorboard,wandb")
        if importlib.util.find_spec(name) is None:
            raise OneLayerError(f"--report-to {name} needs the {name} package, which is not installed: "
                                f"{REPORTERS[name]}, or drop --report-to")
    return tuple(dict.fromkeys(names))


def scalars(row: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of a log row as ``{prefix/key: value}`` (nested dicts as ``prefix/outer/inner``;
    booleans as 0/1; the ``step`` itself, text, lists and non-finite values left out)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (bool, int, float)) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


class Tracker:
    """The trackers of one directory. ``resume_step``: the last step kept of an earlier attempt; later
    ones are dropped from the TensorBoard view (they are redone)."""

    def __init__(self, names: tuple[str, ...], directory: str | Path, config: dict | None = None,
                 resume_step: int = 0):
        self.directory, self.names = Path(directory), names
        self._tensorboard = self._wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge from the first step to redo: the eval at step 0 too when nothing was kept
            self._tensorboard = SummaryWriter(str(self.directory / "tensorboard"),
                                              purge_step=resume_step + 1 if resume_step else 0)
        if "wandb" in names:
            import wandb

            (self.directory / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(dir=str(self.directory), name=self.directory.name, config=config or {},
                                     mode=os.environ.get("WANDB_MODE", "offline"),
                                     project=os.environ.get("WANDB_PROJECT", "onelayer"), reinit="create_new")

    def log(self, section: str, row: dict, step: int) -> None:
        """Send the numbers of ``row`` as ``section/KEY`` at ``step``."""
        values = scalars(row, section)
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, step)
            self._tensorboard.flush()  # a killed run keeps what it logged, as its log.jsonl does
        if self._wandb is not None and values:
            self._wandb.log(values, step=step)

    def text(self, tag: str, text: str) -> None:
        """Send a markdown text (a table) under ``tag``."""
        if self._tensorboard is not None:
            self._tensorboard.add_text(tag, text, 0)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.summary[tag] = text

    def image(self, tag: str, png: str | Path) -> None:
        """Send a PNG figure under ``tag``."""
        if self._tensorboard is not None:
            from matplotlib.image import imread

            self._tensorboard.add_image(tag, imread(str(png))[..., :3], 0, dataformats="HWC")
            self._tensorboard.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(str(png))})

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def open_tracker(report_to: str, directory: str | Path, config: dict | None = None, resume_step: int = 0) -> Tracker:
    """A :class:`Tracker` for ``--report-to`` ``report_to`` (one that sends nothing for ``none``)."""
    return Tracker(parse_report_to(report_to), directory, config, resume_step)

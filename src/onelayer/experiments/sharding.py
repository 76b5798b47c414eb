"""Sharing a plan of runs over torchrun ranks, and doing one's share so that one broken run costs nothing else.

Under torchrun, the runs not yet done are dealt out over the ranks (rank r takes the r-th, r + world-th,
...), and every rank waits for the others at the end; a killed plan is resumed by rerunning it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..progress import RunBoard
from .rundir import NamedRun, run_dir, run_status, write_error


@dataclass(frozen=True)
class Shard:
    """This process's share of a plan: runs ``rank``, ``rank + world``, ... of it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process: rank 0 of 1)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def take(self, plan: list) -> list:
        return plan[self.rank::self.world]

    def device(self, requested: str) -> str:
        """One GPU per local rank, wrapping around when there are more processes than GPUs."""
        if requested or not torch.cuda.is_available() or self.world == 1:
            return requested
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"


def barrier(shard: Shard) -> None:
    """Wait for every rank (gloo over torchrun's rendezvous); a no-op for one process."""
    if shard.world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        # ranks that finish their share early wait here for hours-long runs of the others
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dist.barrier()


@dataclass(frozen=True)
class RunGroup:
    """Runs done together by one call of the work (concurrent layer variants)."""

    runs: tuple

    @property
    def name(self) -> str:
        return f"{self.runs[0].name} and {len(self.runs) - 1} more"


def for_each_run(runs: list, work: Callable[[NamedRun], object], error_files: Callable[[NamedRun], list[Path]],
                 label: str, progress: bool = True, done: int = 0,
                 summary: Callable[[], list[tuple[str, str]]] | None = None) -> None:
    """Call ``work`` on each run (or :class:`RunGroup`) on a :class:`~onelayer.progress.RunBoard` (runs done of
    all, ``done`` of them before this call; time left; what ``summary`` says so far). Its stale error files
    are removed when it starts; one that raises gets its error written to each of ``error_files(run)`` and
    the others go on."""
    sizes = [len(getattr(run, "runs", (run,))) for run in runs]
    with RunBoard(label, done + sum(sizes), done, progress, summary) as board:
        for run, size in zip(runs, sizes, strict=True):
            board.start(run.name)
            paths = error_files(run)
            for path in paths:
                path.unlink(missing_ok=True)
            failed = False
            try:
                work(run)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one broken run must not cost the others
                for path in paths:
                    write_error(path, err)
                failed = True
            for _ in range(size):
                board.finish(run.name, failed)


def run_share(runs: list, work: Callable, out: Path, shard: Shard, progress: bool, label: str,
              group_size: int = 1, summary: Callable[[], list[tuple[str, str]]] | None = None) -> None:
    """Deal the unfinished runs of ``runs`` out over the ranks and do this rank's share, one after the
    other (``work(run)``), or as :class:`RunGroup` s of up to ``group_size`` runs (``work(group)``);
    then wait for the other ranks. Dealing out only what is left keeps a resumed plan balanced."""
    barrier(shard)  # every rank must see the same finished runs before the rest is dealt out
    todo = [r for r in runs if run_status(out, r) != "done"]
    mine = shard.take(todo)
    done = len(runs) - len(todo) if shard.world == 1 else 0  # a rank's board shows its own share
    if group_size > 1 and mine:
        # as few groups as the size allows, of even sizes (30 runs at up to 22: 15 + 15, not 22 + 8)
        count = -(-len(mine) // group_size)
        size = -(-len(mine) // count)
        groups = [RunGroup(tuple(mine[i:i + size])) for i in range(0, len(mine), size)]
        for_each_run(groups, work, lambda g: [run_dir(out, r) / "error.txt" for r in g.runs], label, progress, done,
                     summary)
    else:
        for_each_run(mine, work, lambda r: [run_dir(out, r) / "error.txt"], label, progress, done, summary)
    barrier(shard)

"""Sharing a plan of runs over torchrun ranks, and doing one's share so that one broken run costs nothing else.

Under torchrun, the runs not yet done are dealt out over the ranks (rank r takes the r-th, r + world-th,
...), and every rank waits for the others at the end; a killed plan is resumed by rerunning it.

Runs are placed by size: a run of one layer is one rank's (several may share its GPU, trained together),
while a run that does not fit one GPU (full training of a large model, say) is trained by a *group* of
ranks together, sharded (:mod:`onelayer.training.distributed`): :func:`run_width` says how many it needs,
:func:`run_groups` forms the groups and deals those runs out over them, before the one-rank runs.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import OneLayerError
from ..layers import parse_layer_spec
from ..models import default_device
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
                 label: str, progress: bool = True, done: int = 0, agree: Callable[[bool], bool] | None = None,
                 summary: Callable[[], list[tuple[str, str]]] | None = None) -> None:
    """Call ``work`` on each run (or :class:`RunGroup`) on a :class:`~onelayer.progress.RunBoard` (runs done of
    all, ``done`` of them before this call; time left; what ``summary`` says so far). Its stale error files
    are removed when it starts; one that raises gets its error written to each of ``error_files(run)`` and
    the others go on. ``agree(ok)`` (processes training each run together): whether it went well on every one
    of them, after each run, so that all go on together."""
    sizes = [len(getattr(run, "runs", (run,))) for run in runs]
    with RunBoard(label, done + sum(sizes), done, progress, summary) as board:
        for run, size in zip(runs, sizes, strict=True):
            board.start(run.name)
            paths = error_files(run)
            for path in paths:
                path.unlink(missing_ok=True)
            ok = True
            try:
                work(run)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one broken run must not cost the others
                ok = False
                for path in paths:
                    write_error(path, err)
            if agree is not None and not agree(ok) and ok:
                ok = False
                for path in paths:
                    write_error(path, RuntimeError("another process training this run with this one failed: see its "
                                                   "output"))
            # a group's runs fail alone too, each leaving its error file
            board.finish(run.name, size if not ok else sum(path.is_file() for path in paths), size)


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
                     summary=summary)
    else:
        for_each_run(mine, work, lambda r: [run_dir(out, r) / "error.txt"], label, progress, done,
                     summary=summary)
    barrier(shard)


# how a scan or comparison makes a run fit that does not (see onelayer.memory.check_fits)
GROUP_OVER = "give each such run {n} GPUs (--group-gpus {n}, under torchrun with at least {n} processes)"


def trains_many_layers(recipe: TrainConfig, n_layers: int) -> bool:
    """Whether ``recipe`` trains more than one decoder layer (or embeddings, head, norm, LoRA adapters): a run
    that a group of GPUs may have to train together."""
    selection = parse_layer_spec(recipe.layers, n_layers)
    return bool(recipe.lora_rank or len(selection.layers) > 1 or selection.extras)


def run_width(recipe: TrainConfig, group_gpus: int, large: bool) -> int:
    """How many processes train ``recipe`` together: 1 for a run of one layer (not ``large``); else
    ``group_gpus`` when set, or the fewest GPUs its memory estimate fits (1 on a CPU or without the check).
    A run that fits no number of GPUs raises the estimate's one-line error."""
    if not large:
        return 1
    if group_gpus:
        return group_gpus
    device = torch.device(recipe.device) if recipe.device else default_device()
    if device.type != "cuda" or not recipe.memory_check:
        return 1
    from ..memory import NoEstimate, check_fits, fewest_gpus, prompt_tokens

    tokens, gpu = prompt_tokens(recipe), torch.cuda.get_device_properties(device).total_memory
    try:
        width = fewest_gpus(recipe, tokens, gpu)
    except NoEstimate:
        return 1  # the run's own check says so when it starts
    if width is None:
        check_fits(recipe, 1, tokens, gpu, GROUP_OVER)  # raises, naming what would make it fit
    return width or 1


def group_ranks(world: int, width: int, runs: int, prompts: int) -> list[tuple[int, ...]]:
    """Groups of ranks for ``runs`` runs of ``width`` processes each: as many groups as there are runs (at
    most ``world // width``), each as wide as the ranks allow (every GPU busy, rollouts spread wider) with
    the ``prompts`` of a step splitting evenly."""
    if width > world:
        raise OneLayerError(f"a run here needs {width} GPUs but there are {world} processes: start it under torchrun "
                            f"with --nproc_per_node {width} or more, or lower --group-gpus")
    count = max(1, min(world // width, runs))
    size = world // count
    while size > width and prompts % size:
        size -= 1
    if prompts % size:
        raise OneLayerError(f"--prompts-per-step {prompts} does not split over {size} GPUs: use a multiple of {size}")
    return [tuple(range(k * size, (k + 1) * size)) for k in range(count)]


def run_groups(runs: list, width: int, work: Callable, out: Path, shard: Shard, progress: bool, label: str,
               prompts: int, device: str, summary: Callable[[], list[tuple[str, str]]] | None = None) -> None:
    """Train ``runs`` (each needing ``width`` processes) by groups of ranks (:func:`group_ranks`): each group
    takes its share of the unfinished runs and trains them one after the other, all its ranks together
    (``work(run, world)``); then every rank waits. ``device``: this rank's device; ``summary``: as for
    :func:`for_each_run`."""
    from ..training.distributed import world_of

    barrier(shard)
    pending = [r for r in runs if run_status(out, r) != "done"]
    if pending:
        groups = group_ranks(shard.world, width, len(pending), prompts)
        worlds = [world_of(list(g), device) for g in groups]  # every rank makes every group, in one order
        if shard.rank == 0:
            print(f"{label}: " + "; ".join(f"{', '.join(r.name for r in pending[k::len(groups)])} on ranks "
                                           f"{g[0]}-{g[-1]}" for k, g in enumerate(groups)), file=sys.stderr)
        for k, world in enumerate(worlds):
            if world is not None:
                for_each_run(pending[k::len(groups)], lambda r, w=world: work(r, w),
                             lambda r, w=world: [run_dir(out, r) / "error.txt"] if w.is_main else [], label,
                             progress and world.is_main, agree=world.all, summary=summary)
    barrier(shard)

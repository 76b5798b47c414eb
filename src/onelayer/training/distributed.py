"""One run over several processes (one GPU each): trained tensors sharded with FSDP2, rollouts data-parallel.

A :class:`World` is the processes that train one run together (all of torchrun's for ``onelayer train``, a
group of a scan's ranks for a run that does not fit one GPU); the default world is one process and needs
no communication. Over N > 1 processes (:class:`ShardedModel`):

- each trained module (a decoder layer, an embedding/head/norm a spec names, a layer holding LoRA adapters)
  is a unit of PyTorch's FSDP2 (``fully_shard``, ``Shard(0)`` over a 1-D DeviceMesh): its float32 master
  weights, their gradients and AdamW's moments take 1/N of their size per process. Its forward all-gathers
  copies in the load dtype (bf16 on a GPU: ``MixedPrecisionPolicy``); its backward reduce-scatters float32
  gradients, *summed*: every process divides its loss by the whole batch's token and sequence counts
  (:class:`onelayer.algorithms.Normalizer` with global counts), so the sum is one process's gradient;
- frozen weights are not sharded: one copy per process in the load dtype, shared by rollouts and updates,
  with no gradient and no optimizer state;
- rollouts are data-parallel: each process generates and scores its contiguous share of the step's prompts
  (whole groups, so advantages need no communication) with the usual engine on the *rollout model*: the
  frozen modules plus plain copies of the trained modules in the load dtype, refreshed from the shards by
  FSDP's own all-gather once per step. The statistics of a step are computed over every process's rows, so a
  run logs what one process with the same global batch logs; only rank 0 writes (log, evaluations,
  checkpoints) and evaluates.

Checkpoints keep the one-process format (:mod:`onelayer.checkpoint`): the full trained tensors and the
optimizer state by parameter index, gathered through ``torch.distributed.checkpoint.state_dict``; a run
resumes on any number of processes, one included.
"""

from __future__ import annotations

import copy
import datetime
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import OPTIMIZER, checkpoint_tensors, find_checkpoint, write_checkpoint
from ..config import TrainConfig
from ..errors import OneLayerError
from ..models import decoder_layers, head_is_tied

# waits on the gloo group (rank 0 evaluating or writing a checkpoint, ranks done early in a scan) may be long
WAIT = datetime.timedelta(days=7)
# a collective of the step itself (all-gathers, reduce-scatters): rank 0's slowest work lies between barriers
COLLECTIVE = datetime.timedelta(hours=1)


def init_processes() -> None:
    """The default process group of torchrun's processes: gloo, for objects, counts and waits of any length
    (NCCL groups for the GPUs' collectives are made per world)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=WAIT)


@dataclass(frozen=True, eq=False)
class World:
    """The processes training one run together: ``rank`` of ``size``. The default is one process, whose
    collectives are the identity."""

    rank: int = 0
    size: int = 1
    device: str = ""  # this process's device; empty: the config's
    group: object = None  # collectives on the device: NCCL on CUDA, gloo on CPU
    control: object = None  # gloo: objects, counts, barriers
    mesh: object = None  # the 1-D DeviceMesh over ``group``

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def share(self, items: list) -> list:
        """This process's contiguous share of ``items`` (a step's prompts: groups are never split)."""
        if len(items) % self.size:
            raise OneLayerError(f"{len(items)} prompts per step do not split evenly over {self.size} processes: use a "
                                f"--prompts-per-step that is a multiple of {self.size}")
        n = len(items) // self.size
        return list(items[self.rank * n:(self.rank + 1) * n])

    def first(self, count: int) -> int:
        """Index of this process's first item when each process holds ``count`` of them."""
        return self.rank * count

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in rank order (the order of one process's batch)."""
        if self.size == 1:
            return list(items)
        parts: list = [None] * self.size
        dist.all_gather_object(parts, list(items), group=self.control)
        return [x for part in parts for x in part]

    def _reduce(self, value: float, op) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.control)
        return int(t.item()) if isinstance(value, int) else t.item()

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (so that all take the same branch)."""
        return bool(self._reduce(int(bool(flag)), dist.ReduceOp.MIN))

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.control)


SOLO = World()


def device_type(device: str) -> str:
    return torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")


def world_of(ranks: list[int], device: str) -> World | None:
    """The world of the processes ``ranks`` (their process groups and DeviceMesh); every process of the
    default group must call this, in the same order, for every world made. None for a process outside
    ``ranks``. ``device`` is this process's device."""
    from torch.distributed.device_mesh import DeviceMesh

    init_processes()
    kind = device_type(device)
    if kind == "cuda":  # NCCL's communicators bind to the current device
        torch.cuda.set_device(torch.device(device) if device else torch.device("cuda", 0))
    control = dist.new_group(ranks, backend="gloo", timeout=WAIT)
    group = dist.new_group(ranks, backend="nccl", timeout=COLLECTIVE) if kind == "cuda" else control
    rank = dist.get_rank()
    if rank not in ranks:
        return None
    mesh = DeviceMesh.from_group(group, kind)
    return World(ranks.index(rank), len(ranks), device, group, control, mesh)


def torchrun_world(requested: str = "") -> World:
    """All of torchrun's processes as the world of one run, each on the GPU of its local rank (or the CPU
    when ``requested`` says so or there is no GPU); one process outside torchrun. Made once per process."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return SOLO
    return _torchrun_world(device_type(requested))


@functools.cache
def _torchrun_world(kind: str) -> World:
    size = int(os.environ["WORLD_SIZE"])
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if kind == "cuda" else "cpu"
    if kind == "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", size)) > torch.cuda.device_count():
        raise OneLayerError(f"{os.environ.get('LOCAL_WORLD_SIZE')} processes per machine but {torch.cuda.device_count()} "
                            "GPUs: one run over several GPUs needs one process per GPU (--nproc_per_node)")
    return world_of(list(range(size)), device)


def check_sharded(config: TrainConfig, world: World) -> None:
    """Raise for what a run over several processes cannot do (before any weights load)."""
    if not world.sharded:
        return
    world.share(list(range(config.prompts_per_step)))  # the prompts split evenly, or a one-line error
    rows = config.prompts_per_step // world.size * config.group_size
    if rows % config.mini_batches:
        raise OneLayerError(f"--mini-batches {config.mini_batches} must divide each process's {rows} rollouts "
                            f"({config.prompts_per_step} prompts x {config.group_size} over {world.size} processes)")
    for flag, given in (("--compile-layers", config.compile_layers), ("--liger-kernels on", config.liger_kernels == "on")):
        if given:
            raise OneLayerError(f"{flag} does not work for a run over several GPUs yet: drop it")


# ---------------------------------------------------------------------------------------------- sharding


def trained_units(model: nn.Module, names: list[str]) -> list[str]:
    """Dotted paths of the modules that hold the trained tensors ``names``: their decoder layers, and the
    embedding, head or norm modules of the others (each becomes one FSDP unit)."""
    prefix, _ = decoder_layers(model)
    units: list[str] = []
    for name in names:
        if name.startswith(prefix + "."):
            path = f"{prefix}.{name[len(prefix) + 1:].split('.', 1)[0]}"
        else:
            path = name.rsplit(".", 1)[0] if "." in name else ""
        if not path:
            raise OneLayerError(f"trained tensor {name} belongs to no module to shard: train it on one GPU")
        if path not in units:
            units.append(path)
    tied = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    if head_is_tied(model) and any(id(model.get_submodule(p)) in tied for p in units):
        raise OneLayerError("this model's output head is its input embedding (tied): a run over several GPUs cannot "
                            "shard it yet; leave embed and head out of --layers, or train on one GPU")
    return units


def _clone_along(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow twin of ``module`` whose submodules at the dotted paths of ``replacements`` are those
    modules; everything else (parameters, buffers, other submodules) is shared. Its hook and child tables
    are its own, so hooks put on the twin (FSDP's) do not run on ``module``."""
    twin = copy.copy(module)
    twin.__dict__ = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    below: dict[str, dict[str, nn.Module]] = {}
    for path, new in replacements.items():
        head, _, rest = path.partition(".")
        below.setdefault(head, {})[rest] = new
    for head, sub in below.items():
        twin._modules[head] = sub[""] if "" in sub else _clone_along(module._modules[head], sub)
    return twin


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[name] = module


def _sum_gradients(module) -> None:
    # each process's loss is already a share of the whole batch's: gradients add up, they are not averaged
    # (SUM reductions also avoid NCCL's PreMulSum, which gloo lacks)
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ShardedModel:
    """A model's trained modules sharded over ``world`` (FSDP2) for updates, next to plain copies of them in
    the load dtype for rollouts.

    ``model`` itself becomes the rollout model: its frozen modules as they were, each trained module
    replaced by its copy (no hooks, no collectives: the fast engine and its CUDA graphs work as for one
    process). :attr:`learner` is the same model for updates: the same frozen module objects, the sharded
    trained modules under a root FSDP module. :attr:`groups` are ``groups`` (optimizer groups of the
    trained tensors, with ``names``) over the sharded parameters.
    """

    def __init__(self, model: nn.Module, groups: list[dict], world: World, dtype: torch.dtype):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.model, self.world, self.dtype = model, world, dtype
        names = [n for g in groups for n in g["names"]]
        trained = {id(p) for g in groups for p in g["params"]}
        self.units = trained_units(model, names)
        policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                      reduce_dtype=torch.float32)
        self.twins: dict[str, nn.Module] = {}
        self.trained_in: dict[str, set[str]] = {}
        for path in self.units:
            unit = model.get_submodule(path)
            frozen = [p for p in unit.parameters() if id(p) not in trained]
            # the rollout copy shares the unit's frozen tensors (LoRA's base weights) and copies the trained ones
            twin = copy.deepcopy(unit, {id(p): p for p in frozen})
            for p in twin.parameters():
                p.requires_grad_(False)
            self.trained_in[path] = {n for n, p in unit.named_parameters() if id(p) in trained}
            originals = [p for p in unit.parameters() if id(p) in trained]
            for p in originals:
                p.data = p.data.float()  # float32 master weights (see setup.fp32_trained_tensors), then sharded
            fully_shard(unit, mesh=world.mesh, mp_policy=policy, reshard_after_forward=True,
                        ignored_params=set(frozen) or None)
            _sum_gradients(unit)
            for p in originals:  # the unit holds its shards now; the caller's groups still name the full tensors
                p.data = p.data.new_empty(0)
            self.twins[path] = twin
        self.learner = _clone_along(model, {p: model.get_submodule(p) for p in self.units})
        for path, twin in self.twins.items():
            _set_submodule(model, path, twin)
        base = model.base_model_prefix
        if any(p.startswith(base + ".") for p in self.units):
            # one root over every unit under the backbone: FSDP orders and overlaps their all-gathers
            root = self.learner.get_submodule(base)
            fully_shard(root, mesh=world.mesh, mp_policy=policy,
                        ignored_params={p for p in root.parameters() if not p.requires_grad} or None)
            _sum_gradients(root)
        params = dict(self.learner.named_parameters())
        self.groups = [{**g, "params": [params[n] for n in g["names"]]} for g in groups]

    @property
    def description(self) -> str:
        """What was sharded how, for the log and the results."""
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"fsdp2: {len(self.units)} trained modules' float32 weights, gradients and AdamW state in "
                f"{self.world.size} shards; frozen weights replicated in {dtype}; rollouts data-parallel on {dtype} "
                "copies")

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the trained weights from the shards into the rollout copies (every process calls it)."""
        for path, twin in self.twins.items():
            unit = self.learner.get_submodule(path)
            unit.unshard()  # FSDP's all-gather, in the compute dtype
            targets = dict(twin.named_parameters())
            for name, param in unit.named_parameters():
                if name in self.trained_in[path]:
                    targets[name].copy_(param)
            unit.reshard()

    def _order(self, optimizer: torch.optim.Optimizer) -> list[str]:
        return [n for g in optimizer.param_groups for n in g["names"]]

    def save(self, directory: Path, names: list[str], meta: dict, optimizer: torch.optim.Optimizer | None) -> None:
        """Write a checkpoint of the full trained tensors and optimizer state (none when ``optimizer`` is None;
        rank 0 writes, every process calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        params = dict(self.learner.named_parameters())
        tensors = {}
        for name in names:
            full = params[name].detach().full_tensor()
            if self.world.is_main:
                tensors[name] = full.cpu()
        state = None
        if optimizer is not None:  # every process takes part in gathering it; rank 0 receives it
            state = get_optimizer_state_dict(self.learner, optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.world.is_main:
            write_checkpoint(directory, tensors, meta, None if state is None else by_index(state, self._order(optimizer)))
        self.world.barrier()  # nobody starts the next step's collectives while rank 0 writes

    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> bool:
        """Load a checkpoint (of any number of processes) into the shards and the optimizer; rank 0 reads it
        and FSDP's state-dict functions scatter it. False when the checkpoint has no optimizer state (dropped by
        ``--keep-optimizer none``)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        main = self.world.is_main
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        tensors = checkpoint_tensors(self.learner, path)[0] if main else {}
        set_model_state_dict(self.learner, dict(tensors), options=options)
        found = find_checkpoint(path)
        restored = found is not None and (found / OPTIMIZER).is_file()
        if restored:
            state = by_name(torch.load(found / OPTIMIZER, map_location="cpu", weights_only=True),
                            self._order(optimizer)) if main else {}
            set_optimizer_state_dict(self.learner, optimizer, state,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.refresh()
        return restored

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """Bytes of optimizer state over every process (each process's step counters counted once), and on the
        fullest process."""
        from torch.distributed.tensor import DTensor

        tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        shards = sum(t.to_local().nbytes for t in tensors if isinstance(t, DTensor))
        counters = sum(t.nbytes for t in tensors if not isinstance(t, DTensor))
        return self.world.sum(shards) + counters, self.world.max(shards + counters)

    def trained_bytes(self) -> int:
        """Bytes of this process's float32 shards of the trained tensors (the fullest process's)."""
        return self.world.max(sum(_local(p).nbytes for g in self.groups for p in g["params"]))


def by_index(state: dict, order: list[str]) -> dict:
    """A full optimizer state dict keyed by parameter name (``torch.distributed.checkpoint``'s) as
    ``Optimizer.state_dict()`` keys it: by position over the groups, the one-process checkpoint format."""
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def by_name(state: dict, order: list[str]) -> dict:
    """The inverse of :func:`by_index`."""
    return {"state": {order[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]}

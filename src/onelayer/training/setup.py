"""Setting up a run: its model and precision, what it trains and with which optimizer, and where it resumes.

:func:`open_run` composes the parts into a :class:`Run`, the state one run carries through its steps;
:func:`check_run` does every check that needs no weights, so a bad config fails before loading.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import add_lora
from ..algorithms import Algorithm, get_algorithm
from ..checkpoint import apply_checkpoint, find_checkpoint, load_optimizer_state, read_meta
from ..config import TrainConfig, check_out_dir, recipe_difference, to_dict
from ..errors import OneLayerError
from ..jsonl import gz_twin, read_jsonl, resolve, write_jsonl
from ..layers import LayerSelection, apply_selection, lr_scales_from_profile, select_layers
from ..memory import TRAIN_OVER, NoEstimate, available_host_bytes, check_fits, check_fits_host, prompt_tokens
from ..models import default_device, load_model, load_tokenizer
from ..profile import read_profile
from ..tasks import AgentTask, Example, Task, get_task
from ..tracking import Tracker, open_tracker
from .distributed import SOLO, ShardedModel, World, check_sharded

# ------------------------------------------------------------------------------------------ model, precision


def model_for(config: TrainConfig, model: nn.Module | None, tokenizer) -> tuple[torch.device, nn.Module, object]:
    """The device, model and tokenizer of a run: those given, else loaded as ``config`` says (after
    seeding, so that anything initialised at load time is reproducible)."""
    device = torch.device(config.device) if config.device else default_device()
    torch.manual_seed(config.seed)
    if model is None:
        model = load_model(config.model, device, config.dtype, config.attention)
    return device, model, tokenizer if tokenizer is not None else load_tokenizer(config.model)


def fp32_trained_tensors(groups: list[dict]) -> None:
    """Keep trained tensors in float32 while frozen ones stay in the load dtype.

    Adam steps of ~1e-6 vanish when added to bf16 weights (8 mantissa bits), so a bf16 model would
    barely train; float32 copies of the trained tensors only cost little (one layer: ~1/L of the model).
    """
    for group in groups:
        for param in group["params"]:
            if param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()


def peak_memory(device: torch.device) -> int:
    """Peak CUDA memory since the last call (0 elsewhere); resets the counter."""
    if device.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def total_memory(device: torch.device) -> float:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else float("inf")


# ------------------------------------------------------------------------------------- trained tensors, optimizer


@dataclass
class Trainable:
    """What a run trains: the selected layers, their parameter groups (float32), and how their learning
    rates were set."""

    selection: LayerSelection
    groups: list[dict]  # optimizer parameter groups: params, names, layer, lr_scale, weight_decay
    adapter: dict | None  # the LoRA adapter's description, if LoRA
    lr_scales: dict
    lr_rule: str

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g["names"]]

    @property
    def parameters(self) -> int:
        return sum(p.numel() for g in self.groups for p in g["params"])


def trainable(config: TrainConfig, model: nn.Module, fp32: bool = True) -> Trainable:
    """Make ``config``'s layers of ``model`` trainable (float32 copies unless not ``fp32``: a sharded run
    converts them module by module; LoRA adapters with ``lora_rank``) and freeze everything else."""
    guide = read_profile(config.lr_from) if config.lr_from else None
    selection = select_layers(model, config.layers)
    if selection.is_empty:
        raise OneLayerError(f"layer spec '{config.layers}' selects nothing to train: name at least one layer")
    for note in selection.notes:
        print(f"layer selection: {note}", file=sys.stderr)
    lr_scales, lr_rule = lr_scales_from_profile(guide, selection.layers) if guide else ({}, "")
    if config.lora_rank:
        groups, adapter = add_lora(model, selection, config.lora_rank, config.lora_alpha, config.weight_decay, lr_scales)
    else:
        groups, adapter = apply_selection(model, selection, config.weight_decay, lr_scales), None
    if fp32:
        fp32_trained_tensors(groups)
    return Trainable(selection, groups, adapter, lr_scales, lr_rule)


def make_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


# ------------------------------------------------------------------------------------------------- resume


def started(out: Path) -> bool:
    """Whether a run directory holds an experiment: a checkpoint or a logged step. A run that failed
    before its first step (a bad task file, say) left only its ``config.json``; it is no experiment and
    does not block a corrected command."""
    return find_checkpoint(out) is not None or bool(read_jsonl(out / "log.jsonl"))


def _check_resumable(out: Path, config: TrainConfig) -> None:
    saved_path = out / "config.json"
    if not saved_path.is_file() or not started(out):
        return
    differs = recipe_difference(json.loads(saved_path.read_text()), config)
    if differs:
        raise OneLayerError(f"{out} holds a run with another {differs}: "
                            "pass another --out, or delete that directory to start over")


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint: they are about to be redone. A log kept compressed (a
    run restored from committed results) is rewritten plain, where the run appends, and its ``.gz`` removed,
    so that no stale twin is left behind."""
    found = resolve(path)
    if found.is_file():
        write_jsonl(path, [row for row in read_jsonl(found) if row["step"] <= last_step])
        gz_twin(path).unlink(missing_ok=True)  # read already, or shadowed by the plain log


def resume(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
           sharded: ShardedModel | None = None, world: World = SOLO) -> tuple[int, list[dict]]:
    """Load the run directory's checkpoint, if any, into ``model`` (or the shards of ``sharded``) and
    ``optimizer`` (saying so, in one line); drop the log lines of steps after it (they are redone). ``steps``
    is the run's length. Returns the first step to do and the evaluations kept."""
    start = 0
    if find_checkpoint(out) is not None:
        meta = read_meta(out)
        if sharded is not None:
            restored = sharded.load(out, optimizer)
        else:
            apply_checkpoint(model, out)
            restored = load_optimizer_state(optimizer, out)
        start = int(meta["step"])
        if world.is_main:
            if start >= steps:
                print(f"{out} has trained {start} of {steps} steps already: nothing left to train", file=sys.stderr)
            else:
                print(f"resuming {out} from step {start} of {steps}"
                      + ("" if restored else " without optimizer state (dropped by --keep-optimizer none): Adam's "
                         "moment estimates restart"), file=sys.stderr)
    if world.is_main:
        _truncate_log(out / "log.jsonl", start)
        _truncate_log(out / "eval.jsonl", start if start else -1)
    world.barrier()
    return start, read_jsonl(out / "eval.jsonl") if start else []


# --------------------------------------------------------------------------------------------------- the run


class PromptSampler:
    """Epoch-wise shuffles of the train split; the batch of a step depends only on (seed, step)."""

    def __init__(self, examples: list[Example], seed: int):
        self.examples, self.seed = examples, seed

    def batch(self, step: int, size: int) -> list[Example]:
        n, out = len(self.examples), []
        for position in range(step * size, (step + 1) * size):
            epoch, index = divmod(position, n)
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.examples[order[index]])
        return out


@dataclass
class TrainResult:
    out: Path
    steps_done: int
    selection: LayerSelection
    final_eval: dict | None
    costs: dict  # trainable_parameters, optimizer_state_bytes, peak_memory_bytes (CUDA only, this process)


@dataclass
class Run:
    """One run's state around a model: what it trains and how, where it writes, where it resumes."""

    config: TrainConfig
    task: Task
    algorithm: Algorithm
    selection: LayerSelection
    optimizer: torch.optim.Optimizer
    trained: list[str]  # names of the trained tensors
    initial: dict[str, torch.Tensor]  # the initial policy's trained tensors (KL reference), if beta
    meta: dict  # checkpoint metadata without the step
    sampler: PromptSampler
    start: int  # first step to do (after a resume)
    trainable: int
    tracker: Tracker  # --report-to: where step rows and evaluations go besides the JSON logs
    bad_steps: int = 0
    flat_steps: int = 0  # consecutive steps in which (nearly) every group's rewards were all equal
    warned_flat: bool = False
    peak_memory: int = 0
    final_eval: dict | None = None
    world: World = SOLO  # the processes training this run together
    sharded: ShardedModel | None = None  # its sharded trained modules, over more than one process

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def aggregation(self) -> str:
        return self.config.loss_aggregation or self.algorithm.default_aggregation

    @property
    def processes(self) -> dict:
        """How many processes trained the run and what was sharded how (every log line and result says)."""
        return {"world_size": self.world.size, "sharding": self.sharded.description if self.sharded else "none"}

    def result(self, device: torch.device) -> TrainResult:
        if self.sharded:
            state_bytes, state_per_gpu = self.sharded.state_bytes(self.optimizer)
            trained_per_gpu = self.sharded.trained_bytes()
        else:
            state_bytes = state_per_gpu = sum(t.nbytes for state in self.optimizer.state.values()
                                              for t in state.values() if torch.is_tensor(t))
            trained_per_gpu = sum(p.nbytes for g in self.optimizer.param_groups for p in g["params"])
        peak = self.world.max(max(self.peak_memory, peak_memory(device))) if device.type == "cuda" else None
        # per GPU: of the fullest process (what onelayer.memory estimates)
        costs = {"trainable_parameters": self.trainable, "optimizer_state_bytes": state_bytes,
                 "optimizer_state_bytes_per_gpu": state_per_gpu, "trained_bytes_per_gpu": trained_per_gpu,
                 "peak_memory_bytes": peak, **self.processes}
        return TrainResult(self.out, self.config.steps, self.selection, self.final_eval, costs)


def check_run(config: TrainConfig, task: Task | None = None, world: World = SOLO) -> tuple[Task, Algorithm]:
    """Validate ``config`` (for ``world``'s processes) and its run directory, and find its task (``task`` when
    given: runs that share one) and algorithm (before any weights load)."""
    config.validate()
    check_sharded(config, world)
    check_out_dir(config.out)
    _check_resumable(Path(config.out), config)
    algorithm = get_algorithm(config.algo)
    task = task or get_task(config.task, config.task_options)
    if not task.examples("train"):
        raise OneLayerError(f"the train split of {task.name} is empty (no examples, or all of them are in its eval "
                            "split): give it more examples or a smaller eval split (reasoning-gym tasks: --task-option "
                            "eval_size=N); eval-only tasks such as code:humaneval cannot be trained on")
    agentic = isinstance(task, AgentTask)
    if algorithm.advantages is None and not agentic:
        raise OneLayerError(f"--algo {algorithm.name} needs a multi-turn agent task (tw:coin_collector, maze:4, ...), "
                            f"not {task.name}: use grpo or dr_grpo")
    if agentic and config.mini_batches > 1:
        raise OneLayerError("agent tasks have a varying number of turns per step: use --mini-batches 1")
    return task, algorithm


def out_of_memory(doing: str, knob: str, now: int, rows: int, resumes: str) -> OneLayerError:
    """The one-line error for running out of GPU memory ``doing`` something ("updating step 3", "generating
    ..."): the knob that shrinks that phase (``now`` its value; the phase has ``rows`` rows, or variants, so a
    suggestion is at most half of those) and where a rerun with the same ``--out`` resumes (``resumes``). Every
    knob it names is resumable: the update is the same at any micro-batch size, rollouts in smaller batches are
    another draw from the same policy, and a scan's runs resume in any group."""
    fix = (f"rerun with a smaller {knob} (now {now}, e.g. {max(1, min(now, rows) // 2)}) and the same --out"
           if min(now, rows) > 1 else
           f"{knob} is 1 already: train fewer layers or spread the run over GPUs, with the same --out")
    return OneLayerError(f"out of GPU memory {doing}: {fix}: {resumes} (onelayer plan shows the estimate)")


def run_out_of_memory(config: TrainConfig, doing: str, phase: str) -> OneLayerError:
    """:func:`out_of_memory` for one run in ``phase`` ("update", "rollouts" or "evaluation"): that phase's knob,
    and the run's last checkpoint."""
    if phase == "update":
        knob, now = "--micro-batch-size", config.micro_batch_size
    else:
        knob, now = "--generation-batch-size", config.sampling.generation_batch_size
    rows = config.eval_n if phase == "evaluation" else config.prompts_per_step * config.group_size
    saved = find_checkpoint(config.out)
    resumes = (f"it resumes from its checkpoint at step {read_meta(saved)['step']}" if saved is not None
               else "nothing was checkpointed yet")
    return out_of_memory(doing, knob, now, rows, resumes)


def check_memory(config: TrainConfig, world: World = SOLO, task: Task | None = None, over: str = TRAIN_OVER) -> None:
    """Fail before loading, with the number of GPUs or the flag that would make it fit, when ``config`` does
    not fit its GPUs by the estimate of :mod:`onelayer.memory`, or on a CPU when what it holds whatever its batch
    exceeds the available memory (``--no-memory-check`` skips both)."""
    device = torch.device(config.device) if config.device else default_device()
    if not config.memory_check:
        return
    if device.type == "cuda":
        try:
            check_fits(config, world.size, prompt_tokens(config, task), total_memory(device), over)
        except NoEstimate as err:
            if world.is_main:
                print(f"warning: {err}", file=sys.stderr)
    elif device.type == "cpu" and (available := available_host_bytes()) is not None:
        # the processes of one machine each hold the frozen weights
        check_fits_host(config, available / int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def open_run(config: TrainConfig, model: nn.Module, task: Task, algorithm: Algorithm, world: World = SOLO) -> Run:
    """Make ``config``'s layers of ``model`` trainable, build their optimizer, and resume from the run
    directory's checkpoint if it has one. Writes ``config.json``. Over several processes (``world``) the
    trained modules are sharded and ``model`` becomes the rollout model (:class:`ShardedModel`; the run's
    ``sharded.learner`` is the model to update)."""
    dtype = next(model.parameters()).dtype  # the load dtype, before trained tensors go float32
    parts = trainable(config, model, fp32=not world.sharded)
    count = parts.parameters  # before sharding frees the full tensors the groups name
    sharded = ShardedModel(model, parts.groups, world, dtype) if world.sharded else None
    learner = sharded.learner if sharded else model
    optimizer = make_optimizer(sharded.groups if sharded else parts.groups, config)
    # the KL reference is the run's initial policy: captured before a resume loads later weights
    initial = {n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad} if config.beta else {}
    out = Path(config.out)
    world.barrier()  # every process has read the old config.json (check_run) before it is written again
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    start, evals = resume(out, learner, optimizer, config.steps, sharded, world)
    meta = {"base_model": config.model, "layers_spec": config.layers, "layers": list(parts.selection.layers),
            "extras": list(parts.selection.extras), "trainable_parameters": count,
            **({"adapter": parts.adapter} if parts.adapter else {}),
            "selection_notes": list(parts.selection.notes), "lr_rule": parts.lr_rule,
            "lr_scales": {str(k): v for k, v in parts.lr_scales.items()}, "config": to_dict(config)}
    return Run(config, task, algorithm, parts.selection, optimizer, parts.names, initial, meta,
               PromptSampler(task.examples("train"), config.seed), start, count,
               # other processes of a sharded run leave the tracking to rank 0, as they leave it the logs
               open_tracker(config.report_to if world.is_main else "none", out, to_dict(config), start),
               # a resumed run keeps its last evaluation when it was made at the checkpoint's step
               final_eval=evals[-1] if evals and evals[-1]["step"] == start else None, world=world, sharded=sharded)

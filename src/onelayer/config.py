"""Typed configuration shared by the Python API and the CLI (which builds its flags from these).

A field's meaning is written once, in its metadata (:func:`option`), and everything else is derived
from it: the CLI flag, its help and its section; the values it accepts; whether a run may be resumed
with another value (``resumable``: it changes how, not what, is computed); whether layer variants
trained together must agree on it (``shared``); and whether it is part of what a run computes
(``science``; a finished run with the same science can be reused instead of repeated). Adding a field
is one line here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from .errors import OneLayerError
from .tracking import parse_report_to

ENGINES = ("auto", "fast", "plain")
DTYPES = ("auto", "bf16", "fp32")

# CLI sections, in the order --help lists them
GROUPS = ("model", "task", "layers", "algorithm", "optimisation", "batch", "rollouts", "speed", "evaluation",
          "run", "scan", "compare", "ood", "predict")


def option(default=MISSING, *, help: str, group: str, factory=MISSING, choices: tuple = (), resumable: bool = False,
           shared: bool = False, science: bool = True):
    """A config field and what it means (see the module docstring)."""
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    metadata = {"help": help, "group": group, "choices": choices, "resumable": resumable, "shared": shared,
                "science": science}
    return field(default=default, default_factory=factory, metadata=metadata)


def nested(cls, **defaults):
    """A field holding another config dataclass (its fields keep their own metadata)."""
    return field(default_factory=(lambda: cls(**defaults)) if defaults else cls)


def config_fields(cls, prefix: str = "") -> Iterator[tuple[str, Field]]:
    """Every leaf field of config dataclass ``cls`` as (dotted name, field), nested configs flattened."""
    for f in fields(cls):
        if f.default_factory is not MISSING and is_dataclass(sample := f.default_factory()):
            yield from config_fields(type(sample), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def names_where(cls, key: str) -> frozenset[str]:
    """Dotted names of the fields of ``cls`` whose metadata ``key`` is true (e.g. ``resumable``)."""
    return frozenset(name for name, f in config_fields(cls) if f.metadata.get(key))


def flat(data: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"sampling.top_p": ..., ...}`` (dict-valued options stay whole)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "task_options":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def flag(name: str, repeatable: bool = False) -> str:
    """The CLI flag of a (dotted) field name: ``sampling.max_new_tokens`` -> ``--max-new-tokens``; a dict-valued
    field (``repeatable``) takes one KEY=VALUE per flag, named in the singular: ``task_options`` -> ``--task-option``."""
    leaf = name.rsplit(".", 1)[-1]
    if repeatable and leaf.endswith("s"):
        leaf = leaf[:-1]
    return "--" + leaf.replace("_", "-")


def check_choices(config) -> None:
    """Raise a one-line error for any field whose value is not one of its ``choices``."""
    values = flat(asdict(config))
    for name, f in config_fields(type(config)):
        choices = f.metadata.get("choices")
        if choices and values[name] not in choices:
            raise OneLayerError(f"unknown {flag(name)} '{values[name]}': use {', '.join(choices)}")


def check_positive(config, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise OneLayerError(f"{flag(name)} must be >= 1, got {getattr(config, name)}")


def check_nonnegative(config, names: tuple[str, ...]) -> None:
    for name in names:
        if not getattr(config, name) >= 0:  # NaN too
            raise OneLayerError(f"{flag(name)} must be >= 0, got {getattr(config, name)}")


def check_out_dir(path: str | Path, flag: str = "--out") -> None:
    """Raise a one-line error when ``path`` cannot be (or become) a writable directory: it is a file, a
    file stands where one of its parents should be, or the nearest existing parent is not writable.
    Cheap, so commands check it before loading a model rather than fail after."""
    target = Path(path).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == target and not target.is_dir():
        raise OneLayerError(f"{flag} {path} is a file, not a directory: pass a directory (it is created if missing)")
    if not existing.is_dir():
        raise OneLayerError(f"{flag} {path} cannot be created: {existing} is a file; pass another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OneLayerError(f"{flag} {path} cannot be written: {existing} is not writable; pass another {flag}")


@dataclass
class SamplingConfig:
    max_new_tokens: int = option(256, group="rollouts", shared=True, help="completion length cap in tokens")
    temperature: float = option(1.0, group="rollouts", shared=True, help="sampling temperature; 0 = greedy")
    top_p: float = option(1.0, group="rollouts", shared=True, help="nucleus sampling mass")
    # a memory knob (the out-of-memory advice names it): a killed run may resume with a smaller one, whose rollouts
    # are another draw from the same policy, as with another --engine
    generation_batch_size: int = option(256, group="rollouts", resumable=True, help="rows per generate() call")
    engine: str = option("auto", group="speed", choices=ENGINES, resumable=True, help=(
        "rollout engine: auto (fast on CUDA where the architecture allows), fast (static KV cache, CUDA graphs on "
        "CUDA) or plain (transformers generate)"))
    compile_decode: bool = option(False, group="speed", resumable=True, shared=True, help=(
        "fuse the fast engine's decode step with torch.compile: on an H100, SmolLM2 generation 1.45x faster at "
        "batch 1024, after 30-40 s of compilation per batch shape (cached on disk); pays off in long runs"))
    fused_kernels: bool = option(True, group="speed", resumable=True, shared=True, help=(
        "the fast engine's decode attention and sampling as Triton kernels on CUDA GPUs (sm80+, Triton installed); "
        "--no-fused-kernels keeps torch ops"))

    def validate(self) -> None:
        check_choices(self)
        check_positive(self, ("generation_batch_size",))


@dataclass
class TrainConfig:
    """One RL run: which model, task, algorithm and layers, for how long, written where."""

    model: str = option("smollm2", group="model", shared=True, help="hub id, local dir, .gguf file or 'smollm2'")
    task: str = option("rg:basic_arithmetic", group="task", shared=True, help="task name, e.g. rg:basic_arithmetic")
    task_options: dict = option(group="task", factory=dict, shared=True, help="task option KEY=VALUE (repeatable)")
    algo: str = option("grpo", group="algorithm", help="grpo, dr_grpo or gigpo (agent tasks)")
    layers: str = option("all", group="layers", help="layer spec: all, 14, 3,7, 10-19, middle:4, ...")
    out: str = option("runs/onelayer", group="run", resumable=True, science=False,
                      help="run directory (resumed if it exists)")
    steps: int = option(200, group="batch", resumable=True, help="RL steps (rollout batches)")
    prompts_per_step: int = option(32, group="batch", shared=True, help="prompts per step")
    group_size: int = option(8, group="batch", shared=True, help="completions per prompt (G)")
    lr: float = option(1e-6, group="optimisation", help="peak learning rate (tune it for full training)")
    lr_from: str = option("", group="layers", help=(
        "scan dir or profile.json: per-layer learning rates lr * max(C,0) / mean(max(C,0)) over the trained layers"))
    lora_rank: int = option(0, group="layers", help=(
        "train LoRA adapters of this rank on the selected layers' linear maps instead of the layers; 0 = off"))
    lora_alpha: float = option(32.0, group="layers", help="LoRA alpha (the update is scaled by alpha / rank)")
    lr_schedule: str = option("constant", group="optimisation", choices=("constant", "cosine"),
                              help="constant or cosine, after warm-up")
    warmup_steps: int = option(0, group="optimisation", help="linear warm-up steps")
    weight_decay: float = option(0.0, group="optimisation", help="AdamW weight decay (matrices only)")
    max_grad_norm: float = option(1.0, group="optimisation", help="gradient clipping norm; 0 = off")
    micro_batch_size: int = option(32, group="batch", resumable=True, help=(
        "rows per forward/backward, accumulated: the gradient is the whole batch's whatever the size"))
    compile_layers: bool = option(False, group="speed", resumable=True, help=(
        "update through torch.compile'd decoder layers (fused norms, rotary, activations): faster updates on a GPU "
        "after about a minute of compilation per process"))
    liger_kernels: str = option("auto", group="speed", resumable=True, choices=("auto", "on", "off"), help=(
        "update with Liger Kernel's fused RMSNorm, SwiGLU and rotary kernels (Llama, Mistral, Qwen2, Qwen3): "
        "auto = on a CUDA GPU with liger-kernel installed (a Linux dependency), for a supported model, on one GPU, "
        "without --compile-layers; on = always (or a one-line error why not)"))
    mini_batches: int = option(1, group="algorithm", help="optimizer steps per PPO epoch")
    ppo_epochs: int = option(1, group="algorithm", help="passes over each rollout batch")
    clip_low: float = option(0.2, group="algorithm", help="PPO clip epsilon below 1")
    clip_high: float = option(0.2, group="algorithm", help="PPO clip epsilon above 1")
    beta: float = option(0.0, group="algorithm", help="KL weight to the initial policy (k3)")
    gamma: float = option(0.95, group="algorithm", help="GiGPO: discount of step returns")
    step_weight: float = option(1.0, group="algorithm", help="GiGPO: weight omega of step advantages")
    loss_aggregation: str = option("", group="algorithm", help=(
        "seq-mean-token-mean, token-mean or seq-mean-token-sum-norm; empty = the algorithm's"))
    sampling: SamplingConfig = nested(SamplingConfig)
    eval_every: int = option(0, group="evaluation", resumable=True, science=False,
                             help="evaluate every N steps (and at 0 and the end); 0 = off")
    eval_at_start: bool = option(True, group="evaluation", resumable=True, science=False,
                                 help="with --eval-every, also evaluate before step 1")
    eval_n: int = option(200, group="evaluation", resumable=True, shared=True,
                         help="eval examples for periodic evaluation")
    save_every: int = option(10, group="run", resumable=True, science=False,
                             help="checkpoint every N steps (and at the end); 0 = only at the end")
    keep_optimizer: str = option("last", group="run", choices=("last", "none"), resumable=True, science=False, help=(
        "optimizer state (Adam moments: twice the trained weights' size) in the checkpoint: last = the latest "
        "checkpoint's, none = dropped once the run finishes (a finished run continued to more --steps then "
        "restarts Adam's moments)"))
    seed: int = option(0, group="run", help="seed of data order, sampling and init")
    report_to: str = option("none", group="run", resumable=True, science=False, help=(
        "experiment trackers that get every step row, evaluation and scan profile besides the JSON logs: none, "
        "tensorboard (OUT/tensorboard), wandb (offline, OUT/wandb) or tensorboard,wandb"))
    memory_check: bool = option(True, group="run", resumable=True, science=False, help=(
        "refuse, before loading, a run whose estimated memory per GPU (onelayer plan) exceeds the GPU's"))
    dtype: str = option("auto", group="model", choices=DTYPES, shared=True,
                        help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    device: str = option("", group="model", resumable=True, shared=True, science=False,
                         help="cuda, cpu, cuda:1; empty = cuda if available")
    attention: str = option("", group="model", shared=True, help=(
        "attention implementation: sdpa, eager, flash_attention_2; empty = transformers' default"))

    def validate(self) -> None:
        check_choices(self)
        check_positive(self, ("steps", "prompts_per_step", "group_size", "micro_batch_size", "mini_batches",
                              "ppo_epochs", "eval_n"))
        check_nonnegative(self, ("eval_every", "save_every", "warmup_steps", "weight_decay", "max_grad_norm", "beta",
                                 "clip_low", "clip_high", "step_weight"))
        if self.group_size < 2:
            raise OneLayerError("--group-size 1 gives no learning signal: GRPO, Dr. GRPO and GiGPO compare each "
                                "completion with the others of its group; use --group-size 2 or more (8 is usual)")
        if not self.lr > 0:
            raise OneLayerError(f"--lr must be > 0, got {self.lr}")
        if self.lora_rank < 0:
            raise OneLayerError(f"--lora-rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        if (self.prompts_per_step * self.group_size) % self.mini_batches:
            raise OneLayerError(f"--mini-batches {self.mini_batches} must divide the "
                                f"{self.prompts_per_step * self.group_size} rollouts of a step")
        if self.liger_kernels == "on" and self.compile_layers:
            raise OneLayerError("--liger-kernels on and --compile-layers both fuse the update's elementwise "
                                "work: pass one of them")
        if self.sampling.max_new_tokens < 1:
            raise OneLayerError("--max-new-tokens must be >= 1")
        if self.sampling.temperature <= 0:
            raise OneLayerError("training samples need --temperature > 0")
        if not 0 <= self.gamma <= 1:
            raise OneLayerError(f"--gamma must be in [0, 1], got {self.gamma}")
        parse_report_to(self.report_to)
        self.sampling.validate()


#: fields a run may be resumed with another value of (any other difference is another experiment)
RESUMABLE = names_where(TrainConfig, "resumable")
#: fields every layer variant trained together must share (one model, task and batched generation)
SHARED = names_where(TrainConfig, "shared")
#: fields that do not change what a run computes
NOT_SCIENCE = frozenset(name for name, f in config_fields(TrainConfig) if not f.metadata.get("science", True))


def recipe_difference(saved: dict, now: TrainConfig, ignore: frozenset[str] = RESUMABLE,
                      normalise=None) -> str | None:
    """Where a saved recipe (a run's ``config.json``) and ``now`` first differ, as the flag with the saved and the
    current value (``--lr (1e-05, now 2e-05)``), or None. Fields in ``ignore`` (dotted names) are left out;
    ``normalise(name, value)``, where given, maps both values before they are compared."""
    old, new = flat(to_dict(from_dict(TrainConfig, saved))), flat(to_dict(now))
    same = normalise or (lambda name, value: value)
    for name, value in new.items():
        if name not in ignore and same(name, value) != same(name, old.get(name)):
            return f"{flag(name, isinstance(value, dict))} ({old.get(name)!r}, now {value!r})"
    return None


@dataclass
class EvalConfig:
    """Evaluate a base model, or a base model plus a onelayer checkpoint, on a task's eval split."""

    model: str = option("", group="model", help="model; empty = the checkpoint's base model")
    checkpoint: str = option("", group="model", help="run or checkpoint directory to apply")
    task: str = option("", group="task", help=(
        "task name; empty = the checkpoint's own task and options (else rg:basic_arithmetic)"))
    task_options: dict = option(group="task", factory=dict, help=(
        "task option KEY=VALUE (repeatable); on the checkpoint's own task they override its options"))
    n: int = option(500, group="evaluation", help="eval examples (the first n of the eval split)")
    samples: int = option(1, group="evaluation", help="completions per example (for pass@k)")
    sampling: SamplingConfig = nested(SamplingConfig, temperature=0.0)
    seed: int = option(0, group="run", help="sampling seed")
    out: str = option("", group="run", help="directory for results (summary and per-example)")
    dtype: str = option("auto", group="model", choices=DTYPES, help="auto, bf16 or fp32")
    device: str = option("", group="model", help="cuda, cpu; empty = cuda if available")
    attention: str = option("", group="model", help=(
        "attention implementation: sdpa, eager, flash_attention_2; empty = transformers' default"))

    def validate(self) -> None:
        check_choices(self)
        if not self.model and not self.checkpoint:
            raise OneLayerError("eval needs --model, --checkpoint or both")
        if self.n < 1 or self.samples < 1:
            raise OneLayerError("--n and --samples must be >= 1")
        if self.samples > 1 and self.sampling.temperature <= 0:
            raise OneLayerError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
        self.sampling.validate()


GROUP_GPUS_HELP = ("torchrun processes (GPUs) that train each run of more than one layer together, sharded (a scan's full "
                   "runs; a comparison's strategies): 0 = one, or as many as the memory estimate needs on a GPU")


@dataclass
class ScanConfig:
    """A scan: ``recipe`` is the training recipe shared by every run. In it, ``layers`` names the layers
    that get a single-layer run and ``out`` is the scan directory."""

    recipe: TrainConfig = nested(TrainConfig)
    seeds: int = option(1, group="scan", help="seeds per trained configuration")
    lr_grid: str = option("", group="scan", help=(
        "train every selected layer and the full reference at each of these multiples of --lr, e.g. 1,3,10; the "
        "profile then reads every run at the full run's best rate (the study's protocol) and each configuration "
        "at its own best (profile-best.json), and compares them; empty = --lr alone"))
    adaptive_top: int = option(0, group="scan", help=(
        "successive halving: at each --eval-every evaluation, stop the single-layer runs whose interval can no "
        "longer reach the top K; 0 = train every layer to the end"))
    concurrent: int = option(0, group="scan", help=(
        "single-layer runs trained together in one process, sharing the frozen weights: 0 = as many as fit (on a "
        "GPU; 1 on a CPU), 1 = one at a time"))
    group_gpus: int = option(0, group="scan", help=GROUP_GPUS_HELP)


DEFAULT_STRATEGIES = "full,top:10,lr-guided,middle:10,random:10,lora"


@dataclass
class CompareConfig:
    """``recipe`` is shared by every strategy (its ``layers`` is ignored; ``out`` is the comparison's
    directory). Without flags, ``onelayer compare SCAN`` takes the scan's own recipe."""

    recipe: TrainConfig = nested(TrainConfig)
    strategies: str = option(DEFAULT_STRATEGIES, group="compare", help="comma-separated strategies; TERM*K trains "
                             "one at K times its rate (e.g. top:10*3: 3x --lr)")
    profile: str = option("", group="compare", help="scan dir or profile.json for top:k and lr-guided")
    seeds: int = option(2, group="compare", help="seeds per strategy")
    lora_lr_scale: float = option(10.0, group="compare", help=(
        "LoRA's learning rate is --lr times this (LoRA needs a larger one; ~10x is the usual finding)"))
    concurrent: int = option(0, group="compare", help=(
        "strategies of decoder layers only (top:k, middle:k, random:k, layer specs; not full training, lr-guided "
        "or LoRA) trained together in one process, sharing the frozen weights: 0 = as many as fit (on a GPU; 1 "
        "on a CPU), 1 = one at a time"))
    group_gpus: int = option(0, group="compare", help=GROUP_GPUS_HELP)


@dataclass
class OODConfig:
    """Which tasks, and how to evaluate on them (0 = the scan's own setting)."""

    tasks: str = option("", group="ood", help=(
        "comma-separated tasks, each optionally TASK?KEY=VALUE&KEY=VALUE, e.g. rg:gcd?max_value=20"))
    task_options: dict = option(group="ood", factory=dict, help="option KEY=VALUE for every task")
    eval_n: int = option(0, group="ood", help="eval examples per task; 0 = the scan's --eval-n")
    max_new_tokens: int = option(0, group="ood", help="completion cap; 0 = the scan's")
    generation_batch_size: int = option(0, group="ood", help="rows per generate call; 0 = the scan's")
    dtype: str = option("", group="ood", choices=("", *DTYPES), help="auto, bf16, fp32; empty = the scan's")
    device: str = option("", group="ood", help="cuda, cpu; empty = cuda if available")


PREDICTORS = ("block_influence", "cka_influence", "skip_drop", "grad_norm", "grad_snr", "grad_sign_agreement",
              "spectrum_snr", "position")


@dataclass
class PredictConfig:
    """Per-layer signals of the base model on a task, meant to predict a scan's profile without training."""

    model: str = option("smollm2", group="model", help="hub id, local dir, .gguf file or 'smollm2'")
    task: str = option("rg:basic_arithmetic", group="task", help="task name")
    task_options: dict = option(group="task", factory=dict, help="task option KEY=VALUE (repeatable)")
    layers: str = option("all", group="layers", help="the layers to compute signals for (others interpolated)")
    out: str = option("predict-out", group="run", help="directory for predicted.json, predicted.md and the figure")
    signals: str = option(",".join(PREDICTORS), group="predict", help="comma-separated signals to compute")
    signal: str = option("grad_norm", group="predict", choices=PREDICTORS, help=(
        "the signal whose ranking predicted.json gives as its profile (what top:k@DIR and --lr-from DIR read); "
        "grad_norm predicted SmolLM2's measured profiles best (docs/results/2026-12-02-predictors-smollm2)"))
    prompts: int = option(64, group="predict", help=(
        "train prompts for the representation and gradient signals (groups of --group-size completions)"))
    group_size: int = option(8, group="predict", help="completions per prompt for the gradient signals")
    eval_n: int = option(100, group="predict", help="eval examples for the base and each skipped-layer evaluation")
    sampling: SamplingConfig = nested(SamplingConfig, max_new_tokens=128)
    seed: int = option(0, group="run", help="seed of prompts and sampling")
    dtype: str = option("auto", group="model", choices=DTYPES, help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    device: str = option("", group="model", help="cuda, cpu; empty = cuda if available")
    attention: str = option("", group="model", help="attention implementation; empty = transformers' default")

    def signal_list(self) -> list[str]:
        names = [s.strip() for s in self.signals.split(",") if s.strip()]
        unknown = [s for s in names if s not in PREDICTORS]
        if unknown or not names:
            raise OneLayerError(f"unknown --signals '{','.join(unknown) or self.signals}': use a comma-separated "
                                f"subset of {', '.join(PREDICTORS)}")
        if self.signal not in names:
            names.append(self.signal)
        return names

    def validate(self) -> None:
        check_choices(self)
        check_positive(self, ("prompts", "group_size", "eval_n"))
        if self.group_size < 2:
            raise OneLayerError("--group-size must be >= 2: the gradient signals compare completions of a prompt")
        self.signal_list()
        self.sampling.validate()


def to_dict(config) -> dict:
    return asdict(config)


def from_dict(cls, data: dict):
    """Build a (nested) config dataclass from a dict, ignoring unknown keys."""
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            value = data[f.name]
            sample = f.default_factory() if f.default_factory is not MISSING else None
            sub = type(sample) if is_dataclass(sample) else None
            kwargs[f.name] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)

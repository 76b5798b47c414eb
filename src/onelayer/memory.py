"""Memory per GPU of a training run from its config alone, and whether it fits: know before you load.

Shapes come from the model's skeleton on the meta device (no weights load); the rest is arithmetic over the
config. With T trained and F frozen parameters, e bytes per element of the load dtype (bf16: 2) and N GPUs
(N = 1: one process; N > 1: :mod:`onelayer.training.distributed`), bytes per GPU:

==============  ==================================  ==========================================================
part            one GPU                             N GPUs
==============  ==================================  ==========================================================
weights         F e                                 (F + T) e: the frozen weights and the rollout copy of the
                                                    trained ones
trained         4 T (float32 master weights)        4 T / N
gradients       4 T                                 4 T / N
optimizer       8 T (AdamW's two moments)           8 T / N
rollout cache   the fast engine's KV cache and      the same at the rows per GPU
                sampling buffers at min(rows,
                --generation-batch-size) rows,
                and a prefill chunk's activations
activations     what the backward of one micro-batch keeps (below), the log-prob chunks, one layer's backward;
                on one GPU in bf16 also autocast's bf16 copies of the trained weights
buffers         0                                   FSDP's all-gathered copies (this module, the next) and
                                                    unsharded gradient of the largest trained module
==============  ==================================  ==========================================================

A decoder layer at or above the lowest trained one keeps ``(8h + 6i + 4q + 4kv) e/2`` bytes per token for the
backward (``+ 4q + 4kv`` with q/k norms; ``h`` hidden size, ``i`` MLP width, ``q``/``kv`` query/key-value
widths; eager attention adds ``heads x sequence x (4 + e)``): fitted to autograd's saved tensors of Llama- and
Qwen3-shaped models on CPU (tests check it there). Rollouts and updates alternate: the rollout phase holds
weights, trained, optimizer and cache; the update phase holds those but the cache (freed when it is larger
than :data:`RELEASE_FRACTION` of the GPU) plus gradients, activations and buffers. The peak is the larger.
Parameter, gradient and optimizer bytes are exact; activations and the cache are estimates (checked against
measured GPU peaks by ``bench/multigpu.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from . import compat
from .config import TrainConfig
from .errors import OneLayerError, first_line
from .layers import parse_layer_spec
from .models import decoder_layers, head_is_tied, load_config, load_skeleton, parameter_layers
from .rollout.fast import PREFILL_TOKENS, WINDOW
from .rollout.logprobs import DEFAULT_LOGIT_BYTES

GB = 2**30
# A rollout cache larger than this share of the GPU is freed before each update (and rebuilt next step).
RELEASE_FRACTION = 0.2
# Share of a GPU's memory a run may plan to use (the CUDA context, the allocator's fragmentation: the rest).
FIT_FRACTION = 0.9
PARTS = ("weights", "trained", "gradients", "optimizer", "rollout_cache", "activations", "buffers")


def element_bytes(dtype: str) -> int:
    """Bytes per weight of a run's load dtype, as on a GPU (``auto`` is bf16 there)."""
    return 4 if dtype == "fp32" else 2


def rollout_bytes_per_row(text, element: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """The fast engine's memory per generated row: its KV cache (every layer's keys and values over the
    cache's columns, in whole windows) and sampling buffers (float32 logits, probabilities, sorts: ~16
    bytes per vocabulary entry)."""
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    columns = -(-(prompt_tokens + max_new_tokens + WINDOW) // WINDOW) * WINDOW
    return text.num_hidden_layers * 2 * heads * head_dim * element * columns + text.vocab_size * 16


class NoEstimate(OneLayerError):
    """A model the estimate cannot read (a family whose config names its attention shapes otherwise, or has
    none, as Mamba's): callers that only guard go on without the check, and say so."""


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs of a model: parameters per layer id, LoRA parameters per rank per decoder
    layer, and its text config."""

    text: object
    layers: int
    per_id: dict  # layer id (int or "embed"/"head"/"norm") -> parameters
    lora_per_rank: dict  # decoder layer -> parameters of rank-1 adapters on its linear maps
    tied: bool
    qk_norm: bool
    attention: str


@functools.lru_cache(maxsize=8)
def model_shapes(name: str, attention: str = "") -> Shapes:
    """:class:`Shapes` of model ``name`` from its skeleton on the meta device (cached)."""
    from torch import nn

    skeleton = load_skeleton(name)
    per_id: dict = {}
    for param_name, layer in parameter_layers(skeleton).items():
        per_id[layer] = per_id.get(layer, 0) + skeleton.get_parameter(param_name).numel()
    prefix, blocks = decoder_layers(skeleton)
    lora = {i: sum(m.in_features + m.out_features for m in block.modules() if isinstance(m, nn.Linear))
            for i, block in enumerate(blocks)}
    qk_norm = any(n.endswith(("q_norm", "k_norm")) for n, _ in blocks[0].named_modules())
    config = load_config(name)
    attention = attention or compat.default_attention(config) or "sdpa"
    return Shapes(config.get_text_config(), len(blocks), per_id, lora, head_is_tied(skeleton), qk_norm, attention)


def _activation_bytes_per_token(shapes: Shapes, element: int, sequence: int) -> float:
    """Bytes one decoder layer keeps per token for the backward (see the module docstring)."""
    text = shapes.text
    h = text.hidden_size
    i = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    q, kv = heads * head_dim, kv_heads * head_dim
    per_token = (8 * h + 6 * i + 4 * q + 4 * kv + (4 * q + 4 * kv if shapes.qk_norm else 0)) * element / 2
    if shapes.attention == "eager":  # the attention probabilities, float32 and cast
        per_token += heads * sequence * (4 + element)
    return per_token


def prefill_bytes(shapes: Shapes, element: int, tokens: int) -> int:
    """What a prefill chunk (at most :data:`PREFILL_TOKENS` prompt tokens) holds at once beyond the cache: a
    layer's hidden states, attention and MLP activations (``4h + 3i`` per token)."""
    h = shapes.text.hidden_size
    i = getattr(shapes.text, "intermediate_size", None) or getattr(shapes.text, "n_inner", None) or 4 * h
    return min(tokens, PREFILL_TOKENS) * (4 * h + 3 * i) * element


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of a run over ``gpus`` GPUs, by part (:data:`PARTS`), and of its two phases."""

    gpus: int
    parts: dict
    rollout_phase: int
    update_phase: int
    trained_parameters: int
    frozen_parameters: int
    prompt_tokens: int

    @property
    def peak(self) -> int:
        return max(self.rollout_phase, self.update_phase)

    def fits(self, gpu_bytes: float) -> bool:
        return self.peak <= FIT_FRACTION * gpu_bytes

    def line(self) -> str:
        """``~95 GB per GPU (weights 16.4, trained 15.3, ...)``"""
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GB:.1f}" for k, v in self.parts.items() if v)
        return f"~{self.peak / GB:.0f} GB per GPU ({parts} GB)"


def _split(config: TrainConfig, shapes: Shapes) -> tuple[int, int, int, int]:
    """Trained and frozen parameters of ``config``'s selection, its lowest trained decoder layer (activations
    are kept from there up) and its largest trained unit (what a sharded run gathers at once)."""
    selection = parse_layer_spec(config.layers, shapes.layers)
    total = sum(shapes.per_id.values())
    if config.lora_rank:
        trained = sum(shapes.lora_per_rank[i] for i in selection.layers) * config.lora_rank
        lowest = min(selection.layers, default=shapes.layers)
        return trained, total, lowest, max((shapes.lora_per_rank[i] * config.lora_rank for i in selection.layers),
                                           default=0)
    wanted = set(selection.layers) | set(selection.extras)
    if "head" in wanted and shapes.tied:
        wanted.add("embed")
    trained = sum(n for layer, n in shapes.per_id.items() if layer in wanted)
    lowest = 0 if "embed" in wanted else min(selection.layers, default=shapes.layers)
    return trained, total - trained, lowest, max((shapes.per_id[w] for w in wanted if w in shapes.per_id), default=0)


def _held(trained: int, frozen: int, element: int, gpus: int = 1) -> dict:
    """What a run holds per GPU whatever its batch: the frozen weights (over several GPUs also a copy of the
    trained ones), and its share of the trained tensors' float32 copy, gradients and Adam's two moments."""
    return {"weights": (frozen + (trained if gpus > 1 else 0)) * element,
            "trained": 4 * trained // gpus, "gradients": 4 * trained // gpus, "optimizer": 8 * trained // gpus}


def estimate(config: TrainConfig, gpus: int = 1, prompt_tokens: int = 256, gpu_bytes: float | None = None
             ) -> MemoryEstimate:
    """The memory per GPU of ``config`` trained over ``gpus`` GPUs with prompts of ``prompt_tokens``; on GPUs
    of ``gpu_bytes``, a rollout cache small enough to be kept (:data:`RELEASE_FRACTION`) counts in the update
    phase too."""
    shapes = model_shapes(config.model, config.attention)
    trained, frozen, lowest, largest_unit = _split(config, shapes)
    e = element_bytes(config.dtype)
    rows = config.prompts_per_step * config.group_size // gpus
    s = config.sampling
    sequence = prompt_tokens + s.max_new_tokens
    tokens = min(config.micro_batch_size, rows) * sequence
    generated = min(rows, s.generation_batch_size)
    try:
        per_token = _activation_bytes_per_token(shapes, e, sequence)
        cache = (generated * rollout_bytes_per_row(shapes.text, e, prompt_tokens, s.max_new_tokens)
                 + prefill_bytes(shapes, e, generated * prompt_tokens))
    except (AttributeError, TypeError, RuntimeError) as err:  # Gemma 4's per-layer head_dim: a RuntimeError
        raise NoEstimate(f"no memory estimate for {config.model}: its config does not give attention shapes as "
                         f"the estimate reads them ({first_line(err)}); train and scan go on without the "
                         "check") from err
    activations = (tokens * per_token * (shapes.layers - lowest + 1)  # the layers from the lowest trained up, + one
                   + 3 * DEFAULT_LOGIT_BYTES  # the head's chunk of logits: forward, recomputed, its gradient
                   + (2 * trained if gpus == 1 and e == 2 else 0))  # autocast's bf16 copies of float32 weights
    parts = {**_held(trained, frozen, e, gpus), "rollout_cache": cache, "activations": int(activations),
             "buffers": largest_unit * (3 * e + 4) if gpus > 1 else 0}  # FSDP's gathered unit and its gradient
    resident = parts["weights"] + parts["trained"] + parts["optimizer"]
    update = resident + parts["gradients"] + parts["activations"] + parts["buffers"]
    if gpu_bytes is not None and cache <= RELEASE_FRACTION * gpu_bytes:
        update += cache
    return MemoryEstimate(gpus, parts, resident + cache, update, trained, frozen, prompt_tokens)


def fewest_gpus(config: TrainConfig, prompt_tokens: int, gpu_bytes: float, limit: int = 64) -> int | None:
    """The fewest GPUs over which ``config`` fits (its prompts splitting evenly), or None up to ``limit``."""
    for gpus in range(1, limit + 1):
        if config.prompts_per_step % gpus == 0 and estimate(config, gpus, prompt_tokens, gpu_bytes).fits(gpu_bytes):
            return gpus
    return None


def _halvings(value: int) -> list[int]:
    """``value``, then the powers of two below it down to 1."""
    below = 1 << (max(value, 1).bit_length() - 1)
    return [value] + [1 << k for k in range(below.bit_length() - 1, -1, -1) if 1 << k < value]


def smaller_flag(config: TrainConfig, gpus: int, prompt_tokens: int, gpu_bytes: float) -> str | None:
    """The largest ``--micro-batch-size`` and ``--generation-batch-size`` (powers of two below the current
    ones) with which ``config`` fits on ``gpus`` GPUs, as the flags that change; None when none fit."""
    from dataclasses import replace

    for micro in _halvings(config.micro_batch_size):
        for rows in _halvings(config.sampling.generation_batch_size):
            smaller = replace(config, micro_batch_size=micro,
                              sampling=replace(config.sampling, generation_batch_size=rows))
            if estimate(smaller, gpus, prompt_tokens, gpu_bytes).fits(gpu_bytes):
                flags = ([f"--micro-batch-size {micro}"] if micro != config.micro_batch_size else []) + (
                    [f"--generation-batch-size {rows}"] if rows != config.sampling.generation_batch_size else [])
                return " and ".join(flags) or None
    return None


def prompt_tokens(config: TrainConfig, task=None, sample: int = 64) -> int:
    """A generous prompt length for ``config``'s task: the longest of its first ``sample`` train prompts in
    tokens, plus 25% (``task``: the task, when already made)."""
    from .models import load_tokenizer
    from .rollout import render_prompts
    from .tasks import get_task

    task = task or get_task(config.task, config.task_options)
    tokenizer = load_tokenizer(config.model)
    prompts = render_prompts(tokenizer, [task.messages(e) for e in task.examples("train")[:sample]])
    return int(1.25 * max(len(tokenizer(p)["input_ids"]) for p in prompts))


TRAIN_OVER = "run it over {n} GPUs (torchrun --nproc_per_node {n} -m onelayer train ...)"


def check_fits(config: TrainConfig, gpus: int, prompt_tokens: int, gpu_bytes: float, over: str = TRAIN_OVER
               ) -> MemoryEstimate:
    """The estimate of ``config`` over ``gpus`` GPUs of ``gpu_bytes`` each; a one-line error naming the number
    of GPUs (``over``, a template of ``n``) or the flag that would make it fit when it does not."""
    found = estimate(config, gpus, prompt_tokens, gpu_bytes)
    if found.fits(gpu_bytes):
        return found
    needed = fewest_gpus(config, prompt_tokens, gpu_bytes)
    flag = smaller_flag(config, gpus, prompt_tokens, gpu_bytes)
    fixes = ([over.format(n=needed)] if needed and needed > gpus else []) + ([f"lower {flag}"] if flag else [])
    if not fixes:
        fixes = ["use larger GPUs or a smaller model: its weights alone nearly fill one, and onelayer keeps a "
                 "full copy of them on every GPU (no tensor parallelism)"]
    where = "one GPU" if gpus == 1 else f"{gpus} GPUs"
    raise OneLayerError(f"layers '{config.layers}' of {config.model} need {found.line()} on {where}, more than "
                        f"{FIT_FRACTION:.0%} of the GPU's {gpu_bytes / GB:.0f} GB: {', or '.join(fixes)} "
                        "(onelayer plan shows the estimate; --no-memory-check tries anyway)")


def _count(n: int) -> str:
    return next(f"{n / scale:.3g} {unit}" for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, ""))
                if n >= scale or scale == 1)


def available_host_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/proc/self/cgroup",
                         root: str = "/sys/fs/cgroup") -> int | None:
    """The memory this process can still take (Linux): the machine's ``MemAvailable``, or less where its memory
    cgroup (a container's, a batch job's) allows less; None where neither is known."""
    known = []
    try:
        with open(meminfo) as lines:
            known += [int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    free = cgroup_free(cgroup, root)
    return min(known + ([free] if free is not None else []), default=None)


def cgroup_free(cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """What this process's memory cgroup still allows: its limit less its usage (v2 ``memory.max`` and
    ``memory.current``, v1 ``memory.limit_in_bytes`` and ``memory.usage_in_bytes``), read at its path and at the
    controller's root (a container sees its own cgroup there); None without a limit."""
    try:
        lines = Path(cgroup).read_text().splitlines()
    except OSError:
        return None
    places = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, files = Path(root), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = Path(root) / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        places += [(base / path.lstrip("/"), files), (base, files)]
    free = []
    for folder, (limit, usage) in places:
        try:
            cap, used = (folder / limit).read_text().strip(), int((folder / usage).read_text())
        except (OSError, ValueError):
            continue
        if cap != "max" and int(cap) < 2**60:  # v1 writes a huge number for no limit
            free.append(int(cap) - used)
    return min(free, default=None)


def check_fits_host(config: TrainConfig, available: float) -> int:
    """On a CPU: the bytes ``config`` holds whatever its batch (weights, its trained float32 copy, gradients and
    Adam's moments; rollouts and activations come on top), or a one-line error when even that exceeds
    ``available``: the kernel would kill the run partway through loading, without a word."""
    trained, frozen, _, _ = _split(config, model_shapes(config.model, config.attention))
    element = 4 if config.dtype in ("auto", "fp32") else 2  # auto is fp32 on a CPU
    # only parameter counts: this holds for architectures whose attention the full estimate cannot read
    held_parts = _held(trained, frozen, element)
    held = sum(held_parts.values())
    if held > available:
        parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in held_parts.items() if v)
        raise OneLayerError(f"layers '{config.layers}' of {config.model} need at least {held / GB:.1f} GB on a CPU "
                            f"({parts} GB), more than the {available / GB:.1f} GB of memory available: train on a "
                            "GPU, or a smaller model or fewer layers (--no-memory-check tries anyway)")
    return held


def plan_lines(config: TrainConfig, gpus: list[int], prompt_tokens: int, gpu_bytes: float) -> list[str]:
    """A table (text lines) of the estimate of ``config`` over each number of ``gpus``, with whether it fits
    GPUs of ``gpu_bytes``, and the fewest GPUs that fit."""
    found = [estimate(config, n, prompt_tokens, gpu_bytes) for n in gpus]
    first = found[0]
    lines = [f"layers '{config.layers}' of {config.model}: {_count(first.trained_parameters)} trained and "
             f"{_count(first.frozen_parameters)} frozen parameters; {config.prompts_per_step} prompts x "
             f"{config.group_size}, micro-batches of {config.micro_batch_size}, prompts of ~{prompt_tokens} tokens "
             f"+ {config.sampling.max_new_tokens} new",
             f"{'GB per GPU':24s}" + "".join(f"{f'{n} GPU' + ('s' if n > 1 else ''):>10s}" for n in gpus)]
    labels = {"trained": "trained (float32)", "optimizer": "optimizer (AdamW)"}
    for part in PARTS:
        lines.append(f"{labels.get(part, part.replace('_', ' ')):24s}" + "".join(f"{e.parts[part] / GB:10.1f}"
                                                                                for e in found))
    lines.append(f"{'rollout phase':24s}" + "".join(f"{e.rollout_phase / GB:10.1f}" for e in found))
    lines.append(f"{'update phase':24s}" + "".join(f"{e.update_phase / GB:10.1f}" for e in found))
    lines.append(f"{f'fits {gpu_bytes / GB:.0f} GB ({FIT_FRACTION:.0%})':24s}"
                 + "".join(f"{'yes' if e.fits(gpu_bytes) else 'no':>10s}" for e in found))
    fewest = fewest_gpus(config, prompt_tokens, gpu_bytes)
    flag = None if fewest else smaller_flag(config, gpus[-1], prompt_tokens, gpu_bytes)
    lines.append(f"fewest GPUs that fit: {fewest}" if fewest else
                 f"fits no number of these GPUs up to 64; on {gpus[-1]}: " +
                 (f"lower {flag}" if flag else "not even with micro-batches of 1 (its weights nearly fill a GPU)"))
    lines.append("parameters, gradients and optimizer state are exact; the rollout cache and activations are "
                 "estimates (see onelayer.memory)")
    return lines

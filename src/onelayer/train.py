"""The RL loop: rollout -> reward -> advantage -> update the selected layers -> log -> checkpoint.

Everything a step does is a function of (seed, step), so a run killed at any point resumes from its
last checkpoint and repeats exactly what it would have done.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import add_lora
from .algorithms import Algorithm, Normalizer, get_algorithm, policy_loss, zero_signal_fraction
from .algorithms.gigpo import anchor_key, episode_grpo_advantages, gigpo_advantages
from .analysis.contribution import read_profile
from .analysis.curves import read_jsonl
from .checkpoint import apply_checkpoint, find_checkpoint, load_optimizer_state, read_meta, save_checkpoint
from .compiled import compiled_layers
from .config import TrainConfig, from_dict, to_dict
from .errors import OneLayerError
from .evaluate import evaluate, write_eval
from .layers import LayerSelection, apply_selection, lr_scales_from_profile, select_layers
from .models import default_device, load_model, load_tokenizer
from .progress import progress_bar
from .rollout import Generator, RolloutBatch, completion_logprobs, make_generator, render_prompts
from .rollout.episodes import play_episodes
from .tasks import AgentTask, Example, Task, get_task, outcome_fractions

MAX_BAD_STEPS = 3  # consecutive steps whose updates were all dropped for non-finite gradients
# A rollout cache larger than this share of the GPU is freed before each update (and rebuilt next step).
RELEASE_FRACTION = 0.2

# Fields that may change when a run is resumed; any other difference means a different experiment.
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_at_start", "eval_n", "save_every", "device", "out",
                     "sampling.engine", "sampling.compile_decode", "sampling.fused_kernels", "compile_layers"}


class PromptSampler:
    """Epoch-wise shuffles of the train split; the batch of a step depends only on (seed, step)."""

    def __init__(self, examples: list[Example], seed: int):
        if not examples:
            raise OneLayerError("the task's train split is empty: give it more examples")
        self.examples, self.seed = examples, seed

    def batch(self, step: int, size: int) -> list[Example]:
        n, out = len(self.examples), []
        for position in range(step * size, (step + 1) * size):
            epoch, index = divmod(position, n)
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.examples[order[index]])
        return out


def _peak_memory(device: torch.device) -> int:
    """Peak CUDA memory since the last call (0 elsewhere); resets the counter."""
    if device.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _total_memory(device: torch.device) -> float:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else float("inf")


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


@contextmanager
def swapped_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Temporarily give ``model`` other values for some parameters (e.g. the initial policy's)."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in tensors}
    with torch.no_grad():
        for n, value in tensors.items():
            params[n].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


def fp32_trained_tensors(groups: list[dict]) -> None:
    """Keep trained tensors in float32 while frozen ones stay in the load dtype.

    Adam steps of ~1e-6 vanish when added to bf16 weights (8 mantissa bits), so a bf16 model would
    barely train; float32 copies of the trained tensors only cost little (one layer: ~1/L of the model).
    """
    for group in groups:
        for param in group["params"]:
            if param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()


def precision_context(device: torch.device, load_dtype: torch.dtype):
    """bf16 autocast for models loaded in bf16 (matmuls in bf16, fp32 trained weights cast on the fly)."""
    if load_dtype == torch.float16:
        raise OneLayerError("training in fp16 needs loss scaling, which onelayer does not do: use --dtype bf16 or fp32")
    if load_dtype == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class TrainResult:
    out: Path
    steps_done: int
    selection: LayerSelection
    final_eval: dict | None
    costs: dict  # trainable_parameters, optimizer_state_bytes, peak_memory_bytes (CUDA only, this process)


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"sampling.top_p": ..., ...}."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and k != "task_options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _check_resumable(out: Path, config: TrainConfig) -> None:
    saved_path = out / "config.json"
    if not saved_path.is_file():
        return
    saved = _flat(to_dict(from_dict(TrainConfig, json.loads(saved_path.read_text()))))
    now = _flat(to_dict(config))
    diffs = [k for k in now if k not in RESUMABLE_CHANGES and now[k] != saved.get(k)]
    if diffs:
        k = diffs[0]
        raise OneLayerError(f"{out} holds a run with another {k} ({saved.get(k)!r}, now {now[k]!r}): "
                            "pass another --out, or delete that directory to start over")


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint: they are about to be redone."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def sample_seed(config: TrainConfig, step: int) -> int:
    """The seed of step ``step``'s sampling stream (and of the global generator during that step)."""
    return config.seed * 1_000_003 + step


def score_rollouts(task: Task, batch: RolloutBatch, examples: list[Example], group_size: int
                   ) -> tuple[torch.Tensor, dict]:
    """Rewards (``[B]``, float32) and the step's outcome metrics of a batch of ``group_size``
    completions per example."""
    scores = task.score_all(batch.texts, [e for e in examples for _ in range(group_size)])
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
    outcome = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
               "accuracy": sum(s.correct for s in scores) / len(scores),
               **({"outcomes": outcome_fractions(scores)} if scores[0].outcome else {}),
               "zero_signal_fraction": zero_signal_fraction(rewards, group_size)}
    return rewards, outcome


def rollout_step(tokenizer, task: Task, examples: list[Example], config: TrainConfig, generator: Generator,
                 step: int) -> tuple[RolloutBatch, torch.Tensor, dict, float]:
    """Sample ``group_size`` completions per example and score them. Returns the batch, the rewards
    (``[B]``, float32), the outcome metrics and the seconds spent generating."""
    prompts = render_prompts(tokenizer, [task.messages(e) for e in examples])
    start = time.perf_counter()
    batch = generator.generate(prompts, config.group_size, config.sampling.max_new_tokens,
                               config.sampling.temperature, config.sampling.top_p, seeds=[sample_seed(config, step)])
    seconds = time.perf_counter() - start
    rewards, outcome = score_rollouts(task, batch, examples, config.group_size)
    return batch, rewards, outcome, seconds


def episode_step(tokenizer, task: AgentTask, examples: list[Example], config: TrainConfig, generator: Generator,
                 algorithm: Algorithm) -> tuple[RolloutBatch, torch.Tensor, dict, float]:
    """Play ``group_size`` episodes per example (environment seed) and give every turn its advantage:
    GiGPO's episode + anchor-state step advantage, or (grpo, dr_grpo) its episode's. Returns the
    batch of turns, the advantages per turn (``[rows]``), step metrics and seconds spent playing."""
    s = config.sampling
    start = time.perf_counter()
    episodes, batch = play_episodes(generator, tokenizer, task, [e.meta["seed"] for e in examples],
                                    config.group_size, s.max_new_tokens, s.temperature, s.top_p)
    seconds = time.perf_counter() - start
    advantages = torch.zeros(batch.size, dtype=torch.float32)
    anchored = 0
    for g in range(0, len(episodes), config.group_size):
        group = episodes[g:g + config.group_size]
        rewards = [e.rewards for e in group]
        if algorithm.step_level:
            anchors = [[anchor_key(o) for o in e.observations] for e in group]
            values = gigpo_advantages(rewards, anchors, config.gamma, config.step_weight, algorithm.episode_normalize)
            counts = Counter(k for keys in anchors for k in keys)
            anchored += sum(c for c in counts.values() if c > 1)
        else:
            values = episode_grpo_advantages(rewards, algorithm.episode_normalize)
        for episode, per_turn in zip(group, values, strict=True):
            advantages[episode.rows] = torch.tensor(per_turn, dtype=torch.float32)
    returns = torch.tensor([e.total_return for e in episodes], dtype=torch.float32)
    metrics = {"reward": returns.mean().item(), "reward_std": returns.std().item(),
               "accuracy": sum(e.won for e in episodes) / len(episodes),
               "zero_signal_fraction": zero_signal_fraction(returns, config.group_size),
               "turns": batch.size / len(episodes),
               "invalid_action_fraction": sum(e.invalid_actions for e in episodes) / batch.size,
               **({"anchored_turn_fraction": anchored / batch.size} if algorithm.step_level else {})}
    return batch, advantages, metrics, seconds


def _batch_logprobs(model: nn.Module, batch: RolloutBatch, config: TrainConfig) -> torch.Tensor:
    """Log-probs of the whole batch under the current weights, without gradients, micro-batched."""
    out = torch.zeros(batch.completion_mask.shape, dtype=torch.float32, device=batch.input_ids.device)
    with torch.no_grad():
        for start in range(0, batch.size, config.micro_batch_size):
            part = batch.rows(slice(start, start + config.micro_batch_size))
            lp = completion_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length,
                                     part.completion_mask, config.sampling.temperature)
            out[start:start + config.micro_batch_size, :lp.shape[1]] = lp
    return out


def policy_update(model: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                  advantages: torch.Tensor, config: TrainConfig, aggregation: str, step: int,
                  ref_logprobs: torch.Tensor | None = None) -> dict[str, float]:
    """PPO epochs x mini-batches of optimizer steps over one rollout batch, each accumulated over
    micro-batches. With one epoch and one mini-batch the old log-probs are the new ones detached,
    so the ratio is exactly 1."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = batch.input_ids.device
    advantages = advantages.to(device)
    old_logprobs = _batch_logprobs(model, batch, config) if config.ppo_epochs * config.mini_batches > 1 else None
    rows_per_mini = batch.size // config.mini_batches
    totals = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "grad_norm": 0.0}
    updates, skipped, bad_tensors = 0, 0, set()
    generator = torch.Generator().manual_seed(config.seed * 7919 + step)
    for _epoch in range(config.ppo_epochs):
        order = torch.randperm(batch.size, generator=generator) if config.mini_batches > 1 else torch.arange(batch.size)
        for mb in range(config.mini_batches):
            mini = order[mb * rows_per_mini:(mb + 1) * rows_per_mini]
            norm = Normalizer(len(mini), int(batch.completion_mask[mini.to(device)].sum().item()),
                              config.sampling.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            # token-weighted, so that any micro-batching logs what the whole mini-batch at once would
            loss_sum, stats_sum = 0.0, {"clip_fraction": 0.0, "kl": 0.0}
            for start in range(0, len(mini), config.micro_batch_size):
                rows = mini[start:start + config.micro_batch_size].to(device)
                part = batch.rows(rows)
                width = part.completion_mask.shape[1]
                logp = completion_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length,
                                           part.completion_mask, config.sampling.temperature)
                old = logp.detach() if old_logprobs is None else old_logprobs[rows, :width]
                ref = None if ref_logprobs is None else ref_logprobs[rows, :width]
                loss, stats = policy_loss(logp, old, advantages[rows], part.completion_mask, aggregation,
                                          config.clip_low, config.clip_high, ref, config.beta, norm)
                if not torch.isfinite(loss):
                    raise OneLayerError(f"loss is {loss.item()} at step {step + 1}: lower --lr (now {config.lr:g}) or "
                                        "check the rewards; the last checkpoint is intact and --out resumes from it")
                loss.backward()
                loss_sum += loss.item()
                tokens = int(part.completion_mask.sum().item())
                for k in stats_sum:
                    stats_sum[k] += stats[k] * tokens / max(norm.num_tokens, 1)
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(grad_norm):
                # As AMP's grad scaler does: drop this update rather than write NaN into the weights,
                # and say which tensors went bad; the loop stops if it keeps happening.
                bad_tensors.update(nonfinite_gradients(optimizer))
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(config, step) * group["lr_scale"]
            optimizer.step()
            totals["loss"] += loss_sum
            totals["clip_fraction"] += stats_sum["clip_fraction"]
            totals["kl"] += stats_sum["kl"]
            totals["grad_norm"] += grad_norm
            updates += 1
    stats = {k: v / max(updates, 1) for k, v in totals.items()}
    if skipped:
        layers = sorted({layer for layer, _ in bad_tensors}, key=str)
        stats.update(skipped_updates=skipped, nonfinite_grad_layers=layers,
                     nonfinite_grad_tensors=sorted(name for _, name in bad_tensors)[:4])
    return stats


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> list[tuple]:
    """(layer, name) of each trained tensor whose gradient has a NaN or an infinity."""
    return [(group["layer"], name) for group in optimizer.param_groups
            for name, p in zip(group["names"], group["params"], strict=True)
            if p.grad is not None and not torch.isfinite(p.grad).all()]


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
    bad_steps: int = 0
    peak_memory: int = 0
    final_eval: dict | None = None

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def aggregation(self) -> str:
        return self.config.loss_aggregation or self.algorithm.default_aggregation

    def result(self, device: torch.device) -> TrainResult:
        costs = {"trainable_parameters": self.trainable,
                 "optimizer_state_bytes": sum(t.nbytes for state in self.optimizer.state.values()
                                              for t in state.values() if torch.is_tensor(t)),
                 "peak_memory_bytes": max(self.peak_memory, _peak_memory(device)) if device.type == "cuda" else None}
        return TrainResult(self.out, self.config.steps, self.selection, self.final_eval, costs)


def check_run(config: TrainConfig, task: Task | None = None) -> tuple[Task, Algorithm]:
    """Validate ``config`` and its run directory, and find its task (``task`` when given: runs that
    share one) and algorithm (before any weights load)."""
    config.validate()
    _check_resumable(Path(config.out), config)
    algorithm = get_algorithm(config.algo)
    task = task or get_task(config.task, config.task_options)
    agentic = isinstance(task, AgentTask)
    if algorithm.advantages is None and not agentic:
        raise OneLayerError(f"--algo {algorithm.name} needs a multi-turn agent task (tw:coin_collector, maze:4, ...), "
                            f"not {task.name}: use grpo or dr_grpo")
    if agentic and config.mini_batches > 1:
        raise OneLayerError("agent tasks have a varying number of turns per step: use --mini-batches 1")
    return task, algorithm


def open_run(config: TrainConfig, model: nn.Module, task: Task, algorithm: Algorithm) -> Run:
    """Make ``config``'s layers of ``model`` trainable (float32), build their optimizer, and resume
    from the run directory's checkpoint if it has one. Writes ``config.json``."""
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
    fp32_trained_tensors(groups)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    # the KL reference is the run's initial policy: captured before a resume loads later weights
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if config.beta else {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    start = 0
    if find_checkpoint(out) is not None:
        meta = read_meta(out)
        apply_checkpoint(model, out)
        load_optimizer_state(optimizer, out)
        start = int(meta["step"])
    # steps after the checkpoint are redone, so their log lines go (all of them when starting afresh)
    _truncate_log(out / "log.jsonl", start)
    _truncate_log(out / "eval.jsonl", start if start else -1)
    evals = read_jsonl(out / "eval.jsonl") if start else []
    trainable = sum(p.numel() for g in groups for p in g["params"])
    meta = {"base_model": config.model, "layers_spec": config.layers, "layers": list(selection.layers),
            "extras": list(selection.extras), "trainable_parameters": trainable,
            **({"adapter": adapter} if adapter else {}),
            "selection_notes": list(selection.notes), "lr_rule": lr_rule,
            "lr_scales": {str(k): v for k, v in lr_scales.items()}, "config": to_dict(config)}
    return Run(config, task, algorithm, selection, optimizer, [n for g in groups for n in g["names"]], initial, meta,
               PromptSampler(task.examples("train"), config.seed), start, trainable,
               # a resumed run keeps its last evaluation when it was made at the checkpoint's step
               final_eval=evals[-1] if evals and evals[-1]["step"] == start else None)


def update_phase(model: nn.Module, run: Run, batch: RolloutBatch, advantages: torch.Tensor, precision,
                 step: int) -> tuple[dict, int]:
    """The update half of a step: compute the KL reference if any, and run :func:`policy_update`.
    Returns its stats and the peak memory of the phase."""
    device = batch.input_ids.device
    ref = None
    with precision, compiled_layers(model, run.config.compile_layers):
        if run.config.beta:
            with swapped_tensors(model, run.initial):
                ref = _batch_logprobs(model, batch, run.config)
        stats = policy_update(model, run.optimizer, batch, advantages, run.config, run.aggregation, step, ref)
    return stats, _peak_memory(device)


def step_row(run: Run, step: int, outcome: dict, batch: RolloutBatch, stats: dict, seconds: dict,
             peaks: tuple[int, int] | None) -> dict:
    """The log line of a step; ``seconds`` holds generation, rollout, update and step times."""
    new_tokens = int(batch.completion_lengths.sum().item())
    return {"step": step + 1, **outcome,
            "completion_tokens": new_tokens / batch.size,
            "truncated_fraction": batch.truncated.float().mean().item(),
            **stats, "lr": run.config.lr * lr_factor(run.config, step),
            "tokens_per_s": new_tokens / max(seconds["generation"], 1e-9),
            **{f"seconds_{k}": v for k, v in seconds.items()},
            **({"peak_memory_rollout_gb": peaks[0] / 2**30, "peak_memory_update_gb": peaks[1] / 2**30}
               if peaks else {})}


def log_step(run: Run, row: dict, stats: dict) -> None:
    """Append the step's line to ``log.jsonl``; stop the run when updates keep being dropped."""
    with open(run.out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    run.bad_steps = run.bad_steps + 1 if stats.get("skipped_updates") else 0
    if run.bad_steps >= MAX_BAD_STEPS:
        raise OneLayerError(
            f"gradients were not finite in {run.bad_steps} steps in a row (last: step {row['step']}, tensors "
            f"{', '.join(stats['nonfinite_grad_tensors'][:2])}): lower --lr (now {run.config.lr:g}); the last "
            "checkpoint is intact and --out resumes from it")


def eval_due(config: TrainConfig, done: int) -> bool:
    return bool(config.eval_every) and (done % config.eval_every == 0 or done == config.steps)


def record_eval(run: Run, step: int, result) -> dict:
    """Write an evaluation after ``step`` steps (``eval.jsonl`` line and ``evals/``); returns the line."""
    row = {"step": step, **result.summary()}
    with open(run.out / "eval.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    write_eval(result, run.out / "evals", f"step{step:06d}")
    run.final_eval = row
    return row


def save_due(run: Run, model: nn.Module, done: int) -> None:
    """Checkpoint after ``done`` steps when the schedule or the end says so."""
    if done % run.config.save_every == 0 or done == run.config.steps:
        save_checkpoint(run.out / "checkpoint", model, run.trained, {**run.meta, "step": done}, run.optimizer)


def model_for(config: TrainConfig, model: nn.Module | None, tokenizer) -> tuple[torch.device, nn.Module, object]:
    """The device, model and tokenizer of a run: those given, else loaded as ``config`` says (after
    seeding, so that anything initialised at load time is reproducible)."""
    device = torch.device(config.device) if config.device else default_device()
    torch.manual_seed(config.seed)
    if model is None:
        model = load_model(config.model, device, config.dtype, config.attention)
    return device, model, tokenizer if tokenizer is not None else load_tokenizer(config.model)


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer=None, progress: bool = True) -> TrainResult:
    """Run (or resume) the RL run described by ``config``; ``model``/``tokenizer`` skip loading."""
    task, algorithm = check_run(config)  # cheap checks before loading weights
    device, model, tokenizer = model_for(config, model, tokenizer)
    precision = precision_context(device, next(model.parameters()).dtype)  # before trained tensors go float32
    run = open_run(config, model, task, algorithm)
    generator = make_generator(model, tokenizer, config.sampling.generation_batch_size, config.sampling.engine,
                               config.sampling.compile_decode, config.sampling.fused_kernels)
    model.eval()  # no dropout: sampling and update see the same policy

    def run_eval(step: int) -> None:
        with precision:
            result = evaluate(model, tokenizer, task, config.eval_n, max_new_tokens=config.sampling.max_new_tokens,
                              seed=config.seed, generator=generator)
        record_eval(run, step, result)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if config.eval_every and config.eval_at_start and run.start == 0:
        run_eval(0)
    bar = progress_bar(f"layers {run.selection.describe()}", progress, info=True)
    with bar:
        task_id = bar.add_task("train", total=config.steps, completed=run.start, info="")
        for step in range(run.start, config.steps):
            t0 = time.perf_counter()
            torch.manual_seed(sample_seed(config, step))
            examples = run.sampler.batch(step, config.prompts_per_step)
            with precision:
                if isinstance(task, AgentTask):
                    batch, advantages, outcome, seconds_generation = episode_step(tokenizer, task, examples, config,
                                                                                  generator, algorithm)
                else:
                    batch, rewards, outcome, seconds_generation = rollout_step(tokenizer, task, examples, config,
                                                                               generator, step)
                    advantages = algorithm.advantages(rewards, config.group_size)
            t1 = time.perf_counter()
            peak_rollout = _peak_memory(device)
            if getattr(generator, "state_bytes", 0) > RELEASE_FRACTION * _total_memory(device):
                generator.release()  # a large model's cache would crowd out the update's activations
            stats, peak_update = update_phase(model, run, batch, advantages, precision, step)
            t2 = time.perf_counter()
            run.peak_memory = max(run.peak_memory, peak_rollout, peak_update)
            seconds = {"generation": seconds_generation, "rollout": t1 - t0, "update": t2 - t1, "step": t2 - t0}
            row = step_row(run, step, outcome, batch, stats, seconds,
                           (peak_rollout, peak_update) if device.type == "cuda" else None)
            log_step(run, row, stats)
            if eval_due(config, step + 1):
                run_eval(step + 1)
            save_due(run, model, step + 1)
            bar.update(task_id, completed=step + 1,
                       info=f"reward {row['reward']:.3f} acc {row['accuracy']:.3f} {row['seconds_step']:.1f}s/step")
    return run.result(device)

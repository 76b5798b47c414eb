"""The parts of one RL step, shared by a run alone (:mod:`.train`) and by layer variants trained
together (:mod:`.concurrent`): sample prompts -> roll out and score -> advantages -> update the trained
tensors -> log -> checkpoint -> evaluate (the checkpoint first: an evaluation that fails costs no training).

Both kinds of step return :class:`Rollouts` (the batch, an advantage per row, the step's metrics and
seconds): single-turn tasks score one completion per row, multi-turn ones play episodes whose turns are
the rows. Everything a step does is a function of (seed, step), so a run killed at any point resumes from
its last checkpoint and repeats exactly what it would have done.
"""

from __future__ import annotations

import faulthandler
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..algorithms import Normalizer, policy_loss, zero_signal_fraction
from ..algorithms.gigpo import turn_advantages
from ..checkpoint import save_checkpoint
from ..compiled import compiled_layers
from ..config import TrainConfig
from ..errors import OneLayerError
from ..evaluate import write_eval
from ..fused import liger_layers, liger_wanted
from ..jsonl import append_jsonl
from ..rollout import Generator, RolloutBatch, completion_logprobs, render_prompts
from ..rollout.episodes import play_episodes
from ..tasks import AgentTask, Example, Task, outcome_fractions
from .distributed import SOLO, World
from .setup import Run, peak_memory

MAX_BAD_STEPS = 3  # consecutive steps whose updates were all dropped for non-finite gradients
# "no learning signal": this share of groups or more had equal rewards in this many steps in a row
FLAT_SHARE, FLAT_STEPS = 0.9, 3


def sample_seed(config: TrainConfig, step: int) -> int:
    """The seed of step ``step``'s sampling stream (and of the global generator during that step)."""
    return config.seed * 1_000_003 + step


def rank_seed(seed: int, rank: int) -> int:
    """Process ``rank``'s seed for what each process of a run draws for itself (rank 0: ``seed``)."""
    return seed if rank == 0 else (seed * 6_364_136_223_846_793_005 + rank) % 2**63


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


# ------------------------------------------------------------------------------------------- rollouts


@dataclass
class Rollouts:
    """What the first half of a step produced: rows to learn from and how much each is worth."""

    batch: RolloutBatch
    advantages: torch.Tensor  # [rows], float32
    metrics: dict  # reward, accuracy, zero-signal groups, ... (the step's log line)
    seconds: dict  # generation (sampling alone) and rollout (the whole first half)


def score_rollouts(task: Task, batch: RolloutBatch, examples: list[Example], group_size: int,
                   world: World = SOLO) -> tuple[torch.Tensor, dict]:
    """Rewards (``[B]``, float32) and the step's outcome metrics of a batch of ``group_size``
    completions per example (metrics over every process's share of the step, when ``world`` has several)."""
    scores = task.score_all(batch.texts, [e for e in examples for _ in range(group_size)])
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
    everyone = world.gather(scores)
    every_reward = torch.tensor([s.reward for s in everyone], dtype=torch.float32)
    outcome = {"reward": every_reward.mean().item(), "reward_std": every_reward.std().item(),
               "accuracy": sum(s.correct for s in everyone) / len(everyone),
               **({"outcomes": outcome_fractions(everyone)} if everyone[0].outcome else {}),
               "zero_signal_fraction": zero_signal_fraction(every_reward, group_size)}
    return rewards, outcome


def scored(run: Run, batch: RolloutBatch, examples: list[Example]) -> tuple[torch.Tensor, dict]:
    """Score a single-turn batch and give every row its group-relative advantage."""
    rewards, metrics = score_rollouts(run.task, batch, examples, run.config.group_size, run.world)
    return run.algorithm.advantages(rewards, run.config.group_size), metrics


def rollout_step(run: Run, tokenizer, generator: Generator, step: int) -> Rollouts:
    """Single-turn: ``group_size`` completions of each of the step's prompts (of this process's share of
    them), scored."""
    config, start = run.config, time.perf_counter()
    examples = run.world.share(run.sampler.batch(step, config.prompts_per_step))
    prompts = render_prompts(tokenizer, [run.task.messages(e) for e in examples])
    t0 = time.perf_counter()
    # a share's rows draw from the step's stream what they draw in the whole batch
    share = {"first_row": run.world.first(len(examples) * config.group_size)} if run.world.sharded else {}
    batch = generator.generate(prompts, config.group_size, config.sampling.max_new_tokens,
                               config.sampling.temperature, config.sampling.top_p, seeds=[sample_seed(config, step)],
                               **share)
    generation = time.perf_counter() - t0
    advantages, metrics = scored(run, batch, examples)
    return Rollouts(batch, advantages, metrics, {"generation": generation, "rollout": time.perf_counter() - start})


def episode_step(run: Run, tokenizer, generator: Generator, step: int) -> Rollouts:
    """Multi-turn: ``group_size`` episodes from each of the step's environment seeds; every turn is a row
    with GiGPO's episode + anchor-state step advantage, or (grpo, dr_grpo) its episode's."""
    config, algorithm, start, world = run.config, run.algorithm, time.perf_counter(), run.world
    task: AgentTask = run.task
    seeds = [e.meta["seed"] for e in world.share(run.sampler.batch(step, config.prompts_per_step))]
    s = config.sampling
    episodes, batch = play_episodes(generator, tokenizer, task, seeds, config.group_size, s.max_new_tokens,
                                    s.temperature, s.top_p)
    generation = time.perf_counter() - start
    values, anchored = turn_advantages([e.rewards for e in episodes], [e.observations for e in episodes],
                                       config.group_size, algorithm.step_level, config.gamma, config.step_weight,
                                       algorithm.episode_normalize)
    advantages = torch.zeros(batch.size, dtype=torch.float32)
    for episode, per_turn in zip(episodes, values, strict=True):
        advantages[episode.rows] = torch.tensor(per_turn, dtype=torch.float32)
    # the step's metrics over every process's episodes
    returns = torch.tensor(world.gather([e.total_return for e in episodes]), dtype=torch.float32)
    wins, turns = world.sum(sum(e.won for e in episodes)), world.sum(batch.size)
    metrics = {"reward": returns.mean().item(), "reward_std": returns.std().item(),
               "accuracy": wins / len(returns),
               "zero_signal_fraction": zero_signal_fraction(returns, config.group_size),
               "turns": turns / len(returns),
               "invalid_action_fraction": world.sum(sum(e.invalid_actions for e in episodes)) / turns,
               **({"anchored_turn_fraction": world.sum(anchored) / turns} if algorithm.step_level else {})}
    return Rollouts(batch, advantages, metrics, {"generation": generation, "rollout": time.perf_counter() - start})


def step_rollouts(run: Run, tokenizer, generator: Generator, step: int) -> Rollouts:
    """The first half of a step for the run's kind of task."""
    torch.manual_seed(rank_seed(sample_seed(run.config, step), run.world.rank))
    kind = episode_step if isinstance(run.task, AgentTask) else rollout_step
    return kind(run, tokenizer, generator, step)


# --------------------------------------------------------------------------------------------- update


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


def micro_batches(rows: torch.Tensor, size: int, world: World = SOLO) -> list[tuple[torch.Tensor, bool]]:
    """``rows`` in micro-batches of ``size``, each with whether it is real. Every forward and backward of a
    sharded model is a collective, so over several processes each makes as many as the one with the most:
    one with fewer (an agent task's turns) repeats its first row, to be given zero weight."""
    parts = [(rows[start:start + size], True) for start in range(0, len(rows), size)]
    return parts + [(rows[:1], False)] * (world.max(len(parts)) - len(parts) if world.sharded else 0)


def batch_logprobs(model: nn.Module, batch: RolloutBatch, config: TrainConfig, world: World = SOLO) -> torch.Tensor:
    """Log-probs of the whole batch under the current weights, without gradients, micro-batched."""
    out = torch.zeros(batch.completion_mask.shape, dtype=torch.float32, device=batch.input_ids.device)
    with torch.no_grad():
        for rows, real in micro_batches(torch.arange(batch.size), config.micro_batch_size, world):
            part = batch.rows(rows)
            lp = completion_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length,
                                     part.completion_mask, config.sampling.temperature, lengths=part.lengths)
            if real:
                out[rows.to(out.device), :lp.shape[1]] = lp
    return out


def policy_update(model: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                  advantages: torch.Tensor, config: TrainConfig, aggregation: str, step: int,
                  ref_logprobs: torch.Tensor | None = None, world: World = SOLO) -> dict[str, float]:
    """PPO epochs x mini-batches of optimizer steps over one rollout batch, each accumulated over
    micro-batches. With one epoch and one mini-batch the old log-probs are the new ones detached,
    so the ratio is exactly 1.

    Over several processes (``world``), ``batch`` is this process's share of the step (rows ``rank * B``, ...
    of it): the mini-batches are one process's (the same permutation of the whole step's rows), each process
    taking its rows of each; the loss is divided by the whole mini-batch's sequence and token counts, so the
    gradients the sharded model sums are one process's."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = batch.input_ids.device
    advantages = advantages.to(device)
    old_logprobs = (batch_logprobs(model, batch, config, world) if config.ppo_epochs * config.mini_batches > 1
                    else None)
    # the step's rows over every process (mini-batches > 1 need single-turn tasks: the same number each)
    total, first = (world.sum(batch.size), world.first(batch.size)) if config.mini_batches > 1 else (batch.size, 0)
    rows_per_mini = total // config.mini_batches
    # completion tokens per row on the host: the loop below then waits for the GPU once per optimizer step
    # (its loss, statistics and gradient norm read together), not at every micro-batch
    row_tokens = batch.host_lengths()
    totals = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "grad_norm": 0.0}
    updates, skipped, bad_tensors = 0, 0, set()
    generator = torch.Generator().manual_seed(config.seed * 7919 + step)
    for _epoch in range(config.ppo_epochs):
        order = torch.randperm(total, generator=generator) if config.mini_batches > 1 else torch.arange(total)
        for mb in range(config.mini_batches):
            chosen = order[mb * rows_per_mini:(mb + 1) * rows_per_mini]
            mini = chosen[(chosen >= first) & (chosen < first + batch.size)] - first  # this process's rows of it
            norm = Normalizer(world.sum(len(mini)), world.sum(int(row_tokens[mini].sum())),
                              config.sampling.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            # on the GPU until the step's end; token-weighted, so that any micro-batching logs what the whole
            # mini-batch at once would
            loss_sum = torch.zeros((), device=device)
            stats_sum = {"clip_fraction": torch.zeros((), device=device), "kl": torch.zeros((), device=device)}
            for rows, real in micro_batches(mini, config.micro_batch_size, world):
                tokens = int(row_tokens[rows].sum())
                part = batch.rows(rows)
                rows = rows.to(device)
                width = part.completion_mask.shape[1]
                logp = completion_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length,
                                           part.completion_mask, config.sampling.temperature, lengths=part.lengths)
                old = logp.detach() if old_logprobs is None else old_logprobs[rows, :width]
                ref = None if ref_logprobs is None else ref_logprobs[rows, :width]
                loss, stats = policy_loss(logp, old, advantages[rows], part.completion_mask, aggregation,
                                          config.clip_low, config.clip_high, ref, config.beta, norm)
                if not real:  # a stand-in that keeps this process in step with the others
                    (loss * 0.0).backward()
                    continue
                loss.backward()
                loss_sum += loss.detach()
                for k in stats_sum:
                    stats_sum[k] += stats[k] * tokens / max(norm.num_tokens, 1)
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            norm_tensor = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(norm_tensor, "full_tensor"):  # a sharded model's norm: its full value
                norm_tensor = norm_tensor.full_tensor()
            # the one wait for the GPU in this optimizer step
            loss_value, clip_fraction, kl, grad_norm = torch.stack(
                [loss_sum, stats_sum["clip_fraction"], stats_sum["kl"], norm_tensor.float().to(device)]).tolist()
            # a non-finite loss leaves non-finite gradients: stop before they reach the weights
            if not world.all(math.isfinite(loss_value)):
                raise OneLayerError(f"loss is {loss_value} at step {step + 1}: lower --lr (now {config.lr:g}) or "
                                    "check the rewards; the last checkpoint is intact and --out resumes from it")
            if not math.isfinite(grad_norm):
                # As AMP's grad scaler does: drop this update rather than write NaN into the weights,
                # and say which tensors went bad; the loop stops if it keeps happening.
                bad_tensors.update(world.gather(nonfinite_gradients(optimizer)))
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(config, step) * group["lr_scale"]
            optimizer.step()
            totals["loss"] += loss_value
            totals["clip_fraction"] += clip_fraction
            totals["kl"] += kl
            totals["grad_norm"] += grad_norm
            updates += 1
    optimizer.zero_grad(set_to_none=True)  # gradients are not needed until the next update: free them
    # each process's loss and token-weighted statistics are its share of the batch's
    totals.update({k: world.sum(totals[k]) for k in ("loss", "clip_fraction", "kl")})
    stats = {k: v / max(updates, 1) for k, v in totals.items()}
    if skipped:
        layers = sorted({layer for layer, _ in bad_tensors}, key=str)
        stats.update(skipped_updates=skipped, nonfinite_grad_layers=layers,
                     nonfinite_grad_tensors=sorted(name for _, name in bad_tensors)[:4])
    return stats


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> list[tuple]:
    """(layer, name) of each trained tensor whose gradient (this process's shard of it) has a NaN or an
    infinity."""
    return [(group["layer"], name) for group in optimizer.param_groups
            for name, p in zip(group["names"], group["params"], strict=True)
            if p.grad is not None and not torch.isfinite(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).all()]


def update_phase(model: nn.Module, run: Run, batch: RolloutBatch, advantages: torch.Tensor, precision,
                 step: int) -> tuple[dict, int]:
    """The update half of a step: compute the KL reference if any, and run :func:`policy_update`.
    Returns its stats and the peak memory of the phase."""
    device = batch.input_ids.device
    ref = None
    fused = liger_wanted(model, run.config.liger_kernels, device, run.world.size, run.config.compile_layers)
    with precision, compiled_layers(model, run.config.compile_layers), liger_layers(model, fused):
        if run.config.beta:
            with swapped_tensors(model, run.initial):
                ref = batch_logprobs(model, batch, run.config, run.world)
        stats = policy_update(model, run.optimizer, batch, advantages, run.config, run.aggregation, step, ref,
                              run.world)
    return stats, peak_memory(device)


# a step running this long is reported with every thread's stack (a real step of an 8B model takes a minute)
STALL_SECONDS = float(os.environ.get("ONELAYER_STALL_SECONDS", 900))


@contextmanager
def stall_reports(seconds: float = STALL_SECONDS):
    """Within the block, ``rearm()`` at each step's start: a step still running ``seconds`` later prints every
    thread's stack to stderr ("Timeout (0:15:00)!" and the tracebacks), again every ``seconds`` while it
    lasts. Python's faulthandler does it from a C thread, so it reports even a thread stuck in C with the GIL
    held (the demo once hung in a regex of the answer checker, with the GPU idle and nothing said)."""
    stream = sys.stderr
    try:
        stream.fileno()  # faulthandler writes to a file descriptor
    except (AttributeError, ValueError, OSError):  # stderr replaced by an object without one (some notebooks)
        yield lambda: None
        return
    try:
        yield lambda: faulthandler.dump_traceback_later(seconds, repeat=True, file=stream)
    finally:
        faulthandler.cancel_dump_traceback_later()


# ------------------------------------------------------------------------------- log, evaluate, save


def step_row(run: Run, step: int, metrics: dict, batch: RolloutBatch, stats: dict, seconds: dict,
             peaks: tuple[int, int] | None) -> dict:
    """The log line of a step; ``seconds`` holds generation, rollout, update and step times. Over several
    processes: the whole step's counts, the slowest process's times, the fullest GPU's peaks."""
    world = run.world
    new_tokens, rows = world.sum(int(batch.completion_lengths.sum().item())), world.sum(batch.size)
    seconds = {k: world.max(v) for k, v in seconds.items()}
    peaks = tuple(world.max(p) for p in peaks) if peaks else None
    return {"step": step + 1, **metrics,
            "completion_tokens": new_tokens / rows,
            "truncated_fraction": world.sum(int(batch.truncated.sum().item())) / rows,
            **stats, "lr": run.config.lr * lr_factor(run.config, step),
            "tokens_per_s": new_tokens / max(seconds["generation"], 1e-9),
            **{f"seconds_{k}": v for k, v in seconds.items()},
            **({"peak_memory_rollout_gb": peaks[0] / 2**30, "peak_memory_update_gb": peaks[1] / 2**30}
               if peaks else {})}


def no_signal_notice(config: TrainConfig, row: dict, steps: int) -> str:
    """The one-line notice that a run is not learning because its groups' rewards are all equal, with
    the likely cause (from the step's accuracy and truncation) and its fix."""
    accuracy, truncated, cap = row["accuracy"], row.get("truncated_fraction", 0.0), config.sampling.max_new_tokens
    if accuracy <= 0.05 and truncated >= 0.5:
        cause = (f"almost no completion is right and {truncated:.0%} stop at the length cap: raise --max-new-tokens "
                 f"(now {cap}) so answers fit, or use easier task options")
    elif accuracy <= 0.05:
        cause = (f"almost no completion is right: use easier task options (e.g. fewer terms or digits) or a larger "
                 f"--group-size (now {config.group_size}) so that some completion of a prompt succeeds")
    elif accuracy >= 0.95:
        cause = "almost every completion is right: the task is too easy for the model; use harder task options"
    else:
        cause = (f"the completions of each prompt agree: a larger --group-size (now {config.group_size}) or "
                 f"--temperature (now {config.sampling.temperature:g}) lets them differ")
    return (f"no learning signal in {config.out}: in {steps} step(s) in a row (to step {row['step']}) "
            f"{row['zero_signal_fraction']:.0%} of groups gave all {config.group_size} completions the same "
            f"reward, so their advantages and updates are 0 (accuracy {accuracy:.2f}); {cause}")


def log_step(run: Run, row: dict, stats: dict) -> None:
    """Append the step's line to ``log.jsonl`` (rank 0 of a run's processes) and the trackers, saying once
    (there and on stderr) when the run is not learning because its groups' rewards are all equal; stop the run
    when updates keep being dropped."""
    run.flat_steps = run.flat_steps + 1 if row.get("zero_signal_fraction", 0.0) >= FLAT_SHARE else 0
    if not run.warned_flat and run.flat_steps >= min(FLAT_STEPS, run.config.steps):
        run.warned_flat = True
        row["warning"] = no_signal_notice(run.config, row, run.flat_steps)
        if run.world.is_main:
            print(f"warning: {row['warning']}", file=sys.stderr)
    if run.world.is_main:
        append_jsonl(run.out / "log.jsonl", row)
        run.tracker.log("train", row, row["step"])
    run.bad_steps = run.bad_steps + 1 if stats.get("skipped_updates") else 0
    if run.bad_steps >= MAX_BAD_STEPS:
        raise OneLayerError(
            f"gradients were not finite in {run.bad_steps} steps in a row (last: step {row['step']}, tensors "
            f"{', '.join(stats['nonfinite_grad_tensors'][:2])}): lower --lr (now {run.config.lr:g}); the last "
            "checkpoint is intact and --out resumes from it")


def update_and_log(model: nn.Module, run: Run, rollouts: Rollouts, precision, step: int, peak_rollout: int,
                   extra: dict | None = None) -> dict:
    """The second half of a step: update the trained tensors on ``rollouts``, then log the step (with
    ``extra`` fields). Returns the log line."""
    start = time.perf_counter()
    stats, peak_update = update_phase(model, run, rollouts.batch, rollouts.advantages, precision, step)
    update = time.perf_counter() - start
    run.peak_memory = max(run.peak_memory, peak_rollout, peak_update)
    seconds = {**rollouts.seconds, "update": update, "step": rollouts.seconds["rollout"] + update}
    on_cuda = rollouts.batch.input_ids.device.type == "cuda"
    row = {**step_row(run, step, rollouts.metrics, rollouts.batch, stats, seconds,
                      (peak_rollout, peak_update) if on_cuda else None), **run.processes, **(extra or {})}
    log_step(run, row, stats)
    return row


def eval_due(config: TrainConfig, done: int) -> bool:
    return bool(config.eval_every) and (done % config.eval_every == 0 or done == config.steps)


def eval_before_first_step(run: Run) -> bool:
    """Whether a run evaluates before its first step: at step 0 when asked to, and where it resumed at a step
    whose evaluation was due but not made (it stopped between that step's checkpoint and its evaluation), or
    past its last step (``--steps`` lowered since) without a final one."""
    config = run.config
    if run.start == 0:
        return bool(config.eval_every) and config.eval_at_start
    return (bool(config.eval_every) and run.final_eval is None
            and (eval_due(config, run.start) or run.start >= config.steps))


def record_eval(run: Run, step: int, result) -> dict:
    """Write an evaluation after ``step`` steps (``eval.jsonl`` line and ``evals/``); returns the line."""
    row = {"step": step, **result.summary()}
    append_jsonl(run.out / "eval.jsonl", row)
    run.tracker.log("eval", row, step)
    write_eval(result, run.out / "evals", f"step{step:06d}")
    run.final_eval = row
    return row


def save_due(run: Run, model: nn.Module, done: int) -> None:
    """Checkpoint after ``done`` steps when the schedule or the end says so (of a sharded run: its gathered
    tensors, written by rank 0)."""
    every = run.config.save_every
    if (every and done % every == 0) or done == run.config.steps:
        meta = {**run.meta, "step": done}
        # --keep-optimizer none: a finished run keeps its weights, not the state to continue it exactly
        drop = run.config.keep_optimizer == "none" and done >= run.config.steps
        optimizer = None if drop else run.optimizer
        if run.sharded:
            run.sharded.save(run.out / "checkpoint", run.trained, meta, optimizer)
        else:
            save_checkpoint(run.out / "checkpoint", model, run.trained, meta, optimizer)

"""Evaluation on a task's eval split: accuracy with a confidence interval, pass@k, per-example results."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import find_checkpoint
from .config import EvalConfig
from .rollout import Generator, RolloutBatch, make_generator, render_prompts
from .rollout.episodes import play_episodes
from .tasks import AgentTask, Task, get_task, outcome_fractions


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike mean +- 1.96 sd)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = 1.96, bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """Normal 95% interval of the mean of per-example ``values`` (examples are the independent
    units), clipped to ``bounds``."""
    count = len(values)
    mean = sum(values) / count
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(count - 1, 1))
    return max(bounds[0], mean - z * sd / math.sqrt(count)), min(bounds[1], mean + z * sd / math.sqrt(count))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from ``n`` samples of which ``c`` are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass
class EvalResult:
    task: str
    n: int
    samples: int
    accuracy: float  # mean correctness over all samples (pass@1)
    ci_low: float
    ci_high: float
    pass_at: dict[int, float] = field(default_factory=dict)
    pass_at_ci: dict[int, list[float]] = field(default_factory=dict)  # 95% interval of each pass@k
    mean_reward: float = 0.0
    mean_completion_tokens: float = 0.0
    truncated_fraction: float = 0.0
    outcomes: dict[str, float] = field(default_factory=dict)  # share per outcome (code: passed, timeout, ...)
    mean_reward_ci: list[float] = field(default_factory=list)  # agent tasks: 95% interval of the mean return
    per_example: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_example"}

    def line(self) -> str:
        return (f"{self.task}: accuracy {self.accuracy:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] "
                f"on {self.n} examples x {self.samples}")


def correctness(per_example: list[dict], samples: int) -> dict:
    """The :class:`EvalResult` fields that come from each example's ``correct`` list: accuracy
    (mean correctness) and pass@k with 95% intervals, Wilson's for one sample per example, else a
    normal interval over per-example means (examples are the independent units)."""
    count = len(per_example)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, samples) if k <= samples})
    estimates = {k: [pass_at_k(samples, sum(p["correct"]), k) for p in per_example] for k in ks}
    intervals = {k: wilson_interval(sum(v), count) if samples == 1 else mean_interval(v) for k, v in estimates.items()}
    means = [sum(p["correct"]) / samples for p in per_example]
    low, high = wilson_interval(sum(means), count) if samples == 1 else mean_interval(means)
    return {"n": count, "samples": samples, "accuracy": sum(means) / count, "ci_low": low, "ci_high": high,
            "pass_at": {k: sum(v) / count for k, v in estimates.items()},
            "pass_at_ci": {k: list(v) for k, v in intervals.items()}}


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, task: Task, n: int, samples: int = 1, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 256, seed: int = 0,
             engine: str = "auto", generator: Generator | None = None) -> EvalResult:
    """Score ``samples`` completions of each of the first ``n`` eval examples, sampled by ``generator``
    (default: the ``engine``'s, in batches of ``batch_size`` rows).

    The interval is Wilson's for one sample per example; with several it is a normal interval over
    per-example mean correctness (examples are the independent units).
    """
    if isinstance(task, AgentTask):
        return evaluate_episodes(model, tokenizer, task, n, samples, max_new_tokens, temperature, top_p, batch_size,
                                 seed, engine, generator)
    examples, prompts = eval_prompts(tokenizer, task, n)
    torch.manual_seed(seed)
    generator = generator or make_generator(model, tokenizer, batch_size, engine)
    batch = generator.generate(prompts, samples, max_new_tokens, temperature, top_p, seeds=[seed])
    return eval_result(task, examples, batch, samples)


def eval_prompts(tokenizer, task: Task, n: int) -> tuple[list, list[str]]:
    """The first ``n`` eval examples of a single-turn task and their rendered prompts."""
    examples = task.examples("eval")[:n]
    return examples, render_prompts(tokenizer, [task.messages(e) for e in examples])


def example_record(example, completions: list[str], scores: list) -> dict:
    """One example's row of a per-example file: its completions and how each was scored."""
    return {"id": example.id, "question": example.question, "answer": example.answer, "completions": list(completions),
            "extracted": [s.extracted for s in scores], "correct": [s.correct for s in scores],
            "rewards": [s.reward for s in scores], **({"outcomes": [s.outcome for s in scores]} if scores[0].outcome else {})}


def eval_result(task: Task, examples: list, batch: RolloutBatch, samples: int) -> EvalResult:
    """Score a batch of ``samples`` completions per example (rows in example order)."""
    scores = task.score_all(batch.texts, [e for e in examples for _ in range(samples)])
    per_example = [example_record(example, batch.texts[i * samples:(i + 1) * samples],
                                  scores[i * samples:(i + 1) * samples]) for i, example in enumerate(examples)]
    return EvalResult(
        task=task.name, **correctness(per_example, samples),
        mean_reward=sum(s.reward for s in scores) / len(scores),
        mean_completion_tokens=batch.completion_lengths.float().mean().item(),
        truncated_fraction=batch.truncated.float().mean().item(), outcomes=outcome_fractions(scores),
        per_example=per_example,
    )


@torch.no_grad()
def evaluate_episodes(model: nn.Module, tokenizer, task: AgentTask, n: int, samples: int = 1, max_new_tokens: int = 64,
                      temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 256, seed: int = 0,
                      engine: str = "auto", generator: Generator | None = None) -> EvalResult:
    """Play ``samples`` episodes on each of the first ``n`` eval seeds: success rate (``accuracy``)
    and mean return (``mean_reward``), each with a 95% interval over seeds; pass@k counts a seed
    solved when any of k episodes wins."""
    examples = task.examples("eval")[:n]
    torch.manual_seed(seed)
    generator = generator or make_generator(model, tokenizer, batch_size, engine)
    episodes, batch = play_episodes(generator, tokenizer, task, [e.meta["seed"] for e in examples], samples,
                                    max_new_tokens, temperature, top_p)
    per_example, returns = [], []
    for i, example in enumerate(examples):
        own = episodes[i * samples:(i + 1) * samples]
        returns.append(sum(e.total_return for e in own) / samples)
        per_example.append({"id": example.id, "seed": example.meta["seed"], "correct": [e.won for e in own],
                            "rewards": [e.total_return for e in own], "turns": [len(e.actions) for e in own],
                            "actions": [e.actions for e in own], "replies": [e.replies for e in own],
                            "observations": [e.observations for e in own]})
    return EvalResult(
        task=task.name, **correctness(per_example, samples),
        mean_reward=sum(returns) / len(returns),
        mean_reward_ci=list(mean_interval(returns, bounds=(-math.inf, math.inf))),
        mean_completion_tokens=batch.completion_lengths.float().mean().item(),
        truncated_fraction=batch.truncated.float().mean().item(), per_example=per_example,
    )


def write_eval(result: EvalResult, directory: str | Path, stem: str = "eval") -> Path:
    """Write ``STEM.json`` (summary) and ``STEM.examples.jsonl`` (per example) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(result.summary(), indent=2))
    with open(directory / f"{stem}.examples.jsonl", "w") as f:
        for row in result.per_example:
            f.write(json.dumps(row) + "\n")
    return directory / f"{stem}.json"


DEFAULT_TASK = "rg:basic_arithmetic"


def checkpoint_task(checkpoint: str | Path) -> tuple[str, dict] | None:
    """The task and task options a run was trained on, from its checkpoint's metadata (or, for a run
    kept without its checkpoint, its ``config.json``); None when neither says."""
    found = find_checkpoint(checkpoint)
    saved = Path(checkpoint) / "config.json"
    if found is not None:
        recipe = json.loads((found / "onelayer.json").read_text()).get("config", {})
    elif saved.is_file():
        recipe = json.loads(saved.read_text())
    else:
        return None
    return (recipe["task"], dict(recipe.get("task_options") or {})) if recipe.get("task") else None


def describe_task(name: str, options: dict) -> str:
    """``rg:chain_sum (max_terms=3, min_digits=1)``: a task as a user would pass it."""
    given = ", ".join(f"{k}={json.dumps(v)}" for k, v in options.items())
    return f"{name} ({given})" if given else name


def resolve_task(config: EvalConfig) -> tuple[EvalConfig, str]:
    """``config`` with the task it evaluates filled in, and a line saying which and why. Without a task, a
    checkpoint's own task and options are used (else :data:`DEFAULT_TASK`); naming the checkpoint's own task
    keeps its options too; given task options override any of them. Resolving twice changes nothing."""
    own = checkpoint_task(config.checkpoint) if config.checkpoint else None
    if own is not None and config.task in ("", own[0]):
        name, options = own[0], {**own[1], **config.task_options}
        origin = f"the task {config.checkpoint} was trained on"
        if any(own[1].get(k) != v for k, v in config.task_options.items()):
            origin += ", with the task options given"
    elif config.task:
        name, options, origin = config.task, dict(config.task_options), "as given"
    else:
        name, options, origin = DEFAULT_TASK, dict(config.task_options), "the default task; --task names another"
    resolved = replace(config, task=name, task_options=options)
    return resolved, f"evaluating on {describe_task(name, options)}: {origin}"


def run_eval(config: EvalConfig):
    """Evaluate per ``config`` (its task resolved by :func:`resolve_task`); writes results under
    ``config.out`` when set. Returns the result."""
    from .checkpoint import apply_checkpoint, read_meta
    from .config import check_out_dir
    from .models import default_device, load_model, load_tokenizer

    config.validate()
    config, _ = resolve_task(config)
    if config.out:
        check_out_dir(config.out)
    model_name = config.model or read_meta(config.checkpoint)["base_model"]
    task = get_task(config.task, config.task_options)  # fail on a bad task before loading weights
    device = torch.device(config.device) if config.device else default_device()
    model = load_model(model_name, device, config.dtype, config.attention)
    if config.checkpoint:
        apply_checkpoint(model, config.checkpoint)
    tokenizer = load_tokenizer(model_name)
    s = config.sampling
    result = evaluate(model, tokenizer, task, config.n, config.samples, s.max_new_tokens, s.temperature, s.top_p,
                      s.generation_batch_size, config.seed, s.engine)
    if config.out:
        write_eval(result, config.out)
    return result

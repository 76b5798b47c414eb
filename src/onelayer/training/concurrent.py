"""Training several layer variants of one model together: one copy of the frozen weights, one batched
generation for all of them, then each variant's own scoring, advantages and update.

Each variant is a run of its own (directory, log, checkpoints, optimizer, data order, sampling
stream), and follows the trajectory it would follow alone with the same config, up to floating
point: its prompts come from its own sampler, its completions from its own counter-based stream
(:mod:`onelayer.rollout.streams`), its update sees only its rows and its own layer copy
(:class:`onelayer.variants.LayerVariants`). Variants may be at different steps (a resumed group). A variant
that fails (a NaN loss, say) stops alone; the others go on.
"""

from __future__ import annotations

import gc
import sys
import time

import torch
from torch import nn

from ..config import SHARED, TrainConfig, flag, flat, to_dict
from ..errors import FastEngineUnavailable, OneLayerError
from ..evaluate import eval_prompts, eval_result
from ..layers import select_layers
from ..memory import element_bytes, rollout_bytes_per_row
from ..models import load_config, precision_context
from ..progress import progress_bar
from ..rollout import FastGenerator, render_prompts
from ..rollout.fast import unsupported_reason
from ..rollout.selfcheck import fast_engine_problem
from ..tasks import AgentTask
from ..variants import LayerVariants
from .setup import Run, TrainResult, check_run, model_for, open_run, out_of_memory, peak_memory
from .step import (
    Rollouts,
    eval_before_first_step,
    eval_due,
    record_eval,
    sample_seed,
    save_due,
    scored,
    stall_reports,
    update_and_log,
)

# Share of free GPU memory the joint rollout cache may take (the rest: updates, logits, fragmentation).
CACHE_FRACTION = 0.45
# where a group stopped by running out of memory resumes (each run from its own last checkpoint)
RESUMES = "the runs resume from their checkpoints"


def check_group(configs: list[TrainConfig]) -> None:
    """Raise unless ``configs`` can train together (the fields marked ``shared`` agree; no LoRA)."""
    if not configs:
        raise OneLayerError("no runs to train together")
    first = flat(to_dict(configs[0]))
    for config in configs[1:]:
        values = flat(to_dict(config))
        for name in sorted(SHARED):
            if values[name] != first[name]:
                raise OneLayerError(f"runs trained together must share {flag(name)} ({first[name]!r} vs "
                                    f"{values[name]!r}): train them apart")
    for config in configs:
        if config.lora_rank:
            raise OneLayerError("LoRA runs cannot be trained concurrently yet: use --concurrent 1")
        if config.sampling.engine == "plain":
            raise OneLayerError("concurrent variants need the fast rollout engine: drop --engine plain, "
                                "or use --concurrent 1")


def auto_concurrency(config: TrainConfig, free_bytes: int, prompt_tokens: int = 256, state_bytes: int = 0) -> int:
    """How many variants of ``config`` fit their joint rollout cache (and sampling logits) into
    ``CACHE_FRACTION`` of ``free_bytes``, assuming prompts of ``prompt_tokens``; ``state_bytes``: what
    each variant's trained layers hold besides (their float32 copy, gradients and Adam moments), 0 for
    one layer of a small model, where the cache dominates."""
    text = load_config(config.model).get_text_config()
    per_row = rollout_bytes_per_row(text, element_bytes(config.dtype), prompt_tokens, config.sampling.max_new_tokens)
    rows = config.prompts_per_step * config.group_size
    return max(1, int(CACHE_FRACTION * free_bytes // (per_row * rows + state_bytes)))


def group_size(config: TrainConfig, concurrent: int, state_bytes: int = 0) -> int:
    """How many runs of ``config``'s kind to train together: ``concurrent``, or for 0 as many as fit in the
    free memory of its GPU (:func:`auto_concurrency`; 1 on a CPU, or where variants cannot train together).
    An impossible ``concurrent`` > 1 raises a one-line error naming the fix."""
    from ..memory import prompt_tokens
    from ..models import default_device, load_skeleton
    from ..tasks import get_task

    if concurrent < 0:
        raise OneLayerError(f"--concurrent must be >= 0 (0 = automatic), got {concurrent}")
    device = torch.device(config.device) if config.device else default_device()
    if concurrent == 1 or (concurrent == 0 and device.type != "cuda"):
        return 1
    skeleton = load_skeleton(config.model)
    reason = unsupported_reason(skeleton)
    task = get_task(config.task, config.task_options)
    agentic = isinstance(task, AgentTask)
    if concurrent > 1:
        check_group([config])
        if reason or agentic:
            why = reason or f"{config.task} is a multi-turn agent task"
            raise OneLayerError(f"--concurrent {concurrent} is not possible because {why}: use --concurrent 1")
        return concurrent
    if reason or agentic or config.lora_rank or config.sampling.engine == "plain":
        return 1
    weights = sum(p.numel() for p in skeleton.parameters()) * element_bytes(config.dtype)
    return auto_concurrency(config, torch.cuda.mem_get_info(device)[0] - 2 * weights, prompt_tokens(config, task, 64),
                            state_bytes)


def train_variants(configs: list[TrainConfig], model: nn.Module | None = None, tokenizer=None,
                   progress: bool = True) -> list[TrainResult | Exception]:
    """Train (or resume) the runs ``configs``, each training its own decoder layers of the same base
    model, together. Returns each run's result, or the exception that stopped it."""
    check_group(configs)
    checked = [check_run(configs[0])]
    task = checked[0][0]
    # one task for all (they share --task and its options): its examples are made once, not per variant
    checked += [check_run(c, task) for c in configs[1:]]
    if isinstance(task, AgentTask):
        raise OneLayerError(f"{task.name} is a multi-turn agent task; concurrent variants need a single-turn task: "
                            "use --concurrent 1")
    first = configs[0]
    device, model, tokenizer = model_for(first, model, tokenizer)
    kernels = None if first.sampling.fused_kernels else False
    reason = unsupported_reason(model) or fast_engine_problem(model, tokenizer, kernels)
    if reason:
        raise FastEngineUnavailable(f"concurrent variants need the fast rollout engine, which is off because "
                                    f"{reason}: use --concurrent 1")
    precision = precision_context(device, next(model.parameters()).dtype)
    selections = [select_layers(model, c.layers) for c in configs]
    for config, selection in zip(configs, selections, strict=True):
        if selection.extras or not selection.layers:
            raise OneLayerError(f"layer spec '{config.layers}' of {config.out}: concurrent variants train decoder "
                                "layers only (not embeddings, head or final norm): use --concurrent 1")
    variants = LayerVariants(model, [s.layers for s in selections])
    runs: list[Run] = []
    for k, (config, (run_task, algorithm)) in enumerate(zip(configs, checked, strict=True)):
        with variants.variant(k):
            runs.append(open_run(config, model, run_task, algorithm))
    model.eval()
    # separate engines for training and evaluation batches: each keeps its captured steps
    rollouts = FastGenerator(model, tokenizer, row_hook=variants.set_rows, compiled=first.sampling.compile_decode,
                             kernels=kernels)
    evals = FastGenerator(model, tokenizer, row_hook=variants.set_rows, kernels=kernels)
    steps = [run.start for run in runs]
    failed: dict[int, Exception] = {}
    peak_memory(device)  # reset the counter

    def fail(k: int, err: Exception) -> None:
        failed[k] = err
        print(f"concurrent variants: {runs[k].out} stopped: {err}", file=sys.stderr)

    def evaluate_jointly(members: list[int]) -> None:
        """One greedy generation of the eval prompts for every variant in ``members``; out of GPU memory, each
        half of them in turn (greedy rows do not depend on their batch)."""
        examples, prompts = eval_prompts(tokenizer, task, first.eval_n)
        rollouts.release()  # the training cache is rebuilt at the next step
        batch = None
        try:
            with precision, variants.joint(members, len(prompts)):
                batch = evals.generate(prompts * len(members), 1, first.sampling.max_new_tokens, 0.0, 1.0,
                                       seeds=[runs[k].config.seed for k in members])
        except torch.OutOfMemoryError:
            pass  # recovered below: inside the except clause its traceback would still hold the failed call's memory
        evals.release()
        if batch is None:
            if len(members) == 1:
                # one variant's evaluation alone: a group decodes all its rows in one batch (the routing of its
                # captured steps), so only training the runs alone, in batches of --generation-batch-size, helps
                raise OneLayerError(f"out of GPU memory evaluating {runs[members[0]].out} on {len(prompts)} prompts, "
                                    "which a group decodes in one batch: rerun with --concurrent 1 and the same --out "
                                    f"(alone, a run evaluates in batches of --generation-batch-size): {RESUMES}")
            gc.collect()
            torch.cuda.empty_cache()
            half = len(members) // 2
            print(f"concurrent variants: out of GPU memory evaluating {len(members)} at once; {half} of them, "
                  f"then the other {len(members) - half}", file=sys.stderr)
            evaluate_jointly(members[:half])
            evaluate_jointly(members[half:])
            return
        for b, k in enumerate(members):
            part = batch.rows(slice(b * len(prompts), (b + 1) * len(prompts)))
            record_eval(runs[k], steps[k], eval_result(task, examples, part, 1))

    starting = [k for k, run in enumerate(runs) if eval_before_first_step(run)]
    if starting:
        evaluate_jointly(starting)
    rows_per_variant = first.prompts_per_step * first.group_size
    sampling = first.sampling
    bar = progress_bar(f"{len(runs)} variants", progress, info=True)
    with bar, stall_reports() as rearm:
        task_id = bar.add_task("train", total=sum(r.config.steps for r in runs), completed=sum(steps), info="")
        while active := [k for k, run in enumerate(runs) if k not in failed and steps[k] < run.config.steps]:
            rearm()
            t0 = time.perf_counter()
            examples = {k: runs[k].sampler.batch(steps[k], first.prompts_per_step) for k in active}
            # variants of one seed draw the same examples: each is rendered once
            unique = list({id(e): e for k in active for e in examples[k]}.values())
            rendered = dict(zip(map(id, unique), render_prompts(tokenizer, [task.messages(e) for e in unique]),
                                strict=True))
            prompts = [rendered[id(e)] for k in active for e in examples[k]]
            try:
                with precision, variants.joint(active, rows_per_variant):
                    batch = rollouts.generate(prompts, first.group_size, sampling.max_new_tokens, sampling.temperature,
                                              sampling.top_p, seeds=[sample_seed(runs[k].config, steps[k]) for k in active])
            except torch.OutOfMemoryError:
                raise out_of_memory(f"generating for {len(active)} variants at once", "--concurrent", len(active),
                                    len(active), RESUMES) from None
            seconds_generation = time.perf_counter() - t0
            peak_rollout = peak_memory(device)
            stepped = []
            for b, k in enumerate(active):
                run, step = runs[k], steps[k]
                try:
                    t1 = time.perf_counter()
                    torch.manual_seed(sample_seed(run.config, step))
                    part = batch.rows(slice(b * rows_per_variant, (b + 1) * rows_per_variant))
                    advantages, metrics = scored(run, part, examples[k])
                    # this run's share of the step: the joint generation split evenly, plus its own work; the
                    # joint cache stays (unlike a solo run's large one): the group was sized for it to fit next
                    # to the updates, and rebuilding it would re-capture its decode steps every step
                    share = seconds_generation / len(active)
                    own = Rollouts(part, advantages, metrics, {"generation": seconds_generation,
                                                                "rollout": share + time.perf_counter() - t1})
                    with variants.variant(k):
                        update_and_log(model, run, own, precision, step, peak_rollout,
                                       {"concurrent_variants": len(active)})
                    steps[k] = step + 1
                    stepped.append(k)
                except OneLayerError as err:
                    fail(k, err)
                except torch.OutOfMemoryError:
                    raise out_of_memory(f"updating one of {len(active)} variants next to their rollout cache",
                                        "--concurrent", len(active), len(active), RESUMES) from None
                bar.advance(task_id)
            # as a solo run does: checkpoint, then evaluate (the evaluation of all that are due at once), so
            # that an evaluation that fails costs no training
            for k in stepped:
                with variants.variant(k):
                    save_due(runs[k], model, steps[k])
            due = [k for k in stepped if eval_due(runs[k].config, steps[k])]
            if due:
                evaluate_jointly(due)
            bar.update(task_id, info=f"{len(active)} active, {time.perf_counter() - t0:.1f}s/step"
                       + (f", {len(failed)} failed" if failed else ""))
    for run in runs:
        run.tracker.close()
    return [failed[k] if k in failed else run.result(device) for k, run in enumerate(runs)]

"""The RL recipe for one run: rollout -> reward -> advantage -> update the selected layers -> log ->
checkpoint -> evaluate, step after step (the parts are in :mod:`.step`, the setup in :mod:`.setup`)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..config import TrainConfig
from ..evaluate import evaluate
from ..memory import RELEASE_FRACTION
from ..models import precision_context
from ..progress import progress_bar
from ..rollout import make_generator
from .distributed import World, torchrun_world
from .setup import (
    TrainResult,
    check_memory,
    check_run,
    model_for,
    open_run,
    peak_memory,
    run_out_of_memory,
    total_memory,
)
from .step import (
    eval_before_first_step,
    eval_due,
    record_eval,
    save_due,
    stall_reports,
    step_rollouts,
    update_and_log,
)


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer=None, progress: bool = True,
          world: World | None = None) -> TrainResult:
    """Run (or resume) the RL run described by ``config``; ``model``/``tokenizer`` skip loading. ``world``:
    the processes that train it together, each with its share of every step's prompts and of the trained
    tensors (default: all of torchrun's processes, or this one alone; see :mod:`.distributed`)."""
    world = torchrun_world(config.device) if world is None else world
    config = replace(config, device=world.device or config.device)  # a process's own GPU
    task, algorithm = check_run(config, world=world)  # cheap checks before loading weights
    if model is None:
        check_memory(config, world, task)
    device, model, tokenizer = model_for(config, model, tokenizer)
    precision = precision_context(device, next(model.parameters()).dtype)  # before trained tensors go float32
    run = open_run(config, model, task, algorithm, world)
    # over several processes, ``model`` is the rollout model and the learner holds the sharded trained tensors
    learner = run.sharded.learner if run.sharded else model
    s = config.sampling
    generator = make_generator(model, tokenizer, s.generation_batch_size, s.engine, s.compile_decode, s.fused_kernels)
    model.eval()  # no dropout: sampling and update see the same policy
    learner.eval()

    def run_eval(step: int) -> None:
        if world.is_main:  # the others wait
            with precision:
                result = evaluate(model, tokenizer, task, config.eval_n, max_new_tokens=s.max_new_tokens,
                                  seed=config.seed, generator=generator)
            record_eval(run, step, result)
        world.barrier()

    # what an out-of-memory error names, and the phase whose knob it names
    doing, phase = f"evaluating at step {run.start}", "evaluation"
    peak_memory(device)  # reset the counter
    try:
        if eval_before_first_step(run):
            run_eval(run.start)
        with (progress_bar(f"layers {run.selection.describe()}", progress and world.is_main, info=True) as bar,
              stall_reports() as rearm):
            task_id = bar.add_task("train", total=config.steps, completed=run.start, info="")
            for step in range(run.start, config.steps):
                rearm()
                doing, phase = f"generating step {step + 1}'s rollouts", "rollouts"
                with precision:
                    rollouts = step_rollouts(run, tokenizer, generator, step)
                peak_rollout = peak_memory(device)
                if getattr(generator, "state_bytes", 0) > RELEASE_FRACTION * total_memory(device):
                    generator.release()  # a large model's cache would crowd out the update's activations
                doing, phase = f"updating step {step + 1}", "update"
                row = update_and_log(learner, run, rollouts, precision, step, peak_rollout)
                if run.sharded:
                    run.sharded.refresh()  # the next rollouts and evaluations see the updated weights
                # checkpoint first: an evaluation that fails (out of memory, say) costs no training
                save_due(run, learner, step + 1)
                doing, phase = f"evaluating after step {step + 1}", "evaluation"
                if eval_due(config, step + 1):
                    run_eval(step + 1)
                bar.update(task_id, completed=step + 1,
                           info=f"reward {row['reward']:.3f} acc {row['accuracy']:.3f} {row['seconds_step']:.1f}s/step")
    except torch.OutOfMemoryError:
        raise run_out_of_memory(config, doing, phase) from None
    run.tracker.close()
    return run.result(device)

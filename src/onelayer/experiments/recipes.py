"""The recipe of a scan's or comparison's run: train it (or not, for the base model), evaluate it once, and
summarise what it gained, how far its weights moved and what it cost."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..analysis.param_change import relative_change, squared_norms
from ..checkpoint import checkpoint_tensors
from ..config import TrainConfig
from ..errors import FastEngineUnavailable
from ..evaluate import evaluate, write_eval
from ..jsonl import read_jsonl
from ..layers import select_layers, selected_names
from ..models import parameter_layers, precision_context
from ..tasks import get_task
from ..training import TrainResult, model_for, train, train_variants
from ..training.distributed import SOLO, World
from ..training.setup import check_memory
from .rundir import write_error
from .sharding import GROUP_OVER


def _final_evaluation(recipe: TrainConfig, model, tokenizer, step: int, load_dtype: torch.dtype) -> dict:
    """Evaluate ``model`` (loaded in ``load_dtype``) once on ``recipe.eval_n`` examples, written under
    ``recipe.out/evals``."""
    device = next(model.parameters()).device
    task = get_task(recipe.task, recipe.task_options)
    with precision_context(device, load_dtype):
        result = evaluate(model, tokenizer, task, recipe.eval_n, max_new_tokens=recipe.sampling.max_new_tokens,
                          batch_size=recipe.sampling.generation_batch_size, seed=recipe.seed,
                          engine=recipe.sampling.engine)
    write_eval(result, Path(recipe.out) / "evals", f"step{step:06d}")
    return {"step": step, **result.summary()}


def _trained_summary(recipe: TrainConfig, result: TrainResult, model, before: dict, summary: dict) -> dict:
    """A finished run's summary: its final evaluation, the relative change of its trained tensors
    (``before`` holds their initial values, the run's checkpoint the final ones) and what training cost."""
    costs: dict = {"param_change": None}
    if before:
        after, _ = checkpoint_tensors(model, recipe.out)
        costs["param_change"] = relative_change(squared_norms(before, {n: after[n] for n in before}),
                                                parameter_layers(model))
    costs.update(result.costs, layers=list(result.selection.layers))
    costs["train_seconds"] = sum(row.get("seconds_step", 0.0) for row in read_jsonl(Path(recipe.out) / "log.jsonl"))
    return {"examples": f"evals/step{summary['step']:06d}.examples.jsonl", **summary, **costs}


def _initial_values(model, recipe: TrainConfig) -> dict:
    # LoRA leaves the base weights as they are; their change is the adapters', not measured here
    names = [] if recipe.lora_rank else selected_names(model, select_layers(model, recipe.layers))
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


def train_and_evaluate(recipe: TrainConfig, trained: bool = True, progress: bool = False, world: World = SOLO) -> dict:
    """Train ``recipe`` (or only evaluate the base model when ``trained`` is false), evaluate it once
    on ``recipe.eval_n`` examples, and return the summary: accuracy, the per-example file (relative to
    ``recipe.out``), the relative parameter change of the trained layers, and what training cost.
    ``world``: the processes that train it together (each calls this; rank 0 evaluates and returns the
    summary, the others an empty dict)."""
    Path(recipe.out).mkdir(parents=True, exist_ok=True)
    if trained:
        check_memory(recipe, world, over=GROUP_OVER)  # before loading
    _, model, tokenizer = model_for(recipe, None, None)
    load_dtype = next(model.parameters()).dtype  # before training turns trained tensors float32
    if not trained:
        summary = _final_evaluation(recipe, model, tokenizer, 0, load_dtype)
        return {"examples": f"evals/step{summary['step']:06d}.examples.jsonl", **summary, "param_change": None,
                "world_size": 1, "sharding": "none"}
    before = _initial_values(model, recipe) if world.is_main else {}
    result = train(recipe, model, tokenizer, progress=progress, world=world)
    if not world.is_main:
        return {}
    # final_eval is None when training had already finished (killed before result.json)
    summary = result.final_eval or _final_evaluation(recipe, model, tokenizer, recipe.steps, load_dtype)
    return _trained_summary(recipe, result, model, before, summary)


def _solo(recipe: TrainConfig, progress: bool) -> dict | Exception:
    try:
        return train_and_evaluate(recipe, progress=progress)
    except Exception as err:  # as a concurrent variant fails alone
        return err


def train_and_evaluate_variants(recipes: list[TrainConfig], progress: bool = False) -> list[dict | Exception]:
    """:func:`train_and_evaluate` for single-layer runs of one model trained together
    (:func:`onelayer.concurrent.train_variants`); each run's summary, or the exception that stopped it."""
    check_memory(recipes[0], over=GROUP_OVER)  # before loading: what one of them needs alone, as a solo run checks
    _, model, tokenizer = model_for(recipes[0], None, None)
    before = [_initial_values(model, r) for r in recipes]
    try:
        results = train_variants(recipes, model, tokenizer, progress=progress)
    except FastEngineUnavailable as err:
        print(f"{err}; training these {len(recipes)} runs one at a time instead", file=sys.stderr)
        del model
        return [_solo(recipe, progress) for recipe in recipes]
    # every finished variant has its final evaluation (the recipes evaluate at their last step)
    return [result if isinstance(result, Exception) else
            _trained_summary(recipe, result, model, before[k], result.final_eval)
            for k, (recipe, result) in enumerate(zip(recipes, results, strict=True))]


def train_group(recipes: list[TrainConfig], record: Callable[[int, dict], None], progress: bool = False) -> None:
    """Train ``recipes`` together (:func:`train_and_evaluate_variants`); ``record(k, summary)`` for each run
    that finished, ``error.txt`` in the directory of each that failed alone."""
    for k, (recipe, summary) in enumerate(zip(recipes, train_and_evaluate_variants(recipes, progress), strict=True)):
        if isinstance(summary, Exception):
            write_error(Path(recipe.out) / "error.txt", summary)
        else:
            record(k, summary)

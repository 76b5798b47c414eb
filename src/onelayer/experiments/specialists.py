"""Layer-specialist ensembles against self-consistency: evaluate, then vote (see analysis/ensemble.py).

Each member (a run or checkpoint directory) answers the first ``n`` eval examples greedily (a scan's or
comparison's run reuses the answers of its final evaluation when that was the same evaluation);
self-consistency samples ``k`` answers from one model at temperature 1. Members' answers are saved
under ``OUT/members/NAME/`` and reused when the command is rerun, so adding a member costs one
evaluation.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..analysis.ensemble import EnsembleSummary, ensemble
from ..checkpoint import find_checkpoint, read_meta
from ..config import EvalConfig
from ..errors import OneLayerError
from ..evaluate import resolve_task, run_eval
from ..jsonl import exists, read_jsonl
from ..tasks import get_task
from .rundir import final_examples


def _answers(config: EvalConfig) -> list[dict]:
    """Per-example rows (``extracted``, ``correct`` lists) of an evaluation, run once and then reused."""
    cached, stamp_file = Path(config.out) / "eval.examples.jsonl", Path(config.out) / "source.json"
    stamp = _source(config)
    saved = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    if not exists(cached) or {k: v for k, v in saved.items() if k != "reused"} != stamp:  # or its .gz
        found = final_eval_answers(config)
        run = Path(config.checkpoint) if config.checkpoint else None
        if found is None and run is not None and find_checkpoint(run) is None and (run / "config.json").is_file():
            asked = _differences(config, json.loads((run / "config.json").read_text()))
            kept = len(read_jsonl(final_examples(run))) if not asked else 0
            raise OneLayerError(f"{run} was kept without its checkpoint, so only its final (greedy) evaluation can "
                                "stand for it, and that was another evaluation: "
                                + (f"pass {', '.join(asked)} (the run's settings)" if asked else
                                   f"it holds {kept} examples, pass --n {kept} or fewer")
                                + ", or bring back its checkpoint")
        if found is None:
            run_eval(config)
        else:
            rows, source = found
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text("".join(json.dumps(r) + "\n" for r in rows))
            stamp = {**stamp, "reused": str(source)}
        stamp_file.write_text(json.dumps(stamp))
    return read_jsonl(cached)


def _source(config: EvalConfig) -> dict:
    """What an evaluation evaluated: the model, or the checkpoint and its step (answers cached for an
    earlier checkpoint of the same run are not reused). A run whose training stopped early is refused."""
    # the answers are those of one evaluation: another task, options, cap or size is another one
    evaluation = {"task": config.task, "task_options": config.task_options, "n": config.n,
                  "max_new_tokens": config.sampling.max_new_tokens}
    if config.samples > 1:  # sampled answers (self-consistency): another temperature, k or seed is another draw
        evaluation |= {"samples": config.samples, "temperature": config.sampling.temperature,
                       "top_p": config.sampling.top_p, "seed": config.seed}
    if not config.checkpoint:
        return {"model": config.model, **evaluation}
    result = Path(config.checkpoint) / "result.json"
    if find_checkpoint(config.checkpoint) is None and result.is_file():
        # a finished run kept without its checkpoint: only its own final evaluation can be used
        return {"checkpoint": str(config.checkpoint), "step": json.loads(result.read_text())["step"],
                "model": config.model, **evaluation}
    meta = read_meta(config.checkpoint)
    steps = meta.get("config", {}).get("steps")
    if steps is not None and meta["step"] < steps:
        raise OneLayerError(f"{config.checkpoint} stopped at step {meta['step']} of {steps}: finish its training "
                            "(rerun the command that made it) before voting with it")
    return {"checkpoint": str(config.checkpoint), "step": meta["step"], "model": config.model, **evaluation}


def final_eval_answers(config: EvalConfig) -> tuple[list[dict], Path] | None:
    """The greedy answers a finished scan or comparison run gave at its final evaluation (``result.json``
    names them), when they are the evaluation ``config`` asks for: same task and options, completion
    cap, generation batch, dtype and attention, at least ``config.n`` examples. Saves evaluating a member twice."""
    run = Path(config.checkpoint) if config.checkpoint else None
    if (run is None or config.samples != 1 or config.sampling.temperature != 0
            or not (run / "result.json").is_file() or not (run / "config.json").is_file()):
        return None
    if _differences(config, json.loads((run / "config.json").read_text())):
        return None
    source = final_examples(run)
    rows = read_jsonl(source)
    return (rows[:config.n], source) if len(rows) >= config.n else None


def _differences(config: EvalConfig, recipe: dict) -> list[str]:
    """How the evaluation ``config`` asks for differs from the final one of the run trained with ``recipe``
    (``--flag`` and the run's value), empty when its answers can stand for it."""
    sampling = recipe.get("sampling", {})
    options = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in
                       (recipe.get("task_options") or {}).items())
    checks = [("--task", recipe.get("task"), config.task == recipe.get("task")),
              ("no --task-option (the run's own task options:", f"{options})",
               config.task_options == recipe.get("task_options")),
              ("--n at most", recipe.get("eval_n", 0), recipe.get("eval_n", 0) >= config.n),
              ("--model", recipe.get("model"), config.model in ("", recipe.get("model"))),
              ("--max-new-tokens", sampling.get("max_new_tokens"),
               sampling.get("max_new_tokens") == config.sampling.max_new_tokens),
              ("--generation-batch-size", sampling.get("generation_batch_size"),
               sampling.get("generation_batch_size") == config.sampling.generation_batch_size),
              ("--dtype", recipe.get("dtype"), config.dtype in ("auto", recipe.get("dtype"))),
              ("--attention", recipe.get("attention", ""), config.attention == recipe.get("attention", ""))]
    return [f"{flag} {value if value != '' else repr('')}" for flag, value, ok in checks if not ok]


def member_configs(members: list[str], base: EvalConfig, out: Path) -> list[EvalConfig]:
    """Each member's greedy evaluation, on the task its run was trained on unless ``base`` names one
    (:func:`onelayer.evaluate.resolve_task`); all members must then be evaluated on the same task."""
    configs = [resolve_task(replace(base, checkpoint=m, samples=1, out=str(out / "members" / Path(m).name),
                                    sampling=replace(base.sampling, temperature=0.0)))[0] for m in members]
    tasks = {m: (c.task, c.task_options) for m, c in zip(members, configs, strict=True)}
    first = next(iter(tasks.values()))
    for member, task in tasks.items():
        if task != first:
            raise OneLayerError(f"{members[0]} and {member} were trained on different tasks ({first[0]} "
                                f"{first[1]} vs {task[0]} {task[1]}): pass --task and --task-option to vote on one")
    return configs


def run_ensemble(members: list[str], base: EvalConfig, out: str | Path) -> EnsembleSummary:
    """Greedy answers of each member checkpoint, then the majority vote (members in the order given)."""
    if len(members) < 2:
        raise OneLayerError("an ensemble needs at least two members (run directories)")
    out = Path(out)
    names = [Path(m).name for m in members]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise OneLayerError(f"two members are named {twice}: give run directories distinct names")
    configs = member_configs(members, base, out)
    task = get_task(configs[0].task, configs[0].task_options)
    table = {}
    for name, config in zip(names, configs, strict=True):
        rows = _answers(config)
        table[name] = ([r["extracted"][0] for r in rows], [r["correct"][0] for r in rows])
    summary = ensemble(table, task.same_answer)
    _write(out, "ensemble", summary, table)
    return summary


def self_consistency_temperature(base: EvalConfig) -> float:
    """The temperature self-consistency samples at: the one asked for, or 1 where evaluation's greedy default
    (0) is left, since greedy samples would all agree."""
    return base.sampling.temperature if base.sampling.temperature > 0 else 1.0


def run_self_consistency(model_or_run: str, k: int, base: EvalConfig, out: str | Path) -> EnsembleSummary:
    """``k`` samples per example from one model (a run directory or a model name), voted."""
    if k < 2:
        raise OneLayerError("--k must be >= 2 for self-consistency")
    out = Path(out)
    is_run = find_checkpoint(model_or_run) is not None
    if not is_run and (Path(model_or_run) / "config.json").is_file() and (Path(model_or_run) / "result.json").is_file():
        raise OneLayerError(f"{model_or_run} is a run kept without its checkpoint: self-consistency samples the model, "
                            "so it needs the checkpoint (train the run again with its command, or pass another run)")
    config, _ = resolve_task(replace(base, checkpoint=model_or_run if is_run else "",
                                     model="" if is_run else model_or_run, samples=k, out=str(out / "samples"),
                                     sampling=replace(base.sampling, temperature=self_consistency_temperature(base))))
    task = get_task(config.task, config.task_options)
    rows = _answers(config)
    table = {f"sample{j}": ([r["extracted"][j] for r in rows], [r["correct"][j] for r in rows]) for j in range(k)}
    summary = ensemble(table, task.same_answer)
    _write(out, "self_consistency", summary, table, temperature=config.sampling.temperature)
    return summary


def _write(out: Path, stem: str, summary: EnsembleSummary, table: dict, **extra) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"vote_accuracy": summary.vote_accuracy, "member_accuracy": summary.member_accuracy,
            "best_member": summary.best_member, "oracle": summary.oracle, "ties": summary.ties,
            "overlap": {f"{a} | {b}": v for (a, b), v in summary.overlap.items()},
            "tie_rule": "ties go to the answer of the earliest listed member", **extra}
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    with open(out / f"{stem}.examples.jsonl", "w") as f:
        for i, vote in enumerate(summary.votes):
            f.write(json.dumps({"answers": {m: a[i] for m, (a, _) in table.items()}, "vote": vote.answer,
                                "votes": vote.votes, "tied": vote.tied, "correct": vote.correct}) + "\n")


def ensemble_task_line(member: str, base: EvalConfig) -> str:
    """The line saying which task the votes of ``member`` (a run directory or a model) are on."""
    is_run = find_checkpoint(member) is not None or (Path(member) / "config.json").is_file()
    return resolve_task(replace(base, checkpoint=member if is_run else ""))[1]


def summary_lines(title: str, summary: EnsembleSummary) -> list[str]:
    best = summary.best_member
    lines = [f"{title}: vote accuracy {summary.vote_accuracy:.3f}; best single {best} "
             f"{summary.member_accuracy[best]:.3f}; oracle (any member right) {summary.oracle:.3f}; "
             f"{summary.ties} tied votes"]
    lines += [f"  {m}: {a:.3f}" for m, a in summary.member_accuracy.items()]
    if summary.overlap:
        defined = [v for v in summary.overlap.values() if v is not None]
        mean = f"{sum(defined) / len(defined):.3f}" if defined else "n/a"
        undefined = len(summary.overlap) - len(defined)
        lines.append(f"  mean pairwise overlap (Jaccard of solved sets) {mean}"
                     + (f" ({undefined} pair(s) where neither solved anything left out)" if undefined else ""))
    return lines


"""Predict a scan's profile without training: per-layer signals of the base model on the task's own prompts
(:mod:`onelayer.analysis.predictors` defines them), written as ``predicted.json`` in the shape of a profile so
that ``top:k@DIR`` and ``--lr-from DIR`` accept it; and each signal scored against a measured scan.

``predicted.json``'s points are the ranks of the chosen ``--signal`` scaled to (0, 1] (1 = the layer
predicted best), so ``--lr-from`` gives a layer a learning rate in proportion to its predicted rank; it is
marked unreliable with the warning that it is a prediction, which ``top:k@DIR`` repeats in its notes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..algorithms import get_algorithm, policy_loss
from ..analysis import predictors as signals
from ..analysis.contribution import interpolate
from ..analysis.figures import plot_signals
from ..analysis.rank import measured as measured_layers
from ..config import PredictConfig, to_dict
from ..errors import OneLayerError
from ..evaluate import evaluate
from ..layers import parse_layer_spec
from ..models import (
    decoder_layers,
    default_device,
    load_model,
    load_tokenizer,
    parameter_layers,
    precision_context,
)
from ..profile import Estimate, LayerPoint, Profile, read_profile
from ..progress import progress_bar
from ..rollout import completion_logprobs, make_generator, render_prompts
from ..tasks import AgentTask, get_task
from ..variants import skipped

PREDICTED = "predicted.json"


def run_predict(config: PredictConfig, progress: bool = True) -> dict:
    """Compute ``config``'s signals and write ``predicted.json`` (signals, their cost in seconds, the profile
    of the chosen signal) and ``predicted.png`` into ``config.out``. Returns what was written."""
    config.validate()
    names = config.signal_list()
    task = get_task(config.task, config.task_options)
    if isinstance(task, AgentTask):
        raise OneLayerError(f"{task.name} is a multi-turn agent task; onelayer predict needs a single-turn task")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise OneLayerError(f"--out {out} is a file: pass a directory")
    device = torch.device(config.device) if config.device else default_device()
    torch.manual_seed(config.seed)
    model = load_model(config.model, device, config.dtype, config.attention)
    tokenizer = load_tokenizer(config.model)
    num_layers = len(decoder_layers(model)[1])
    layers = list(parse_layer_spec(config.layers, num_layers).layers)
    if not layers:
        raise OneLayerError(f"--layers '{config.layers}' names no decoder layer")
    precision = precision_context(device, next(model.parameters()).dtype)
    examples = task.examples("train")[:config.prompts]
    prompts = render_prompts(tokenizer, [task.messages(e) for e in examples])
    values: dict[str, dict[int, float]] = {}
    seconds: dict[str, float] = {}

    def timed(group: tuple[str, ...], compute) -> None:
        wanted = [n for n in group if n in names]
        if not wanted:
            return
        start = time.perf_counter()
        found = compute()
        elapsed = time.perf_counter() - start
        for name in wanted:
            values[name], seconds[name] = found[name], elapsed  # signals computed together cost it each

    with progress_bar("predict {task.fields[current]}", progress) as bar:
        bar_id = bar.add_task("predict", total=4, current="representations")
        with precision:
            timed(("block_influence", "cka_influence"),
                  lambda: representation_signals(model, tokenizer, prompts, layers))
            bar.update(bar_id, advance=1, current="weight spectra")
            timed(("spectrum_snr",), lambda: {"spectrum_snr": spectrum_signal(model, layers)})
            bar.update(bar_id, advance=1, current="skipped layers")
            timed(("skip_drop",), lambda: {"skip_drop": skip_signal(model, tokenizer, task, config, layers)})
            bar.update(bar_id, advance=1, current="gradients")
            timed(("grad_norm", "grad_snr", "grad_sign_agreement"),
                  lambda: gradient_signals_of(model, tokenizer, task, examples, config, layers, precision))
            bar.update(bar_id, advance=1, current="")
    timed(("position",), lambda: {"position": {layer: signals.position_baseline(num_layers)[layer]
                                               for layer in layers}})
    profile = prediction_profile(values[config.signal], num_layers, config.signal)
    result = {"kind": "prediction", "config": to_dict(config), "num_layers": num_layers, "layers": layers,
              "signal": config.signal, "signals": {n: {str(k): v for k, v in values[n].items()} for n in names},
              "seconds": {n: seconds[n] for n in names}, **asdict(profile)}
    out.mkdir(parents=True, exist_ok=True)
    (out / PREDICTED).write_text(json.dumps(result, indent=2, default=_json_number))
    plot_signals(values, num_layers, out / "predicted.png", f"predicted layer importance: {config.model}")
    return result


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def prediction_profile(signal: dict[int, float], num_layers: int, name: str) -> Profile:
    """A profile whose points are the ranks of ``signal`` scaled to (0, 1] (ties share the mean rank),
    interpolated where the signal was not computed, marked as a prediction."""
    from scipy.stats import rankdata

    finite = {layer: v for layer, v in signal.items() if math.isfinite(v)}
    if not finite:
        raise OneLayerError(f"signal {name} is undefined on every layer: pick another --signal")
    layers = sorted(finite)
    ranks = dict(zip(layers, (rankdata([finite[layer] for layer in layers]) / len(layers)).tolist(), strict=True))
    filled = interpolate(ranks, num_layers)
    nan = float("nan")
    points = tuple(LayerPoint(layer, value, value, value, flag) for layer, (value, flag) in enumerate(filled))
    warning = (f"a prediction from the base model's {name} (ranks scaled to (0, 1]), not a measurement: check it "
               "against a scan with onelayer analyze predictors")
    return Profile(points, Estimate(nan, nan, nan), False, warning)


# ---------------------------------------------------------------------------------------------- the signals


def _hidden(value) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def representation_signals(model: nn.Module, tokenizer, prompts: list[str], layers: list[int],
                           batch_size: int = 16) -> dict[str, dict[int, float]]:
    """Block influence and CKA influence of ``layers`` over the real (unpadded) tokens of ``prompts``. CKA
    is accumulated from centred second moments, so it covers every token, batch by batch."""
    _, modules = decoder_layers(model)
    device = next(model.parameters()).device
    cosines = {layer: [0.0, 0] for layer in layers}
    moments: dict[int, dict] = {}
    mask_now: list[torch.Tensor] = []

    def hook(layer: int):
        def record(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).detach().float()
            y = _hidden(output).detach().float()
            keep = mask_now[0].reshape(-1)
            x, y = x.reshape(-1, x.shape[-1])[keep].double(), y.reshape(-1, y.shape[-1])[keep].double()
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            cosines[layer][0] += float(cos.sum())
            cosines[layer][1] += cos.numel()
            m = moments.setdefault(layer, {"n": 0, "sx": 0, "sy": 0, "xx": 0, "yy": 0, "yx": 0})
            m["n"] += x.shape[0]
            m["sx"], m["sy"] = m["sx"] + x.sum(0), m["sy"] + y.sum(0)
            m["xx"], m["yy"], m["yx"] = m["xx"] + x.T @ x, m["yy"] + y.T @ y, m["yx"] + y.T @ x
        return record

    handles = [modules[layer].register_forward_hook(hook(layer), with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                mask_now[:] = [enc["attention_mask"].bool()]
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    influence, cka = {}, {}
    for layer in layers:
        total, count = cosines[layer]
        influence[layer] = 1 - total / count
        m = moments[layer]
        n, mx, my = m["n"], m["sx"] / m["n"], m["sy"] / m["n"]
        xx, yy, yx = m["xx"] - n * torch.outer(mx, mx), m["yy"] - n * torch.outer(my, my), m["yx"] - n * torch.outer(my, mx)
        denominator = torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy)
        cka[layer] = 1 - float(torch.linalg.matrix_norm(yx) ** 2 / denominator) if denominator > 0 else float("nan")
    return {"block_influence": influence, "cka_influence": cka}


def spectrum_signal(model: nn.Module, layers: list[int]) -> dict[int, float]:
    """Spectrum's SNR of every 2-D weight of ``layers``, combined per layer (see :func:`signals.spectrum_scores`)."""
    prefix, _ = decoder_layers(model)
    layer_of = parameter_layers(model)
    per_matrix = {}
    for name, param in model.named_parameters():
        layer = layer_of.get(name)
        if isinstance(layer, int) and layer in layers and param.ndim == 2:
            kind = name.split(f"{prefix}.{layer}.", 1)[-1]
            per_matrix[layer, kind] = signals.spectrum_snr(param.float())
    return signals.spectrum_scores(per_matrix)


def skip_signal(model: nn.Module, tokenizer, task, config: PredictConfig, layers: list[int]) -> dict[int, float]:
    """The base model's accuracy on ``eval_n`` examples minus its accuracy with each layer skipped."""
    s = config.sampling

    def accuracy() -> float:
        generator = make_generator(model, tokenizer, s.generation_batch_size, s.engine, False, s.fused_kernels)
        return evaluate(model, tokenizer, task, config.eval_n, max_new_tokens=s.max_new_tokens, seed=config.seed,
                        generator=generator).accuracy

    base = accuracy()
    drops = {}
    for layer in layers:
        with skipped(model, layer):
            drops[layer] = base - accuracy()
    return drops


def gradient_signals_of(model: nn.Module, tokenizer, task, examples, config: PredictConfig, layers: list[int],
                        precision) -> dict[str, dict[int, float]]:
    """Gradient norm, signal-to-noise and sign agreement of every layer's GRPO gradient at the base model, one
    gradient per group of ``group_size`` completions (groups whose rewards are all equal carry none)."""
    from ..training.step import score_rollouts

    s = config.sampling
    generator = make_generator(model, tokenizer, s.generation_batch_size, s.engine, False, s.fused_kernels)
    prompts = render_prompts(tokenizer, [task.messages(e) for e in examples])
    batch = generator.generate(prompts, config.group_size, s.max_new_tokens, s.temperature, s.top_p,
                               seeds=[config.seed])
    rewards, _ = score_rollouts(task, batch, examples, config.group_size)
    advantages = get_algorithm("grpo").advantages(rewards, config.group_size)
    _, modules = decoder_layers(model)
    params = {layer: [p for p in modules[layer].parameters()] for layer in layers}
    weight_norms = {layer: math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in ps))
                    for layer, ps in params.items()}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    moments = {layer: signals.GradientMoments.zeros(sum(p.numel() for p in ps), next(model.parameters()).device)
               for layer, ps in params.items()}
    informative = 0
    try:
        for g in range(0, batch.size, config.group_size):
            rows = slice(g, g + config.group_size)
            if not advantages[rows].abs().sum() > 0:
                continue  # equal rewards: no gradient to learn from
            part = batch.rows(rows)
            logp = completion_logprobs(model, part.input_ids, part.attention_mask, part.prompt_length,
                                       part.completion_mask, s.temperature)
            loss, _ = policy_loss(logp, logp.detach(), advantages[rows].to(logp.device), part.completion_mask,
                                  "seq-mean-token-mean")
            model.zero_grad(set_to_none=True)
            loss.backward()
            informative += 1
            for layer, ps in params.items():
                moments[layer].add(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                              for p in ps]))
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    if informative < 2:
        print(f"predict: only {informative} of {batch.size // config.group_size} prompt groups had unequal rewards; "
              "the gradient signals need 2 or more: raise --prompts, --max-new-tokens or make the task easier",
              file=sys.stderr)
    out: dict[str, dict[int, float]] = {"grad_norm": {}, "grad_snr": {}, "grad_sign_agreement": {}}
    for layer in layers:
        for name, value in signals.gradient_signals(moments[layer], weight_norms[layer]).items():
            out[name][layer] = value
    return out


# ------------------------------------------------------------------------------------ scoring against a scan


def config_for_scan(scan_dir: str | Path, out: str | Path) -> PredictConfig:
    """The prediction that matches a scan: its model, task and options, rollout settings and group size."""
    from ..config import SamplingConfig, from_dict
    from .scan import load_plan

    recipe = load_plan(scan_dir)[0]["recipe"]
    sampling = from_dict(SamplingConfig, recipe.get("sampling", {}))
    return PredictConfig(model=recipe["model"], task=recipe["task"], task_options=dict(recipe.get("task_options", {})),
                         out=str(out), group_size=max(2, int(recipe.get("group_size", 8))), sampling=sampling,
                         seed=int(recipe.get("seed", 0)), dtype=recipe.get("dtype", "auto"),
                         attention=recipe.get("attention", ""))


def read_prediction(path: str | Path) -> dict:
    """A ``predicted.json`` (or the directory holding it)."""
    path = Path(path)
    file = path / PREDICTED if path.is_dir() else path
    if not file.is_file():
        raise OneLayerError(f"no {PREDICTED} at {path}: run onelayer predict --out {path} first")
    return json.loads(file.read_text())


def score_prediction(scan_dir: str | Path, prediction: dict, ceiling: float = float("nan")
                     ) -> list[signals.PredictorScore]:
    """Each predicted signal against the scan's measured contributions (its profile.json)."""
    profile = read_profile(scan_dir)
    measured = measured_layers(profile)
    if len(profile.points) != prediction["num_layers"]:
        raise OneLayerError(f"the prediction is for {prediction['num_layers']} layers, the scan's model has "
                            f"{len(profile.points)}: predict for the scan's model")
    if len(measured) < 3:
        raise OneLayerError(f"{scan_dir} measured {len(measured)} layers: scoring a predictor needs at least 3")
    scores = []
    for name, by_layer in prediction["signals"].items():
        values = {int(k): (float("nan") if v is None else float(v)) for k, v in by_layer.items()}
        scores.append(signals.score_predictor(name, values, measured, prediction["num_layers"],
                                              prediction["seconds"].get(name, float("nan")), ceiling))
    return scores

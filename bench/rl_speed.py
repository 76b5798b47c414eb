"""Rollout and RL-step speed and memory on one GPU: the fast engine against transformers' generate and TRL.

    python bench/rl_speed.py --out bench-out                       # every section
    python bench/rl_speed.py --out bench-out --sections generation,step

Sections (each prints a table and adds to OUT/results.json, so sections may run in separate processes):
  check       fast engine vs transformers on SmolLM2 in bf16: greedy agreement, log-prob error
  architectures  the tests' tiny model of every architecture in float32: fast engine (kernels) vs generate
  attention   one layer's decode attention: the Triton kernel (columns per step, warps) vs the torch ops, GB/s
  profile     where a captured decode step's time goes (kernels by kind, graph replay vs eager launches)
  compiled    the fast engine's decode step eager vs through torch.compile (both replayed as CUDA graphs):
              SmolLM2, 96 new tokens, batch 256/1024/3840, and the first call's cost (capture, compilation)
  generation  new tokens/s and ms per decode step at batch 64/256/1024 (--batches) for SmolLM2 and random
              Qwen3-0.6B- and Qwen3-8B-shaped models (fixed lengths: EOS is never sampled), by engine
              (--generation-engines): plain generate, fast-ops (the fast engine's torch ops), fast (its
              Triton attention and sampling kernels), fast-compiled (and its decode step through torch.compile)
  update      one SmolLM2 update (32 x 8 rollouts, at most 96 new tokens) of layer 15, layer 0 or all layers,
              at micro-batches of 64/128/256 rows, eager vs SDPA attention, eager vs compiled decoder layers
              (--compile-layers), some profiled: GPU kernel time by kind against wall time
  step        a SmolLM2 GRPO step of 32 prompts x 8 completions x 256 tokens, full vs middle:1, by phase
  large       the Qwen3-8B-shaped model: middle:1 and middle:4 steps of 256 x 512 tokens; does full fit?
  trl         the SmolLM2 step through TRL's GRPOTrainer (its plain generate path), same settings

Ratios are measured within one run on one machine; timings are medians over repeated steps after a warm-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from onelayer.config import SamplingConfig, TrainConfig
from onelayer.models import load_model, load_tokenizer, precision_context
from onelayer.rollout import FastGenerator, HFGenerator, completion_logprobs, render_prompts
from onelayer.rollout.fast import cached_attention_for
from onelayer.tasks import get_task
from onelayer.training import train
from onelayer.training.setup import check_run, open_run
from onelayer.training.step import update_phase

TASK = "rg:basic_arithmetic"
SECTIONS = ("check", "architectures", "attention", "generation", "compiled", "profile", "update", "step", "large", "trl")


def qwen3_shaped(size: str, vocab_size: int):
    """A random-initialised Qwen3-0.6B- or Qwen3-8B-shaped model in bf16 on the GPU (speed only)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    shapes = {"0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
              "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)}
    config = Qwen3Config(vocab_size=max(151936, vocab_size), max_position_embeddings=40960, **shapes[size])
    config.eos_token_id = 0
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
    return model.eval()


def task_prompts(tokenizer, n: int) -> list[str]:
    task = get_task(TASK)
    examples = (task.examples("train") * (n // 100 + 1))[:n]
    return render_prompts(tokenizer, [task.messages(e) for e in examples])


# rollout engines by name: transformers' generate; the fast engine with torch ops for attention and
# sampling; with its Triton kernels (the default on CUDA); and with its decode step through torch.compile
GENERATORS = {
    "plain": lambda model, tokenizer, batch, **kw: HFGenerator(model, tokenizer, batch, **kw),
    "fast-ops": lambda model, tokenizer, batch, **kw: FastGenerator(model, tokenizer, batch, kernels=False, **kw),
    "fast": lambda model, tokenizer, batch, **kw: FastGenerator(model, tokenizer, batch, **kw),
    "fast-compiled": lambda model, tokenizer, batch, **kw: FastGenerator(model, tokenizer, batch, compiled=True, **kw),
}


def synced() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def time_generation(generator, prompts: list[str], new_tokens: int) -> dict:
    start = synced()
    generator.generate(prompts, 1, new_tokens, 1.0, 1.0)  # warm-up: graph capture, allocator, kernels
    first = synced() - start
    torch.cuda.reset_peak_memory_stats()
    start = synced()
    batch = generator.generate(prompts, 1, new_tokens, 1.0, 1.0)
    seconds = synced() - start
    tokens = int(batch.completion_lengths.sum())
    return {"rows": len(prompts), "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ms_per_step": 1000 * seconds / new_tokens, "prompt_tokens": batch.prompt_length, "first_call_s": first,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


# ------------------------------------------------------------------------------------------- sections


def _greedy_agreement(a, b) -> tuple[float, list[int]]:
    """Fraction of identical completions, and the first differing token of the others."""
    width = min(a.input_ids.shape[1], b.input_ids.shape[1])
    differ = a.input_ids[:, :width] != b.input_ids[:, :width]
    first = sorted(int(row.float().argmax()) - a.prompt_length for row in differ if row.any())
    return sum(x == y for x, y in zip(a.texts, b.texts, strict=True)) / len(a.texts), first


def section_check(args) -> dict:
    """The fast engine against transformers on SmolLM2: greedy tokens and sampled log-probs, in fp32 (where
    they must agree) and bf16 (where rounding differs; the fp32 model is the yardstick for both engines)."""
    tokenizer = load_tokenizer("smollm2")
    prompts = task_prompts(tokenizer, 64)
    models = {dtype: load_model("smollm2", "cuda", dtype, "eager") for dtype in ("fp32", "bf16")}
    greedy = {(dtype, engine): GENERATORS[engine](model, tokenizer, 64).generate(prompts, 1, 128, temperature=0.0)
              for dtype, model in models.items() for engine in ("fast", "fast-ops", "plain")}
    result = {}
    for label, a, b in (("fp32 fast vs plain", ("fp32", "fast"), ("fp32", "plain")),
                        ("fp32 fast-ops vs plain", ("fp32", "fast-ops"), ("fp32", "plain")),
                        ("bf16 fast vs plain", ("bf16", "fast"), ("bf16", "plain")),
                        ("bf16 fast-ops vs plain", ("bf16", "fast-ops"), ("bf16", "plain")),
                        ("bf16 fast vs fast-ops", ("bf16", "fast"), ("bf16", "fast-ops")),
                        ("bf16 plain vs fp32 plain", ("bf16", "plain"), ("fp32", "plain")),
                        ("bf16 fast vs fp32 plain", ("bf16", "fast"), ("fp32", "plain"))):
        same, first = _greedy_agreement(greedy[a], greedy[b])
        result[f"greedy {label}"] = {"identical_fraction": same, "first_difference_tokens": first}
        print(f"greedy, {label:26s}: {same:.2f} of 64 completions identical; first differences at {first[:8]}")
    sampled, ops = (GENERATORS[engine](models["bf16"], tokenizer, 256).generate(task_prompts(tokenizer, 32), 8, 256,
                                                                               1.0, seeds=[0])
                    for engine in ("fast", "fast-ops"))
    same, first = _greedy_agreement(sampled, ops)
    result["sampled bf16 fast vs fast-ops"] = {"identical_fraction": same, "first_difference_tokens": first}
    print(f"sampled, bf16 fast vs fast-ops (same uniforms): {same:.2f} of 256 completions identical; first "
          f"differences at {first[:8]}")
    with torch.no_grad():
        exact, plain_bf16 = (_forward_logprobs(models[dtype], sampled) for dtype in ("fp32", "bf16"))
        exact_ops = _forward_logprobs(models["fp32"], ops)
    for key, values, reference, batch in (
            ("logprob error, fast-ops bf16 sampler vs fp32 forward", ops.logprobs, exact_ops, ops),
            ("logprob error, fast bf16 sampler vs fp32 forward", sampled.logprobs, exact, sampled),
            ("logprob error, plain bf16 forward vs fp32 forward", plain_bf16, exact, sampled),
            ("logprob difference, fast bf16 sampler vs plain bf16 forward", sampled.logprobs, plain_bf16, sampled)):
        where = batch.completion_mask.bool()
        error = (values - reference)[where].abs()
        result[key] = {"mean": error.mean().item(), "p99": error.quantile(0.99).item(), "max": error.max().item()}
        print(f"{key} over {int(where.sum())} tokens: |error| mean {error.mean():.4f}, p99 "
              f"{error.quantile(0.99):.4f}, max {error.max():.4f}")
    return result


def _forward_logprobs(model, batch, temperature: float = 1.0):
    """``batch``'s completion log-probs under a plain forward of ``model``."""
    return completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_length,
                               batch.completion_mask, temperature=temperature)


@torch.no_grad()
def _time_decode(state) -> tuple:
    """ms per decode step as a graph replay and op by op, and a CUDA profile of eager steps, all on the
    same columns (rewound each time, inside the widest captured window)."""
    window = max(state.graphs)

    def rewind():
        state.column.fill_(window - 40)
        state.step_index.zero_()

    def timed(step, n=30) -> float:
        rewind()
        start = synced()
        for _ in range(n):
            step()
        return (synced() - start) / n * 1000

    graph_ms = timed(state.graphs[window].replay)
    with cached_attention_for(state.model, state.fused):  # as FastGenerator.generate runs it
        eager_ms = timed(lambda: state._decode(window))
        rewind()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                state._decode(window)
            torch.cuda.synchronize()
    return graph_ms, eager_ms, prof, window


def decode_profile(state) -> dict:
    """A decode step of ``state`` as a graph replay and op by op, and its kernels by kind."""
    graph_ms, eager_ms, prof, window = _time_decode(state)
    kinds, kernels = kernel_kinds(prof, 10)
    return {"graph_ms_per_step": graph_ms, "eager_ms_per_step": eager_ms, "kernel_ms_per_step": sum(kinds.values()),
            "kernels_per_step": kernels, "kernel_ms_by_kind": kinds, "window": window,
            "top_kernels": prof.key_averages().table(sort_by="device_time_total", row_limit=12)}


def kernel_kinds(prof, repeats: int) -> tuple[dict[str, float], float]:
    """GPU kernel milliseconds by kind, and the number of kernels, per repeat of the profiled work."""
    kinds: dict[str, float] = {}
    kernels = 0
    for event in prof.key_averages():
        # kernels only: operators, autograd nodes and the optimizer's ranges carry their kernels' time too
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        cuda_us = event.self_device_time_total
        key = event.key.lower()
        kind = ("onelayer kernels" if any(k in key for k in ("_attention_kernel", "_sample_kernel"))
                else "matmul" if any(k in key for k in ("gemm", "cutlass", "sm90", "xmma", "cublas", "gemv"))
                else "reduce/softmax" if any(k in key for k in ("reduce", "softmax", "argmax", "norm"))
                else "copy/index" if any(k in key for k in ("copy", "index", "scatter", "gather", "cat"))
                else "elementwise/other")
        kinds[kind] = kinds.get(kind, 0.0) + cuda_us / repeats / 1000
        kernels += event.count
    return kinds, kernels / repeats


def by_kind(kinds: dict[str, float], digits: int) -> str:
    """Kernel milliseconds by kind, largest first."""
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def print_profile(label: str, row: dict) -> None:
    print(f"{label}: graph replay {row['graph_ms_per_step']:.2f} ms/step, eager {row['eager_ms_per_step']:.2f} ms/step; "
          f"kernels {row['kernel_ms_per_step']:.2f} ms in {row['kernels_per_step']:.0f} launches "
          f"({by_kind(row['kernel_ms_by_kind'], 2)})", flush=True)
    print("\n".join(row["top_kernels"].splitlines()[:9]), flush=True)


def section_profile(args) -> dict:
    """Where a captured decode step's time goes: kernels by kind (from an eager step on the same state),
    and the step as a graph replay vs launched op by op."""
    tokenizer = load_tokenizer("smollm2")
    out = {}
    for name, rows, engine in (("smollm2", 1024, "fast-ops"), ("smollm2", 1024, "fast"), ("smollm2", 64, "fast"),
                               ("qwen3-8B", 256, "fast-ops"), ("qwen3-8B", 256, "fast")):
        model = load_model("smollm2", "cuda", "bf16", "eager") if name == "smollm2" else \
            qwen3_shaped("8B", len(tokenizer))
        generator = GENERATORS[engine](model, tokenizer, rows, ignore_eos=True)
        generator.generate(task_prompts(tokenizer, rows), 1, 128, 1.0, 1.0)
        label = f"{name} batch {rows} {engine}"
        out[label] = decode_profile(generator.state)
        print_profile(label, out[label])
        del model, generator
        torch.cuda.empty_cache()
    return out


def graph_time_us(call, repeats: int = 20, replays: int = 5) -> float:
    """Microseconds per call of ``call`` on the GPU alone: ``repeats`` calls captured in a CUDA graph
    (no launch overhead), replayed ``replays`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    graph.replay()
    start = synced()
    for _ in range(replays):
        graph.replay()
    return (synced() - start) / (repeats * replays) * 1e6


def section_architectures(args) -> dict:
    """The tests' tiny random model of every fast-engine architecture, float32 on the GPU: greedy tokens of
    the fast engine (Triton kernels, CUDA graphs) against transformers' generate, and its sampled log-probs
    against a plain forward."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models (no pytest needed)
    from tests.tiny import ARCHS, make_char_tokenizer, tiny_model

    tokenizer = make_char_tokenizer()
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": t}] for t in ("abc", "x y z qq", "12")])
    rows = []
    for arch in ARCHS:
        model = tiny_model(arch).cuda()
        fast = FastGenerator(model, tokenizer, 4).generate(prompts, 2, 150, temperature=0.0)
        plain = HFGenerator(model, tokenizer, 4).generate(prompts, 2, 150, temperature=0.0)
        row = {"arch": arch, "kernels": FastGenerator(model, tokenizer).kernels,
               "greedy_identical": fast.texts == plain.texts and torch.equal(fast.input_ids, plain.input_ids)}
        for use_kernels in (True, False):  # the torch ops' error is the yardstick
            sampled = FastGenerator(model, tokenizer, 6, kernels=use_kernels).generate(prompts, 2, 150,
                                                                                       temperature=1.5, seeds=[0])
            with torch.no_grad():
                forward = _forward_logprobs(model, sampled, temperature=1.5)
            key = "logprob_max_error" + ("" if use_kernels else "_torch_ops")
            row[key] = (sampled.logprobs - forward).abs().max().item()
        rows.append(row)
        print(f"{arch:9s} kernels {row['kernels']}: greedy {'identical to' if row['greedy_identical'] else 'DIFFERS from'}"
              f" generate; sampled log-probs vs a plain forward: max |error| {row['logprob_max_error']:.1e} (torch "
              f"ops: {row['logprob_max_error_torch_ops']:.1e})", flush=True)
    return {"rows": rows}


def _first(function, *args, **kwargs):
    return function(*args, **kwargs)[0]


def section_attention(args) -> dict:
    """One decode step's attention of one layer: the Triton kernel at several block sizes vs the torch ops,
    on bf16 caches shaped as SmolLM2's (batch 1024) and the Qwen3-8B-shaped model's (batch 256), rows
    left-padded by 0-40 columns and written up to column 280 of 320/640. GB/s counts the visible keys
    and values once."""
    from onelayer.rollout.fast import cached_attention
    from onelayer.rollout.kernels import decode_attention

    rows = []
    for name, batch, q_heads, kv_heads, dim, columns in (("smollm2", 1024, 9, 3, 64, 320),
                                                         ("qwen3-8B", 256, 32, 8, 128, 640)):
        g = torch.Generator(device="cuda").manual_seed(0)
        query = torch.randn(batch, q_heads, 1, dim, device="cuda", generator=g, dtype=torch.bfloat16)
        key, value = (torch.randn(batch, kv_heads, columns, dim, device="cuda", generator=g, dtype=torch.bfloat16)
                      for _ in range(2))
        padding = torch.randint(0, 41, (batch, 1), device="cuda", generator=g)
        position = torch.arange(columns, device="cuda")
        mask = ((position >= padding) & (position <= 280))[:, None, None, :]
        visible_bytes = int(mask.sum()) * kv_heads * dim * 2 * 2
        window = 320  # the torch ops read the captured window: the written columns rounded up to 64
        scale = dim ** -0.5
        candidates = {f"kernel {b} cols {w} warps": functools.partial(decode_attention, query, key, value, mask, scale,
                                                                      0.0, b, w)
                      for b, w in ((32, 4), (64, 4), (128, 4), (64, 8), (128, 8), (64, 2))}
        candidates["torch ops"] = functools.partial(_first, cached_attention, None, query, key[:, :, :window],
                                                    value[:, :, :window], mask[..., :window], scaling=scale)
        reference = candidates["torch ops"]().float()
        for label, call in candidates.items():
            error = (call().float() - reference).abs().max().item()
            us = graph_time_us(call)
            rows.append({"model": name, "rows": batch, "variant": label, "us": us, "gb_per_s": visible_bytes / us / 1e3,
                         "max_difference_vs_ops": error})
            print(f"{name:9s} batch {batch:5d} {label:22s} {us:8.1f} us  {visible_bytes / us / 1e3:7.0f} GB/s "
                  f"(max |difference| vs torch ops {error:.3g})", flush=True)
    return {"rows": rows}


def section_generation(args) -> dict:
    rows = []
    tokenizer = load_tokenizer("smollm2")
    for name in args.models.split(","):
        if name == "smollm2":
            model, new_tokens = load_model("smollm2", "cuda", "bf16", "eager"), 256
        else:
            model, new_tokens = qwen3_shaped(name.removeprefix("qwen3-"), len(tokenizer)), 128
        for batch in map(int, args.batches.split(",")):
            prompts = task_prompts(tokenizer, batch)
            for engine in args.generation_engines.split(","):
                try:
                    generator = GENERATORS[engine](model, tokenizer, batch, ignore_eos=True)
                    row = time_generation(generator, prompts, new_tokens)
                except torch.cuda.OutOfMemoryError:
                    row = {"rows": batch, "new_tokens": new_tokens, "error": "out of GPU memory"}
                generator = None
                torch.cuda.empty_cache()
                rows.append({"model": name, "engine": engine, **row})
                print(f"{name:12s} {engine:13s} batch {batch:5d}: " + (
                    row["error"] if "error" in row else
                    f"{row['tokens_per_s']:10.0f} new tokens/s {row['ms_per_step']:7.2f} ms/step "
                    f"(peak {row['peak_gb']:.1f} GB; first call {row['first_call_s']:.1f} s)"), flush=True)
        del model
        torch.cuda.empty_cache()
    for r in rows:
        if r["engine"] != "plain" and "error" not in r:
            plain = next((p for p in rows if p["engine"] == "plain" and p["model"] == r["model"]
                          and p["rows"] == r["rows"] and "error" not in p), None)
            r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain else None
            if plain:
                print(f"{r['model']:12s} {r['engine']:13s} batch {r['rows']:5d}: {r['speedup']:.1f}x plain", flush=True)
    return {"rows": rows}


def section_compiled(args) -> dict:
    tokenizer = load_tokenizer("smollm2")
    model = load_model("smollm2", "cuda", "bf16", "eager")
    rows = []
    for batch in (256, 1024, 3840):
        prompts = task_prompts(tokenizer, batch)
        for compiled in (False, True):
            generator = FastGenerator(model, tokenizer, batch, ignore_eos=True, compiled=compiled)
            row = {"compiled": compiled, **time_generation(generator, prompts, 96)}
            rows.append(row)
            print(f"batch {batch:5d} {'compiled' if compiled else 'eager   '}: {row['tokens_per_s']:10.0f} new tokens/s "
                  f"{row['ms_per_step']:7.2f} ms/step; first call {row['first_call_s']:.1f} s; peak "
                  f"{row['peak_gb']:.1f} GB", flush=True)
            del generator
            torch.cuda.empty_cache()
        fused = rows[-1]
        fused["speedup"] = fused["tokens_per_s"] / rows[-2]["tokens_per_s"]
        print(f"batch {batch}: compiled / eager = {fused['speedup']:.2f}x", flush=True)
    return {"rows": rows}


def _time_update(update, profiled: bool) -> dict:
    """Seconds of the first call of ``update`` (compilation, if any), the median of the next 5, their peak
    memory (as the update reports it), and optionally a profile of 3 more."""
    start = synced()
    peaks = [update()[1]]
    row = {"first_call_seconds": synced() - start}
    times = []
    for _ in range(5):
        start = synced()
        peaks.append(update()[1])
        times.append(synced() - start)
    row.update(seconds=statistics.median(times), peak_gb=max(peaks) / 2**30)
    if profiled:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            start = synced()
            for _ in range(3):
                update()
            wall = (synced() - start) / 3 * 1000
        kinds, kernels = kernel_kinds(prof, 3)
        row.update(profile_wall_ms=wall, kernel_ms=sum(kinds.values()), kernels=kernels, kernel_ms_by_kind=kinds,
                   top_kernels=prof.key_averages().table(sort_by="device_time_total", row_limit=15))
    return row


# (attention, layers, micro-batch rows, compiled layers, profiled)
UPDATE_CASES = [(attention, layers, micro, False, False) for attention in ("eager", "sdpa") for layers in ("15", "0")
                for micro in (64, 128, 256)] + [
    ("eager", "15", 128, True, True), ("sdpa", "15", 256, True, True), ("sdpa", "0", 256, True, False),
    ("sdpa", "all", 128, False, False), ("sdpa", "all", 128, True, False)]


def section_update(args) -> dict:
    """One update on one fixed rollout batch per case (a fresh model each): single layers 15 and 0 and all
    layers, micro-batch sizes, eager vs SDPA attention, eager vs compiled decoder layers; some profiled:
    kernel time by kind against wall time (the rest of the wall time, the GPU waits on Python)."""
    tokenizer = load_tokenizer("smollm2")
    task = get_task(TASK)
    device = torch.device("cuda")
    precision = precision_context(device, torch.bfloat16)
    base = load_model("smollm2", device, "bf16", "eager")
    torch.manual_seed(0)
    with precision:
        batch = FastGenerator(base, tokenizer, 256).generate(task_prompts(tokenizer, 32), 8, 96, 1.0, 1.0)
    del base
    advantages = torch.randn(batch.size, generator=torch.Generator().manual_seed(0))
    tokens = batch.attention_mask.sum().item()
    print(f"rollout batch: {batch.size} rows x {batch.input_ids.shape[1]} columns ({tokens / batch.size:.0f} real "
          f"tokens a row, {batch.completion_lengths.float().mean():.0f} of them completion)", flush=True)
    rows = []
    for attention, layers, micro, compile_layers, profiled in UPDATE_CASES:
        model = load_model("smollm2", device, "bf16", attention)
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(model="smollm2", task=TASK, layers=layers, out=out, prompts_per_step=32, group_size=8,
                                 lr=1e-6, micro_batch_size=micro, dtype="bf16", attention=attention,
                                 compile_layers=compile_layers, sampling=SamplingConfig(max_new_tokens=96))
            run = open_run(config, model, *check_run(config, task))
            row = {"attention": attention, "layers": layers, "micro_batch": micro, "compiled": compile_layers,
                   **_time_update(lambda m=model, r=run: update_phase(m, r, batch, advantages, precision, 0), profiled)}
        rows.append(row)
        print(f"{attention:5s} layers {layers:>3s} micro-batch {micro:3d} {'compiled' if compile_layers else 'eager   '}: "
              f"update {row['seconds'] * 1000:6.1f} ms (first call {row['first_call_seconds']:.1f} s), "
              f"peak {row['peak_gb']:5.1f} GB", flush=True)
        if "kernel_ms" in row:
            print(f"  profiled: wall {row['profile_wall_ms']:.1f} ms, GPU kernels {row['kernel_ms']:.1f} ms in "
                  f"{row['kernels']:.0f} launches ({by_kind(row['kernel_ms_by_kind'], 1)})", flush=True)
            print("\n".join(row["top_kernels"].splitlines()[:10]), flush=True)
        del model
        torch.cuda.empty_cache()
    return {"rows": rows, "rows_per_update": batch.size, "columns": batch.input_ids.shape[1]}


def run_steps(model_name: str, layers: str, steps: int, model=None, tokenizer=None, **overrides) -> dict:
    """Train ``steps`` steps and return the per-phase medians of the steps after the first."""
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(model=model_name, task=TASK, layers=layers, out=out, steps=steps, prompts_per_step=32,
                             group_size=8, lr=1e-6, save_every=10_000, eval_every=0, dtype="bf16", attention="eager",
                             **overrides)
        result = train(config, model=model, tokenizer=tokenizer, progress=False)
        log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    later = log[1:] or log
    keys = ("seconds_step", "seconds_generation", "seconds_rollout", "seconds_update", "completion_tokens",
            "peak_memory_rollout_gb", "peak_memory_update_gb", "truncated_fraction")
    row = {k: statistics.median(r[k] for r in later) for k in keys}
    row["seconds_reward"] = row["seconds_rollout"] - row["seconds_generation"]
    row["first_step_seconds"] = log[0]["seconds_step"]
    row["trainable_parameters"] = result.costs["trainable_parameters"]
    row["peak_gb"] = result.costs["peak_memory_bytes"] / 2**30
    return row


def _print_step(label: str, row: dict) -> None:
    print(f"{label:28s} step {row['seconds_step']:6.2f} s = generation {row['seconds_generation']:5.2f} + reward "
          f"{row['seconds_reward']:5.2f} + update {row['seconds_update']:5.2f}; peak {row['peak_gb']:5.1f} GB "
          f"(rollout {row['peak_memory_rollout_gb']:.1f}, update {row['peak_memory_update_gb']:.1f}); "
          f"{row['completion_tokens']:.0f} tokens/completion; first step {row['first_step_seconds']:.1f} s", flush=True)


def section_step(args) -> dict:
    rows = {}
    for layers in args.step_layers.split(","):
        for engine in args.step_engines.split(","):
            label = f"smollm2 {layers} {engine}"
            # "compiled": the fast engine with --compile-decode and --compile-layers (the first step compiles);
            # "fast-ops": the fast engine without its Triton kernels
            compiled = engine == "compiled"
            sampling = SamplingConfig(max_new_tokens=256, engine="plain" if engine == "plain" else "fast",
                                      compile_decode=compiled, fused_kernels=engine != "fast-ops")
            rows[label] = run_steps("smollm2", layers, args.steps, compile_layers=compiled, sampling=sampling)
            _print_step(label, rows[label])
            torch.cuda.empty_cache()
    return rows


def section_large(args) -> dict:
    tokenizer = load_tokenizer("smollm2")
    model = qwen3_shaped("8B", len(tokenizer))
    rows = {}
    for layers in ("middle:1", "middle:4", "all"):
        label = f"qwen3-8B-shaped {layers}"
        try:
            rows[label] = run_steps("qwen3-8b-shaped", layers, args.large_steps, model=model, tokenizer=tokenizer,
                                    micro_batch_size=args.large_micro_batch,
                                    sampling=SamplingConfig(max_new_tokens=512, generation_batch_size=256))
            _print_step(label, rows[label])
        except torch.cuda.OutOfMemoryError as err:
            rows[label] = {"error": "out of GPU memory", "detail": str(err).splitlines()[0][:300]}
            print(f"{label:28s} does not fit: {rows[label]['detail']}", flush=True)
        # put the model back as it was: bf16 frozen weights (training made the selected ones fp32)
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)
            p.data = p.data.to(torch.bfloat16)
        torch.cuda.empty_cache()
    return rows


def section_trl(args) -> dict:
    """The same SmolLM2 step through TRL's GRPOTrainer (plain generate, no vLLM)."""
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    model, tokenizer = load_model("smollm2", "cuda", "bf16", "eager"), load_tokenizer("smollm2")
    task = get_task(TASK)
    examples = task.examples("train")[:32 * args.steps]
    data = Dataset.from_list([{"prompt": task.messages(e), "index": i} for i, e in enumerate(examples)])

    def reward(prompts, completions, index, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task.score(t, examples[i]).reward for t, i in zip(texts, index, strict=True)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = synced()

        def on_step_end(self, *a, **k):
            times.append(synced() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, per_device_train_batch_size=32, gradient_accumulation_steps=8, num_generations=8,
            max_completion_length=256, temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-6, beta=0.0,
            bf16=True, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[],
            use_vllm=False, loss_type="grpo", shuffle_dataset=False, seed=0)
        trainer = trl.GRPOTrainer(model=model, args=config, reward_funcs=reward, train_dataset=data,
                                  processing_class=tokenizer, callbacks=[Clock()])
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    row = {"trl_version": trl.__version__, "step_seconds": times, "seconds_step": statistics.median(times[1:] or times),
           "first_step_seconds": times[0], "completion_tokens": statistics.median(lengths) if lengths else None,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    print(f"TRL {trl.__version__} GRPOTrainer: step {row['seconds_step']:.2f} s (median of {len(times) - 1} after the "
          f"first, {row['first_step_seconds']:.1f} s); {row['completion_tokens']} tokens/completion; peak "
          f"{row['peak_gb']:.1f} GB", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--models", default="smollm2,qwen3-0.6B,qwen3-8B", help="generation section models")
    parser.add_argument("--batches", default="64,256,1024", help="generation section batch sizes")
    parser.add_argument("--generation-engines", default="plain,fast-ops,fast",
                        help=f"generation section engines, of: {', '.join(GENERATORS)}")
    parser.add_argument("--steps", type=int, default=5, help="RL steps per measurement (the first is a warm-up)")
    parser.add_argument("--step-engines", default="fast",
                        help="engines for the step section: fast, fast-ops (--no-fused-kernels), plain, compiled "
                             "(fast + --compile-decode/-layers)")
    parser.add_argument("--step-layers", default="all,middle:1", help="layer specs for the step section")
    parser.add_argument("--large-steps", type=int, default=3)
    parser.add_argument("--large-micro-batch", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/rl_speed.py measures GPU speed: run it on a machine with CUDA")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["device"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    for name in args.sections.split(","):
        print(f"\n## {name}", flush=True)
        start = time.perf_counter()
        try:
            results[name] = globals()[f"section_{name}"](args)
        except Exception as err:  # keep what the other sections measured
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        results.setdefault("seconds", {})[name] = time.perf_counter() - start
        results_path.write_text(json.dumps(results, indent=2))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

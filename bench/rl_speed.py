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
  trl         the SmolLM2 step through TRL's GRPOTrainer (its plain generate path), same settings and the same
              layers trained (--trl-layers; everything else frozen with onelayer.select_layers)
  floor       the GPU's measured copy bandwidth and bf16 matmul throughput, and the demo recipe's floor per
              phase from them (weights and KV cache read once per decode step, the update's matmuls)
  prefill     the demo's rollout batch: one new token (prompt prefill) against the whole completion
  eos         the demo's prompts and sampling with real EOS (rows end at different steps), one model, by engine:
              plain generate, the fast engine with finished rows kept, and with them dropped (--device cpu
              too: on a CPU `--engine auto` picks plain generate)
  compaction  the demo's joint generation (--compaction-variants single-layer variants x 64 x 8 rows, real EOS)
              with finished rows kept, and dropped once at most a share of them is still going (--compact-below,
              each share a row): seconds, rows decoded per step, and how many completions are the same (the
              same streams; other batch shapes may take other bf16 kernels)
  levers      the demo's update (64 x 8 rollouts, at most 96 new tokens) of layer 15 and of all layers, one
              lever at a time: SDPA attention, larger micro-batches, --liger-kernels, --compile-layers; each
              against the baseline's (the update before issue 26) loss and gradients, with its host
              synchronisations per update
  demo        `onelayer demo`'s GPU scan (30 layers, base, full) with --demo-flags: wall time and where it went
  summary     OUT/summary.md: one table of what OUT/results.json holds (run it last)

--sections scan runs demo,floor,generation,prefill,eos,compaction,levers,step,trl,summary: issue 26's measurements (SmolLM2,
generation at batch 1024 by engine, steps of middle:1 and all layers against TRL, 4 steps each, unless given),
the demo first (the headline; about 11 minutes on an H200), then what explains it (about 6 more).

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
SECTIONS = ("check", "architectures", "attention", "generation", "compiled", "profile", "update", "step", "large", "trl",
            "floor", "prefill", "eos", "compaction", "levers", "demo", "summary")
SCAN_SECTIONS = "demo,floor,generation,prefill,eos,compaction,levers,step,trl,summary"
SCAN_SETTINGS = {"models": "smollm2", "batches": "1024", "generation_engines": "plain,fast,fast-compiled",
                 "step_layers": "middle:1,all", "trl_layers": "middle:1,all", "steps": 4}


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


def synced(device: torch.device | None = None) -> float:
    if device is None or device.type == "cuda":
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


def same_share(a: list[str], b: list[str]) -> float:
    """Fraction of row-wise identical completions."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def _greedy_agreement(a, b) -> tuple[float, list[int]]:
    """Fraction of identical completions, and the first differing token of the others."""
    width = min(a.input_ids.shape[1], b.input_ids.shape[1])
    differ = a.input_ids[:, :width] != b.input_ids[:, :width]
    first = sorted(int(row.float().argmax()) - a.prompt_length for row in differ if row.any())
    return same_share(a.texts, b.texts), first


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
                if engine == "plain" and batch > args.plain_max_batch:
                    continue  # minutes at large batches, and the ratio is known from smaller ones
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


def count_syncs(call) -> tuple[int, object]:
    """Host synchronisations (the CPU waiting for the GPU) during ``call``, as torch's sync debug mode
    reports them, and what ``call`` returned."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            value = call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught), value


def _time_update(update, profiled: bool) -> dict:
    """Seconds of the first call of ``update`` (compilation, if any), the median of the next 5, their peak
    memory (as the update reports it), the host synchronisations of one more, and optionally a profile of 3
    more. ``stats``: the first call's loss and gradient norm (to compare variants of one update)."""
    start = synced()
    stats, peak = update()
    peaks = [peak]
    row = {"first_call_seconds": synced() - start, "stats": {k: stats[k] for k in ("loss", "grad_norm")}}
    times = []
    for _ in range(5):
        start = synced()
        peaks.append(update()[1])
        times.append(synced() - start)
    row.update(seconds=statistics.median(times), peak_gb=max(peaks) / 2**30, host_syncs=count_syncs(update)[0])
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
    """The same SmolLM2 step through TRL's GRPOTrainer (plain generate, no vLLM), training the layers of each
    of --trl-layers (the rest frozen by onelayer.select_layers, as a TRL user would)."""
    rows = {}
    for layers in args.trl_layers.split(","):
        try:
            rows[layers] = trl_step(args, layers)
        except Exception as err:
            rows[layers] = {"error": f"{type(err).__name__}: {err}"[:300]}
            print(f"TRL, layers {layers}: {rows[layers]['error']}", flush=True)
        torch.cuda.empty_cache()
    return {"by_layers": rows}


def trl_step(args, layers: str) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    import onelayer

    model, tokenizer = load_model("smollm2", "cuda", "bf16", "eager"), load_tokenizer("smollm2")
    onelayer.select_layers(model, layers)  # TRL's optimizer takes the parameters that still need gradients
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
    row = {"trl_version": trl.__version__, "layers": layers, "step_seconds": times, "seconds_step": statistics.median(times[1:] or times),
           "first_step_seconds": times[0], "completion_tokens": statistics.median(lengths) if lengths else None,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    print(f"TRL {trl.__version__} GRPOTrainer, layers {layers}: step {row['seconds_step']:.2f} s (median of {len(times) - 1} after the "
          f"first, {row['first_step_seconds']:.1f} s); {row['completion_tokens']} tokens/completion; peak "
          f"{row['peak_gb']:.1f} GB", flush=True)
    return row


# ------------------------------------------------------------------------- issue 26: the demo scan


def demo_recipe(overrides: str = ""):
    """`onelayer demo`'s GPU scan config, with ``KEY=VALUE`` overrides of its recipe (or its sampling)."""
    from onelayer.cli import demo_config

    config = demo_config(tempfile.mkdtemp(prefix="demo-"), gpu=True)
    for item in filter(None, overrides.split(",")):
        key, value = item.split("=", 1)
        target = config.recipe if hasattr(config.recipe, key) else config.recipe.sampling
        kind = type(getattr(target, key))
        setattr(target, key, value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
    return config


def demo_prompts(tokenizer, recipe) -> list[str]:
    """The rendered prompts of the demo recipe's first step."""
    task = get_task(recipe.task, recipe.task_options)
    return render_prompts(tokenizer, [task.messages(e) for e in task.examples("train")[:recipe.prompts_per_step]])


def demo_generation(args):
    """The device, tokenizer, demo recipe (with ``--demo-flags``), SmolLM2 and the recipe's first prompts for the
    sections that generate on ``--device`` (bf16 on a GPU, float32 on a CPU)."""
    device = torch.device(args.device)
    tokenizer = load_tokenizer("smollm2")
    recipe = demo_recipe(args.demo_flags if args.demo_flags != "auto" else "").recipe
    model = load_model("smollm2", device, "bf16" if device.type == "cuda" else "fp32", "eager")
    return device, tokenizer, recipe, model, demo_prompts(tokenizer, recipe)


def demo_batch(model, tokenizer, recipe):
    """One rollout batch of the demo's shape (64 prompts x 8 completions, at most 96 new tokens) from ``model``."""
    prompts = demo_prompts(tokenizer, recipe)
    torch.manual_seed(0)
    with precision_context(torch.device("cuda"), torch.bfloat16):
        return FastGenerator(model, tokenizer, recipe.sampling.generation_batch_size).generate(
            prompts, recipe.group_size, recipe.sampling.max_new_tokens, recipe.sampling.temperature, 1.0)


def measured_peaks() -> dict:
    """The GPU's copy bandwidth (bytes read + written per second) and bf16 matmul throughput: at a large
    square shape, and at the shape of a SmolLM2 MLP projection over the demo's update batch."""
    a = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    copy_s = graph_time_us(functools.partial(b.copy_, a), repeats=10, replays=3) / 1e6
    out = {"copy_bytes_per_s": 2 * a.numel() * a.element_size() / copy_s}
    a = b = None
    for label, (m, k, n) in (("matmul_flops_per_s", (8192, 8192, 8192)),
                             ("matmul_flops_per_s_update_shape", (512 * 160, 576, 1536))):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
        out[label] = 2 * m * k * n / (graph_time_us(lambda x=x, w=w: x @ w, repeats=10, replays=3) / 1e6)
    torch.cuda.empty_cache()
    return out


def demo_floor(peaks: dict, prompt_tokens: float, completion_tokens: float) -> dict:
    """Seconds the demo recipe's phases take at least on a GPU with ``peaks``: per variant-step (one
    single-layer run's step: 512 rows), the decode (each step reads the KV cache written so far; the
    weights, shared by the variants, are not counted) and the update of one middle layer (its matmuls: the
    forward of every layer and of the output head, activation gradients of the layers above, weight
    gradients of the trained one, the head's backward and its checkpointed recompute)."""
    from onelayer.models import load_config

    recipe = demo_recipe().recipe
    text = load_config("smollm2").get_text_config()
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    kv_heads, head_dim = text.num_key_value_heads, text.head_dim if getattr(text, "head_dim", None) else h // text.num_attention_heads
    per_layer = h * (h + 2 * kv_heads * head_dim + h) + 3 * h * text.intermediate_size  # matmul weights
    rows, new = recipe.prompts_per_step * recipe.group_size, recipe.sampling.max_new_tokens
    kv_bytes = layers * 2 * kv_heads * head_dim * 2  # bf16 keys and values per token
    bw, flops = peaks["copy_bytes_per_s"], peaks["matmul_flops_per_s"]
    decode_s = sum(max(rows * (prompt_tokens + t) * kv_bytes / bw,
                       2 * rows * (layers * per_layer + h * vocab) / flops) for t in range(1, new + 1))
    tokens = rows * (prompt_tokens + completion_tokens)
    head = 2 * rows * completion_tokens * h * vocab
    middle = layers // 2
    update_flops = 2 * tokens * per_layer * (layers + (layers - middle) + 1) + 3 * head
    return {"decode_seconds_per_variant_step": decode_s, "update_seconds_per_variant_step": update_flops / flops,
            "rows": rows, "max_new_tokens": new, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "update_flops": update_flops}


def section_floor(args) -> dict:
    peaks = measured_peaks()
    tokenizer = load_tokenizer("smollm2")
    recipe = demo_recipe().recipe
    task = get_task(recipe.task, recipe.task_options)
    prompts = render_prompts(tokenizer, [task.messages(e) for e in task.examples("train")[:64]])
    prompt_tokens = statistics.mean(len(tokenizer(p)["input_ids"]) for p in prompts)
    floor = demo_floor(peaks, prompt_tokens, recipe.sampling.max_new_tokens)
    print(f"copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s; bf16 matmul {peaks['matmul_flops_per_s'] / 1e12:.0f} "
          f"TFLOP/s (8192^3), {peaks['matmul_flops_per_s_update_shape'] / 1e12:.0f} TFLOP/s at a SmolLM2 MLP "
          f"projection of the demo's update batch", flush=True)
    print(f"demo floor per variant-step (512 rows, prompts of {prompt_tokens:.0f} tokens, completions at the "
          f"96-token cap): decode {floor['decode_seconds_per_variant_step'] * 1000:.1f} ms, update of layer 15 "
          f"{floor['update_seconds_per_variant_step'] * 1000:.1f} ms", flush=True)
    return {**peaks, "floor": floor}


def section_prefill(args) -> dict:
    """What sharing prompt prefill could save at most: the demo batch's generation with 1 new token (prefill
    and one decode step) against all 96."""
    tokenizer = load_tokenizer("smollm2")
    model = load_model("smollm2", "cuda", "bf16", "eager")
    recipe = demo_recipe().recipe
    task = get_task(recipe.task, recipe.task_options)
    prompts = render_prompts(tokenizer, [task.messages(e) for e in task.examples("train")[:recipe.prompts_per_step]])
    generator = FastGenerator(model, tokenizer, recipe.sampling.generation_batch_size, ignore_eos=True)
    row = {}
    for new in (1, recipe.sampling.max_new_tokens):
        generator.generate(prompts, recipe.group_size, new, 1.0, 1.0)  # warm-up (graph capture)
        start = synced()
        generator.generate(prompts, recipe.group_size, new, 1.0, 1.0)
        row[f"seconds_{new}_tokens"] = synced() - start
    row["prefill_share"] = row["seconds_1_tokens"] / row[f"seconds_{recipe.sampling.max_new_tokens}_tokens"]
    print(f"demo batch ({recipe.prompts_per_step} x {recipe.group_size}): 1 new token {row['seconds_1_tokens']:.3f} s, "
          f"{recipe.sampling.max_new_tokens} new tokens {row[f'seconds_{recipe.sampling.max_new_tokens}_tokens']:.3f} "
          f"s: prefill is at most {row['prefill_share']:.1%} of generation", flush=True)
    return row


# (label, layers, attention, micro-batch rows, liger kernels, compiled layers); "baseline" is the demo's update
# before issue 26 (unfused, eager attention, micro-batches of 128 rows), "liger + micro-batch 256" its default now
LEVER_CASES = [("baseline", "15", "eager", 128, "off", False), ("sdpa", "15", "sdpa", 128, "off", False),
               ("micro-batch 256", "15", "eager", 256, "off", False),
               ("micro-batch 512", "15", "eager", 512, "off", False), ("liger", "15", "eager", 128, "on", False),
               ("liger + micro-batch 256", "15", "eager", 256, "on", False),
               ("liger + sdpa + micro-batch 256", "15", "sdpa", 256, "on", False),
               ("compiled layers", "15", "eager", 128, "off", True),
               ("baseline", "all", "eager", 128, "off", False), ("liger", "all", "eager", 128, "on", False),
               ("liger + micro-batch 256", "all", "eager", 256, "on", False)]


def section_levers(args) -> dict:
    """The demo's update, one lever at a time, each from the same weights on the same rollouts: its time,
    first call, peak memory, host synchronisations, and its loss and gradient norm against the default's."""
    tokenizer = load_tokenizer("smollm2")
    device = torch.device("cuda")
    precision = precision_context(device, torch.bfloat16)
    recipe = demo_recipe().recipe
    base = load_model("smollm2", device, "bf16", "eager")
    batch = demo_batch(base, tokenizer, recipe)
    del base
    advantages = torch.randn(batch.size, generator=torch.Generator().manual_seed(0))
    print(f"rollout batch: {batch.size} rows x {batch.input_ids.shape[1]} columns, "
          f"{batch.completion_lengths.float().mean():.0f} completion tokens a row", flush=True)
    rows = []
    for label, layers, attention, micro, liger, compiled in LEVER_CASES:
        model = load_model("smollm2", device, "bf16", attention)
        try:
            with tempfile.TemporaryDirectory() as out:
                config = TrainConfig(model="smollm2", task=recipe.task, task_options=recipe.task_options, layers=layers,
                                     out=out, prompts_per_step=recipe.prompts_per_step, group_size=recipe.group_size,
                                     lr=recipe.lr, micro_batch_size=micro, dtype="bf16", attention=attention,
                                     compile_layers=compiled, liger_kernels=liger, sampling=recipe.sampling)
                run = open_run(config, model, *check_run(config))
                row = {"lever": label, "layers": layers, **_time_update(
                    lambda m=model, r=run: update_phase(m, r, batch, advantages, precision, 0), False)}
        except Exception as err:  # a lever that does not run here is a result too
            row = {"lever": label, "layers": layers, "error": f"{type(err).__name__}: {err}"[:300]}
        default = next((r for r in rows if r["lever"] == "baseline" and r["layers"] == layers and "error" not in r), None)
        if "error" in row:
            print(f"layers {layers:>3s} {label:32s}: {row['error']}", flush=True)
        else:
            if default:
                row["speedup"] = default["seconds"] / row["seconds"]
                row["loss_difference"] = abs(row["stats"]["loss"] - default["stats"]["loss"])
                row["grad_norm_relative_difference"] = abs(row["stats"]["grad_norm"] / default["stats"]["grad_norm"] - 1)
            print(f"layers {layers:>3s} {label:32s}: update {row['seconds'] * 1000:6.1f} ms"
                  + (f" ({row['speedup']:.2f}x baseline; loss differs by {row['loss_difference']:.1e}, gradient norm by "
                     f"{row['grad_norm_relative_difference']:.1%})" if default else "")
                  + f"; first call {row['first_call_seconds']:.1f} s; peak {row['peak_gb']:.1f} GB; "
                  f"{row['host_syncs']} host syncs", flush=True)
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    return {"rows": rows, "rows_per_update": batch.size, "columns": batch.input_ids.shape[1]}


def section_eos(args) -> dict:
    """The demo's rollout batch from one model by engine, with real EOS: seconds, and whether the fast engine's
    completions are the same with finished rows kept and dropped."""
    device, tokenizer, recipe, model, prompts = demo_generation(args)
    rows_total = len(prompts) * recipe.group_size
    engines = {"plain": lambda: HFGenerator(model, tokenizer, rows_total),
               "fast, finished rows kept": lambda: FastGenerator(model, tokenizer, rows_total, compact=False),
               "fast, finished rows dropped": lambda: FastGenerator(model, tokenizer, rows_total, compact=True,
                                                                    compact_below=max(args.compact_below))}
    out, texts = [], {}
    for label, make in engines.items():
        generator, seconds = make(), []
        with precision_context(device, next(model.parameters()).dtype):
            for _ in range(3 if device.type == "cuda" else 1):  # on a GPU the first call captures
                torch.manual_seed(0)
                start = synced(device)
                batch = generator.generate(prompts, recipe.group_size, recipe.sampling.max_new_tokens,
                                           recipe.sampling.temperature, 1.0, seeds=[0])
                seconds.append(synced(device) - start)
        texts[label] = batch.texts
        row = {"engine": label, "rows": batch.size, "seconds": min(seconds[1:] or seconds),
               "completion_tokens": float(batch.completion_lengths.float().mean())}
        out.append(row)
        print(f"{batch.size} rows, {label:28s}: {row['seconds']:.2f} s, {row['completion_tokens']:.1f} tokens a "
              "completion", flush=True)
        del generator
        torch.cuda.empty_cache()
    same = same_share(texts["fast, finished rows kept"], texts["fast, finished rows dropped"])
    for row in out[1:]:
        row["speedup_over_plain"] = out[0]["seconds"] / row["seconds"]
        print(f"{row['engine']}: {row['speedup_over_plain']:.2f}x plain", flush=True)
    print(f"fast engine: {same:.1%} of completions the same with finished rows kept and dropped", flush=True)
    return {"rows": out, "same_completions": same}


def section_compaction(args) -> dict:
    """The demo's joint generation with finished rows dropped from the batch and kept, from the same streams."""
    from onelayer.variants import LayerVariants

    device, tokenizer, recipe, model, prompts = demo_generation(args)
    prompts = prompts * args.compaction_variants
    variants = LayerVariants(model, [(i,) for i in range(args.compaction_variants)])
    rows_per_variant = recipe.prompts_per_step * recipe.group_size
    out, texts = [], {}
    for below in [None, *args.compact_below]:  # None: finished rows kept
        generator = FastGenerator(model, tokenizer, row_hook=variants.set_rows, compact=below is not None,
                                  compact_below=below)
        seconds = []
        with precision_context(device, next(model.parameters()).dtype), \
                variants.joint(list(range(args.compaction_variants)), rows_per_variant):
            for _ in range(3 if device.type == "cuda" else 2):  # the first captures the whole batch's steps
                start = synced(device)
                batch = generator.generate(prompts, recipe.group_size, recipe.sampling.max_new_tokens,
                                           recipe.sampling.temperature, 1.0, seeds=list(range(args.compaction_variants)))
                seconds.append(synced(device) - start)
        texts[below] = batch.texts
        row = {"compact": below is not None, "compact_below": below, "rows": batch.size, "first_call_s": seconds[0],
               "seconds": min(seconds[1:]),
               "decode_steps": batch.input_ids.shape[1] - batch.prompt_length,
               "completion_tokens": float(batch.completion_lengths.float().mean()), **generator.stats}
        out.append(row)
        how = "kept" if below is None else f"dropped at <= {below:.0%} going"
        print(f"{batch.size} rows, finished rows {how:24s}: {row['seconds']:.2f} s, "
              f"{row['row_steps']:,} row-steps over {row['decode_steps']} decode steps, {row['compactions']} "
              f"compactions, {row['completion_tokens']:.1f} tokens a completion", flush=True)
        del generator
        torch.cuda.empty_cache()
    for row in out[1:]:
        row["speedup"] = out[0]["seconds"] / row["seconds"]
        row["same_completions"] = same_share(texts[None], texts[row["compact_below"]])
        print(f"dropping finished rows at <= {row['compact_below']:.0%} going: {row['speedup']:.2f}x; "
              f"{row['same_completions']:.1%} of completions the same as with them kept", flush=True)
    return {"rows": out}


def demo_phases(scan_dir: Path) -> dict:
    """Where a scan's time went, from its runs' logs: generation (a joint generation counted once, not once
    per variant), scoring, updates; and how many single-layer variant-steps it made."""
    totals = {"generation": 0.0, "reward": 0.0, "update": 0.0, "variant_steps": 0, "full_steps": 0,
              "completion_tokens_single_layer": []}
    for log in sorted(scan_dir.glob("runs/*/log.jsonl")):
        for line in log.read_text().splitlines():
            r = json.loads(line)
            together = r.get("concurrent_variants", 1)
            share = r["seconds_generation"] / together
            totals["generation"] += share
            # a variant's rollout seconds are its share of the joint generation plus its own scoring
            totals["reward"] += r["seconds_rollout"] - (share if together > 1 else r["seconds_generation"])
            totals["update"] += r["seconds_update"]
            single = log.parent.name.startswith("layer")
            totals["variant_steps" if single else "full_steps"] += 1
            if single:
                totals["completion_tokens_single_layer"].append(r["completion_tokens"])
    tokens = totals.pop("completion_tokens_single_layer")
    totals["mean_completion_tokens_single_layer"] = statistics.mean(tokens) if tokens else None
    return totals


def chosen_levers(results: dict, variant_steps: int = 900, joint_rows: int = 9728, generations: int = 60,
                  shapes: int = 2) -> tuple[str, list[str]]:
    """Demo flags from this run's measurements (the levers and generation sections), and why: a lever is
    taken when it is correct (loss within 1e-3, gradient norm within 2% of the default's) and saves more over
    the demo (``variant_steps`` single-layer updates; ``generations`` joint generations of ``joint_rows``
    rows in ``shapes`` batch shapes) than its first call costs."""
    flags, why = [], []
    levers = {r["lever"]: r for r in results.get("levers", {}).get("rows", []) if r["layers"] == "15"}
    default = levers.get("baseline")
    best, best_net = None, 0.0
    for name, flag in (("liger", "liger_kernels=on"), ("compiled layers", "compile_layers=1,liger_kernels=off")):
        r = levers.get(name)
        if not default or not r or "error" in r or "speedup" not in r:
            why.append(f"{name}: not measured or failed")
            continue
        correct = r["loss_difference"] <= 1e-3 and r["grad_norm_relative_difference"] <= 0.02
        net = variant_steps * (default["seconds"] - r["seconds"]) - (r["first_call_seconds"] - default["first_call_seconds"])
        why.append(f"{name}: {r['speedup']:.2f}x per update, {'correct' if correct else 'NOT within tolerance'}, "
                   f"saves {net:.0f} s over the demo net of its first call")
        if correct and net > best_net:
            best, best_net = flag, net
    if best:
        flags.append(best)
    micro = [(levers[n]["speedup"], rows) for n, rows in (("micro-batch 256", 256), ("micro-batch 512", 512))
             if default and "speedup" in levers.get(n, {})]
    if micro and max(micro)[0] >= 1.03:
        speedup, rows = max(micro)
        flags.append(f"micro_batch_size={rows}")
        why.append(f"micro-batch {rows}: {speedup:.2f}x per update (the same loss: micro-batches only accumulate)")
    gen = {r["engine"]: r for r in results.get("generation", {}).get("rows", [])
           if r["model"] == "smollm2" and "error" not in r}
    widest = max((r["rows"] for r in gen.values()), default=0)
    rows = {r["engine"]: r for r in results.get("generation", {}).get("rows", [])
            if r["model"] == "smollm2" and r["rows"] == widest and "error" not in r}
    if "fast" in rows and "fast-compiled" in rows:
        fast, compiled = rows["fast"], rows["fast-compiled"]
        scale = joint_rows / widest  # decode time grows with rows at this size
        saving = generations * scale * (fast["seconds"] - compiled["seconds"])
        cost = shapes * (compiled["first_call_s"] - fast["first_call_s"])
        why.append(f"compiled decode: {compiled['tokens_per_s'] / fast['tokens_per_s']:.2f}x at batch {widest}; "
                   f"saves ~{saving:.0f} s over the demo's generations, compiling costs ~{cost:.0f} s")
        if saving > cost:
            flags.append("compile_decode=1")
    return ",".join(flags), why


def section_demo(args) -> dict:
    """`onelayer demo`'s GPU scan, with --demo-flags (``auto``: chosen from this run's measurements by
    :func:`chosen_levers`): its wall time, and where the time went."""
    from onelayer.experiments.scan import run_scan

    why = []
    if args.demo_flags == "auto":
        results = json.loads((Path(args.out) / "results.json").read_text())
        args.demo_flags, why = chosen_levers(results)
        print("demo flags chosen from this run's measurements: " + (args.demo_flags or "the defaults") + "\n  "
              + "\n  ".join(why), flush=True)
    config = demo_recipe(args.demo_flags)
    scan_dir = Path(args.out) / "demo" / "scan"
    if scan_dir.exists():
        sys.exit(f"{scan_dir} exists: a resumed scan's wall time is not the scan's; pass another --out")
    config.recipe.out = str(scan_dir)
    start = time.perf_counter()
    run_scan(config, progress=False)
    wall = time.perf_counter() - start
    phases = demo_phases(scan_dir)
    other = wall - phases["generation"] - phases["reward"] - phases["update"]
    row = {"flags": args.demo_flags, "why": why, "wall_seconds": wall, "phases": phases, "other_seconds": other}
    print(f"demo scan ({args.demo_flags or 'defaults'}): {wall:.0f} s = generation {phases['generation']:.0f} + "
          f"scoring {phases['reward']:.0f} + updates {phases['update']:.0f} + evaluations, loading, checkpoints "
          f"{other:.0f}; {phases['variant_steps']} single-layer variant-steps", flush=True)
    return row


def section_summary(args) -> dict:
    """One table of what OUT/results.json holds, in OUT/summary.md."""
    results = json.loads((Path(args.out) / "results.json").read_text())
    lines = [f"# bench/rl_speed.py on {results.get('device')} (torch {results.get('torch')})", ""]
    demo = results.get("demo", {})
    if "wall_seconds" in demo:
        p = demo["phases"]
        lines += ["## The demo scan (30 layers + base + full, 30 steps of 64 x 8 rollouts)", "",
                  "| flags | wall | generation | scoring | updates | evaluations, loading, checkpoints |",
                  "|---|---|---|---|---|---|",
                  f"| {demo['flags'] or 'defaults'} | {demo['wall_seconds']:.0f} s | {p['generation']:.0f} s | "
                  f"{p['reward']:.0f} s | {p['update']:.0f} s | {demo['other_seconds']:.0f} s |", ""]
    floor = results.get("floor", {}).get("floor")
    if floor and "wall_seconds" in demo:
        steps = demo["phases"]["variant_steps"]
        lines += [f"Per single-layer variant-step ({steps} of them): generation "
                  f"{1000 * demo['phases']['generation'] / max(steps, 1):.0f} ms measured (all runs' generation over "
                  f"their variant-steps) vs a decode floor of {1000 * floor['decode_seconds_per_variant_step']:.0f} ms; "
                  f"update floor {1000 * floor['update_seconds_per_variant_step']:.0f} ms.", ""]
    gen = results.get("generation", {}).get("rows", [])
    if gen:
        lines += ["## Generation, new tokens/s", "", "| model | batch | engine | tokens/s | x plain | first call |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['rows']} | {r['engine']} | {r.get('tokens_per_s', 0):,.0f} | "
                  + (f"{r['speedup']:.1f} | " if r.get("speedup") else "- | ") + f"{r.get('first_call_s', 0):.1f} s |"
                  for r in gen if "error" not in r]
        lines.append("")
    levers = results.get("levers", {}).get("rows", [])
    if levers:
        lines += ["## The demo's update, one lever at a time", "",
                  "| layers | lever | update | x baseline | first call | peak | host syncs | loss / grad-norm vs baseline |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in levers:
            if "error" in r:
                lines.append(f"| {r['layers']} | {r['lever']} | failed: {r['error'][:80]} | | | | | |")
                continue
            lines.append(f"| {r['layers']} | {r['lever']} | {1000 * r['seconds']:.0f} ms | {r.get('speedup', 1):.2f} | "
                         f"{r['first_call_seconds']:.1f} s | {r['peak_gb']:.1f} GB | {r['host_syncs']} | "
                         + (f"{r['loss_difference']:.1e} / {r['grad_norm_relative_difference']:.1%} |"
                            if "loss_difference" in r else "- |"))
        lines.append("")
    steps, trl = results.get("step", {}), results.get("trl", {})
    if steps or trl:
        lines += ["## A GRPO step of 32 prompts x 8 completions x 256 tokens, lr 1e-6, like for like", "",
                  "| trained layers | onelayer | TRL GRPOTrainer | x TRL |", "|---|---|---|---|"]
        for layers in sorted({k.split()[1] for k in steps} | set(trl.get("by_layers", {}))):
            ours = next((v for k, v in steps.items() if k.split()[1] == layers and k.endswith(" fast")), None)
            theirs = trl.get("by_layers", {}).get(layers)
            cells = [f"{ours['seconds_step']:.2f} s" if ours else "-",
                     f"{theirs['seconds_step']:.2f} s" if theirs and "seconds_step" in theirs else "-"]
            ratio = (f"{theirs['seconds_step'] / ours['seconds_step']:.1f}x"
                     if ours and theirs and "seconds_step" in theirs else "-")
            lines.append(f"| {layers} | {cells[0]} | {cells[1]} | {ratio} |")
        lines.append("")
    compaction = results.get("compaction", {})
    if compaction.get("rows"):
        kept, *dropped = compaction["rows"]
        if "speedup" in compaction:  # a results.json from before --compact-below: one row, at the engine's rule
            dropped = [{**dropped[0], "compact_below": None, "speedup": compaction["speedup"],
                        "same_completions": compaction["same_completions"]}]
        lines += [f"Dropping finished rows from the demo's joint generation ({kept['rows']} rows; kept: "
                  f"{kept['seconds']:.2f} s, {kept['row_steps']:,} row-steps): "
                  + "; ".join(("by the engine's default rule" if r["compact_below"] is None else
                               f"at <= {r['compact_below']:.0%} going") + f" {r['seconds']:.2f} s ({r['speedup']:.2f}x), "
                              f"{r['compactions']} compactions, {r['row_steps']:,} row-steps, "
                              f"{r['same_completions']:.1%} of completions the same" for r in dropped) + ".", ""]
    prefill = results.get("prefill")
    if prefill and "prefill_share" in prefill:
        lines += [f"Prompt prefill is at most {prefill['prefill_share']:.1%} of the demo batch's generation.", ""]
    (Path(args.out) / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return {"written": str(Path(args.out) / "summary.md")}


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
    parser.add_argument("--plain-max-batch", type=int, default=1024, help="generation section: plain generate "
                        "only up to this batch")
    parser.add_argument("--trl-layers", default="middle:1,all", help="layer specs TRL trains in the trl section")
    parser.add_argument("--demo-flags", default="", help=(
        "demo section: KEY=VALUE,... overrides of the demo recipe, e.g. liger_kernels=off,micro_batch_size=128,compile_decode=1; 'auto': "
        "the levers this run measured to pay (after the levers and generation sections)"))
    parser.add_argument("--compaction-variants", type=int, default=15, help="compaction section: variants at once")
    parser.add_argument("--compact-below", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.75, 1.0],
                        help="compaction section: shares of rows still going at or below which a check compacts")
    parser.add_argument("--device", default="cuda", help="eos and compaction sections: cuda, or cpu (eager decode, float32; "
                        "with --demo-flags prompts_per_step=N for a batch a CPU can take)")
    parser.add_argument("--large-steps", type=int, default=3)
    parser.add_argument("--large-micro-batch", type=int, default=8)
    args = parser.parse_args()
    if "scan" in args.sections.split(","):  # issue 26's settings, where not given
        for key, value in SCAN_SETTINGS.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    cpu_sections = {"eos", "compaction", "summary"}
    if not torch.cuda.is_available() and not (args.device == "cpu" and set(args.sections.split(",")) <= cpu_sections):
        sys.exit("bench/rl_speed.py measures GPU speed: run it on a machine with CUDA (only --sections compaction "
                 "or --sections eos --device cpu run without one)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results["torch"] = torch.__version__
    for name in args.sections.replace("scan", SCAN_SECTIONS).split(","):
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

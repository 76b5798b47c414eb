"""Runs that outgrow one GPU: sharded full-parameter training over several GPUs against one GPU, and the memory
estimate (``onelayer plan``) against measured peaks.

Run each section under torchrun with the number of GPUs it measures (``python`` alone is one GPU); results go to
``OUT/results.json`` under ``SECTION-NgpuS`` (rank 0 writes):

    python bench/multigpu.py --out OUT --sections estimate               # one GPU
    python bench/multigpu.py --out OUT --sections large                  # one GPU: the 8B-shaped model, middle:1
    torchrun --nproc_per_node 2 bench/multigpu.py --out OUT --sections large     # two GPUs: full, sharded
    python bench/multigpu.py --out OUT --sections smollm2                # one GPU, and the noise floor
    torchrun --nproc_per_node 2 bench/multigpu.py --out OUT --sections smollm2   # the same global batch on two
    python bench/multigpu.py --out OUT --sections save-8b                # a random 8B-shaped model directory ...
    torchrun --nproc_per_node 2 -m onelayer scan --model OUT/qwen3-8b-shaped ...  # ... scanned (see the README)
    python bench/multigpu.py --out OUT --sections report                 # tables of everything above (no GPU)

Sections:
  estimate  SmolLM2 (all, middle:1 at micro-batches of 32 and 128, eager and SDPA attention), two steps each on one
            GPU: measured peak of each phase against onelayer.memory's estimate (the large section does the same for
            the 8B-shaped model)
  large     the Qwen3-8B-shaped random model, GRPO steps of 256 rollouts x 512 tokens (32 prompts x 8; a random model
            rarely samples EOS): over N > 1 GPUs full-parameter training (sharded), on one GPU middle:1 (and the estimate of
            full training there); seconds per step by phase, peak memory per GPU against the estimate
  smollm2   SmolLM2 full-parameter GRPO (the scan recipe of docs/results/2026-11-22-scan-smollm2, 64 prompts x 8,
            30 steps, greedy evaluation on 500 problems every 10 steps) on N GPUs with the same global batch; on one
            GPU also the noise floor: the same run with generation batches of 128 rows (other kernel shapes only)
  save-8b   write OUT/qwen3-8b-shaped: the random model (bf16 safetensors, ~16 GB) with SmolLM2's tokenizer, for scans
  report    the tables of docs/results from OUT (runs on a CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

from onelayer.cli import EASY_ARITHMETIC
from onelayer.config import SamplingConfig, TrainConfig
from onelayer.jsonl import read_jsonl
from onelayer.memory import GB, estimate, prompt_tokens
from onelayer.models import load_tokenizer
from onelayer.training import train
from onelayer.training.distributed import torchrun_world

sys.path.insert(0, str(Path(__file__).parent))
from rl_speed import TASK, qwen3_shaped  # noqa: E402

SECTIONS = ("estimate", "large", "smollm2", "save-8b", "report")
PHASES = ("seconds_step", "seconds_generation", "seconds_rollout", "seconds_update")


def step_medians(out: Path) -> dict:
    """Medians of a run's log after its first (warm-up) step, and the largest peak of each phase."""
    log = list(read_jsonl(out / "log.jsonl"))
    later = log[1:] or log
    row = {k: statistics.median(r[k] for r in later) for k in (*PHASES, "completion_tokens")}
    row["seconds_reward"] = row["seconds_rollout"] - row["seconds_generation"]
    row.update(first_step_seconds=log[0]["seconds_step"], world_size=log[0]["world_size"],
               sharding=log[0]["sharding"], steps=len(log))
    for phase in ("rollout", "update"):
        row[f"peak_{phase}_gb"] = max(r.get(f"peak_memory_{phase}_gb", 0.0) for r in log)
    return row


def with_estimate(row: dict, config: TrainConfig, gpus: int, tokens: int) -> dict:
    """``row`` with the estimate of each phase's peak beside the measured one."""
    found = estimate(config, gpus, tokens, torch.cuda.get_device_properties(0).total_memory)
    row.update(estimate_rollout_gb=found.rollout_phase / GB, estimate_update_gb=found.update_phase / GB,
               estimate_parts_gb={k: v / GB for k, v in found.parts.items()}, prompt_tokens=tokens)
    return row


def _print(label: str, row: dict) -> None:
    print(f"{label:40s} step {row['seconds_step']:6.2f} s = generation {row['seconds_generation']:5.2f} + reward "
          f"{row['seconds_reward']:5.2f} + update {row['seconds_update']:5.2f}; peak rollout "
          f"{row['peak_rollout_gb']:.1f} GB (estimate {row.get('estimate_rollout_gb', float('nan')):.1f}), update "
          f"{row['peak_update_gb']:.1f} GB (estimate {row.get('estimate_update_gb', float('nan')):.1f}); "
          f"{row['completion_tokens']:.0f} tokens/completion", flush=True)


def _fresh(out: Path) -> Path:
    import shutil

    if torchrun_world().is_main:
        shutil.rmtree(out, ignore_errors=True)
    torchrun_world().barrier()
    return out


# ------------------------------------------------------------------------------------------- sections


def section_estimate(args, gpus: int) -> dict:
    """Measured phase peaks of short runs on one GPU against the estimate."""
    if gpus != 1:
        raise SystemExit("the estimate section measures one GPU: run it without torchrun")
    rows = {}
    smollm2 = TrainConfig(model="smollm2", task=TASK, task_options=EASY_ARITHMETIC, steps=2, prompts_per_step=32,
                          group_size=8, lr=1e-6, save_every=10_000, dtype="bf16",
                          sampling=SamplingConfig(max_new_tokens=256))
    tokens = prompt_tokens(smollm2)
    for attention in ("eager", "sdpa"):
        for layers in ("all", "middle:1"):
            for micro in (32, 128):
                config = replace(smollm2, layers=layers, micro_batch_size=micro, attention=attention,
                                 out=str(_fresh(Path(args.out) / "runs" / f"estimate-smollm2-{layers}-{micro}-{attention}")))
                train(config, progress=False)
                label = f"smollm2 {layers} micro {micro} {attention}"
                rows[label] = with_estimate(step_medians(Path(config.out)), config, 1, tokens)
                _print(label, rows[label])
    return rows


def _large_config(args, layers: str, out: Path) -> TrainConfig:
    return TrainConfig(model=str(_config_dir(args)), task=TASK, layers=layers, out=str(out), steps=args.large_steps,
                       prompts_per_step=32, group_size=8, lr=1e-6, save_every=10_000, dtype="bf16",
                       attention=args.attention, micro_batch_size=args.large_micro_batch,
                       sampling=SamplingConfig(max_new_tokens=512, generation_batch_size=256))


def _config_dir(args) -> Path:
    """A directory with the 8B-shaped model's config only (what onelayer.memory reads; no weights)."""
    path = Path(args.out) / "qwen3-8b-shaped-config"
    if not (path / "config.json").is_file() and torchrun_world().is_main:
        qwen3_shaped_config(len(load_tokenizer("smollm2"))).save_pretrained(path)
    torchrun_world().barrier()
    return path


def qwen3_shaped_config(vocab_size: int):
    from transformers import Qwen3Config

    config = Qwen3Config(vocab_size=max(151936, vocab_size), max_position_embeddings=40960, hidden_size=4096,
                         intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, tie_word_embeddings=False)
    config.eos_token_id = 0
    return config


def section_large(args, gpus: int) -> dict:
    """The 8B-shaped model: full training sharded over ``gpus`` > 1 GPUs, or middle:1 on one (and the estimate
    of full training there)."""
    tokenizer = load_tokenizer("smollm2")
    rows = {}
    for spec in ("all",) if gpus > 1 else ("middle:1",):
        torch.manual_seed(0)  # the same random model on every process
        model = qwen3_shaped("8B", len(tokenizer))
        out = _fresh(Path(args.out) / "runs" / f"large-{spec}-{gpus}gpu")
        config = _large_config(args, spec, out)
        # a random model's completions run to the cap: its EOS ids are 2 of ~152k tokens. No checkpoint: full
        # training's would be 83 GB (float32 weights and AdamW state) of a 128 GB disk, and is not measured here
        with mock.patch.object(sys.modules["onelayer.training.train"], "save_due"):
            train(replace(config, model="qwen3-8b-shaped"), model=model, tokenizer=tokenizer, progress=False)
        tokens = prompt_tokens(replace(config, model="smollm2"))
        label = f"qwen3-8B-shaped {spec} on {gpus} GPU(s)"
        rows[label] = with_estimate(step_medians(out), config, gpus, tokens)
        if torchrun_world().is_main:
            _print(label, rows[label])
        del model
        torch.cuda.empty_cache()
    if gpus == 1:
        full = estimate(_large_config(args, "all", Path(".")), 1, rows[label]["prompt_tokens"],
                        torch.cuda.get_device_properties(0).total_memory)
        rows["qwen3-8B-shaped all on 1 GPU (estimate only)"] = {"estimate_rollout_gb": full.rollout_phase / GB,
                                                                "estimate_update_gb": full.update_phase / GB}
        print(f"full training on this one GPU would need ~{full.peak / GB:.0f} GB (estimate): not run", flush=True)
    return rows


def smollm2_recipe(out: Path, **overrides) -> TrainConfig:
    """The scan recipe of docs/results/2026-11-22-scan-smollm2 for full-parameter training, evaluated every 10
    steps."""
    return TrainConfig(model="smollm2", task=TASK, task_options={**EASY_ARITHMETIC, "eval_size": 500}, layers="all",
                       out=str(out), steps=30, prompts_per_step=64, group_size=8, lr=2e-5, micro_batch_size=128,
                       eval_every=10, eval_n=500, save_every=10, attention="eager", dtype="bf16",
                       sampling=SamplingConfig(max_new_tokens=96, generation_batch_size=512), **overrides)


def section_smollm2(args, gpus: int) -> dict:
    """SmolLM2 full-parameter training on ``gpus`` GPUs (and, on one, the noise floor)."""
    runs = {f"smollm2 all on {gpus} GPU(s)": {}}
    if gpus == 1:
        runs["smollm2 all on 1 GPU, generation batches of 128 (noise floor)"] = {
            "sampling": SamplingConfig(max_new_tokens=96, generation_batch_size=128)}
    rows = {}
    for label, overrides in runs.items():
        slug = "floor" if "floor" in label else f"{gpus}gpu"
        config = smollm2_recipe(_fresh(Path(args.out) / "runs" / f"smollm2-all-{slug}"), **overrides)
        start = time.perf_counter()
        train(config, progress=False)
        if not torchrun_world().is_main:
            continue
        evals = list(read_jsonl(Path(config.out) / "eval.jsonl"))
        rows[label] = {**step_medians(Path(config.out)), "wall_seconds": time.perf_counter() - start,
                       "rewards": [r["reward"] for r in read_jsonl(Path(config.out) / "log.jsonl")],
                       "eval": [{k: e[k] for k in ("step", "accuracy", "ci_low", "ci_high")} for e in evals]}
        _print(label, rows[label])
        print("  eval accuracy by step: " + ", ".join(f"{e['step']}: {e['accuracy']:.3f} [{e['ci_low']:.3f}, "
                                                      f"{e['ci_high']:.3f}]" for e in rows[label]["eval"]), flush=True)
    return rows


def section_save_8b(args, gpus: int) -> dict:
    """Write the random 8B-shaped model (bf16) and SmolLM2's tokenizer to OUT/qwen3-8b-shaped."""
    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    model = qwen3_shaped("8B", len(tokenizer))
    path = Path(args.out) / "qwen3-8b-shaped"
    model.generation_config.eos_token_id = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"path": str(path), "parameters": sum(p.numel() for p in model.parameters())}


def section_report(args, gpus: int) -> dict:
    """Markdown tables of what OUT holds."""
    results = json.loads((Path(args.out) / "results.json").read_text())
    print("| run | step s | generation | reward | update | peak GB rollout / update (estimate) | tokens |")
    print("|---|---|---|---|---|---|---|")
    for key, rows in results.items():
        if not isinstance(rows, dict) or key in ("seconds",):
            continue
        for label, row in rows.items():
            if isinstance(row, dict) and "seconds_step" in row:
                print(f"| {label} | {row['seconds_step']:.2f} | {row['seconds_generation']:.2f} | "
                      f"{row['seconds_reward']:.2f} | {row['seconds_update']:.2f} | {row['peak_rollout_gb']:.1f} "
                      f"({row.get('estimate_rollout_gb', float('nan')):.1f}) / {row['peak_update_gb']:.1f} "
                      f"({row.get('estimate_update_gb', float('nan')):.1f}) | {row['completion_tokens']:.0f} |")
    scan = Path(args.out) / "scan8b"
    if (scan / "scan.json").is_file():
        print("\n| scan run | GPUs | train s | peak GB per GPU | accuracy |\n|---|---|---|---|---|")
        for path in sorted((scan / "runs").glob("*/result.json")):
            r = json.loads(path.read_text())
            peak = r.get("peak_memory_bytes")
            print(f"| {r['name']} | {r.get('world_size', 1)} | {r.get('train_seconds') or 0:.0f} | "
                  f"{peak / GB if peak else float('nan'):.1f} | {r['accuracy']:.3f} |")
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--sections", default="estimate")
    parser.add_argument("--large-steps", type=int, default=4, help="steps of the large section (the first: warm-up)")
    parser.add_argument("--large-micro-batch", type=int, default=8)
    parser.add_argument("--attention", default="sdpa", help="attention of the large section's updates")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if sections != ["report"] and not torch.cuda.is_available():
        sys.exit("bench/multigpu.py measures GPUs: run it on a machine with CUDA (the report section needs none)")
    world = torchrun_world()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    for name in sections:
        if world.is_main:
            print(f"\n## {name} on {world.size} GPU(s)", flush=True)
        start = time.perf_counter()
        try:
            rows = globals()[f"section_{name.replace('-', '_')}"](args, world.size)
        except Exception as err:  # keep what the other sections measured
            import traceback

            traceback.print_exc()
            rows = {"error": f"{type(err).__name__}: {err}"[:500]}
        if world.is_main and name != "report":
            results = json.loads(results_path.read_text()) if results_path.is_file() else {}
            results.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
            results[f"{name}-{world.size}gpu"] = rows
            results.setdefault("seconds", {})[f"{name}-{world.size}gpu"] = time.perf_counter() - start
            results_path.write_text(json.dumps(results, indent=2))
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()

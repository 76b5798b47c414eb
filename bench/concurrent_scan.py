"""A whole-model layer scan one run at a time vs single-layer runs trained together, on one GPU.

    python bench/concurrent_scan.py --out bench-out                      # parity, alone, together
    python bench/concurrent_scan.py --out bench-out --sections alone --steps 5 --solo-layers 0,15,29
    python bench/concurrent_scan.py --out bench-out --sections together  # after alone, same --out

Sections (each prints a table and adds to OUT/results.json; alone and together may run in separate calls):
  parity    SmolLM2, --parity-layers for a few steps in --parity-dtype, trained together, alone, and alone with
            another generation batch size (the floating-point noise floor: same streams, other kernels):
            per-step rewards and losses, and how far the final weights differ relative to how far
            training moved them
  alone     a full 30-layer scan's base, full and --solo-layers runs timed one at a time (the one-at-a-time
            layer time is their mean times 30)
  generation  one joint generation step of --generation-variants single-layer variants x 256 rows (rows routed
            through their own layer copies) vs the same rows on the plain model, decode eager or compiled
  architectures  tiny random models of every fast-engine architecture (the tests' models, on the GPU in
            float32): three single-layer variants trained together and each alone, rewards, losses and weights
  together  all 30 layers trained --concurrent at a time (0 = as many as fit), then the comparison: wall
            time of the whole scan both ways, and where a concurrent step's time goes
GPU utilisation and memory are sampled by nvidia-smi every 0.5 s.

The base and full runs are the same in both modes (they never run concurrently), so the concurrent scan
reuses the ones timed one at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from onelayer.config import SamplingConfig, ScanConfig, TrainConfig
from onelayer.experiments.rundir import run_dir
from onelayer.experiments.scan import PlannedRun, concurrency, execute_run, run_scan

TASK_OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"],
                "allow_parentheses": False, "allow_negation": False, "eval_size": 500}


# Settings that change speed, not the science, set from the command line (--micro-batch, --compile-layers):
# alone and together runs of one call always share them.
TUNING = {"micro_batch_size": 128, "compile_layers": False}


def recipe(out: Path, steps: int, layers: str, eval_n: int) -> TrainConfig:
    """The scan recipe of docs/results/2026-11-22-scan-smollm2 at 32 prompts x 8 samples."""
    return TrainConfig(model="smollm2", task="rg:basic_arithmetic", task_options=dict(TASK_OPTIONS), algo="grpo",
                       layers=layers, out=str(out), steps=steps, prompts_per_step=32, group_size=8, lr=2e-5,
                       save_every=steps, eval_n=eval_n, attention="eager", seed=0,
                       sampling=SamplingConfig(max_new_tokens=96, generation_batch_size=256), **TUNING)


class GpuSampler:
    """nvidia-smi utilisation and memory every 0.5 s while running."""

    def __init__(self):
        self.rows: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        for line in proc.stdout:
            if self._stop.is_set():
                break
            parts = line.strip().split(",")
            if len(parts) == 2:
                self.rows.append((time.time(), float(parts[0]), float(parts[1])))
        proc.kill()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)

    def summary(self, start: float, end: float) -> dict:
        rows = [r for r in self.rows if start <= r[0] <= end]
        if not rows:
            return {}
        return {"gpu_util_mean": statistics.mean(r[1] for r in rows), "gpu_mem_max_mib": max(r[2] for r in rows)}


def read_log(directory: Path) -> list[dict]:
    path = directory / "log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def distance(a: dict, b: dict) -> float:
    """Euclidean distance between two sets of named tensors, over the names of ``b``."""
    return sum(((a[n] - v.to(a[n].device)) ** 2).sum().item() for n, v in b.items()) ** 0.5


def timed(results: dict, key: str, sampler: GpuSampler, work) -> float:
    """Wall time of ``work``, with nvidia-smi's utilisation and memory over it (torch's peak counter is reset
    by every training step, and each run logs its own peaks)."""
    start = time.time()
    work()
    end = time.time()
    results[key] = {"seconds": end - start, **sampler.summary(start, end)}
    print(f"{key}: {end - start:.1f} s, GPU memory up to {results[key].get('gpu_mem_max_mib', float('nan')) / 1024:.1f} "
          f"GB, GPU util {results[key].get('gpu_util_mean', float('nan')):.0f}%", flush=True)
    return end - start


def parity(out: Path, steps: int, dtype: str, layers: list[str]) -> dict:
    """``layers`` trained together and alone in ``dtype``; the noise floor is the same solo run with
    another generation batch size (same random streams, other kernel shapes, so other rounding)."""
    from safetensors.torch import load_file

    from onelayer.models import load_model
    from onelayer.training import train, train_variants

    root = out / f"parity-{dtype}"
    together = [replace(recipe(root / f"together-{x}", steps, x, 100), eval_every=steps, dtype=dtype) for x in layers]
    train_variants(together, progress=False)
    base = {n: p.detach().float().cpu() for n, p in load_model("smollm2", "cuda", dtype, "eager").named_parameters()}
    rows = []
    for layer, joint in zip(layers, together, strict=True):
        solo = replace(joint, out=str(root / f"alone-{layer}"))
        floor = replace(solo, out=str(root / f"alone-b128-{layer}"),
                        sampling=replace(solo.sampling, generation_batch_size=128))
        train(solo, progress=False)
        train(floor, progress=False)
        weights = {name: load_file(str(Path(c.out) / "checkpoint" / "trained.safetensors"))
                   for name, c in (("together", joint), ("alone", solo), ("floor", floor))}
        moved = distance(base, weights["alone"])

        def apart(a: str, b: str, weights=weights, moved=moved) -> float:
            return distance(weights[a], weights[b]) / moved

        logs = {name: read_log(Path(c.out)) for name, c in (("together", joint), ("alone", solo), ("floor", floor))}
        evals = {name: json.loads((Path(c.out) / "eval.jsonl").read_text().splitlines()[-1])["accuracy"]
                 for name, c in (("together", joint), ("alone", solo), ("floor", floor))}
        row = {"layer": int(layer), **{f"reward_{k}": [r["reward"] for r in v] for k, v in logs.items()},
               **{f"loss_{k}": [r["loss"] for r in v] for k, v in logs.items()},
               "together_vs_alone": apart("together", "alone"), "floor_vs_alone": apart("floor", "alone"),
               **{f"eval_{k}": v for k, v in evals.items()}}
        rows.append(row)
        print(f"{dtype} layer {layer}: rewards together {[round(x, 4) for x in row['reward_together']]} alone "
              f"{[round(x, 4) for x in row['reward_alone']]} alone-b128 {[round(x, 4) for x in row['reward_floor']]}; "
              f"weights apart / moved: together {row['together_vs_alone']:.4f}, floor {row['floor_vs_alone']:.4f}; "
              f"eval {evals}", flush=True)
    return {"steps": steps, "dtype": dtype, "layers": rows}


def architectures(out: Path, steps: int = 3) -> dict:
    """Per architecture: layers 0, 1 and 3 of the tests' tiny random model trained together, then each
    alone, on the GPU in float32 (CUDA graphs, routed layer copies): do they follow one trajectory?"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models (no pytest needed)
    from safetensors.torch import load_file

    from onelayer.training import train, train_variants
    from tests.tiny import ARCHS, make_char_tokenizer, tiny_model

    tokenizer = make_char_tokenizer()
    rows = []
    for arch in ARCHS:
        root = out / "architectures" / arch

        def config(name: str, layer: str, root=root) -> TrainConfig:
            return TrainConfig(model="tiny", task="toy:repeat", layers=layer, out=str(root / name), steps=steps,
                               prompts_per_step=4, group_size=4, lr=3e-2, micro_batch_size=16, save_every=steps,
                               eval_every=steps, eval_n=8, device="cuda", seed=1,
                               sampling=SamplingConfig(max_new_tokens=12, engine="fast"))

        layers = ["0", "1", "3"]
        start = time.time()
        base = tiny_model(arch).cuda()
        initial = {n: p.detach().clone() for n, p in base.named_parameters()}
        together = train_variants([config(f"together-{x}", x) for x in layers], base, tokenizer, progress=False)
        errors = [str(r) for r in together if isinstance(r, Exception)]
        row = {"arch": arch, "errors": errors, "rewards_equal": True, "max_loss_diff": 0.0, "weights_apart": 0.0}
        for x in layers:
            train(config(f"alone-{x}", x), tiny_model(arch).cuda(), tokenizer, progress=False)
            logs = [read_log(root / f"{mode}-{x}") for mode in ("together", "alone")]
            row["rewards_equal"] &= [r["reward"] for r in logs[0]] == [r["reward"] for r in logs[1]]
            row["max_loss_diff"] = max([row["max_loss_diff"]] + [abs(a["loss"] - b["loss"]) for a, b in zip(*logs, strict=True)])
            weights = [load_file(str(root / f"{mode}-{x}" / "checkpoint" / "trained.safetensors"))
                       for mode in ("together", "alone")]
            moved = distance(initial, weights[1])
            row["weights_apart"] = max(row["weights_apart"], distance(weights[0], weights[1]) / max(moved, 1e-12))
        row["seconds"] = time.time() - start
        rows.append(row)
        print(f"{arch:9s} together vs alone: rewards {'equal' if row['rewards_equal'] else 'DIFFER'}, max |loss "
              f"diff| {row['max_loss_diff']:.2e}, final weights apart / moved {row['weights_apart']:.2e}"
              + (f", ERRORS {errors}" if errors else "") + f" ({row['seconds']:.0f} s)", flush=True)
    return {"steps": steps, "rows": rows}


def scan_alone(out: Path, steps: int, solo_layers: list[int], eval_n: int) -> dict:
    """Base, full and the ``solo_layers`` runs, one at a time (as a scan with --concurrent 1 runs them)."""
    results: dict = {"steps": steps, "solo_layers": solo_layers}
    alone_dir = out / "scan-alone"
    config = ScanConfig(recipe=recipe(alone_dir, steps, "all", eval_n), concurrent=1)
    with GpuSampler() as sampler:
        for run in [PlannedRun("base", "base", 0), PlannedRun("full-s0", "full", 0)] + \
                [PlannedRun(f"layer{x:03d}-s0", "layer", 0, x) for x in solo_layers]:
            timed(results, run.name, sampler, lambda r=run: execute_run(config, r, alone_dir))
    results["steps_seconds"] = {name: sum(r["seconds_step"] for r in read_log(run_dir(alone_dir, PlannedRun(name, "x", 0))))
                                for name in results if name.startswith(("full", "layer"))}
    return results


def scan_together(out: Path, alone: dict, concurrent: int, eval_n: int) -> dict:
    """All 30 layers, ``concurrent`` at a time (0 = as many as fit), reusing the base and full runs."""
    steps, solo_layers = alone["steps"], alone["solo_layers"]
    alone_dir, together_dir = out / "scan-alone", out / "scan-together"
    together = ScanConfig(recipe=recipe(together_dir, steps, "all", eval_n), concurrent=concurrent)
    group = concurrency(together)
    results: dict = {"concurrent": group}
    for name in ("base", "full-s0"):  # identical in both modes: reuse them
        shutil.copytree(run_dir(alone_dir, PlannedRun(name, name, 0)), run_dir(together_dir, PlannedRun(name, name, 0)),
                        dirs_exist_ok=True)
    with GpuSampler() as sampler:
        timed(results, "layers_together", sampler, lambda: run_scan(replace(together, concurrent=group), progress=False))
    full = alone["full-s0"]["seconds"]
    layer_seconds = statistics.mean(alone[f"layer{x:03d}-s0"]["seconds"] for x in solo_layers)
    base_full = alone["base"]["seconds"] + full
    alone_total = base_full + 30 * layer_seconds
    together_total = base_full + results["layers_together"]["seconds"]
    logs = [read_log(run_dir(together_dir, PlannedRun(f"layer{x:03d}-s0", "layer", 0, x))) for x in range(30)]
    rows = [r for log in logs for r in log]
    generation = sum(r["seconds_generation"] / r["concurrent_variants"] for r in rows)
    scoring = sum(r["seconds_rollout"] - r["seconds_generation"] / r["concurrent_variants"] for r in rows)
    update = sum(r["seconds_update"] for r in rows)
    alone_steps = 30 * statistics.mean(alone["steps_seconds"][f"layer{x:03d}-s0"] for x in solo_layers)
    results.update(
        one_at_a_time_seconds=alone_total, concurrent_seconds=together_total, speedup=alone_total / together_total,
        one_at_a_time_over_full_run=alone_total / full, concurrent_over_full_run=together_total / full,
        layer_steps_seconds={"one_at_a_time": alone_steps, "concurrent": generation + scoring + update},
        concurrent_phases_seconds={"generation": generation, "scoring": scoring, "update": update,
                                   "other (load, eval, checkpoints)":
                                       results["layers_together"]["seconds"] - generation - scoring - update})
    print(f"\nfull 30-layer scan, {steps} steps per run, one GPU:\n| mode | wall s | x one full run |\n|---|---|---|\n"
          f"| one at a time (layers {solo_layers} measured, mean x 30) | {alone_total:.0f} | {alone_total / full:.1f} |\n"
          f"| concurrent ({group} at a time) | {together_total:.0f} | {together_total / full:.1f} |\n"
          f"speed-up {alone_total / together_total:.2f}x; layer training steps only: {alone_steps:.0f} s vs "
          f"{generation + scoring + update:.0f} s; concurrent phases (s): "
          f"{ {k: round(v, 1) for k, v in results['concurrent_phases_seconds'].items()} }", flush=True)
    return results


def joint_generation(variant_count: int, modes: list[str]) -> dict:
    """Seconds of one generation of ``variant_count`` x 256 rows (96 new tokens, the scan recipe's
    sampling), routed through variants' layer copies or not, decode steps eager and/or compiled (``modes``)."""
    from onelayer.models import load_model, load_tokenizer, precision_context
    from onelayer.rollout import FastGenerator, render_prompts
    from onelayer.tasks import get_task
    from onelayer.variants import LayerVariants

    tokenizer = load_tokenizer("smollm2")
    model = load_model("smollm2", "cuda", "bf16", "eager")
    task = get_task("rg:basic_arithmetic", dict(TASK_OPTIONS))
    examples = task.examples("train")[:32 * variant_count]
    prompts = render_prompts(tokenizer, [task.messages(e) for e in examples])
    variants = LayerVariants(model, [(i % 30,) for i in range(variant_count)])
    members = list(range(variant_count))
    rows = []
    for compiled in [mode == "compiled" for mode in modes]:
        for routed in (False, True):
            generator = FastGenerator(model, tokenizer, batch_size=len(prompts) * 8,
                                      row_hook=variants.set_rows if routed else None, compiled=compiled)
            seconds = []
            for _ in range(3):  # the first call captures (and compiles)
                with precision_context(torch.device("cuda"), torch.bfloat16), \
                        (variants.joint(members, 256) if routed else nullcontext()):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    batch = generator.generate(prompts, 8, 96, 1.0, 1.0, seeds=list(range(variant_count)))
                    torch.cuda.synchronize()
                    seconds.append(time.perf_counter() - start)
            row = {"compiled": compiled, "routed": routed, "rows": batch.size, "first_s": seconds[0],
                   "seconds": min(seconds[1:]), "completion_tokens": float(batch.completion_lengths.float().mean())}
            if not compiled:  # kernels of one decode step, by kind
                from rl_speed import decode_profile, print_profile

                with precision_context(torch.device("cuda"), torch.bfloat16), \
                        (variants.joint(members, 256) if routed else nullcontext()):
                    row["profile"] = decode_profile(generator.state)
                print_profile(f"{'routed' if routed else 'plain'} decode step", row["profile"])
            rows.append(row)
            print(f"{variant_count} x 256 rows, {'routed' if routed else 'plain '} {'compiled' if compiled else 'eager'}: "
                  f"{row['seconds']:.2f} s (first call {row['first_s']:.1f} s), {row['completion_tokens']:.0f} "
                  "tokens per completion", flush=True)
            del generator
            torch.cuda.empty_cache()
    return {"variants": variant_count, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="parity,alone,together")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--parity-steps", type=int, default=4)
    parser.add_argument("--parity-dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--parity-layers", default="4,14,24")
    parser.add_argument("--solo-layers", default="0,15,29")
    parser.add_argument("--concurrent", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--generation-variants", type=int, default=15)
    parser.add_argument("--generation-modes", default="eager,compiled", help="decode steps eager and/or compiled")
    parser.add_argument("--micro-batch", type=int, default=128, help="rows per forward/backward of every run")
    parser.add_argument("--compile-layers", action="store_true", help="updates through compiled decoder layers")
    args = parser.parse_args()
    TUNING.update(micro_batch_size=args.micro_batch, compile_layers=args.compile_layers)
    if not torch.cuda.is_available():
        print("bench/concurrent_scan.py needs a GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["device"] = torch.cuda.get_device_name()
    for section in args.sections.split(","):
        try:  # one broken section must not cost the others their GPU time
            if section == "parity":
                results[f"parity_{args.parity_dtype}"] = parity(out, args.parity_steps, args.parity_dtype,
                                                                args.parity_layers.split(","))
            elif section == "alone":
                layers = [int(x) for x in args.solo_layers.split(",")]
                results["alone"] = scan_alone(out, args.steps, layers, args.eval_n)
            elif section == "architectures":
                results["architectures"] = architectures(out)
            elif section == "generation":
                results["generation"] = joint_generation(args.generation_variants, args.generation_modes.split(","))
            elif section == "together":
                results["together"] = scan_together(out, results["alone"], args.concurrent, args.eval_n)
            else:
                raise SystemExit(f"unknown section {section}: use parity, alone, architectures, generation, together")
        except Exception:
            import traceback

            traceback.print_exc()
            results[f"{section}_error"] = traceback.format_exc()
        path.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

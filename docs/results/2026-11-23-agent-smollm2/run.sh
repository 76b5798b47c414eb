#!/usr/bin/env bash
# GiGPO vs GRPO (on whole episodes) on the embedded SmolLM2-135M-Instruct, TextWorld coin collector, all
# layers, same recipe, trained side by side on one GPU. Games (64 train seeds, 64 eval seeds) are made first,
# in parallel processes, into the TextWorld cache.
# Usage, from the repo root with onelayer importable:  bash docs/results/2026-11-23-agent-smollm2/run.sh RUNS_DIR
# Smoke test: STEPS=1 PROMPTS=2 GROUP=2 EVALN=2 TRAIN=2 bash .../run.sh /tmp/smoke
set -u
RUNS=${1:-runs/agent}
mkdir -p "$RUNS"
TASK=(--task tw:coin_collector --task-option level="${LEVEL:-5}" --task-option max_steps="${MAXSTEPS:-10}"
  --task-option train_size="${TRAIN:-64}" --task-option history="${HISTORY:-2}" --task-option eval_size="${EVALN:-64}")
python3 - "${LEVEL:-5}" "${TRAIN:-64}" "${EVALN:-64}" <<'PY'
import sys, time
from onelayer.tasks import get_task
level, train, held = map(int, sys.argv[1:])
task = get_task("tw:coin_collector", {"level": level, "train_size": train, "eval_size": held})
start = time.time()
task.prepare([e.meta["seed"] for split in ("train", "eval") for e in task.examples(split)])
print(f"made {train + held} games in {time.time() - start:.0f} s")
PY
ARGS=(--model smollm2 "${TASK[@]}" --steps "${STEPS:-25}" --prompts-per-step "${PROMPTS:-16}" --group-size "${GROUP:-8}"
  --lr "${LR:-2e-5}" --max-new-tokens 32 --temperature "${TEMP:-1.0}" --micro-batch-size "${MICRO:-16}" --generation-batch-size 512 --eval-every "${EVALEVERY:-5}"
  --eval-n "${EVALN:-64}" --save-every 5 --attention eager --no-progress)
for algo in gigpo grpo; do
  python3 -m onelayer train "${ARGS[@]}" --algo "$algo" --layers all --out "$RUNS/$algo" >> "$RUNS/$algo.out" 2>&1 &
done
wait
python3 -m onelayer plot "$RUNS/gigpo" "$RUNS/grpo" --out "$RUNS/curves.png"
tail -n 3 "$RUNS"/*.out
# one archive for the device tool, which returns a limited number of files
tar czf "$RUNS.tar.gz" --exclude=checkpoint -C "$(dirname "$RUNS")" "$(basename "$RUNS")"

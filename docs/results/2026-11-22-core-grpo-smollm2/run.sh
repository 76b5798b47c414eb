#!/usr/bin/env bash
# GRPO on the embedded SmolLM2-135M-Instruct, rg:basic_arithmetic (two terms of 1-2 digits, + and -):
# all layers vs middle:1 (layer 14 of 30), same recipe, trained side by side on one GPU.
# Usage, from the repo root with onelayer importable:  bash docs/results/2026-11-22-core-grpo-smollm2/run.sh RUNS_DIR
# Sizes can be shrunk for a smoke test: STEPS=1 PROMPTS=2 GROUP=2 MAXTOK=8 EVALN=4 bash .../run.sh /tmp/smoke
# SPECS (default "all middle:1"), ALGO (default grpo), ATTN (attention implementation, default
# transformers') and SEED (default 0) pick the runs; a run's directory is its spec without the colon,
# suffixed with whichever of algorithm, attention and seed differ from the defaults.
set -u
RUNS=${1:-runs/core}
mkdir -p "$RUNS"
ARGS=(--model smollm2 --task rg:basic_arithmetic
  --task-option min_terms=2 --task-option max_terms=2 --task-option min_digits=1 --task-option max_digits=2
  --task-option 'operators=["+","-"]' --task-option allow_parentheses=false --task-option allow_negation=false
  --task-option eval_size=500
  --algo "${ALGO:-grpo}" --steps "${STEPS:-30}" --prompts-per-step "${PROMPTS:-64}" --group-size "${GROUP:-8}" --lr 2e-5
  --max-new-tokens "${MAXTOK:-96}" --micro-batch-size 128 --generation-batch-size 512
  --eval-every "${EVALEVERY:-10}" --eval-n "${EVALN:-500}" --save-every 5 --seed "${SEED:-0}" --no-progress ${ATTN:+--attention $ATTN})
names=()
for spec in ${SPECS:-all middle:1}; do
  name=${spec/:/}
  [ "${ALGO:-grpo}" = grpo ] || name="$name-$ALGO"
  [ -z "${ATTN:-}" ] || name="$name-$ATTN"
  [ "${SEED:-0}" = 0 ] || name="$name-s$SEED"
  names+=("$RUNS/$name")
  ${TIMEOUT:+timeout $TIMEOUT} python3 -m onelayer train "${ARGS[@]}" --layers "$spec" --out "$RUNS/$name" \
    >> "$RUNS/$name.out" 2>&1 &
done
wait
python3 -m onelayer plot "${names[@]}" --out "$RUNS/curves${ALGO:+-$ALGO}${ATTN:+-$ATTN}${SEED:+-s$SEED}.png"

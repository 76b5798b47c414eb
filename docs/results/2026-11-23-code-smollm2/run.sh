#!/usr/bin/env bash
# GRPO on the embedded SmolLM2-135M-Instruct, procedural code task code:synth (difficulty 2: two composed
# steps, 8 hidden tests each, reward = fraction of tests passed in the sandbox): all layers vs middle:1,
# trained side by side on one GPU; then HumanEval (out of domain) for the base model and both runs.
# Usage, from the repo root with onelayer importable:  bash docs/results/2026-11-23-code-smollm2/run.sh RUNS_DIR
# Smoke test: STEPS=1 PROMPTS=2 GROUP=2 MAXTOK=16 EVALN=4 HEN=2 bash .../run.sh /tmp/smoke
set -u
RUNS=${1:-runs/code}
mkdir -p "$RUNS"
COMMON=(--attention eager --max-new-tokens "${MAXTOK:-192}" --generation-batch-size 512)
ARGS=(--model smollm2 --task code:synth --task-option difficulty=2 --task-option timeout=5
  --algo grpo --steps "${STEPS:-30}" --prompts-per-step "${PROMPTS:-64}" --group-size "${GROUP:-8}" --lr 2e-5
  --micro-batch-size 64 --eval-every "${EVALEVERY:-10}" --eval-n "${EVALN:-500}" --save-every 10 --no-progress)
for spec in all middle:1; do
  name=${spec/:/}
  python3 -m onelayer train "${ARGS[@]}" "${COMMON[@]}" --layers "$spec" --out "$RUNS/$name" >> "$RUNS/$name.out" 2>&1 &
done
wait
python3 -m onelayer plot "$RUNS/all" "$RUNS/middle1" --out "$RUNS/curves.png"
HE=(--task code:humaneval --n "${HEN:-164}" "${COMMON[@]}")
python3 -m onelayer eval --model smollm2 "${HE[@]}" --max-new-tokens 384 --out "$RUNS/humaneval-base" > "$RUNS/humaneval-base.out" 2>&1
for name in all middle1; do
  python3 -m onelayer eval --checkpoint "$RUNS/$name" "${HE[@]}" --max-new-tokens 384 --out "$RUNS/humaneval-$name" \
    > "$RUNS/humaneval-$name.out" 2>&1
done
tail -n 3 "$RUNS"/*.out
# one archive for the device tool, which returns a limited number of files
tar czf "$RUNS.tar.gz" --exclude=checkpoint -C "$(dirname "$RUNS")" "$(basename "$RUNS")"

#!/usr/bin/env bash
# Partial layer-contribution scan of the embedded SmolLM2-135M-Instruct (30 layers) on rg:basic_arithmetic
# (two terms of 1-2 digits, + and -), GRPO, the recipe of ../2026-11-22-core-grpo-smollm2 at 30 steps.
# Usage, from the repo root with onelayer importable:  bash docs/results/2026-11-22-scan-smollm2/run.sh SCAN_DIR
# NPROC processes share the GPUs (one GPU: they share it); rerunning the same command resumes the scan.
set -u
SCAN=${1:-scans/smol-arith}
${TIMEOUT:+timeout $TIMEOUT} python3 -m torch.distributed.run --nproc_per_node "${NPROC:-5}" --master_port 29533 \
  -m onelayer scan --model smollm2 --task rg:basic_arithmetic \
  --task-option min_terms=2 --task-option max_terms=2 --task-option min_digits=1 --task-option max_digits=2 \
  --task-option 'operators=["+","-"]' --task-option allow_parentheses=false --task-option allow_negation=false \
  --task-option eval_size=500 \
  --algo grpo --layers "${LAYERS:-every:4}" --steps "${STEPS:-30}" --prompts-per-step 64 --group-size 8 --lr 2e-5 \
  --max-new-tokens 96 --micro-batch-size 128 --generation-batch-size 512 --eval-n 500 --save-every 5 \
  --attention eager --seed 0 --no-progress --out "$SCAN"

#!/usr/bin/env bash
# A partial layer scan of the embedded SmolLM2-135M-Instruct on rg:basic_arithmetic (two terms of 1-2
# digits, + and -) with GRPO, plus learning-rate probes of the best and worst layer (x0.5, x2) and an
# out-of-domain evaluation of every run on two other reasoning-gym tasks. The recipe is the one of
# ../2026-11-22-scan-smollm2 (and ../2026-11-22-core-grpo-smollm2): lr 2e-5, 64 prompts x 8, 30 steps.
# Usage, from the repo root with onelayer importable:  bash run.sh SCAN_DIR
# Every command resumes: rerunning this script after a kill or a time limit continues where it stopped.
# (The onelayer of 2026-11-22: --lr-scales/--probe-layers are now scan --lr-grid, which also trains full training
# at each rate.)
set -u
SCAN=${1:-scans/smol-arith}
NPROC=${NPROC:-4}
launch() { python3 -m torch.distributed.run --nproc_per_node "$NPROC" --master_port 29533 -m onelayer "$@"; }
launch scan --model smollm2 --task rg:basic_arithmetic \
  --task-option min_terms=2 --task-option max_terms=2 --task-option min_digits=1 --task-option max_digits=2 \
  --task-option 'operators=["+","-"]' --task-option allow_parentheses=false --task-option allow_negation=false \
  --task-option eval_size=500 \
  --algo grpo --layers "${LAYERS:-every:4}" --steps "${STEPS:-30}" --prompts-per-step 64 --group-size 8 --lr 2e-5 \
  --max-new-tokens 96 --micro-batch-size 128 --generation-batch-size 512 --eval-n 500 --save-every 5 \
  --attention eager --seed 0 --lr-scales "${LR_SCALES-0.5,2}" --probe-layers best,worst --no-progress --out "$SCAN" || exit $?
launch analyze ood "$SCAN" --eval-n 300 --no-progress \
  --tasks 'rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2,rg:gcd?max_value=30&eval_size=300'

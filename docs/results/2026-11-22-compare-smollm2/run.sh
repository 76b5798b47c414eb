#!/usr/bin/env bash
# Training strategies at one budget, and layer specialists against self-consistency, on the embedded
# SmolLM2-135M-Instruct and rg:basic_arithmetic (two terms of 1-2 digits, + and -), with the recipe of the
# layer scan in ../2026-11-22-scan-smollm2-analyses (GRPO, lr 2e-5, 64 prompts x 8, 30 steps, 500 eval
# examples, greedy). That scan (its results, without checkpoints) is copied to SCAN_DIR when missing.
# Usage, from the repo root with onelayer importable:  bash run.sh [SCAN_DIR]
# Every command resumes: rerunning this script after a kill or a time limit continues where it stopped.
set -u
SCAN=${1:-scans/smol-arith}
NPROC=${NPROC:-2}  # 4 processes of full-parameter runs at micro-batch 128 ran out of memory on 80 GB
HERE=$(cd "$(dirname "$0")" && pwd)
if [ ! -f "$SCAN/scan.json" ]; then
  mkdir -p "$(dirname "$SCAN")" && cp -r "$HERE/../2026-11-22-scan-smollm2-analyses/scan" "$SCAN"
fi
launch() { PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m torch.distributed.run --nproc_per_node "$NPROC" --master_port 29533 -m onelayer "$@"; }

# 6 strategies x 2 seeds under the scan's recipe (the scan's base run is copied, not repeated)
launch compare "$SCAN" --strategies full,top:10,lr-guided,middle:10,random:10,lora --seeds 2 --no-progress \
  || exit $?  # also when a run failed: no ensemble over unfinished runs

EVAL=(--task rg:basic_arithmetic --task-option min_terms=2 --task-option max_terms=2 --task-option min_digits=1
  --task-option max_digits=2 --task-option 'operators=["+","-"]' --task-option allow_parentheses=false
  --task-option allow_negation=false --task-option eval_size=500
  --n 500 --max-new-tokens 96 --generation-batch-size 512 --attention eager)
# the 7 highest-contribution layers the scan measured, best first (ties in the vote go to the earlier one)
TOP7=$(python3 -c "
import json, sys
points = [p for p in json.load(open('$SCAN/profile.json'))['points'] if not p['interpolated']]
best = sorted(points, key=lambda p: (-p['contribution'], p['layer']))[:7]
print(' '.join(f\"$SCAN/runs/layer{p['layer']:03d}-s0\" for p in best))")
# specialists answer with their own final evaluation from the scan (same evaluation: reused, no GPU work)
python3 -m onelayer ensemble $TOP7 "${EVAL[@]}" --out "$SCAN/ensemble/top7-specialists" || exit $?
# self-consistency: 7 samples (temperature 1) of each full-training model, voted
for s in 0 1; do
  python3 -m onelayer ensemble --self-consistency "$SCAN/compare/runs/full-s$s" --k 7 "${EVAL[@]}" \
    --out "$SCAN/ensemble/self-consistency-full-s$s" || exit $?
done

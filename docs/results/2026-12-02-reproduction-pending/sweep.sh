# Step 1 of the reproduction: full-parameter GRPO at four rates x two seeds, with the main scan's protocol
# (16 prompts x 8, 100 steps, greedy eval on 500 problems every 20 steps); eight runs share the GPU, at micro-batches
# of 64 rows: at 128 onelayer's estimate is 18.4 GB a run, eight would not fit one H200 (the gradient is the same).
# From the repo root after setup.sh, in its own session (or it dies with the command that started it):
#   setsid nohup bash docs/results/2026-12-02-reproduction-pending/sweep.sh > /root/sweep.out 2>&1 < /dev/null &
# Runs resume by --out; bring them back without checkpoints: tar czf $OUT/sweep.tgz --exclude='checkpoint*' -C $W sweep
W=${W:-/root/w}; mkdir -p $W/sweep/runs
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
date -u +%s > $W/sweep/start
TO=(--task-option min_terms=2 --task-option max_terms=2 --task-option min_digits=1 --task-option max_digits=2
    --task-option 'operators=["+","-"]' --task-option allow_parentheses=false --task-option allow_negation=false
    --task-option eval_size=500)
for lr in 1e-5 2e-5 4e-5 8e-5; do for seed in 0 1; do
  python3 -m onelayer train --model smollm2 --task rg:basic_arithmetic "${TO[@]}" --algo grpo --layers all --lr $lr \
    --seed $seed --steps 100 --prompts-per-step 16 --group-size 8 --max-new-tokens 96 --micro-batch-size 64 \
    --generation-batch-size 512 --attention eager --eval-every 20 --no-eval-at-start --eval-n 500 --save-every 20 \
    --keep-optimizer none --no-progress --out $W/sweep/runs/full-lr$lr-s$seed > $W/sweep/full-lr$lr-s$seed.log 2>&1 &
done; done
wait
date -u +%s > $W/sweep/done

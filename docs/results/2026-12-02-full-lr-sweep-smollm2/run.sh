# Full-parameter GRPO of SmolLM2-135M at four learning rates and two seeds (2026-12-02, one H200).
# Run from the repository root after ../shared/device/prepare.sh's setup.sh. On the day, the first six ran as
# parallel processes on one GPU and two of them ran out of memory (6 x ~25 GB); they were run again, two at a time.
TO=(--task-option min_terms=2 --task-option max_terms=2 --task-option min_digits=1 --task-option max_digits=2
    --task-option 'operators=["+","-"]' --task-option allow_parentheses=false --task-option allow_negation=false
    --task-option eval_size=500)
for lr in 1e-5 2e-5 4e-5 8e-5; do for seed in 0 1; do
  onelayer train --model smollm2 --task rg:basic_arithmetic "${TO[@]}" --algo grpo --layers all --lr $lr --seed $seed \
    --steps 100 --prompts-per-step 64 --group-size 8 --max-new-tokens 96 --micro-batch-size 128 \
    --generation-batch-size 512 --attention eager --eval-every 20 --no-eval-at-start --eval-n 500 --save-every 20 \
    --no-progress --out runs/full-lr$lr-s$seed
done; done
onelayer rescore runs    # on a CPU, after the scorer fix (see README)

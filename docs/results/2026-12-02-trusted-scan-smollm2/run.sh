# The trusted scan of issue 22 (run from the repo root after setup.sh; W = output folder).
W=${W:-/root/work}
export PYTHONUNBUFFERED=1
date -u +%s > $W/scan.start
python3 -m onelayer scan --model smollm2 --task rg:basic_arithmetic \
  --task-option min_terms=2 --task-option max_terms=2 --task-option min_digits=1 --task-option max_digits=2 \
  --task-option 'operators=["+","-"]' --task-option allow_parentheses=false --task-option allow_negation=false \
  --task-option eval_size=500 \
  --algo grpo --layers every:4 --steps 30 --prompts-per-step 16 --group-size 8 --lr 2e-5 --lr-grid 1,3 --seeds 2 \
  --eval-every 10 --no-eval-at-start --eval-n 500 --max-new-tokens 96 --micro-batch-size 128 \
  --generation-batch-size 512 --save-every 10 --attention eager --concurrent 16 --no-progress --out $W/trusted \
  && python3 -m onelayer report $W/trusted
echo $? > $W/scan.done; date -u +%s >> $W/scan.done

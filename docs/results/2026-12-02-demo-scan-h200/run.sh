# Issue 26's one bench run on one H200 (2026-12-02), then issue 23's learning-rate sweep; W = output folder.
# Start it in its own process session, or the device machine kills it when the command that started it returns:
#   setsid nohup bash docs/results/2026-12-02-demo-scan-h200/run.sh > /root/job.out 2>&1 < /dev/null &
# (On the day it was started with plain `nohup ... &` and was killed 6.5 minutes in, when that command returned.)
W=${W:-/root/w}; mkdir -p $W
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{ nvidia-smi; python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"; git log -1 --format=%H; } > $W/env.txt 2>&1
date -u +%s > $W/start
python3 -c "from onelayer.models import load_model, load_tokenizer; load_model('smollm2','cpu'); load_tokenizer('smollm2')" > $W/warm.log 2>&1
python3 bench/rl_speed.py --out $W/b --sections scan > $W/bench.log 2>&1
echo $? > $W/bench.done; date -u +%s >> $W/bench.done

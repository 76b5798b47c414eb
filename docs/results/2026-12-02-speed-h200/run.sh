# Issue 26's measurements on one H200 (run from the repo root after setup.sh); W = output folder.
# The demo scan first (onelayer's defaults), then the measurements behind them.
W=${W:-/root/w26}; mkdir -p $W
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
date -u +%s > $W/start
{
python3 -c "from onelayer.models import load_model, load_tokenizer; load_model('smollm2','cpu'); load_tokenizer('smollm2')"
python3 bench/rl_speed.py --out $W/b --sections demo
date -u +%s > $W/demo.done
python3 bench/rl_speed.py --out $W/b --sections floor,prefill,generation,levers,summary --models smollm2 --batches 1024 \
  --generation-engines plain,fast,fast-compiled
date -u +%s > $W/levers.done
python3 bench/rl_speed.py --out $W/b --sections step,trl,summary --step-layers middle:1,all --trl-layers middle:1,all --steps 4
} > $W/bench.log 2>&1
echo $? > $W/done; date -u +%s >> $W/done

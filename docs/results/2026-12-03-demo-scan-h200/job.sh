# issue 26's one bench run on one H200 (bench/rl_speed.py --sections scan, alone on the GPU), then issue 23's
# second math task at every fourth layer if the machine is still held
cd /root/repo
export PYTHONPATH=/root/repo/src:/root/repo:$PYTHONPATH PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
W=/root/w; mkdir -p $W
R=docs/results/2026-12-02-reproduction-pending/reproduce.sh
echo "start $(date -u +%FT%TZ)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, triton, trl, liger_kernel; print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__, trl.__version__)"
  echo "commit 552f99d"; } > $W/env-part7.txt 2>&1
python3 -c "from onelayer.models import load_model, load_tokenizer; load_model('smollm2','cpu'); load_tokenizer('smollm2')" > $W/warm.txt 2>&1
echo "bench start $(date -u +%FT%TZ)"
python3 bench/rl_speed.py --out $W/bench --sections scan > $W/log-bench.txt 2>&1
echo "bench rc $? $(date -u +%FT%TZ)"
bash $R restore > $W/log-restore.txt 2>&1
echo "second every:4 start $(date -u +%FT%TZ)"
OMP_NUM_THREADS=4 bash $R second every:4 > $W/log-second-every-4.txt 2>&1
echo "second every:4 rc $? $(date -u +%FT%TZ)"

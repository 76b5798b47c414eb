# issue 26's one bench run on one H200 (bench/rl_speed.py --sections scan, alone on the GPU)
cd /root/repo
export PYTHONPATH=/root/repo/src:/root/repo:$PYTHONPATH PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
W=/root/w; mkdir -p $W
echo "start $(date -u +%FT%TZ)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, triton, trl, liger_kernel; print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__, trl.__version__)"
  echo "commit 5a20f8d"; } > $W/env.txt 2>&1
python3 -c "from onelayer.models import load_model, load_tokenizer; load_model('smollm2','cpu'); load_tokenizer('smollm2')" > $W/warm.txt 2>&1
echo "bench start $(date -u +%FT%TZ)"
python3 bench/rl_speed.py --out $W/bench --sections scan > $W/log-bench.txt 2>&1
echo "bench rc $? $(date -u +%FT%TZ)"

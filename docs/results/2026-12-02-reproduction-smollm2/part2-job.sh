# issue 26's compaction measurement, then issue 23's main scan to layer 19; run from the repo copy in /root/repo
cd /root/repo
export PYTHONPATH=/root/repo/src:/root/repo:$PYTHONPATH
W=/root/w; mkdir -p $W
R=docs/results/2026-12-02-reproduction-pending/reproduce.sh
echo "start $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $W/env.txt
python3 -c "import sys, torch, transformers, triton; print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__)" >> $W/env.txt
pip list 2>/dev/null | grep -i -E "liger|reasoning|math-verify" >> $W/env.txt
if ! timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_rollout.py -k captured > $W/gpu-test.log 2>&1; then
  echo "capture test failed: going on with HEAD's fast.py"; cp /root/fast_head.py src/onelayer/rollout/fast.py
fi
tail -3 $W/gpu-test.log
echo "bench $(date -u +%FT%TZ)"
timeout 480 python3 bench/rl_speed.py --out $W/b --sections eos,compaction,summary > $W/bench.log 2>&1; echo "bench rc $?"
echo "main $(date -u +%FT%TZ)"
bash $R restore
bash $R main 0-19; echo "main rc $?"
echo "end $(date -u +%FT%TZ)"

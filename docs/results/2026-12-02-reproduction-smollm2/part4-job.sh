# issue 23, part 4: the second math task (every second layer), then the edge stage (layers 0,5,9 at 10x)
cd /root/repo
export PYTHONPATH=/root/repo/src:/root/repo:$PYTHONPATH
W=/root/w; mkdir -p $W
R=docs/results/2026-12-02-reproduction-pending/reproduce.sh
echo "start $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $W/env-part4.txt
python3 -c "import sys, torch, transformers, triton; print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__)" >> $W/env-part4.txt
echo "commit 3ca98def1c36a92c5b03feedb6b62ffc70097abb" >> $W/env-part4.txt
(which bwrap prlimit; ls /usr/lib/x86_64-linux-gnu/libseccomp* ) >> $W/env-part4.txt 2>&1
bash $R restore
echo "second $(date -u +%FT%TZ)"
bash $R second every:2; echo "second rc $?"
echo "edge $(date -u +%FT%TZ)"
bash $R edge; echo "edge rc $?"
echo "end $(date -u +%FT%TZ)"

# issue 23, part 6: the study protocol's strategies (their group of 10) and the out-of-domain scan, as two jobs side
# by side on one GPU (each is launch-bound at this model size)
cd /root/repo
export PYTHONPATH=/root/repo/src:/root/repo:$PYTHONPATH OMP_NUM_THREADS=4
W=/root/w; mkdir -p $W
R=docs/results/2026-12-02-reproduction-pending/reproduce.sh
echo "start $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $W/env-part6.txt
python3 -c "import sys, torch, transformers, triton; print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__)" >> $W/env-part6.txt
echo "commit COMMIT" >> $W/env-part6.txt
bash $R restore
stage() { local n="$*"; echo "$n start $(date -u +%FT%TZ)"; bash $R "$@" > "$W/log-${n// /-}.txt" 2>&1; echo "$n rc $? $(date -u +%FT%TZ)"; }
stage strategies study &
stage ood &
wait
echo "end $(date -u +%FT%TZ)"

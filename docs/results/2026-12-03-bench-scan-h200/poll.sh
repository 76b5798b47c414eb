# a poll of the background job: its log, the GPU, and a copy of what it made so far into $OUT (without weights)
W=${W:-/root/w}
date -u +%FT%TZ; cat /root/job.out; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
for f in $W/log-*.txt; do echo "== $f"; tail -n 4 "$f"; done
cd $W && tar czf $OUT/w.tar.gz --exclude=checkpoint --exclude='*.safetensors' --exclude='*.pt' --ignore-failed-read \
  $(ls -d bench *.txt scans/chain-sum 2>/dev/null) 2>/dev/null
cp /root/job.out $OUT/ 2>/dev/null; ls -la $OUT

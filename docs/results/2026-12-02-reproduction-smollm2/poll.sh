# a poll of a background job: its log, the GPU, and a copy of what it made so far into $OUT (a machine can be taken
# back mid-job); run dirs without checkpoints, the restored earlier results left out
W=${W:-/root/w}
date -u +%FT%TZ; cat /root/job.out; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
for f in $W/log-*.txt; do echo "== $f"; tail -n 3 "$f"; done
cd $W && tar czf $OUT/w.tar.gz --exclude=checkpoint --exclude='scans/main' --ignore-failed-read $(ls -d */ *.txt 2>/dev/null | grep -v '^scans/$\|^sweep/$\|^passk') $(ls -d scans/main-10x scans/chain-sum scans/ood scans/code 2>/dev/null) 2>/dev/null
cp /root/job.out $OUT/ 2>/dev/null; ls -la $OUT

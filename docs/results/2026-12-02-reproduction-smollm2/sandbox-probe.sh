#!/bin/bash
# The sandbox on the GPU image: bwrap carried (Debian 12's 0.8.0), pyseccomp staged; test_sandbox.py there.
set -x
P=$PWD/.device/probe
mkdir -p /tmp/pp
python3 - <<'PY'
import glob, zipfile
for w in glob.glob(".device/probe/wheels/*.whl"):
    zipfile.ZipFile(w).extractall("/tmp/pp")
PY
chmod +x $P/bin/bwrap
export PATH=$P/bin:$PATH PYTHONPATH=$PWD/src:/tmp/pp
cd $PWD
python3 -c "import sys; print(sys.version); from onelayer import sandbox; print('problem:', sandbox.isolation_problem())" 2>&1 | tee $OUT/probe.txt
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_sandbox.py -x -ra 2>&1 | tail -40 | tee -a $OUT/probe.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_code_tasks.py -ra 2>&1 | tail -25 | tee -a $OUT/probe.txt

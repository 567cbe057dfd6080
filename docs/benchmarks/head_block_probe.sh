#!/usr/bin/env bash
# Replays every case head_block_probe.py wrote, each in a fresh process (a CUDA fault poisons
# its process), 14 at a time, at the configured pipeline stages (s3) and at one stage (s1);
# the probe cases force the dQ kernel (ATTNGEN_DQ=0). One line per case: exit code, last line
# of the replay (PASS, FAIL, or the error) and its dq row.
#   bash docs/benchmarks/head_block_probe.sh CASES_DIR > probe.txt
set -u
probe() { f=$1; st=$2; n=$(basename $f .yaml)_s$st; ( if [ $st = 1 ]; then export ATTNGEN_STAGES=1; fi; case $n in reg_*) ;; *) export ATTNGEN_DQ=0;; esac
  CUDA_LAUNCH_BLOCKING=1 timeout 120 python3 -m attngen fuzz --replay $f --device cuda > ${f%.yaml}_s$st.log 2>&1
  echo "$n rc=$? $(tail -n 1 ${f%.yaml}_s$st.log | cut -c1-60) $(grep -E '^dq ' ${f%.yaml}_s$st.log | tr -s ' ')" ); }
export -f probe
for f in $1/*.yaml; do echo "$f 3"; echo "$f 1"; done | xargs -P 14 -n 2 bash -c 'probe $0 $1' | sort

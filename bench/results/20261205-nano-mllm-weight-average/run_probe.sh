#!/bin/bash
# $1: work folder, $2: stage, $3: decays
echo 19 > /proc/self/autogroup
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/s47/pkg NANO_PROBE_EMA=$3
date -u +%s > /tmp/s47/$2.start
nice -n 19 /work/main/.venv/bin/python -m illume_rt.nano.train --work /tmp/s47/$1 --jobs 1 $2
echo RC=$?
date -u +%s > /tmp/s47/$2.end

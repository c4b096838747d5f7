#!/bin/bash
# The one command, timed in one piece, from a clean clone of main at ff6a0db (fresh venv made before timing).
echo 19 > /proc/self/autogroup
cd /tmp/s48/run
date -u +%s > /tmp/s48/full.start
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
/usr/bin/time -v nice -n 19 .venv/bin/python -m illume_rt.nano.train
echo "RC=$?"
date -u +%s > /tmp/s48/full.end

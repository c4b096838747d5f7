#!/bin/bash
echo 19 > /proc/self/autogroup
cd /tmp/s40/clone
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
date +%s > /tmp/s41/f6000.start
/usr/bin/time -v nice -n 19 .venv/bin/python -m illume_rt.nano.train --work /tmp/s41/w6000 --out /tmp/s41/o6000 --focus-steps 6000 focus edit polish export sampling
echo RC_TRAIN=$?
date +%s > /tmp/s41/f6000.trained
nice -n 19 .venv/bin/python -m illume_rt.nano.evaluate --weights /tmp/s41/o6000 --no-reference --split held --sampled held --threads 2 --json /tmp/s41/eval_held_f6000.json
echo RC_EVAL=$?
date +%s > /tmp/s41/f6000.end

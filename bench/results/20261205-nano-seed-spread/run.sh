#!/bin/bash
echo 19 > /proc/self/autogroup
cd /tmp/s40/clone
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
date +%s > /tmp/s43/seed1.start
/usr/bin/time -v nice -n 19 .venv/bin/python -m illume_rt.nano.train --work /tmp/s43/seed1/work --out /tmp/s43/seed1/out --seed 1
echo RC_TRAIN=$?
date +%s > /tmp/s43/seed1.trained
nice -n 19 .venv/bin/python -m illume_rt.nano.evaluate --weights /tmp/s43/seed1/out --no-reference --split held --sampled held --threads 2 --json /tmp/s43/eval_held_seed1.json
echo RC_EVAL=$?
date +%s > /tmp/s43/seed1.end

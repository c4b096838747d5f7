#!/bin/bash
echo 19 > /proc/self/autogroup
cd /tmp/s40/clone
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
date +%s > /tmp/s43/late2b.start
/usr/bin/time -v nice -n 19 .venv/bin/python -m illume_rt.nano.train --work /tmp/s43/late2/work --out /tmp/s43/late2/out --seed 2 focus edit polish export
echo RC_TRAIN=$?
date +%s > /tmp/s43/late2b.trained
nice -n 19 .venv/bin/python /tmp/s43/bind.py /tmp/s43/late2/out 1.5
nice -n 19 .venv/bin/python -m illume_rt.nano.evaluate --weights /tmp/s43/late2/out --no-reference --split held --refine --no-edits --threads 2 --json /tmp/s43/eval_held_late2_g15.json
echo RC_EVAL=$?
date +%s > /tmp/s43/late2b.end

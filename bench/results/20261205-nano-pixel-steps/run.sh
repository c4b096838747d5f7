#!/bin/bash
echo 19 > /proc/self/autogroup
cd /tmp/s40/clone
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
date +%s > /tmp/s42/chain.start
/usr/bin/time -v nice -n 19 .venv/bin/python -m illume_rt.nano.train --work /tmp/s42/chain --out /tmp/s42/out
echo RC_TRAIN=$?
date +%s > /tmp/s42/chain.trained
nice -n 19 .venv/bin/python -m illume_rt.nano.evaluate --weights /tmp/s42/out --no-reference --split held --sampled held --threads 2 --json /tmp/s42/eval_held_pix2x.json
echo RC_EVAL=$?
date +%s > /tmp/s42/chain.end

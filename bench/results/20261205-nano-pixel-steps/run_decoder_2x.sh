#!/bin/bash
echo 19 > /proc/self/autogroup
cd /tmp/s40/clone
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
date +%s > /tmp/s42/dec2.start
nice -n 19 .venv/bin/python -m illume_rt.nano.train --work /tmp/s42/chain2 --out /tmp/s42/out2 --threads 2 --jobs 1 decoder export
echo RC_TRAIN=$?
date +%s > /tmp/s42/dec2.trained
nice -n 19 .venv/bin/python -m illume_rt.nano.choose_sampling --weights /tmp/s42/out2 --refine-only
echo RC_CHOOSE=$?
cp /tmp/s42/out/mllm/illume_rt_sampling.json /tmp/s42/out2/mllm/illume_rt_sampling.json
nice -n 19 .venv/bin/python -m illume_rt.nano.evaluate --weights /tmp/s42/out2 --no-reference --split held --no-edits --sampled --refine held --threads 2 --json /tmp/s42/eval_held_dec2.json
echo RC_EVAL=$?
date +%s > /tmp/s42/dec2.end

#!/bin/bash
echo 19 > /proc/self/autogroup
cd /tmp/s46/run
python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[export,quant,bench,test]" > /tmp/s46/setup.log 2>&1 || { echo SETUP FAILED; exit 1; }
date -u +%s > /tmp/s46/full.start
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
/usr/bin/time -v nice -n 19 .venv/bin/python -m illume_rt.nano.train
echo "RC=$?"
date -u +%s > /tmp/s46/full.end

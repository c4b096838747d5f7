#!/bin/bash
echo 19 > /proc/self/autogroup
cd /tmp/s48/run
nice -n 19 bash -c 'python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[export,quant,bench,test]"'
echo SETUP RC=$?

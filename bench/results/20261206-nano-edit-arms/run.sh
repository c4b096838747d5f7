#!/bin/bash
# Session 50's arms, as run (paths of that session): ./run.sh one-length | ./run.sh captions-2.
# W holds the committed recipe's states up to `focus` (session 48's one-command run on this machine, which the
# committed weights are bit for bit: semantic, pixel, tokens, mllm, focus, vae, decoder and their log.json
# entries); `edit` and `polish` are trained again in the arm.
echo 19 > /proc/self/autogroup
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
ARM=$1
HERE=$(cd "$(dirname "$0")" && pwd)
W=/tmp/s50/$ARM/work O=/tmp/s50/$ARM/weights
nice -n 19 python "$HERE/edit_arms.py" $ARM train edit polish export --work $W --out $O --jobs 1
python "$HERE/edit_arms.py" $ARM bind-sampling $O
nice -n 19 python "$HERE/edit_arms.py" $ARM evaluate --weights $O --no-reference --split held --sampled held \
    --threads 2 --json "$HERE/eval_held_$ARM.json"

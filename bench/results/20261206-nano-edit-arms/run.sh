#!/bin/bash
# The arms, as run: ./run.sh one-length | ./run.sh captions-2 (session 50, BASE=/tmp/s50) | ./run.sh
# semantic-erase-0.9 | ./run.sh slot-codes-0.5 (session 51, BASE=/tmp/s51) | ./run.sh edit-lr-2e-3 (session 52,
# BASE=/tmp/s52) | ./run.sh edit-lr-3e-3 (session 53, BASE=/tmp/s53).
# W holds the committed recipe's states up to `focus` (session 48's one-command run on this machine, which the
# committed weights are bit for bit: semantic, pixel, tokens, mllm, focus, vae, decoder and their log.json
# entries); `edit` and `polish` are trained again in the arm.
# SEED=N (session 52): `edit` and `polish` drawn at seed N instead of the recipe's 1234, from the same states (their
# log.json entries then carry "seeded_from", as `nano.train --seed-from` writes it, so that `--seed` accepts them);
# the folder and the evaluation are named ARM-seedN. EVAL_THREADS: the evaluation's threads (default 2).
echo 19 > /proc/self/autogroup
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
ARM=$1
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${BASE:-/tmp/s50}
NAME=$ARM${SEED:+-seed$SEED}
W=$BASE/$NAME/work O=$BASE/$NAME/weights
nice -n 19 python "$HERE/edit_arms.py" $ARM train edit polish export --work $W --out $O --jobs 1 ${SEED:+--seed $SEED}
python "$HERE/edit_arms.py" $ARM bind-sampling $O
nice -n 19 python "$HERE/edit_arms.py" $ARM evaluate --weights $O --no-reference --split held --sampled held \
    --threads ${EVAL_THREADS:-2} --json "$HERE/eval_held_$NAME.json"

#!/bin/bash
# Session 55's pair, as run on the Intel Xeon (sessions 40-47 and 55), from the repository root: a new draw of the
# MLLM's stages up to `focus` on the committed tokenizer (seeded), then `control` and `edit-lr-2e-3` from that
# `focus` state side by side, each pinned to one core (one thread each, as session 52's seed-2 pair), evaluated
# greedy only at the committed sampling choice (no sampled figures, no refinement: time).
echo 19 > /proc/self/autogroup
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${BASE:-/tmp/s55}
nice -n 19 python -m illume_rt.nano.train tokens mllm focus --work $BASE/base/work --seed-from nano/weights \
    --redo mllm --threads 2 --jobs 1
arm() {  # ARM CORE
    local W=$BASE/$1/work O=$BASE/$1/weights
    mkdir -p $BASE/$1 && cp -r $BASE/base/work $W
    taskset -c $2 nice -n 19 python "$HERE/edit_arms.py" $1 train edit polish export --work $W --out $O --jobs 1
    python "$HERE/edit_arms.py" $1 bind-sampling $O
    taskset -c $2 nice -n 19 python "$HERE/edit_arms.py" $1 evaluate --weights $O --no-reference --split held \
        --sampled --refine --threads 1 --json "$HERE/eval_held_intel-$1.json"
    cp $W/log.json "$HERE/training_intel-$1.json"
}
arm control 0 &
arm edit-lr-2e-3 1 &
wait

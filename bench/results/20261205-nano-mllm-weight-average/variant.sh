#!/bin/bash
# $1: name, $2: MLLM state file (a finished stage's format); $3...: extra evaluate flags
# Exports session 46's run with the MLLM from $2 (everything else that run's), rebinds that run's sampling
# choice (guidance 1.5), and scores it held out (runtime, seed 0).
set -e
echo 19 > /proc/self/autogroup
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
name=$1; state=$2; shift 2
S=/tmp/s46/run/nano/work; W=/tmp/s47/v_$name/work; O=/tmp/s47/v_$name/weights
rm -rf /tmp/s47/v_$name; mkdir -p $W
for f in semantic pixel tokens vae decoder; do ln -s $S/$f.pt $W/$f.pt; done
cp $S/log.json $W/; ln -s $state $W/polish.pt
cd /work/main
nice -n 19 .venv/bin/python -m illume_rt.nano.train --work $W --out $O --jobs 1 export
cp /tmp/s46/run/nano/weights/mllm/illume_rt_sampling.json $O/mllm/
cp /tmp/s46/run/nano/weights/dualvitok_sdxl_decoder/illume_rt_refine.json $O/dualvitok_sdxl_decoder/
.venv/bin/python - $O <<'PY'
import json, sys
from pathlib import Path
from illume_rt.nano.checkpoint import NanoWeights, weights_digest
o = Path(sys.argv[1]); f = o / "mllm/illume_rt_sampling.json"
rec = json.loads(f.read_text()); rec["weights_sha256"] = weights_digest(NanoWeights(o)); f.write_text(json.dumps(rec, indent=1))
PY
date -u +%s > /tmp/s47/v_$name/eval.start
nice -n 19 .venv/bin/python -m illume_rt.nano.evaluate --weights $O --no-reference --split held --threads 1 --json /tmp/s47/v_$name/eval_held.json "$@"
date -u +%s > /tmp/s47/v_$name/eval.end
echo DONE

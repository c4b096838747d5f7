"""Greedy drawing of the held-out and the training-sample prompts at text-to-image guidance 1.5 and 1.0.

    python guidance_greedy.py WEIGHTS OUT.json
"""
import json, sys
from dataclasses import replace
from illume_rt.nano import score
from illume_rt.nano.checkpoint import NanoWeights
from illume_rt.nano import evaluate
from illume_rt.nano.heldout import eval_prompts, greedy_sampling
from illume_rt.runtime.pipeline import Pipeline

weights, out = sys.argv[1], sys.argv[2]
res = {}
with evaluate.bundle_of(NanoWeights(weights)) as bundle:
    pipe = Pipeline.from_bundle(bundle, threads=1)
    for split in ("held", "train"):
        for g in (1.5, 1.0):
            sampling = replace(greedy_sampling(pipe), guidance_scale=g)
            marks = [score.score_picture(pipe.generate(p, resolution=(256, 256), seed=0, sampling=sampling).image, w)
                     for p, w in eval_prompts(None, split)]
            res[f"{split} {g}"] = score.summarize(marks)
            print(split, g, {k: round(v, 3) for k, v in res[f"{split} {g}"].items() if isinstance(v, float)}, flush=True)
json.dump(res, open(out, "w"), indent=1)

"""Greedy drawing of the training sample's scenes from captions in an order never trained, at guidance 1.5 / 1.0.

    python guidance_paraphrase.py WEIGHTS OUT.json
"""
import json, sys
from dataclasses import replace
from illume_rt.nano import data, score
from illume_rt.nano.checkpoint import NanoWeights
from illume_rt.nano import evaluate
from illume_rt.nano.heldout import eval_scenes, greedy_sampling
from illume_rt.runtime.pipeline import Pipeline

FORMS = {
    "background first": lambda s: f"on a {s.background} background a {s.size} {s.colour} {s.shape} at the {s.position}",
    "position first": lambda s: f"at the {s.position} a {s.size} {s.colour} {s.shape} on a {s.background} background",
}
weights, out = sys.argv[1], sys.argv[2]
res = {}
with evaluate.bundle_of(NanoWeights(weights)) as bundle:
    pipe = Pipeline.from_bundle(bundle, threads=1)
    for form, fn in FORMS.items():
        for g in (1.5, 1.0):
            sampling = replace(greedy_sampling(pipe), guidance_scale=g)
            marks = [score.score_picture(pipe.generate(fn(s), resolution=(256, 256), seed=0, sampling=sampling).image,
                                         {a: getattr(s, a) for a in data.ATTRIBUTES}) for s in eval_scenes("train")]
            res[f"{form} {g}"] = score.summarize(marks)
            print(form, g, {k: round(v, 3) for k, v in res[f"{form} {g}"].items() if isinstance(v, float)}, flush=True)
json.dump(res, open(out, "w"), indent=1)

"""Text-to-image candidates (guidance 1.5 and 1.0) on 45 other training scenes, seed 0.

    python sampling_other_scenes.py WEIGHTS OUT.json FIRST  # every 9th training scene from FIRST (0-8)
"""
import json, sys, time
from dataclasses import replace
from illume_rt.nano import data
from illume_rt.nano.checkpoint import NanoWeights
from illume_rt.nano import choose_sampling, evaluate, heldout
from illume_rt.runtime.options import OFFICIAL_SAMPLING
from illume_rt.runtime.pipeline import Pipeline

weights, out, offset = sys.argv[1], sys.argv[2], int(sys.argv[3])
train, held = data.split()
scenes = train[offset::9]
full_captions = heldout.full_caption_prompts(scenes)  # score_candidate's pairs
official = OFFICIAL_SAMPLING["text_to_image"]
results = []
with evaluate.bundle_of(NanoWeights(weights)) as bundle:
    pipe = Pipeline.from_bundle(bundle, threads=1)
    for g in (1.5, 1.0):
        for t, p in choose_sampling.SAMPLERS:
            t0 = time.time()
            s = choose_sampling.score_candidate(pipe, replace(official, guidance_scale=g, temperature=t, top_p=p),
                                                full_captions)
            results.append({"guidance_scale": g, "temperature": t, "top_p": p, "scores": s})
            print(g, t, p, {k: round(v, 3) for k, v in s.items() if isinstance(v, float)}, f"{time.time()-t0:.0f}s", flush=True)
            json.dump({"offset": offset, "scenes": len(scenes), "results": results}, open(out, "w"), indent=1)

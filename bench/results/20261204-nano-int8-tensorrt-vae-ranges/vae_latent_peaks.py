"""The refined latent's |max| for calibration-eligible nano scenes: every (colour, background) pair x size x shape,
full caption, one position each, seed 0 (what a VAE-only calibration cover would draw from)."""
import json, sys
from pathlib import Path
import numpy as np
from illume_rt.calibration import datasets
from illume_rt.runtime.bundle import load_bundle
from illume_rt.runtime.pipeline import Pipeline

B = Path(sys.argv[1]); OUT = Path(sys.argv[2])
manifest = json.loads((B / "manifest.json").read_text())
pipe = Pipeline(load_bundle(B), "ort-cpu", 1)
plan = datasets.plan_for(manifest["model"], "calibration")
refine = datasets.plan_refine(pipe, plan)
sampling = pipe.default_sampling("text_to_image")
peaks = []
inner = pipe.engines["vae_decoder"]
class Rec:
    def __getattr__(s, k): return getattr(inner, k)
    def run(s, f):
        peaks.append(float(np.abs(f[list(f)[0]]).max())); return inner.run(f)
pipe.replace_engine("vae_decoder", Rec())
scenes = datasets.nano_scenes("nano-train")
seen, rows = set(), []
for s in scenes:
    key = (s.colour, s.background, s.size, s.shape)
    if key in seen or s.colour == s.background:
        continue
    seen.add(key)
    if s.background != "gray" and s.colour != "blue":
        continue  # the pairs that matter first: blue shapes and gray backgrounds
    pipe.generate(s.caption, (256, 256), seed=0, sampling=sampling, refine=refine)
    rows.append({"caption": s.caption, "latent_abs_max": round(peaks[-1], 2)})
    print(rows[-1], flush=True)
OUT.write_text(json.dumps(rows, indent=1))

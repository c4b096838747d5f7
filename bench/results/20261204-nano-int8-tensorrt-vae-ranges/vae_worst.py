"""Which refined picture limits the INT8 tensorrt VAE, and where its error is."""
import json, sys, tempfile
from pathlib import Path
import numpy as np
from illume_rt.calibration import accuracy, datasets, recipes
from illume_rt.runtime.bundle import load_bundle
from illume_rt.runtime.pipeline import Pipeline
from illume_rt.engines.ort import OrtEngine

B = Path(sys.argv[1]); OUT = Path(sys.argv[2]); OUT.mkdir(parents=True, exist_ok=True)
threads = 2
manifest = json.loads((B / "manifest.json").read_text())
pipe = Pipeline(load_bundle(B), "ort-cpu", threads)
feeds, _ = datasets.capture(pipe, datasets.plan_for(manifest["model"], "calibration"), lambda m: None, refinements=True)
vae_feeds = feeds["vae_decoder"]; del feeds
ev_plan = datasets.plan_for(manifest["model"], "evaluation")
evals = accuracy.record_eval(pipe, ev_plan, refinements=True)
refs = evals["refinements"]
captions = [g[0] for g in ev_plan.generate] + [c[0] for c in ev_plan.refine_checks]
src = B / manifest["components"]["vae_decoder"]["file"]
work = Path(tempfile.mkdtemp(prefix="vae-worst-", dir=OUT))
recipe = recipes.recipe_for("vae_decoder", "int8", "tensorrt", "fp32", "nano")
recipes.quantize_graph(recipe, src, work / "vae.onnx", vae_feeds, threads, work)
latents = []
class Rec:
    def __init__(s, inner): s.inner = inner
    def __getattr__(s, k): return getattr(s.inner, k)
    def run(s, feeds):
        latents.append({k: np.array(v) for k, v in feeds.items()}); return s.inner.run(feeds)
q = OrtEngine("vae_decoder", work / "vae.onnx", "ort-cpu", threads)
rows = []
for i, r in enumerate(refs):
    pipe.replace_engine("vae_decoder", Rec(q))
    img = pipe.refine_image(r["semantic"], r["pixel"], r["grid"], r["config"], np.random.default_rng(r["seed"]))[0]
    lat = latents[-1][list(latents[-1])[0]]
    p = accuracy.psnr(img, r["image"])
    err = np.abs(img.astype(np.float64) - r["image"])
    rows.append({"i": i, "caption": captions[i] if i < len(captions) else "?", "psnr": round(p, 2),
                 "latent_absmax": round(float(np.abs(lat).max()), 2), "err_max": round(float(err.max()), 3)})
    print(rows[-1], flush=True)
    np.save(OUT / f"pic{i}.npy", np.stack([r["image"], img]))
(OUT / "rows.json").write_text(json.dumps(rows, indent=1))

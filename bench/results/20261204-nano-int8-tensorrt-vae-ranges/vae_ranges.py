"""Per activation tensor of the INT8 tensorrt VAE: the evaluation pictures' |max| against the calibration's."""
import json, sys
from pathlib import Path
import numpy as np, onnx
from illume_rt.calibration import accuracy, datasets, recipes
from illume_rt.runtime.bundle import load_bundle
from illume_rt.runtime.pipeline import Pipeline

B = Path(sys.argv[1]); qdq = Path(sys.argv[2])  # the FP32-remainder Q/DQ graph vae_worst.py wrote (OUT/vae-worst-*/vae.onnx)
named = qdq.with_name("vae_decoder.named.onnx")
manifest = json.loads((B / "manifest.json").read_text())
pipe = Pipeline(load_bundle(B), "ort-cpu", 2)
cal_plan = datasets.plan_for(manifest["model"], "calibration")
feeds, _ = datasets.capture(pipe, cal_plan, lambda m: None, refinements=True)
cal = feeds["vae_decoder"]; del feeds
ev_plan = datasets.plan_for(manifest["model"], "evaluation")
evals = accuracy.record_eval(pipe, ev_plan, refinements=True)
ev = []
inner = pipe.engines["vae_decoder"]
class Rec:
    def __getattr__(s, k): return getattr(inner, k)
    def run(s, f): ev.append({k: np.array(v) for k, v in f.items()}); return inner.run(f)
pipe.replace_engine("vae_decoder", Rec())
for r in evals["refinements"][:2]:
    pipe.refine_image(r["semantic"], r["pixel"], r["grid"], r["config"], np.random.default_rng(r["seed"]))
m = onnx.load(str(qdq)); inits = {i.name for i in m.graph.initializer}
acts = [n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
def amax(feeds):
    out = np.zeros(len(acts))
    for run in recipes._tensor_values(named, acts, feeds, 2):
        out = np.maximum(out, [float(np.abs(v).max()) for v in run])
    return out
c = amax(cal)
print("calibration captions:", [g[0] for g in cal_plan.generate if "blue" in g[0] and "gray" in g[0]])
print("latent |max|: calibration", [round(float(np.abs(f[list(f)[0]]).max()), 2) for f in cal])
for i, f in enumerate(ev):
    e = amax([f])
    ratio = e / c
    print(f"eval picture {i}: latent |max| {np.abs(f[list(f)[0]]).max():.2f}; tensors over the calibration max: "
          f"{int((ratio > 1).sum())} of {len(acts)}; worst ratio {ratio.max():.2f} at {acts[int(ratio.argmax())]}")
    print("  ", [(a, round(float(r), 2)) for a, r in zip(acts, ratio) if r > 1])

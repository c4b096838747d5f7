"""Attribute the INT8 tensorrt VAE's error: weights only, activations only, both (fp32 remainder)."""
import json, sys
from pathlib import Path
import numpy as np, onnx
from illume_rt.calibration import accuracy, datasets
from illume_rt.runtime.bundle import load_bundle
from illume_rt.runtime.pipeline import Pipeline
from illume_rt.engines.ort import OrtEngine

B = Path(sys.argv[1]); qdq = Path(sys.argv[2])  # the FP32-remainder Q/DQ graph vae_worst.py wrote (OUT/vae-worst-*/vae.onnx)
named = qdq.with_name("vae_decoder.named.onnx")
manifest = json.loads((B / "manifest.json").read_text())
pipe = Pipeline(load_bundle(B), "ort-cpu", 2)
feeds, _ = datasets.capture(pipe, datasets.plan_for(manifest["model"], "calibration"), lambda m: None, refinements=True)
vae_feeds = feeds["vae_decoder"]; del feeds
fp32 = OrtEngine("vae_decoder", named, "ort-cpu", 2)
want = [fp32.run(f)[0] for f in vae_feeds]
orig = {i.name: i for i in onnx.load(str(named)).graph.initializer}

def variant(drop_acts: bool, drop_weights: bool) -> Path:
    m = onnx.load(str(qdq)); g = m.graph
    inits = {i.name for i in g.initializer}
    rename, keep = {}, []
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            is_weight = n.input[0] in inits
            if (is_weight and drop_weights) or (not is_weight and drop_acts):
                rename[n.output[0]] = n.input[0]; continue
        keep.append(n)
    keep2 = []
    for n in keep:
        if n.op_type == "DequantizeLinear" and n.input[0] in rename:
            rename[n.output[0]] = rename[n.input[0]]; continue
        keep2.append(n)
    for n in keep2:
        for k, x in enumerate(n.input):
            while x in rename: x = rename[x]
            n.input[k] = x
    del g.node[:]; g.node.extend(keep2)
    out = qdq.with_name(f"split-{int(drop_acts)}{int(drop_weights)}.onnx")
    onnx.save(m, str(out)); return out

for label, a, w in (("both quantized", False, False), ("weights only", True, False), ("activations only", False, True)):
    e = OrtEngine("vae_decoder", variant(a, w), "ort-cpu", 2)
    ps = [accuracy.psnr(e.run(f)[0], t) for f, t in zip(vae_feeds, want)]
    print(label, "worst", round(min(ps), 2), "mean", round(float(np.mean(ps)), 2), [round(p, 1) for p in ps], flush=True)

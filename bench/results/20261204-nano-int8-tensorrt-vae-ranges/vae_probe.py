"""Probe: nano's INT8 tensorrt VAE decoder, refinement PSNR vs FP32 for several activation-range choices."""
import json, sys, time, tempfile
from dataclasses import replace
from pathlib import Path
import numpy as np
import onnx
from onnx import numpy_helper

from illume_rt.calibration import accuracy, datasets, recipes
from illume_rt.runtime.bundle import load_bundle
from illume_rt.runtime.pipeline import Pipeline
from illume_rt.engines.ort import OrtEngine

B = Path(sys.argv[1]); OUT = Path(sys.argv[2]); OUT.mkdir(parents=True, exist_ok=True)
variants = sys.argv[3].split(",")
threads = 2
manifest = json.loads((B / "manifest.json").read_text())
pipe = Pipeline(load_bundle(B), "ort-cpu", threads)
t = time.perf_counter()
feeds, _ = datasets.capture(pipe, datasets.plan_for(manifest["model"], "calibration"), lambda m: None, refinements=True)
vae_feeds = feeds["vae_decoder"]; del feeds
evals = accuracy.record_eval(pipe, datasets.plan_for(manifest["model"], "evaluation"), refinements=True)
refs = evals["refinements"]
print(f"captured {len(vae_feeds)} VAE feeds, {len(refs)} refinements in {time.perf_counter() - t:.0f}s", flush=True)
src = B / manifest["components"]["vae_decoder"]["file"]
eval_latents = []
inner = pipe.engines["vae_decoder"]
class Rec:
    def __getattr__(s, k): return getattr(inner, k)
    def run(s, f): eval_latents.append({k: np.array(v) for k, v in f.items()}); return inner.run(f)
pipe.replace_engine("vae_decoder", Rec())
for r in refs:
    pipe.refine_image(r["semantic"], r["pixel"], r["grid"], r["config"], np.random.default_rng(r["seed"]))
pipe.engines.close("vae_decoder")
print("eval latents |max|", [round(float(np.abs(f[list(f)[0]]).max()), 2) for f in eval_latents], flush=True)


def abs_percentile_scales(fp32_qdq: Path, named: Path, pct: float) -> dict:
    model = onnx.load(str(fp32_qdq))
    inits = {i.name for i in model.graph.initializer}
    acts = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            acts[node.input[0]] = node.input[1]
    names = list(acts)
    chunks = {n: [] for n in names}
    for run in recipes._tensor_values(named, names, vae_feeds, threads):
        for n, v in zip(names, run):
            chunks[n].append(np.abs(np.asarray(v, np.float32)).ravel())
    scales = {}
    for n in names:
        flat = np.concatenate(chunks.pop(n))
        scales[acts[n]] = (float(np.percentile(flat, pct)) if pct < 100 else float(flat.max())) / 127.0
    return scales


results = {}
for variant in variants:
    work = Path(tempfile.mkdtemp(prefix="vae-probe-", dir=OUT))
    hp = "fp32" if variant == "max-fp32" else "fp16"
    recipe = recipes.recipe_for("vae_decoder", "int8", "tensorrt", hp, "nano")
    out = work / "vae.onnx"
    t = time.perf_counter()
    cal = vae_feeds + (eval_latents if variant == "with-eval-latents" else [])
    info = recipes.quantize_graph(recipe, src, out, cal, threads, work)
    extra = {}
    if variant.startswith("pct") or variant.startswith("wide"):
        fp32_qdq = work / "vae_decoder.qdq-fp32.onnx"
        if variant.startswith("pct"):
            scales = abs_percentile_scales(fp32_qdq, work / "vae_decoder.named.onnx", float(variant[3:]))
        else:
            scales = {k: v * float(variant[4:]) for k, v in abs_percentile_scales(fp32_qdq, work / "vae_decoder.named.onnx", 100).items()}
        model = onnx.load(str(fp32_qdq))
        old = {}
        for init in model.graph.initializer:
            if init.name in scales:
                old[init.name] = float(numpy_helper.to_array(init))
                init.CopyFrom(numpy_helper.from_array(np.asarray(scales[init.name], np.float32), init.name))
        extra["scale_ratio_new_over_max"] = {k: round(scales[k] / old[k], 4) for k in old}
        modified = work / "vae.qdq-fp32-pct.onnx"
        onnx.save(model, str(modified))
        recipes.convert_float(replace(recipe, precision="fp16"), modified, out, vae_feeds, work)
    engine = OrtEngine("vae_decoder", out, "ort-cpu", threads)
    fig = accuracy.refinement_figures(pipe, {"vae_decoder": engine}, refs)
    results[variant] = {"worst_psnr_db": fig["worst_psnr_db"], "mean_psnr_db": fig["mean_psnr_db"],
                        "pictures": fig["pictures"], "quantized_nodes": info.get("quantized_nodes"),
                        "seconds": round(time.perf_counter() - t, 1), **extra}
    print(variant, json.dumps({k: v for k, v in results[variant].items() if k != "scale_ratio_new_over_max"}),
          flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))

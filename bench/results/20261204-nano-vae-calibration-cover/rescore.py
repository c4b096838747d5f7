"""nano's calibrated flavours quantized with the VAE decoder's extra calibration latents (datasets.nano_plan's
``vae_only_refine``), scored on what those latents can change: the graph figures, the end-to-end refinement gate
(12 held-out pictures against FP32), and the refined 2x picture against the scene rendered at 2x.

``python rescore.py BUNDLE OUT [FLAVOURS] [--no-scene-scores]`` (FLAVOURS: comma-separated names of
nano.quantized_eval.FLAVOURS, default int8-ort-cpu,int8-tensorrt,fp8-tensorrt). Writes OUT/rescore.json after each
flavour.

The prompt figures are not scored here (``prompt_scorers={}``): the extra latents feed the VAE decoder only, so the
LLM, UNet, pixel decoder and encoders are calibrated on the feeds they had (tests/test_quantize.py
test_vae_only_refinements_feed_the_vae_decoder_and_nothing_else), and the prompt scorers draw through the pixel
decoder, which no VAE touches. The FP32 runs are the same for every flavour (one bundle, one plan), so ``once``
was meant to take them once, as tests/test_quantize.py does. As run, only the evaluation record was reused: the
calibration capture's key holds the log function, a new one per flavour, so each flavour captured again (the same
plan on the same bundle: the same feeds, at about 8 minutes each on that day's machine)."""

import copy
import json
import sys
import time
from pathlib import Path

from illume_rt.calibration import accuracy, datasets
from illume_rt.calibration.quantize import quantize_bundle
from illume_rt.nano import quantized_eval


def once(run):
    done = {}

    def wrapped(pipe, plan, *args, **kwargs):
        key = (json.dumps(plan.to_dict(), sort_keys=True), args, tuple(sorted(kwargs.items())))
        if key not in done:
            done[key] = run(pipe, plan, *args, **kwargs)
        return copy.deepcopy(done[key])

    return wrapped


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    bundle, out = Path(args[0]), Path(args[1])
    names = (args[2] if len(args) > 2 else "int8-ort-cpu,int8-tensorrt,fp8-tensorrt").split(",")
    scene_scores = "--no-scene-scores" not in sys.argv
    flavours = [f for f in quantized_eval.FLAVOURS if f[0] in names]
    datasets.capture = once(datasets.capture)
    accuracy.record_eval = once(accuracy.record_eval)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": quantized_eval._machine(), "versions": quantized_eval._versions(),
              "code_commit": quantized_eval._commit(), "bundle": str(bundle), "flavours": {}}
    for name, precision, target in flavours:
        t0 = time.time()
        print(f"== {name}", flush=True)
        manifest = quantize_bundle(bundle, out / name, precision, target, keep_failed=True, threads=1,
                                   log=lambda m: print(m, flush=True), overwrite=True, prompt_scorers={})
        q = manifest["quantization"]
        entry = {"status": q["status"], "failures": q["failures"], "refinement_gate": q.get("refinement"),
                 "graphs": quantized_eval._graph_summary(manifest),
                 "vae_calibration_latents": q["calibration"]["samples"].get("vae_decoder"),
                 "vae_only_refine": [r["prompt"] for r in q["calibration"].get("vae_only_refine", [])],
                 "quantize_seconds": q["seconds"]}
        if scene_scores:
            entry["refinement"] = quantized_eval._refinement(out / name, 1)
        entry["seconds"] = round(time.time() - t0, 1)
        result["flavours"][name] = entry
        print(json.dumps(entry, indent=1), flush=True)
        (out / "rescore.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

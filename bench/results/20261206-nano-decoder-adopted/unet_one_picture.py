"""Session 49: nano's INT8 ort-cpu UNet calibrated on one picture of its plan (each index given), UNet alone: its
graph gate and the end-to-end refinement figures (tests/test_nano_quantize.py keeps the case the gate exists for).

    python unet_one_picture.py 0 1 2 3
"""
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def main():
    from refine_figs import exported_bundle  # this folder's other script
    from illume_rt.calibration import datasets, recipes
    from illume_rt.calibration.quantize import quantize_bundle
    bundle = exported_bundle()
    model = json.loads((bundle / "manifest.json").read_text())["model"]
    plan = datasets.plan_for(model, "calibration")
    print("plan refine", plan.refine, len(plan.prompts) if hasattr(plan, "prompts") else "")
    for k in [int(a) for a in sys.argv[1:]]:
        one = replace(plan, refine=[k])
        th = {**recipes.thresholds_for("nano", "int8", random_weights=False), "refine_psnr_db": 38.0}
        with tempfile.TemporaryDirectory() as tmp:
            m = quantize_bundle(bundle, Path(tmp) / "q", "int8", "ort-cpu", keep_failed=True, threads=2,
                                components=["diffusion_unet"], log=lambda m: None, prompt_scorers={},
                                calibration=one, thresholds=th)
        q = m["quantization"]
        u = m["components"]["diffusion_unet"]["quantization"]
        r = q.get("refinement", {})
        print(k, "unet passed", u["passed"], "cos", u["accuracy"]["worst_cosine"], "thr", q["thresholds"]["cosine"],
              "refine worst", r.get("worst_psnr_db"), "mean", r.get("mean_psnr_db"), flush=True)


if __name__ == "__main__":
    main()

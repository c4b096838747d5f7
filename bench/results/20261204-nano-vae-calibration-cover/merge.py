"""Merge rescore.json into nano/weights/quantized_eval.json: for each re-scored flavour, its graph figures, its
refinement gate and its refinement against the 2x scene are replaced; what they were is kept under
``vae_cover_re_measured``, with why and how they were measured. The prompt and held-out figures stay: the VAE
decoder is not on their path (rescore.py says why). ``python merge.py RESCORE_JSON QUANTIZED_EVAL_JSON``"""

import json
import sys
from pathlib import Path

REPLACED = ("graphs", "refinement_gate", "refinement", "status", "failures")


def main() -> None:
    rescore = json.loads(Path(sys.argv[1]).read_text())
    target = Path(sys.argv[2])
    figures = json.loads(target.read_text())
    before = {}
    for name, entry in rescore["flavours"].items():
        old = figures["flavours"][name]
        before[name] = {key: old.get(key) for key in REPLACED}
        old.update({key: entry[key] for key in REPLACED if key in entry})
    figures["vae_cover_re_measured"] = {
        "why": "nano's calibration plan gained VAE-only latents: one refined training caption per (colour, "
               "background, size) its full captions do not show (calibration/datasets.py nano_plan "
               "vae_only_refine). The plan's one blue-on-gray caption reached a latent of 5.59, the evaluation's "
               "blue-on-gray pictures 9.31 and 8.61, and the INT8 VAE decoder clipped them "
               "(bench/results/20261204-nano-int8-tensorrt-vae-ranges). The three calibrated flavours were "
               "quantized again without prompt scoring, and these entries of theirs replaced. The prompt and "
               "held-out figures are not re-scored: the extra latents feed only the VAE decoder, and prompts are "
               "scored through the pixel decoder (bench/results/20261204-nano-vae-calibration-cover/NOTES.md).",
        **{key: rescore[key] for key in ("command", "date", "code_commit", "machine", "versions")},
        "vae_only_refine": next(iter(rescore["flavours"].values())).get("vae_only_refine"),
        "vae_calibration_latents": next(iter(rescore["flavours"].values())).get("vae_calibration_latents"),
        "before": before}
    target.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()

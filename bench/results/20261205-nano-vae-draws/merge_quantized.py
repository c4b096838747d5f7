"""Merge a full ``nano.quantized_eval`` run on the weights with session 45's diffusion decoder into
nano/weights/quantized_eval.json: the new run becomes the file's top level; the figures it replaces that depend on
the diffusion decoder (per flavour: status, graph figures, refinement gate, refinement against the 2x scene; and
FP32's refinement) are kept under ``before_session_45`` with the old run's date, commit and decoder hashes, with
whether its prompt figures equal the new run's; the older sections the file kept (earlier re-measures) stay as they
were. ``python merge_quantized.py NEW_JSON QUANTIZED_EVAL_JSON``

As run in session 45, two lines were written by hand: the new run's ``code_note`` (added to NEW_JSON before the
merge: the run started with the new decoder uncommitted) and ``before_session_45.int8_ort_cpu_prompt_figures``
(after it: why that flavour's prompt figures differ, found by comparing with session 40's re-score)."""

import json
import sys
from pathlib import Path

DECODER_DEPENDENT = ("status", "failures", "graphs", "refinement_gate", "refinement")
PROMPT_FIGURES = ("quantized", "held_out")


def main() -> None:
    new = json.loads(Path(sys.argv[1]).read_text())
    target = Path(sys.argv[2])
    old = json.loads(target.read_text())
    same = {"fp32": old["fp32"] == new["fp32"], "fp32_held_out": old["fp32_held_out"] == new["fp32_held_out"]}
    flavours = {}
    for name, entry in old["flavours"].items():
        kept = {key: entry.get(key) for key in DECODER_DEPENDENT if key in entry}
        if "graphs" in kept:  # the graphs the diffusion decoder changes; the others are in the new run's entry
            kept["graphs"] = {g: v for g, v in kept["graphs"].items() if g in ("diffusion_unet", "vae_decoder")}
        flavours[name] = kept
        fresh = new["flavours"].get(name, {})
        same[name] = {key: entry.get(key) == fresh.get(key) for key in PROMPT_FIGURES if key in entry}
    before = {
        "why": "session 45 replaced the diffusion decoder (VAE and UNet) by the one the recipe's averaged VAE gives "
               "(bench/results/20261205-nano-vae-draws/NOTES.md, 'Adopted'); every flavour was quantized and "
               "scored again in full. These are the figures of the decoder before (session 32's) that depend on "
               "it; 'prompt_figures_equal' says whether the figures that do not (the prompt gate and held-out "
               "scores: the LLM and the pixel decoder did not change) came out the same in the new run.",
        **{key: old.get(key) for key in ("command", "date", "code_commit", "code_note")},
        "cpu": old["machine"]["cpu"],
        "diffusion_weights": old["weights"].get("diffusion"),
        "fp32_refinement": old["fp32_refinement"],
        "flavours": flavours,
        "prompt_figures_equal": same,
    }
    merged = dict(new)
    merged["before_session_45"] = before
    for key, value in old.items():
        if key not in new and key != "code_note":  # earlier re-measures and history, as they were
            merged[key] = value
    target.write_text(json.dumps(merged, indent=1) + "\n")
    print(json.dumps(same))


if __name__ == "__main__":
    main()

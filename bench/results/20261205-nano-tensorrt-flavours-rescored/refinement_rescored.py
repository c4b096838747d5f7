"""Refinement PSNR of the FP32 nano bundle and kept quantized bundles, scored as nano/quantized_eval.py scores it
(``decoder.refinement_scores`` on the first 10 held-out scenes, onnxruntime CPU, one thread), each from the codes of
the tokenizer the FP32 bundle was exported from (``decoder.bundle_tokenizer``).

    python refinement_rescored.py FP32_BUNDLE [QUANTIZED_BUNDLE ...] > refinement_rescored.json

Written for session 41: its two quantized_eval runs scored refinement with the tokenizer of the checkout they ran
in, which held other weights (see NOTES.md)."""

import json
import sys
import time
from pathlib import Path

from illume_rt.nano import decoder
from illume_rt.nano.heldout import eval_scenes
from illume_rt.runtime.pipeline import Pipeline

SCENES = 10  # quantized_eval.REFINE_SCENES


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    fp32 = Path(sys.argv[1])
    tokenizer = decoder.bundle_tokenizer(fp32)
    if tokenizer is None:
        print(f"{fp32}: the tokenizer it was exported from is not here", file=sys.stderr)
        return 2
    encoder, pixel = decoder.tokenizer_from_weights(tokenizer)
    out = {"tokenizer": str(tokenizer)}
    for name, path in [("fp32", fp32)] + [(p.name, p) for p in map(Path, sys.argv[2:])]:
        t0 = time.time()
        out[name] = decoder.refinement_scores(Pipeline.from_bundle(path, "ort-cpu", 1), eval_scenes("held")[:SCENES],
                                              encoder, pixel)
        print(name, out[name], f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Score an MLLM state of stage_512.py (or the committed weights) on the runtime: greedy at guidance 1.5 (nano's
chosen text-to-image guidance) on the 90 held-out prompts at 512x512 and at 256x256, and, with N > 0, every
(225 / N)-th held-out edit greedy at guidance 1.0 (nano's editing guidance). Writes OUT.json and, per size, a sheet
of the first 8 pictures (OUT.512.png, OUT.256.png). SIZES=512 in the environment scores one size only.

    python score_512.py WORK/res512.pt OUT.json 45      # the state exported with WORK's tokenizer and decoder
    SIZES=512 python score_512.py committed OUT.json 45 # the committed weights (the cached built-in bundle)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

COMMITTED = Path(__file__).resolve().parents[3] / "nano" / "weights"


def score(bundle, tag: str, out: Path, n_edits: int) -> dict:
    from PIL import Image

    from illume_rt.nano import heldout, score
    from illume_rt.runtime.options import SamplingConfig
    from illume_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    greedy = SamplingConfig(guidance_scale=1.5, greedy=True)
    res = {}
    for size in (int(s) for s in os.environ.get("SIZES", "512,256").split(",")):
        marks, pictures, t0 = [], [], time.time()
        for k, (prompt, wanted) in enumerate(heldout.eval_prompts(which="held")):
            img = pipe.generate(prompt, resolution=(size, size), seed=0, sampling=greedy).image
            marks.append(score.score_picture(img, wanted))
            if k < 8:
                pictures.append(Image.fromarray(img).resize((256, 256)))
        sheet = Image.new("RGB", (8 * 256, 256))
        for k, picture in enumerate(pictures):
            sheet.paste(picture, (256 * k, 0))
        sheet.save(out.with_suffix(f".{size}.png"))
        res[f"greedy_{size}"] = {k: round(v, 3) for k, v in score.summarize(marks).items()}
        print(tag, size, res[f"greedy_{size}"], f"{time.time() - t0:.0f}s", flush=True)
    if n_edits:
        edits = heldout.eval_edits(which="held")[::max(1, 225 // n_edits)]
        res["edits_greedy"] = heldout.score_edits(pipe, edits, sampling=SamplingConfig(guidance_scale=1.0,
                                                                                        greedy=True))
        print(tag, "edits", {k: v for k, v in res["edits_greedy"].items() if not isinstance(v, dict)}, flush=True)
    return res


def main(state: str, out: Path, n_edits: int) -> None:
    import torch

    from illume_rt.nano import evaluate
    from illume_rt.nano import train as T
    from illume_rt.nano.checkpoint import NanoWeights

    if state == "committed":
        with evaluate.bundle_of(NanoWeights(COMMITTED), log=lambda m: None) as bundle:
            res = score(bundle, "committed", out, n_edits)
    else:
        src = Path(state)
        tmp = Path(tempfile.mkdtemp(prefix="score512-"))
        try:
            work = tmp / "work"
            work.mkdir()
            for name in ("semantic.pt", "pixel.pt", "vae.pt", "decoder.pt", "log.json"):
                os.symlink(src.parent / name, work / name)
            loaded = torch.load(src, weights_only=True)
            torch.save({"modules": loaded["modules"]}, work / "polish.pt")  # what stage_export reads
            T.stage_export(work, tmp / "weights")
            with evaluate.bundle_of(NanoWeights(tmp / "weights"), log=lambda m: None) as bundle:
                res = score(bundle, src.name, out, n_edits)
        finally:
            shutil.rmtree(tmp)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)

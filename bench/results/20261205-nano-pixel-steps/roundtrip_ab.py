"""Nano's pixel tokenizer stage, one arm of an A/B, then its round trip on every picture of the grammar.

    python bench/results/20261205-nano-pixel-steps/roundtrip_ab.py WORK [--crop-steps N] [--full-steps N]
        [--object-weight K]

WORK must hold a finished ``semantic.pt`` and ``log.json`` (``python -m illume_rt.nano.train --work WORK --seed-from
nano/weights tokens`` writes them from the committed weights). The arm trains ``nano.train``'s own ``stage_pixel`` at
its seed, with the step counts given (the recipe: PIXEL_CROP_STEPS / PIXEL_FULL_STEPS) and, with
``--object-weight K``, the reconstruction losses weighted 1 + K on the object's pixels (the picture's corner colour
is its background at every grammar position). It writes ``WORK/pixel.pt`` and ``WORK/roundtrip.json``: each split's
pictures through encode and decode, read back by ``nano/score.py``, as ``stage_tokens`` measures the held-out ones.
One thread: the arm is a pure function of its arguments on one machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main(argv=None) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from illume_rt.nano import data, score
    from illume_rt.nano import train as T

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--object-weight", type=float, default=0.0)
    ap.add_argument("--crop-steps", type=int, default=T.PIXEL_CROP_STEPS)
    ap.add_argument("--full-steps", type=int, default=T.PIXEL_FULL_STEPS)
    ap.add_argument("--seed-work", type=Path, default=None,
                    help="copy semantic.pt and log.json from this work folder first")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.seed_work is not None:
        for name in ("semantic.pt", "log.json"):
            shutil.copy(args.seed_work / name, args.work / name)
    if not (args.work / "semantic.pt").is_file():
        ap.error(f"{args.work} has no semantic.pt: run nano.train --work {args.work} --seed-from nano/weights tokens")
    T.PIXEL_CROP_STEPS, T.PIXEL_FULL_STEPS = args.crop_steps, args.full_steps

    background = {}
    recipe_batch = T.random_batch

    def random_batch(rng, scenes, n):
        x = recipe_batch(rng, scenes, n)
        background["rgb"] = x[:, :, 0, 0].clone()
        return x

    class ObjectWeighted:
        """torch.nn.functional, with the pixel stage's two reconstruction losses weighted on the object."""

        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def _weights(target):
            far = (target - background["rgb"][:, :, None, None]).abs().sum(1, keepdim=True) > 0.15
            return 1 + args.object_weight * far.float()

        def l1_loss(self, rec, target):
            if target.shape[1] != 3:  # the codebook's commitment terms are not reconstruction
                return F.l1_loss(rec, target)
            w = self._weights(target)
            return (w * (rec - target).abs()).mean() / w.mean()

        def mse_loss(self, rec, target):
            if target.shape[1] != 3:
                return F.mse_loss(rec, target)
            w = self._weights(target)
            return (w * (rec - target) ** 2).mean() / w.mean()

    if args.object_weight:
        T.random_batch, T.F = random_batch, ObjectWeighted()
    try:
        T.stage_pixel(args.work)
    finally:
        T.random_batch, T.F = recipe_batch, F

    enc, _, pixel = T.load_tokenizer_state(args.work)
    train, held = data.split()
    out = {"args": {k: str(v) for k, v in vars(args).items()}}
    with torch.no_grad():
        for name, scenes in (("held", held), ("train", train)):
            marks, failed = [], []
            for k0 in range(0, len(scenes), 16):
                chunk = scenes[k0:k0 + 16]
                x = torch.from_numpy(np.concatenate([data.to_model_input(data.render(s)) for s in chunk]))
                z = enc.proj(enc.features(x)).transpose(1, 2).reshape(len(chunk), -1, 9, 9)
                sem = pixel.semantic_quantizer.nearest_indices(z)
                pix = pixel.pixel_quantizer.nearest_indices(pixel.pixel_quant_conv(pixel.pixel_encoder(x)))
                rec = pixel.decode_code(sem, pix)
                imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                for img, scene in zip(imgs, chunk):
                    m = score.score_picture(img, {a: getattr(scene, a) for a in data.ATTRIBUTES})
                    marks.append(m)
                    if not m["all"]:
                        failed.append({**scene.__dict__, "wrong": [a for a in data.ATTRIBUTES if not m[a]]})
            out[name] = {"pictures": len(scenes), "round_trip": score.summarize(marks), "failed": failed}
            print(f"{name}: {len(failed)} of {len(scenes)} pictures come back wrong; {out[name]['round_trip']}",
                  flush=True)
    (args.work / "roundtrip.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

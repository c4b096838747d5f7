"""The README's gallery: held-out prompts drawn by illume-nano, each scored by ``score.py``, in one PNG grid.

    python -m illume_rt.nano.gallery            # -> docs/nano-gallery.png and docs/nano-gallery.json

Greedy and the README's default sampling side by side (seed 0), one row per held-out scene (the first ``--rows``
of ``evaluate.eval_scenes``: combinations never trained on). Under each picture: the attributes the scorer read
back wrong (none: "all right"). The JSON holds the prompts, the marks and the summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from illume_rt.nano import data, score
from illume_rt.nano.heldout import GUIDANCE, eval_scenes

DOCS = Path(__file__).resolve().parents[1] / "docs"
CELL = 128  # each picture is shown at half size: the grid stays under 500 KB
LABEL = 26


def draw(pipe, prompt: str, greedy: bool, seed: int = 0) -> np.ndarray:
    from illume_rt.runtime.options import SamplingConfig

    sampling = SamplingConfig(guidance_scale=GUIDANCE, greedy=True) if greedy else None  # None: the README's
    return pipe.generate(prompt, resolution=(256, 256), seed=seed, sampling=sampling).image


def make_gallery(pipe, rows: int, out_png: Path, out_json: Path, per_row: int = 3) -> dict:
    """``rows`` held-out scenes, ``per_row`` to a line of the grid; each scene is its prompt over its greedy and
    sampled pictures, each with what the scorer read back wrong."""
    import textwrap

    scenes = eval_scenes("held")[:rows]
    columns = (("greedy", True), ("sampled", False))
    block_w, header, footer = len(columns) * CELL, 26, LABEL
    block_h = header + CELL + footer
    lines = -(-len(scenes) // per_row)
    canvas = Image.new("RGB", (per_row * block_w + (per_row - 1) * 8, lines * (block_h + 8)), "white")
    pen = ImageDraw.Draw(canvas)
    record = {"prompts": [], "columns": [c for c, _ in columns], "guidance": GUIDANCE, "seed": 0,
              "command": "python -m illume_rt.nano.gallery"}
    marks = {c: [] for c, _ in columns}
    for i, scene in enumerate(scenes):
        bx, by = (i % per_row) * (block_w + 8), (i // per_row) * (block_h + 8)
        pen.text((bx + 2, by), "\n".join(textwrap.wrap(scene.caption, width=block_w // 6)[:2]), fill="black")
        wanted = {a: getattr(scene, a) for a in data.ATTRIBUTES}
        entry = {"prompt": scene.caption, "marks": {}}
        for c, (name, greedy) in enumerate(columns):
            image = draw(pipe, scene.caption, greedy)
            mark = score.score_picture(image, wanted)
            marks[name].append(mark)
            entry["marks"][name] = mark
            x, y = bx + c * CELL, by + header
            canvas.paste(Image.fromarray(image).resize((CELL, CELL), Image.LANCZOS), (x, y))
            wrong = [a for a in data.ATTRIBUTES if not mark[a]]
            pen.text((x + 2, y + CELL + 1), name + (": all right" if not wrong else ": wrong"),
                     fill="green" if not wrong else "red")
            if wrong:
                pen.text((x + 2, y + CELL + 12), ",".join(wrong)[:CELL // 6], fill="red")
        record["prompts"].append(entry)
    record["summary"] = {name: score.summarize(m) for name, m in marks.items()}
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, optimize=True)
    out_json.write_text(json.dumps(record, indent=1))
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m illume_rt.nano.gallery", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=12, help="held-out scenes (rows of the grid)")
    p.add_argument("--bundle", help="a nano bundle (default: the built-in one)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--output", type=Path, default=DOCS / "nano-gallery.png")
    args = p.parse_args(argv)
    from illume_rt.cli import ensure_default_bundle
    from illume_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(args.bundle or ensure_default_bundle("nano"), threads=args.threads)
    record = make_gallery(pipe, args.rows, args.output, args.output.with_suffix(".json"))
    for name, summary in record["summary"].items():
        print(name, " ".join(f"{k} {v:.0%}" for k, v in summary.items()))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

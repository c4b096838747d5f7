"""The README's gallery: held-out prompts drawn by illume-nano, each scored by ``score.py``, in one PNG grid.

    python -m illume_rt.nano.gallery            # -> docs/nano-gallery.png and docs/nano-gallery.json

Greedy and the README's default sampling side by side (seed 0), for the first ``--rows`` held-out scenes
(``heldout.eval_scenes``: combinations never trained on); then ``--edit-rows`` held-out pictures, each with one
edit (``heldout.eval_edits``), greedy and at the editing defaults. Under each picture: the attributes the scorer read
back wrong (none: "all right"). The JSON holds the prompts, the edits, the marks and the summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from illume_rt.nano import data, score
from illume_rt.nano.heldout import eval_scenes, greedy_sampling

DOCS = Path(__file__).resolve().parents[1] / "docs"
CELL = 128  # each picture is shown at half size: the grid stays under 500 KB
LABEL = 26


def draw(pipe, prompt: str, greedy: bool, seed: int = 0) -> np.ndarray:
    sampling = greedy_sampling(pipe) if greedy else None  # None: the README's
    return pipe.generate(prompt, resolution=(256, 256), seed=seed, sampling=sampling).image


def _section(blocks: list[tuple[str, list[tuple[str, np.ndarray, dict | None]]]], per_row: int) -> Image.Image:
    """One grid: each block is a header over its pictures, each picture with its label and, when scored, what the
    scorer read back wrong."""
    import textwrap

    columns = max(len(pictures) for _, pictures in blocks)
    block_w, header = columns * CELL, 26
    block_h = header + CELL + LABEL
    lines = -(-len(blocks) // per_row)
    canvas = Image.new("RGB", (per_row * block_w + (per_row - 1) * 8, lines * (block_h + 8)), "white")
    pen = ImageDraw.Draw(canvas)
    for i, (title, pictures) in enumerate(blocks):
        bx, by = (i % per_row) * (block_w + 8), (i // per_row) * (block_h + 8)
        pen.text((bx + 2, by), "\n".join(textwrap.wrap(title, width=block_w // 6)[:2]), fill="black")
        for c, (label, image, mark) in enumerate(pictures):
            x, y = bx + c * CELL, by + header
            canvas.paste(Image.fromarray(image).resize((CELL, CELL), Image.LANCZOS), (x, y))
            if mark is None:
                pen.text((x + 2, y + CELL + 1), label, fill="black")
                continue
            wrong = [a for a in data.ATTRIBUTES if a in mark and not mark[a]]
            pen.text((x + 2, y + CELL + 1), label + (": all right" if not wrong else ": wrong"),
                     fill="green" if not wrong else "red")
            if wrong:
                pen.text((x + 2, y + CELL + 12), ",".join(wrong)[:CELL // 6], fill="red")
    return canvas


def make_gallery(pipe, rows: int, out_png: Path, out_json: Path, per_row: int = 3, edit_rows: int = 5) -> dict:
    """``rows`` held-out scenes, ``per_row`` to a line of the grid, each its prompt over its greedy and sampled
    pictures; then ``edit_rows`` held-out pictures, each edited once (the kinds of edit in turn: colour, position,
    shape, background, size) greedy and sampled. Each picture shows what the scorer read back wrong (for an edit:
    against the edited scene, i.e. the attribute asked for and every one to keep)."""
    from illume_rt.nano.heldout import eval_edits, runtime_edit

    record = {"prompts": [], "edits": [], "columns": ["greedy", "sampled"],
              "guidance": greedy_sampling(pipe).guidance_scale, "seed": 0,
              "command": "python -m illume_rt.nano.gallery"}
    marks = {"greedy": [], "sampled": [], "edit greedy": [], "edit sampled": []}
    blocks = []
    for scene in eval_scenes("held")[:rows]:
        wanted = {a: getattr(scene, a) for a in data.ATTRIBUTES}
        entry, pictures = {"prompt": scene.caption, "marks": {}}, []
        for name, greedy in (("greedy", True), ("sampled", False)):
            image = draw(pipe, scene.caption, greedy)
            mark = score.score_picture(image, wanted)
            marks[name].append(mark)
            entry["marks"][name] = mark
            pictures.append((name, image, mark))
        record["prompts"].append(entry)
        blocks.append((scene.caption, pictures))
    sections = [_section(blocks, per_row)]
    edits = eval_edits(which="held")
    kinds = len(data.EDIT_INSTRUCTIONS)
    blocks = []
    for n in range(min(edit_rows, len(edits) // kinds)):
        source, instruction, target = edits[n * kinds + n % kinds]  # scene n, its edit of kind n
        wanted = {a: getattr(target, a) for a in data.ATTRIBUTES}
        entry = {"source": source.caption, "instruction": instruction, "marks": {}}
        pictures = [("source", data.render(source), None)]
        for name, sampling in (("greedy", None), ("sampled", pipe.default_sampling("editing"))):
            image = runtime_edit(pipe, source, instruction, sampling)
            mark = score.score_picture(image, wanted)
            marks["edit " + name].append(mark)
            entry["marks"][name] = mark
            pictures.append((name, image, mark))
        record["edits"].append(entry)
        blocks.append((f'"{instruction}"', pictures))
    if blocks:
        sections.append(_section(blocks, max(1, (per_row * 2) // 3)))
    width = max(s.width for s in sections)
    canvas = Image.new("RGB", (width, sum(s.height for s in sections) + 8 * (len(sections) - 1)), "white")
    y = 0
    for section in sections:
        canvas.paste(section, (0, y))
        y += section.height + 8
    record["summary"] = {name: score.summarize(m) for name, m in marks.items() if m}
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png, optimize=True)
    out_json.write_text(json.dumps(record, indent=1))
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m illume_rt.nano.gallery", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=9, help="held-out prompts (three to a line)")
    p.add_argument("--edit-rows", type=int, default=5, help="held-out pictures edited (two to a line)")
    p.add_argument("--bundle", help="a nano bundle (default: the built-in one)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--output", type=Path, default=DOCS / "nano-gallery.png")
    args = p.parse_args(argv)
    from illume_rt.cli import ensure_default_bundle
    from illume_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(args.bundle or ensure_default_bundle("nano"), threads=args.threads)
    record = make_gallery(pipe, args.rows, args.output, args.output.with_suffix(".json"), edit_rows=args.edit_rows)
    for name, summary in record["summary"].items():
        print(name, " ".join(f"{k} {v:.0%}" for k, v in summary.items()))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

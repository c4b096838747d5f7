"""Which held-out prompts each of several nano weights folders draws wrong (greedy, runtime), and how far their
misses overlap.

    python bench/results/20261205-nano-seed-spread/prompt_marks.py marks NAME=WEIGHTS [NAME=WEIGHTS ...] -o DIR
    python bench/results/20261205-nano-seed-spread/prompt_marks.py overlap DIR

``marks`` draws the 90 held-out prompts of ``nano/heldout.py`` greedy with each folder's own guidance (as
``nano.evaluate`` does, seed 0, two threads), scores each picture with ``nano/score.py`` and writes
``DIR/NAME.json``: one row per prompt with its marks. ``overlap`` reads every such file in DIR and prints, per
attribute, how many prompts each folder misses and how many of the missed prompts are missed by 1, 2, ... folders:
misses shared by every draw point at the data or the grammar, misses of one draw at the draw.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

ATTRIBUTES = ("background", "position", "colour", "shape", "size", "all")


def marks(named: list[str], out: Path) -> None:
    from illume_rt.nano import evaluate, heldout, score
    from illume_rt.nano.checkpoint import NanoWeights
    from illume_rt.runtime.pipeline import Pipeline

    out.mkdir(parents=True, exist_ok=True)
    for item in named:
        name, _, folder = item.partition("=")
        if not folder:
            raise SystemExit(f"prompt_marks: {item!r} is not NAME=WEIGHTS")
        with evaluate.bundle_of(NanoWeights(Path(folder))) as bundle:
            pipe = Pipeline.from_bundle(bundle, threads=2)
            rows = []
            for prompt, wanted in heldout.eval_prompts(None, "held"):
                image = heldout.runtime_generate(pipe, prompt)[0]
                rows.append({"prompt": prompt, "wanted": wanted, "marks": score.score_picture(image, wanted)})
        (out / f"{name}.json").write_text(json.dumps({"weights": folder, "rows": rows}, indent=1))
        print(f"{name}: {sum(not r['marks']['all'] for r in rows)} of {len(rows)} prompts not all right")


def overlap(folder: Path) -> dict:
    runs = {p.stem: json.loads(p.read_text())["rows"] for p in sorted(folder.glob("*.json"))}
    if not runs:
        raise SystemExit(f"prompt_marks: no marks in {folder}: run `prompt_marks.py marks ... -o {folder}` first")
    report = {}
    for attribute in ATTRIBUTES:
        missed = {name: {r["prompt"] for r in rows if not r["marks"].get(attribute, True)}
                  for name, rows in runs.items()}
        by_count = Counter(Counter(p for s in missed.values() for p in s).values())
        report[attribute] = {"missed_per_folder": {k: len(v) for k, v in missed.items()},
                             "prompts_missed_by_n_folders": dict(sorted(by_count.items())),
                             "missed_by_all": sorted(set.intersection(*missed.values()))}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("marks")
    m.add_argument("named", nargs="+", metavar="NAME=WEIGHTS")
    m.add_argument("-o", "--out", type=Path, required=True)
    o = sub.add_parser("overlap")
    o.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    if args.command == "marks":
        marks(args.named, args.out)
    else:
        print(json.dumps(overlap(args.folder), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Is one illume-nano weights folder bit for bit another? Every file by sha256 (a ``.bin``, a torch.save archive,
also tensor by tensor, in case only the container differs), and each stage's final loss in ``training.json``.

    python -m illume_rt.bench.weights_identity NEW OLD > bit_identity.json

NEW, OLD: weights folders (``nano.train --out``, or the committed ``nano/weights``). How a run of the one command
is compared with another run or with the committed weights (``bench/results/*-nano-one-command-*``): the same
recipe at the same seed gives the same files on one machine, and another CPU rounds differently from the first
stage on. Exit status 0 whether or not they are equal; ``all_equal`` says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from illume_rt.files import sha256_file

# Written by the run itself or by later measurements, not weights: timings, scores
NOT_WEIGHTS = ("training.json", "eval.json", "quantized_eval.json")


def tensors_equal(a, b) -> bool:
    """Every tensor in two nested states equal in shape, dtype and value; numbers and strings are not compared."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return True


def compare(new: Path, old: Path) -> dict:
    """{"files": {relative path: {"new", "old", "equal"}}, "final_loss": {stage: {"new", "old", "equal"}},
    "all_equal"}: the files of ``new`` (those of ``old`` that ``new`` lacks listed with "new": None)."""
    import torch

    out: dict = {"files": {}, "final_loss": {}}
    names = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    names |= {p.relative_to(old) for p in old.rglob("*") if p.is_file()}
    for rel in sorted(n for n in names if n.name not in NOT_WEIGHTS):
        a, b = new / rel, old / rel
        entry = {side: sha256_file(f)[:16] if f.is_file() else None for side, f in (("new", a), ("old", b))}
        entry["equal"] = entry["new"] is not None and entry["new"] == entry["old"]
        if rel.suffix == ".bin" and a.is_file() and b.is_file() and not entry["equal"]:
            entry["tensors_equal"] = tensors_equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True))
            entry["equal"] = entry["tensors_equal"]
        out["files"][str(rel)] = entry
    logs = [json.loads(p.read_text()) if p.is_file() else {} for p in (new / "training.json", old / "training.json")]
    for stage in sorted(logs[0].keys() | logs[1].keys()):
        pair = [log.get(stage, {}).get("final_loss") for log in logs]
        if pair != [None, None]:
            out["final_loss"][stage] = {"new": pair[0], "old": pair[1], "equal": pair[0] == pair[1]}
    out["all_equal"] = all(e["equal"] for e in out["files"].values()) and all(
        e["equal"] for e in out["final_loss"].values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new", type=Path, help="a weights folder")
    ap.add_argument("old", type=Path, help="the weights folder to compare it with")
    args = ap.parse_args(argv)
    for folder in (args.new, args.old):
        if not folder.is_dir():
            print(f"error: {folder} is not a folder; give two nano weights folders", file=sys.stderr)
            return 2
    json.dump(compare(args.new, args.old), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

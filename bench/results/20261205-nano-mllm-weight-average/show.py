"""Prints one line of held-out figures per evaluation JSON (`python -m illume_rt.nano.evaluate --json`): greedy
drawing, answers, the default sampling, and edits where scored. Usage: python show.py A.json B.json ..."""
import json
import sys
from pathlib import Path


def line(path: str) -> str:
    d = json.load(open(path))["held"]
    g = d["generation"]["runtime"]
    out = (f"{Path(path).stem:30s} greedy pos {g['position']:.3f} col {g['colour']:.3f} shape {g['shape']:.3f} "
           f"size {g['size']:.3f} all {g['all']:.3f} und {d['understanding']['runtime']:.3f}")
    s = d.get("generation_default_sampling")
    if s:
        out += f" | sampled shape {s['shape']:.3f} size {s['size']:.3f} all {s['all']:.3f}"
    e = d.get("editing")
    if e:
        out += (f" | edits {e['greedy']['right']:.3f} kept {e['greedy']['kept']:.3f} / "
                f"{e['default_sampling']['right']:.3f}")
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(line(path))

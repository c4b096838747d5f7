import json, sys
from pathlib import Path
for f in sys.argv[1:]:
    d = json.load(open(f))['held']
    g = d['generation']['runtime']; s = d.get('generation_default_sampling', {})
    e = d.get('editing', {})
    line = f"{Path(f).stem:30s} greedy pos {g['position']:.3f} col {g['colour']:.3f} shape {g['shape']:.3f} size {g['size']:.3f} all {g['all']:.3f} und {d['understanding']['runtime']:.3f}"
    if s: line += f" | sampled shape {s['shape']:.3f} size {s['size']:.3f} all {s['all']:.3f}"
    if e: line += f" | edits {e['greedy']['right']:.3f} kept {e['greedy']['kept']:.3f} / {e['default_sampling']['right']:.3f}"
    print(line)

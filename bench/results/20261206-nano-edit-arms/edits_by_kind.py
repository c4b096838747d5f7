"""Session 53: each held-out edit of a weights folder, greedy on the runtime (as ``evaluate`` runs them), kept with
what the scorer read, and ``heldout.edit_figures`` over them (``kept_by_kind``: which attributes each kind of edit
keeps).

    python edits_by_kind.py WEIGHTS OUT.json
"""
import json
import sys

from illume_rt.nano import data, score
from illume_rt.nano.checkpoint import NanoWeights
from illume_rt.nano import evaluate
from illume_rt.nano.heldout import edit_figures, edit_kind, eval_edits, runtime_edit
from illume_rt.runtime.pipeline import Pipeline


def main(weights: str, out: str) -> int:
    edits = []
    with evaluate.bundle_of(NanoWeights(weights)) as bundle:
        pipe = Pipeline.from_bundle(bundle, threads=1)
        for scene, instruction, target in eval_edits(None, which="held"):
            edits.append({"kind": edit_kind(scene, target), "instruction": instruction,
                          "source": {a: getattr(scene, a) for a in data.ATTRIBUTES},
                          "target": {a: getattr(target, a) for a in data.ATTRIBUTES},
                          "read": score.read_scene(runtime_edit(pipe, scene, instruction))})
    figures = figures_of(edits)
    print(json.dumps(figures["kept_by_kind"], indent=1))
    with open(out, "w") as f:
        json.dump({"weights": weights, "figures": figures, "edits": edits}, f, indent=1)
    return 0


def figures_of(edits: list[dict]) -> dict:
    return edit_figures([(e["kind"], {a: e["read"][a] == e["target"][a] for a in data.ATTRIBUTES}) for e in edits])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

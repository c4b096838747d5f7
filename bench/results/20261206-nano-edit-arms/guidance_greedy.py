"""Greedy drawing at text-to-image guidance 1.5 and 1.0: the held-out and the training-sample prompts, or with
--paraphrase the training sample's scenes in two word orders never trained.

    python guidance_greedy.py WEIGHTS OUT.json [--paraphrase]
"""
import json
import sys
from dataclasses import replace

from illume_rt.nano import data, evaluate, score
from illume_rt.nano.checkpoint import NanoWeights
from illume_rt.nano.heldout import eval_prompts, eval_scenes, greedy_sampling
from illume_rt.runtime.pipeline import Pipeline

PARAPHRASES = {
    "background first": lambda s: (f"on a {s.background} background a {s.size} {s.colour} {s.shape} at the "
                                   f"{s.position}"),
    "position first": lambda s: (f"at the {s.position} a {s.size} {s.colour} {s.shape} on a {s.background} "
                                 "background"),
}


def prompt_sets(paraphrase: bool) -> dict[str, list[tuple[str, dict]]]:
    if not paraphrase:
        return {split: eval_prompts(None, split) for split in ("held", "train")}
    return {form: [(caption(s), {a: getattr(s, a) for a in data.ATTRIBUTES}) for s in eval_scenes("train")]
            for form, caption in PARAPHRASES.items()}


def main(weights: str, out: str, *flags: str) -> int:
    res = {}
    with evaluate.bundle_of(NanoWeights(weights)) as bundle:
        pipe = Pipeline.from_bundle(bundle, threads=1)
        for name, prompts in prompt_sets("--paraphrase" in flags).items():
            for g in (1.5, 1.0):
                sampling = replace(greedy_sampling(pipe), guidance_scale=g)
                drawn = (pipe.generate(prompt, resolution=(256, 256), seed=0, sampling=sampling).image
                         for prompt, _ in prompts)
                marks = [score.score_picture(image, wanted) for image, (_, wanted) in zip(drawn, prompts)]
                res[f"{name} {g}"] = score.summarize(marks)
                print(name, g, {k: round(v, 3) for k, v in res[f"{name} {g}"].items() if isinstance(v, float)},
                      flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

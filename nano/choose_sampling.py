"""illume-nano's own sampling defaults (text to image, editing), chosen on its training split.

    python -m illume_rt.nano.choose_sampling        # -> nano/weights/mllm/illume_rt_sampling.json
    python -m illume_rt.nano.choose_sampling --weights DIR   # a folder nano.train --out DIR wrote: -> DIR/mllm/...
    python -m illume_rt.nano.choose_sampling --jobs 2        # the same choices, in two processes (PARTS)

Editing: the guidance, chosen the same way on edits of the training sample (``heldout.eval_edits('train')``) by
the share of edits right.

Refinement: the diffusion decoder's guidance (official 2.0), by the PSNR of its 2x output against the scene
rendered at 2x, from the codes of the first REFINE_SCENES pictures of the training sample
(``decoder.refinement_scores``); written beside the decoder (nano/checkpoint.py ``refine_file``) with the digest of
the decoder it was measured on. ``--refine-only`` redoes only this choice (after the decoder alone was retrained).

A model's sampling defaults are part of the model (a checkpoint's generation config); illume-nano's go into its
bundle as ``model.sampling_defaults`` (nano/checkpoint.py reads the file written here), and a call or a command
that gives no sampling option uses them. The official defaults' guidance (2.0) and sampler (temperature 1.0, top-k
2048, top-p 1.0) are among the candidates. Text to image is chosen in two steps: the guidance first, by greedy
drawings of the training sample's 90 prompts (``heldout.eval_prompts('train')``: its full and short captions), then
the sampler (temperature, top-p) at that guidance, each candidate drawing the sample's 45 full captions
(``heldout.eval_scenes('train')``) at seed 0. Both are combinations the model was trained on, so the held-out
figures stay unbiased; in each step the candidate whose weakest attribute is best wins (ties: more pictures fully
right, then the stronger guidance, then the candidate listed first). Rerun after the weights change.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from illume_rt.nano import data, score
from illume_rt.nano.checkpoint import (COMMITTED, NanoWeights, available, decoder_digest, not_a_weights_folder,
                                      weights_digest)
from illume_rt.nano.evaluate import bundle_of

# (temperature, top_p): the sampler knobs of the official defaults; top-k stays the official 2048 (6144 pixel)
SAMPLERS = ((1.0, 1.0), (1.0, 0.8), (1.0, 0.6), (0.8, 0.8), (0.7, 1.0), (0.7, 0.6))
# The text-to-image guidance (official 2.0): on nano it decides more than the sampler. It is chosen greedily, not
# crossed with the samplers. Sampled at seed 0, the best sampler at 1.5 and at 1.0 were one or two training scenes
# apart for each of six weights measured (session 53), and the 45 scenes picked 1.0 for four of them; greedy
# drawings of the training prompts put 1.5 ahead on all six (2-6 points of the weakest attribute), as held-out
# prompts did on five (5-16 points of shape; nano/README.md "Sampling defaults"). A draw's noise at seed 0 is as
# large as that difference; greedy decoding has none.
GUIDANCE_CANDIDATES = (2.0, 1.5, 1.0)
# Editing: the guidance (official 1.5) at the official editing sampler (0.7 / 512 / 0.8), since nano's
# unconditional row gives back the source picture (nano/train.py EDIT_STEPS) and the guidance sets how far from it.
# 2.0 and 3.0 lost on both weights measured (nano/README.md "Sampling defaults"), so only 1.5 and 1.0 are scored.
EDIT_GUIDANCE_CANDIDATES = (1.5, 1.0)
# Refinement: the guidance at the official 20 steps; guidance extrapolates away from the decoder's unconditional
# picture (the map zeroed), which tinted nano's backgrounds at 2.0 (nano/README.md "Refinement")
REFINE_GUIDANCE_CANDIDATES = (2.0, 1.5, 1.0)
REFINE_SCENES = 10  # ~3 s a picture per candidate on one core


def score_candidate(pipe, sampling, prompts: list[tuple[str, dict]], seed: int = 0) -> dict:
    """The attributes drawn right, each over the prompts that name it (``heldout.eval_prompts``' pairs)."""
    marks = [score.score_picture(pipe.generate(prompt, resolution=(256, 256), seed=seed, sampling=sampling).image,
                                 wanted) for prompt, wanted in prompts]
    return score.summarize(marks)


def score_edit_candidate(pipe, sampling, edits) -> dict:
    from illume_rt.nano.heldout import score_edits

    return score_edits(pipe, edits, sampling)


def choose_edit(results: list[dict]) -> dict:
    """The editing candidate with the most edits right (the asked attribute changed, the others kept); ties: the
    asked attribute more often right."""
    return max(results, key=lambda r: (r["scores"]["right"], r["scores"]["asked"]))


def choose(results: list[dict]) -> dict:
    """The candidate whose weakest attribute is best; ties: the higher share of pictures fully right, then the
    stronger guidance (where the training prompts cannot tell them apart, held-out ones favoured it: see
    GUIDANCE_CANDIDATES)."""
    return max(results, key=lambda r: (min(r["scores"][a] for a in data.ATTRIBUTES), r["scores"]["all"],
                                       r.get("guidance_scale", 0.0)))


def choose_refine(pipe, limit: int | None, weights: NanoWeights = COMMITTED) -> dict:
    """The record of ``weights.refine_file``: the guidance with the best mean PSNR on the training sample."""
    from dataclasses import replace

    from illume_rt.nano import decoder
    from illume_rt.nano.heldout import eval_scenes
    from illume_rt.runtime.refine import OFFICIAL_REFINE

    scenes = eval_scenes("train")[:min(limit or REFINE_SCENES, REFINE_SCENES)]
    tokenizer = decoder.tokenizer_from_weights(weights.dualvitok)
    results = []
    for guidance in REFINE_GUIDANCE_CANDIDATES:
        t0 = time.time()
        scores = decoder.refinement_scores(pipe, scenes, *tokenizer, replace(OFFICIAL_REFINE, guidance_scale=guidance))
        results.append({"guidance_scale": guidance, "scores": scores})
        print(f"refine guidance {guidance}: {scores} ({time.time() - t0:.0f}s)", flush=True)
    best = max(results, key=lambda r: r["scores"]["refined_psnr_db"])
    chosen = ({"guidance_scale": best["guidance_scale"]}
              if best["guidance_scale"] != OFFICIAL_REFINE.guidance_scale else {})
    return {"refine": chosen, "candidates": results, "chosen": "the best mean PSNR against the 2x render",
            "split": "train sample (heldout.eval_scenes('train'))", "scenes": len(scenes), "seed": 0,
            "steps": OFFICIAL_REFINE.steps, "decoder_sha256": decoder_digest(weights),
            "command": "python -m illume_rt.nano.choose_sampling"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=COMMITTED.root,
                    help="the illume-nano weights folder to choose for, and write the choices into (default: the "
                         "committed nano/weights)")
    ap.add_argument("--bundle", default=None, help="FP32 bundle of those weights (default: exported from them)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many training scenes")
    ap.add_argument("--json", type=Path, default=None, help="where the sampling choices go (default: the weights' "
                                                           "mllm/illume_rt_sampling.json)")
    ap.add_argument("--threads", type=int, default=1, help="threads of each process")
    ap.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                    help="processes: 2 makes the text-to-image choice beside the others (one core each)")
    ap.add_argument("--refine-only", action="store_true",
                    help="only the refinement guidance (when only the diffusion decoder was retrained)")
    args = ap.parse_args(argv)
    weights = NanoWeights(args.weights)
    if not available(weights):
        raise SystemExit(f"choose_sampling: {not_a_weights_folder(weights)}")
    if args.bundle:
        return choose_all(args, weights, Path(args.bundle))
    with bundle_of(weights) as bundle:
        return choose_all(args, weights, bundle)


# The three choices are independent (each candidate is drawn at its own fixed seed), so with ``--jobs 2`` they run
# in two processes, the longest (text to image, ~8 minutes on one core) beside the other two (~7): nano.train's
# `sampling` stage runs after both of its chains are done, with both cores idle.
PARTS = ("text_to_image", "editing", "refine")


def choose_part(part: str, bundle: Path, weights_root: Path, limit: int | None, threads: int) -> dict:
    """One choice (a PARTS name) on a Pipeline of its own, so that it can run in a process of its own."""
    from illume_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, threads=threads)
    if part == "refine":
        return choose_refine(pipe, limit, NanoWeights(weights_root))
    return (choose_text_to_image if part == "text_to_image" else choose_editing)(pipe, limit)


def choose_text_to_image(pipe, limit: int | None) -> dict:
    from illume_rt.nano.heldout import eval_prompts, eval_scenes, full_caption_prompts
    from illume_rt.runtime.options import OFFICIAL_SAMPLING

    if pipe.bundle.manifest["model"].get("sampling_defaults"):
        print("note: the bundle declares sampling defaults; each candidate is passed explicitly, so they do not "
              "matter here")
    official = OFFICIAL_SAMPLING["text_to_image"]
    prompts = eval_prompts(limit, "train")  # full captions, then short ones
    guidance_results = []
    for guidance in GUIDANCE_CANDIDATES:
        t0 = time.time()
        scores = score_candidate(pipe, replace(official, guidance_scale=guidance, greedy=True), prompts)
        guidance_results.append({"guidance_scale": guidance, "scores": scores})
        print(f"guidance {guidance}, greedy: {scores} ({time.time() - t0:.0f}s)", flush=True)
    guidance = choose(guidance_results)["guidance_scale"]
    scenes = eval_scenes("train")[:limit] if limit else eval_scenes("train")
    full_captions = full_caption_prompts(scenes)
    results = []
    for temperature, top_p in SAMPLERS:
        t0 = time.time()
        scores = score_candidate(pipe, replace(official, guidance_scale=guidance, temperature=temperature,
                                               top_p=top_p), full_captions)
        results.append({"guidance_scale": guidance, "temperature": temperature, "top_p": top_p, "scores": scores})
        print(f"guidance {guidance} temperature {temperature} top-p {top_p}: {scores} ({time.time() - t0:.0f}s)",
              flush=True)
    best = choose(results)
    chosen = {k: best[k] for k in ("guidance_scale", "temperature", "top_p")
              if best[k] != getattr(official, k)}  # only what differs from the official defaults
    return {"text_to_image": chosen,
            "chosen": "the guidance whose greedy drawings' weakest attribute is best, then at it the sampler whose "
                      "weakest attribute is best (ties: all, then the stronger guidance)",
            "split": "train sample (heldout.eval_scenes('train')): greedy on its full and short captions, sampled "
                     "on its full captions", "prompts": len(prompts), "scenes": len(scenes), "seed": 0,
            "top_k": official.top_k, "guidance_candidates": guidance_results, "candidates": results}


def choose_editing(pipe, limit: int | None) -> dict:
    from illume_rt.nano.heldout import eval_edits
    from illume_rt.runtime.options import OFFICIAL_SAMPLING

    official_edit = OFFICIAL_SAMPLING["editing"]
    edits = eval_edits(limit, which="train")
    edit_results = []
    for guidance in EDIT_GUIDANCE_CANDIDATES:
        t0 = time.time()
        scores = score_edit_candidate(pipe, replace(official_edit, guidance_scale=guidance), edits)
        edit_results.append({"guidance_scale": guidance, "scores": scores})
        print(f"editing guidance {guidance}: {scores} ({time.time() - t0:.0f}s)", flush=True)
    best_edit = choose_edit(edit_results)
    chosen_edit = ({"guidance_scale": best_edit["guidance_scale"]}
                   if best_edit["guidance_scale"] != official_edit.guidance_scale else {})
    return {"editing": chosen_edit, "edit_candidates": edit_results, "edits": len(edits)}


def run_parts(parts: list[str], bundle: Path, weights: NanoWeights, limit: int | None, threads: int,
              jobs: int) -> dict[str, dict]:
    """Each of ``parts``' records, in this process (``jobs`` 1) or spread over ``jobs`` processes."""
    if jobs == 1 or len(parts) == 1:
        return {part: choose_part(part, bundle, weights.root, limit, threads) for part in parts}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from illume_rt.nano.train import end_with_parent

    # spawn, not fork: a forked child would inherit this process's onnxruntime and torch thread pools; and each
    # worker ends with this process, however it ends (as nano.train's side chain does)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=end_with_parent) as pool:
        futures = {part: pool.submit(choose_part, part, bundle, weights.root, limit, threads) for part in parts}
        return {part: future.result() for part, future in futures.items()}


def choose_all(args, weights: NanoWeights, bundle: Path) -> int:
    from illume_rt.runtime.bundle import load_bundle

    has_decoder = bool(load_bundle(bundle, verify=False).manifest.get("diffusion"))
    parts = [part for part in PARTS if (part == "refine" and has_decoder)
             or (part != "refine" and not args.refine_only)]
    records = run_parts(parts, bundle, weights, args.limit, args.threads, args.jobs)
    if "refine" in records:
        record = records["refine"]
        weights.refine_file.write_text(json.dumps(record, indent=1) + "\n")
        print(f"chose refinement {record['refine'] or 'the official defaults'} -> {weights.refine_file}")
    if args.refine_only:
        return 0
    text_to_image = dict(records["text_to_image"])
    record = {"text_to_image": text_to_image.pop("text_to_image"), **records["editing"], **text_to_image,
              "weights_sha256": weights_digest(weights), "command": "python -m illume_rt.nano.choose_sampling"}
    out = args.json or weights.sampling_file
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"chose text to image {record['text_to_image'] or 'the official defaults'}, editing "
          f"{record['editing'] or 'the official defaults'} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

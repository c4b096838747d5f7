"""Quality gates of illume-nano: prompt accuracy of generated pictures over held-out prompts and answer accuracy
over held-out pictures, for the PyTorch reference and for the runtime, on the same prompts and seeds.

``python -m illume_rt.nano.evaluate [--weights DIR] [--bundle B] [--limit N] [--json out.json]``: the committed
weights by default (the runtime side then uses the built-in nano bundle, exported from ``nano/weights/`` once);
``--weights DIR``, a folder ``python -m illume_rt.nano.train --out DIR`` wrote, is exported into a temporary bundle
unless ``--bundle`` gives one of it. Greedy decoding with guidance 2.0 (the
text-to-image default) for generation; greedy answers for understanding. The runtime must match the reference
(token-identical under greedy), so both columns should agree exactly.

The runtime side (prompts, questions, ``PromptScorer``) lives in ``nano/heldout.py``, a library module the
quantizer's prompt gate imports; this script adds the PyTorch reference and the command line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from illume_rt.nano import data, score
from illume_rt.nano.checkpoint import COMMITTED, NanoWeights, available, load_models, not_a_weights_folder
from illume_rt.nano.heldout import (eval_edits, eval_prompts, eval_questions, eval_scenes, greedy_sampling,
                                    runtime_answer, runtime_generate, score_edits, score_reconstructions)


TEMPORARY_BUNDLE_PREFIX = "illume-nano-bundle-"  # bundle_of's folder, under the system's temporary folder


@contextmanager
def bundle_of(weights: NanoWeights, log=print):
    """A runtime bundle of ``weights``: the built-in one (exported once and cached, see illume_rt.cli) for the
    committed weights; for any other folder, one exported now into a temporary folder and removed afterwards."""
    if weights.is_committed:
        from illume_rt.cli import ensure_default_bundle

        yield ensure_default_bundle("nano", log=log)
        return
    from illume_rt.export.bundle import write_bundle

    with tempfile.TemporaryDirectory(prefix=TEMPORARY_BUNDLE_PREFIX) as tmp:
        log(f"exporting {weights.root} into a temporary bundle ...")
        write_bundle(load_models(weights), Path(tmp) / "bundle", log=lambda m: log("  " + m))
        yield Path(tmp) / "bundle"


def reference_greedy_sampling(models):
    """``heldout.greedy_sampling`` for the PyTorch reference: greedy at the checkpoint's declared text-to-image
    defaults (``models.sampling_defaults``: nano/checkpoint.py ``sampling_defaults``, what its bundle declares)."""
    from dataclasses import replace

    from illume_rt.runtime.options import model_sampling_defaults

    return replace(model_sampling_defaults(models.sampling_defaults)["text_to_image"], greedy=True)


def shipped_tokenizer(models):
    """The tokenizer.json of the weights' MLLM folder, the file the runtime's bundle reads too."""
    from illume_rt.runtime.tokenizer import HFTokenizer

    return HFTokenizer(models.source["tokenizer_file"], models.preset.vocab)


def reference_generate(models, prompt: str, seed: int = 0):
    import torch

    from illume_rt.export.reference import reference_image_tokens
    from illume_rt.contract import image_grid
    from illume_rt.runtime.pipeline import to_uint8
    from illume_rt.runtime.prompts import text_to_image_ids

    vocab = models.preset.vocab
    cond, uncond = text_to_image_ids(shipped_tokenizer(models), vocab, prompt, 256, 256)
    ref = reference_image_tokens(models.llm, vocab, image_grid(256, 256), cond, uncond,
                                 reference_greedy_sampling(models), np.random.default_rng(seed))
    with torch.no_grad():
        img = models.dualvitok.decode_code(torch.from_numpy(ref.semantic)[None], torch.from_numpy(ref.pixel)[None])
    return to_uint8(img[0].numpy()), ref.semantic, ref.pixel


def reference_answer_text(models, scene: data.Scene, question: str) -> str:
    from PIL import Image

    from illume_rt.export.reference import reference_answer, reference_image_block, reference_splice
    from illume_rt.runtime.images import understanding_image
    from illume_rt.runtime.prompts import understanding_ids

    vocab = models.preset.vocab
    tok = shipped_tokenizer(models)
    image = understanding_image(Image.fromarray(data.render(scene)))
    prompt = reference_splice(models, understanding_ids(tok, vocab, question), reference_image_block(models, image))
    banned = (vocab.start_of_image_id, vocab.end_of_image_id, vocab.end_of_line_id, vocab.start_of_level0_id,
              vocab.end_of_level0_id, vocab.start_of_level1_id, vocab.end_of_level1_id)
    ids = reference_answer(models, prompt, 16, banned)
    return tok.decode([i for i in ids if i != vocab.im_end_id])


def evaluate(pipe=None, models=None, prompt_limit: int | None = None, question_limit: int | None = None,
             log=print, which: str = "held", edits: bool = True, sampled: bool = False, refine: bool = False,
             weights: NanoWeights = COMMITTED) -> dict:
    """{'generation': {engine: summary}, 'understanding': {engine: accuracy}, 'token_identical': ...}; with the
    runtime, 'editing' (greedy; with ``sampled`` also at the editing defaults) and, with ``sampled``,
    'generation_default_sampling'; with ``refine`` and a bundle with a diffusion decoder, 'refinement' (the codes
    of the ground-truth pictures from the tokenizer of ``weights``, the folder the bundle was exported from)."""
    engines = {k: v for k, v in (("reference", models), ("runtime", pipe)) if v is not None}
    gen = {name: [] for name in engines}
    same_tokens = []
    t0 = time.time()
    for prompt, wanted in eval_prompts(prompt_limit, which):
        codes = {}
        for name, obj in engines.items():
            fn = reference_generate if name == "reference" else runtime_generate
            img, sem, pix = fn(obj, prompt)
            gen[name].append(score.score_picture(img, wanted))
            codes[name] = (np.asarray(sem), np.asarray(pix))
        if len(codes) == 2:
            same_tokens.append(all(np.array_equal(a, b) for a, b in zip(codes["reference"], codes["runtime"])))
    log(f"generation: {len(gen[next(iter(engines))])} prompts in {time.time() - t0:.0f}s")
    und = {name: [] for name in engines}
    same_answers = []
    t0 = time.time()
    for scene, q, a in eval_questions(question_limit, which):
        answers = {}
        for name, obj in engines.items():
            fn = reference_answer_text if name == "reference" else runtime_answer
            answers[name] = fn(obj, scene, q)
            und[name].append(score.answer_correct(answers[name], a))
        if len(answers) == 2:
            same_answers.append(answers["reference"] == answers["runtime"])
    log(f"understanding: {len(und[next(iter(engines))])} questions in {time.time() - t0:.0f}s")
    out = {"generation": {k: score.summarize(v) for k, v in gen.items()},
           "understanding": {k: float(np.mean(v)) for k, v in und.items()},
           "chance": {"generation": score.CHANCE, "understanding": float(np.mean(
               [1 / len(data.CHOICES[a]) for a in data.ATTRIBUTES]))},
           "guidance": (greedy_sampling(pipe) if pipe is not None else reference_greedy_sampling(models)).guidance_scale,
           "decoding": "greedy", "split": which,
           "prompts": len(eval_prompts(prompt_limit, which)), "questions": len(eval_questions(question_limit, which))}
    if pipe is not None and edits:
        # Runtime only: its editing is token-identical to the reference (tests/test_nano_parity.py).
        t0 = time.time()
        out["editing"] = {"greedy": score_edits(pipe, eval_edits(prompt_limit, which)),
                          "reconstruct_greedy": score_reconstructions(pipe, eval_scenes(which)[:prompt_limit])}
        if sampled:
            out["editing"]["default_sampling"] = score_edits(pipe, eval_edits(prompt_limit, which),
                                                             pipe.default_sampling("editing"))
        log(f"editing: {out['editing']['greedy']['edits']} edits in {time.time() - t0:.0f}s")
    if pipe is not None and sampled:
        # The README command's settings (the bundle's defaults), seed 0: what a newcomer sees.
        marks = [score.score_picture(pipe.generate(prompt, resolution=(256, 256), seed=0).image, wanted)
                 for prompt, wanted in eval_prompts(prompt_limit, which)]
        out["generation_default_sampling"] = score.summarize(marks)
    if pipe is not None and refine and pipe.bundle.manifest.get("diffusion"):
        # The diffusion decoder (--refine, 2x) against Lanczos upscaling of the pixel decoder, from the codes of
        # each scene's ground-truth picture: the decoders compared on the same codes (nano/decoder.py).
        from illume_rt.nano import decoder

        t0 = time.time()
        out["refinement"] = decoder.refinement_scores(pipe, eval_scenes(which)[:prompt_limit],
                                                      *decoder.tokenizer_from_weights(weights.dualvitok))
        log(f"refinement: {out['refinement']['scenes']} pictures in {time.time() - t0:.0f}s")
    if same_tokens:
        out["runtime_token_identical"] = float(np.mean(same_tokens))
    if same_answers:
        out["runtime_answer_identical"] = float(np.mean(same_answers))
    return out


# Figures a prompt scorer returns, in the README's column order; "all" (every attribute right) is reported but
# not gated on its own: it is the conjunction of the gated ones.
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="illume-nano quality gates (reference vs runtime)")
    ap.add_argument("--weights", type=Path, default=COMMITTED.root,
                    help="illume-nano weights folder (default: the committed nano/weights)")
    ap.add_argument("--bundle", default=None, help="runtime bundle of those weights (default: the built-in nano "
                                                   "bundle for the committed weights, else exported from them)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-runtime", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts and questions")
    ap.add_argument("--split", nargs="+", default=["held", "train"], choices=["held", "train"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-edits", action="store_true", help="skip the editing figures")
    ap.add_argument("--sampled", nargs="*", default=["held"], choices=["held", "train"],
                    help="splits also scored at the default sampling settings (generation and editing)")
    ap.add_argument("--refine", nargs="*", default=["held"], choices=["held", "train"],
                    help="splits whose pictures are also scored through the diffusion decoder (PSNR at 2x)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    weights = NanoWeights(args.weights)
    if not available(weights):
        raise SystemExit(f"evaluate: {not_a_weights_folder(weights)}")
    models = None
    if not args.no_reference:
        models = load_models(weights)
    if args.no_runtime:
        return report(args, weights, None, models)
    if args.bundle:
        return report(args, weights, args.bundle, models)
    with bundle_of(weights) as bundle:
        return report(args, weights, bundle, models)


def report(args, weights: NanoWeights, bundle, models) -> int:
    pipe = None
    if bundle is not None:
        from illume_rt.runtime.pipeline import Pipeline

        pipe = Pipeline.from_bundle(bundle, threads=args.threads)
    result = {which: evaluate(pipe, models, args.limit, args.limit, which=which, edits=not args.no_edits,
                              sampled=which in args.sampled, refine=which in args.refine, weights=weights)
              for which in args.split}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

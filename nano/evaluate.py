"""Quality gates of illume-nano: prompt accuracy of generated pictures over held-out prompts and answer accuracy
over held-out pictures, for the PyTorch reference and for the runtime, on the same prompts and seeds.

``python -m illume_rt.nano.evaluate [--bundle B] [--limit N] [--json out.json]``: without ``--bundle`` the
built-in nano bundle (exported from ``nano/weights/`` once) is used. Greedy decoding with guidance 2.0 (the
text-to-image default) for generation; greedy answers for understanding. The runtime must match the reference
(token-identical under greedy), so both columns should agree exactly.

``PromptScorer``: the same runtime scoring as a prompt scorer of ``illume-rt quantize`` (calibration/accuracy.py picks
it for nano bundles), so a quantized nano bundle is scored exactly like the FP32 one. numpy only at import: the
runtime (and quantization's prompt gate) does not need torch for it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from illume_rt.nano import data, score

GUIDANCE = 2.0


def eval_scenes(which: str = "held") -> list[data.Scene]:
    """'held': the 45 held-out combinations; 'train': every 9th training combination (45), to show how much of
    the held-out figure is generalisation and how much is fitting."""
    train, held = data.split()
    return held if which == "held" else train[::9]


def eval_prompts(limit: int | None = None, which: str = "held") -> list[tuple[str, dict]]:
    """Prompts of ``eval_scenes``: each scene's full caption, then its short (size-free) one."""
    scenes = eval_scenes(which)
    out = [(s.caption, {a: getattr(s, a) for a in data.ATTRIBUTES}) for s in scenes]
    out += [(s.short_caption, {a: getattr(s, a) for a in data.ATTRIBUTES if a != "size"}) for s in scenes]
    return out[:limit] if limit else out


def eval_questions(limit: int | None = None, which: str = "held") -> list[tuple[data.Scene, str, str]]:
    items = [(s, q, a) for s in eval_scenes(which) for q, a in s.qa()]
    return items[:limit] if limit else items


def runtime_generate(pipe, prompt: str, seed: int = 0):
    from illume_rt.runtime.options import SamplingConfig

    res = pipe.generate(prompt, resolution=(256, 256), seed=seed,
                        sampling=SamplingConfig(guidance_scale=GUIDANCE, greedy=True))
    return res.image, res.tokens.semantic, res.tokens.pixel


def reference_generate(models, prompt: str, seed: int = 0):
    import torch

    from illume_rt.export.reference import reference_image_tokens
    from illume_rt.contract import image_grid
    from illume_rt.runtime.options import SamplingConfig
    from illume_rt.runtime.pipeline import to_uint8
    from illume_rt.runtime.prompts import text_to_image_ids
    from illume_rt.runtime.tokenizer import ByteTokenizer

    vocab = models.preset.vocab
    cond, uncond = text_to_image_ids(ByteTokenizer(vocab), vocab, prompt, 256, 256)
    ref = reference_image_tokens(models.llm, vocab, image_grid(256, 256), cond, uncond,
                                 SamplingConfig(guidance_scale=GUIDANCE, greedy=True), np.random.default_rng(seed))
    with torch.no_grad():
        img = models.dualvitok.decode_code(torch.from_numpy(ref.semantic)[None], torch.from_numpy(ref.pixel)[None])
    return to_uint8(img[0].numpy()), ref.semantic, ref.pixel


def runtime_answer(pipe, scene: data.Scene, question: str) -> str:
    from PIL import Image

    return pipe.understand(Image.fromarray(data.render(scene)), question, max_new_tokens=16).text


def reference_answer_text(models, scene: data.Scene, question: str) -> str:
    from PIL import Image

    from illume_rt.export.reference import reference_answer, reference_image_block, reference_splice
    from illume_rt.runtime.images import understanding_image
    from illume_rt.runtime.prompts import understanding_ids
    from illume_rt.runtime.tokenizer import ByteTokenizer

    vocab = models.preset.vocab
    tok = ByteTokenizer(vocab)
    image = understanding_image(Image.fromarray(data.render(scene)))
    prompt = reference_splice(models, understanding_ids(tok, vocab, question), reference_image_block(models, image))
    banned = (vocab.start_of_image_id, vocab.end_of_image_id, vocab.end_of_line_id, vocab.start_of_level0_id,
              vocab.end_of_level0_id, vocab.start_of_level1_id, vocab.end_of_level1_id)
    ids = reference_answer(models, prompt, 16, banned)
    return tok.decode([i for i in ids if i != vocab.im_end_id])


def evaluate(pipe=None, models=None, prompt_limit: int | None = None, question_limit: int | None = None,
             log=print, which: str = "held") -> dict:
    """{'generation': {engine: summary}, 'understanding': {engine: accuracy}, 'token_identical': ...}."""
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
           "guidance": GUIDANCE, "decoding": "greedy", "split": which,
           "prompts": len(eval_prompts(prompt_limit, which)), "questions": len(eval_questions(question_limit, which))}
    if same_tokens:
        out["runtime_token_identical"] = float(np.mean(same_tokens))
    if same_answers:
        out["runtime_answer_identical"] = float(np.mean(same_answers))
    return out


# Figures a prompt scorer returns, in the README's column order; "all" (every attribute right) is reported but
# not gated on its own: it is the conjunction of the gated ones.
SCORED = ("background", "position", "colour", "shape", "size", "answers")


class PromptScorer:
    """callable(pipeline) -> {attribute: fraction right} over held-out prompts (greedy, as ``evaluate``), plus
    'answers' (fraction of held-out questions answered right) and 'all'. Results are kept per bundle (path and
    manifest bytes), so scoring one FP32 bundle against several quantized ones runs it once."""

    informational = ("all",)  # reported, not gated (calibration/accuracy.py prompt_gate)

    def __init__(self, prompt_limit: int | None = None, question_limit: int | None = None, which: str = "held",
                 log=None) -> None:
        self.prompt_limit, self.question_limit, self.which, self.log = prompt_limit, question_limit, which, log
        self._done: dict = {}

    def describe(self) -> dict:
        return {"scorer": "illume_rt.nano.evaluate.PromptScorer", "split": self.which, "decoding": "greedy",
                "guidance": GUIDANCE, "prompts": len(eval_prompts(self.prompt_limit, self.which)),
                "questions": len(eval_questions(self.question_limit, self.which))}

    def __call__(self, pipe) -> dict[str, float]:
        import hashlib

        from illume_rt.contract import MANIFEST

        path = pipe.bundle.path
        key = (str(path), hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest())
        if key not in self._done:
            t0 = time.time()
            marks = [score.score_picture(runtime_generate(pipe, prompt)[0], wanted)
                     for prompt, wanted in eval_prompts(self.prompt_limit, self.which)]
            answers = [score.answer_correct(runtime_answer(pipe, scene, q), a)
                       for scene, q, a in eval_questions(self.question_limit, self.which)]
            summary = score.summarize(marks)
            figures = {a: summary[a] for a in SCORED if a in summary}
            figures["answers"] = float(np.mean(answers)) if answers else float("nan")
            figures["all"] = summary["all"]
            self._done[key] = figures
            if self.log:
                self.log(f"nano prompt scorer: {len(marks)} prompts, {len(answers)} questions in "
                         f"{time.time() - t0:.0f}s")
        return dict(self._done[key])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="illume-nano quality gates (reference vs runtime)")
    ap.add_argument("--bundle", default=None, help="runtime bundle (default: the built-in nano bundle)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-runtime", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts and questions")
    ap.add_argument("--split", nargs="+", default=["held", "train"], choices=["held", "train"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    models = pipe = None
    if not args.no_reference:
        from illume_rt.nano.checkpoint import load_models

        models = load_models()
    if not args.no_runtime:
        from illume_rt.cli import ensure_default_bundle
        from illume_rt.runtime.pipeline import Pipeline

        bundle = args.bundle or ensure_default_bundle("nano")
        pipe = Pipeline.from_bundle(bundle, threads=args.threads)
    result = {which: evaluate(pipe, models, args.limit, args.limit, which=which) for which in args.split}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

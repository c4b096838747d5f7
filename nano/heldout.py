"""The held-out evaluation of illume-nano that the runtime alone can run: the scenes, prompts and questions, greedy
generation and answers through a ``Pipeline``, and ``PromptScorer`` -- the same scoring as a prompt scorer of
``illume-rt quantize`` (calibration/accuracy.py picks it for nano bundles), so a quantized nano bundle is scored
exactly like the FP32 one. numpy only at import: the runtime (and quantization's prompt gate) does not need torch
for it. ``nano/evaluate.py`` (the script) adds the PyTorch reference and the command line.
"""

from __future__ import annotations

import time

import numpy as np

from illume_rt.nano import data, score



def greedy_sampling(pipe):
    """Greedy decoding at the model's own text-to-image sampling defaults (its guidance: nano's is chosen on the
    training split by choose_sampling.py), i.e. what ``illume-rt generate --greedy`` runs."""
    from dataclasses import replace

    return replace(pipe.default_sampling("text_to_image"), greedy=True)


# The prompts quantize's gate scores a nano bundle on (accuracy.model_scorers): every scene of the grammar. Greedy
# decoding re-rolls a whole picture when one code flips, and nano's shape and size are near ties in many held-out
# pictures, so any small change of the logits moves those figures by whole pictures in both directions: over the 45
# held-out pictures that name a size (2.2 points each), FP32 itself on another backend lost one (onnxruntime CUDA
# vs CPU, bench/results/20261130-ort-cuda-h200), and INT8 LLMs that agree with FP32 on 99.2% of teacher-forced
# pixel codes lost 2 to 5 (-4.4 to -11.1 points) while one agreeing on 98.1% lost none. Over the 450 scenes the
# same INT8 LLM lost 1.6 points of size (nano/README.md "Quantized").
GATE_SPLIT = "grammar"


def eval_scenes(which: str = "held") -> list[data.Scene]:
    """'held': the 45 held-out combinations; 'train': every 9th training combination (45), to show how much of
    the held-out figure is generalisation and how much is fitting; 'grammar': all 450 (quantize's gate,
    GATE_SPLIT: a quantized bundle against FP32 on the same prompts, where what is measured is the loss, not
    generalisation)."""
    if which == "grammar":
        return data.all_scenes()
    train, held = data.split()
    return held if which == "held" else train[::9]


def full_caption_prompts(scenes: list[data.Scene]) -> list[tuple[str, dict]]:
    """Each scene's full caption with the five attributes it names."""
    return [(s.caption, {a: getattr(s, a) for a in data.ATTRIBUTES}) for s in scenes]


def eval_prompts(limit: int | None = None, which: str = "held") -> list[tuple[str, dict]]:
    """Prompts of ``eval_scenes``: each scene's full caption, then its short (size-free) one; for 'grammar' the
    full captions only (each names all five attributes; 450 prompts already take ~3 minutes on 2 cores)."""
    scenes = eval_scenes(which)
    out = full_caption_prompts(scenes)
    if which != "grammar":
        out += [(s.short_caption, {a: getattr(s, a) for a in data.ATTRIBUTES if a != "size"}) for s in scenes]
    return out[:limit] if limit else out


def eval_questions(limit: int | None = None, which: str = "held") -> list[tuple[data.Scene, str, str]]:
    items = [(s, q, a) for s in eval_scenes(which) for q, a in s.qa()]
    return items[:limit] if limit else items


def eval_edits(limit: int | None = None, which: str = "held") -> list[tuple[data.Scene, str, data.Scene]]:
    """(source scene, instruction, edited scene): for each scene of ``eval_scenes``, one edit of each kind (225
    for either split: the training sample's editing guidance, chosen on these, was decided by one edit of 45 when
    'train' had one kind per scene), the new value chosen in turn among the valid ones, so every kind and value is
    asked about. Held out: the source picture's combination was never trained on."""
    out = []
    for n, scene in enumerate(eval_scenes(which)):
        by_kind: dict[str, list] = {}
        for instruction, target in data.edits(scene):
            kind = next(a for a in data.ATTRIBUTES if getattr(target, a) != getattr(scene, a))
            by_kind.setdefault(kind, []).append((instruction, target))
        for kind in data.EDIT_INSTRUCTIONS:
            choices = by_kind[kind]
            instruction, target = choices[n % len(choices)]
            out.append((scene, instruction, target))
    return out[:limit] if limit else out


def edit_kind(source: data.Scene, target: data.Scene) -> str:
    return next(a for a in data.ATTRIBUTES if getattr(target, a) != getattr(source, a))


def runtime_edit(pipe, scene: data.Scene, instruction: str | None, sampling=None, seed: int = 0) -> np.ndarray:
    """The edited picture of ``scene``'s canonical render (``instruction`` None: given back, the reconstruct
    prompt); ``sampling`` None: greedy with the model's editing guidance."""
    from dataclasses import replace

    from PIL import Image

    sampling = sampling or replace(pipe.default_sampling("editing"), greedy=True)
    return pipe.edit(Image.fromarray(data.render(scene)), instruction, seed=seed, sampling=sampling).image


def score_edits(pipe, edits, sampling=None) -> dict:
    """Over ``edits`` (eval_edits), the runtime's edits scored by edit_figures."""
    rows = []
    for scene, instruction, target in edits:
        marks = score.score_picture(runtime_edit(pipe, scene, instruction, sampling),
                                    {a: getattr(target, a) for a in data.ATTRIBUTES})
        rows.append((edit_kind(scene, target), marks))
    return edit_figures(rows)


def edit_figures(rows: list[tuple[str, dict[str, bool]]]) -> dict:
    """Over ``rows`` (per edit: its kind, and the scorer's marks of the edited picture against the edited scene):
    'right' (the attribute asked for changed to its value and every other one kept: the issue's measure), 'asked'
    (the attribute asked for right), 'kept' (the others all right), 'right' by kind of edit, and
    'kept_by_attribute': for each attribute, the share of the edits that do not ask for it which keep it (which
    attribute an edit loses: shape, in session 50's measurement, nano/README.md "Editing"), and 'kept_by_kind': that
    share by kind of edit."""
    asked = [marks[kind] for kind, marks in rows]
    kept = [all(marks[a] for a in data.ATTRIBUTES if a != kind) for kind, marks in rows]
    right = [a and k for a, k in zip(asked, kept)]
    out = {"right": float(np.mean(right)), "asked": float(np.mean(asked)), "kept": float(np.mean(kept)),
           "edits": len(rows)}
    out["right_by_kind"] = {kind: float(np.mean([r for (c, _), r in zip(rows, right) if c == kind]))
                            for kind in data.EDIT_INSTRUCTIONS if any(c == kind for c, _ in rows)}
    out["kept_by_attribute"] = {a: float(np.mean([marks[a] for kind, marks in rows if kind != a]))
                                for a in data.ATTRIBUTES if any(kind != a for kind, _ in rows)}
    # the same per kind of edit: whether an attribute is lost only where the object is redrawn elsewhere or at
    # another size, or in place too (session 53: the shape, in every kind alike)
    out["kept_by_kind"] = {kind: {a: float(np.mean([marks[a] for c, marks in rows if c == kind]))
                                  for a in data.ATTRIBUTES if a != kind}
                           for kind in data.EDIT_INSTRUCTIONS if any(c == kind for c, _ in rows)}
    return out


def mirrored_position(position: str) -> str:
    """``position`` in the picture mirrored left to right (the centre stays)."""
    row, col = data.POSITIONS[position]
    return next(name for name, at in data.POSITIONS.items() if at == (row, 1.0 - col))


def score_reconstructions(pipe, scenes: list[data.Scene], sampling=None, instruction: str | None = None
                          ) -> dict[str, float]:
    """Each of ``scenes`` given back (``edit`` without instruction: the reconstruct prompt; or the editing prompt
    with an ``instruction`` that asks for no change) and scored against itself: how much of a picture the model
    keeps. An edit keeps four of the five attributes, so its 'kept' can be no better than this.
    'position_mirrored': the share of pictures whose object came back at its position mirrored left to right (top
    and bottom kept): what most of the lost positions were (nano/README.md "Editing")."""
    marks = []
    for scene in scenes:
        got = score.read_scene(runtime_edit(pipe, scene, instruction, sampling))
        mark = {a: got[a] == getattr(scene, a) for a in data.ATTRIBUTES}
        mark["all"] = all(mark.values())
        mirror = mirrored_position(scene.position)
        mark["position_mirrored"] = mirror != scene.position and got["position"] == mirror
        marks.append(mark)
    return score.summarize(marks)


def runtime_generate(pipe, prompt: str, seed: int = 0):
    res = pipe.generate(prompt, resolution=(256, 256), seed=seed, sampling=greedy_sampling(pipe))
    return res.image, res.tokens.semantic, res.tokens.pixel


def runtime_answer(pipe, scene: data.Scene, question: str) -> str:
    from PIL import Image

    return pipe.understand(Image.fromarray(data.render(scene)), question, max_new_tokens=16).text


SCORED = ("background", "position", "colour", "shape", "size", "answers")


class PromptScorer:
    """callable(pipeline) -> {attribute: fraction right} over the prompts of split ``which`` (default the held-out
    ones; quantize's gate: GATE_SPLIT; greedy, as ``evaluate``), plus 'answers' (fraction of the questions of
    ``question_split`` answered right) and 'all'. Results are kept per bundle (path and
    manifest bytes), so scoring one FP32 bundle against several quantized ones runs it once."""

    informational = ("all",)  # reported, not gated (calibration/accuracy.py prompt_gate)

    def __init__(self, prompt_limit: int | None = None, question_limit: int | None = None, which: str = "held",
                 log=None, question_split: str | None = None) -> None:
        self.prompt_limit, self.question_limit, self.which, self.log = prompt_limit, question_limit, which, log
        # the questions of the held-out scenes unless asked otherwise: the grammar's 2250 would add minutes and
        # the answers already move by 0.4 points at most (nano/README.md "Quantized")
        self.question_split = question_split or ("held" if which == "grammar" else which)
        self._done: dict = {}

    def describe(self) -> dict:
        return {"scorer": "illume_rt.nano.heldout.PromptScorer", "split": self.which,
                "question_split": self.question_split, "decoding": "greedy",
                "guidance": "the bundle's text-to-image default (Pipeline.default_sampling)",
                "prompts": len(eval_prompts(self.prompt_limit, self.which)),
                "questions": len(eval_questions(self.question_limit, self.question_split))}

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
                       for scene, q, a in eval_questions(self.question_limit, self.question_split)]
            summary = score.summarize(marks)
            figures = {a: summary[a] for a in SCORED if a in summary}
            figures["answers"] = float(np.mean(answers)) if answers else float("nan")
            figures["all"] = summary["all"]
            self._done[key] = figures
            if self.log:
                self.log(f"nano prompt scorer: {len(marks)} prompts, {len(answers)} questions in "
                         f"{time.time() - t0:.0f}s")
        return dict(self._done[key])

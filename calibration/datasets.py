"""Calibration and evaluation sets that look like real use, and the inputs every graph sees while the runtime works.

Three kinds of data:

- **prompts**: the example text-to-image prompts (``shared/data/illume-examples/t2i``) plus a generated set that
  crosses subjects, styles and resolutions (seeded, so a manifest can name it exactly);
- **images**: the example understanding and editing images plus synthetic ones of varied sizes and content
  (gradients, shapes, noise: seeded);
- for an **illume-nano** bundle (``plan_for``: the manifest's ``model.preset``), prompts and pictures of nano's own
  grammar instead (nano/data.py): calibration on training-split scenes only, evaluation on held-out ones, so that
  nothing the prompt scorer (nano/heldout.py, held-out scenes) asks about was calibrated on;
- **captured feeds**: the runtime itself runs the FP32 bundle (``Pipeline.generate`` at the model's default sampling:
  the official guidance 2.0 runs both rows, illume-nano's 1.0 the conditional row only; both levels;
  ``Pipeline.understand``; optionally the diffusion refiner) with every engine wrapped by a ``Recorder`` that keeps
  a copy of a sub-sample of its feeds. The LLM is calibrated on exactly what it sees in service: prefills, decode steps of the semantic and pixel levels, forced runs, image-feature prefills of understanding.

``capture`` returns the feeds per component plus a ``record`` (what was run, with sizes and seeds) for the manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from illume_rt.contract import CACHE_INPUT_PREFIX

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "illume-examples"

SUBJECTS = ("a red fox in the snow", "a bowl of ramen", "an old lighthouse on a cliff", "a robot reading a book",
            "two cats on a sofa", "a mountain lake at dawn", "a vintage bicycle", "a city skyline at night",
            "a bouquet of sunflowers", "a portrait of an elderly man", "a sailing boat in a storm",
            "a cup of coffee on a wooden table")
STYLES = ("photorealistic", "watercolor painting", "oil painting", "pixel art", "pencil sketch", "3d render",
          "anime style", "studio lighting, 35mm photo")
QUESTIONS = ("What is in this image?", "Describe the image in detail.", "What colors dominate the picture?",
             "How many objects are there?")


@dataclass
class CalibrationPlan:
    """What to run to collect feeds. ``generate`` entries are (prompt, (height, width), seed)."""

    generate: list = field(default_factory=list)
    understand: list = field(default_factory=list)  # (image name, question)
    refine: list = field(default_factory=list)  # indices into ``generate`` that also run the diffusion decoder
    refine_steps: int = 2
    # more (prompt, (height, width), seed) whose generated codes are refined end to end, FP32 and quantized
    # (evaluation only: accuracy.refinement_figures), beside those of ``generate``: the chain can go wrong on one
    # picture in three while the others stay at 45 dB (nano/README.md "Quantized")
    refine_checks: list = field(default_factory=list)
    # more (prompt, (height, width), seed) refined end to end whose latents calibrate the VAE decoder only (calibration
    # only): the LLM, UNet and pixel decoder keep the feeds of ``generate``. A VAE's latent range depends on what is
    # drawn (nano: the colour pair and the size), and an activation range is the extremes seen.
    vae_only_refine: list = field(default_factory=list)
    max_new_tokens: int = 16
    llm_samples_per_run: int = 12  # decode-step feeds kept per run (prefill always kept)
    decoder_samples: int = 4  # random code grids per resolution for the pixel decoder
    seed: int = 0
    max_images: int | None = None  # cap on images (examples first, then synthetic) for understanding/encoders
    images: str = "examples"  # the picture pool (``plan_images``): "examples", or nano's "nano-train" / "nano-held"

    def to_dict(self) -> dict:
        return asdict(self)


def refinable(components: dict) -> bool:
    """Whether a bundle with these manifest components can refine (token map, diffusion UNet, VAE decoder)."""
    return all(name in components for name in ("token_map", "diffusion_unet", "vae_decoder"))


def plan_refine(pipe, plan: CalibrationPlan):
    """The refinement a plan runs: what ``--refine`` runs on this bundle (``Pipeline.default_refine``: the official
    defaults, or the model's declared ones) at the plan's step count."""
    from dataclasses import replace

    return replace(pipe.default_refine(), steps=plan.refine_steps)


def example_prompts() -> list[str]:
    path = EXAMPLES / "t2i" / "t2i_test_examples.jsonl"
    if not path.is_file():
        return []
    prompts = []
    for line in path.read_text().splitlines():
        if line.strip():
            turns = json.loads(line)["conversations"]
            prompts.append(next(t["value"] for t in turns if t["from"] == "human"))
    return prompts


def generated_prompts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{SUBJECTS[rng.integers(len(SUBJECTS))]}, {STYLES[rng.integers(len(STYLES))]}" for _ in range(count)]


def example_images() -> dict[str, "object"]:
    """name -> PIL image of every example understanding/editing image present."""
    from PIL import Image

    found = {}
    for sub in ("understand", "edit"):
        folder = EXAMPLES / sub
        if folder.is_dir():
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() in (".png", ".jpg", ".jpeg"):
                    found[f"{sub}/{file.name}"] = Image.open(file).convert("RGB")
    return found


def synthetic_image(height: int, width: int, seed: int):
    """Smooth gradient + a few flat shapes + mild noise: structured content at a chosen size."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(xx / width) * rng.uniform(50, 255), (yy / height) * rng.uniform(50, 255),
                     np.full_like(xx, rng.uniform(0, 255))], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        box = [int(x0), int(y0), int(x0 + rng.integers(8, width // 2)), int(y0 + rng.integers(8, height // 2))]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


SYNTHETIC_SIZES = ((224, 320), (320, 240), (256, 256), (160, 480))


def images(seed: int, synthetic: int = 2) -> dict[str, "object"]:
    """Example images plus ``synthetic`` generated ones of varied sizes."""
    found = example_images()
    for i in range(synthetic):
        h, w = SYNTHETIC_SIZES[(seed + i) % len(SYNTHETIC_SIZES)]
        found[f"synthetic/{h}x{w}-seed{seed + i}"] = synthetic_image(h, w, seed + i)
    return found


NANO_POOLS = ("nano-train", "nano-held")


def nano_scenes(split: str) -> list:
    """nano's scenes for a plan: 'nano-train' those whose captions, full and short, never name a held-out scene
    (a short caption fits both sizes, and the scorer asks the held-out scenes' short captions too); 'nano-held'
    the held-out scenes."""
    from illume_rt.nano import data

    train, held = data.split()
    if split == "nano-held":
        return held
    held_short = {s.short_caption for s in held}
    return [s for s in train if s.short_caption not in held_short]


def plan_images(plan: CalibrationPlan) -> dict[str, "object"]:
    """name -> PIL image of the plan's pool: the examples + synthetic images, or renders of nano scenes (one picture
    per scene, in a fixed spread over the split; a few at other sizes, as users pass them)."""
    if plan.images not in NANO_POOLS:
        return images(plan.seed)
    from PIL import Image

    from illume_rt.nano import data

    scenes = nano_scenes(plan.images)
    count = min(len(scenes), plan.max_images or NANO_POOL_IMAGES)
    rng = np.random.default_rng(plan.seed)
    chosen = [scenes[i] for i in sorted(rng.choice(len(scenes), count, replace=False))]
    found = {}
    for i, scene in enumerate(chosen):
        size = NANO_IMAGE_SIZES[i % len(NANO_IMAGE_SIZES)]
        found[f"{plan.images}/{size}/{scene.caption}"] = Image.fromarray(data.render(scene, size=size))
    return found


# Pictures per nano plan when max_images is not set. With 6, INT8's activation ranges of the pixel embedder missed
# the held-out pictures (worst cosine 0.976 for ort-cpu, 0.989 for tensorrt, under the 0.99 gate); 16 gave 0.9995.
NANO_POOL_IMAGES = 16
NANO_IMAGE_SIZES = (256, 256, 256, 256, 384, 192)  # nano is trained at 256; understanding takes other sizes too


# illume-nano refines at the official 20 steps in calibration and evaluation: the UNet's activations depend on the
# timestep, and with 2 steps its INT8 graph was calibrated and gated on 2 of the 20 timesteps a user's --refine runs.
# A nano UNet call costs ~0.1 s, so the whole schedule is cheap here. (All 20 steps of one picture are not enough:
# see the calibration's refinements in ``nano_plan``; the end-to-end refinement gate, accuracy.refinement_figures,
# catches a UNet calibrated too narrowly.)
NANO_REFINE_STEPS = 20
# Held-out captions whose codes the evaluation also refines end to end, beside its three (``refine_checks``): on 10
# held-out pictures nano's INT8 onnxruntime CPU UNet stayed within 45-50 dB of FP32 on seven and fell to 16-21 dB on
# three, so three pictures can miss it. ~3 s a picture, FP32 and quantized, each.
NANO_REFINE_CHECKS = 9


def nano_plan(role: str = "calibration", seed: int | None = None,
              resolution: tuple[int, int] | None = None) -> CalibrationPlan:
    """illume-nano: captions of its grammar at ``resolution`` (default the size its pictures are rendered and trained
    at, nano/data.py IMAGE_SIZE), full and short form; nano's questions on renders of its scenes. Calibration: sixteen
    training-split captions that between them show every (colour, background) pair and every shape, position and
    size (``_covering``, NANO_CALIBRATION_CAPTIONS), four questions on training scenes, and for the VAE decoder alone
    the refinements of one more training caption (full form) per (colour, background, size) the full captions do not
    show (``vae_only_refine``, ``_vae_key``). Evaluation (graph figures):
    three held-out captions, two questions on held-out scenes. Seeds as in ``default_plan``. Every calibration caption also runs the
    diffusion decoder (nano/decoder.py), the first evaluation caption too, so that its
    graphs are measured; the others go through the pixel decoder."""
    from illume_rt.nano import data

    calibrating = role == "calibration"
    seed = (0 if calibrating else 1000) if seed is None else seed
    scenes = nano_scenes("nano-train" if calibrating else "nano-held")
    rng = np.random.default_rng(seed)
    count = NANO_CALIBRATION_CAPTIONS if calibrating else 3
    picks = (_covering(scenes, rng, count, data.ATTRIBUTES) if calibrating
             else [scenes[i] for i in rng.choice(len(scenes), count, replace=False)])
    prompts = [s.caption if i % 2 == 0 else s.short_caption for i, s in enumerate(picks)]
    resolution = tuple(resolution or (data.IMAGE_SIZE, data.IMAGE_SIZE))
    gen = [(p, resolution, seed + i) for i, p in enumerate(prompts)]
    questions = [(i, data.QUESTIONS[(i + seed) % len(data.QUESTIONS)]) for i in range(4 if calibrating else 2)]
    extra = {"llm_samples_per_run": NANO_CALIBRATION_LLM_SAMPLES} if calibrating else {}
    if calibrating:  # the VAE decoder also sees every (colour, background, size) the full captions above do not show
        shown = {_vae_key(s) for i, s in enumerate(picks) if i % 2 == 0}
        extra["vae_only_refine"] = [(s.caption, resolution, seed + 200 + i)
                                    for i, s in enumerate(_one_per_vae_key(scenes, rng, shown))]
    if not calibrating:  # other held-out scenes, drawn apart so the graph figures' three captions stay as they were
        rest = [s for s in scenes if s not in picks]
        checks = [rest[i] for i in np.random.default_rng(seed + 1).choice(len(rest), NANO_REFINE_CHECKS, replace=False)]
        extra = {"llm_samples_per_run": 10 ** 9, "decoder_samples": 2,
                 "refine_checks": [(s.caption, resolution, seed + 100 + i) for i, s in enumerate(checks)]}
    # Calibration refines every caption's codes (16 x 20 UNet calls), not only the first: the INT8 onnxruntime CPU
    # UNet calibrated on one picture's 20 steps passed its graph gate (worst cosine 0.9985) and spoiled refined
    # pictures of other scenes (worst 6.7 dB against FP32 over the evaluation's 12, mean 29.0); calibrated on all
    # eight captions of the plan then: worst 42.4 dB, mean 48.1 (session 11's decoder). (``capture`` decodes a refined run's codes with the pixel decoder too.)
    refine = list(range(count)) if calibrating else [0]
    return CalibrationPlan(generate=gen, understand=questions, refine=refine, refine_steps=NANO_REFINE_STEPS, seed=seed,
                           images="nano-train" if calibrating else "nano-held", **extra)


# Calibration captions for nano: one for each (shape colour, background) pair of the grammar (15: no blue on blue),
# and one more. A calibration range is the extremes seen, and the latent of a picture depends on the pair: nano's
# VAE (session 32's) encodes a blue shape on gray to [-4.4, 9.5] and every other pair within [-3.2, 3.3]. Eight
# random picks with no blue shape calibrated the INT8 VAE decoder on latents in [-3.2, 2.6], and the refinement of
# a blue circle on gray ran it at 9.3: PSNR 20.4 dB against FP32, gate 30 (session 33). One pair seen once does
# not reach its extremes either: the plan's blue-on-gray caption peaks at 5.59, and the INT8 tensorrt VAE decoder
# clipped the evaluation's two blue-on-gray pictures (30.9 and 33.6 dB, the other ten 45.9-51.9;
# bench/results/20261204-nano-int8-tensorrt-vae-ranges). Hence the VAE decoder's own extra latents (``_vae_key``):
# with them its latents reach 11.43 (a small blue circle on gray; bench/results/20261204-nano-vae-calibration-cover).
NANO_CALIBRATION_CAPTIONS = 16
# decode-step feeds kept per calibration run: twice the captions, half the steps each, so the LLM is calibrated on
# as many feeds as with the generic plan's 8 x 12
NANO_CALIBRATION_LLM_SAMPLES = 6


def _vae_key(scene) -> tuple[str, str, str]:
    """What sets the range of the latent nano's VAE decoder is handed for a scene: the shape's colour, the background
    and the size. Refined latents of one training scene per blue-or-gray (colour, background, size), session 36,
    bench/results/20261204-nano-int8-tensorrt-vae-ranges: a small blue circle or square on gray peaks at 10.42 / 9.05,
    a large one at 6.35 / 5.57, blue shapes on white or black at 2.4-3.2, other shapes on gray at 1.4-2.5."""
    return scene.colour, scene.background, scene.size


def _one_per_vae_key(scenes: list, rng, shown: set) -> list:
    """One scene of ``scenes`` (drawn in ``rng``'s order) for each ``_vae_key`` not in ``shown``, in a fixed order."""
    order = [scenes[i] for i in rng.permutation(len(scenes))]
    first: dict = {}
    for scene in order:
        first.setdefault(_vae_key(scene), scene)
    return [first[key] for key in sorted(first) if key not in shown]


def _covering(scenes: list, rng, count: int, attributes: tuple[str, ...]) -> list:
    """``count`` scenes that between them show every (colour, background) pair and every value of each of
    ``attributes`` where ``count`` allows: each pick is the scene adding the most not yet shown, a new pair
    first, ties in ``rng``'s order."""
    order = [scenes[i] for i in rng.permutation(len(scenes))]
    pairs: set = set()
    shown: set = set()
    picks: list = []

    def gain(scene) -> tuple[int, int]:
        return ((scene.colour, scene.background) not in pairs,
                len({(a, getattr(scene, a)) for a in attributes} - shown))

    for _ in range(min(count, len(order))):
        best = max((s for s in order if s not in picks), key=gain)  # max keeps the first of equals: rng's order
        picks.append(best)
        pairs.add((best.colour, best.background))
        shown |= {(a, getattr(best, a)) for a in attributes}
    return picks


def plan_for(model: dict | None, role: str = "calibration", seed: int | None = None) -> CalibrationPlan:
    """The plan for a bundle, from its manifest's ``model``: nano's grammar for illume-nano (``nano_plan``), the
    generic example prompts otherwise (``default_plan``)."""
    model = model or {}
    if model.get("preset") == "nano":
        trained = model.get("trained_resolutions")  # recorded by the nano export (nano/checkpoint.py)
        return nano_plan(role, seed, tuple(trained[0]) if trained else None)
    return default_plan(role, seed)


def default_plan(role: str = "calibration", seed: int | None = None) -> CalibrationPlan:
    """Calibration and evaluation plans, disjoint in prompts, seeds and images.

    Calibration: two example prompts + three generated ones over three resolutions (square, landscape, portrait),
    two understanding questions, one diffusion refinement. Evaluation: the remaining example prompt(s) + two
    other generated prompts, one understanding question on another image."""
    examples = example_prompts()
    if role == "calibration":
        seed = 0 if seed is None else seed
        prompts = examples[:2] + generated_prompts(3, seed)
        sizes = [(256, 256), (384, 512), (256, 256), (512, 384), (256, 256)]
        gen = [(p, sizes[i % len(sizes)], seed + i) for i, p in enumerate(prompts)]
        return CalibrationPlan(generate=gen, understand=[(0, QUESTIONS[0]), (1, QUESTIONS[1])], refine=[0],
                               seed=seed)
    seed = 1000 if seed is None else seed
    prompts = examples[2:3] + generated_prompts(2, seed)
    sizes = [(256, 256), (384, 512), (256, 256)]
    gen = [(p, sizes[i % len(sizes)], seed + i) for i, p in enumerate(prompts)]
    return CalibrationPlan(generate=gen, understand=[(-1, QUESTIONS[2])], refine=[0], seed=seed,
                           llm_samples_per_run=10 ** 9, decoder_samples=2)


class Recorder:
    """Wraps an engine; keeps copies of the feeds of the calls ``keep(call_index)`` selects, and optionally the
    outputs. Forwards ``out=`` so the runtime keeps writing into its buffers.

    The llm's cache inputs are kept by reference, not copied: they are views of the request's KV cache, whose
    columns never change once written, and the columns written later are masked in the call's (copied)
    ``attention_mask``, so the referenced arrays replay exactly. Copying them would hold the whole cache once per
    recorded step."""

    def __init__(self, inner, keep=lambda i: True, outputs: bool = False, events: list | None = None) -> None:
        self.inner, self.keep, self.with_outputs, self.events = inner, keep, outputs, events
        self.name, self.input_names, self.output_names = inner.name, inner.input_names, inner.output_names
        self.accepts_out = getattr(inner, "accepts_out", False)
        self.calls: list[dict] = []
        self.count = 0

    def run(self, feeds, out=None):
        results = self.inner.run(feeds, out=out) if out is not None else self.inner.run(feeds)
        if self.keep(self.count):
            call = {"feeds": {k: v if k.startswith(CACHE_INPUT_PREFIX) else np.array(v, copy=True)
                              for k, v in feeds.items()}, "index": self.count}
            if self.with_outputs:
                call["outputs"] = [np.array(r, copy=True) for r in results]
            self.calls.append(call)
            if self.events is not None:  # one ordered log across engines (body call, then its head call)
                self.events.append((self.name, call))
        self.count += 1
        return results


def _stride_keep(total_hint: int, samples: int):
    stride = max(1, total_hint // max(1, samples))
    return lambda i: i == 0 or i % stride == 0


def _wrap(pipe, name: str, recorder: Recorder) -> Recorder:
    pipe.replace_engine(name, recorder)
    return recorder


def _unwrap(pipe, name: str, recorder: Recorder) -> None:
    pipe.replace_engine(name, recorder.inner)


def capture(pipe, plan: CalibrationPlan, log=print, refinements: bool = True,
            vae_refinements: bool = True) -> tuple[dict[str, list[dict]], dict]:
    """Run ``plan`` on the FP32 pipeline; return feeds per component name and the record for the manifest.
    ``refinements`` False: the plan's refinements are skipped (no diffusion graph is to be calibrated).
    ``vae_refinements`` False: its ``vae_only_refine`` are (the VAE decoder is not to be calibrated)."""
    from illume_rt.runtime.images import understanding_image
    from illume_rt.contract import image_grid
    comps = pipe.bundle.manifest["components"]
    sampling = pipe.default_sampling("text_to_image")  # what a call without options runs (the model's defaults)
    feeds: dict[str, list[dict]] = {}
    record: dict = {"plan": plan.to_dict(), "generate": [], "understand": [], "images": {}}

    def take(name, recorder):
        feeds.setdefault(name, []).extend(c["feeds"] for c in recorder.calls)

    has = lambda n: n in comps  # noqa: E731
    for index, (prompt, resolution, seed) in enumerate(plan.generate):
        grid = image_grid(*resolution)
        body = _wrap(pipe, "llm", Recorder(pipe.engines["llm"], _stride_keep(grid.num_codes, plan.llm_samples_per_run)))
        dec = _wrap(pipe, "pixel_decoder", Recorder(pipe.engines["pixel_decoder"]))
        refine = None
        wrapped = {}
        if refinements and index in plan.refine and refinable(comps):
            refine = plan_refine(pipe, plan)
            for name in ("diffusion_unet", "vae_decoder"):
                wrapped[name] = _wrap(pipe, name, Recorder(pipe.engines[name]))
        try:
            result = pipe.generate(prompt, tuple(resolution), seed=seed, sampling=sampling, refine=refine)
            if refine is not None:  # the pixel decoder sees these codes too (a refined run skips it)
                pipe.decode_image(result.tokens.semantic, result.tokens.pixel)
        finally:
            _unwrap(pipe, "llm", body)
            _unwrap(pipe, "pixel_decoder", dec)
            for name, rec in wrapped.items():
                _unwrap(pipe, name, rec)
        take("llm", body)
        take("pixel_decoder", dec)
        for name, rec in wrapped.items():
            take(name, rec)
        record["generate"].append({"prompt": prompt, "resolution": list(resolution), "seed": seed,
                                   "guidance": sampling.guidance_scale, "llm_calls": body.count,
                                   "llm_kept": len(body.calls), "refine_steps": refine.steps if refine else 0})
        # the runtime draws the pixel decoder at this size; add random code grids too (all codes get used)
        rng = np.random.default_rng(plan.seed + 7 * index)
        for _ in range(plan.decoder_samples if index < 2 else 0):
            sem = rng.integers(0, pipe.semantic_codebook.shape[0], (grid.semantic_rows, grid.semantic_cols))
            pix = rng.integers(0, pipe.pixel_codebook.shape[0], (grid.pixel_rows, grid.pixel_cols))
            s, p = pipe.code_embeddings(sem, pix)
            feeds["pixel_decoder"].append({"semantic_embed": s, "pixel_embed": p})
        del result

    if refinements and vae_refinements and plan.vae_only_refine and refinable(comps):
        refine = plan_refine(pipe, plan)
        for prompt, resolution, seed in plan.vae_only_refine:
            vae = _wrap(pipe, "vae_decoder", Recorder(pipe.engines["vae_decoder"]))
            try:
                pipe.generate(prompt, tuple(resolution), seed=seed, sampling=sampling, refine=refine)
            finally:
                _unwrap(pipe, "vae_decoder", vae)
            take("vae_decoder", vae)
            record.setdefault("vae_only_refine", []).append({"prompt": prompt, "resolution": list(resolution),
                                                             "seed": seed, "refine_steps": refine.steps})

    pool = plan_images(plan) if plan.understand else {}
    names = list(pool)[:plan.max_images]
    record["images"] = {n: [pool[n].height, pool[n].width] for n in names}
    has_encoders = has("semantic_encoder") and has("pixel_embedder")
    for which, question in plan.understand:
        if not has_encoders or not names:
            break
        name = names[which % len(names)]
        body = _wrap(pipe, "llm", Recorder(pipe.engines["llm"], _stride_keep(plan.max_new_tokens, plan.llm_samples_per_run)))
        encs = {n: _wrap(pipe, n, Recorder(pipe.engines[n])) for n in ("semantic_encoder", "pixel_embedder")}
        try:
            answer = pipe.understand(pool[name], question, max_new_tokens=plan.max_new_tokens)
        finally:
            _unwrap(pipe, "llm", body)
            for n, rec in encs.items():
                _unwrap(pipe, n, rec)
        take("llm", body)
        for n, rec in encs.items():
            take(n, rec)
        record["understand"].append({"image": name, "size": record["images"][name], "question": question,
                                     "answer_tokens": len(answer.token_ids), "llm_kept": len(body.calls)})
    if has_encoders:  # every image through the encoders too (varied sizes), as ImageEncoder.encode feeds them
        from illume_rt.runtime.multimodal import semantic_view

        for name in names:
            x = understanding_image(pool[name])
            feeds.setdefault("semantic_encoder", []).append({"pixel_values": semantic_view(x)})
            feeds.setdefault("pixel_embedder", []).append({"image": x})
    record["samples"] = {name: len(v) for name, v in feeds.items()}
    return feeds, record

"""Train illume-nano on CPU: ``python -m illume_rt.nano.train [stage ...]`` (default: every stage, in order;
``--device cuda`` trains the MLLM stages on a GPU, see DEVICE).

Stages (each resumable: state is saved under the work folder, ``--work`` or ``$ILLUME_NANO_WORK``, default
``nano/work/``; a finished stage is skipped unless ``--redo STAGE``):

1. ``semantic``  DualViTok semantic branch: the Qwen2-VL ViT (the future MLLM vision tower) + a linear to the codebook
                 dim + SimVQ semantic quantizer, trained to reconstruct each 28-px cell at 4x4 (a training-only
                 per-cell semantic decoder). Official DualViTok reconstructs frozen ViT features instead; with no
                 pretrained ViT here, a coarse picture is the cheapest target that makes codes mean layout and colour.
2. ``pixel``     DualViTok pixel branch with the semantic branch frozen: MoVQ encoder -> quant conv -> SimVQ pixel
                 quantizer -> post-quant conv -> MoVQ decoder conditioned on merge_quants(semantic, pixel), L1 + L2
                 reconstruction + commitment. Mostly on 96x96 crops of the code map (the networks are convolutional;
                 a full picture costs ~4x a crop), then a short full-size phase so GroupNorm sees whole pictures.
3. ``tokens``    Tokenize the training pictures once (semantic 9x9 + pixel 16x16 codes) and cache the understanding
                 features of the same canonical pictures (ViT merger output and pixel-encoder output; both
                 encoders stay frozen in the MLLM: the released model fine-tunes part of them).
4. ``mllm``      Qwen2-style LLM + the two projectors, teacher forcing with cross-entropy on
                 (a) caption -> image tokens (semantic then pixel, the official layout; 10% of captions replaced by the
                 unconditional prompt as cfg_text_dropout does) and (b) image -> answers (the five questions as one
                 multi-turn chat in a random order, so each question is also seen first).
5. ``focus``, ``edit``, ``polish``   The MLLM goes on from ``mllm``: erased context and hard-token weighting,
                 then editing, then a short low-LR pass (see the comments at their constants below).
6. ``vae``, ``decoder``   The diffusion decoder (``nano/decoder.py``): its autoencoder on 512x512 renders, then its
                 UNet on (token map, latent) pairs; built on the tokenizer only, not on the MLLM, so a run that has
                 both to do trains them in a second process beside stages 3-5 (``--jobs``, default 2: one per core).
7. ``export``    Write the weights (``--out``, default ``nano/weights/``) in the official checkpoint layout (see
                 ``illume_rt.nano.checkpoint``).
8. ``sampling``  Choose their sampling defaults on the training split, into the same folder
                 (``nano/choose_sampling.py``; with ``--jobs 2`` in two processes, both cores being free by then).

Everything is seeded (``--seed``, default the recipe's). One thread per process by default (``--threads``), except
stages ``edit`` and ``polish``, which train on two once the side chain has ended (TWO_THREAD_STAGES); the weights
are bit-identical from run to run at the same seed and thread counts, on one machine. OpenMP threads wait passively
(set below, before torch loads): spinning, two threads beside other work made a step 9x slower. Run it with
``nice``. CPU seconds per stage go to ``WORK/log.json`` and into the weights' ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Before torch loads OpenMP, which reads it once: a thread that reaches a barrier first sleeps instead of spinning,
# so that a stage on two threads (TWO_THREAD_STAGES) beside other work does not burn the core its partner needs
# (bench/results/20261202-nano-threads-busy). An explicit setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from illume_rt.nano import data

HERE = Path(__file__).resolve().parent
DEFAULT_WORK = HERE / "work"
STAGES = ("semantic", "pixel", "tokens", "mllm", "focus", "edit", "polish", "vae", "decoder", "export", "sampling")
# The recipe's seed, the committed weights'. ``--seed`` replaces SEED for a run, to train another draw of the same
# recipe (how far two draws differ: nano/README.md, "Left out"); each stage records the seed it was trained with.
RECIPE_SEED = 1234
SEED = RECIPE_SEED
# Where the MLLM stages (MLLM_STAGES) train: the CPU, or a GPU with ``--device cuda``. Only those: they are most of
# the recipe's time (81 of the 129 CPU minutes of session 40's run) and a transformer, which a GPU runs well; the
# tokenizer and the diffusion decoder stay on the CPU, where the side chain trains them beside the MLLM chain. Every
# state is saved with its tensors on the CPU, so a work folder and its weights read the same whichever device
# trained them.
MLLM_STAGES = ("mllm", "focus", "edit", "polish")
DEVICE = torch.device("cpu")

# Step counts and batch sizes: sized for ~40 CPU minutes on a shared 2-core machine (see nano/README.md).
SEMANTIC_STEPS, SEMANTIC_BATCH = 400, 16
PIXEL_CROP_STEPS, PIXEL_FULL_STEPS, PIXEL_BATCH, CROP_CELLS = 600, 80, 8, 6
MLLM_STEPS, T2I_BATCH, UND_BATCH = 1100, 8, 4
# Stage ``focus``: the MLLM goes on from stage ``mllm`` with two changes aimed at the object's codes, which
# after ``mllm`` did not depend on the caption's colour word (nano/README.md, "Diagnosis"):
# - erased context: in each training picture a share (uniform in [0, ERASE_MAX]) of the image codes *fed as input*
#   is replaced by the code the background's empty picture has there (the labels stay the true codes). Under plain
#   teacher forcing only the code where the object starts needs the caption; every later object code can copy
#   colour and outline from its neighbours, so one code per level and picture taught the model to read the
#   caption. With neighbours erased, every object code must come from the caption, as the first one does when the
#   model draws alone.
# - hard tokens weigh more: each image token's cross-entropy is weighted by 1 + HARD_WEIGHT * (1 - p)^2 (p: the
#   model's probability of the right token, not differentiated), normalised by the weights' sum, so the few codes
#   the model gets wrong are not drowned by the background's ~300 codes at p ~ 0.99 (their weight stays >= 1, so
#   the model stays confident where it is right, which sampling needs).
# Understanding goes on with FOCUS_UND_BATCH chats per step: after ``mllm`` the model still answers shape at chance
# and takes left for right, and it learns both here or not at all (``edit``, ``polish`` and even 1000 steps of
# understanding alone did not get there). At 2 chats a from-scratch run learned neither (held-out answers 79%, 86%
# with another seed); at 4 the same run answered 98% (nano/README.md "Measured"), for 25% more CPU in this stage.
# 3000 steps: at 1100 the caption's shape word was only starting to move the deciding code (nano/README.md).
FOCUS_STEPS, FOCUS_LR, HARD_WEIGHT, ERASE_MAX, FOCUS_UND_BATCH = 3000, 2e-3, 20.0, 0.6, 4
# Stage ``edit``: the MLLM goes on from ``focus`` and learns editing in nano's grammar (data.EDIT_INSTRUCTIONS) on
# the ILLUME+ editing prompt, at nano's one size (256x256: the runtime edits at a model's trained sizes when it was
# trained at none of the official anchors). Each step: EDIT_BATCH edits, EDIT_T2I_BATCH captions and
# LATER_UND_BATCH understanding chats, so drawing and answering go on while editing is learned.
# - An edit's input is the source picture's features spliced into the prompt (as understanding sees them), its
#   labels the edited scene's codes; its fed codes are erased as in ``focus``, so that each output code is read
#   from the instruction and the input picture, not copied from the codes already drawn.
# - The unconditional row (the official "Reconstruct the image according to the given image", UNCOND_P of the
#   edits) is trained to give back the source picture: at inference the guidance then pushes the output away from
#   the unchanged picture, toward the instruction.
# - Pixel codes are erased up to EDIT_PIXEL_ERASE_MAX (semantic: ERASE_MAX): size and shape are drawn mostly at the
#   pixel level and were still near chance after ``focus`` (nano/README.md, "Diagnosis").
# - 2700 steps (was 1500): from scratch, with POLISH_STEPS 800, held-out edits right 25% -> 52% greedy and drawing
#   no worse (session 32, nano/README.md "Editing"; bench/results/20261203-nano-edit-steps-2700).
# - Learning rate 1e-3. 2e-3 gets 2-8 more points of edits right on three pairs of draws, its drawing better on two
#   and worse on the third (sessions 52-55, bench/results/20261206-nano-edit-arms). Its INT8 tensorrt LLM's graph
#   gate, missed with max ranges, passes with the entropy ranges of session 55; adopting it waits on its measured
#   weights trained again on the machine that gives them back bit for bit (nano/README.md, "Editing").
EDIT_STEPS, EDIT_LR, EDIT_BATCH, EDIT_T2I_BATCH = 2700, 1e-3, 4, 6
LATER_UND_BATCH = 2  # understanding chats per step in ``edit`` and ``polish``: answering is learned by then
EDIT_PIXEL_ERASE_MAX = 0.9
# Stage ``polish``: after ``edit``, drawing from captions had lost ground on held-out scenes (greedy background
# 94% -> 82%, position 86% -> 80%, shape 57% -> 49%; the training sample held: nano/README.md "Measured"), so the
# MLLM goes on briefly at a low learning rate with ``focus``'s caption recipe (codes erased up to ERASE_MAX at both
# levels, T2I_BATCH), keeping a few edits per step (POLISH_EDIT_BATCH) so editing stays. 800 steps (was 400):
# after the 2700-step ``edit``, 400 left held-out shape at 77% at the default sampling, 800 gave 87% (session 32).
POLISH_STEPS, POLISH_LR, POLISH_EDIT_BATCH = 800, 3e-4, 2
# Stages ``vae`` and ``decoder``: the diffusion decoder (nano/decoder.py). The VAE trains on VAE_CROP-px crops of
# 512x512 renders, then whole pictures (where its normalization statistics are the picture's: after crops alone,
# colours came out shifted). The UNet trains on DECODER_PAIRS (token map, latent) pairs of jittered training scenes:
# on LATENT_CROP crops of the 64x64 latent (the map cropped with them; half around the shape), then on whole
# latents; each latent cell's loss weighs 1 + OBJECT_WEIGHT x the share of the shape in it, as the background's
# cells would otherwise drown the shape's (the first runs drew the shape in the wrong colour).
# 450 whole-picture steps, finishing on the weights averaged over about the last 100 (VAE_AVERAGE_DECAY): the raw
# weights swing by up to 1.6 dB of round trip between states 50 steps apart, so the last step's state was a draw
# (seed 1 decoded red as brown and refined below Lanczos); averaged, three draws gave 31.6, 31.9 and 33.0 dB
# (bench/results/20261205-nano-vae-draws).
VAE_CROP_STEPS, VAE_FULL_STEPS, VAE_BATCH, VAE_CROP, VAE_LR = 1500, 450, 8, 128, 2e-3
VAE_AVERAGE_DECAY = 0.99
DECODER_PAIRS, DECODER_CROP_STEPS, DECODER_FULL_STEPS, DECODER_BATCH, LATENT_CROP, DECODER_LR = (
    1200, 3000, 500, 16, 32, 1e-3)
OBJECT_WEIGHT = 10.0
UNCOND_P = 0.1  # official cfg_text_dropout
EDIT_RECONSTRUCT_P = UNCOND_P  # the share of edits given the reconstruct prompt (the unconditional row)
# Every MLLM stage's captions: the full form (with the size word) FULL_CAPTION_P of the rest, else the short form
# (no size word; the quick start's prompt), the short form only where the context is trained at both sizes
# (short_caption_allowed). Short captions taught the model to draw a context's trained size without reading the
# size word, yet helped it draw and read shape: the share trades shape for size, and 0.7 keeps most of both. The
# measurements behind it: nano/README.md, Diagnosis item 9 and "The caption share". The committed weights were
# trained with it (session 18).
FULL_CAPTION_P = 0.7
SMOKE = bool(os.environ.get("ILLUME_NANO_SMOKE"))  # a few steps and scenes of everything, to check the scripts


def nano_preset():
    from illume_rt.export.configs import get_preset

    return get_preset("nano")


# ----------------------------------------------------------------------------------------------------------------
# DualViTok training modules (the inference part is DualViTokPixel; the rest is training-only, official names)
# ----------------------------------------------------------------------------------------------------------------
class SemanticEncoder(nn.Module):
    """``semantic_encoder``: ``model`` is the Qwen2-VL ViT + merger (official ``semantic_encoder.model``, which the
    MLLM takes as its vision tower); ``proj`` maps merger features to the codebook dim."""

    def __init__(self, preset):
        super().__init__()
        from illume_rt.export.networks.vision import build_vision_tower

        self.model = build_vision_tower(preset)
        self.proj = nn.Linear(preset.vision_tower.out_dim, preset.codebook.dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, 256, 256] in [-1, 1] -> merger features [B, 81, out_dim] (the MLLM's semantic input)."""
        return torch.stack([self.model(v[None]) for v in vit_view(images)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """-> pre-quantization semantic map [B, dim, 9, 9]."""
        z = self.proj(self.features(images))
        side = int(math.isqrt(z.shape[1]))
        return z.transpose(1, 2).reshape(z.shape[0], -1, side, side)


def vit_view(images: torch.Tensor) -> torch.Tensor:
    """The ViT's input, as reference_image_block builds it: antialiased bicubic to 252, CLIP normalisation."""
    from illume_rt.runtime.images import CLIP_MEAN, CLIP_STD

    unit = F.interpolate((images + 1) / 2, size=(252, 252), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)
    return (unit - torch.from_numpy(CLIP_MEAN)[None, :, None, None]) / torch.from_numpy(CLIP_STD)[None, :, None, None]


def cell_target(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 256, 256] -> each 28-px cell of the 252 view at 4x4: [B, 81, 48] in [-1, 1]."""
    small = F.interpolate(images, size=(36, 36), mode="area")
    b = small.shape[0]
    return small.reshape(b, 3, 9, 4, 9, 4).permute(0, 2, 4, 1, 3, 5).reshape(b, 81, 48)


def quantize(quantizer, z: torch.Tensor, beta: float = 0.25):
    """SimVQ training step: nearest code of the transformed frozen codebook, straight-through estimator, codebook
    loss (updates the code transform) + beta x commitment. Returns (quantized, indices, loss)."""
    table = quantizer.lookup_table()
    flat = z.movedim(1, -1).reshape(-1, z.shape[1])
    idx = torch.cdist(flat.detach(), table.detach()).argmin(dim=1)
    q = table[idx].reshape(*z.movedim(1, -1).shape).movedim(-1, 1)
    loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
    return z + (q - z).detach(), idx.reshape(z.shape[0], *z.shape[2:]), loss


def semantic_decoder(dim: int) -> nn.Module:
    """``semantic_decoder`` (training only): one code -> its cell at 4x4 RGB."""
    return nn.Sequential(nn.Linear(dim, 96), nn.GELU(), nn.Linear(96, 48))


def build_tokenizer_modules(preset):
    from illume_rt.export.networks.dualvitok import build_dualvitok_pixel

    torch.manual_seed(SEED)
    pixel = build_dualvitok_pixel(preset)  # random init from the preset seed (SimVQ frozen codebooks included)
    return SemanticEncoder(preset), semantic_decoder(preset.codebook.dim), pixel


def random_batch(rng: np.random.Generator, scenes: list, n: int) -> torch.Tensor:
    imgs = [data.render(scenes[i], rng) for i in rng.integers(0, len(scenes), n)]
    return torch.from_numpy(np.concatenate([data.to_model_input(im) for im in imgs]))


def cosine_lr(step: int, total: int, peak: float, warmup: int = 10) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# ----------------------------------------------------------------------------------------------------------------
# Checkpointing (resumable stages)
# ----------------------------------------------------------------------------------------------------------------
def machine() -> dict:
    """What a stage's result depends on besides the code and its seed, logged with the stage: float rounding
    follows the CPU kernels torch dispatches to (its capability level) and torch's version, so a run gives another
    run's weights back bit for bit only where these match (nano/README.md, "How these weights were made")."""
    from illume_rt.bench.measure import machine as bench_machine

    # the CPU's model name as the benchmarks record it (none off Linux: the capability level still says which
    # kernels ran)
    found = {"cpu": bench_machine().get("cpu", ""), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "torch": torch.__version__}
    if DEVICE.type == "cuda":  # the MLLM stages' kernels are the GPU's
        found["gpu"] = torch.cuda.get_device_name(DEVICE)
    return found


class Stage:
    """One stage's states in the work folder. A process holds the stage's lock (``NAME.lock``, fcntl.flock,
    released by the kernel when the process ends) from here until ``finish``: two processes training one stage in
    one folder (the command started twice, or again while an orphaned process still trains) would write the same
    checkpoint files, so the second one stops at once with a line saying who holds it."""

    def __init__(self, work: Path, name: str):
        self.work, self.name = work, name
        self.path = work / f"{name}.pt"
        self.partial = work / f"{name}.partial.pt"
        self._lock = _take_stage_lock(work / f"{name}.lock", name)
        self.cpu0, self.wall0 = time.process_time(), time.time()
        self.cpu_before = 0.0

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    @property
    def done(self) -> bool:
        return self.path.is_file()

    def resume(self) -> dict | None:
        if self.partial.is_file():
            state = torch.load(self.partial, weights_only=True)
            seed = state.get("seed", RECIPE_SEED)  # partial states written before --seed existed: the recipe's
            if seed != SEED:
                raise SystemExit(f"nano.train: stage {self.name} in {self.work} was started with seed {seed}, not "
                                 f"{SEED}: pass --seed {seed} to go on with it, or give seed {SEED} a --work folder "
                                 "of its own")
            self.cpu_before = state.get("cpu_s", 0.0)
            print(f"[{self.name}] resuming at step {state['step']}")
            return state
        return None

    def cpu_s(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu0

    def save_partial(self, state: dict) -> None:
        state = on_cpu(state)
        state["cpu_s"], state["seed"] = self.cpu_s(), SEED
        tmp = self.partial.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.partial)

    def finish(self, state: dict, extra: dict | None = None) -> None:
        state = on_cpu(state)
        state["cpu_s"] = self.cpu_s()
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.partial.unlink(missing_ok=True)
        entry = {"cpu_s": round(state["cpu_s"], 1), "wall_s_last_run": round(time.time() - self.wall0, 1),
                 "seed": SEED, **({"device": DEVICE.type} if DEVICE.type != "cpu" else {}),
                 "finished_on": machine(), **(extra or {})}
        update_log(self.work, {self.name: entry})
        self.release()
        print(f"[{self.name}] done: {entry}")


def on_cpu(state):
    """``state`` (dicts, lists and tensors) with every tensor on the CPU: what a stage saves (see DEVICE)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(v) for v in state)
    return state


def _take_stage_lock(path: Path, name: str):
    """The open lock file of a stage, locked for this process; SystemExit naming the holder when another has it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise SystemExit(f"nano.train: stage {name} in {path.parent} is being trained by another process (pid "
                         f"{holder}); wait for it to end or stop it, then run the command again (it resumes)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def update_log(work: Path, entries: dict) -> None:
    """Merge ``entries`` into ``work/log.json``: under a lock, as the side chain's process (SIDE_CHAIN) finishes
    its stages while this one does, and replaced whole, so that a reader never sees half a file."""
    from illume_rt.files import exclusive_lock

    log_path = work / "log.json"
    with exclusive_lock(work / "log.lock"):
        log = json.loads(log_path.read_text()) if log_path.is_file() else {}
        log.update(entries)
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(log, indent=1))
        os.replace(tmp, log_path)


def _train_loop(stage: Stage, modules: dict[str, nn.Module], params, steps: int, peak_lr: float, step_fn,
                every: int = 20, average_decay: float | None = None) -> dict:
    """Train ``modules`` for ``steps``, resumable from the stage's partial state. ``average_decay``: also keep an
    exponential moving average of the modules' weights (the decay capped by (1 + step) / (10 + step) early on), and
    end with the modules holding it."""
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.0, betas=(0.9, 0.99))
    average = None if average_decay is None else {
        k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in modules.items()}
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    start = 0
    state = stage.resume()
    if state:
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        # Partial states hold only tensors, dicts, lists and plain numbers/strings (they load with
        # weights_only=True): numpy's generator state is a dict of ints, torch's a uint8 tensor.
        rng.bit_generator.state = state["rng"]
        if "torch_rng" in state:  # absent from partial states written before it was saved
            torch.set_rng_state(state["torch_rng"])
        if average is not None:
            if "average" not in state:  # written before the stage kept an average (stage vae until session 45)
                raise SystemExit(f"nano.train: {stage.partial} was written before stage {stage.name} kept its "
                                 f"weights' average, so it cannot end as an uninterrupted run does: pass --redo "
                                 f"{stage.name} to train the stage again from its start")
            average = {k: {n: t.to(DEVICE) for n, t in a.items()} for k, a in state["average"].items()}
    hist = []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, peak_lr)
        loss, info = step_fn(step, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if average is not None:
            _update_average(average, modules, min(average_decay, (1 + step) / (10 + step)))
        hist.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            print(f"[{stage.name}] step {step + 1}/{steps} loss {np.mean(hist[-every:]):.4f} {info} "
                  f"cpu {stage.cpu_s():.0f}s", flush=True)
            stage.save_partial({"step": step + 1, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                                "opt": opt.state_dict(), **({"average": average} if average is not None else {}),
                                "modules": {k: m.state_dict() for k, m in modules.items()}})
    if average is not None:
        for k, m in modules.items():
            m.load_state_dict(average[k])
    return {"final_loss": float(np.mean(hist[-every:])) if hist else None}


@torch.no_grad()
def _update_average(average: dict, modules: dict[str, nn.Module], decay: float) -> None:
    for k, m in modules.items():
        for n, t in m.state_dict().items():
            if t.is_floating_point():
                average[k][n].mul_(decay).add_(t, alpha=1 - decay)
            else:
                average[k][n].copy_(t)


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------
def stage_semantic(work: Path) -> None:
    stage = Stage(work, "semantic")
    if stage.done:
        return
    preset = nano_preset()
    enc, dec, pixel = build_tokenizer_modules(preset)
    quant = pixel.semantic_quantizer
    train, _ = data.split()
    modules = {"semantic_encoder": enc, "semantic_decoder": dec, "semantic_quantizer": quant}
    params = [p for m in modules.values() for p in m.parameters()]

    def step_fn(step, rng):
        x = random_batch(rng, train, SEMANTIC_BATCH)
        q, idx, commit = quantize(quant, enc(x))
        pred = dec(q.flatten(2).transpose(1, 2))
        rec = F.mse_loss(pred, cell_target(x))
        return rec + commit, f"rec {rec.item():.4f} codes {len(torch.unique(idx))}"

    extra = _train_loop(stage, modules, params, SEMANTIC_STEPS, 3e-3, step_fn)
    stage.finish({"modules": {k: m.state_dict() for k, m in modules.items()}}, extra)


def load_tokenizer_state(work: Path):
    """(semantic encoder, semantic decoder, DualViTokPixel) with every finished stage's weights."""
    preset = nano_preset()
    enc, dec, pixel = build_tokenizer_modules(preset)
    sem = torch.load(work / "semantic.pt", weights_only=True)["modules"]
    enc.load_state_dict(sem["semantic_encoder"])
    dec.load_state_dict(sem["semantic_decoder"])
    pixel.semantic_quantizer.load_state_dict(sem["semantic_quantizer"])
    if (work / "pixel.pt").is_file():
        pix = torch.load(work / "pixel.pt", weights_only=True)["modules"]["pixel"]
        pixel.load_state_dict(pix)
    return enc.eval(), dec.eval(), pixel.eval()


@torch.no_grad()
def semantic_codes(enc: SemanticEncoder, quantizer, images: torch.Tensor) -> torch.Tensor:
    return quantizer.nearest_indices(enc(images))


def stage_pixel(work: Path) -> None:
    stage = Stage(work, "pixel")
    if stage.done:
        return
    from illume_rt.export.networks.dualvitok import merge_quants

    enc, _, pixel = load_tokenizer_state(work)
    for p in list(enc.parameters()) + list(pixel.semantic_quantizer.parameters()):
        p.requires_grad_(False)
    pixel.train()
    train, _ = data.split()
    trainable = [pixel.pixel_encoder, pixel.pixel_quant_conv, pixel.pixel_quantizer, pixel.pixel_post_quant_conv,
                 pixel.pixel_decoder]
    params = [p for m in trainable for p in m.parameters()]
    total = PIXEL_CROP_STEPS + PIXEL_FULL_STEPS

    def step_fn(step, rng):
        full = step >= PIXEL_CROP_STEPS
        n = 4 if full else PIXEL_BATCH
        x = random_batch(rng, train, n)
        with torch.no_grad():
            q_sem = pixel.semantic_quantizer.indices_to_codes(semantic_codes(enc, pixel.semantic_quantizer, x))
            sem_up = F.interpolate(q_sem, size=(16, 16), mode="bicubic", align_corners=False)  # as merge_quants
        if full:
            crops, sem_crop = x, sem_up
        else:
            g = CROP_CELLS
            rows, cols = rng.integers(0, 16 - g + 1, n), rng.integers(0, 16 - g + 1, n)
            crops = torch.stack([x[i, :, 16 * r:16 * (r + g), 16 * c:16 * (c + g)] for i, (r, c) in
                                 enumerate(zip(rows, cols))])
            sem_crop = torch.stack([sem_up[i, :, r:r + g, c:c + g] for i, (r, c) in enumerate(zip(rows, cols))])
        z = pixel.encode_pixel(crops)
        q, idx, commit = quantize(pixel.pixel_quantizer, z)
        quant = torch.cat([sem_crop, q], dim=1)  # merge_quants with the semantic map already resized and cropped
        rec = pixel.pixel_decoder(pixel.pixel_post_quant_conv(quant), quant)
        l1 = F.l1_loss(rec, crops)
        loss = l1 + F.mse_loss(rec, crops) + commit
        return loss, f"l1 {l1.item():.4f} codes {len(torch.unique(idx))}{' full' if full else ''}"

    del merge_quants
    extra = _train_loop(stage, {"pixel": pixel}, params, total, 2e-3, step_fn, every=10)
    stage.finish({"modules": {"pixel": pixel.state_dict()}}, extra)


@torch.no_grad()
def stage_tokens(work: Path) -> None:
    stage = Stage(work, "tokens")
    if stage.done:
        return
    from illume_rt.nano import score

    enc, _, pixel = load_tokenizer_state(work)
    train, held = data.split()
    if SMOKE:
        train, held = train[:8], held[:8]
    out = {}
    for name, scenes in (("train", train), ("held", held)):
        sem, pix, vit, penc = [], [], [], []
        for k0 in range(0, len(scenes), 16):
            chunk = scenes[k0:k0 + 16]
            x = torch.from_numpy(np.concatenate([data.to_model_input(data.render(s)) for s in chunk]))
            feats = enc.features(x)  # the MLLM's semantic input, and (through proj) the semantic codes
            z = enc.proj(feats).transpose(1, 2).reshape(len(chunk), -1, 9, 9)
            sem.append(pixel.semantic_quantizer.nearest_indices(z))
            h = pixel.pixel_encoder(x)  # the MLLM's pixel input, and (through quant conv) the pixel codes
            pix.append(pixel.pixel_quantizer.nearest_indices(pixel.pixel_quant_conv(h)))
            vit.append(feats)
            penc.append(h.flatten(2).transpose(1, 2))
            print(f"[tokens] {name} {k0 + len(chunk)}/{len(scenes)} cpu {stage.cpu_s():.0f}s", flush=True)
        out[name] = {"scenes": [s.__dict__ for s in scenes], "semantic": torch.cat(sem), "pixel": torch.cat(pix),
                     "vit": torch.cat(vit), "pixel_features": torch.cat(penc),
                     "und_scene": torch.arange(len(scenes))}
    # Tokenizer round trip on the held-out canonical pictures: the ceiling for generated pictures.
    rec = pixel.decode_code(out["held"]["semantic"], out["held"]["pixel"])
    imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    marks = [score.score_picture(im, {a: getattr(s, a) for a in data.ATTRIBUTES}) for im, s in zip(imgs, held)]
    recon = score.summarize(marks)
    usage = {"semantic_codes_used": int(len(torch.unique(out["train"]["semantic"]))),
             "pixel_codes_used": int(len(torch.unique(out["train"]["pixel"])))}
    print(f"[tokens] tokenizer round trip on held-out pictures: {recon} {usage}")
    stage.finish(out, {"roundtrip_accuracy_held_out": recon, **usage})


# -- MLLM ----------------------------------------------------------------------------------------------------------
def nano_tokenizer(preset):
    from illume_rt.nano.text_tokenizer import NanoTokenizer

    return NanoTokenizer(preset.vocab)


def short_caption_allowed(scenes: list[data.Scene]) -> list[bool]:
    """Per scene: may it train on its short caption? Only where ``scenes`` show its context (all but the size) at
    every size: elsewhere the short form ties the context to its one trained size, which a held-out scene of that
    context must then draw against its size word (see FULL_CAPTION_P)."""
    return [data.trained_sizes(s, scenes) == set(data.SIZES) for s in scenes]


def t2i_prompt(scene: data.Scene, short_allowed: bool, r: float) -> str | None:
    """The prompt of a text-to-image example, from ``r`` uniform in [0, 1): none (the unconditional row) UNCOND_P of
    the time, else the full caption FULL_CAPTION_P of the rest, else the short one if ``short_allowed``."""
    if r < UNCOND_P:
        return None
    if short_allowed and r >= UNCOND_P + (1 - UNCOND_P) * FULL_CAPTION_P:
        return scene.short_caption
    return scene.caption


def t2i_example(preset, tok, scene: data.Scene, sem: torch.Tensor, pix: torch.Tensor, prompt: str | None):
    """(ids, labels): the prompt (``None``: the unconditional one), then the image tokens and <|im_end|>, built by
    the runtime's own prompt builder and image layout (training and inference see the same ids)."""
    from illume_rt.contract import image_grid
    from illume_rt.runtime.prompts import text_to_image_ids

    v = preset.vocab
    cond, uncond = text_to_image_ids(tok, v, prompt or "x", 256, 256)
    prefix = cond if prompt is not None else uncond
    image = v.image_token_ids(image_grid(256, 256), sem.tolist(), pix.tolist()) + [v.im_end_id]
    return prefix + image, [-100] * len(prefix) + image


def empty_codes(toks: dict, scenes: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per background, the (semantic, pixel) codes of its picture without the object: at each position the most
    common code over the training pictures on that background (an object covers a few per cent of them)."""
    out = {}
    for bg in data.BACKGROUNDS:
        rows = [i for i, s in enumerate(scenes) if s.background == bg]
        out[bg] = (toks["semantic"][rows].mode(0).values, toks["pixel"][rows].mode(0).values)
    return out


def erase_codes(codes: torch.Tensor, empty: torch.Tensor, share: float, rng: np.random.Generator) -> torch.Tensor:
    """``codes`` with a random ``share`` of the positions set to ``empty``'s code there (see FOCUS_STEPS)."""
    hit = torch.from_numpy(rng.random(tuple(codes.shape)) < share)
    return torch.where(hit, empty, codes)


SEM_SLOT, PIX_SLOT = -1, -2


def splice_image_slots(v, ids: list[int]) -> list[int]:
    """``ids`` with IMAGE_PLACEHOLDER replaced by a 256x256 picture's input block as the runtime lays it out
    (``contract.image_slots`` of ``multimodal.understanding_grid``), its features as slots (SEM_SLOT: ViT merger
    output per 28 px, PIX_SLOT: pixel-encoder output per 16 px; filled by embed_with_features)."""
    from illume_rt.contract import SEMANTIC, image_slots
    from illume_rt.runtime.multimodal import understanding_grid
    from illume_rt.runtime.prompts import IMAGE_PLACEHOLDER

    block = [v.token_id(slot.token) if slot.level is None else (SEM_SLOT if slot.level == SEMANTIC else PIX_SLOT)
             for slot in image_slots(understanding_grid(256, 256))]
    at = ids.index(IMAGE_PLACEHOLDER)
    return ids[:at] + block + ids[at + 1:]


def embed_with_features(embed, proj, ids: torch.Tensor, vit: torch.Tensor, pixel_features: torch.Tensor):
    """Token embeddings of ``ids`` with each row's slots filled by its picture's projected features."""
    emb = embed(ids.clamp(min=0)).clone()
    sem_feat = proj.projector_1(vit.to(ids.device))  # [B, 81, H]
    pix_feat = proj.projector_2(pixel_features.to(ids.device))  # [B, 256, H]
    emb[ids == SEM_SLOT] = sem_feat.reshape(-1, sem_feat.shape[-1])
    emb[ids == PIX_SLOT] = pix_feat.reshape(-1, pix_feat.shape[-1])
    return emb


def edit_example(preset, tok, instruction: str | None, sem: torch.Tensor, pix: torch.Tensor):
    """(ids with the input picture's slots, labels): the editing prompt (``None``: the unconditional one), then the
    output codes ``sem``/``pix`` and <|im_end|>, built by the runtime's own prompt builder (``editing_ids``)."""
    from illume_rt.contract import image_grid
    from illume_rt.runtime.prompts import editing_ids

    v = preset.vocab
    prefix = splice_image_slots(v, editing_ids(tok, v, instruction, 256, 256)[0])  # None: the reconstruct prompt
    image = v.image_token_ids(image_grid(256, 256), sem.tolist(), pix.tolist()) + [v.im_end_id]
    return prefix + image, [-100] * len(prefix) + image


def und_example(preset, tok, scene: data.Scene, rng: np.random.Generator):
    """(ids with feature slots, labels): the image, then the five questions in a random order as turns."""
    from illume_rt.runtime.prompts import understanding_ids

    v = preset.vocab
    qa = scene.qa()
    order = rng.permutation(len(qa))
    ids = splice_image_slots(v, understanding_ids(tok, v, qa[order[0]][0]))
    labels = [-100] * len(ids)
    for n, k in enumerate(order):
        q, a = qa[k]
        if n:
            turn = [v.im_start_id] + tok.encode(f"user\n{q}") + [v.im_end_id] + tok.encode("\n") + [v.im_start_id] + \
                tok.encode("assistant\n")
            ids += turn
            labels += [-100] * len(turn)
        ans = tok.encode(a) + [v.im_end_id]
        ids += ans
        labels += ans
        ids += tok.encode("\n")
        labels += [-100]
    return ids, labels


@torch.no_grad()
def answers_right(llm, proj, preset, tok, split: dict) -> dict[str, float]:
    """Per question, the share of ``split``'s pictures (a tokens.pt split) whose answer greedy decoding gives: each
    question asked alone as the first turn, as the runtime asks it, and right when every answer token (and
    <|im_end|>) is the argmax after the right ones before it (teacher forcing: what greedy decoding emits). Logged
    at the end of every MLLM stage, so a run that does not learn to read shape or position shows it there (a
    from-scratch run answered shape and position at chance after ``focus``, nano/README.md "Measured")."""
    from illume_rt.runtime.prompts import understanding_ids

    v = preset.vocab
    scenes = [data.Scene(**s) for s in split["scenes"]]
    right: dict[str, list[bool]] = {q: [] for q in data.QUESTIONS}
    was_training = llm.training, proj.training
    llm.eval()
    proj.eval()
    embed = llm.get_input_embeddings()
    for q_index, question in enumerate(data.QUESTIONS):
        prefix = splice_image_slots(v, understanding_ids(tok, v, question))  # the same for every picture
        for k0 in range(0, len(scenes), 32):
            rows = range(k0, min(len(scenes), k0 + 32))
            seqs = []
            for i in rows:
                answer = tok.encode(scenes[i].qa()[q_index][1]) + [v.im_end_id]
                seqs.append((prefix + answer, [-100] * len(prefix) + answer))
            ids, labels, mask = pad_batch(seqs, v.pad_id)
            feats = torch.tensor(list(rows))
            emb = embed_with_features(embed, proj, ids, split["vit"][feats], split["pixel_features"][feats])
            guess = llm(inputs_embeds=emb, attention_mask=attention_mask_for(mask)).logits[:, :-1].argmax(-1)
            wanted = labels[:, 1:]
            right[question] += ((guess == wanted) | (wanted == -100)).all(1).tolist()
    llm.train(was_training[0])
    proj.train(was_training[1])
    return {q: round(float(np.mean(r)), 4) for q, r in right.items()}


def pad_batch(seqs, pad_id: int):
    """(ids, labels, mask) of ``seqs`` ((ids, labels) pairs), padded at their ends, on DEVICE."""
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (a, b) in enumerate(seqs):
        ids[i, :len(a)] = torch.tensor(a)
        labels[i, :len(b)] = torch.tensor(b)
        mask[i, :len(a)] = 1
    return ids.to(DEVICE), labels.to(DEVICE), mask.to(DEVICE)


def attention_mask_for(mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask to give the LLM for a batch whose padding is ``mask`` (1: a real token): None when every
    row is padded at its end only, as pad_batch pads. The causal mask alone then hides the padding from every real
    position, since each pad comes after them all, and the positions count from 0 either way, so every real
    position's output is the same up to the order of float sums; only the pad positions change, and no label is
    read there. Without a mask SDPA runs its causal kernel, which skips the masked half of the scores instead of
    reading a padding mask over all of them: a ``focus`` step 1.14x faster on this machine, while ``edit``'s, whose
    rows differ less in length, showed no change within the machine's noise
    (bench/results/20261202-nano-causal-30-steps). Any other padding keeps its mask."""
    return None if torch.equal(mask.cummin(dim=1).values, mask) else mask


def lm_loss(llm, embeds: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, hard_weight: float = 0.0,
            slot_codes: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the labelled tokens: the plain mean, or with ``hard_weight`` > 0 the mean
    weighted by 1 + hard_weight * (1 - p)^2 (see FOCUS_STEPS). ``slot_codes`` (see SLOT_CODE_WEIGHT): plus
    SLOT_CODE_WEIGHT x the mean cross-entropy of each input feature slot's output against its own code."""
    logits = llm(inputs_embeds=embeds, attention_mask=attention_mask_for(mask)).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="none")
    w = (labels[:, 1:].reshape(-1) != -100).float()
    if hard_weight:
        w = w * (1 + hard_weight * (1 - torch.exp(-ce.detach())) ** 2)
    loss = (ce * w).sum() / w.sum().clamp(min=1e-6)
    if slot_codes is not None:
        loss = loss + SLOT_CODE_WEIGHT * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), slot_codes.reshape(-1),
                                                         ignore_index=-100)
    return loss


def slot_codes_for(v, ids: torch.Tensor, semantic: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor | None:
    """Per position of ``ids`` (a batch with feature slots, as embed_with_features fills them): the token id of the
    code its input cell has (``semantic`` [B, 81] / ``pixel`` [B, 256]: each row's picture's codes, in the slots'
    order), -100 elsewhere; None while SLOT_CODE_WEIGHT is 0 (the recipe: nothing is computed)."""
    if not SLOT_CODE_WEIGHT:
        return None
    out = torch.full_like(ids, -100)
    out[ids == SEM_SLOT] = (semantic.reshape(len(ids), -1).to(ids.device) + v.semantic_code_offset).reshape(-1)
    out[ids == PIX_SLOT] = (pixel.reshape(len(ids), -1).to(ids.device) + v.pixel_code_offset).reshape(-1)
    return out


ROW_INIT_STD = 0.02  # the embedding table's and LM head's random init (build_mllm, init_code_rows)


def build_mllm(preset):
    from illume_rt.export.llm import build_llm
    from illume_rt.export.networks.vision import build_projectors

    llm = build_llm(preset)
    with torch.no_grad():  # a trainable init (build_llm's wide random init is for parity tests)
        torch.manual_seed(SEED)
        llm.model.embed_tokens.weight.normal_(0.0, ROW_INIT_STD)
        llm.lm_head.weight.normal_(0.0, ROW_INIT_STD)
    return llm, build_projectors(preset)


# Stage ``mllm``'s start: the rows of the embedding table and LM head for image codes begin as what each code means
# (init_code_rows), weighted by this share against the random init, or stay random with 0 (the committed weights'
# recipe: its random stream is unchanged). Session 27's A/B from ``mllm`` afresh (1100 + 1500 steps) at 0.8 drew
# held-out pictures all right 51% of the time against 31%, but after the recipe's 3000 ``focus`` steps held-out
# shape and size were where earlier runs had them, and the finished chain's weights scored below the committed ones
# (nano/README.md, "Left out"): faster early, not further, so 0.
CODE_ROWS_FROM_MEANING = 0.0
# Input slots name their own codes: in every MLLM stage, each feature slot of an input picture (understanding, and
# an edit's source) is also trained to give, as its output, the code the tokenizer gives its cell (a semantic slot
# its semantic code, a pixel slot its pixel code: each a function of that one cell's features), weighted by this
# against the next-token loss; 0 in the recipe (nothing is computed, its random stream is unchanged). Why: an edit
# keeps a picture by writing each input cell's code back out, and nano does not learn to (nano/README.md,
# "Editing": with the edited picture's semantic codes given, its pixel codes still lose the shape of 26% of the
# edits). Taught at the input, the code is there for an output cell to read; never read at inference (the
# runtime samples no token at an input slot). Session 51's arm from ``focus`` at 0.5 in ``edit`` and ``polish``: the
# slots learned their codes, but edits got worse (41% right greedy against 52%, shape kept 49% against 61%) and so
# did drawing (held-out shape 81% against 87%; bench/results/20261206-nano-edit-arms), so 0.
SLOT_CODE_WEIGHT = 0.0


@torch.no_grad()
def init_code_rows(llm, preset, work: Path, share: float) -> None:
    """Start the image codes' rows of the embedding table and LM head from what each code shows: a semantic code
    its cell as the semantic decoder draws it (4x4 RGB), a pixel code its code vector, each standardised and sent
    through a fixed random projection to the LLM's width. Rows of codes that look alike then start alike, in the
    input and in the output, where random rows make every code an unrelated token. ``share`` of each row's
    (unit-RMS) direction is this, the rest the random init; the rows keep the init's scale (ROW_INIT_STD)."""
    _, dec, pixel = load_tokenizer_state(work)
    vocab = preset.vocab
    hidden = llm.config.hidden_size
    gen = torch.Generator().manual_seed(SEED + 7)
    for (lo, hi), meaning in ((vocab.semantic_range, dec(pixel.semantic_quantizer.lookup_table())),
                              (vocab.pixel_range, pixel.pixel_quantizer.lookup_table())):
        meaning = (meaning - meaning.mean(0)) / meaning.std(0).clamp(min=1e-6)
        rows = meaning @ torch.randn(meaning.shape[1], hidden, generator=gen)
        rows = rows / rows.pow(2).mean(1, keepdim=True).sqrt()
        for table in (llm.model.embed_tokens.weight, llm.lm_head.weight):
            random_part = table[lo:hi] / ROW_INIT_STD
            table[lo:hi] = ROW_INIT_STD * (share * rows + (1 - share ** 2) ** 0.5 * random_part)
    print(f"[mllm] image-code rows start from what the codes show (share {share})", flush=True)


def stage_mllm(work: Path) -> None:
    stage = Stage(work, "mllm")
    if not stage.done:
        _train_mllm(work, stage, MLLM_STEPS, 2e-3, init=None, hard_weight=0.0, und_batch=UND_BATCH)


def stage_focus(work: Path) -> None:
    stage = Stage(work, "focus")
    if not stage.done:
        _train_mllm(work, stage, FOCUS_STEPS, FOCUS_LR, init=work / "mllm.pt", hard_weight=HARD_WEIGHT,
                    und_batch=FOCUS_UND_BATCH, erase_max=ERASE_MAX)


def stage_edit(work: Path) -> None:
    stage = Stage(work, "edit")
    if not stage.done:
        _train_mllm(work, stage, EDIT_STEPS, EDIT_LR, init=work / "focus.pt", hard_weight=HARD_WEIGHT,
                    und_batch=LATER_UND_BATCH, erase_max=ERASE_MAX, t2i_batch=EDIT_T2I_BATCH,
                    edit_batch=EDIT_BATCH, pixel_erase_max=EDIT_PIXEL_ERASE_MAX)


def stage_polish(work: Path) -> None:
    stage = Stage(work, "polish")
    if not stage.done:
        _train_mllm(work, stage, POLISH_STEPS, POLISH_LR, init=work / "edit.pt", hard_weight=HARD_WEIGHT,
                    und_batch=LATER_UND_BATCH, erase_max=ERASE_MAX, edit_batch=POLISH_EDIT_BATCH)


def edit_pairs(scenes: list[data.Scene]) -> list[tuple[int, str, int]]:
    """(source index, instruction, edited index) for every edit of ``scenes`` whose result is among them too."""
    index = {s: i for i, s in enumerate(scenes)}
    return [(i, instruction, index[target]) for i, s in enumerate(scenes) for instruction, target in data.edits(s)
            if target in index]


def _train_mllm(work: Path, stage: Stage, steps: int, peak_lr: float, init: Path | None, hard_weight: float,
                und_batch: int, erase_max: float = 0.0, t2i_batch: int = T2I_BATCH, edit_batch: int = 0,
                pixel_erase_max: float | None = None) -> None:
    """Teacher forcing of the LLM + projectors from a fresh init or from ``init`` (a finished MLLM stage);
    ``hard_weight``: see lm_loss; ``erase_max`` / ``pixel_erase_max`` (default: the same): see FOCUS_STEPS;
    ``edit_batch``: see EDIT_STEPS; the captions' form: see FULL_CAPTION_P."""
    preset = nano_preset()
    tok = nano_tokenizer(preset)
    tokens = torch.load(work / "tokens.pt", weights_only=True)
    toks = tokens["train"]
    scenes = [data.Scene(**s) for s in toks["scenes"]]
    empty = empty_codes(toks, scenes)
    pairs = edit_pairs(scenes) if edit_batch else []
    short_ok = short_caption_allowed(scenes)
    pixel_erase_max = erase_max if pixel_erase_max is None else pixel_erase_max
    llm, proj = build_mllm(preset)
    if init is not None:
        state = torch.load(init, weights_only=True)["modules"]
        llm.load_state_dict(state["llm"])
        proj.load_state_dict(state["projectors"])
    elif CODE_ROWS_FROM_MEANING:
        init_code_rows(llm, preset, work, CODE_ROWS_FROM_MEANING)
    llm.to(DEVICE)
    proj.to(DEVICE)
    llm.config._attn_implementation = "sdpa"  # training only (same function as the eager path, faster)
    llm.train()
    proj.train()
    embed = llm.get_input_embeddings()
    pad = preset.vocab.pad_id

    def erased(i: int, rng):
        """Scene ``i``'s (semantic, pixel) codes as fed (see FOCUS_STEPS), drawn from ``rng``."""
        sem, pix = toks["semantic"][i], toks["pixel"][i]
        if erase_max:
            background = empty[scenes[i].background]
            share = rng.uniform(0, 1)
            sem = erase_codes(sem, background[0], share * erase_max, rng)
            pix = erase_codes(pix, background[1], share * pixel_erase_max, rng)
        return sem, pix

    def step_fn(step, rng):
        seqs, fed = [], []
        for i in rng.integers(0, len(scenes), t2i_batch):
            s = scenes[i]
            prompt = t2i_prompt(s, short_ok[i], rng.random())
            seqs.append(t2i_example(preset, tok, s, toks["semantic"][i], toks["pixel"][i], prompt))
            fed.append(t2i_example(preset, tok, s, *erased(i, rng), prompt))  # same layout: only codes differ
        ids, labels, mask = pad_batch(seqs, pad)
        inputs = pad_batch(fed, pad)[0]
        loss_t2i = lm_loss(llm, embed(inputs), labels, mask, hard_weight)
        info = f"t2i {loss_t2i.item():.3f}"
        loss = loss_t2i
        if edit_batch:
            seqs, fed, sources = [], [], []
            for k in rng.integers(0, len(pairs), edit_batch):
                src, instruction, dst = pairs[k]
                if rng.random() < EDIT_RECONSTRUCT_P:  # the reconstruct prompt: the source picture back
                    instruction, dst = None, src
                seqs.append(edit_example(preset, tok, instruction, toks["semantic"][dst], toks["pixel"][dst]))
                fed.append(edit_example(preset, tok, instruction, *erased(dst, rng)))
                sources.append(src)
            ids, labels, mask = pad_batch(seqs, pad)
            inputs = pad_batch(fed, pad)[0]
            sources = torch.tensor(sources)
            emb = embed_with_features(embed, proj, inputs, toks["vit"][sources], toks["pixel_features"][sources])
            loss_edit = lm_loss(llm, emb, labels, mask, hard_weight, slot_codes_for(
                preset.vocab, inputs, toks["semantic"][sources], toks["pixel"][sources]))
            info += f" edit {loss_edit.item():.3f}"
            loss = loss + loss_edit
        und = []
        feats = rng.integers(0, len(toks["und_scene"]), und_batch)
        for f in feats:
            und.append(und_example(preset, tok, scenes[int(toks["und_scene"][f])], rng))
        ids, labels, mask = pad_batch(und, pad)
        emb = embed_with_features(embed, proj, ids, toks["vit"][feats], toks["pixel_features"][feats])
        loss_und = lm_loss(llm, emb, labels, mask, slot_codes=slot_codes_for(
            preset.vocab, ids, toks["semantic"][feats], toks["pixel"][feats]))
        return loss + loss_und, f"{info} und {loss_und.item():.3f}"

    params = list(llm.parameters()) + list(proj.parameters())
    extra = _train_loop(stage, {"llm": llm, "projectors": proj}, params, steps, peak_lr, step_fn, every=10)
    extra["answers_right_held_out"] = answers_right(llm, proj, preset, tok, tokens["held"])
    print(f"[{stage.name}] held-out answers right (greedy): {extra['answers_right_held_out']}", flush=True)
    stage.finish({"modules": {"llm": llm.state_dict(), "projectors": proj.state_dict()}}, extra)


# -- diffusion decoder ---------------------------------------------------------------------------------------------
def stage_vae(work: Path) -> None:
    stage = Stage(work, "vae")
    if stage.done:
        return
    from illume_rt.export.networks.diffusion import build_diffusion
    from illume_rt.nano import decoder

    _, vae = build_diffusion(nano_preset())
    vae.train()
    train, _ = data.split()

    def pictures(rng, n):
        scenes = [train[i] for i in rng.integers(0, len(train), n)]
        x = np.concatenate([data.to_model_input(data.render(s, rng, size=decoder.OUTPUT_SIZE)) for s in scenes])
        return torch.from_numpy(x), scenes

    def step_fn(step, rng):
        full = step >= VAE_CROP_STEPS
        x, scenes = pictures(rng, 2 if full else VAE_BATCH)
        if not full:
            x = decoder.object_crops(x, scenes, VAE_CROP, rng)
        loss, l1 = decoder.vae_loss(vae, x)
        return loss, f"l1 {l1:.4f}{' full' if full else ''}"

    extra = _train_loop(stage, {"vae": vae}, list(vae.parameters()), VAE_CROP_STEPS + VAE_FULL_STEPS, VAE_LR,
                        step_fn, average_decay=VAE_AVERAGE_DECAY)  # the VAE now holds the average
    vae.eval()
    x, _ = pictures(np.random.default_rng(SEED + 1), 4 if SMOKE else 32)
    scaling_factor = 1.0 / float(decoder.latents(vae, x, 1.0).std())
    print(f"[vae] scaling_factor {scaling_factor:.4f}")
    stage.finish({"modules": {"vae": vae.state_dict()}, "scaling_factor": scaling_factor},
                 {**extra, "scaling_factor": scaling_factor})


def load_decoder_state(work: Path, with_unet: bool = True):
    """(unet, vae, scaling_factor) with the finished stages' weights (eval mode)."""
    from illume_rt.export.networks.diffusion import build_diffusion

    unet, vae = build_diffusion(nano_preset())
    state = torch.load(work / "vae.pt", weights_only=True)
    vae.load_state_dict(state["modules"]["vae"])
    if with_unet:
        unet.load_state_dict(torch.load(work / "decoder.pt", weights_only=True)["modules"]["unet"])
    return unet.eval(), vae.eval(), float(state["scaling_factor"])


def stage_decoder(work: Path) -> None:
    stage = Stage(work, "decoder")
    if stage.done:
        return
    from illume_rt.export.networks.diffusion import build_scheduler
    from illume_rt.nano import decoder

    enc, _, pixel = load_tokenizer_state(work)
    unet, vae, scaling_factor = load_decoder_state(work, with_unet=False)
    train, _ = data.split()
    pairs = 32 if SMOKE else DECODER_PAIRS
    maps, lats, shares = [], [], []
    for k0 in range(0, pairs, 16):  # the pairs are a pure function of SEED: a resumed stage recomputes them
        chunk = [train[k % len(train)] for k in range(k0, min(pairs, k0 + 16))]
        small, large = zip(*[decoder.jittered_pair(scene, SEED + k0 + i) for i, scene in enumerate(chunk)])
        maps.append(decoder.token_maps(enc, pixel, torch.from_numpy(np.concatenate([data.to_model_input(i)
                                                                                   for i in small]))))
        lats.append(decoder.latents(vae, torch.from_numpy(np.concatenate([data.to_model_input(i) for i in large])),
                                    scaling_factor))
        shares.append(torch.stack([decoder.object_share(img, scene) for img, scene in zip(large, chunk)]))
        print(f"[decoder] pairs {k0 + len(small)}/{pairs} cpu {stage.cpu_s():.0f}s", flush=True)
    maps, lats, weights = torch.cat(maps), torch.cat(lats), 1.0 + OBJECT_WEIGHT * torch.cat(shares)
    scenes = [train[k % len(train)] for k in range(pairs)]
    preset = nano_preset()
    scheduler = build_scheduler(preset)
    unet.train()
    cells = LATENT_CROP // 4  # map cells per crop side: the latent grid is 4x the map's (MAP_TO_LATENT)

    def step_fn(step, rng):
        full = step >= DECODER_CROP_STEPS
        idx = rng.integers(0, pairs, 4 if full else DECODER_BATCH)
        x0, m, w = lats[idx], maps[idx].clone(), weights[idx]
        if not full:
            corners = [decoder.crop_corner(scenes[i], m.shape[-1], cells, rng) for i in idx]
            latent_window = [(slice(4 * r, 4 * (r + cells)), slice(4 * c, 4 * (c + cells))) for r, c in corners]
            x0 = torch.stack([x0[i, :, rows, cols] for i, (rows, cols) in enumerate(latent_window)])
            w = torch.stack([w[i, :, rows, cols] for i, (rows, cols) in enumerate(latent_window)])
            m = torch.stack([m[i, :, r:r + cells, c:c + cells] for i, (r, c) in enumerate(corners)])
        m[torch.from_numpy(rng.random(len(idx)) < decoder.MAP_DROP_P)] = 0.0
        x_t, t, eps = decoder.noised(scheduler, x0, rng)
        err = (decoder.unet_call(preset, unet, x_t, t, m) - decoder.training_target(scheduler, x0, eps, t)) ** 2
        return (err * w).sum() / (w.sum() * err.shape[1]), "full" if full else ""

    extra = _train_loop(stage, {"unet": unet}, list(unet.parameters()), DECODER_CROP_STEPS + DECODER_FULL_STEPS,
                        DECODER_LR, step_fn)
    stage.finish({"modules": {"unet": unet.state_dict()}}, extra)


def stage_export(work: Path, out: Path) -> None:
    from illume_rt.nano.checkpoint import NanoWeights, write_checkpoint, write_decoder

    enc, dec, pixel = load_tokenizer_state(work)
    preset = nano_preset()
    llm, proj = build_mllm(preset)
    if not (work / "polish.pt").is_file():
        raise SystemExit(f"nano.train: {work} has no finished stage polish (the weights export from it): run "
                         "`python -m illume_rt.nano.train` (it skips the finished stages) or name the missing ones")
    if not (work / "decoder.pt").is_file():
        raise SystemExit(f"nano.train: {work} has no finished stage decoder (the diffusion decoder exports from it): "
                         "run `python -m illume_rt.nano.train vae decoder export`")
    state = torch.load(work / "polish.pt", weights_only=True)["modules"]
    llm.load_state_dict(state["llm"])
    proj.load_state_dict(state["projectors"])
    log = json.loads((work / "log.json").read_text())
    write_checkpoint(out, preset, llm.eval(), proj.eval(), enc, dec, pixel, training=log)
    unet, vae, scaling_factor = load_decoder_state(work)
    write_decoder(NanoWeights(out).decoder, unet, vae, scaling_factor, preset.diffusion.scheduler)
    print(f"[export] wrote {out}")


SEEDED_STAGES = ("semantic", "pixel", "mllm", "vae", "decoder")  # what --seed-from writes


def seed_from_weights(work: Path, weights: Path) -> None:
    """Write the finished states of SEEDED_STAGES from a committed ``weights/`` folder (as the stages left them when
    it was exported), so that later stages can be retrained on them alone: a few CPU minutes instead of the whole
    recipe on a busy machine. Stage ``tokens`` is recomputed from them as usual; ``--redo`` drops what is retrained
    (``--redo mllm`` keeps the tokenizer and the diffusion decoder, which are not built on it)."""
    from safetensors.torch import load_file

    from illume_rt.export.checkpoints import open_weights
    from illume_rt.export.networks.vision import PROJECTOR_PREFIX
    from illume_rt.nano.checkpoint import NanoWeights

    def diffusers_state(part: str) -> dict:  # read as the runtime's checkpoint loader reads the decoder
        source = open_weights(diffusion / part, "diffusion_pytorch_model", f"{diffusion} ({part})")
        return {name: source.get(name) for name in source.shapes}

    folder = NanoWeights(weights)
    tok_state = torch.load(folder.dualvitok, weights_only=True)
    part = {name: {k[len(name) + 1:]: v for k, v in tok_state.items() if k.startswith(name + ".")}
            for name in ("semantic_encoder", "semantic_decoder", "semantic_quantizer")}
    pixel = {k: v for k, v in tok_state.items() if not k.startswith(("semantic_encoder.", "semantic_decoder."))}
    mllm = load_file(str(folder.mllm / "model.safetensors"))
    llm = {k: v for k, v in mllm.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
    proj = {k[len(PROJECTOR_PREFIX):]: v for k, v in mllm.items() if k.startswith(PROJECTOR_PREFIX)}
    log = json.loads((weights / "training.json").read_text())
    states = {"semantic": {"modules": part}, "pixel": {"modules": {"pixel": pixel}},
              "mllm": {"modules": {"llm": llm, "projectors": proj}}}
    diffusion = folder.decoder
    if (diffusion / "model_index.json").is_file():  # weights older than the diffusion decoder have none
        vae_config = json.loads((diffusion / "vae" / "config.json").read_text())
        states["vae"] = {"modules": {"vae": diffusers_state("vae")},
                         # what the vae stage measured; the export wrote it to the VAE's config
                         "scaling_factor": float(vae_config["scaling_factor"])}
        states["decoder"] = {"modules": {"unet": diffusers_state("unet")}}
    work.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        torch.save({**state, "cpu_s": log.get(name, {}).get("cpu_s", 0.0)}, work / f"{name}.pt")
        (work / f"{name}.partial.pt").unlink(missing_ok=True)
    update_log(work, {k: {**v, "seeded_from": str(weights)} for k, v in log.items() if k in states})
    print(f"[seed] {', '.join(states)} states from {weights}")


# The stages a second process trains while this one trains the MLLM's (``--jobs 2``): ``vae`` is built on nothing
# and ``decoder`` on ``vae`` and the tokenizer (BUILT_ON), so the second process starts with the command and its
# ``decoder`` waits for this process's ``pixel`` (wait_for_states). Started only once the tokenizer was trained
# (until session 46), it ended about 780 s after ``focus`` at session 45's ``vae``, and ``edit`` waited for it;
# started with the command, it ends about 510 s after ``focus``, and the command took 183 s less with weights bit
# for bit the same (bench/results/20261205-nano-one-command-session47).
SIDE_CHAIN = ("vae", "decoder")
TOKENIZER_STAGES = ("semantic", "pixel")  # what the side chain needs from this process's chain
# The MLLM stages after the side chain: its stages end near the end of ``focus`` or after it (session 21: at step
# 2000 of 3000; since session 45's ``vae``, about 510 s after it even when started with the command, as timed in
# session 47), leaving the second core idle for the rest, so these train on two threads (an edit step 1.21x faster,
# medians of 3 interleaved rounds, bench/results/20261202-nano-late-threads). The count is fixed per stage, not
# raised when the side chain ends, because torch's sums depend on the thread count (the weights differ at ~1e-6):
# the weights of a run must not depend on its timing. This process waits for the side chain before them, so that
# three threads never share two cores.
TWO_THREAD_STAGES = ("edit", "polish")
# The state each training stage starts from (export and sampling keep no state of their own).
BUILT_ON = {"semantic": (), "pixel": ("semantic",), "tokens": ("pixel",), "mllm": ("tokens",), "focus": ("mllm",),
            "edit": ("focus",), "polish": ("edit",), "vae": (), "decoder": ("vae", "pixel")}


def redo_stages(redo: list[str]) -> list[str]:
    """The stages whose states ``--redo`` must drop: those named and every training stage built on them, directly
    or not (redoing ``focus`` redoes ``edit`` and ``polish``; the diffusion decoder is built on the tokenizer
    only, so it is not retrained when the MLLM is)."""
    out = set(redo)
    changed = True
    while changed:
        grown = out | {s for s, bases in BUILT_ON.items() if out.intersection(bases)}
        changed, out = grown != out, grown
    return sorted(out, key=STAGES.index)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stages", nargs="*", help=f"any of {', '.join(STAGES)} (default: all, in order)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("ILLUME_NANO_WORK", DEFAULT_WORK)))
    ap.add_argument("--out", type=Path, default=HERE / "weights")
    ap.add_argument("--redo", action="append", default=[], choices=STAGES)
    ap.add_argument("--seed-from", type=Path, default=None, metavar="WEIGHTS",
                    help=f"first write the finished {', '.join(SEEDED_STAGES)} stages from a weights/ folder "
                         "(retrain only what follows them, and what --redo names)")
    ap.add_argument("--focus-steps", type=int, default=None,
                    help=f"steps of stage focus (default {FOCUS_STEPS}); pass the same value again to resume it, "
                         "the learning-rate schedule depends on it")
    ap.add_argument("--seed", type=int, default=RECIPE_SEED,
                    help=f"the seed of every stage (default {RECIPE_SEED}, the committed weights'); another seed "
                         "trains another draw of the same recipe, in a --work folder of its own")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads per process (edit and polish: at least 2 where two cores are usable)")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                    help="processes: 2 trains the diffusion decoder's stages beside the MLLM's (one core each)")
    ap.add_argument("--wait-for", action="append", default=[], choices=TOKENIZER_STAGES,
                    help=argparse.SUPPRESS)  # the side chain's process: see wait_for_states
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help=f"where the MLLM stages ({', '.join(MLLM_STAGES)}) train; the others train on the CPU. On "
                         "a GPU a draw is not bit-identical from run to run")
    args = ap.parse_args(argv)
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    if SMOKE:
        g = globals()
        for name in ("SEMANTIC_STEPS", "PIXEL_CROP_STEPS", "PIXEL_FULL_STEPS", "MLLM_STEPS", "FOCUS_STEPS",
                     "EDIT_STEPS", "POLISH_STEPS", "VAE_CROP_STEPS", "VAE_FULL_STEPS", "DECODER_CROP_STEPS",
                     "DECODER_FULL_STEPS"):
            g[name] = 2
    if args.focus_steps:
        globals()["FOCUS_STEPS"] = args.focus_steps
    globals()["SEED"] = args.seed
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("nano.train: --device cuda, but this torch sees no CUDA GPU (torch.cuda.is_available() is "
                         "False): install a CUDA build of torch, or leave --device out to train on the CPU")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.seed_from is not None:
        seed_from_weights(args.work, args.seed_from)
    redone = redo_stages(args.redo)
    refuse_other_seeds(args.work, redone)  # before --redo deletes anything: a refused run changes nothing
    for name in redone:
        if name not in args.redo and (args.work / f"{name}.pt").is_file():
            print(f"[redo] {name} too: it was trained on a stage that is redone")
        (args.work / f"{name}.pt").unlink(missing_ok=True)
        (args.work / f"{name}.partial.pt").unlink(missing_ok=True)
    stages = [name for name in STAGES if name in (args.stages or STAGES)]  # in dependency order
    done = {name for name in STAGES if (args.work / f"{name}.pt").is_file()}
    side = side_chain(stages, done, args.jobs)
    side_process = None
    try:
        if side:  # at once: ``vae`` needs nothing from this process, ``decoder`` waits for the tokenizer it trains
            side_process = start_side_chain(args, side, [s for s in TOKENIZER_STAGES if s in stages and s not in done])
        for name in stages:
            if name in side:
                continue
            wait_for_states(args.work, [s for s in BUILT_ON.get(name, ()) if s in args.wait_for])
            if side_process is not None and (name in ("export", "sampling") or name in TWO_THREAD_STAGES
                                             or side_process.poll() is not None):
                finish_side_chain(side_process)  # before what reads its states or needs its core, or once it failed
                side_process = None
            torch.set_num_threads(stage_threads(name, args.threads))
            globals()["DEVICE"] = torch.device(args.device if name in MLLM_STAGES else "cpu")
            run_stage(name, args)
        if side_process is not None:
            finish_side_chain(side_process)
            side_process = None
    finally:
        if side_process is not None and side_process.poll() is None:  # this process failed or was interrupted
            side_process.terminate()  # its stage resumes from its last checkpoint next time
            side_process.wait()
    return 0


def refuse_other_seeds(work: Path, redone: tuple[str, ...] | list[str] = ()) -> None:
    """Stop with one line when a finished stage in ``work`` that is not ``redone`` was trained with another seed
    than SEED: the stages built on it would mix two draws. States written by ``--seed-from`` are exempt (the user
    chose them), and log entries from before ``--seed`` existed were trained with the recipe's."""
    log_path = work / "log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    for name in (s for s in STAGES if s not in redone):
        entry = log.get(name, {})
        seed = entry.get("seed", RECIPE_SEED)
        if (work / f"{name}.pt").is_file() and "seeded_from" not in entry and seed != SEED:
            raise SystemExit(f"nano.train: stage {name} in {work} was trained with seed {seed}, not {SEED}: pass "
                             f"--seed {seed} to go on with that run, or give seed {SEED} a --work folder of its own")


def side_chain(stages: list[str], done: set[str], jobs: int) -> list[str]:
    """The SIDE_CHAIN stages of ``stages`` that a second process trains: those not ``done``, when there are MLLM
    stages to do beside them and ``jobs`` allows two processes (else none: one process runs everything in order)."""
    side = [name for name in SIDE_CHAIN if name in stages and name not in done]
    mllm_chain = [name for name in stages if name in BUILT_ON and name not in SIDE_CHAIN and name not in done]
    return side if jobs >= 2 and mllm_chain else []


def start_side_chain(args, side: list[str], wait_for: list[str] = ()):
    """A second process training the SIDE_CHAIN stages ``side`` on the same work folder, one thread; a stage of it
    built on a stage in ``wait_for`` (which this process is to train) waits for that stage's finished state."""
    import subprocess

    waits = f" ({', '.join(wait_for)} from this one when needed)" if wait_for else ""
    print(f"[side] {', '.join(side)} in a second process{waits}", flush=True)
    return subprocess.Popen([sys.executable, "-m", "illume_rt.nano.train", *side, "--work", str(args.work),
                             "--threads", str(args.threads), "--seed", str(SEED), "--jobs", "1",
                             *(f"--wait-for={name}" for name in wait_for)], preexec_fn=end_with_parent)


def wait_for_states(work: Path, names, poll_s: float = 5.0) -> None:
    """Return once the finished states of ``names`` are in ``work`` (written whole by Stage.finish, so a state that
    is there is complete). The side chain starts with the command and trains ``vae``, which is built on nothing,
    while the first process trains the tokenizer; ``decoder`` then waits here for it. If the first process fails
    first, it ends this one (main's cleanup, or PR_SET_PDEATHSIG)."""
    missing = [name for name in names if not (work / f"{name}.pt").is_file()]
    if missing:
        print(f"[side] waiting for {', '.join(missing)} from the first process", flush=True)
    while any(not (work / f"{name}.pt").is_file() for name in names):
        time.sleep(poll_s)


def end_with_parent() -> None:
    """In a child process, before it runs: have the kernel send it SIGTERM when its parent ends, however the parent
    ends (Linux's PR_SET_PDEATHSIG). The side chain's process must not outlive the command: killed with SIGKILL,
    the command's own cleanup (``main``'s ``finally``) never runs, and an orphaned side chain would go on training in
    the background, into the work folder the next run also trains into. Its last checkpoint stays, and the next run
    resumes from it. Elsewhere (no prctl) nothing is done."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def finish_side_chain(process) -> None:
    if process.wait() != 0:
        raise SystemExit(f"nano.train: the diffusion decoder's stages ({', '.join(SIDE_CHAIN)}) failed (exit code "
                         f"{process.returncode}, their output is above); run `python -m illume_rt.nano.train` again: "
                         "finished stages are skipped and an interrupted one resumes")


def stage_threads(name: str, threads: int) -> int:
    """The threads stage ``name`` trains on: ``threads`` (``--threads``), at least 2 in TWO_THREAD_STAGES where the
    process may use two cores."""
    if name in TWO_THREAD_STAGES:
        return max(threads, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    return threads


def run_stage(name: str, args) -> None:
    if name == "export":
        stage_export(args.work, args.out)
    elif name == "sampling":  # the exported model's sampling defaults (nano/choose_sampling.py), into --out
        from illume_rt.nano import choose_sampling

        choose_sampling.main(["--weights", str(args.out), "--threads", str(args.threads), "--jobs", str(args.jobs)]
                             + (["--limit", "2"] if SMOKE else []))
    else:
        globals()[f"stage_{name}"](args.work)


if __name__ == "__main__":
    import signal

    # `kill PID` ends the command through its cleanup: main's finally stops the side chain's process
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    raise SystemExit(main())

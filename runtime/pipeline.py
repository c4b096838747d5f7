"""The Python API: ``Pipeline.from_bundle(path).generate(prompt)``. numpy + onnxruntime only.

Concurrency (docs/runtime.md): one Pipeline may be shared by threads. Everything a call changes (KV cache, logits
buffers, random generator, timings) belongs to the call; the engines are shared and only read. On ort-cpu calls run
in parallel (onnxruntime sessions are thread-safe; each thread binds its own IO); the GPU backends keep device
buffers per engine, so there calls on one Pipeline take turns.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from illume_rt.contract import (GRAPH_IO, HEADS, PIXEL, SEMANTIC, LayoutError, edit_anchors, head_component,
                                image_grid)
from illume_rt.engines.base import BackendError, Engine
from illume_rt.files import save_image
from illume_rt.runtime.bundle import Bundle, BundleError, load_bundle
from illume_rt.runtime.generate import (ImageGenerator, ImageTokens, LanguageModel, LogitsProcessor,
                                        generate_image_tokens, generate_images_tokens, generate_text)
from illume_rt.runtime.images import (UNDERSTANDING_MAX_PIXELS, UNDERSTANDING_MIN_PIXELS, load_image, pad_to_anchor,
                                      smart_resize, understanding_image, unpad_and_resize_back)
from illume_rt.runtime.options import (SamplingConfig, check_prompts, check_seed, check_threads,
                                      model_sampling_defaults)
from illume_rt.runtime.multimodal import ImageEncoder, image_block, image_block_length, splice
from illume_rt.runtime.prompts import editing_ids, text_to_image_ids, understanding_ids
from illume_rt.runtime.refine import RefineConfig, Refiner, model_refine_defaults
from illume_rt.runtime.tokenizer import load_tokenizer

UNDERSTAND_MAX_NEW_TOKENS = 1024
# understand() shrinks the image until this many answer tokens fit the context after the prompt
UNDERSTAND_MIN_ANSWER_TOKENS = 32

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")


def open_engine(bundle: Bundle, name: str, backend: str, threads: int | None,
                trt_precision: str | None = None) -> Engine:
    """Component ``name`` of ``bundle`` on ``backend``; its inputs and outputs must be the manifest's."""
    entry = bundle.component(name)
    if backend == "ort-cpu":
        from illume_rt.engines.ort import OrtEngine

        engine = OrtEngine(name, bundle.component_path(name), backend, threads,
                           emulate_fp8=entry.get("precision") == "fp8")
    elif backend == "ort-cuda":
        from illume_rt.engines.ort_cuda import OrtCudaEngine  # device buffers, IO binding

        engine = OrtCudaEngine(name, bundle.component_path(name), threads,
                               emulate_fp8=entry.get("precision") == "fp8")
    elif backend == "tensorrt":
        from illume_rt.engines import tensorrt as trt_backend  # optional, needs the tensorrt package

        engine = trt_backend.open_engine(bundle, name, trt_precision)
    else:
        raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    want = ([t["name"] for t in entry["inputs"]], [t["name"] for t in entry["outputs"]])
    if (sorted(engine.input_names), sorted(engine.output_names)) != (sorted(want[0]), sorted(want[1])):
        raise BundleError(f"graph {name} has inputs {engine.input_names} and outputs {engine.output_names}, the "
                          f"manifest says {want[0]} -> {want[1]}; re-export the bundle")
    return engine


class EngineSet:
    """The bundle's engines by component name, each opened on first use (start-up stays fast: text generation never
    loads the code rows of the head, image generation never the largest, text rows), once even when threads ask
    together. ``Pipeline.replace_engine`` swaps one (calibration, benchmarks)."""

    def __init__(self, opener: Callable[[str], Engine]) -> None:
        self._opener = opener
        self._open: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Engine:
        with self._lock:
            if name not in self._open:
                self._open[name] = self._opener(name)
            return self._open[name]

    def is_open(self, name: str) -> bool:
        return name in self._open

    def opened(self) -> list[str]:
        """Names of the engines opened (or replaced) so far."""
        with self._lock:
            return list(self._open)

    def close(self, name: str) -> Engine | None:
        """Forget engine ``name`` (it is opened again on next use); returns it. Not while calls run."""
        with self._lock:
            return self._open.pop(name, None)

    def replace(self, name: str, engine: Engine) -> Engine | None:
        with self._lock:
            previous, self._open[name] = self._open.get(name), engine
        return previous


class HeadSlices(Mapping):
    """The LM head slices of an ``EngineSet`` by level name ("text", "semantic", "pixel"), opened when first used."""

    def __init__(self, engines: EngineSet) -> None:
        self._engines = engines

    def __getitem__(self, which: str) -> Engine:
        return self._engines[head_component(which)]

    def __contains__(self, which) -> bool:  # opened, not merely available
        return self._engines.is_open(head_component(which))

    def __iter__(self):
        return (w for w in HEADS if w in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class GenerationResult:
    image: np.ndarray  # uint8 [height, width, 3]
    tokens: ImageTokens
    timings: dict = field(default_factory=dict)  # seconds per stage
    seed: int | None = None
    refined: bool = False  # True when the image came from the diffusion decoder (2x size)
    notices: list[str] = field(default_factory=list)  # things the caller should know (e.g. an untrained size)

    def save(self, path: str | Path) -> Path:
        """Write the image atomically in the format of the extension (.png, .jpg, .webp); illume_rt/files.py."""
        return save_image(self.image, path)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8 (clamped, rounded)."""
    return np.round((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)


class Pipeline:
    """A bundle, opened on one backend. ``trt_precision`` picks among the TensorRT engines built for the bundle
    when there are several (``build-engines``); None takes the bundle's own."""

    def __init__(self, bundle: Bundle, backend: str = "ort-cpu", threads: int | None = None,
                 trt_precision: str | None = None) -> None:
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.bundle, self.backend, self.threads = bundle, backend, check_threads(threads)
        # GPU backends keep device buffers per engine (staging, execution contexts): their calls take turns
        self._call_lock = contextlib.nullcontext() if backend == "ort-cpu" else threading.Lock()
        self.vocab = bundle.vocab
        self.tokenizer = load_tokenizer(bundle.manifest["tokenizer"], bundle.path, self.vocab)
        self.engines = EngineSet(lambda name: open_engine(bundle, name, backend, self.threads, trt_precision))
        self.lm = LanguageModel(self.engines["llm"], HeadSlices(self.engines), bundle.table("embed_tokens"),
                                bundle.llm, self.vocab)
        self.engines["pixel_decoder"]  # every image task needs it: open it now, so a broken graph fails early
        self.semantic_codebook = bundle.table("semantic_codebook", on_demand=False)
        self.pixel_codebook = bundle.table("pixel_codebook", on_demand=False)

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                    verify: bool = True, trt_precision: str | None = None) -> "Pipeline":
        return cls(load_bundle(path, verify=verify), backend, threads, trt_precision)

    @property
    def random_weights(self) -> bool:
        return self.bundle.random_weights

    def replace_engine(self, name: str, engine: Engine) -> Engine | None:
        """Use ``engine`` for component ``name`` from now on (e.g. a wrapper that records or times the calls);
        returns the one it replaces. Not while calls run."""
        previous = self.engines.replace(name, engine)
        if name == "llm":
            self.lm.body = engine  # the loop takes the new body's step (engines/llm_step.py)
        return previous

    @contextlib.contextmanager
    def wrapped_engine(self, name: str, wrap: Callable[[Engine], Engine]):
        """``with pipe.wrapped_engine("llm", Recorder) as recorder:`` -- the engine wrapped for the block."""
        inner = self.engines[name]
        wrapper = wrap(inner)
        self.replace_engine(name, wrapper)
        try:
            yield wrapper
        finally:
            self.replace_engine(name, inner)

    @property
    def image_encoder(self) -> ImageEncoder:
        return ImageEncoder(self.engines["semantic_encoder"], self.engines["pixel_embedder"])

    def _diffusion(self) -> dict:
        """The manifest's diffusion entry, or the error that says the bundle has no diffusion decoder."""
        info = self.bundle.manifest.get("diffusion")
        if not info:
            raise BundleError(f"bundle {self.bundle.path} has no diffusion decoder; export one with --diffusion "
                              "(or drop --refine)")
        return info

    @property
    def refiner(self) -> Refiner:
        info = self._diffusion()
        return Refiner(self.engines["diffusion_unet"], self.engines["vae_decoder"], info["scheduler"])

    def code_embeddings(self, semantic: np.ndarray, pixel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Code grids -> channels-first embeddings [1, dim, rows, cols] through the codebook tables."""
        return (np.ascontiguousarray(self.semantic_codebook[semantic].transpose(2, 0, 1)[None]),
                np.ascontiguousarray(self.pixel_codebook[pixel].transpose(2, 0, 1)[None]))

    def decode_image(self, semantic: np.ndarray, pixel: np.ndarray) -> np.ndarray:
        """Code grids -> float image [3, H, W] in about [-1, 1] via the codebook tables and the pixel decoder."""
        semantic_embed, pixel_embed = self.code_embeddings(semantic, pixel)
        (image,) = self.engines["pixel_decoder"].run(dict(zip(GRAPH_IO["pixel_decoder"][0],
                                                              (semantic_embed, pixel_embed))))
        return image[0]

    def image_generator(self, prompt: str, resolution: tuple[int, int] = (256, 256), seed: int | None = 0,
                        sampling: SamplingConfig | None = None,
                        logits_processor: LogitsProcessor | None = None) -> ImageGenerator:
        """Text to image, step by step (runtime/generate.py ``ImageGenerator``): the host calls
        ``generate_next()`` (or ``compute_logits()`` and ``append(code)``) until ``done``, may call
        ``preview(generator)`` on the way, and ``image(generator)`` at the end. On the GPU backends, one generator
        of a Pipeline steps at a time (they share device buffers)."""
        sampling = sampling or self.default_sampling("text_to_image")
        sampling.validate()
        grid = image_grid(*resolution)
        cond, uncond = text_to_image_ids(self.tokenizer, self.vocab, prompt, *resolution)
        return ImageGenerator(self.lm, grid, cond, uncond, sampling, np.random.default_rng(check_seed(seed)),
                              logits_processor)

    def image(self, generator: ImageGenerator) -> np.ndarray:
        """The finished generator's picture: uint8 [height, width, 3] through the pixel decoder."""
        tokens = generator.result()
        return to_uint8(self.decode_image(tokens.semantic, tokens.pixel))

    def preview(self, generator: ImageGenerator) -> np.ndarray:
        """A coarse picture while the pixel codes stream: the complete semantic level with the pixel codes decoded
        so far, the others' embeddings zero, through the pixel decoder. uint8 [height, width, 3]."""
        grid = generator.grid
        semantic = generator.codes[SEMANTIC]
        if len(semantic) < grid.semantic_rows * grid.semantic_cols:
            raise LayoutError("no preview yet: the semantic level is not complete (preview once next_level is "
                              "PIXEL)")
        semantic_embed, _ = self.code_embeddings(np.asarray(semantic).reshape(grid.semantic_rows, grid.semantic_cols),
                                                 np.zeros((1, 1), dtype=np.int64))
        pixel_embed = np.zeros((grid.pixel_rows * grid.pixel_cols, self.pixel_codebook.shape[1]), np.float32)
        done = generator.codes[PIXEL]
        pixel_embed[:len(done)] = self.pixel_codebook[np.asarray(done, dtype=np.int64)]
        pixel_embed = np.ascontiguousarray(
            pixel_embed.reshape(grid.pixel_rows, grid.pixel_cols, -1).transpose(2, 0, 1)[None])
        (image,) = self.engines["pixel_decoder"].run(dict(zip(GRAPH_IO["pixel_decoder"][0],
                                                              (semantic_embed, pixel_embed))))
        return to_uint8(image[0])

    def refine_image(self, semantic: np.ndarray, pixel: np.ndarray, grid, config: RefineConfig,
                     rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """Code grids -> float image [3, 2H, 2W] through the token map and the diffusion decoder."""
        refiner = self.refiner  # first: a bundle without a diffusion decoder gets the message that says so
        semantic_embed, pixel_embed = self.code_embeddings(semantic, pixel)
        (token_map,) = self.engines["token_map"].run(dict(zip(GRAPH_IO["token_map"][0], (semantic_embed, pixel_embed))))
        return refiner.refine(token_map, grid, config, rng)

    def _finish(self, tokens: ImageTokens, grid, refine: RefineConfig | None, rng, start: float, seed
                ) -> GenerationResult:
        t0 = time.perf_counter()
        timings = dict(tokens.timings)
        if refine is None:
            image = self.decode_image(tokens.semantic, tokens.pixel)
            timings["image_decode"] = time.perf_counter() - t0
        else:
            image, refine_timings = self.refine_image(tokens.semantic, tokens.pixel, grid, refine, rng)
            timings.update(refine_timings)
            timings["image_decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        return GenerationResult(to_uint8(image), tokens, timings, seed, refined=refine is not None)

    def warm_up(self, resolutions=((256, 256),), refine: bool = False) -> dict[str, float]:
        """Run the image decoders once at each resolution's shapes (and, with ``refine``, the token map, one UNet
        step at the model's refine guidance and the VAE decoder), so that a product's first real call does not pay
        the backend's first-run costs: on onnxruntime CUDA the first run of a convolutional graph at a new shape
        searches cuDNN's algorithms (illume-nano's pixel decoder: 2.0 s the first time at 256x256, 4.7 ms after;
        bench/results/20261130-ort-cuda-h200). The LLM's steps are not warmed: its shapes change every step.
        Returns seconds per resolution ("HxW") and stage. Thread-safe."""

        grids = [image_grid(*resolution) for resolution in resolutions]  # LayoutError before any work
        if refine:
            self.refiner  # noqa: B018 -- a bundle without a diffusion decoder is refused before any work
        seconds: dict[str, float] = {}
        with self._call_lock:
            for grid in grids:
                key = f"{grid.height}x{grid.width}"
                semantic = np.zeros((grid.semantic_rows, grid.semantic_cols), np.int64)
                pixel = np.zeros((grid.pixel_rows, grid.pixel_cols), np.int64)
                t0 = time.perf_counter()
                self.decode_image(semantic, pixel)
                seconds[f"{key} pixel_decoder"] = time.perf_counter() - t0
                if refine:
                    t0 = time.perf_counter()
                    self.refine_image(semantic, pixel, grid, replace(self.default_refine(), steps=1),
                                      np.random.default_rng(0))
                    seconds[f"{key} refinement"] = time.perf_counter() - t0
        return seconds

    def check_refine(self, refine: RefineConfig | None) -> None:
        """Refuse, before any decoding, a refinement this bundle cannot run (no decoder, too many steps)."""
        if refine is None:
            return
        refine.validate()
        from illume_rt.runtime.scheduler import make_scheduler

        make_scheduler(self._diffusion()["scheduler"]).set_timesteps(refine.steps)  # SchedulerError names the limit

    @property
    def bundle_notices(self) -> list[str]:
        """Lines every result of this bundle carries: a quantized bundle that missed its accuracy gates (written
        with ``quantize --keep-failed`` for inspection) still runs, but its output is not what its FP32 source
        gives, and a product embedding the runtime would otherwise not know."""
        quantization = self.bundle.manifest.get("quantization") or {}
        if quantization.get("status", "passed") == "passed":
            return []
        return [f"this bundle missed its {quantization.get('precision', 'quantization')} accuracy gates (written "
                "with --keep-failed; its manifest's quantization.failures says which): expect output unlike its "
                "FP32 source's; re-quantize or use the FP32 bundle"]

    def default_sampling(self, task: str) -> SamplingConfig:
        """The sampling a call of ``task`` ('text_to_image', 'editing') gets when it passes none: the official
        defaults, or those the bundle's model declares (manifest ``model.sampling_defaults``; illume-nano's are
        chosen on its training split, nano/README.md)."""
        return model_sampling_defaults(self.bundle.manifest["model"].get("sampling_defaults"))[task]

    def default_refine(self) -> RefineConfig:
        """The refinement ``refine=pipe.default_refine()`` asks for: the official defaults (20 steps, guidance 2.0),
        or those the bundle's model declares for its diffusion decoder (manifest ``model.refine_defaults``;
        illume-nano's guidance is chosen on its training split, nano/README.md)."""
        return model_refine_defaults(self.bundle.manifest["model"].get("refine_defaults"))

    @property
    def edit_anchors(self) -> tuple[tuple[int, int], ...]:
        """The sizes ``edit`` pads an image to (contract.edit_anchors: the official anchors, or those a model
        that records its trained sizes was trained at)."""
        return edit_anchors(self.bundle.manifest["model"].get("trained_resolutions"))

    def resolution_notice(self, resolution: tuple[int, int]) -> str | None:
        """A line for a size the weights were not trained at (illume-nano records its sizes), else None."""
        trained = self.bundle.manifest["model"].get("trained_resolutions")
        if not trained or list(resolution) in trained:
            return None
        sizes = ", ".join(f"{h}x{w}" for h, w in trained)
        return (f"this model was trained at {sizes} only; at {resolution[0]}x{resolution[1]} expect scattered "
                "shapes (pass --resolution " + f"{trained[0][0]}x{trained[0][1]})")

    def generate(self, prompt: str | list[str], resolution: tuple[int, int] = (256, 256), seed: int | None = 0,
                 sampling: SamplingConfig | None = None, refine: RefineConfig | None = None,
                 on_token: Callable[[int], None] | None = None, num_images: int = 1):
        """Text to image. ``resolution`` is (height, width); ``on_token(level)`` is called per sampled code (per
        code position of all images, for several); ``refine`` runs the diffusion decoder (2x output) instead of the
        pixel decoder. Thread-safe.

        Several images: ``num_images`` per prompt, or a list of prompts (each ``num_images`` times), decode in one
        batch (2 rows per image with guidance) and come back as a list of results; image i (prompts in order,
        each prompt's images together) has seed ``seed + i`` and equals a call for it alone with that seed."""
        sampling = sampling or self.default_sampling("text_to_image")
        sampling.validate()
        seed = check_seed(seed)
        prompts = check_prompts(prompt, num_images, seed)
        self.check_refine(refine)
        grid = image_grid(*resolution)
        rows = [text_to_image_ids(self.tokenizer, self.vocab, text, *resolution) for text in prompts]
        seeds = [None if seed is None else seed + i for i in range(len(prompts))]
        notice = self.resolution_notice(resolution)
        with self._call_lock:
            rngs = [np.random.default_rng(s) for s in seeds]
            start = time.perf_counter()
            all_tokens = generate_images_tokens(self.lm, grid, rows, sampling, rngs, on_token)
            results = [self._finish(tokens, grid, refine, rng, start, s)
                       for tokens, rng, s in zip(all_tokens, rngs, seeds)]
        for result in results:
            result.notices += self.bundle_notices + ([notice] if notice else [])
        return results[0] if isinstance(prompt, str) and num_images == 1 else results

    def edit(self, image, instruction: str | None, seed: int | None = 0, sampling: SamplingConfig | None = None,
             refine: RefineConfig | None = None, on_token: Callable[[int], None] | None = None) -> GenerationResult:
        """Image editing: pad to the nearest anchor, generate there with the editing prompt (guided by the
        reconstruct prompt with the same image), then unpad and resize back to the input size. Thread-safe.
        ``instruction`` None asks for the picture back (the reconstruct prompt alone, on one row: guidance changes
        nothing): how much of a picture the model keeps, which bounds every edit (nano/README.md "Editing")."""
        from PIL import Image

        sampling = sampling or self.default_sampling("editing")
        sampling.validate()
        if instruction is None:  # both rows would be the reconstruct prompt: one row gives the same picture
            sampling = replace(sampling, guidance_scale=1.0)
        seed = check_seed(seed)
        self.check_refine(refine)
        source = load_image(image)
        padded, padding = pad_to_anchor(source, self.edit_anchors)
        grid = image_grid(*padding.anchor)
        cond_ids, uncond_ids = editing_ids(self.tokenizer, self.vocab, instruction, *padding.anchor)
        notice = self.resolution_notice(padding.anchor)
        with self._call_lock:
            start = time.perf_counter()
            block = image_block(self.lm, self.image_encoder.encode(understanding_image(padded)))
            cond, uncond = splice(self.lm, cond_ids, block), splice(self.lm, uncond_ids, block)
            encode_time = time.perf_counter() - start
            rng = np.random.default_rng(seed)
            tokens = generate_image_tokens(self.lm, grid, cond, uncond, sampling, rng, on_token)
            tokens.timings["image_encode"] = encode_time
            result = self._finish(tokens, grid, refine, rng, start, seed)
        out = Image.fromarray(result.image)
        if result.refined:  # the padding scales with the 2x output
            out = out.resize((padding.anchor[1], padding.anchor[0]), Image.LANCZOS)
        result.image = np.asarray(unpad_and_resize_back(out, padding))
        result.notices += self.bundle_notices + ([notice] if notice else [])
        return result

    def fit_understanding(self, image, prompt_positions: int, max_new_tokens: int
                          ) -> tuple[tuple[int, int], int, list[str]]:
        """(vision input size, answer tokens, notices) so that the prompt, the image and the answer fit the
        model's context: the image is scaled down (as smart_resize would with a smaller pixel budget) until at
        least UNDERSTAND_MIN_ANSWER_TOKENS answer tokens fit, then the answer is capped to what is left (the
        caller says so if the answer runs into that cap)."""
        room = self.lm.max_context - prompt_positions
        want = min(max_new_tokens, UNDERSTAND_MIN_ANSWER_TOKENS)
        size = smart_resize(image.height, image.width)
        first, budget = size, UNDERSTANDING_MAX_PIXELS
        while image_block_length(*size) + want > room:
            budget = min(int(size[0] * size[1] * 0.8), size[0] * size[1] - 1)
            smaller = smart_resize(image.height, image.width, max_pixels=max(budget, 1))
            if smaller == size or budget < UNDERSTANDING_MIN_PIXELS // 4:
                raise LayoutError(f"the question leaves no room for the image in the model's context of "
                                  f"{self.lm.max_context} positions; ask a shorter question")
            size = smaller
        notices = []
        if size != first:
            notices.append(f"the image was scaled to {size[1]}x{size[0]} (from {first[1]}x{first[0]}) to fit the "
                           f"model's context of {self.lm.max_context} positions")
        return size, min(max_new_tokens, room - image_block_length(*size)), notices

    def understand(self, image, question: str, max_new_tokens: int = UNDERSTAND_MAX_NEW_TOKENS,
                   on_text: Callable[[str], None] | None = None) -> "UnderstandingResult":
        """Greedy answer about an image; ``on_text`` receives the answer as it grows (streaming). Any photo fits:
        the image is scaled down and the answer capped to the context (``result.notices`` says so). Thread-safe."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise LayoutError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        source = load_image(image)
        ids = understanding_ids(self.tokenizer, self.vocab, question)
        size, limit, notices = self.fit_understanding(source, len(ids) - 1, max_new_tokens)
        with self._call_lock:
            start = time.perf_counter()
            pixels = understanding_image(source, size)
            encoded = self.image_encoder.encode(pixels)
            prompt = splice(self.lm, ids, image_block(self.lm, encoded))
            t_encode = time.perf_counter() - start
            v = self.vocab
            banned = v.structure_ids  # a text answer: no image structure tokens (the official text-mode mask)
            ids_out: list[int] = []
            printed = ""

            def on_token(token: int) -> None:
                nonlocal printed
                ids_out.append(token)
                if on_text is not None:
                    text = self.tokenizer.decode([i for i in ids_out if i != v.im_end_id])
                    if len(text) > len(printed) and not text.endswith("\ufffd"):  # whole characters only
                        on_text(text[len(printed):])
                        printed = text

            generate_text(self.lm, prompt, limit, stop_ids=(v.im_end_id,), banned_ids=banned, on_token=on_token)
        if limit < max_new_tokens and len(ids_out) == limit and ids_out[-1] != v.im_end_id:
            notices.append(f"the answer was cut at {limit} tokens: that is all the room the model's context of "
                           f"{self.lm.max_context} positions leaves after the prompt and the image")
        answer = self.tokenizer.decode([i for i in ids_out if i != v.im_end_id])
        if on_text is not None and len(answer) > len(printed):
            on_text(answer[len(printed):])
        timings = {"image_encode": t_encode, "total": time.perf_counter() - start}
        timings["decode"] = timings["total"] - t_encode
        return UnderstandingResult(answer, ids_out, timings, self.bundle_notices + notices)


@dataclass
class UnderstandingResult:
    text: str
    token_ids: list[int]
    timings: dict = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # e.g. the image was scaled down to fit the context

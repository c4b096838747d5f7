"""The Python API: ``Pipeline.from_bundle(path).generate(prompt)``. numpy + onnxruntime only."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from illume_rt.engines.base import BackendError, Engine
from illume_rt.runtime.bundle import Bundle, load_bundle
from illume_rt.runtime.generate import ImageTokens, LanguageModel, generate_image_tokens
from illume_rt.runtime.layout import SamplingConfig, image_grid
from illume_rt.runtime.prompts import text_to_image_ids
from illume_rt.runtime.tokenizer import load_tokenizer

BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt")


def open_engine(bundle: Bundle, name: str, backend: str, threads: int | None) -> Engine:
    entry = bundle.component(name)
    if backend in ("ort-cpu", "ort-cuda"):
        from illume_rt.engines.ort import OrtEngine

        return OrtEngine(name, bundle.component_path(name), backend, threads,
                         emulate_fp8=entry.get("precision") == "fp8")
    if backend == "tensorrt":
        from illume_rt.engines import tensorrt as trt_backend  # optional, needs the tensorrt package

        return trt_backend.open_engine(bundle, name)
    raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


@dataclass
class GenerationResult:
    image: np.ndarray  # uint8 [height, width, 3]
    tokens: ImageTokens
    timings: dict = field(default_factory=dict)  # seconds per stage
    seed: int | None = None

    def save(self, path: str | Path) -> Path:
        """Write a PNG atomically (temporary name, then rename)."""
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(self.image).save(tmp, format="PNG")
        tmp.replace(path)
        return path


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8 (clamped, rounded)."""
    return np.round((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)


class Pipeline:
    def __init__(self, bundle: Bundle, backend: str = "ort-cpu", threads: int | None = None) -> None:
        self.bundle, self.backend = bundle, backend
        self.vocab = bundle.vocab
        self.tokenizer = load_tokenizer(bundle.manifest["tokenizer"], bundle.path, self.vocab)
        heads = {which: open_engine(bundle, f"lm_head_{which}", backend, threads)
                 for which in ("semantic", "pixel")}
        self.lm = LanguageModel(open_engine(bundle, "llm", backend, threads), heads,
                                bundle.table("embed_tokens"), bundle.llm, self.vocab)
        self.pixel_decoder = open_engine(bundle, "pixel_decoder", backend, threads)
        self.semantic_codebook = bundle.table("semantic_codebook", mmap=False)
        self.pixel_codebook = bundle.table("pixel_codebook", mmap=False)

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                    verify: bool = True) -> "Pipeline":
        return cls(load_bundle(path, verify=verify), backend, threads)

    @property
    def random_weights(self) -> bool:
        return self.bundle.random_weights

    def decode_image(self, semantic: np.ndarray, pixel: np.ndarray) -> np.ndarray:
        """Code grids -> float image [3, H, W] in about [-1, 1] via the codebook tables and the pixel decoder."""
        semantic_embed = self.semantic_codebook[semantic].transpose(2, 0, 1)[None]
        pixel_embed = self.pixel_codebook[pixel].transpose(2, 0, 1)[None]
        (image,) = self.pixel_decoder.run({"semantic_embed": np.ascontiguousarray(semantic_embed),
                                          "pixel_embed": np.ascontiguousarray(pixel_embed)})
        return image[0]

    def generate(self, prompt: str, resolution: tuple[int, int] = (256, 256), seed: int | None = 0,
                 sampling: SamplingConfig | None = None,
                 on_token: Callable[[int], None] | None = None) -> GenerationResult:
        """Text to image. ``resolution`` is (height, width); ``on_token(level)`` is called per sampled code."""
        sampling = sampling or SamplingConfig()
        sampling.validate()
        grid = image_grid(*resolution)
        cond, uncond = text_to_image_ids(self.tokenizer, self.vocab, prompt, *resolution)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        tokens = generate_image_tokens(self.lm, grid, cond, uncond, sampling, rng, on_token)
        t0 = time.perf_counter()
        image = self.decode_image(tokens.semantic, tokens.pixel)
        timings = dict(tokens.timings)
        timings["image_decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        return GenerationResult(to_uint8(image), tokens, timings, seed)

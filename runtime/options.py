"""Per-call options of the runtime: sampling settings, seeds and thread counts, validated before any work."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

from illume_rt.contract import DECODE_MAX_SEQ, MAX_IMAGES, LayoutError

MAX_SEED = 2**63 - 1  # numpy's default_rng takes any non-negative int; this bound keeps seeds portable (int64)


def check_seed(seed) -> int | None:
    """None (fresh entropy) or a whole number 0..MAX_SEED."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise LayoutError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def check_prompts(prompt, num_images, seed: int | None) -> list[str]:
    """The prompts of a request, each repeated ``num_images`` times (at most MAX_IMAGES in all, seeds in range)."""
    if isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral) or num_images < 1:
        raise LayoutError(f"num_images must be a whole number from 1 to {MAX_IMAGES}, got {num_images!r}")
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise LayoutError("prompt must be a string or a non-empty list of strings")
    prompts = [t for t in texts for _ in range(num_images)]
    if len(prompts) > MAX_IMAGES:
        raise LayoutError(f"{len(prompts)} images in one request; at most {MAX_IMAGES} decode in one batch: "
                          "split the request")
    if seed is not None and seed + len(prompts) - 1 > MAX_SEED:
        raise LayoutError(f"seed + images - 1 must be at most {MAX_SEED}; pass a smaller seed")
    return prompts


def check_threads(threads) -> int | None:
    """None (onnxruntime's default: every core) or 1..cores; more only oversubscribes (100000 hung the machine)."""
    if threads is None:
        return None
    cores = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= cores:
        raise LayoutError(f"threads must be a whole number from 1 to {cores} (this machine's cores), got {threads!r}")
    return int(threads)


# Codes per verify step of parallel decoding. A window also feeds the structure tokens between its codes; the loop
# shortens one that would be wider than DECODE_MAX_SEQ (the widest body call the engines are built for).
MAX_PARALLEL_WINDOW = DECODE_MAX_SEQ - 4
# the widest window: on nano at 512x512 it took the fewest calls and the least wall time of 4, 8 and 12
# (bench/results/20261129-parallel-nano)
DEFAULT_PARALLEL_WINDOW = 12


@dataclass(frozen=True)
class SamplingConfig:
    """Per-level sampling. Defaults follow ILLUME/app.py for text to image (warpers applied once)."""

    guidance_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 2048
    top_p: float = 1.0
    pixel_temperature: float | None = None  # None: same as semantic
    pixel_top_k: int | None = None  # None: 3x the semantic top_k, as the official InferenceConfig
    pixel_top_p: float | None = None
    greedy: bool = False
    # Speculative Jacobi decoding of image codes (runtime/generate.py ImageGenerator): codes drafted and verified
    # per body call, at most; 0 decodes one code per call. Lossless: the codes keep the sampler's distribution.
    parallel_window: int = 0

    def level(self, level: int) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) for level 0 (semantic) or 1 (pixel)."""
        if level == 0:
            return self.temperature, self.top_k, self.top_p
        return (self.temperature if self.pixel_temperature is None else self.pixel_temperature,
                3 * self.top_k if self.pixel_top_k is None else self.pixel_top_k,
                self.top_p if self.pixel_top_p is None else self.pixel_top_p)

    def validate(self) -> None:
        for name in ("guidance_scale", "temperature", "top_p", "pixel_temperature", "pixel_top_p"):
            value = getattr(self, name)  # None means "as the semantic level" for the pixel_* fields only
            if (value is not None or not name.startswith("pixel_")) and (
                    isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)):
                raise LayoutError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "pixel_top_k"):
            value = getattr(self, name)
            if (value is not None or name == "top_k") and (isinstance(value, bool)
                                                           or not isinstance(value, numbers.Integral)):
                raise LayoutError(f"{name} must be a whole number, got {value!r}")
        if self.guidance_scale < 1.0:
            raise LayoutError(f"guidance {self.guidance_scale} < 1: use 1.0 (off) or more, e.g. 2.0")
        for name in ("temperature", "pixel_temperature"):
            t = getattr(self, name)
            if t is not None and t <= 0:
                raise LayoutError(f"{name} must be > 0 (use --greedy for argmax decoding)")
        for name in ("top_p", "pixel_top_p"):
            p = getattr(self, name)
            if p is not None and not 0 < p <= 1:
                raise LayoutError(f"{name} must be in (0, 1]")
        for name in ("top_k", "pixel_top_k"):
            k = getattr(self, name)
            if k is not None and k < 0:
                raise LayoutError(f"{name} must be >= 0 (0 disables top-k)")
        window = self.parallel_window
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or \
                not (window == 0 or 2 <= window <= MAX_PARALLEL_WINDOW):
            raise LayoutError(f"parallel_window must be 0 (off) or a whole number from 2 to {MAX_PARALLEL_WINDOW} "
                              f"(codes per body call; {DEFAULT_PARALLEL_WINDOW} is a good start), got {window!r}")


# The official defaults of each task (ILLUME/app.py, facts section 5): text to image 1.0 / 2048 (pixel 3x) / 1.0,
# CFG 2.0; editing 0.7 / 512 (pixel 3x) / 0.8, CFG 1.5. A bundle may declare its model's own
# (manifest ``model.sampling_defaults``, as a checkpoint's generation config): model_sampling_defaults.
OFFICIAL_SAMPLING = {"text_to_image": SamplingConfig(),
                     "editing": SamplingConfig(guidance_scale=1.5, temperature=0.7, top_k=512, top_p=0.8)}
# What a model may declare: the sampler's knobs, not the decoding mode (greedy, parallel_window stay per call).
DECLARABLE_SAMPLING = ("guidance_scale", "temperature", "top_k", "top_p", "pixel_temperature", "pixel_top_k",
                       "pixel_top_p")


def model_sampling_defaults(declared: dict | None) -> dict[str, SamplingConfig]:
    """{task: SamplingConfig}: the official defaults with a model's declared fields (``{task: {field: value}}``)
    in their place. Raises LayoutError naming the bad field."""
    from dataclasses import replace

    out = dict(OFFICIAL_SAMPLING)
    for task, fields in (declared or {}).items():
        if task not in OFFICIAL_SAMPLING or not isinstance(fields, dict):
            raise LayoutError(f"sampling_defaults.{task}: expected one of {sorted(OFFICIAL_SAMPLING)} with a "
                              "{field: value} table")
        unknown = sorted(set(fields) - set(DECLARABLE_SAMPLING))
        if unknown:
            raise LayoutError(f"sampling_defaults.{task}: {unknown} cannot be declared; fields: "
                              f"{', '.join(DECLARABLE_SAMPLING)}")
        config = replace(OFFICIAL_SAMPLING[task], **fields)
        try:
            config.validate()
        except LayoutError as exc:
            raise LayoutError(f"sampling_defaults.{task}: {exc}") from None
        out[task] = config
    return out

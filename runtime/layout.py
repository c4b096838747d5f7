"""Vocabulary and image-token layout of ILLUME+: the one description that export, runtime and tests share.

Torch-free on purpose: the runtime reads it back from the bundle manifest (``VocabLayout.from_dict``) and the
exporter writes it there from the preset, so an id or a grid lives in exactly one place.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass

from illume_rt.errors import IllumeError


class LayoutError(IllumeError, ValueError):
    """A request that does not fit the model's token layout (resolution, prompt length)."""


# Semantic-branch resize per output size: the official RESOLUTION_MAPPING (vision_tokenizer/tokenizer/
# dualvitok_model.py). The official code indexes it (w, h) in one place and (h, w) in another; the table holds both
# orientations, so both readings give the same grids. We read it (width, height); the semantic grid is size / 28.
SEMANTIC_RESIZE: dict[tuple[int, int], tuple[int, int]] = {
    (256, 256): (252, 252),
    (512, 512): (504, 504),
    (512, 384): (448, 336),
    (384, 512): (336, 448),
    (768, 384): (728, 364),
    (384, 768): (364, 728),
    (1024, 256): (1008, 252),
    (256, 1024): (252, 1008),
    (384, 576): (336, 504),
    (576, 384): (504, 336),
    (960, 320): (924, 308),
    (320, 960): (308, 924),
}
SEMANTIC_PATCH = 28  # ViT patch 14 x spatial merge 2
PIXEL_PATCH = 16  # MoVQ encoder downsamples 2**4

# Output sizes (W, H) of the diffusion decoder, in the order of its resolution index (add_time_ids[-1]).
DIFFUSION_SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1024), (768, 1024), (1024, 768), (512, 2048), (2048, 512), (640, 1920),
    (1920, 640), (768, 1536), (1536, 768), (768, 1152), (1152, 768), (512, 512),
)


@dataclass(frozen=True)
class ImageGrid:
    """Token grids of one output resolution (height x width in pixels)."""

    height: int
    width: int
    semantic_rows: int
    semantic_cols: int
    pixel_rows: int
    pixel_cols: int

    @property
    def num_codes(self) -> int:
        """Sampled code tokens, semantic then pixel (the facts table's "image tokens")."""
        return self.semantic_rows * self.semantic_cols + self.pixel_rows * self.pixel_cols

    @property
    def num_structural(self) -> int:
        """Forced tokens after <start_of_image>: one <end_of_line> per row, the four level markers and
        <end_of_image>."""
        return self.semantic_rows + self.pixel_rows + 5

    @property
    def num_tokens(self) -> int:
        """Tokens from <start_of_image> to <end_of_image> inclusive."""
        return 1 + self.num_codes + self.num_structural

    @property
    def diffusion_size(self) -> tuple[int, int]:
        """(height, width) of the 2x diffusion-refined output."""
        return 2 * self.height, 2 * self.width

    @property
    def diffusion_resolution_index(self) -> int:
        return DIFFUSION_SIZES.index((2 * self.width, 2 * self.height))


def supported_resolutions() -> list[tuple[int, int]]:
    """(height, width) pairs, in the order of SEMANTIC_RESIZE."""
    return [(h, w) for (w, h) in SEMANTIC_RESIZE]


def image_grid(height: int, width: int) -> ImageGrid:
    """Grids for an output size, or a LayoutError that lists the valid sizes."""
    try:
        sem_w, sem_h = SEMANTIC_RESIZE[(width, height)]
    except KeyError:
        valid = ", ".join(f"{h}x{w}" for h, w in supported_resolutions())
        raise LayoutError(f"unsupported resolution {height}x{width} (height x width); use one of: {valid}") from None
    return ImageGrid(height, width, sem_h // SEMANTIC_PATCH, sem_w // SEMANTIC_PATCH,
                     height // PIXEL_PATCH, width // PIXEL_PATCH)


def parse_resolution(text: str) -> tuple[int, int]:
    """'512x512' or '384x512' (height x width) -> (height, width), validated against the supported sizes."""
    try:
        h, w = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise LayoutError(f"resolution {text!r} is not HEIGHTxWIDTH, e.g. 512x512") from None
    image_grid(h, w)
    return h, w


@dataclass(frozen=True)
class VocabLayout:
    """Where every special token and image code lives in the (extended) LLM vocabulary.

    Text ids are [0, text_vocab_size); the three chat ids and the image structure ids are explicit; the
    16 height tags and 16 width tags are contiguous (id = first + size/64 - 1); semantic then pixel codes
    follow; rows past the last pixel code are padding.
    """

    text_vocab_size: int
    pad_id: int
    im_start_id: int
    im_end_id: int
    start_of_image_id: int
    end_of_image_id: int
    end_of_line_id: int
    start_of_level0_id: int
    end_of_level0_id: int
    start_of_level1_id: int
    end_of_level1_id: int
    first_height_tag_id: int
    first_width_tag_id: int
    semantic_code_offset: int
    semantic_codebook_size: int
    pixel_code_offset: int
    pixel_codebook_size: int
    vocab_rows: int  # rows of the embedding table and LM head, padding included
    num_size_tags: int = 16
    size_tag_step: int = 64

    def __post_init__(self) -> None:
        if self.pixel_code_offset < self.semantic_code_offset + self.semantic_codebook_size:
            raise ValueError("pixel codes overlap semantic codes")
        if self.vocab_rows < self.pixel_code_offset + self.pixel_codebook_size:
            raise ValueError("vocab_rows is smaller than the last pixel code")

    # -- ranges -------------------------------------------------------------------------------------------
    @property
    def semantic_range(self) -> tuple[int, int]:
        return self.semantic_code_offset, self.semantic_code_offset + self.semantic_codebook_size

    @property
    def pixel_range(self) -> tuple[int, int]:
        return self.pixel_code_offset, self.pixel_code_offset + self.pixel_codebook_size

    @property
    def text_range(self) -> tuple[int, int]:
        """Rows the head needs outside an image: everything below the first image code."""
        return 0, self.semantic_code_offset

    def head_range(self, which: str) -> tuple[int, int]:
        """Rows of the LM head slice ``which`` ("text", "semantic" or "pixel")."""
        ranges = {"text": self.text_range, "semantic": self.semantic_range, "pixel": self.pixel_range}
        try:
            return ranges[which]
        except KeyError:
            raise ValueError(f"unknown head slice {which!r}; one of {', '.join(ranges)}") from None

    def height_tag(self, height: int) -> int:
        return self._size_tag(self.first_height_tag_id, height, "height")

    def width_tag(self, width: int) -> int:
        return self._size_tag(self.first_width_tag_id, width, "width")

    def _size_tag(self, first: int, size: int, what: str) -> int:
        steps, rem = divmod(size, self.size_tag_step)
        if rem or not 1 <= steps <= self.num_size_tags:
            raise LayoutError(f"no {what} tag for {size}: sizes are multiples of {self.size_tag_step} "
                              f"up to {self.size_tag_step * self.num_size_tags}")
        return first + steps - 1

    # -- image token sequences -----------------------------------------------------------------------------
    def image_token_ids(self, grid: ImageGrid, semantic_codes, pixel_codes) -> list[int]:
        """The full <start_of_image> ... <end_of_image> id sequence for given code grids (lists of rows)."""
        ids = [self.start_of_image_id, self.start_of_level0_id]
        for row in semantic_codes:
            ids.extend(self.semantic_code_offset + int(c) for c in row)
            ids.append(self.end_of_line_id)
        ids += [self.end_of_level0_id, self.start_of_level1_id]
        for row in pixel_codes:
            ids.extend(self.pixel_code_offset + int(c) for c in row)
            ids.append(self.end_of_line_id)
        ids += [self.end_of_level1_id, self.end_of_image_id]
        if len(ids) != grid.num_tokens:
            raise LayoutError(f"code grids do not match the {grid.height}x{grid.width} layout")
        return ids

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VocabLayout":
        return cls(**data)


def official_vocab_layout(vocab_rows: int) -> VocabLayout:
    """The released ILLUME+ layout (Qwen2.5 tokenizer extended by the vision tokens)."""
    return VocabLayout(
        text_vocab_size=151643, pad_id=151643, im_start_id=151644, im_end_id=151645,
        start_of_image_id=151665, end_of_image_id=151666, end_of_line_id=151667,
        start_of_level0_id=151668, end_of_level0_id=151669, start_of_level1_id=151670, end_of_level1_id=151671,
        first_height_tag_id=151672, first_width_tag_id=151688,
        semantic_code_offset=151704, semantic_codebook_size=32768,
        pixel_code_offset=184472, pixel_codebook_size=98304,
        vocab_rows=vocab_rows,
    )


def compact_vocab_layout(text_vocab_size: int, semantic_codebook_size: int, pixel_codebook_size: int,
                         row_multiple: int = 64) -> VocabLayout:
    """The same structure packed after a small text vocabulary (byte-level for the tiny presets)."""
    nxt = text_vocab_size
    pad, im_start, im_end = nxt, nxt + 1, nxt + 2
    soi, eoi, eol, sl0, el0, sl1, el1 = range(nxt + 3, nxt + 10)
    first_h = nxt + 10
    first_w = first_h + 16
    sem = first_w + 16
    pix = sem + semantic_codebook_size
    end = pix + pixel_codebook_size
    rows = -(-end // row_multiple) * row_multiple
    return VocabLayout(
        text_vocab_size=text_vocab_size, pad_id=pad, im_start_id=im_start, im_end_id=im_end,
        start_of_image_id=soi, end_of_image_id=eoi, end_of_line_id=eol,
        start_of_level0_id=sl0, end_of_level0_id=el0, start_of_level1_id=sl1, end_of_level1_id=el1,
        first_height_tag_id=first_h, first_width_tag_id=first_w,
        semantic_code_offset=sem, semantic_codebook_size=semantic_codebook_size,
        pixel_code_offset=pix, pixel_codebook_size=pixel_codebook_size, vocab_rows=rows,
    )


MAX_SEED = 2**63 - 1  # numpy's default_rng takes any non-negative int; this bound keeps seeds portable (int64)


def check_seed(seed) -> int | None:
    """None (fresh entropy) or a whole number 0..MAX_SEED."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise LayoutError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def check_threads(threads) -> int | None:
    """None (onnxruntime's default: every core) or 1..cores; more only oversubscribes (100000 hung the machine)."""
    if threads is None:
        return None
    cores = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= cores:
        raise LayoutError(f"threads must be a whole number from 1 to {cores} (this machine's cores), got {threads!r}")
    return int(threads)


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


T2I_PROMPT = "Generate an image of {tags}, the content of image is {prompt}\n"
T2I_UNCOND_PROMPT = "Generate a random image of {tags}\n"

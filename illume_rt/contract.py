"""The contract between build time and run time: the one description of ILLUME+'s tokens, grids, prompts and
graph interfaces that export, engines, runtime and tests all read.

Torch-free and dependency-free (numpy is not needed): every stage imports it, and it imports nothing of the
project but ``illume_rt.errors``. A bundle's manifest (format 4, docs/bundle-format.md) carries what a host needs
from here, so a reader that does not import illume-rt can rebuild the token schedule and the prompts.

Contents, in order: resolutions and grids; the vocabulary layout; the image-block grammar (``IMAGE_GRAMMAR``,
``image_slots``, ``decode_plan``); prompt templates; image preprocessing constants; graph IO names and the KV-cache
layout; diffusion constants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from illume_rt.errors import IllumeError


class LayoutError(IllumeError, ValueError):
    """A request that does not fit the model's token layout (resolution, prompt length)."""


# ---------------------------------------------------------------------------------------------------------------
# Resolutions and grids
# ---------------------------------------------------------------------------------------------------------------

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

# Editing anchors (height, width): official RATIOS, i.e. every supported size except 256x256.
EDIT_ANCHORS: tuple[tuple[int, int], ...] = (
    (512, 512), (384, 512), (512, 384), (384, 768), (768, 384), (384, 576), (576, 384),
    (320, 960), (960, 320), (256, 1024), (1024, 256))



def edit_anchors(trained_resolutions=None) -> tuple[tuple[int, int], ...]:
    """The sizes a model edits at: the official anchors, or of a model that records the sizes it was trained at
    (a bundle's ``model.trained_resolutions``), the anchors among them; a model trained at none of the anchors
    (illume-nano: 256x256 only) edits at the sizes it was trained at, since anywhere else it draws noise."""
    if not trained_resolutions:
        return EDIT_ANCHORS
    trained = tuple((int(h), int(w)) for h, w in trained_resolutions)
    return tuple(a for a in EDIT_ANCHORS if a in trained) or trained


# Output sizes (W, H) of the diffusion decoder, in the order of its resolution index (add_time_ids[-1]).
DIFFUSION_SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1024), (768, 1024), (1024, 768), (512, 2048), (2048, 512), (640, 1920),
    (1920, 640), (768, 1536), (1536, 768), (768, 1152), (1152, 768), (512, 512),
)
LATENT_CHANNELS = 4  # VAE latent channels; the UNet input is these plus the token map's channels
MAP_TO_LATENT = 4  # latent grid = pixel-token grid * 4 (output 2x, VAE /8, tokens /16)


@dataclass(frozen=True)
class ImageGrid:
    """Token grids of one image (height x width in pixels): an output resolution, or an understanding image."""

    height: int
    width: int
    semantic_rows: int
    semantic_cols: int
    pixel_rows: int
    pixel_cols: int

    def level_shape(self, level: int) -> tuple[int, int]:
        """(rows, cols) of the code grid of ``level`` (SEMANTIC or PIXEL)."""
        return (self.semantic_rows, self.semantic_cols) if level == SEMANTIC else (self.pixel_rows, self.pixel_cols)

    @property
    def num_codes(self) -> int:
        """Sampled code tokens, semantic then pixel (the facts table's "image tokens")."""
        return self.semantic_rows * self.semantic_cols + self.pixel_rows * self.pixel_cols

    @property
    def num_tokens(self) -> int:
        """Tokens from <start_of_image> to <end_of_image> inclusive (the length of ``image_slots``)."""
        return len(image_slots(self))

    @property
    def num_structural(self) -> int:
        """Forced tokens after <start_of_image> (every slot that is not a code, but the first)."""
        return self.num_tokens - 1 - self.num_codes

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


def semantic_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) the semantic encoder sees for an image of this size: the anchor's SEMANTIC_RESIZE, or a
    multiple of 28 (floor, at least one patch) for an understanding image."""
    if (width, height) in SEMANTIC_RESIZE:
        sem_w, sem_h = SEMANTIC_RESIZE[(width, height)]
        return sem_h, sem_w
    return max(SEMANTIC_PATCH, height // SEMANTIC_PATCH * SEMANTIC_PATCH), \
        max(SEMANTIC_PATCH, width // SEMANTIC_PATCH * SEMANTIC_PATCH)


def parse_resolution(text: str) -> tuple[int, int]:
    """'512x512' or '384x512' (height x width) -> (height, width), validated against the supported sizes."""
    try:
        h, w = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise LayoutError(f"resolution {text!r} is not HEIGHTxWIDTH, e.g. 512x512") from None
    image_grid(h, w)
    return h, w


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------

# The image structure tokens, by name; VocabLayout holds each one's id as ``<name>_id``.
STRUCTURE_TOKENS = ("start_of_image", "end_of_image", "end_of_line", "start_of_level0", "end_of_level0",
                    "start_of_level1", "end_of_level1")


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

    def code_offset(self, level: int) -> int:
        """Vocabulary id of code 0 of ``level`` (SEMANTIC or PIXEL)."""
        return self.semantic_code_offset if level == SEMANTIC else self.pixel_code_offset

    def token_id(self, name: str) -> int:
        """Id of a structure token by its name in STRUCTURE_TOKENS."""
        if name not in STRUCTURE_TOKENS:
            raise ValueError(f"unknown structure token {name!r}")
        return getattr(self, f"{name}_id")

    @property
    def structure_ids(self) -> tuple[int, ...]:
        """Ids of every image structure token (never part of a text answer)."""
        return tuple(self.token_id(name) for name in STRUCTURE_TOKENS)

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

    def image_token_ids(self, grid: ImageGrid, semantic_codes, pixel_codes) -> list[int]:
        """The full <start_of_image> ... <end_of_image> id sequence for given code grids (lists of rows)."""
        codes = {SEMANTIC: [int(c) for row in semantic_codes for c in row],
                 PIXEL: [int(c) for row in pixel_codes for c in row]}
        if len(codes[SEMANTIC]) != grid.semantic_rows * grid.semantic_cols or \
                len(codes[PIXEL]) != grid.pixel_rows * grid.pixel_cols:
            raise LayoutError(f"code grids do not match the {grid.height}x{grid.width} layout")
        taken = {SEMANTIC: iter(codes[SEMANTIC]), PIXEL: iter(codes[PIXEL])}
        return [self.token_id(s.token) if s.level is None else self.code_offset(s.level) + next(taken[s.level])
                for s in image_slots(grid)]

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


# ---------------------------------------------------------------------------------------------------------------
# The image-block grammar
# ---------------------------------------------------------------------------------------------------------------

SEMANTIC, PIXEL = 0, 1  # code levels, coarse first
LEVEL_NAMES = {SEMANTIC: "semantic", PIXEL: "pixel"}  # also the names of the LM head slices that emit them

# An image, generated or understood (ILLUME/illume/model/illume_arch.py, _reformat_image_sequence): a structure
# token by name, or {"level": L, "line_end": name}: the code grid of level L in raster order, each row followed by
# the ``line_end`` token. Written into the manifest as it is (docs/bundle-format.md, "image grammar").
IMAGE_GRAMMAR: tuple = (
    "start_of_image",
    "start_of_level0", {"level": SEMANTIC, "line_end": "end_of_line"}, "end_of_level0",
    "start_of_level1", {"level": PIXEL, "line_end": "end_of_line"}, "end_of_level1",
    "end_of_image",
)


@dataclass(frozen=True)
class Slot:
    """One position of an image: a forced structure token (by name), or a code of ``level``."""

    token: str | None = None
    level: int | None = None


@lru_cache(maxsize=64)
def image_slots(grid: ImageGrid) -> tuple[Slot, ...]:
    """Every position of an image from <start_of_image> to <end_of_image>, by IMAGE_GRAMMAR. Every user of the
    grammar (the decoding loop, the understanding image block, token ids of a code grid, engine profiles)
    iterates this."""
    slots: list[Slot] = []
    for item in IMAGE_GRAMMAR:
        if isinstance(item, str):
            slots.append(Slot(item))
            continue
        rows, cols = grid.level_shape(item["level"])
        for _ in range(rows):
            slots += [Slot(level=item["level"])] * cols + [Slot(item["line_end"])]
    return tuple(slots)


@dataclass(frozen=True)
class DecodeStep:
    """One body call of image decoding after the prefill: feed ``forced`` structure tokens (after the code sampled
    last, if any), then sample a code of ``level``."""

    forced: tuple[str, ...]
    level: int


@dataclass(frozen=True)
class DecodePlan:
    """How the loop walks ``image_slots``: the structure tokens before the first code go with the prompt's
    prefill; then each code is sampled after one body call that feeds the previous code plus the forced tokens
    between the two (so no head runs for a position whose successor is forced). Tokens after the last code are
    never fed."""

    prefix: tuple[str, ...]
    steps: tuple[DecodeStep, ...]


@lru_cache(maxsize=64)
def decode_plan(grid: ImageGrid) -> DecodePlan:
    slots = image_slots(grid)
    first = next(i for i, s in enumerate(slots) if s.level is not None)
    steps, forced = [], []
    for slot in slots[first:]:
        if slot.level is None:
            forced.append(slot.token)
            continue
        steps.append(DecodeStep(tuple(forced), slot.level))
        forced = []
    return DecodePlan(tuple(s.token for s in slots[:first]), tuple(steps))


# ---------------------------------------------------------------------------------------------------------------
# Prompts (ILLUME/generation_eval/models/illume.py, ILLUME/app.py)
# ---------------------------------------------------------------------------------------------------------------

SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen chat template; {user} and {assistant_prefix} are sequences of text and ids (prompts.chat_ids)
CHAT_TEMPLATE = ("<|im_start|>", "system\n{system}", "<|im_end|>", "\n", "<|im_start|>", "user\n{user}",
                 "<|im_end|>", "\n", "<|im_start|>", "assistant\n{assistant_prefix}")
# Where the image block goes in a prompt's ids (the official IMAGE_TOKEN_INDEX); never a vocabulary id.
IMAGE_PLACEHOLDER = -200
# Task templates. {tags}: the <height_h><width_w> tag ids; {image}: the image block; {content}: the user's text.
# Text-to-image and editing put the tags again after the assistant prefix.
PROMPT_TEMPLATES = {
    "text_to_image": {"user": "Generate an image of {tags}, the content of image is {content}\n",
                      "assistant_prefix": "{tags}"},
    "text_to_image_unconditional": {"user": "Generate a random image of {tags}\n", "assistant_prefix": "{tags}"},
    "understanding": {"user": "{image}\n{content}", "assistant_prefix": ""},
    # official text has no period after "instruction:"
    "editing": {"user": "{tags}{image}\nPlease edit the image according to the instruction: {content}\n",
                "assistant_prefix": "{tags}"},
    "editing_unconditional": {"user": "{tags}{image}\nReconstruct the image according to the given image\n",
                              "assistant_prefix": "{tags}"},
}


# ---------------------------------------------------------------------------------------------------------------
# Image preprocessing (runtime/images.py implements it)
# ---------------------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UNDERSTANDING_MIN_PIXELS = 32 * 32
UNDERSTANDING_MAX_PIXELS = 768 * 768
PIXEL_FACTOR = 16  # understanding images are resized to multiples of this


# ---------------------------------------------------------------------------------------------------------------
# Graph interfaces and the KV cache
# ---------------------------------------------------------------------------------------------------------------

# LLM body (docs/bundle-format.md): inputs_embeds [batch, seq, hidden], attention_mask [batch, past + seq],
# position_ids [batch, seq], the cache inputs; outputs hidden [batch, seq, hidden] (every new position: a verify
# step of parallel decoding reads several) and new_kv.
INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS = "inputs_embeds", "attention_mask", "position_ids"
HIDDEN, NEW_KV = "hidden", "new_kv"
LOGITS = "logits"  # a head slice: hidden -> logits [batch, rows of the slice]
CACHE_INPUT_PREFIX = "past_"
# The runtime's cache: one array [layers, 2 (keys, values), batch, kv_heads, capacity, head_dim]; new_kv has the
# same layout with ``seq`` columns. Each layer's keys (values) are one contiguous block, the graph's past_key_<i>
# (past_value_<i>) [batch, kv_heads, past, head_dim].
KV_CACHE_LAYOUT = ("layers", "kv", "batch", "kv_heads", "capacity", "head_dim")
# Widest body call after the prefill: a code plus the forced tokens before the next one (at most 4), or a verify
# step of parallel decoding (a window of drafted codes with the structure tokens between them).
DECODE_MAX_SEQ = 16
# Images of one request decoded in one batch (2 rows each with guidance); engine profiles cover this many.
MAX_IMAGES = 8
HEADS = tuple(("text", *LEVEL_NAMES.values()))


def cache_input_names(layers: int) -> list[str]:
    """The llm graph's cache inputs, in order: past_key_0, past_value_0, past_key_1, ..."""
    return [f"{CACHE_INPUT_PREFIX}{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def head_component(which: str) -> str:
    """Bundle component of a head slice ("text", "semantic", "pixel")."""
    return f"lm_head_{which}"


def llm_io(layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, *cache_input_names(layers)), (HIDDEN, NEW_KV)


# (inputs, outputs) of every other graph a bundle may hold, by component name.
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{head_component(w): ((HIDDEN,), (LOGITS,)) for w in HEADS},
    "pixel_decoder": (("semantic_embed", "pixel_embed"), ("image",)),
    "semantic_encoder": (("pixel_values",), ("semantic_embeds",)),
    "pixel_embedder": (("image",), ("pixel_embeds",)),
    "token_map": (("semantic_embed", "pixel_embed"), ("token_map",)),
    "diffusion_unet": (("latent", "timestep", "token_map", "resolution_index"), ("noise_pred",)),
    "vae_decoder": (("latent",), ("image",)),
}


def component_io(name: str, layers: int | None = None) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(inputs, outputs) the runtime expects of component ``name``; None for a component it does not know."""
    if name == "llm":
        return llm_io(layers) if layers is not None else None
    return GRAPH_IO.get(name)


# ---------------------------------------------------------------------------------------------------------------
# Bundle format
# ---------------------------------------------------------------------------------------------------------------

BUNDLE_FORMAT_NAME = "illume-rt-bundle"
# 3: the manifest carries the grammar, prompts, grids and preprocessing (contract); 4: the llm graph's hidden is
# [batch, seq, hidden] (every new position), so a format-3 body cannot serve a verify step and is refused.
BUNDLE_FORMAT_VERSION = 4
MANIFEST = "manifest.json"


def host_contract(vocab: VocabLayout) -> dict:
    """What a host needs to run the loop without reading Python: written into the manifest as ``contract``."""
    return {
        "structure_tokens": {name: vocab.token_id(name) for name in STRUCTURE_TOKENS},
        "image_grammar": [dict(item) if isinstance(item, dict) else item for item in IMAGE_GRAMMAR],
        "levels": {name: level for level, name in LEVEL_NAMES.items()},
        "grids": {f"{h}x{w}": {"semantic": list(g.level_shape(SEMANTIC)), "pixel": list(g.level_shape(PIXEL))}
                  for h, w in supported_resolutions() for g in [image_grid(h, w)]},
        "edit_anchors": [list(a) for a in EDIT_ANCHORS],
        "diffusion_sizes": [list(s) for s in DIFFUSION_SIZES],
        "prompts": {"system": SYSTEM_PROMPT, "chat_template": list(CHAT_TEMPLATE),
                    "image_placeholder": IMAGE_PLACEHOLDER, "templates": PROMPT_TEMPLATES},
        "preprocessing": {"clip_mean": list(CLIP_MEAN), "clip_std": list(CLIP_STD),
                          "semantic_patch": SEMANTIC_PATCH, "pixel_patch": PIXEL_PATCH,
                          "semantic_resize": {f"{w}x{h}": list(v) for (w, h), v in SEMANTIC_RESIZE.items()},
                          "understanding_min_pixels": UNDERSTANDING_MIN_PIXELS,
                          "understanding_max_pixels": UNDERSTANDING_MAX_PIXELS, "pixel_factor": PIXEL_FACTOR},
        "kv_cache_layout": list(KV_CACHE_LAYOUT),
        "decode_max_seq": DECODE_MAX_SEQ,
    }

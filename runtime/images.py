"""Image pre- and post-processing with numpy and PIL, as the official processors do it.

- ``to_rgb``: transformers' convert_to_rgb (alpha composited on white).
- ``smart_resize`` / ``understanding_image``: MoVQImageProcessor (vision_tokenizer/tokenizer/movqgan/
  image_processing_movqgan.py): aspect-preserving resize to multiples of 16 within [32*32, 768*768] pixels
  (ILLUME+ stage-3 config), PIL bicubic, values mapped to [-1, 1].
- ``semantic_view``: ScalingLayerForQwen2ViT (dualvitok_model.py): [-1,1] -> [0,1], bicubic with antialias to the
  anchor's semantic size or a multiple of 28 (floor), clamp, CLIP mean/std. torch's antialiased bicubic is PIL's
  filter, so PIL's float resize reproduces it.
- ``pad_to_anchor`` / ``unpad_and_resize_back``: AspectRatioCrop at inference (ILLUME/illume/data/
  aspect_ratio_utils.py, data_utils.py): the anchor with the closest aspect ratio (ties: closest size), LANCZOS
  resize keeping the aspect ratio, white padding centred; the inverse crops and resizes back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from illume_rt import contract
from illume_rt.contract import (EDIT_ANCHORS, PIXEL_FACTOR, UNDERSTANDING_MAX_PIXELS, UNDERSTANDING_MIN_PIXELS, LayoutError,
                                semantic_size)

CLIP_MEAN = np.array(contract.CLIP_MEAN, dtype=np.float32)
CLIP_STD = np.array(contract.CLIP_STD, dtype=np.float32)


# Decoded images are held as RGB in memory; past this many pixels a file is refused before decoding (a PNG of a few
# KB can declare 20000x20000 pixels: 1.2 GB decoded). ILLUME_RT_MAX_IMAGE_PIXELS raises or lowers it.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 200  # as Qwen2-VL's smart_resize: beyond it the short side has no patch left


def max_image_pixels() -> int:
    value = os.environ.get("ILLUME_RT_MAX_IMAGE_PIXELS", "")
    try:
        return int(value) if value else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        raise LayoutError(f"ILLUME_RT_MAX_IMAGE_PIXELS={value!r} is not a whole number of pixels") from None


def check_image_size(width: int, height: int, label) -> None:
    limit = max_image_pixels()
    if width * height > limit:
        raise LayoutError(f"image {label} is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the "
                          f"limit of {limit / 1e6:g} megapixels; downscale it, or raise the limit with "
                          "ILLUME_RT_MAX_IMAGE_PIXELS")
    if width < 1 or height < 1:
        raise LayoutError(f"image {label} is empty ({width}x{height})")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise LayoutError(f"image {label} is {width}x{height}: an aspect ratio over {MAX_ASPECT_RATIO}:1 is not "
                          "supported; crop it")


def load_image(source) -> Image.Image:
    """A path or a PIL image -> RGB PIL image; one clear error for anything unreadable, too large or too thin."""
    if isinstance(source, Image.Image):
        check_image_size(source.width, source.height, "(in memory)")
        return to_rgb(source)
    if not isinstance(source, (str, os.PathLike)):
        raise LayoutError(f"an image must be a file path or a PIL image, not {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise LayoutError(f"image {path} does not exist or is not a file; pass the path of a PNG or JPEG file")
    limit = max_image_pixels()
    if limit > (Image.MAX_IMAGE_PIXELS or 0):  # the user raised our limit past Pillow's: raise Pillow's with it
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with Image.open(path) as img:
            check_image_size(img.width, img.height, path)  # from the header, before decoding
            img.load()
            return to_rgb(img)
    except LayoutError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked inside Image.open
        import re

        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "more pixels than Pillow allows"
        raise LayoutError(f"image {path} has {size}, over the limit of {max_image_pixels() / 1e6:g} megapixels; "
                          "downscale it, or raise the limit with ILLUME_RT_MAX_IMAGE_PIXELS") from None
    except MemoryError:
        raise LayoutError(f"image {path} is too large to decode in memory; downscale it") from None
    except Exception as exc:  # noqa: BLE001 -- a decoder fed untrusted bytes fails in many ways (OSError,
        # SyntaxError, struct.error, ValueError, IndexError...): every one means "not a readable image"
        raise LayoutError(f"cannot read {path} as an image ({type(exc).__name__}: {str(exc)[:100]}); "
                          "pass a PNG or JPEG file") from None


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth grey: scale to 8 bits first
        array = np.asarray(img, dtype=np.float64)
        top = array.max() if array.size and array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def smart_resize(height: int, width: int, factor: int = PIXEL_FACTOR, min_pixels: int = UNDERSTANDING_MIN_PIXELS,
                 max_pixels: int = UNDERSTANDING_MAX_PIXELS) -> tuple[int, int]:
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def understanding_image(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB PIL image -> float32 [1, 3, H, W] in [-1, 1], H and W multiples of 16: ``size`` (height, width), by
    default smart_resize's choice."""
    height, width = size or smart_resize(img.height, img.width)
    if (img.height, img.width) != (height, width):
        img = img.resize((width, height), Image.BICUBIC)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def resize_float(channels_first: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] float32 -> [C, height, width], per-channel PIL bicubic (antialiased, like torch antialias=True)."""
    if channels_first.shape[1:] == (height, width):
        return channels_first.copy()
    return np.stack([np.asarray(Image.fromarray(c, mode="F").resize((width, height), Image.BICUBIC))
                     for c in channels_first.astype(np.float32)])


def semantic_view(image: np.ndarray) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> the ViT's normalized input [1, 3, H', W'] (multiples of 28)."""
    height, width = semantic_size(*image.shape[2:])
    unit = resize_float((image[0] + 1.0) / 2.0, height, width)
    unit = np.clip(unit, 0.0, 1.0)
    return np.ascontiguousarray(((unit - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None])[None], dtype=np.float32)


@dataclass(frozen=True)
class Padding:
    original_size: tuple[int, int]  # (height, width) of the input
    anchor: tuple[int, int]  # (height, width) generated


def nearest_anchor(height: int, width: int, anchors=EDIT_ANCHORS) -> tuple[int, int]:
    """The anchor (height, width) an image is edited at: closest aspect ratio, then closest size. ``anchors``: a
    model's (``Pipeline.edit_anchors``), by default the official ones."""
    aspect = width / height
    diffs = [abs(w / h - aspect) for h, w in anchors]
    best = min(diffs)
    candidates = [a for a, d in zip(anchors, diffs) if d == best]
    return min(candidates, key=lambda a: (height - a[0]) ** 2 + (width - a[1]) ** 2)


def pad_to_anchor(img: Image.Image, anchors=EDIT_ANCHORS) -> tuple[Image.Image, Padding]:
    anchor_h, anchor_w = nearest_anchor(img.height, img.width, anchors)
    ratio = min(anchor_w / img.width, anchor_h / img.height)
    new_w, new_h = max(1, int(img.width * ratio)), max(1, int(img.height * ratio))  # a thin image keeps a row
    resized = img.resize((new_w, new_h), Image.LANCZOS)
    dw, dh = anchor_w - new_w, anchor_h - new_h
    padded = ImageOps.expand(resized, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(255, 255, 255))
    return padded, Padding((img.height, img.width), (anchor_h, anchor_w))


def unpad_and_resize_back(img: Image.Image, padding: Padding) -> Image.Image:
    orig_h, orig_w = padding.original_size
    ratio = min(img.width / orig_w, img.height / orig_h)
    new_w, new_h = max(1, int(orig_w * ratio)), max(1, int(orig_h * ratio))
    left, upper = (img.width - new_w) // 2, (img.height - new_h) // 2
    return img.crop((left, upper, left + new_w, upper + new_h)).resize((orig_w, orig_h), Image.LANCZOS)

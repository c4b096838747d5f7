"""Images into the LLM: encoders, the image block of embeddings, and splicing it into a prompt.

The block follows ILLUME/illume/model/illume_arch.py (encode_images, _reformat_image_sequence):
<start_of_image> <start_of_level0> [w1 semantic features, <end_of_line>] x h1 <end_of_level0>
<start_of_level1> [w2 pixel features, <end_of_line>] x h2 <end_of_level1> <end_of_image>,
structure tokens embedded with the token table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from illume_rt.engines.base import Engine
from illume_rt.runtime.images import semantic_size, semantic_view
from illume_rt.runtime.layout import PIXEL_PATCH, SEMANTIC_PATCH, LayoutError
from illume_rt.runtime.prompts import IMAGE_PLACEHOLDER


@dataclass
class EncodedImage:
    semantic: np.ndarray  # [h1 * w1, hidden], raster order
    semantic_grid: tuple[int, int]
    pixel: np.ndarray  # [h2 * w2, hidden]
    pixel_grid: tuple[int, int]


class ImageEncoder:
    def __init__(self, semantic_encoder: Engine, pixel_embedder: Engine) -> None:
        self.semantic_encoder, self.pixel_embedder = semantic_encoder, pixel_embedder

    def encode(self, image: np.ndarray) -> EncodedImage:
        """image: float32 [1, 3, H, W] in [-1, 1], H and W multiples of 16 (images.understanding_image)."""
        vit_input = semantic_view(image)
        (semantic,) = self.semantic_encoder.run({"pixel_values": vit_input})
        (pixel,) = self.pixel_embedder.run({"image": image})
        sem_grid = (vit_input.shape[2] // SEMANTIC_PATCH, vit_input.shape[3] // SEMANTIC_PATCH)
        pix_grid = (image.shape[2] // PIXEL_PATCH, image.shape[3] // PIXEL_PATCH)
        return EncodedImage(semantic, sem_grid, pixel, pix_grid)


def image_block_length(height: int, width: int) -> int:
    """Positions the image block of an understanding image of height x width pixels takes (see image_block): the
    semantic and pixel grids, an <end_of_line> per row, and six markers."""
    sem_h, sem_w = semantic_size(height, width)
    sem_rows, sem_cols = sem_h // SEMANTIC_PATCH, sem_w // SEMANTIC_PATCH
    pix_rows, pix_cols = height // PIXEL_PATCH, width // PIXEL_PATCH
    return sem_rows * (sem_cols + 1) + pix_rows * (pix_cols + 1) + 6


def image_block(lm, encoded: EncodedImage) -> np.ndarray:
    """The [N, hidden] embeddings that replace <image>."""
    v = lm.vocab
    parts = [lm.embed([v.start_of_image_id])]
    eol = lm.embed([v.end_of_line_id])
    for level, (features, (rows, cols)) in enumerate(((encoded.semantic, encoded.semantic_grid),
                                                       (encoded.pixel, encoded.pixel_grid))):
        start, end = (v.start_of_level0_id, v.end_of_level0_id) if level == 0 else \
            (v.start_of_level1_id, v.end_of_level1_id)
        parts.append(lm.embed([start]))
        for r in range(rows):
            parts += [features[r * cols:(r + 1) * cols], eol]
        parts.append(lm.embed([end]))
    parts.append(lm.embed([v.end_of_image_id]))
    return np.concatenate(parts).astype(np.float32)


def splice(lm, ids: list[int], block: np.ndarray) -> np.ndarray:
    """Prompt ids with one IMAGE_PLACEHOLDER -> [S, hidden] embeddings with the image block in its place."""
    if ids.count(IMAGE_PLACEHOLDER) != 1:
        raise LayoutError("a prompt needs exactly one image")
    at = ids.index(IMAGE_PLACEHOLDER)
    return np.concatenate([lm.embed(ids[:at]).reshape(at, -1), block,
                           lm.embed(ids[at + 1:]).reshape(len(ids) - at - 1, -1)])

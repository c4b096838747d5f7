"""Images into the LLM: encoders, the image block of embeddings, and splicing it into a prompt.

The block is the image grammar of generation (contract.IMAGE_GRAMMAR, ILLUME/illume/model/illume_arch.py
encode_images, _reformat_image_sequence) with the encoders' features in the code positions, structure tokens
embedded with the token table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from illume_rt.contract import (GRAPH_IO, IMAGE_PLACEHOLDER, PIXEL, PIXEL_PATCH, SEMANTIC, SEMANTIC_PATCH, ImageGrid,
                                LayoutError, image_slots, semantic_size)
from illume_rt.engines.base import Engine
from illume_rt.runtime.images import semantic_view


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
        (semantic,) = self.semantic_encoder.run({GRAPH_IO["semantic_encoder"][0][0]: vit_input})
        (pixel,) = self.pixel_embedder.run({GRAPH_IO["pixel_embedder"][0][0]: image})
        sem_grid = (vit_input.shape[2] // SEMANTIC_PATCH, vit_input.shape[3] // SEMANTIC_PATCH)
        pix_grid = (image.shape[2] // PIXEL_PATCH, image.shape[3] // PIXEL_PATCH)
        return EncodedImage(semantic, sem_grid, pixel, pix_grid)


def understanding_grid(height: int, width: int) -> ImageGrid:
    """The token grids of an understanding image of height x width pixels (multiples of 16)."""
    sem_h, sem_w = semantic_size(height, width)
    return ImageGrid(height, width, sem_h // SEMANTIC_PATCH, sem_w // SEMANTIC_PATCH,
                     height // PIXEL_PATCH, width // PIXEL_PATCH)


def image_block_length(height: int, width: int) -> int:
    """Positions the image block of an understanding image of height x width pixels takes."""
    return understanding_grid(height, width).num_tokens


def image_block(lm, encoded: EncodedImage) -> np.ndarray:
    """The [N, hidden] embeddings that replace <image>: contract.image_slots with the features in the code slots."""
    grid = ImageGrid(0, 0, *encoded.semantic_grid, *encoded.pixel_grid)
    features = {SEMANTIC: encoded.semantic, PIXEL: encoded.pixel}
    taken = {SEMANTIC: 0, PIXEL: 0}
    parts: list[np.ndarray] = []
    for slot in image_slots(grid):
        if slot.level is None:
            parts.append(lm.embed([lm.vocab.token_id(slot.token)]))
            continue
        cols = grid.level_shape(slot.level)[1]  # a row of features at once
        if taken[slot.level] % cols == 0:
            parts.append(features[slot.level][taken[slot.level]:taken[slot.level] + cols])
        taken[slot.level] += 1
    return np.concatenate(parts).astype(np.float32)


def splice(lm, ids: list[int], block: np.ndarray) -> np.ndarray:
    """Prompt ids with one IMAGE_PLACEHOLDER -> [S, hidden] embeddings with the image block in its place."""
    if ids.count(IMAGE_PLACEHOLDER) != 1:
        raise LayoutError("a prompt needs exactly one image")
    at = ids.index(IMAGE_PLACEHOLDER)
    return np.concatenate([lm.embed(ids[:at]).reshape(at, -1), block,
                           lm.embed(ids[at + 1:]).reshape(len(ids) - at - 1, -1)])

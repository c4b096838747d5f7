"""Export forms that compose networks of different families, for understanding, editing and refinement.

- ``pixel_embedder``: the MLLM's (fine-tuned) pixel encoder followed by the pixel projector, tokens in raster order
  over the 16x16-px grid (dual_encoder.py rearranges 'b c h w -> b (h w) c' before the projector).
- ``token_map``: the 64-channel map of generated codes (semantic embeddings bicubic-resized to the pixel grid,
  concatenated with the pixel embeddings), the conditioning of the diffusion decoder.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from illume_rt.export.components import Component, TensorSpec, Tolerance
from illume_rt.export.configs import Preset
from illume_rt.export.networks.dualvitok import ENCODER_SIDE_PROFILE, merge_quants, pixel_decoder_component
from illume_rt.contract import GRAPH_IO, PIXEL_PATCH


class PixelEmbedder(nn.Module):
    def __init__(self, pixel_encoder: nn.Module, pixel_projector: nn.Module) -> None:
        super().__init__()
        self.pixel_encoder, self.pixel_projector = pixel_encoder, pixel_projector

    def forward(self, image):
        features = self.pixel_encoder(image)  # [1, C, h, w]
        tokens = features.flatten(2).transpose(1, 2)[0]  # [h*w, C], raster order
        return (self.pixel_projector(tokens),)


def pixel_embedder_component(preset: Preset, pixel_encoder: nn.Module, pixel_projector: nn.Module) -> Component:
    channels = preset.pixel_encoder.in_channels

    def make_inputs(dims, rng):
        return {"image": rng.uniform(-1, 1, (1, channels, dims["height"], dims["width"])).astype(np.float32)}

    return Component(
        name="pixel_embedder",
        inputs=(TensorSpec(GRAPH_IO["pixel_embedder"][0][0], "float32", (1, channels, "height", "width")),),
        outputs=(TensorSpec(GRAPH_IO["pixel_embedder"][1][0], "float32", ("tokens", preset.llm.hidden_size)),),
        dims={"height": (5 * PIXEL_PATCH, 3 * PIXEL_PATCH, ENCODER_SIDE_PROFILE),
              "width": (7 * PIXEL_PATCH, 4 * PIXEL_PATCH, ENCODER_SIDE_PROFILE)},
        build_module=lambda: PixelEmbedder(pixel_encoder, pixel_projector).eval(),
        make_inputs=make_inputs,
        tolerance=Tolerance(),
        description=(f"MLLM pixel encoder + pixel projector: image in [-1, 1] (sides multiples of {PIXEL_PATCH}) "
                     f"-> one row per {PIXEL_PATCH}x{PIXEL_PATCH}-px cell, row-major"),
    )


class TokenMap(nn.Module):
    def forward(self, semantic_embed, pixel_embed):
        return (merge_quants(semantic_embed, pixel_embed),)


def token_map_component(preset: Preset, model) -> Component:
    """Same inputs, dims and sample data as the pixel decoder (one description of the code embeddings)."""
    decoder = pixel_decoder_component(preset, model)
    dim = preset.codebook.dim
    return Component(
        name="token_map",
        inputs=decoder.inputs,
        outputs=(TensorSpec(GRAPH_IO["token_map"][1][0], "float32", ("batch", 2 * dim, "pix_rows", "pix_cols")),),
        dims=decoder.dims,
        build_module=lambda: TokenMap().eval(),
        make_inputs=decoder.make_inputs,
        tolerance=Tolerance(),
        description=f"[bicubic(semantic_embed -> pixel grid), pixel_embed]: the {2 * dim}-channel diffusion condition",
    )

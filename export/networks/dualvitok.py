"""DualViTok pixel path: SimVQ codebooks, MoVQ pixel encoder and decoder, and their export descriptors.

Written here from the facts of the official implementation (GitHub illume-unified-mllm/ILLUME_plus, commit 51de69d);
structure, order of operations and state-dict key names follow it. Paths are under vision_tokenizer/tokenizer/:

| here                     | official                                                                            |
|--------------------------|-------------------------------------------------------------------------------------|
| SimVQCodebook            | vector_quantize_pytorch/sim_vq.py SimVQ: L50-66 (buffer ``frozen_codebook`` =       |
|                          | randn * dim**-0.5, ``code_transform`` = Linear(dim, dim, bias=False)), L82-96       |
|                          | (``codebook``, ``indices_to_codes``), L113-132 (nearest code: cdist argmin, blocks  |
|                          | of 32768); the registered subclass in quantizer.py L34-38 adds no keys              |
| effective_codebook       | sim_vq.py L86-96: code = code_transform(frozen_codebook[index])                     |
| silu                     | movqgan/modeling_movqgan.py L28-34 (MoVQActivation, x * sigmoid(x))                 |
| Upsample, Downsample     | modeling_movqgan.py L37-52, L139-155 (only when use_dc_up_down_blocks is False)     |
| DCDownBlock2d            | modeling_movqgan.py L55-93                                                          |
| DCUpBlock2d              | modeling_movqgan.py L96-136                                                         |
| SpatialNorm              | modeling_movqgan.py L158-211 (add_conv False, as every official use)                |
| ResnetBlock              | modeling_movqgan.py L214-295                                                        |
| AttnBlock                | modeling_movqgan.py L298-406 (the SDPA branch L375-385, one head)                   |
| MoVQEncoder              | modeling_movqgan.py L459-565                                                        |
| MoVQDecoder              | modeling_movqgan.py L568-680                                                        |
| DualViTokPixel           | dualvitok_model.py DualViTok L518-545 (sub-module names), L573-585 (encode, pixel   |
|                          | half), L640-669 (merge_quants, decode), L671-674 (decode_code); hyper-parameters    |
|                          | from configs/example/dualvitok/dualvitok_anyres_max512.py                           |
| pixel_encoder_component  | ILLUME/illume/model/multimodal_encoder/dual_encoder.py L84, L110, L134: the MLLM    |
|                          | feeds ``pixel_encoder(image)`` to its projector, WITHOUT pixel_quant_conv           |

Deviations: the same functions, checked against the official modules loaded with this module's state dict
(max |diff| 1e-6 to 1e-5, float rounding; tests/test_dualvitok.py::test_parity_with_official_movq):
- GroupNorm groups come from ``MoVQConfig.norm_groups`` (32 in the official presets, as the official code hard-codes;
  the tiny preset's 8-channel levels need fewer).
- Attention is written as two batched matmuls with softmax over key positions and scale 1/sqrt(c) (the function of
  the official xformers and SDPA branches, one head); fewer ops than SDPA for the exporter to trace.
- DCDownBlock2d's shortcut (pixel_unshuffle, groups of 4 channels, mean) is a 2x2 average pool when in == out channels,
  as in every official use: the same numbers, and much cheaper to export with dynamic height/width.
- SpatialNorm with a power-of-two upscaling of zq (every decoder level) applies its 1x1 conv_y / conv_b to zq and
  broadcasts their outputs over the nearest-resize blocks instead of resizing zq first: the same numbers, without
  full-resolution tensors (SpatialNorm.forward); other sizes resize as the official code does.
- Dropout modules (p=0.0, no state) and the unused ``conv_shortcut`` / SpatialNorm ``add_conv`` options are left out.
- ``merge_quants`` has no training-time pixel dropout/noise (``apply_noise`` is training only).
- Random weights (``build_dualvitok_pixel``) are drawn from a generator seeded by ``preset.seed``; SpatialNorm's
  ``conv_y`` bias starts at 1 so an untrained decoder modulates around identity and gives a non-degenerate image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from illume_rt.export.components import Component, TensorSpec, Tolerance
from illume_rt.export.configs import CodebookConfig, MoVQConfig, Preset
from illume_rt.contract import GRAPH_IO, PIXEL_PATCH, image_grid, supported_resolutions

NEAREST_BLOCK = 32768  # codes compared per block in the nearest-code search (official sim_vq.py L114)


# ----------------------------------------------------------------------------------------------------------------
# SimVQ codebooks
# ----------------------------------------------------------------------------------------------------------------
class SimVQCodebook(nn.Module):
    """A frozen Gaussian codebook seen through a learned bias-free linear map (inference part of official SimVQ).

    State: ``frozen_codebook`` [codebook_size, dim] (buffer) and ``code_transform.weight`` [dim, dim].
    Channel-first like the official config (``channel_first=True``).
    """

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.register_buffer("frozen_codebook", torch.empty(codebook_size, dim))
        self.code_transform = nn.Linear(dim, dim, bias=False)

    def lookup_table(self) -> torch.Tensor:
        """Every code vector, [codebook_size, dim]: code_transform applied to each frozen row."""
        return self.code_transform(self.frozen_codebook)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """[b, ...] int -> [b, dim, ...]: gather frozen rows, then transform (official op order)."""
        codes = self.code_transform(self.frozen_codebook[indices])
        return codes.movedim(-1, 1)

    @torch.no_grad()
    def nearest_indices(self, x: torch.Tensor) -> torch.Tensor:
        """[b, dim, ...] features -> [b, ...] index of the nearest code (Euclidean), as official SimVQ.forward."""
        b, spatial = x.shape[0], x.shape[2:]
        flat = x.movedim(1, -1).reshape(b, -1, self.dim).float()
        table = self.lookup_table().float()
        best_dist, best_idx = None, None
        for start in range(0, table.shape[0], NEAREST_BLOCK):
            dist = torch.cdist(flat, table[start:start + NEAREST_BLOCK].unsqueeze(0))
            d, i = dist.min(dim=-1)
            i = i + start
            if best_dist is None:
                best_dist, best_idx = d, i
            else:
                take = d < best_dist  # ties keep the earlier block, as the official stacked min does
                best_dist, best_idx = torch.where(take, d, best_dist), torch.where(take, i, best_idx)
        return best_idx.reshape(b, *spatial)


@torch.no_grad()
def effective_codebook(quantizer: SimVQCodebook) -> np.ndarray:
    """The lookup table the runtime uses: row k = official indices_to_codes(k), float32 [codebook_size, dim].

    Computed in float32 (weights stored in another dtype are upcast first). Lazy (checkpoint) weights are read
    here (export/streaming.py); the two tensors are small.
    """
    from illume_rt.export.streaming import real

    weight = real(quantizer.code_transform.weight).float()
    frozen = real(quantizer.frozen_codebook).float()
    return F.linear(frozen, weight).cpu().numpy().astype(np.float32, copy=False)


def effective_codebooks(model: "DualViTokPixel") -> dict[str, np.ndarray]:
    """{'semantic': [semantic_size, dim], 'pixel': [pixel_size, dim]} float32 tables."""
    return {"semantic": effective_codebook(model.semantic_quantizer),
            "pixel": effective_codebook(model.pixel_quantizer)}


# ----------------------------------------------------------------------------------------------------------------
# MoVQ building blocks
# ----------------------------------------------------------------------------------------------------------------
def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv (non-DC variant)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Pad right/bottom by one, then 3x3 stride-2 conv (non-DC variant)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class DCDownBlock2d(nn.Module):
    """conv (out/4 channels) + pixel_unshuffle, plus a pixel_unshuffle shortcut averaged over channel groups."""

    factor = 2

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        ratio = self.factor ** 2
        if out_channels % ratio:
            raise ValueError(f"DCDownBlock2d: {out_channels} output channels are not a multiple of {ratio}")
        self.group_size = in_channels * ratio // out_channels
        self.conv = nn.Conv2d(in_channels, out_channels // ratio, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pixel_unshuffle(self.conv(x), self.factor)
        if self.group_size == self.factor ** 2:
            # pixel_unshuffle puts the 4 sub-pixels of one channel next to each other, so the group mean is a 2x2
            # average pool: the same numbers, and far cheaper to trace with dynamic shapes and to run.
            y = F.avg_pool2d(x, self.factor)
        else:
            y = F.pixel_unshuffle(x, self.factor).unflatten(1, (-1, self.group_size)).mean(dim=2)
        return h + y


class DCUpBlock2d(nn.Module):
    """conv (4x out channels) + pixel_shuffle, plus a repeat_interleave + pixel_shuffle shortcut."""

    factor = 2

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        ratio = self.factor ** 2
        self.repeats = out_channels * ratio // in_channels
        self.conv = nn.Conv2d(in_channels, out_channels * ratio, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pixel_shuffle(self.conv(x), self.factor)
        y = F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), self.factor)
        return h + y


def resize_nearest(zq: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """zq nearest-resized to like's grid; returned as is when it is already there (nearest to the same size is the
    identity, so skipping it changes no number and keeps the graph free of no-op Resize nodes)."""
    if zq.shape[-2:] == like.shape[-2:]:
        return zq
    return F.interpolate(zq, size=like.shape[-2:], mode="nearest")


class SpatialNorm(nn.Module):
    """GroupNorm(x) * conv_y(zq) + conv_b(zq), zq nearest-resized to x's grid first."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = group_norm(channels, groups)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1, 1, 0)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        rows, cols = zq.shape[-2:]
        up_rows, up_cols = height // rows, width // cols
        if (height % rows or width % cols or up_rows & (up_rows - 1) or up_cols & (up_cols - 1)
                or (up_rows, up_cols) == (1, 1)):
            zq = resize_nearest(zq, x)  # the official form
            return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)
        # Power-of-two upscaling (every level of the decoder): nearest resizing copies each zq pixel into an
        # up_rows x up_cols block, and conv_y / conv_b are 1x1 (per pixel), so they run on zq itself and their
        # outputs are broadcast over the blocks. Same numbers; no full-resolution copy of zq or of the two conv
        # outputs exists. (onnxruntime schedules branches that depend only on the graph's inputs early: as
        # full-resolution tensors, every SpatialNorm's conv outputs were held at once, 0.6 GB at 512x512.)
        scale = self.conv_y(zq)[:, :, :, None, :, None]
        shift = self.conv_b(zq)[:, :, :, None, :, None]
        blocks = self.norm_layer(x).reshape(batch, channels, rows, up_rows, cols, up_cols)
        return (blocks * scale + shift).reshape(batch, channels, height, width)


class ResnetBlock(nn.Module):
    """norm1, silu, conv1, norm2, silu, conv2; 1x1 nin_shortcut when channels change. SpatialNorm when zq_ch."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, zq_ch: int | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.zq_ch = in_channels, out_channels, zq_ch
        if zq_ch is None:
            self.norm1, self.norm2 = group_norm(in_channels, groups), group_norm(out_channels, groups)
        else:
            self.norm1 = SpatialNorm(in_channels, zq_ch, groups)
            self.norm2 = SpatialNorm(out_channels, zq_ch, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        extra = () if self.zq_ch is None else (zq,)
        h = self.conv1(silu(self.norm1(x, *extra)))
        h = self.conv2(silu(self.norm2(h, *extra)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1 convs for q, k, v and proj_out, residual."""

    def __init__(self, channels: int, groups: int, zq_ch: int | None = None):
        super().__init__()
        self.zq_ch = zq_ch
        self.norm = group_norm(channels, groups) if zq_ch is None else SpatialNorm(channels, zq_ch, groups)
        self.q = nn.Conv2d(channels, channels, 1, 1, 0)
        self.k = nn.Conv2d(channels, channels, 1, 1, 0)
        self.v = nn.Conv2d(channels, channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        nx = self.norm(x) if self.zq_ch is None else self.norm(x, zq)
        b, c, h, w = x.shape
        # One head: softmax(q^T k / sqrt(c)) over key positions, as the official SDPA/xformers branches. Written
        # with two batched matmuls on [b, c, h*w] views (the same maths as SDPA, far fewer ops to trace/export).
        q, k, v = (t.flatten(2) for t in (self.q(nx), self.k(nx), self.v(nx)))  # [b, c, hw]
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * (c ** -0.5), dim=-1)  # [b, hw_q, hw_k]
        o = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(o)


class _Level(nn.Module):
    """One resolution level: ``block`` and ``attn`` lists, optional ``downsample``/``upsample`` (official names)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, zq_ch: int | None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, zq_ch)
        self.attn_1 = AttnBlock(channels, groups, zq_ch)
        self.block_2 = ResnetBlock(channels, channels, groups, zq_ch)

    def forward(self, h: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        extra = () if zq is None else (zq,)
        return self.block_2(self.attn_1(self.block_1(h, *extra), *extra), *extra)


class MoVQEncoder(nn.Module):
    """Image [b, 3, H, W] -> z [b, z_channels, H/16, W/16] (for ch_mult of length 5)."""

    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        self.cfg = cfg
        groups = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i_level, mult in enumerate(cfg.ch_mult):
            level = _Level()
            block_in, block_out = cfg.ch * in_ch_mult[i_level], cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, groups))
                block_in = block_out
                if i_level in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, groups))
            if i_level != len(cfg.ch_mult) - 1:
                level.downsample = DCDownBlock2d(block_in) if cfg.use_dc_up_down_blocks else Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, groups, None)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)
        self.out_shortcut_average_group_size = block_in // cfg.z_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        h = silu(self.norm_out(h))
        if self.cfg.use_dc_up_down_blocks:
            return self.conv_out(h) + h.unflatten(1, (-1, self.out_shortcut_average_group_size)).mean(dim=2)
        return self.conv_out(h)


class MoVQDecoder(nn.Module):
    """z [b, z_channels, h, w] modulated by zq [b, embed_dim, h, w] -> image [b, out_channels, 16h, 16w]."""

    def __init__(self, cfg: MoVQConfig):
        super().__init__()
        self.cfg = cfg
        groups, zq_ch = cfg.norm_groups, cfg.embed_dim
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.in_shortcut_repeats = block_in // cfg.embed_dim
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, groups, zq_ch)
        self.up = nn.ModuleList()
        for i_level in reversed(range(len(cfg.ch_mult))):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, groups, zq_ch))
                block_in = block_out
                if i_level in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, groups, zq_ch))
            if i_level != 0:
                level.upsample = DCUpBlock2d(block_in) if cfg.use_dc_up_down_blocks else Upsample(block_in)
            self.up.insert(0, level)
        self.norm_out = SpatialNorm(block_in, zq_ch, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        if self.cfg.use_dc_up_down_blocks:
            h = self.conv_in(z) + z.repeat_interleave(self.in_shortcut_repeats, dim=1)
        else:
            h = self.conv_in(z)
        h = self.mid(h, zq)
        for i_level in reversed(range(len(self.up))):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h, zq)  # each SpatialNorm brings zq to h's grid (see SpatialNorm.forward)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h, zq)
            if i_level != 0:
                h = level.upsample(h)
        h = silu(self.norm_out(h, zq))
        return self.conv_out(h)


# ----------------------------------------------------------------------------------------------------------------
# The container with the official key layout
# ----------------------------------------------------------------------------------------------------------------
def merge_quants(quant_semantic: torch.Tensor, quant_pixel: torch.Tensor) -> torch.Tensor:
    """Bicubic-resize the semantic map to the pixel grid (align_corners=False, no antialias), concat [sem, pix]."""
    semantic = F.interpolate(quant_semantic, size=quant_pixel.shape[-2:], mode="bicubic", align_corners=False)
    return torch.cat([semantic, quant_pixel], dim=1)


class DualViTokPixel(nn.Module):
    """The DualViTok sub-modules the runtime needs; ``state_dict()`` keys equal the official DualViTok keys.

    Load an official checkpoint with ``load_state_dict(sd, strict=False)`` after keeping only these prefixes:
    ``semantic_quantizer.``, ``pixel_encoder.``, ``pixel_quant_conv.``, ``pixel_quantizer.``,
    ``pixel_post_quant_conv.``, ``pixel_decoder.`` (the semantic encoder/decoder and the scaling layer are elsewhere).
    """

    PREFIXES = ("semantic_quantizer", "pixel_encoder", "pixel_quant_conv", "pixel_quantizer",
                "pixel_post_quant_conv", "pixel_decoder")

    def __init__(self, encoder: MoVQConfig, decoder: MoVQConfig, codebook: CodebookConfig):
        super().__init__()
        if decoder.embed_dim != 2 * codebook.dim:
            raise ValueError(f"pixel decoder embed_dim {decoder.embed_dim} must be 2 x codebook dim {codebook.dim} "
                             "(semantic and pixel codes are concatenated)")
        if encoder.embed_dim != codebook.dim:
            raise ValueError(f"pixel encoder embed_dim {encoder.embed_dim} != codebook dim {codebook.dim}")
        self.semantic_quantizer = SimVQCodebook(codebook.dim, codebook.semantic_size)
        self.pixel_encoder = MoVQEncoder(encoder)
        self.pixel_quant_conv = nn.Conv2d(encoder.z_channels, encoder.embed_dim, 1)
        self.pixel_quantizer = SimVQCodebook(codebook.dim, codebook.pixel_size)
        self.pixel_post_quant_conv = nn.Conv2d(decoder.embed_dim, decoder.z_channels, 1)
        self.pixel_decoder = MoVQDecoder(decoder)

    def encode_pixel(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> continuous pixel features before quantization (encoder + quant_conv)."""
        return self.pixel_quant_conv(self.pixel_encoder(image))

    def encode_pixel_code(self, image: torch.Tensor) -> torch.Tensor:
        """Image -> pixel code indices [b, H/16, W/16] (tokenizing for reconstruction tests)."""
        return self.pixel_quantizer.nearest_indices(self.encode_pixel(image))

    def decode(self, quant_semantic: torch.Tensor, quant_pixel: torch.Tensor) -> torch.Tensor:
        quant = merge_quants(quant_semantic, quant_pixel)
        return self.pixel_decoder(self.pixel_post_quant_conv(quant), quant)

    def decode_code(self, semantic_indices: torch.Tensor, pixel_indices: torch.Tensor) -> torch.Tensor:
        """Official DualViTok.decode_code: code grids [b, h1, w1], [b, h2, w2] -> image (not clamped)."""
        return self.decode(self.semantic_quantizer.indices_to_codes(semantic_indices),
                           self.pixel_quantizer.indices_to_codes(pixel_indices))


@torch.no_grad()
def init_random_weights_(model: DualViTokPixel, seed: int) -> DualViTokPixel:
    """Deterministic random weights from ``seed`` (a private generator; the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / math.sqrt(module.weight[0].numel())  # PyTorch's default (kaiming_uniform a=sqrt(5))
            module.weight.uniform_(-bound, bound, generator=g)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound, generator=g)
        elif isinstance(module, nn.GroupNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, SimVQCodebook):
            module.frozen_codebook.normal_(generator=g).mul_(module.dim ** -0.5)
    for module in model.modules():
        if isinstance(module, SpatialNorm):
            module.conv_y.bias.add_(1.0)
    return model


def build_dualvitok_pixel(preset: Preset, device: str | torch.device | None = None) -> DualViTokPixel:
    """The pixel path of ``preset`` with deterministic random weights from ``preset.seed``, in eval mode.

    ``device='meta'`` builds shapes only (no memory, no initialisation), e.g. to check the official key layout.
    """
    with torch.device("meta"):
        model = DualViTokPixel(preset.pixel_encoder, preset.pixel_decoder, preset.codebook)
    if device is not None and torch.device(device).type == "meta":
        return model.eval()
    model = model.to_empty(device=device or "cpu")
    return init_random_weights_(model, preset.seed).eval()


# ----------------------------------------------------------------------------------------------------------------
# Export forms and component descriptors
# ----------------------------------------------------------------------------------------------------------------
class PixelDecoderGraph(nn.Module):
    """(semantic_embed, pixel_embed) -> (image,): merge_quants, post_quant_conv, decoder. No clamp in the graph.

    Holds the same modules as the container under the same names, so initializer names are official keys.
    """

    def __init__(self, model: DualViTokPixel):
        super().__init__()
        self.pixel_post_quant_conv = model.pixel_post_quant_conv
        self.pixel_decoder = model.pixel_decoder

    def forward(self, semantic_embed: torch.Tensor, pixel_embed: torch.Tensor):
        quant = merge_quants(semantic_embed, pixel_embed)
        return (self.pixel_decoder(self.pixel_post_quant_conv(quant), quant),)


class PixelEncoderGraph(nn.Module):
    """image -> (pixel_features,): pixel_encoder, and pixel_quant_conv only when asked."""

    def __init__(self, model: DualViTokPixel, with_quant_conv: bool = False):
        super().__init__()
        self.pixel_encoder = model.pixel_encoder
        self.pixel_quant_conv = model.pixel_quant_conv if with_quant_conv else None

    def forward(self, image: torch.Tensor):
        h = self.pixel_encoder(image)
        if self.pixel_quant_conv is not None:
            h = self.pixel_quant_conv(h)
        return (h,)


# Export sample and verification sizes: small grids (the networks are fully convolutional; the bicubic resize ratio is
# not an integer in either case) so that verifying even the full-size model on a CPU takes seconds. The sample's dims
# all differ from each other and from 1, so the exporter can neither tie two of them together nor specialise one.
# Keys are the ImageGrid attributes; the encoder sees the pixel grid times PIXEL_PATCH.
_SAMPLE_GRID = {"semantic_rows": 3, "semantic_cols": 4, "pixel_rows": 5, "pixel_cols": 7}
_VERIFY_GRID = {"semantic_rows": 5, "semantic_cols": 6, "pixel_rows": 9, "pixel_cols": 11}
_BATCH = (2, 1, (1, 1, 4))  # decoder/encoder run once per image; a few images may share a call
# Understanding inputs: smart_resize with factor 16, 32x32 to 768x768 pixels of area, any aspect ratio (a side can
# fall to 16); a 4:1 image at the area cap is 384x1536. Editing inputs are anchors (sides up to 1024).
ENCODER_SIDE_PROFILE = (16, 512, 1536)


def _grid_profile(attr: str) -> tuple[int, int, int]:
    values = [getattr(image_grid(h, w), attr) for h, w in supported_resolutions()]
    return min(values), getattr(image_grid(512, 512), attr), max(values)


def pixel_decoder_component(preset: Preset, model: DualViTokPixel) -> Component:
    """Descriptor of the pixel decoder graph ("pixel_decoder")."""
    dim = preset.codebook.dim
    tables = effective_codebooks(model)
    dims = {"batch": _BATCH}
    for name, attr in (("sem_rows", "semantic_rows"), ("sem_cols", "semantic_cols"),
                       ("pix_rows", "pixel_rows"), ("pix_cols", "pixel_cols")):
        dims[name] = (_SAMPLE_GRID[attr], _VERIFY_GRID[attr], _grid_profile(attr))

    def make_inputs(d: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        def embed(table, rows, cols):  # real code vectors, channel-first
            idx = rng.integers(0, table.shape[0], size=(d["batch"], rows, cols))
            return np.ascontiguousarray(table[idx].transpose(0, 3, 1, 2), dtype=np.float32)

        return {"semantic_embed": embed(tables["semantic"], d["sem_rows"], d["sem_cols"]),
                "pixel_embed": embed(tables["pixel"], d["pix_rows"], d["pix_cols"])}

    return Component(
        name="pixel_decoder",
        inputs=(TensorSpec(GRAPH_IO["pixel_decoder"][0][0], "float32", ("batch", dim, "sem_rows", "sem_cols")),
                TensorSpec(GRAPH_IO["pixel_decoder"][0][1], "float32", ("batch", dim, "pix_rows", "pix_cols"))),
        outputs=(TensorSpec(GRAPH_IO["pixel_decoder"][1][0], "float32", ("batch", preset.pixel_decoder.out_channels, "height", "width")),),
        dims=dims,
        build_module=lambda: PixelDecoderGraph(model).eval(),
        make_inputs=make_inputs,
        tolerance=Tolerance(),
        description=(f"DualViTok pixel decoder: semantic_embed bicubic-resized to the pixel grid (align_corners "
                     f"False, no antialias), concat [semantic, pixel] ({2 * dim} ch), pixel_post_quant_conv, "
                     f"MoVQ decoder with SpatialNorm on that map. image is height={PIXEL_PATCH}*pix_rows x "
                     f"width={PIXEL_PATCH}*pix_cols, RGB roughly in [-1, 1], NOT clamped in the graph "
                     f"(the official post-processing is clamp(127.5*x + 128, 0, 255) then uint8)."),
    )


def pixel_encoder_component(preset: Preset, model: DualViTokPixel, with_quant_conv: bool = False) -> Component:
    """Descriptor of the pixel encoder graph ("pixel_encoder").

    By default the graph is ``pixel_encoder`` alone: the official MLLM (dual_encoder.py L84/L110/L134) projects the
    encoder output, never ``pixel_quant_conv``'s. ``with_quant_conv=True`` gives the tokenizer's pre-quantization
    features (encoder + quant_conv), for tokenizing an image.
    """
    cfg = preset.pixel_encoder
    channels = cfg.embed_dim if with_quant_conv else cfg.z_channels
    stride = 2 ** (len(cfg.ch_mult) - 1)
    sh, sw = stride * _SAMPLE_GRID["pixel_rows"], stride * _SAMPLE_GRID["pixel_cols"]
    vh, vw = stride * _VERIFY_GRID["pixel_rows"], stride * _VERIFY_GRID["pixel_cols"]

    def make_inputs(d: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = rng.uniform(-1.0, 1.0, size=(d["batch"], cfg.in_channels, d["height"], d["width"]))
        return {"image": image.astype(np.float32)}

    what = "pixel_encoder + pixel_quant_conv (tokenizer features)" if with_quant_conv else \
        "pixel_encoder (the continuous features the MLLM projects for understanding/editing)"
    return Component(
        name="pixel_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", cfg.in_channels, "height", "width")),),
        outputs=(TensorSpec("pixel_features", "float32", ("batch", channels, "pix_rows", "pix_cols")),),
        dims={"batch": _BATCH, "height": (sh, vh, ENCODER_SIDE_PROFILE), "width": (sw, vw, ENCODER_SIDE_PROFILE)},
        build_module=lambda: PixelEncoderGraph(model, with_quant_conv).eval(),
        make_inputs=make_inputs,
        tolerance=Tolerance(),
        description=(f"DualViTok {what}: image in [-1, 1], height and width multiples of {stride}; "
                     f"pix_rows = height/{stride}, pix_cols = width/{stride}."),
    )

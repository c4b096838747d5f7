"""Semantic vision tower (Qwen2-VL ViT + PatchMerger) and the two multimodal projectors of the ILLUME+ MLLM.

Which official code each part follows (ILLUME_plus, commit 51de69d; read for facts only, written anew here):

- ``PatchEmbed``: vision_tokenizer/tokenizer/qwen2vit/modeling_qwen2_vl.py:258-285 (Conv3d, kernel = stride =
  (temporal_patch, patch, patch), no bias, input viewed as (-1, C, T, P, P)).
- ``VisionRotaryEmbedding`` and ``rot_pos_freqs``: modeling_qwen2_vl.py:244-255 (inv_freq, theta 10000, dim =
  head_dim // 2, non-persistent buffer) and :792-819 (h/w position ids in spatial-merge window order, h freqs then
  w freqs); the rotation itself :213-229 (rotate_half, cos/sin repeated twice, computed in float32).
- ``VisionBlock`` / ``VisionAttention`` / ``VisionMlp``: modeling_qwen2_vl.py:587-606 (pre-norm LayerNorm eps 1e-6),
  :515-540 (qkv Linear -> (N, 3, heads, hd), rope on q and k, full attention, proj), :304-312 (fc1, quick_gelu, fc2;
  hidden_act "quick_gelu" and mlp_ratio 4 from configuration_qwen2_vl.py:32-41).
- ``PatchMerger``: modeling_qwen2_vl.py:288-301 (ln_q over embed_dim eps 1e-6, view merge**2 tokens, Linear, GELU,
  Linear -> out_dim).
- ``Qwen2VisionTransformer``: modeling_qwen2_vl.py:761-836 (patch_embed, blocks, merger; one image means one
  cu_seqlens segment, so attention is unmasked).
- Patch layout of the image: vision_tokenizer/tokenizer/dualvitok_model.py:100-153 (ScalingLayerForQwen2ViT: a
  still image is repeated temporal_patch_size times; patches are ordered (h/2, w/2, 2, 2) and flattened (C, T, P, P)).
  The export form does this in-graph: the Conv3d over two identical frames equals a Conv2d with the kernel summed over
  its temporal axis, then the patch grid is permuted to the same window order.
- Which output the MLLM uses: ILLUME/illume/model/multimodal_encoder/dual_encoder.py:85 (``self.semantic_encoder =
  vq_model.semantic_encoder.model``, i.e. the bare Qwen2-VL ViT with its merger, not DualViTok's extra blocks) and
  :125 and :143 (``h_semantic(s) = self.semantic_encoder(image_2, image_grid_thw)``: the 3584-d merger output).
- ``MLPProjector`` / ``MixedProjector``: ILLUME/illume/model/multimodal_projector/builder.py:73-114 (nn.Sequential of
  Linear, GELU, Linear; ``projector_1`` for the semantic features, ``projector_2`` for the pixel features), types
  from configs/_base_/models/qwen2_5_dualencoder.py:29-39 (MixedProjector of two MLPProjector, mlp_depth 2).

Checkpoint keys (released MLLM folder): ``IllumeQwen2ForCausalLM.model`` (illume_qwen2.py:228) is an
``IllumeMetaModel`` whose ``vision_tower`` and ``mm_projector`` attributes (illume_arch.py:41-44) hold the
DualVisionTower and the MixedProjector; DualVisionTower keeps the ViT as ``semantic_encoder`` (dual_encoder.py:85).
Hence ``model.vision_tower.semantic_encoder.<Qwen2VisionTransformer keys>`` (see ``VISION_TOWER_PREFIX``) and
``model.mm_projector.projector_{1,2}.{0,2}.{weight,bias}`` (see ``PROJECTOR_PREFIX``).

Token order: the merger emits one token per 2x2 window of 14-px patches in row-major order over the (h/28, w/28)
grid (windows are the outer loop of the ScalingLayer layout); illume_arch.py:273-274 views the projected tokens as
(h, w, C) with h = grid_h // 2, confirming raster order.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from illume_rt.contract import GRAPH_IO
from illume_rt.export.components import Component, TensorSpec, Tolerance
from illume_rt.export.configs import Preset, VisionTowerConfig

VISION_TOWER_PREFIX = "model.vision_tower.semantic_encoder."  # + Qwen2VisionTransformer.state_dict() keys
PROJECTOR_PREFIX = "model.mm_projector."  # + Projectors.state_dict() keys

LAYER_NORM_EPS = 1e-6
ROPE_THETA = 10000.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # ScalingLayerForQwen2ViT; applied by the caller, not in-graph
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Engine profile for the semantic encoder input. Understanding images are at most 768*768 pixels in AREA
# (DualVisionTower max_pixels), so one side may exceed 768: the side limit below covers area-capped images up to an
# aspect ratio of about 3:1 (e.g. 1328x432 -> 1316x420 at the ViT). Square 768x768 becomes 756x756 (the opt).
# The official resize floors each side to max(28, side // 28 * 28) (dualvitok_model.py:110), hence the minimum 28.
MIN_SIDE = 28
OPT_SIDE = 756
MAX_SIDE = 1344


def semantic_unit(cfg: VisionTowerConfig) -> int:
    """Pixels per side of one output token (patch 14 x merge 2 = 28)."""
    return cfg.patch_size * cfg.spatial_merge_size


def semantic_grid(cfg: VisionTowerConfig, height: int, width: int) -> tuple[int, int]:
    """Token grid (rows, cols) for a ViT input of height x width pixels; a clear error for a size it cannot take."""
    unit = semantic_unit(cfg)
    if height % unit or width % unit or height < unit or width < unit:
        raise ValueError(f"semantic encoder input {height}x{width} must be positive multiples of {unit} pixels; "
                         f"resize the image to (h // {unit} * {unit}, w // {unit} * {unit}) first")
    return height // unit, width // unit


# ----------------------------------------------------------------------------------------------------------------
# Qwen2-VL ViT
# ----------------------------------------------------------------------------------------------------------------

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def to_merge_order(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """[gh, gw, C] in raster order -> [gh*gw, C] in spatial-merge window order (h/m, w/m, m, m)."""
    gh, gw, c = grid.shape
    x = grid.reshape(gh // merge, merge, gw // merge, merge, c)
    return x.permute(0, 2, 1, 3, 4).reshape(gh * gw, c)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        self.in_channels, self.embed_dim = cfg.in_channels, cfg.embed_dim
        self.patch_size, self.temporal_patch_size = cfg.patch_size, cfg.temporal_patch_size
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Official layout: patches [N, C*T*P*P] flattened (C, T, P, P) -> [N, embed_dim]."""
        p, t = self.patch_size, self.temporal_patch_size
        x = patches.view(-1, self.in_channels, t, p, p).to(self.proj.weight.dtype)
        return self.proj(x).view(-1, self.embed_dim)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """A still image [1, C, H, W] -> raster patch grid [H/P, W/P, embed_dim].

        The official path repeats the image over the temporal axis before the Conv3d; a conv over T identical
        frames equals a 2D conv with the kernel summed over T, which is what runs here (half the work)."""
        weight = self.proj.weight.sum(dim=2)
        x = F.conv2d(pixel_values.to(weight.dtype), weight, stride=self.patch_size)
        return x[0].permute(1, 2, 0)


class VisionRotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = ROPE_THETA):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [..., 2] (row, col) -> freqs [..., dim]: row freqs then col freqs."""
        freqs = positions.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq
        return freqs.flatten(-2)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # [N, 3*dim] -> 3 x [1, heads, N, head_dim] (a unit batch axis: 4D attention for the exporters)
        q, k, v = self.qkv(x).reshape(1, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        dtype = q.dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
        out = F.scaled_dot_product_attention(q, k, v)  # full attention, scale 1/sqrt(head_dim)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = VisionMlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        self.hidden_size = cfg.embed_dim * cfg.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, cfg.out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


class Qwen2VisionTransformer(nn.Module):
    """The semantic encoder as the MLLM stores it (keys under ``VISION_TOWER_PREFIX``).

    ``forward(pixel_values)``: one normalized image [1, C, H, W], H and W multiples of 28 -> [H/28 * W/28, out_dim]
    in raster order of the 28x28 grid. ``forward_patches(patches, grid_hw)``: the official input form (flattened
    patches from ScalingLayerForQwen2ViT, grid in 14-px patches), same output."""

    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        self.config = cfg
        self.spatial_merge_size = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg)
        head_dim = cfg.embed_dim // cfg.num_heads
        self.rotary_pos_emb = VisionRotaryEmbedding(head_dim // 2)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rot_pos_freqs(self, grid_h, grid_w) -> torch.Tensor:
        """Rotary angles [gh*gw, head_dim/2] for a grid of 14-px patches, tokens in merge-window order.
        ``grid_h``/``grid_w`` may be symbolic sizes (computed in-graph at export)."""
        device = self.rotary_pos_emb.inv_freq.device
        rows = torch.arange(grid_h, device=device).unsqueeze(1).expand(-1, grid_w)
        cols = torch.arange(grid_w, device=device).unsqueeze(0).expand(grid_h, -1)
        positions = to_merge_order(torch.stack([rows, cols], dim=-1), self.spatial_merge_size)
        return self.rotary_pos_emb(positions)

    def _encode(self, hidden: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim], broadcast over (batch, heads)
        cos, sin = emb.cos(), emb.sin()
        for block in self.blocks:
            hidden = block(hidden, cos, sin)
        return self.merger(hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self.patch_embed.embed_image(pixel_values)  # [gh, gw, E]
        gh, gw = grid.shape[0], grid.shape[1]
        hidden = to_merge_order(grid, self.spatial_merge_size)
        return self._encode(hidden, self.rot_pos_freqs(gh, gw))

    def forward_patches(self, patches: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        hidden = self.patch_embed(patches)
        return self._encode(hidden, self.rot_pos_freqs(*grid_hw))


# ----------------------------------------------------------------------------------------------------------------
# Projectors
# ----------------------------------------------------------------------------------------------------------------

class MLPProjector(nn.Sequential):
    """Linear, GELU, Linear (official MLPProjector with mlp_depth 2, no pre-norm): keys 0.* and 2.*."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__(nn.Linear(in_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


class Projectors(nn.Module):
    """The MLLM's MixedProjector (keys under ``PROJECTOR_PREFIX``): projector_1 maps semantic ViT features,
    projector_2 maps pixel-encoder features, both to the LLM hidden size."""

    def __init__(self, semantic_dim: int, pixel_dim: int, hidden_size: int):
        super().__init__()
        self.projector_1 = MLPProjector(semantic_dim, hidden_size)
        self.projector_2 = MLPProjector(pixel_dim, hidden_size)

    @property
    def semantic_projector(self) -> MLPProjector:
        return self.projector_1

    @property
    def pixel_projector(self) -> MLPProjector:
        return self.projector_2

    def forward(self, semantic: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """Official order: projected semantic tokens, then projected pixel tokens, along the token axis."""
        return torch.cat([self.projector_1(semantic), self.projector_2(pixel)], dim=-2)


# ----------------------------------------------------------------------------------------------------------------
# Builders with deterministic random weights
# ----------------------------------------------------------------------------------------------------------------

def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def _init_random(module: nn.Module, gen: torch.Generator, residual_scale: float = 1.0,
                 residual_names: tuple[str, ...] = ()) -> None:
    """Fan-in scaled normal weights (residual output projections scaled down), small random biases and norm
    affines: keeps activations O(1) through any depth so outputs are finite and not degenerate."""
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv3d)):
            fan_in = sub.weight[0].numel()
            std = 1.0 / math.sqrt(fan_in)
            if name.endswith(residual_names) and residual_names:
                std *= residual_scale
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * std)
            if sub.bias is not None:
                sub.bias.copy_(torch.randn(sub.bias.shape, generator=gen) * 0.02)
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.copy_(1.0 + torch.randn(sub.weight.shape, generator=gen) * 0.05)
            sub.bias.copy_(torch.randn(sub.bias.shape, generator=gen) * 0.02)


def build_vision_tower(preset: Preset, device: torch.device | str | None = None) -> Qwen2VisionTransformer:
    """The semantic ViT + merger with random weights reproducible from ``preset.seed`` (eval mode).
    On the meta device nothing is initialized (shapes and key names only)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device(device):
        tower = Qwen2VisionTransformer(preset.vision_tower)
    if device.type != "meta":
        gen = _generator(preset.seed, "vision_tower")
        _init_random(tower, gen, residual_scale=1.0 / math.sqrt(2 * preset.vision_tower.depth),
                     residual_names=("attn.proj", "mlp.fc2"))
    return tower.eval()


def build_projectors(preset: Preset, device: torch.device | str | None = None) -> Projectors:
    """Both projectors (mm_hidden_size = preset.projector_in_dims -> llm hidden) with reproducible random weights."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    semantic_dim, pixel_dim = preset.projector_in_dims
    with torch.device(device):
        projectors = Projectors(semantic_dim, pixel_dim, preset.llm.hidden_size)
    if device.type != "meta":
        _init_random(projectors, _generator(preset.seed, "mm_projector"))
    return projectors.eval()


# ----------------------------------------------------------------------------------------------------------------
# Export form and component descriptor
# ----------------------------------------------------------------------------------------------------------------

class SemanticEncoderExport(nn.Module):
    """pixel_values [1, 3, H, W] (CLIP-normalized, H and W multiples of 28) -> (semantic_embeds [H/28*W/28, hidden],)
    = projector_1(merger(vit(x))), tokens in raster order of the 28x28 grid."""

    def __init__(self, tower: Qwen2VisionTransformer, semantic_projector: nn.Module):
        super().__init__()
        self.tower = tower
        self.projector = semantic_projector
        self.unit = semantic_unit(tower.config)

    def forward(self, pixel_values: torch.Tensor):
        torch._check(pixel_values.shape[2] % self.unit == 0)
        torch._check(pixel_values.shape[3] % self.unit == 0)
        return (self.projector(self.tower(pixel_values)),)


def vision_tower_component(preset: Preset, tower: Qwen2VisionTransformer, projectors: Projectors) -> Component:
    cfg = preset.vision_tower
    unit = semantic_unit(cfg)

    def make_inputs(dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        semantic_grid(cfg, dims["height"], dims["width"])  # validates
        x = rng.standard_normal((1, cfg.in_channels, dims["height"], dims["width"]), dtype=np.float32)
        return {"pixel_values": x}

    return Component(
        name="semantic_encoder",
        inputs=(TensorSpec(GRAPH_IO["semantic_encoder"][0][0], "float32", (1, cfg.in_channels, "height", "width")),),
        outputs=(TensorSpec(GRAPH_IO["semantic_encoder"][1][0], "float32", ("tokens", preset.llm.hidden_size)),),
        # export sample 56x84, verification 84x56 (both dims change, so neither can have been fixed)
        dims={"height": (2 * unit, 3 * unit, (MIN_SIDE, OPT_SIDE, MAX_SIDE)),
              "width": (3 * unit, 2 * unit, (MIN_SIDE, OPT_SIDE, MAX_SIDE))},
        build_module=lambda: SemanticEncoderExport(tower, projectors.projector_1).eval(),
        make_inputs=make_inputs,
        tolerance=Tolerance(),
        verify_at_size=lambda path, seed, storage: verify_sampled_blocks(preset, tower, projectors.projector_1, path,
                                                                         seed, storage),
        description=(f"Qwen2-VL ViT (patch {cfg.patch_size}, merge {cfg.spatial_merge_size}) + PatchMerger + "
                     f"semantic projector. Input: the image resized to multiples of {unit} px (bicubic, antialias), "
                     f"mapped to [0,1] and normalized with CLIP mean {CLIP_MEAN} / std {CLIP_STD}. Output: one row per "
                     f"{unit}x{unit}-px cell, row-major over (height/{unit}, width/{unit}); tokens = "
                     f"(height/{unit})*(width/{unit})."),
    )


def verify_sampled_blocks(preset: Preset, tower: Qwen2VisionTransformer, projector: nn.Module, path, seed: int,
                          storage) -> dict:
    """Verification of a semantic-encoder graph too large to compare whole (its weights are lazy,
    export/streaming.py; 2.6 GiB in fp32 at the official size), modelled on export/llm.py verify_sampled_layers.

    For each sampled ViT block (first, middle, last: export/sampled.py): (1) a one-block semantic encoder holding
    real copies of the patch embedding, that block, the merger and the projector, exported by the same code and
    streaming path (export_onnx's full check: PyTorch at two image sizes, both sides changing); (2) the stored
    weights of that block in ``path``'s external data compared byte for byte with the checkpoint's tensors, and
    those of the ends (patch embedding, merger, projector) once. This proves the export form is right at the real
    width on real weights, ends included, and that the big graph stores those tensors under the right names; it
    does not run the big graph (its other blocks are the same traced code)."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from illume_rt.export.components import export_onnx
    from illume_rt.export.sampled import compare_stored, sample_indices, storage_name

    cfg = preset.vision_tower
    blocks = sample_indices(cfg.depth)
    one_block = dataclasses.replace(preset, vision_tower=dataclasses.replace(cfg, depth=1))
    report: dict = {"ok": True, "method": "sampled", "blocks": blocks, "cases": [], "bytes_compared": 0,
                    "sample": f"ViT blocks {blocks} of {cfg.depth}, each exported as a one-block semantic encoder "
                              "with the real patch embedding, merger and projector and compared with PyTorch at "
                              "two sizes; the stored weights of those blocks and of the ends compared byte for byte"}
    cosines, errors = [], []
    ends = {f"tower.{name}": t for name, t in tower.named_parameters() if not name.startswith("blocks.")}
    ends.update({f"projector.{name}": t for name, t in projector.named_parameters()})
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=Path(path).parent) as scratch:
        for index in blocks:
            sub_tower, sub_projector = _one_block_modules(one_block, tower, projector, index)
            comp = vision_tower_component(one_block, sub_tower, _ProjectorOnly(sub_projector))
            comp.verify_at_size = None
            part = export_onnx(comp, comp.build_module(), Path(scratch) / f"block{index}.onnx", seed=seed,
                               storage=storage_name(storage))
            report["cases"] += [{"block": index, **case} for case in part["cases"]]
            cosines.append(part["worst_cosine"])
            errors.append(part["worst_max_abs_err"])
            del sub_tower, sub_projector, comp
            names = {f"tower.blocks.{index}.{name}": t for name, t in tower.blocks[index].named_parameters()}
            report["bytes_compared"] += compare_stored(path, names, storage)
    report["bytes_compared"] += compare_stored(path, ends, storage)
    report["worst_cosine"] = min(cosines)
    report["worst_max_abs_err"] = max(errors)
    return report


class _ProjectorOnly:
    """What ``vision_tower_component`` reads of a ``Projectors``: the semantic projector."""

    def __init__(self, projector_1: nn.Module) -> None:
        self.projector_1 = projector_1


def _one_block_modules(one_block: Preset, tower: Qwen2VisionTransformer, projector: nn.Module, index: int):
    """A one-block ``Qwen2VisionTransformer`` holding real copies of the patch embedding, block ``index`` and the
    merger of ``tower``, and a real copy of ``projector``."""
    from illume_rt.export.sampled import check_filled, real_copy

    cfg = one_block.vision_tower
    with torch.device("meta"):
        sub = Qwen2VisionTransformer(cfg)
        sub_projector = MLPProjector(projector[0].in_features, projector[0].out_features)
    sub.rotary_pos_emb = VisionRotaryEmbedding(cfg.embed_dim // cfg.num_heads // 2)  # non-persistent: recomputed
    for target, source in ((sub.patch_embed, tower.patch_embed), (sub.blocks[0], tower.blocks[index]),
                           (sub.merger, tower.merger), (sub_projector, projector)):
        real_copy(target, source)
    check_filled(sub, "one-block vision tower")
    check_filled(sub_projector, "projector")
    return sub.eval(), sub_projector.eval()

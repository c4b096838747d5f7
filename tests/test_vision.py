"""Semantic vision tower (Qwen2-VL ViT + merger) and projectors: official key names and shapes, patch/rope order
against straight re-statements of the official algorithms, a plain functional forward, and ONNX export."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from illume_rt.export.configs import get_preset
from illume_rt.export.networks import vision as V


@pytest.fixture(scope="module")
def tiny():
    preset = get_preset("tiny")
    return preset, V.build_vision_tower(preset), V.build_projectors(preset)


# ---------------------------------------------------------------- straightforward references (test-side only)

def ref_patchify(image: torch.Tensor, patch: int, temporal: int, merge: int) -> torch.Tensor:
    """ScalingLayerForQwen2ViT's layout, spelled out: repeat the still image over time, then one row per 14-px patch,
    rows ordered (h/m, w/m, m, m), columns flattened (C, T, P, P)."""
    _, c, h, w = image.shape
    gh, gw = h // patch, w // patch
    frames = image[0].unsqueeze(0).repeat(temporal, 1, 1, 1)  # [T, C, H, W]
    rows = []
    for bh in range(gh // merge):
        for bw in range(gw // merge):
            for k in range(merge):
                for l in range(merge):
                    r, q = (bh * merge + k) * patch, (bw * merge + l) * patch
                    cell = frames[:, :, r:r + patch, q:q + patch]  # [T, C, P, P]
                    rows.append(cell.permute(1, 0, 2, 3).reshape(-1))
    return torch.stack(rows)


def ref_positions(gh: int, gw: int, merge: int) -> list[tuple[int, int]]:
    """Official rot_pos_emb position ids (row, col) per token, by a plain loop over windows."""
    return [(bh * merge + k, bw * merge + l)
            for bh in range(gh // merge) for bw in range(gw // merge) for k in range(merge) for l in range(merge)]


def ref_rope_freqs(gh: int, gw: int, merge: int, rot_dim: int) -> torch.Tensor:
    inv = [1.0 / (10000.0 ** (2 * i / rot_dim)) for i in range(rot_dim // 2)]
    full = torch.tensor([[p * f for f in inv] for p in range(max(gh, gw))], dtype=torch.float64)
    pos = ref_positions(gh, gw, merge)
    return torch.stack([torch.cat([full[r], full[c]]) for r, c in pos])


def ref_forward(sd: dict, cfg, patches: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Qwen2-VL ViT + merger from the state dict with explicit ops (float64), official op order."""
    sd = {k: v.double() for k, v in sd.items()}
    x = patches.double() @ sd["patch_embed.proj.weight"].reshape(cfg.embed_dim, -1).T
    n, heads = x.shape[0], cfg.num_heads
    hd = cfg.embed_dim // heads
    freqs = ref_rope_freqs(gh, gw, cfg.spatial_merge_size, hd // 2)  # [N, hd/2]
    cos = freqs.cos().repeat(1, 2)[:, None, :]
    sin = freqs.sin().repeat(1, 2)[:, None, :]

    def rot(t):  # rotate_half convention
        return torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], dim=-1)

    def ln(t, p):
        return F.layer_norm(t, (t.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    for i in range(cfg.depth):
        b = f"blocks.{i}."
        h = ln(x, b + "norm1")
        qkv = (h @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).reshape(n, 3, heads, hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, heads, hd]
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        scores = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(hd)
        attn = torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v).reshape(n, -1)
        x = x + attn @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        h = ln(x, b + "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    x = ln(x, "merger.ln_q").reshape(-1, cfg.embed_dim * cfg.spatial_merge_size ** 2)
    x = F.gelu(x @ sd["merger.mlp.0.weight"].T + sd["merger.mlp.0.bias"])
    return x @ sd["merger.mlp.2.weight"].T + sd["merger.mlp.2.bias"]


def expected_tower_shapes(cfg) -> dict[str, tuple]:
    e, hidden, merged = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.embed_dim * cfg.spatial_merge_size ** 2
    shapes = {"patch_embed.proj.weight": (e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (e,), b + "norm1.bias": (e,), b + "norm2.weight": (e,),
                       b + "norm2.bias": (e,), b + "attn.qkv.weight": (3 * e, e), b + "attn.qkv.bias": (3 * e,),
                       b + "attn.proj.weight": (e, e), b + "attn.proj.bias": (e,),
                       b + "mlp.fc1.weight": (hidden, e), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (e, hidden), b + "mlp.fc2.bias": (e,)})
    shapes.update({"merger.ln_q.weight": (e,), "merger.ln_q.bias": (e,),
                   "merger.mlp.0.weight": (merged, merged), "merger.mlp.0.bias": (merged,),
                   "merger.mlp.2.weight": (cfg.out_dim, merged), "merger.mlp.2.bias": (cfg.out_dim,)})
    return shapes


def expected_projector_shapes(sem: int, pix: int, hidden: int) -> dict[str, tuple]:
    shapes = {}
    for name, d in (("projector_1", sem), ("projector_2", pix)):
        shapes.update({f"{name}.0.weight": (hidden, d), f"{name}.0.bias": (hidden,),
                       f"{name}.2.weight": (hidden, hidden), f"{name}.2.bias": (hidden,)})
    return shapes


# ---------------------------------------------------------------- key names and shapes

def test_tiny_state_dict_keys_and_shapes(tiny):
    preset, tower, projectors = tiny
    got = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert got == expected_tower_shapes(preset.vision_tower)  # exact key set: no extra buffers (inv_freq)
    got = {k: tuple(v.shape) for k, v in projectors.state_dict().items()}
    assert got == expected_projector_shapes(*preset.projector_in_dims, preset.llm.hidden_size)
    assert projectors.pixel_projector is projectors.projector_2
    norms = [m for m in tower.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * preset.vision_tower.depth + 1 and all(m.eps == 1e-6 for m in norms)  # official eps
    assert projectors.semantic_projector is projectors.projector_1


@pytest.mark.parametrize("name,hidden", [("3b", 2048), ("7b", 3584)])
def test_official_key_names_on_meta(name, hidden):
    preset = get_preset(name)
    tower = V.build_vision_tower(preset, device="meta")
    projectors = V.build_projectors(preset, device="meta")
    assert all(p.is_meta for p in tower.parameters())
    sd = {V.VISION_TOWER_PREFIX + k: tuple(v.shape) for k, v in tower.state_dict().items()}
    sd.update({V.PROJECTOR_PREFIX + k: tuple(v.shape) for k, v in projectors.state_dict().items()})
    vt, mp = "model.vision_tower.semantic_encoder.", "model.mm_projector."
    official = {
        vt + "patch_embed.proj.weight": (1280, 3, 2, 14, 14),
        vt + "blocks.0.norm1.weight": (1280,),
        vt + "blocks.0.attn.qkv.weight": (3840, 1280),
        vt + "blocks.0.attn.qkv.bias": (3840,),
        vt + "blocks.31.attn.proj.weight": (1280, 1280),
        vt + "blocks.31.mlp.fc1.weight": (5120, 1280),
        vt + "blocks.31.mlp.fc2.weight": (1280, 5120),
        vt + "blocks.31.norm2.bias": (1280,),
        vt + "merger.ln_q.weight": (1280,),
        vt + "merger.mlp.0.weight": (5120, 5120),
        vt + "merger.mlp.2.weight": (3584, 5120),
        vt + "merger.mlp.2.bias": (3584,),
        mp + "projector_1.0.weight": (hidden, 3584),
        mp + "projector_1.2.weight": (hidden, hidden),
        mp + "projector_2.0.weight": (hidden, 32),
        mp + "projector_2.2.bias": (hidden,),
    }
    for key, shape in official.items():
        assert sd.get(key) == shape, key
    absent = [vt + "patch_embed.proj.bias", vt + "blocks.32.norm1.weight", vt + "rotary_pos_emb.inv_freq",
              mp + "projector_1.1.weight"]
    assert not any(k in sd for k in absent)
    n_vit = sum(p.numel() for p in tower.parameters())
    assert abs(n_vit - 676e6) < 1e6  # "QwenViT-600M" + merger: 676M in the facts sheet
    if name == "3b":
        assert abs(sum(p.numel() for p in projectors.parameters()) - 16e6) < 0.5e6


# ---------------------------------------------------------------- order of patches, rope and tokens

@pytest.mark.parametrize("gh,gw", [(2, 2), (4, 6), (6, 4), (8, 10)])
def test_rope_positions_match_official_loop(tiny, gh, gw):
    preset, tower, _ = tiny
    cfg = preset.vision_tower
    rot_dim = cfg.embed_dim // cfg.num_heads // 2
    got = tower.rot_pos_freqs(gh, gw).double()
    assert got.shape == (gh * gw, rot_dim)
    torch.testing.assert_close(got, ref_rope_freqs(gh, gw, cfg.spatial_merge_size, rot_dim), rtol=1e-6, atol=1e-6)
    # merged token j (4 consecutive patches) is window j in raster order of the (gh/2, gw/2) grid
    pos = ref_positions(gh, gw, cfg.spatial_merge_size)
    m2 = cfg.spatial_merge_size ** 2
    for j in range(gh * gw // m2):
        cells = {(r // 2, c // 2) for r, c in pos[j * m2:(j + 1) * m2]}
        assert cells == {divmod(j, gw // 2)}


def test_patch_layout_matches_scaling_layer(tiny):
    preset, tower, _ = tiny
    cfg = preset.vision_tower
    image = torch.randn(1, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    patches = ref_patchify(image, cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size)
    with torch.no_grad():
        official = tower.patch_embed(patches)  # Conv3d on the official layout
        grid = tower.patch_embed.embed_image(image)  # in-graph Conv2d + window permutation
        mine = V.to_merge_order(grid, cfg.spatial_merge_size)
        torch.testing.assert_close(mine, official, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tower(image), tower.forward_patches(patches, (4, 6)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,w", [(56, 84), (84, 56)])
def test_forward_matches_functional_reference(tiny, h, w):
    preset, tower, _ = tiny
    cfg = preset.vision_tower
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h + w))
    patches = ref_patchify(image, cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size)
    want = ref_forward(tower.state_dict(), cfg, patches, h // cfg.patch_size, w // cfg.patch_size)
    with torch.no_grad():
        got = tower(image).double()
    assert got.shape == ((h // 28) * (w // 28), cfg.out_dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- builders

def test_builders_are_deterministic_and_non_degenerate(tiny):
    preset, tower, projectors = tiny
    again = V.build_vision_tower(preset)
    assert all(torch.equal(a, b) for a, b in zip(tower.state_dict().values(), again.state_dict().values()))
    other = V.build_vision_tower(dataclasses.replace(preset, seed=preset.seed + 1))
    assert not torch.equal(tower.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)
    module = V.vision_tower_component(preset, tower, projectors).build_module()
    with torch.no_grad():
        out = module(torch.randn(1, 3, 84, 112, generator=torch.Generator().manual_seed(3)))[0]
    assert out.shape == (3 * 4, preset.llm.hidden_size)
    assert torch.isfinite(out).all()
    assert out.std() > 0.05 and out.std(dim=0).min() > 1e-3  # tokens differ from each other
    pix = projectors.pixel_projector(torch.randn(5, preset.pixel_encoder.embed_dim))
    assert pix.shape == (5, preset.llm.hidden_size) and torch.isfinite(pix).all()


def test_projectors_concat_semantic_then_pixel(tiny):
    preset, _, projectors = tiny
    sem = torch.randn(1, 6, preset.vision_tower.out_dim)
    pix = torch.randn(1, 4, preset.pixel_encoder.embed_dim)
    with torch.no_grad():
        out = projectors(sem, pix)
        torch.testing.assert_close(out[:, :6], projectors.projector_1(sem))
        torch.testing.assert_close(out[:, 6:], projectors.projector_2(pix))
        lin0, lin2 = projectors.projector_1[0], projectors.projector_1[2]
        torch.testing.assert_close(projectors.projector_1(sem), lin2(F.gelu(lin0(sem))))


# ---------------------------------------------------------------- descriptor and export

def test_component_descriptor(tiny):
    preset, tower, projectors = tiny
    comp = V.vision_tower_component(preset, tower, projectors)
    assert comp.name == "semantic_encoder"
    assert comp.input_names() == ["pixel_values"] and comp.output_names() == ["semantic_embeds"]
    s0, s1 = comp.sample_dims(0), comp.sample_dims(1)
    assert s0 != s1 and min(*s0.values(), *s1.values()) >= 56
    assert all(v % 28 == 0 for v in (*s0.values(), *s1.values()))
    for lo, opt, hi in comp.profiles().values():
        assert lo <= opt <= hi and hi >= 756 and all(v % 28 == 0 for v in (lo, opt, hi))
    arrays = comp.make_inputs(s1, np.random.default_rng(0))
    assert arrays["pixel_values"].shape == (1, 3, s1["height"], s1["width"])
    assert arrays["pixel_values"].dtype == np.float32
    with pytest.raises(ValueError, match="multiples of 28"):
        comp.make_inputs({"height": 60, "width": 56}, np.random.default_rng(0))


def test_onnx_export_verifies(tiny, tiny_bundle):
    """The semantic encoder graph as the session's tiny export wrote it (conftest.py tiny_bundle: export_onnx of this
    component on these modules' weights, the preset's seed), with its verification report; not exported again."""
    from conftest import export_report

    preset, tower, projectors = tiny
    comp = V.vision_tower_component(preset, tower, projectors)
    report, path = export_report(tiny_bundle, comp.name)
    assert report["ok"] and path.exists()
    assert [c["dims"] for c in report["cases"]] == [comp.sample_dims(0), comp.sample_dims(1)]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((1, 3, 112, 168), dtype=np.float32)  # a third, unseen size
    got = session.run(None, {"pixel_values": x})[0]
    with torch.no_grad():
        want = comp.build_module()(torch.from_numpy(x))[0].numpy()
    assert got.shape == (4 * 6, preset.llm.hidden_size)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

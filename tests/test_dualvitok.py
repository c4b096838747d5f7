"""DualViTok pixel path: codebook tables, official key layout, shapes, and ONNX export of both graphs (tiny preset)."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from illume_rt.export.components import export_onnx
from illume_rt.export.configs import MoVQConfig, get_preset
from illume_rt.export.networks import dualvitok as dvt
from illume_rt.contract import image_grid, supported_resolutions

from conftest import export_report


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny networks are far faster single-threaded on a small shared CPU (no OpenMP barrier waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def model(tiny):
    return dvt.build_dualvitok_pixel(tiny)


# ------------------------------------------------------------------------------------------------------------------
# Codebooks
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["semantic", "pixel"])
def test_effective_table_equals_official_lookup(model, tiny, which):
    q = getattr(model, f"{which}_quantizer")
    size = tiny.codebook.semantic_size if which == "semantic" else tiny.codebook.pixel_size
    table = dvt.effective_codebook(q)
    assert table.dtype == np.float32 and table.shape == (size, tiny.codebook.dim)

    idx = torch.randint(0, size, (2, 3, 5), generator=torch.Generator().manual_seed(1))
    idx[0, 0, 0], idx[0, 0, 1] = 0, size - 1
    with torch.no_grad():
        # official SimVQ.indices_to_codes: gather frozen rows, bias-free linear, then channel-first
        want = (q.frozen_codebook[idx] @ q.code_transform.weight.T).permute(0, 3, 1, 2).numpy()
        via_module = q.indices_to_codes(idx).numpy()
    got = table[idx.numpy()].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(via_module, want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(table, q.frozen_codebook.numpy(), atol=1e-3)  # the transform was applied


def test_effective_codebooks_dict(model, tiny):
    tables = dvt.effective_codebooks(model)
    assert set(tables) == {"semantic", "pixel"}
    assert tables["pixel"].shape == (tiny.codebook.pixel_size, tiny.codebook.dim)


@pytest.mark.parametrize("block", [dvt.NEAREST_BLOCK, 100])
def test_nearest_indices_is_brute_force_argmin(model, monkeypatch, block):
    monkeypatch.setattr(dvt, "NEAREST_BLOCK", block)  # 100: the multi-block path on the 384-code table
    q = model.pixel_quantizer
    table = dvt.effective_codebook(q)
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, table.std(), size=(2, table.shape[1], 4, 6)).astype(np.float32)
    got = q.nearest_indices(torch.from_numpy(x)).numpy()
    flat = x.transpose(0, 2, 3, 1)[..., None, :]
    want = np.argmin(((flat - table) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(got, want)

    idx = rng.integers(0, table.shape[0], size=(1, 3, 5))
    near = table[idx].transpose(0, 3, 1, 2) + rng.normal(0, 1e-5, size=(1, table.shape[1], 3, 5))
    np.testing.assert_array_equal(q.nearest_indices(torch.from_numpy(near.astype(np.float32))).numpy(), idx)


# ------------------------------------------------------------------------------------------------------------------
# State-dict layout, written out here from the official code (modeling_movqgan.py, dualvitok_model.py, sim_vq.py)
# ------------------------------------------------------------------------------------------------------------------
def _conv(keys, name, cin, cout, k):
    keys[f"{name}.weight"] = (cout, cin, k, k)
    keys[f"{name}.bias"] = (cout,)


def _norm(keys, name, c, zq):
    if zq is None:
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)
    else:  # MoVQSpatialNorm
        keys[f"{name}.norm_layer.weight"], keys[f"{name}.norm_layer.bias"] = (c,), (c,)
        _conv(keys, f"{name}.conv_y", zq, c, 1)
        _conv(keys, f"{name}.conv_b", zq, c, 1)


def _resnet(keys, name, cin, cout, zq):
    _norm(keys, f"{name}.norm1", cin, zq)
    _conv(keys, f"{name}.conv1", cin, cout, 3)
    _norm(keys, f"{name}.norm2", cout, zq)
    _conv(keys, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(keys, f"{name}.nin_shortcut", cin, cout, 1)


def _attn(keys, name, c, zq):
    _norm(keys, f"{name}.norm", c, zq)
    for part in ("q", "k", "v", "proj_out"):
        _conv(keys, f"{name}.{part}", c, c, 1)


def official_layout(enc: MoVQConfig, dec: MoVQConfig, dim: int, sem_size: int, pix_size: int) -> dict:
    keys: dict = {}
    for name, size in (("semantic_quantizer", sem_size), ("pixel_quantizer", pix_size)):
        keys[f"{name}.frozen_codebook"] = (size, dim)
        keys[f"{name}.code_transform.weight"] = (dim, dim)
    # MoVQEncoder
    p = "pixel_encoder"
    _conv(keys, f"{p}.conv_in", enc.in_channels, enc.ch, 3)
    in_mult = (1,) + tuple(enc.ch_mult)
    for lvl, mult in enumerate(enc.ch_mult):
        cin, cout = enc.ch * in_mult[lvl], enc.ch * mult
        for b in range(enc.num_res_blocks):
            _resnet(keys, f"{p}.down.{lvl}.block.{b}", cin, cout, None)
            cin = cout
            if lvl in enc.attn_resolutions:
                _attn(keys, f"{p}.down.{lvl}.attn.{b}", cout, None)
        if lvl != len(enc.ch_mult) - 1:  # DCDownBlock2d: conv to in/4 channels
            _conv(keys, f"{p}.down.{lvl}.downsample.conv", cout, cout // 4, 3)
    top = enc.ch * enc.ch_mult[-1]
    _resnet(keys, f"{p}.mid.block_1", top, top, None)
    _attn(keys, f"{p}.mid.attn_1", top, None)
    _resnet(keys, f"{p}.mid.block_2", top, top, None)
    _norm(keys, f"{p}.norm_out", top, None)
    _conv(keys, f"{p}.conv_out", top, enc.z_channels, 3)
    _conv(keys, "pixel_quant_conv", enc.z_channels, enc.embed_dim, 1)
    # MoVQDecoder
    _conv(keys, "pixel_post_quant_conv", dec.embed_dim, dec.z_channels, 1)
    p, zq = "pixel_decoder", dec.embed_dim
    cin = dec.ch * dec.ch_mult[-1]
    _conv(keys, f"{p}.conv_in", dec.z_channels, cin, 3)
    _resnet(keys, f"{p}.mid.block_1", cin, cin, zq)
    _attn(keys, f"{p}.mid.attn_1", cin, zq)
    _resnet(keys, f"{p}.mid.block_2", cin, cin, zq)
    for lvl in reversed(range(len(dec.ch_mult))):
        cout = dec.ch * dec.ch_mult[lvl]
        for b in range(dec.num_res_blocks + 1):
            _resnet(keys, f"{p}.up.{lvl}.block.{b}", cin, cout, zq)
            cin = cout
            if lvl in dec.attn_resolutions:
                _attn(keys, f"{p}.up.{lvl}.attn.{b}", cout, zq)
        if lvl != 0:  # DCUpBlock2d: conv to 4x channels, then pixel_shuffle
            _conv(keys, f"{p}.up.{lvl}.upsample.conv", cout, cout * 4, 3)
    _norm(keys, f"{p}.norm_out", cin, zq)
    _conv(keys, f"{p}.conv_out", cin, dec.out_channels, 3)
    return keys


def _layout_of(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("preset_name", ["tiny", "3b", "7b"])
def test_state_dict_matches_official_layout(preset_name):
    preset = get_preset(preset_name)
    m = dvt.build_dualvitok_pixel(preset, device="meta")
    want = official_layout(preset.pixel_encoder, preset.pixel_decoder, preset.codebook.dim,
                           preset.codebook.semantic_size, preset.codebook.pixel_size)
    got = _layout_of(m)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want


def test_tiny_real_weights_have_the_same_layout(model, tiny):
    meta = dvt.build_dualvitok_pixel(tiny, device="meta")
    assert _layout_of(model) == _layout_of(meta)
    assert all(not v.is_meta for v in model.state_dict().values())


# Read off the official code for configs/example/dualvitok/dualvitok_anyres_max512.py (encoder ch 128, decoder ch 384,
# ch_mult 1,1,2,2,4, attention at level 4, z/embed 32 and 64, SimVQ 32768 and 98304 codes of dim 32).
OFFICIAL_SHAPES = {
    "semantic_quantizer.frozen_codebook": (32768, 32),
    "semantic_quantizer.code_transform.weight": (32, 32),
    "pixel_quantizer.frozen_codebook": (98304, 32),
    "pixel_quantizer.code_transform.weight": (32, 32),
    "pixel_encoder.conv_in.weight": (128, 3, 3, 3),
    "pixel_encoder.down.0.block.0.norm1.weight": (128,),
    "pixel_encoder.down.0.downsample.conv.weight": (32, 128, 3, 3),
    "pixel_encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "pixel_encoder.down.3.downsample.conv.weight": (64, 256, 3, 3),
    "pixel_encoder.down.4.attn.1.q.weight": (512, 512, 1, 1),
    "pixel_encoder.mid.attn_1.norm.weight": (512,),
    "pixel_encoder.norm_out.weight": (512,),
    "pixel_encoder.conv_out.weight": (32, 512, 3, 3),
    "pixel_quant_conv.weight": (32, 32, 1, 1),
    "pixel_post_quant_conv.weight": (64, 64, 1, 1),
    "pixel_decoder.conv_in.weight": (1536, 64, 3, 3),
    "pixel_decoder.mid.block_1.norm1.norm_layer.weight": (1536,),
    "pixel_decoder.mid.block_1.norm1.conv_y.weight": (1536, 64, 1, 1),
    "pixel_decoder.mid.attn_1.norm.conv_b.bias": (1536,),
    "pixel_decoder.up.4.attn.2.proj_out.weight": (1536, 1536, 1, 1),
    "pixel_decoder.up.4.upsample.conv.weight": (6144, 1536, 3, 3),
    "pixel_decoder.up.3.block.0.nin_shortcut.weight": (768, 1536, 1, 1),
    "pixel_decoder.up.1.upsample.conv.weight": (1536, 384, 3, 3),
    "pixel_decoder.up.0.block.2.conv2.weight": (384, 384, 3, 3),
    "pixel_decoder.norm_out.norm_layer.weight": (384,),
    "pixel_decoder.norm_out.conv_y.weight": (384, 64, 1, 1),
    "pixel_decoder.conv_out.weight": (3, 384, 3, 3),
}
OFFICIAL_ABSENT = (
    "pixel_encoder.down.4.downsample.conv.weight",  # no downsample at the lowest level
    "pixel_encoder.down.4.attn.2.q.weight",  # num_res_blocks = 2 attention blocks in the encoder
    "pixel_encoder.down.3.attn.0.q.weight",  # attention only at level 4
    "pixel_decoder.up.0.upsample.conv.weight",  # no upsample at level 0
    "pixel_decoder.up.4.attn.3.q.weight",  # num_res_blocks + 1 = 3 per decoder level
    "pixel_decoder.up.4.block.3.conv1.weight",
    "pixel_decoder.up.3.attn.0.q.weight",
    "pixel_decoder.up.4.block.0.nin_shortcut.weight",  # 1536 -> 1536
    "pixel_decoder.mid.block_1.norm1.weight",  # SpatialNorm, not GroupNorm, in the decoder
    "pixel_encoder.mid.block_1.norm1.norm_layer.weight",  # GroupNorm, not SpatialNorm, in the encoder
)


def test_official_key_names_and_shapes_on_meta():
    m = dvt.build_dualvitok_pixel(get_preset("3b"), device="meta")
    sd = m.state_dict()
    assert all(v.is_meta for v in sd.values())
    for key, shape in OFFICIAL_SHAPES.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in OFFICIAL_ABSENT:
        assert key not in sd, key
    # illume-plus-facts.md section 1 (derived there independently): pixel decoder 476M, pixel encoder 27M params
    assert round(sum(p.numel() for p in m.pixel_decoder.parameters()) / 1e6) == 476
    assert round(sum(p.numel() for p in m.pixel_encoder.parameters()) / 1e6) == 27


# ------------------------------------------------------------------------------------------------------------------
# Random init and shapes
# ------------------------------------------------------------------------------------------------------------------
def test_random_init_is_deterministic_and_leaves_global_rng(tiny, model):
    state = torch.get_rng_state()
    again = dvt.build_dualvitok_pixel(tiny)
    assert torch.equal(state, torch.get_rng_state())
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = dvt.build_dualvitok_pixel(dataclasses.replace(tiny, seed=tiny.seed + 1))
    assert not torch.equal(a["pixel_decoder.conv_in.weight"], other.state_dict()["pixel_decoder.conv_in.weight"])


def _codes(grid, tiny, seed=0):
    g = torch.Generator().manual_seed(seed)
    sem = torch.randint(0, tiny.codebook.semantic_size, (1, grid.semantic_rows, grid.semantic_cols), generator=g)
    pix = torch.randint(0, tiny.codebook.pixel_size, (1, grid.pixel_rows, grid.pixel_cols), generator=g)
    return sem, pix


@pytest.mark.parametrize("height,width", [(256, 256), (384, 512)])
def test_decoder_output_shape_and_values(model, tiny, height, width):
    grid = image_grid(height, width)
    sem, pix = _codes(grid, tiny)
    with torch.no_grad():
        image = model.decode_code(sem, pix)
    assert image.shape == (1, 3, height, width)
    assert torch.isfinite(image).all()
    assert image.std() > 1e-2 and image.abs().max() < 10  # not constant, roughly image-scaled


def test_graph_on_table_lookups_equals_official_decode_code(model, tiny):
    """The runtime path (numpy tables -> export-form graph) gives what official decode_code gives."""
    grid = image_grid(256, 256)
    sem, pix = _codes(grid, tiny, seed=3)
    tables = dvt.effective_codebooks(model)
    sem_embed = torch.from_numpy(np.ascontiguousarray(tables["semantic"][sem.numpy()].transpose(0, 3, 1, 2)))
    pix_embed = torch.from_numpy(np.ascontiguousarray(tables["pixel"][pix.numpy()].transpose(0, 3, 1, 2)))
    graph = dvt.PixelDecoderGraph(model).eval()
    with torch.no_grad():
        (got,) = graph(sem_embed, pix_embed)
        want = model.decode_code(sem, pix)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zq_grid,x_grid",
                         [((5, 7), (40, 56)), ((5, 7), (5, 7)), ((4, 6), (12, 18)), ((5, 7), (9, 13))], ids=["power-of-two", "same-grid", "factor-3", "not-a-multiple"])
def test_spatial_norm_equals_the_official_form(zq_grid, x_grid):
    """Low-resolution conv_y/conv_b broadcast over the nearest blocks == official resize-then-convs."""
    torch.manual_seed(0)
    norm = dvt.SpatialNorm(8, 6, groups=4).eval()
    x, zq = torch.randn(2, 8, *x_grid), torch.randn(2, 6, *zq_grid)
    with torch.no_grad():
        got = norm(x, zq)
        up = dvt.resize_nearest(zq, x)
        want = norm.norm_layer(x) * norm.conv_y(up) + norm.conv_b(up)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_quants_is_bicubic_then_concat():
    sem, pix = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 7)
    merged = dvt.merge_quants(sem, pix)
    assert merged.shape == (1, 4, 5, 7)
    want = torch.nn.functional.interpolate(sem, size=(5, 7), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(merged[:, :2], want)
    torch.testing.assert_close(merged[:, 2:], pix)


def test_encoder_shapes_and_tokenizing(model, tiny):
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        (feat,) = dvt.PixelEncoderGraph(model).eval()(image)
        (pre_q,) = dvt.PixelEncoderGraph(model, with_quant_conv=True).eval()(image)
        codes = model.encode_pixel_code(image)
    assert feat.shape == (1, tiny.pixel_encoder.z_channels, 4, 3)
    assert pre_q.shape == (1, tiny.pixel_encoder.embed_dim, 4, 3)
    torch.testing.assert_close(pre_q, model.pixel_quant_conv(feat))
    assert codes.shape == (1, 4, 3) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < tiny.codebook.pixel_size


def test_attention_equals_official_sdpa_branch():
    """modeling_movqgan.py L375-385: 'b (n c) h w -> b n (h w) c', SDPA, back; one head; proj_out; residual."""
    torch.manual_seed(0)
    block = dvt.AttnBlock(16, 4, zq_ch=8).eval()
    x, zq = torch.randn(2, 16, 3, 5), torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        got = block(x, zq)
        nx = block.norm(x, zq)
        q, k, v = (t(nx).flatten(2).transpose(1, 2).unsqueeze(1) for t in (block.q, block.k, block.v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(2, 16, 3, 5)
        want = x + block.proj_out(o)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dc_down_shortcut_equals_official_group_mean():
    """modeling_movqgan.py L80-93: pixel_unshuffle, unflatten(1, (-1, group_size)), mean(2)."""
    torch.manual_seed(0)
    block = dvt.DCDownBlock2d(8).eval()
    x = torch.randn(2, 8, 6, 10)
    with torch.no_grad():
        got = block(x)
        f = torch.nn.functional
        want = f.pixel_unshuffle(block.conv(x), 2) + f.pixel_unshuffle(x, 2).unflatten(1, (-1, 4)).mean(dim=2)
    assert got.shape == (2, 8, 3, 5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_dc_up_block_shapes():
    block = dvt.DCUpBlock2d(8).eval()
    assert block.conv.out_channels == 32 and block.repeats == 4
    with torch.no_grad():
        assert block(torch.randn(1, 8, 3, 5)).shape == (1, 8, 6, 10)


def test_non_dc_variant_builds_and_runs(tiny):
    enc = dataclasses.replace(tiny.pixel_encoder, use_dc_up_down_blocks=False)
    dec = dataclasses.replace(tiny.pixel_decoder, use_dc_up_down_blocks=False)
    m = dvt.init_random_weights_(dvt.DualViTokPixel(enc, dec, tiny.codebook), 0).eval()
    assert tuple(m.state_dict()["pixel_decoder.up.1.upsample.conv.weight"].shape) == (16, 16, 3, 3)
    with torch.no_grad():
        feat = m.pixel_encoder(torch.rand(1, 3, 32, 48) * 2 - 1)
        image = m.decode(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 3))
    assert feat.shape == (1, 8, 2, 3) and image.shape == (1, 3, 32, 48)


# ------------------------------------------------------------------------------------------------------------------
# Descriptors and ONNX export
# ------------------------------------------------------------------------------------------------------------------
def test_profiles_cover_every_supported_resolution(model, tiny):
    dec = dvt.pixel_decoder_component(tiny, model)
    enc = dvt.pixel_encoder_component(tiny, model)
    dp, ep = dec.profiles(), enc.profiles()
    for h, w in supported_resolutions():
        g = image_grid(h, w)
        for dim, value in (("sem_rows", g.semantic_rows), ("sem_cols", g.semantic_cols),
                           ("pix_rows", g.pixel_rows), ("pix_cols", g.pixel_cols)):
            lo, opt, hi = dp[dim]
            assert lo <= opt <= hi and lo <= value <= hi, (h, w, dim)
        assert ep["height"][0] <= h <= ep["height"][2] and ep["width"][0] <= w <= ep["width"][2]
    for comp in (dec, enc):
        s, v = comp.sample_dims(0), comp.sample_dims(1)
        assert min(s.values()) >= 2 and s != v
        for d in s:
            assert s[d] != v[d], d  # every dim is exercised at two sizes


def _onnx_dim_params(path):
    import onnx

    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}
    return dims, {n.op_type for n in graph.node}


def _ort_run(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_export_pixel_decoder_onnx(model, tiny, tiny_bundle):
    """The pixel decoder graph as the session's tiny export wrote it (conftest.py tiny_bundle: export_onnx of this
    component on this module's weights, the preset's seed), not exported again here: its trace is the slowest."""
    comp = dvt.pixel_decoder_component(tiny, model)
    report, path = export_report(tiny_bundle, "pixel_decoder")
    assert report["ok"] and len(report["cases"]) == 2
    dims, ops = _onnx_dim_params(path)
    import onnx

    # only the bicubic semantic-to-pixel-grid resize: no full-resolution copy of zq hangs off the graph input
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Resize") == 1
    assert dims["semantic_embed"] == ["batch", tiny.codebook.dim, "sem_rows", "sem_cols"]
    assert dims["pixel_embed"] == ["batch", tiny.codebook.dim, "pix_rows", "pix_cols"]
    assert dims["image"] == ["batch", 3, "height", "width"]
    assert "Clip" not in ops  # the graph does not clamp
    # a real anchor (256x256: 9x9 semantic, 16x16 pixel), a third size the export never saw
    feeds = comp.make_inputs({"batch": 1, "sem_rows": 9, "sem_cols": 9, "pix_rows": 16, "pix_cols": 16},
                             np.random.default_rng(7))
    got = _ort_run(path, feeds)
    with torch.no_grad():
        (want,) = comp.build_module()(*(torch.from_numpy(feeds[n]) for n in comp.input_names()))
    assert got.shape == (1, 3, 256, 256)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_export_pixel_encoder_onnx(model, tiny, tmp_path):
    comp = dvt.pixel_encoder_component(tiny, model)
    path = tmp_path / "pixel_encoder.onnx"
    report = export_onnx(comp, comp.build_module(), path)
    assert report["ok"] and len(report["cases"]) == 2
    dims, _ = _onnx_dim_params(path)
    assert dims["image"] == ["batch", 3, "height", "width"]
    assert dims["pixel_features"] == ["batch", tiny.pixel_encoder.z_channels, "pix_rows", "pix_cols"]
    # the profile's smallest side (16 px: a 1-row feature grid) runs too
    lo = comp.profiles()["height"][0]
    image = np.random.default_rng(3).uniform(-1, 1, size=(1, 3, lo, 3 * lo)).astype(np.float32)
    got = _ort_run(path, {"image": image})
    with torch.no_grad():
        (want,) = comp.build_module()(torch.from_numpy(image))
    assert got.shape == (1, tiny.pixel_encoder.z_channels, 1, 3)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


# Parity with the official MoVQ modules needs a checkout of ILLUME_plus, which CI cannot fetch: it is the script
# tests/manual/official_movq_parity.py (its docstring says how to run it, and the last recorded result).

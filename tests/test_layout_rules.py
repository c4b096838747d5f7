"""The rules of illume_rt/contract.py and runtime/options.py (runtime/layout.py when mutation-tested) written out: grids, size tags, vocabulary checks, seeds, threads and sampling
settings, each at its boundaries and with the message a user sees. Fast and torch-free (the mutation run of
layout.py uses it with tests/test_layout.py: bench/mutation/README.md)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from illume_rt.contract import (ImageGrid, LayoutError, VocabLayout, compact_vocab_layout, image_grid,
                                official_vocab_layout, parse_resolution, supported_resolutions)
from illume_rt.runtime.options import MAX_SEED, SamplingConfig, check_seed, check_threads

# (height, width) in the order of the official RESOLUTION_MAPPING, and the diffusion decoder's resolution index of the
# 2x output (its table is (W, H): 0 1024x1024, 2 1024x768 (W x H), 4 2048x512, 6 1920x640, 8 1536x768, 10 1152x768, 11
# 512x512 and the transposes one below)
RESOLUTION_INDEX = {(256, 256): 11, (512, 512): 0, (384, 512): 2, (512, 384): 1, (384, 768): 8, (768, 384): 7,
                    (256, 1024): 4, (1024, 256): 3, (576, 384): 9, (384, 576): 10, (320, 960): 6, (960, 320): 5}


def test_supported_resolutions_in_table_order():
    assert supported_resolutions() == list(RESOLUTION_INDEX)


@pytest.mark.parametrize("size", list(RESOLUTION_INDEX))
def test_grid_properties(size):
    grid = image_grid(*size)
    assert (grid.height, grid.width) == size
    assert grid.diffusion_resolution_index == RESOLUTION_INDEX[size]
    assert grid.num_structural == grid.semantic_rows + grid.pixel_rows + 5
    assert grid.num_codes == grid.semantic_rows * grid.semantic_cols + grid.pixel_rows * grid.pixel_cols
    assert grid.num_tokens == 1 + grid.num_codes + grid.num_structural
    assert (grid.pixel_rows, grid.pixel_cols) == (size[0] // 16, size[1] // 16)
    assert parse_resolution(f"{size[0]}x{size[1]}") == size


# RESOLUTION_MAPPING of the official vision_tokenizer/tokenizer/dualvitok_model.py, copied as it stands there:
# (width, height) of the output -> (width, height) the semantic branch resizes to
OFFICIAL_RESOLUTION_MAPPING = {
    (256, 256): (252, 252), (512, 512): (504, 504), (512, 384): (448, 336), (384, 512): (336, 448),
    (768, 384): (728, 364), (384, 768): (364, 728), (1024, 256): (1008, 252), (256, 1024): (252, 1008),
    (384, 576): (336, 504), (576, 384): (504, 336), (960, 320): (924, 308), (320, 960): (308, 924),
}


def test_semantic_resize_is_the_official_mapping():
    from illume_rt.runtime.images import semantic_size

    for (width, height), (sem_w, sem_h) in OFFICIAL_RESOLUTION_MAPPING.items():
        assert semantic_size(height, width) == (sem_h, sem_w)
        grid = image_grid(height, width)
        assert (grid.semantic_rows, grid.semantic_cols) == (sem_h // 28, sem_w // 28)
    assert semantic_size(100, 60) == (84, 56)  # elsewhere: down to a multiple of the 28-px patch


def test_grid_counts_on_an_uneven_grid():
    grid = ImageGrid(height=10, width=20, semantic_rows=2, semantic_cols=3, pixel_rows=5, pixel_cols=7)
    assert (grid.num_codes, grid.num_structural, grid.num_tokens) == (41, 12, 54)
    assert grid.diffusion_size == (20, 40)


def test_resolution_errors_name_every_valid_size():
    valid = "256x256, 512x512, 384x512, 512x384, 384x768, 768x384, 256x1024, 1024x256, 576x384, 384x576, 320x960, " \
            "960x320"
    with pytest.raises(LayoutError) as info:
        image_grid(512, 500)
    assert str(info.value) == f"unsupported resolution 512x500 (height x width); use one of: {valid}"
    with pytest.raises(LayoutError) as info:
        parse_resolution("384x500")
    assert str(info.value).startswith("unsupported resolution 384x500")
    assert parse_resolution("384X512") == (384, 512)
    for text in ("big", "512", "512x512x3", "x512", ""):
        with pytest.raises(LayoutError) as info:
            parse_resolution(text)
        assert str(info.value) == f"resolution {text!r} is not HEIGHTxWIDTH, e.g. 512x512"


# -- vocabulary ----------------------------------------------------------------------------------------------------

def test_compact_layout_packs_everything_after_the_text():
    v = compact_vocab_layout(text_vocab_size=100, semantic_codebook_size=10, pixel_codebook_size=20, row_multiple=64)
    assert (v.pad_id, v.im_start_id, v.im_end_id) == (100, 101, 102)
    assert (v.start_of_image_id, v.end_of_image_id, v.end_of_line_id) == (103, 104, 105)
    assert (v.start_of_level0_id, v.end_of_level0_id, v.start_of_level1_id, v.end_of_level1_id) == (106, 107, 108, 109)
    assert (v.first_height_tag_id, v.first_width_tag_id) == (110, 126)
    assert v.semantic_range == (142, 152) and v.pixel_range == (152, 172)
    assert v.text_range == (0, 142) and v.text_vocab_size == 100
    assert v.vocab_rows == 192  # 172 rounded up to a multiple of 64
    exact = compact_vocab_layout(text_vocab_size=100, semantic_codebook_size=10, pixel_codebook_size=20,
                                 row_multiple=43)
    assert exact.vocab_rows == 172  # already a multiple: no padding row
    assert compact_vocab_layout(100, 10, 20).vocab_rows == 192  # default multiple 64
    assert (v.num_size_tags, v.size_tag_step) == (16, 64)


def test_official_layout_rows_and_ranges():
    v = official_vocab_layout(300_000)
    assert v.vocab_rows == 300_000 and v.text_vocab_size == 151643
    assert v.head_range("text") == (0, 151704)
    assert v.head_range("semantic") == (151704, 184472) and v.head_range("pixel") == (184472, 282776)
    with pytest.raises(ValueError, match="smaller than the last pixel code"):
        official_vocab_layout(282775)
    assert official_vocab_layout(282776).vocab_rows == 282776


def test_head_range_of_an_unknown_slice():
    with pytest.raises(ValueError) as info:
        compact_vocab_layout(10, 4, 4).head_range("image")
    assert str(info.value) == "unknown head slice 'image'; one of text, semantic, pixel"


def test_layout_refuses_overlaps_at_the_exact_boundary():
    base = compact_vocab_layout(text_vocab_size=10, semantic_codebook_size=4, pixel_codebook_size=6, row_multiple=1)
    fields = base.to_dict()
    assert VocabLayout.from_dict(fields) == base and fields["pixel_code_offset"] == fields["semantic_code_offset"] + 4
    with pytest.raises(ValueError, match="^pixel codes overlap semantic codes$"):
        VocabLayout.from_dict({**fields, "pixel_code_offset": fields["pixel_code_offset"] - 1})
    assert VocabLayout.from_dict({**fields, "pixel_code_offset": fields["pixel_code_offset"] + 1,
                                  "vocab_rows": fields["vocab_rows"] + 1}).pixel_range[1] == fields["vocab_rows"] + 1
    with pytest.raises(ValueError, match="^vocab_rows is smaller than the last pixel code$"):
        VocabLayout.from_dict({**fields, "vocab_rows": fields["vocab_rows"] - 1})
    with pytest.raises(TypeError):
        VocabLayout.from_dict({**fields, "unknown": 1})


def test_size_tags_at_their_boundaries():
    v = compact_vocab_layout(text_vocab_size=10, semantic_codebook_size=4, pixel_codebook_size=4)
    assert v.height_tag(64) == v.first_height_tag_id and v.height_tag(1024) == v.first_height_tag_id + 15
    assert v.width_tag(64) == v.first_width_tag_id and v.width_tag(1024) == v.first_width_tag_id + 15
    assert v.width_tag(128) == v.first_width_tag_id + 1
    for size in (0, 63, 65, 1088, -64):
        with pytest.raises(LayoutError) as info:
            v.height_tag(size)
        assert str(info.value) == f"no height tag for {size}: sizes are multiples of 64 up to 1024"
    with pytest.raises(LayoutError, match="^no width tag for 100:"):
        v.width_tag(100)
    small = VocabLayout.from_dict({**v.to_dict(), "num_size_tags": 2, "size_tag_step": 32})
    assert small.height_tag(64) == v.first_height_tag_id + 1
    with pytest.raises(LayoutError, match="multiples of 32 up to 64"):
        small.height_tag(96)


def test_image_token_ids_written_out():
    v = compact_vocab_layout(text_vocab_size=10, semantic_codebook_size=5, pixel_codebook_size=7, row_multiple=1)
    grid = ImageGrid(height=7, width=9, semantic_rows=1, semantic_cols=2, pixel_rows=2, pixel_cols=1)
    sem, pix = [np.array([3, 4])], [[np.int64(6)], [0]]
    s, p = v.semantic_code_offset, v.pixel_code_offset
    assert v.image_token_ids(grid, sem, pix) == [
        v.start_of_image_id, v.start_of_level0_id, s + 3, s + 4, v.end_of_line_id,
        v.end_of_level0_id, v.start_of_level1_id, p + 6, v.end_of_line_id, p + 0, v.end_of_line_id,
        v.end_of_level1_id, v.end_of_image_id]
    assert all(type(i) is int for i in v.image_token_ids(grid, sem, pix))
    with pytest.raises(LayoutError) as info:
        v.image_token_ids(grid, sem, pix[:1])
    assert str(info.value) == "code grids do not match the 7x9 layout"


# -- seeds and threads ---------------------------------------------------------------------------------------------

def test_seeds():
    assert check_seed(None) is None
    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED == 2**63 - 1
    seed = check_seed(np.int64(7))
    assert seed == 7 and type(seed) is int
    for bad in (-1, MAX_SEED + 1, True, False, 1.0, "3", np.float64(2)):
        with pytest.raises(LayoutError) as info:
            check_seed(bad)
        assert str(info.value) == f"seed must be a whole number from 0 to {MAX_SEED}, got {bad!r}"


def test_threads(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert check_threads(None) is None
    assert check_threads(1) == 1 and check_threads(4) == 4
    threads = check_threads(np.int32(2))
    assert threads == 2 and type(threads) is int
    for bad in (0, 5, -1, True, 2.0, "2"):
        with pytest.raises(LayoutError) as info:
            check_threads(bad)
        assert str(info.value) == f"threads must be a whole number from 1 to 4 (this machine's cores), got {bad!r}"
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one core
    assert check_threads(1) == 1
    with pytest.raises(LayoutError, match="from 1 to 1 "):
        check_threads(2)


# -- sampling settings ---------------------------------------------------------------------------------------------

def test_sampling_levels():
    default = SamplingConfig()
    assert (default.guidance_scale, default.greedy) == (2.0, False)
    assert default.level(0) == (1.0, 2048, 1.0)
    assert default.level(1) == (1.0, 3 * 2048, 1.0)
    custom = SamplingConfig(temperature=0.5, top_k=10, top_p=0.8)
    assert custom.level(0) == (0.5, 10, 0.8) and custom.level(1) == (0.5, 30, 0.8)
    pixel = SamplingConfig(temperature=0.5, top_k=10, top_p=0.8, pixel_temperature=2.0, pixel_top_k=0,
                           pixel_top_p=0.3)
    assert pixel.level(0) == (0.5, 10, 0.8) and pixel.level(1) == (2.0, 0, 0.3)
    assert SamplingConfig(pixel_top_k=7).level(1)[1] == 7


def test_valid_settings_pass_at_their_boundaries():
    for config in (SamplingConfig(), SamplingConfig(guidance_scale=1.0, temperature=1e-6, top_k=0, top_p=1.0),
                   SamplingConfig(top_p=1e-9, pixel_top_p=1.0, pixel_temperature=1e-3, pixel_top_k=0),
                   SamplingConfig(guidance_scale=np.float32(3), top_k=np.int64(5), temperature=2)):
        config.validate()


INVALID = [
    ({"guidance_scale": 0.999}, "guidance 0.999 < 1: use 1.0 (off) or more, e.g. 2.0"),
    ({"guidance_scale": True}, "guidance_scale must be a finite number, got True"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number, got nan"),
    ({"temperature": math.inf}, "temperature must be a finite number, got inf"),
    ({"temperature": "1"}, "temperature must be a finite number, got '1'"),
    ({"top_p": None}, "top_p must be a finite number, got None"),
    ({"guidance_scale": None}, "guidance_scale must be a finite number, got None"),  # None: only pixel_* take it
    ({"temperature": None}, "temperature must be a finite number, got None"),
    ({"pixel_temperature": -math.inf}, "pixel_temperature must be a finite number, got -inf"),
    ({"pixel_top_p": False}, "pixel_top_p must be a finite number, got False"),
    ({"temperature": 0.0}, "temperature must be > 0 (use --greedy for argmax decoding)"),
    ({"temperature": -1.0}, "temperature must be > 0 (use --greedy for argmax decoding)"),
    ({"pixel_temperature": 0}, "pixel_temperature must be > 0 (use --greedy for argmax decoding)"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.01}, "top_p must be in (0, 1]"),
    ({"pixel_top_p": 0}, "pixel_top_p must be in (0, 1]"),
    ({"pixel_top_p": 2}, "pixel_top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be >= 0 (0 disables top-k)"),
    ({"pixel_top_k": -5}, "pixel_top_k must be >= 0 (0 disables top-k)"),
    ({"top_k": 2.0}, "top_k must be a whole number, got 2.0"),
    ({"top_k": True}, "top_k must be a whole number, got True"),
    ({"top_k": None}, "top_k must be a whole number, got None"),
    ({"pixel_top_k": False}, "pixel_top_k must be a whole number, got False"),
    ({"pixel_top_k": "3"}, "pixel_top_k must be a whole number, got '3'"),
]


@pytest.mark.parametrize("change,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_settings_are_refused_by_name(change, message):
    with pytest.raises(LayoutError) as info:
        SamplingConfig(**change).validate()
    assert str(info.value) == message


def test_layouts_grids_and_settings_are_immutable_values():
    """Shared defaults (options.OFFICIAL_SAMPLING, a bundle's layout) cannot be changed by one caller for the next;
    equal values hash alike (usable as cache keys)."""
    import dataclasses

    values = (image_grid(256, 256), compact_vocab_layout(10, 4, 4), SamplingConfig(top_k=3))
    twins = (image_grid(256, 256), compact_vocab_layout(10, 4, 4), SamplingConfig(top_k=3))
    for value, twin in zip(values, twins):
        field = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, 1)
        assert hash(value) == hash(twin) and {value: 1}[twin] == 1

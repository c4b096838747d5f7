"""The vocabulary layout and grids against the facts table (illume-plus-facts.md sections 3 and 4)."""

import pytest

from illume_rt.export.configs import get_preset
from illume_rt.contract import LayoutError, image_grid, parse_resolution, supported_resolutions

pytestmark = pytest.mark.runtime

# (height, width) -> (semantic grid, pixel grid, image tokens), facts section 4
FACTS_GRIDS = {
    (256, 256): ((9, 9), (16, 16), 337),
    (512, 512): ((18, 18), (32, 32), 1348),
    (384, 512): ((12, 16), (24, 32), 960),
    (512, 384): ((16, 12), (32, 24), 960),
    (384, 576): ((12, 18), (24, 36), 1080),
    (576, 384): ((18, 12), (36, 24), 1080),
    (384, 768): ((13, 26), (24, 48), 1490),
    (768, 384): ((26, 13), (48, 24), 1490),
    (320, 960): ((11, 33), (20, 60), 1563),
    (960, 320): ((33, 11), (60, 20), 1563),
    (256, 1024): ((9, 36), (16, 64), 1348),
    (1024, 256): ((36, 9), (64, 16), 1348),
}


@pytest.mark.parametrize("size", sorted(FACTS_GRIDS))
def test_grids_match_facts(size):
    grid = image_grid(*size)
    sem, pix, tokens = FACTS_GRIDS[size]
    assert (grid.semantic_rows, grid.semantic_cols) == sem
    assert (grid.pixel_rows, grid.pixel_cols) == pix
    assert grid.num_codes == tokens
    assert grid.num_tokens == 1 + tokens + grid.num_structural
    h, w = size
    assert grid.diffusion_size == (2 * h, 2 * w)


def test_every_supported_resolution_is_in_the_facts_table():
    assert sorted(supported_resolutions()) == sorted(FACTS_GRIDS)


def test_structural_count_at_512():
    assert image_grid(512, 512).num_structural == 55


def test_unsupported_resolution_lists_valid_ones():
    with pytest.raises(LayoutError, match="512x512") as info:
        image_grid(500, 500)
    assert "500x500" in str(info.value)
    with pytest.raises(LayoutError, match="HEIGHTxWIDTH"):
        parse_resolution("big")


@pytest.mark.parametrize("name,rows", [("3b", 283047), ("7b", 283175)])
def test_official_vocab_ids(name, rows):
    v = get_preset(name).vocab
    assert (v.pad_id, v.im_start_id, v.im_end_id) == (151643, 151644, 151645)
    assert (v.start_of_image_id, v.end_of_image_id, v.end_of_line_id) == (151665, 151666, 151667)
    assert (v.start_of_level0_id, v.end_of_level0_id) == (151668, 151669)
    assert (v.start_of_level1_id, v.end_of_level1_id) == (151670, 151671)
    for size in range(64, 1025, 64):
        assert v.height_tag(size) == 151671 + size // 64
        assert v.width_tag(size) == 151687 + size // 64
    assert v.semantic_range == (151704, 151704 + 32768)
    assert v.pixel_range == (184472, 184472 + 98304)
    assert v.vocab_rows == rows
    with pytest.raises(LayoutError):
        v.height_tag(1088)


def test_image_token_ids_follow_the_layout():
    v = get_preset("tiny").vocab
    grid = image_grid(256, 256)
    sem = [[1] * grid.semantic_cols] * grid.semantic_rows
    pix = [[2] * grid.pixel_cols] * grid.pixel_rows
    ids = v.image_token_ids(grid, sem, pix)
    assert ids[:2] == [v.start_of_image_id, v.start_of_level0_id]
    assert ids[-2:] == [v.end_of_level1_id, v.end_of_image_id]
    assert ids.count(v.end_of_line_id) == grid.semantic_rows + grid.pixel_rows
    assert ids.count(v.semantic_code_offset + 1) == 81
    with pytest.raises(LayoutError):
        v.image_token_ids(grid, sem[:-1], pix)

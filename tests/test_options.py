"""runtime/options.py's request checks not covered by test_layout_rules.py: the prompts of a request (num_images,
the batch limit, seeds past the end) and the parallel-decoding window, each at its boundary with its message.
Fast and torch-free: the mutation run of options.py uses it (bench/mutation/README.md)."""

from __future__ import annotations

import numpy as np
import pytest

from illume_rt.contract import LayoutError
from illume_rt.runtime.options import (DEFAULT_PARALLEL_WINDOW, MAX_PARALLEL_WINDOW, MAX_SEED, SamplingConfig,
                                       check_prompts)


def test_each_prompt_is_repeated_num_images_times():
    assert check_prompts("a cat", 1, 0) == ["a cat"]
    assert check_prompts("a cat", 3, None) == ["a cat"] * 3
    assert check_prompts(["a", "b"], 2, 5) == ["a", "a", "b", "b"]
    assert check_prompts(("a", "b", "c"), np.int64(1), None) == ["a", "b", "c"]
    assert check_prompts(iter(["x"]), 8, None) == ["x"] * 8  # any iterable of strings; 8 images is the limit
    assert check_prompts("", 1, None) == [""]


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.0, "2", None])
def test_num_images_is_a_whole_number_from_1(bad):
    with pytest.raises(LayoutError) as info:
        check_prompts("a cat", bad, None)
    assert str(info.value) == f"num_images must be a whole number from 1 to 8, got {bad!r}"


@pytest.mark.parametrize("bad", [[], (), ["a", 3], [b"a"], [None]])
def test_prompts_are_strings(bad):
    with pytest.raises(LayoutError) as info:
        check_prompts(bad, 1, None)
    assert str(info.value) == "prompt must be a string or a non-empty list of strings"


def test_at_most_eight_images_a_request():
    assert len(check_prompts(["a", "b"], 4, None)) == 8
    for prompts, n, total in ((["a", "b"], 5, 10), ("a", 9, 9), (["a"] * 9, 1, 9), (["a", "b", "c"], 3, 9)):
        with pytest.raises(LayoutError) as info:
            check_prompts(prompts, n, None)
        assert str(info.value) == f"{total} images in one request; at most 8 decode in one batch: split the request"


def test_the_last_images_seed_is_in_range():
    assert check_prompts("a", 3, MAX_SEED - 2) == ["a"] * 3  # seeds MAX_SEED - 2 .. MAX_SEED
    assert check_prompts("a", 1, MAX_SEED) == ["a"]
    for seed, n in ((MAX_SEED - 1, 3), (MAX_SEED, 2)):
        with pytest.raises(LayoutError) as info:
            check_prompts("a", n, seed)
        assert str(info.value) == f"seed + images - 1 must be at most {MAX_SEED}; pass a smaller seed"
    assert check_prompts(["a", "b"], 4, 0) == ["a"] * 4 + ["b"] * 4


def test_the_parallel_window_bounds():
    assert MAX_PARALLEL_WINDOW == 12 and 2 <= DEFAULT_PARALLEL_WINDOW <= MAX_PARALLEL_WINDOW
    for window in (0, 2, 3, 12, np.int64(5)):
        SamplingConfig(parallel_window=window).validate()
    assert SamplingConfig().parallel_window == 0  # off unless asked
    for bad in (1, -1, 13, 16, True, False, 2.0, "4", None):
        with pytest.raises(LayoutError) as info:
            SamplingConfig(parallel_window=bad).validate()
        assert str(info.value) == ("parallel_window must be 0 (off) or a whole number from 2 to 12 (codes per body "
                                   f"call; 12 is a good start), got {bad!r}")


def test_the_window_is_checked_after_the_other_settings():
    with pytest.raises(LayoutError, match="^top_k must be >= 0"):
        SamplingConfig(top_k=-1, parallel_window=1).validate()

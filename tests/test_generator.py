"""The step-wise API (runtime/generate.py ImageGenerator, TextGenerator; docs/api.md) and the public names of
``illume_rt``."""

import subprocess
import sys

import numpy as np
import pytest

import illume_rt
from illume_rt import ImageGenerator, LayoutError, SamplingConfig, TextGenerator
from illume_rt.contract import PIXEL, SEMANTIC, image_grid
from illume_rt.runtime.generate import generate_text
from illume_rt.runtime.prompts import understanding_ids

SAMPLED = SamplingConfig(top_k=32, top_p=0.9)


@pytest.mark.parametrize("sampling", [SamplingConfig(greedy=True), SAMPLED], ids=["greedy", "sampled"])
def test_a_host_stepping_the_generator_gets_what_generate_gets(tiny_pipe, sampling):
    want = tiny_pipe.generate("a red circle", seed=5, sampling=sampling)
    g = tiny_pipe.image_generator("a red circle", seed=5, sampling=sampling)
    levels = []
    while not g.done:
        levels.append(g.next_level)
        g.compute_logits()  # the host may look first; the draw is the same
        g.generate_next()
    tokens = g.result()
    np.testing.assert_array_equal(tokens.semantic, want.tokens.semantic)
    np.testing.assert_array_equal(tokens.pixel, want.tokens.pixel)
    assert tokens.steps == want.tokens.steps
    grid = image_grid(256, 256)
    assert levels == [SEMANTIC] * (grid.semantic_rows * grid.semantic_cols) + [PIXEL] * (grid.pixel_rows * grid.pixel_cols)
    np.testing.assert_array_equal(tiny_pipe.image(g), want.image)


def test_a_logits_processor_and_host_chosen_codes_steer_the_image(tiny_pipe):
    seen = []

    def only_code_3(scores, level, index):
        seen.append((level, index, scores.shape[0]))
        out = np.full_like(scores, -np.inf)
        out[3] = 0.0
        return out

    g = tiny_pipe.image_generator("a red circle", seed=0, sampling=SAMPLED, logits_processor=only_code_3)
    while g.next_level == SEMANTIC:
        g.generate_next()
    assert set(g.codes[SEMANTIC]) == {3}
    vocab = tiny_pipe.vocab
    assert seen[0] == (SEMANTIC, 0, vocab.semantic_codebook_size) and seen[1][1] == 1
    with pytest.raises(LayoutError, match="whole number from 0 to"):
        g.append(vocab.pixel_codebook_size)
    with pytest.raises(LayoutError):
        g.append(True)
    g.append(7)  # the host's own choice, without computing logits first
    preview = tiny_pipe.preview(g)
    assert preview.shape == (256, 256, 3) and preview.dtype == np.uint8
    while not g.done:
        g.generate_next()
    assert g.codes[PIXEL][0] == 7 and set(g.codes[PIXEL][1:]) == {3}
    np.testing.assert_array_equal(tiny_pipe.preview(g), tiny_pipe.image(g))  # all codes in: the picture itself
    with pytest.raises(LayoutError, match="complete"):
        g.generate_next()


def test_no_preview_before_the_semantic_level_is_complete(tiny_pipe):
    g = tiny_pipe.image_generator("a red circle", seed=0)
    g.generate_next()
    with pytest.raises(LayoutError, match="semantic level is not complete"):
        tiny_pipe.preview(g)
    with pytest.raises(LayoutError, match="not complete"):
        g.result()


def test_the_text_generator_is_the_text_loop(tiny_pipe):
    ids = [i for i in understanding_ids(tiny_pipe.tokenizer, tiny_pipe.vocab, "What colour?") if i >= 0]
    want = generate_text(tiny_pipe.lm, ids, 6, greedy=False, rng=np.random.default_rng(1), temperature=0.8)
    g = TextGenerator(tiny_pipe.lm, ids, 6, greedy=False, rng=np.random.default_rng(1), temperature=0.8)
    while not g.done:
        g.generate_next()
    assert g.tokens == want
    forced = TextGenerator(tiny_pipe.lm, ids, 4, logits_processor=lambda s, level, i: np.where(
        np.arange(s.shape[0]) == 65 + i, 0.0, -np.inf))
    while not forced.done:
        forced.generate_next()
    assert forced.tokens == [65, 66, 67, 68]


def test_the_public_api_is_the_package_top_level():
    for name in illume_rt.__all__:
        assert getattr(illume_rt, name) is not None, name
    from illume_rt.runtime.pipeline import Pipeline

    assert illume_rt.Pipeline is Pipeline and illume_rt.ImageGenerator is ImageGenerator
    assert issubclass(illume_rt.BundleError, illume_rt.IllumeError)
    with pytest.raises(AttributeError):
        illume_rt.NotAName  # noqa: B018
    code = "import sys, illume_rt.contract; print(sorted(m for m in sys.modules if m.startswith('illume_rt')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['illume_rt', 'illume_rt.contract', 'illume_rt.errors']"

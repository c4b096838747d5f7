"""Understanding, editing, diffusion refinement and every resolution, against the PyTorch reference."""

import json

import numpy as np
import pytest
from PIL import Image

from illume_rt.runtime.images import load_image, nearest_anchor, pad_to_anchor, understanding_image
from illume_rt.contract import LayoutError, image_grid, supported_resolutions
from illume_rt.runtime.options import SamplingConfig
from illume_rt.runtime.multimodal import image_block, splice
from illume_rt.runtime.prompts import editing_ids, understanding_ids
from illume_rt.runtime.refine import LATENT_CHANNELS, MAP_TO_LATENT, RefineConfig

BANNED_NONE = ()


def runtime_banned(vocab):
    return (vocab.start_of_image_id, vocab.end_of_image_id, vocab.end_of_line_id, vocab.start_of_level0_id,
            vocab.end_of_level0_id, vocab.start_of_level1_id, vocab.end_of_level1_id)


def test_image_block_matches_reference(tiny_models, tiny_pipe, examples):
    from illume_rt.export.reference import reference_image_block

    image = understanding_image(load_image(examples / "understand" / "3.png"))
    got = image_block(tiny_pipe.lm, tiny_pipe.image_encoder.encode(image))
    want = reference_image_block(tiny_models, image).numpy()
    assert got.shape == want.shape
    # the runtime resizes the ViT view with PIL, the reference with torch (both antialiased bicubic)
    assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("name", ["0.png", "3.png"])
def test_understanding_matches_reference(tiny_models, tiny_pipe, examples, name):
    from illume_rt.export.reference import reference_answer, reference_image_block, reference_splice

    question = "What is in the image?"
    streamed = []
    result = tiny_pipe.understand(examples / "understand" / name, question, max_new_tokens=16,
                                  on_text=streamed.append)
    image = understanding_image(load_image(examples / "understand" / name))
    ids = understanding_ids(tiny_pipe.tokenizer, tiny_pipe.vocab, question)
    want = reference_answer(tiny_models, reference_splice(tiny_models, ids, reference_image_block(tiny_models, image)),
                            16, runtime_banned(tiny_pipe.vocab))
    assert result.token_ids == want
    assert "".join(streamed) == result.text


def test_editing_matches_reference(tiny_models, tiny_pipe, examples):
    from illume_rt.export.reference import reference_image_block, reference_image_tokens, reference_splice

    path = examples / "edit" / "1.jpg"  # 535x751: anchor 512x384, 960 codes
    sampling = SamplingConfig(greedy=True, guidance_scale=1.5)
    result = tiny_pipe.edit(path, "Add a hat on the dog.", seed=0, sampling=sampling)
    source = load_image(path)
    padded, padding = pad_to_anchor(source)
    assert padding.anchor == (512, 384)
    block = reference_image_block(tiny_models, understanding_image(padded))
    cond, uncond = editing_ids(tiny_pipe.tokenizer, tiny_pipe.vocab, "Add a hat on the dog.", *padding.anchor)
    want = reference_image_tokens(tiny_models.llm, tiny_pipe.vocab, image_grid(*padding.anchor),
                                  reference_splice(tiny_models, cond, block),
                                  reference_splice(tiny_models, uncond, block), sampling, np.random.default_rng(0))
    np.testing.assert_array_equal(result.tokens.semantic, want.semantic)
    np.testing.assert_array_equal(result.tokens.pixel, want.pixel)
    assert result.image.shape == (source.height, source.width, 3)


@pytest.mark.runtime
def test_every_example_runs_through_understand_and_edit(tiny_pipe, examples):
    for path in sorted((examples / "understand").glob("*.png")):
        assert len(tiny_pipe.understand(path, "Describe the image.", max_new_tokens=4).token_ids) >= 1
    prompts = [json.loads(line) for line in (examples / "edit" / "edit_test_examples.jsonl").read_text().splitlines()]
    for item in prompts:
        path = examples / "edit" / item["images"][0]
        instruction = item["conversations"][0]["value"].replace("<image>", "")
        source = load_image(path)
        result = tiny_pipe.edit(path, instruction, seed=1)
        assert result.image.shape == (source.height, source.width, 3)


def test_refinement_matches_reference_loop(tiny_models, tiny_pipe):
    import torch

    from illume_rt.export.multimodal import TokenMap
    from illume_rt.export.networks.diffusion import build_scheduler, reference_refine

    preset = tiny_models.preset
    tokens = tiny_pipe.generate("a cat with a hat", (256, 256), seed=2).tokens
    grid = image_grid(256, 256)
    config = RefineConfig(steps=3, guidance_scale=2.0)
    image, timings = tiny_pipe.refine_image(tokens.semantic, tokens.pixel, grid, config, np.random.default_rng(9))
    assert image.shape == (3, 512, 512) and timings["refine_unet"] > 0

    semantic_embed, pixel_embed = tiny_pipe.code_embeddings(tokens.semantic, tokens.pixel)
    token_map = TokenMap()(torch.from_numpy(semantic_embed), torch.from_numpy(pixel_embed))[0]
    noise = np.random.default_rng(9).standard_normal(
        (1, LATENT_CHANNELS, grid.pixel_rows * MAP_TO_LATENT, grid.pixel_cols * MAP_TO_LATENT))
    with torch.no_grad():
        _, want = reference_refine(preset, tiny_models.unet, tiny_models.vae, build_scheduler(preset), token_map,
                                   grid.diffusion_resolution_index, torch.from_numpy(noise).float(),
                                   num_steps=3, guidance_scale=2.0)
    want = want[0].numpy()
    # stated tolerance: float32 graphs and a float32 numpy scheduler vs the torch/diffusers loop
    assert np.abs(image - want).max() < 1e-3 * max(1.0, np.abs(want).max())


@pytest.mark.runtime
def test_every_resolution_generates_at_its_grid(tiny_pipe):
    for height, width in supported_resolutions():
        grid = image_grid(height, width)
        result = tiny_pipe.generate("a cat", (height, width), seed=0, sampling=SamplingConfig(greedy=True))
        assert result.tokens.semantic.shape == (grid.semantic_rows, grid.semantic_cols)
        assert result.tokens.pixel.shape == (grid.pixel_rows, grid.pixel_cols)
        assert result.image.shape == (height, width, 3)


@pytest.mark.runtime
def test_an_edit_without_instruction_asks_for_the_picture_back_in_both_rows(tiny_pipe, monkeypatch):
    """``edit(image, None)``: both guidance rows are the reconstruct prompt with the image, so the result is the
    reconstruction whatever the guidance; with an instruction the rows differ (editing prompt vs reconstruct)."""
    from illume_rt.runtime import pipeline

    rows = []
    real = pipeline.generate_image_tokens

    def recorded(lm, grid, cond, uncond, *args):
        rows.append((cond, uncond))
        return real(lm, grid, cond, uncond, *args)

    monkeypatch.setattr(pipeline, "generate_image_tokens", recorded)
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    guided = SamplingConfig(greedy=True, guidance_scale=2.0)
    back = tiny_pipe.edit(img, None, seed=0, sampling=guided)
    tiny_pipe.edit(img, "make it blue", seed=0, sampling=guided)
    (cond, uncond), (edit_cond, edit_uncond) = rows
    assert np.array_equal(cond, uncond) and np.array_equal(uncond, edit_uncond)
    assert cond.shape != edit_cond.shape or not np.array_equal(cond, edit_cond)
    unguided = tiny_pipe.edit(img, None, seed=0, sampling=SamplingConfig(greedy=True))
    assert np.array_equal(back.tokens.semantic, unguided.tokens.semantic)
    assert np.array_equal(back.tokens.pixel, unguided.tokens.pixel)


def test_edit_and_understand_reject_bad_inputs(tiny_pipe, tmp_path):
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    with pytest.raises(LayoutError, match="cannot read"):
        tiny_pipe.understand(not_image, "what?")
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    with pytest.raises(LayoutError, match="question is empty"):
        tiny_pipe.understand(img, " ")
    with pytest.raises(LayoutError, match="instruction is empty"):
        tiny_pipe.edit(img, "")
    with pytest.raises(LayoutError, match="steps"):
        tiny_pipe.generate("a cat", refine=RefineConfig(steps=0))
    assert nearest_anchor(48, 64) == (384, 512)

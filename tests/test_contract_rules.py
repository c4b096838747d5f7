"""illume_rt/contract.py without a bundle: what the manifest's ``contract`` says (host_contract), the graph
interfaces (component_io), the image grammar written out by hand, and a host's reading of the contract
(tests/host_reader.py, written from docs/bundle-format.md alone) giving the runtime's schedule and prompts.
Fast and torch-free: the mutation run of contract.py uses it (bench/mutation/README.md)."""

from __future__ import annotations

import json

import pytest

import host_reader
from illume_rt.contract import (EDIT_ANCHORS, IMAGE_GRAMMAR, PIXEL, SEMANTIC, DecodeStep, ImageGrid,
                                cache_input_names, compact_vocab_layout, component_io, decode_plan, head_component,
                                host_contract, image_grid, image_slots, official_vocab_layout, semantic_size,
                                supported_resolutions)

OFFICIAL = official_vocab_layout(283047)
# (height, width) -> (semantic grid, pixel grid): the facts table (illume-plus-facts.md section 4)
FACTS_GRIDS = {
    (256, 256): ((9, 9), (16, 16)), (512, 512): ((18, 18), (32, 32)), (384, 512): ((12, 16), (24, 32)),
    (512, 384): ((16, 12), (32, 24)), (384, 576): ((12, 18), (24, 36)), (576, 384): ((18, 12), (36, 24)),
    (384, 768): ((13, 26), (24, 48)), (768, 384): ((26, 13), (48, 24)), (320, 960): ((11, 33), (20, 60)),
    (960, 320): ((33, 11), (60, 20)), (256, 1024): ((9, 36), (16, 64)), (1024, 256): ((36, 9), (64, 16)),
}


def test_the_manifests_contract_written_out():
    c = host_contract(OFFICIAL)
    assert list(c) == ["structure_tokens", "image_grammar", "levels", "grids", "edit_anchors", "diffusion_sizes",
                       "prompts", "preprocessing", "kv_cache_layout", "decode_max_seq"]
    # the released vocabulary's structure ids (facts section 3)
    assert c["structure_tokens"] == {"start_of_image": 151665, "end_of_image": 151666, "end_of_line": 151667,
                                     "start_of_level0": 151668, "end_of_level0": 151669,
                                     "start_of_level1": 151670, "end_of_level1": 151671}
    assert c["image_grammar"] == ["start_of_image", "start_of_level0", {"level": 0, "line_end": "end_of_line"},
                                  "end_of_level0", "start_of_level1", {"level": 1, "line_end": "end_of_line"},
                                  "end_of_level1", "end_of_image"]
    assert c["levels"] == {"semantic": 0, "pixel": 1}
    assert c["grids"] == {f"{h}x{w}": {"semantic": list(s), "pixel": list(p)} for (h, w), (s, p) in FACTS_GRIDS.items()}
    assert list(c["grids"])[:3] == ["256x256", "512x512", "384x512"]  # the table's order
    # editing anchors (height, width): every supported size but 256x256
    assert c["edit_anchors"] == [[512, 512], [384, 512], [512, 384], [384, 768], [768, 384], [384, 576], [576, 384],
                                 [320, 960], [960, 320], [256, 1024], [1024, 256]]
    assert c["diffusion_sizes"] == [[1024, 1024], [768, 1024], [1024, 768], [512, 2048], [2048, 512], [640, 1920],
                                    [1920, 640], [768, 1536], [1536, 768], [768, 1152], [1152, 768], [512, 512]]
    prompts = c["prompts"]
    assert prompts["system"] == "You are a helpful assistant." and prompts["image_placeholder"] == -200
    assert prompts["chat_template"] == ["<|im_start|>", "system\n{system}", "<|im_end|>", "\n", "<|im_start|>",
                                        "user\n{user}", "<|im_end|>", "\n", "<|im_start|>",
                                        "assistant\n{assistant_prefix}"]
    assert prompts["templates"]["text_to_image"] == {
        "user": "Generate an image of {tags}, the content of image is {content}\n", "assistant_prefix": "{tags}"}
    assert prompts["templates"]["understanding"] == {"user": "{image}\n{content}", "assistant_prefix": ""}
    assert sorted(prompts["templates"]) == ["editing", "editing_unconditional", "text_to_image",
                                            "text_to_image_unconditional", "understanding"]
    pre = c["preprocessing"]
    assert pre["clip_mean"] == [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's normalisation
    assert pre["clip_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert (pre["semantic_patch"], pre["pixel_patch"], pre["pixel_factor"]) == (28, 16, 16)
    assert (pre["understanding_min_pixels"], pre["understanding_max_pixels"]) == (32 * 32, 768 * 768)
    assert pre["semantic_resize"]["512x384"] == [448, 336] and pre["semantic_resize"]["384x512"] == [336, 448]
    assert pre["semantic_resize"]["960x320"] == [924, 308] and len(pre["semantic_resize"]) == 12
    assert c["kv_cache_layout"] == ["layers", "kv", "batch", "kv_heads", "capacity", "head_dim"]
    assert c["decode_max_seq"] == 16
    assert json.loads(json.dumps(c)) == c  # plain JSON: what the manifest holds reads back equal


def test_the_contract_follows_the_vocabulary_and_is_a_fresh_copy():
    v = compact_vocab_layout(text_vocab_size=100, semantic_codebook_size=10, pixel_codebook_size=20)
    c = host_contract(v)
    assert c["structure_tokens"] == dict(zip(
        ["start_of_image", "end_of_image", "end_of_line", "start_of_level0", "end_of_level0", "start_of_level1",
         "end_of_level1"], range(103, 110)))
    c["image_grammar"][2]["level"] = 7  # a caller's edit stays in its copy
    assert IMAGE_GRAMMAR[2] == {"level": SEMANTIC, "line_end": "end_of_line"}
    assert host_contract(v)["image_grammar"][2] == {"level": 0, "line_end": "end_of_line"}


@pytest.mark.parametrize("resolution", ["256x256", "384x512", "320x960", "1024x256"])
def test_a_host_reading_the_contract_gets_the_runtimes_schedule(resolution):
    """host_reader.py rebuilds positions and plan from the contract (as JSON) alone: the runtime's."""
    vocab = compact_vocab_layout(text_vocab_size=256, semantic_codebook_size=64, pixel_codebook_size=64)
    contract = json.loads(json.dumps(host_contract(vocab)))
    grid = image_grid(*(int(x) for x in resolution.split("x")))
    positions = host_reader.image_positions(contract, resolution)
    assert positions == [vocab.token_id(s.token) if s.level is None else {"level": s.level}
                         for s in image_slots(grid)]
    plan = decode_plan(grid)
    assert host_reader.decode_plan(positions) == {
        "prefix": [vocab.token_id(t) for t in plan.prefix],
        "steps": [{"forced": [vocab.token_id(t) for t in s.forced], "level": s.level} for s in plan.steps]}


def test_a_host_reading_the_contract_gets_the_runtimes_prompts():
    from illume_rt.runtime.prompts import text_to_image_ids
    from illume_rt.runtime.tokenizer import ByteTokenizer

    vocab = compact_vocab_layout(text_vocab_size=256, semantic_codebook_size=64, pixel_codebook_size=64)
    manifest = {"contract": json.loads(json.dumps(host_contract(vocab))), "vocab": vocab.to_dict(),
                "tokenizer": {"kind": "bytes"}}
    prompt = "a {red} circle, \u00e9t\u00e9"
    cond, uncond = text_to_image_ids(ByteTokenizer(vocab), vocab, prompt, 384, 512)
    assert host_reader.prompt_ids(manifest, "text_to_image", prompt, 384, 512) == cond
    assert host_reader.prompt_ids(manifest, "text_to_image_unconditional", "", 384, 512) == uncond


def test_the_grammar_is_one_description():
    """image_slots expands IMAGE_GRAMMAR; the plan feeds every slot between two codes exactly once."""
    for h, w in supported_resolutions():
        grid = image_grid(h, w)
        slots = image_slots(grid)
        assert sum(s.level == SEMANTIC for s in slots) == grid.semantic_rows * grid.semantic_cols
        assert sum(s.level == PIXEL for s in slots) == grid.pixel_rows * grid.pixel_cols
        assert [s.token for s in slots if s.level is None and s.token != "end_of_line"] == \
            [item for item in IMAGE_GRAMMAR if isinstance(item, str)]
        plan = decode_plan(grid)
        first = next(i for i, s in enumerate(slots) if s.level is not None)
        last = max(i for i, s in enumerate(slots) if s.level is not None)
        fed = len(plan.prefix) + sum(len(s.forced) for s in plan.steps) + len(plan.steps)
        assert fed == last + 1 and len(plan.prefix) == first  # everything up to the last code, nothing after
        assert max(len(s.forced) for s in plan.steps) + 1 <= 8  # contract.DECODE_MAX_SEQ


def test_slots_and_plan_of_a_small_grid_by_hand():
    grid = ImageGrid(height=0, width=0, semantic_rows=1, semantic_cols=2, pixel_rows=2, pixel_cols=1)
    slots = image_slots(grid)
    assert [s.token or "sp"[s.level] for s in slots] == [
        "start_of_image", "start_of_level0", "s", "s", "end_of_line", "end_of_level0", "start_of_level1",
        "p", "end_of_line", "p", "end_of_line", "end_of_level1", "end_of_image"]
    assert all((s.token is None) != (s.level is None) for s in slots)
    assert (grid.num_tokens, grid.num_codes, grid.num_structural) == (13, 4, 8)
    assert (grid.level_shape(SEMANTIC), grid.level_shape(PIXEL)) == ((1, 2), (2, 1))
    plan = decode_plan(grid)
    assert plan.prefix == ("start_of_image", "start_of_level0")
    assert plan.steps == (DecodeStep((), SEMANTIC), DecodeStep((), SEMANTIC),
                          DecodeStep(("end_of_line", "end_of_level0", "start_of_level1"), PIXEL),
                          DecodeStep(("end_of_line",), PIXEL))
    assert decode_plan(grid) is plan and image_slots(grid) is slots  # cached per grid


GRAPHS = {
    "lm_head_text": (("hidden",), ("logits",)), "lm_head_semantic": (("hidden",), ("logits",)),
    "lm_head_pixel": (("hidden",), ("logits",)),
    "pixel_decoder": (("semantic_embed", "pixel_embed"), ("image",)),
    "semantic_encoder": (("pixel_values",), ("semantic_embeds",)),
    "pixel_embedder": (("image",), ("pixel_embeds",)),
    "token_map": (("semantic_embed", "pixel_embed"), ("token_map",)),
    "diffusion_unet": (("latent", "timestep", "token_map", "resolution_index"), ("noise_pred",)),
    "vae_decoder": (("latent",), ("image",)),
}


def test_component_io_is_the_documented_interface():
    """docs/bundle-format.md, "Graph contracts"."""
    assert component_io("llm", 2) == (("inputs_embeds", "attention_mask", "position_ids", "past_key_0",
                                       "past_value_0", "past_key_1", "past_value_1"), ("hidden", "new_kv"))
    assert component_io("llm", 0) == (("inputs_embeds", "attention_mask", "position_ids"), ("hidden", "new_kv"))
    assert component_io("llm") is None  # the layers come from the manifest
    for name, io in GRAPHS.items():
        assert component_io(name) == io and component_io(name, 3) == io
    for unknown in ("lm_head_image", "tokenizer", "LLM", ""):
        assert component_io(unknown) is None
    assert [head_component(w) for w in ("text", "semantic", "pixel")] == ["lm_head_text", "lm_head_semantic",
                                                                         "lm_head_pixel"]
    assert cache_input_names(2) == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert cache_input_names(0) == []


def test_structure_tokens_by_name_only():
    v = compact_vocab_layout(text_vocab_size=100, semantic_codebook_size=10, pixel_codebook_size=20)
    assert [v.token_id(n) for n in ("start_of_image", "end_of_level1")] == [103, 109]
    for name in ("pad", "im_start", "first_height_tag", "semantic_code_offset", "Start_of_image"):
        with pytest.raises(ValueError) as info:  # other fields of the layout are not structure tokens
            v.token_id(name)
        assert str(info.value) == f"unknown structure token {name!r}"
    assert v.structure_ids == tuple(range(103, 110))


def test_semantic_size_of_anchors_and_other_sizes():
    assert semantic_size(384, 512) == (336, 448) and semantic_size(512, 384) == (448, 336)
    assert semantic_size(320, 960) == (308, 924) and semantic_size(256, 256) == (252, 252)
    # elsewhere: floor to a multiple of 28, at least one patch
    assert semantic_size(100, 60) == (84, 56) and semantic_size(56, 83) == (56, 56)
    assert semantic_size(27, 500) == (28, 476) and semantic_size(3, 5) == (28, 28)


def test_grids_and_diffusion_sizes():
    for (h, w), (sem, pix) in FACTS_GRIDS.items():
        grid = image_grid(h, w)
        assert (grid.height, grid.width) == (h, w)
        assert grid.level_shape(SEMANTIC) == sem and grid.level_shape(PIXEL) == pix
        assert grid.diffusion_size == (2 * h, 2 * w)
    assert set(EDIT_ANCHORS) == set(FACTS_GRIDS) - {(256, 256)}


def test_a_model_edits_at_the_anchors_it_was_trained_at():
    from illume_rt.contract import edit_anchors
    from illume_rt.runtime.images import nearest_anchor

    assert edit_anchors(None) == edit_anchors([]) == EDIT_ANCHORS  # the released models: every official anchor
    assert edit_anchors([[256, 256], [512, 512], [384, 512]]) == ((512, 512), (384, 512))
    assert edit_anchors([[256, 256]]) == ((256, 256),)  # illume-nano: trained at no official anchor
    assert nearest_anchor(256, 192) == (512, 384)
    assert nearest_anchor(256, 192, edit_anchors([[256, 256]])) == (256, 256)
    assert official_vocab_layout(283047).structure_ids == tuple(range(151665, 151672))

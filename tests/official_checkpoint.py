"""Synthetic official checkpoints at tiny shapes (tests/test_checkpoints.py's, whose docstring says how they are
made): written once per test session (conftest.py ``official_ckpt``), and exported once through the CLI
(``official_ckpt_bundle``), the bundle that tests/test_checkpoints.py and tests/test_verify_tokens.py both check."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from illume_rt.contract import official_vocab_layout
from illume_rt.export.checkpoints import preset_from_mllm_config
from illume_rt.export.configs import get_preset
from illume_rt.export.llm import build_llm
from illume_rt.export.networks.diffusion import build_diffusion
from illume_rt.export.networks.dualvitok import build_dualvitok_pixel
from illume_rt.export.networks.vision import PROJECTOR_PREFIX, VISION_TOWER_PREFIX, build_projectors, \
    build_vision_tower

VOCAB_ROWS = 283047  # the 3B table
BASE = get_preset("tiny")  # ViT / MoVQ / codebook-dim shapes of the synthetic checkpoints


def mllm_config(tie: bool, **over) -> dict:
    cfg = {
        "architectures": ["IllumeQwen2ForCausalLM"], "model_type": "illume_qwen2",
        "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 32, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "hidden_act": "silu", "tie_word_embeddings": tie, "vocab_size": VOCAB_ROWS, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "mm_patch_merge_type": "flat",
        "mm_hidden_size": [BASE.vision_tower.out_dim, BASE.pixel_encoder.embed_dim],
        "mm_vision_tower": {"type": "DualVisionTower", "vq_config": "configs/example/dualvitok/x.py"},
        "mm_projector": {"type": "MixedProjector", "projector_cfg1": {"type": "MLPProjector", "mlp_depth": 2},
                         "projector_cfg2": {"type": "MLPProjector", "mlp_depth": 2}},
    }
    cfg.update(over)
    return cfg


def write_tokenizer(path: Path, vocab=None, **wrong_ids) -> None:
    """A loadable WordLevel tokenizer.json holding the structure tokens at the official ids."""
    v = vocab or official_vocab_layout(VOCAB_ROWS)
    ids = {"<|endoftext|>": v.pad_id, "<|im_start|>": v.im_start_id, "<|im_end|>": v.im_end_id,
           "<start_of_image>": v.start_of_image_id, "<end_of_image>": v.end_of_image_id,
           "<end_of_line>": v.end_of_line_id, "<start_of_level0>": v.start_of_level0_id,
           "<end_of_level0>": v.end_of_level0_id, "<start_of_level1>": v.start_of_level1_id,
           "<end_of_level1>": v.end_of_level1_id}
    ids.update({f"<height_{64 * (i + 1)}>": v.first_height_tag_id + i for i in range(16)})
    ids.update({f"<width_{64 * (i + 1)}>": v.first_width_tag_id + i for i in range(16)})
    ids.update({"<|image_level0_0|>": v.semantic_code_offset, "<|image_level0_32767|>": v.semantic_code_offset + 32767,
                "<|image_level1_0|>": v.pixel_code_offset, "<|image_level1_98303|>": v.pixel_code_offset + 98303})
    ids.update(wrong_ids)
    words = {"a": 0, "cat": 1, "[UNK]": 2}
    data = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t, i in ids.items()],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {**words, **ids}, "unk_token": "[UNK]"}}
    path.write_text(json.dumps(data))


def mllm_state(preset, tie: bool, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the MLLM under its official name: the reference modules' seeded random weights (sensible
    magnitudes, different per seed), the LLM in bfloat16 like the release."""
    p = replace(preset, seed=seed)
    state = {}
    for k, t in build_llm(p).state_dict().items():
        if tie and k == "lm_head.weight":
            continue  # save_pretrained drops the tied copy
        state[k] = t.detach().to(torch.bfloat16).clone()
    for prefix, module in ((VISION_TOWER_PREFIX, build_vision_tower(p)), (PROJECTOR_PREFIX, build_projectors(p)),
                           ("model.vision_tower.pixel_encoder.", build_dualvitok_pixel(p).pixel_encoder)):
        for k, t in module.state_dict().items():
            state[prefix + k] = t.detach().clone()
    return state


def write_mllm(folder: Path, state: dict, config: dict, shards: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder / "tokenizer.json")
    names = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in names}, folder / "model.safetensors")
        return folder
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: state[k].contiguous() for k in part}, folder / fname)
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return folder


def dualvitok_state(preset, seed: int) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in build_dualvitok_pixel(replace(preset, seed=seed)).state_dict().items()}


TRAINING_ONLY = {"semantic_encoder.model.blocks.0.attn.qkv.weight": torch.zeros(3, 3),
                 "semantic_encoder.proj_out.0.weight": torch.zeros(2, 2),
                 "semantic_decoder.blocks.0.norm1.weight": torch.zeros(4)}


def write_official_checkpoints(root: Path) -> dict:
    """Synthetic official checkpoints: MLLM (untied, sharded; tied, single file), DualViTok bin, diffusers folder."""
    preset = preset_from_mllm_config(mllm_config(tie=False), BASE)
    untied = mllm_state(preset, tie=False, seed=1)
    write_mllm(root / "mllm", untied, mllm_config(tie=False), shards=3)
    tied = mllm_state(replace(preset, llm=replace(preset.llm, tie_word_embeddings=True)), tie=True, seed=2)
    write_mllm(root / "mllm_tied", tied, mllm_config(tie=True), shards=1)

    model_sd, ema_sd = dualvitok_state(preset, 3), dualvitok_state(preset, 4)
    torch.save({"model": {**model_sd, **TRAINING_ONLY}, "ema": ema_sd, "steps": 1000},
               root / "dualvitok.bin")

    unet, vae = build_diffusion(preset)
    with torch.no_grad():
        for p in [*unet.parameters(), *vae.parameters()]:
            p.add_(torch.randn(p.shape) * 0.02)  # away from diffusers' zero inits, so a round trip means something
    diff = root / "decoder"
    unet.save_pretrained(diff / "unet")
    vae.save_pretrained(diff / "vae")
    from diffusers import EulerDiscreteScheduler

    sched = dict(preset.diffusion.scheduler, timestep_spacing="trailing")
    EulerDiscreteScheduler.from_config(sched).save_pretrained(diff / "scheduler")
    (diff / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLDecoderPipeline", "_diffusers_version": "0.31.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "vq_model_embedder": [None, None]}))
    return {"root": root, "preset": preset, "untied": untied, "tied": tied, "model": model_sd, "ema": ema_sd,
            "unet": unet.state_dict(), "vae": vae.state_dict()}

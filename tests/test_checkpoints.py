"""Official-checkpoint loaders on synthetic checkpoints written in the official key layout at tiny shapes.

The synthetic files are made from the reference modules' own state dicts under the official prefixes (the MLLM's
``model.vision_tower.*`` / ``model.mm_projector.*``, DualViTok's top-level sub-module names, diffusers'
``save_pretrained``), with random values so that a round trip proves every tensor landed where it belongs.
A few literal official key names are asserted too, so the layout cannot drift silently from the official one.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from illume_rt.contract import official_vocab_layout
from illume_rt.export.checkpoints import (CheckpointError, load_diffusion, load_dualvitok, load_mllm,
                                          load_reference_models, preset_from_mllm_config, read_dualvitok_state)
from illume_rt.export.configs import get_preset
from illume_rt.export.networks.vision import PROJECTOR_PREFIX, VISION_TOWER_PREFIX
from official_checkpoint import BASE, VOCAB_ROWS, mllm_config, write_mllm, write_tokenizer


@pytest.fixture(scope="module")
def ckpt(official_ckpt):
    """Synthetic official checkpoints: MLLM (untied, sharded; tied, single file), DualViTok bin, diffusers folder
    (tests/official_checkpoint.py; written once per session, shared with tests/test_verify_tokens.py)."""
    return official_ckpt


def _assert_loaded(module, state, prefix=""):
    own = module.state_dict()
    for k, v in state.items():
        if k.startswith(prefix):
            assert torch.equal(own[k[len(prefix):]], v.float()), k


# -- layout -----------------------------------------------------------------------------------------------------
def test_synthetic_keys_are_the_official_names(ckpt):
    keys = set(ckpt["untied"])
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.bias", "model.norm.weight",
                 "lm_head.weight", "model.vision_tower.semantic_encoder.patch_embed.proj.weight",
                 "model.vision_tower.semantic_encoder.blocks.1.attn.qkv.weight",
                 "model.vision_tower.semantic_encoder.merger.mlp.2.weight",
                 "model.vision_tower.pixel_encoder.conv_in.weight", "model.mm_projector.projector_1.0.weight",
                 "model.mm_projector.projector_2.2.bias"):
        assert name in keys, name
    for name in ("semantic_quantizer.frozen_codebook", "pixel_quantizer.code_transform.weight",
                 "pixel_post_quant_conv.weight", "pixel_decoder.conv_out.weight", "pixel_quant_conv.weight"):
        assert name in ckpt["model"], name


# -- MLLM -------------------------------------------------------------------------------------------------------
def test_mllm_untied_sharded_round_trip(ckpt):
    m = load_mllm(ckpt["root"] / "mllm", BASE)
    state = ckpt["untied"]
    assert m.preset.llm.hidden_size == 16 and not m.preset.llm.tie_word_embeddings
    assert m.preset.vocab == official_vocab_layout(VOCAB_ROWS)
    assert (m.preset.codebook.semantic_size, m.preset.codebook.pixel_size) == (32768, 98304)
    _assert_loaded(m.llm, {k: v for k, v in state.items() if not k.startswith("model.vision_tower.")
                           and not k.startswith("model.mm_projector.")})
    assert m.llm.lm_head.weight.data_ptr() != m.llm.model.embed_tokens.weight.data_ptr()
    assert m.llm.model.embed_tokens.weight.dtype == torch.float32
    _assert_loaded(m.vision_tower, state, VISION_TOWER_PREFIX)
    _assert_loaded(m.projectors, state, PROJECTOR_PREFIX)
    _assert_loaded(m.pixel_encoder, state, "model.vision_tower.pixel_encoder.")
    files = m.source["files"]
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json",
            "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"} <= set(files)
    assert all(len(f["sha256"]) == 64 for f in files.values())
    # rotary buffers were recomputed, not left uninitialised
    inv = m.llm.model.rotary_emb.inv_freq
    assert torch.allclose(inv, 1.0 / (1e6 ** (torch.arange(0, 8, 2).float() / 8)))
    # the loaded networks run
    with torch.no_grad():
        out = m.llm(input_ids=torch.tensor([[1, 2, 3]])).logits
        feats = m.vision_tower(torch.randn(1, 3, 56, 56))
    assert torch.isfinite(out).all() and feats.shape == (4, BASE.vision_tower.out_dim)


def test_mllm_tied_single_file(ckpt):
    m = load_mllm(ckpt["root"] / "mllm_tied", BASE)
    assert m.preset.llm.tie_word_embeddings
    assert m.llm.lm_head.weight.data_ptr() == m.llm.model.embed_tokens.weight.data_ptr()
    assert torch.equal(m.llm.lm_head.weight, ckpt["tied"]["model.embed_tokens.weight"].float())
    assert "model.safetensors" in m.source["files"]


def test_mllm_pickled_weights(tmp_path, ckpt):
    """pytorch_model.bin (read with weights_only=True) instead of safetensors."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(mllm_config(tie=True)))
    write_tokenizer(folder / "tokenizer.json")
    torch.save(ckpt["tied"], folder / "pytorch_model.bin")
    m = load_mllm(folder, BASE)
    _assert_loaded(m.projectors, ckpt["tied"], PROJECTOR_PREFIX)
    assert "pytorch_model.bin" in m.source["files"]


def _variant(tmp_path, ckpt, edit, tie=False, config=None):
    state = dict(ckpt["tied" if tie else "untied"])
    edit(state)
    return write_mllm(tmp_path / "variant", state, config or mllm_config(tie=tie), shards=1)


def test_mllm_missing_tensor_named(tmp_path, ckpt):
    folder = _variant(tmp_path, ckpt, lambda s: s.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1: model\.layers\.1\.self_attn\.q_proj\.weight"):
        load_mllm(folder, BASE)


def test_mllm_many_missing_are_counted(tmp_path, ckpt):
    def drop(s):
        for k in [k for k in s if k.startswith("model.vision_tower.semantic_encoder.blocks.")][:15]:
            del s[k]
    folder = _variant(tmp_path, ckpt, drop)
    with pytest.raises(CheckpointError, match=r"missing 15: .*\(\+5 more\)"):
        load_mllm(folder, BASE)


def test_mllm_unexpected_and_misshaped_in_one_error(tmp_path, ckpt):
    def edit(s):
        s["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
        s["model.vision_tower.scaling_layer.image_mean"] = torch.zeros(3)
        s["lm_head.weight"] = torch.zeros(VOCAB_ROWS - 1, 16)
        s["model.mm_projector.projector_2.0.weight"] = torch.zeros(16, 9)
    folder = _variant(tmp_path, ckpt, edit)
    with pytest.raises(CheckpointError) as err:
        load_mllm(folder, BASE)
    msg = str(err.value)
    assert "unexpected 1: model.layers.7.mlp.up_proj.weight" in msg
    assert "model.vision_tower.scaling_layer.image_mean" in msg
    assert f"lm_head.weight [{VOCAB_ROWS - 1}, 16] in the checkpoint vs [{VOCAB_ROWS}, 16] expected" in msg
    assert "model.mm_projector.projector_2.0.weight [16, 9] in the checkpoint vs [16, 8] expected" in msg


def test_mllm_untied_without_head_and_tied_with_other_head(tmp_path, ckpt):
    folder = _variant(tmp_path, ckpt, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1: lm_head\.weight .*tie_word_embeddings false"):
        load_mllm(folder, BASE)
    other = tmp_path / "other"
    state = dict(ckpt["tied"], **{"lm_head.weight": torch.randn(VOCAB_ROWS, 16).to(torch.bfloat16)})
    write_mllm(other, state, mllm_config(tie=True), shards=1)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        load_mllm(other, BASE)


def test_mllm_config_and_tokenizer_errors(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="vocab_size 1000 is smaller than the official"):
        preset_from_mllm_config(mllm_config(tie=False, vocab_size=1000), BASE)
    with pytest.raises(CheckpointError, match="model_type 'qwen2'"):
        preset_from_mllm_config(mllm_config(tie=False, model_type="qwen2"), BASE)
    with pytest.raises(CheckpointError, match=r"mm_hidden_size \[48, 32\]"):
        preset_from_mllm_config(mllm_config(tie=False, mm_hidden_size=[48, 32]), BASE)
    with pytest.raises(CheckpointError, match="unpad"):
        preset_from_mllm_config(mllm_config(tie=False, mm_patch_merge_type="spatial_unpad"), BASE)
    official = preset_from_mllm_config(mllm_config(tie=True, hidden_size=2048, num_hidden_layers=36,
                                                   num_attention_heads=16, num_key_value_heads=2,
                                                   intermediate_size=11008, mm_hidden_size=[3584, 32]))
    assert official.name == "3b" and official.vision_tower == get_preset("3b").vision_tower
    folder = _variant(tmp_path, ckpt, lambda s: None)
    write_tokenizer(folder / "tokenizer.json", **{"<start_of_image>": 151660})
    with pytest.raises(CheckpointError, match=r"<start_of_image> -> 151660 \(official 151665\)"):
        load_mllm(folder, BASE)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_mllm(folder, BASE)


# -- DualViTok --------------------------------------------------------------------------------------------------
def test_dualvitok_wrappers_and_ema(ckpt, tmp_path, caplog):
    preset, path = ckpt["preset"], ckpt["root"] / "dualvitok.bin"
    with caplog.at_level(logging.DEBUG, logger="illume_rt.export.checkpoints"):
        model, rec = load_dualvitok(path, preset)
    assert rec["weights"] == "model" and rec["ignored_training_only"] == 3
    assert "semantic_decoder.blocks.0.norm1.weight" in caplog.text
    _assert_loaded(model, ckpt["model"])
    ema, rec = load_dualvitok(path, preset, use_ema=True)
    assert rec["weights"] == "ema"
    _assert_loaded(ema, ckpt["ema"])
    assert len(rec["files"]["dualvitok.bin"]["sha256"]) == 64
    raw = tmp_path / "raw.bin"
    torch.save({"module." + k: v for k, v in ckpt["model"].items()}, raw)
    _assert_loaded(load_dualvitok(raw, preset)[0], ckpt["model"])
    wrapped = tmp_path / "sd.bin"
    torch.save({"state_dict": ckpt["ema"]}, wrapped)
    assert read_dualvitok_state(wrapped)[1] == "state_dict"


def test_dualvitok_errors_named(ckpt, tmp_path):
    preset = ckpt["preset"]
    state = dict(ckpt["model"])
    state.pop("pixel_decoder.conv_out.weight")
    state["pixel_decoder.extra.weight"] = torch.zeros(1)
    state["pixel_quantizer.code_transform.weight"] = torch.zeros(4, 4)
    path = tmp_path / "bad.bin"
    torch.save({"ema": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_dualvitok(path, preset, use_ema=True)
    msg = str(err.value)
    assert "missing 1: pixel_decoder.conv_out.weight" in msg
    assert "unexpected 1: pixel_decoder.extra.weight" in msg
    assert "pixel_quantizer.code_transform.weight [4, 4] in the checkpoint vs [8, 8] expected" in msg


class NotATensor:  # a pickle of this must never be unpickled
    pass


def test_dualvitok_refuses_code_objects(tmp_path, ckpt):
    path = tmp_path / "evil.bin"
    torch.save({"model": ckpt["model"], "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_dualvitok(path, ckpt["preset"])


# -- diffusion decoder ------------------------------------------------------------------------------------------
def test_diffusion_folder_round_trip(ckpt):
    preset, unet, vae, rec = load_diffusion(ckpt["root"] / "decoder", ckpt["preset"])
    assert preset.diffusion.unet["in_channels"] == 4 + 2 * preset.codebook.dim
    assert preset.diffusion.scheduler["timestep_spacing"] == "trailing"
    assert preset.diffusion.scheduler["_class_name"] == "EulerDiscreteScheduler"
    _assert_loaded(unet, ckpt["unet"])
    _assert_loaded(vae, ckpt["vae"])
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(rec["files"])


def test_diffusion_legacy_attention_names(ckpt, tmp_path):
    """VAE attention saved by old diffusers (query/key/value/proj_attn) lands on to_q/to_k/to_v/to_out.0."""
    import shutil

    from safetensors.torch import load_file

    old = tmp_path / "decoder"
    shutil.copytree(ckpt["root"] / "decoder", old)
    weights = old / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(weights).items():
        for new, prev in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{prev}.")
        renamed[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    save_file(renamed, weights)
    _assert_loaded(load_diffusion(old, ckpt["preset"])[2], ckpt["vae"])


def test_diffusion_errors_named(ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file

    bad = tmp_path / "decoder"
    shutil.copytree(ckpt["root"] / "decoder", bad)
    weights = bad / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd.pop("decoder.conv_out.weight")
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match=r"\(vae\): missing 1: decoder\.conv_out\.weight"):
        load_diffusion(bad, ckpt["preset"])
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    cfg["in_channels"] = 68
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unet in_channels 68 != latent channels 4 \+ 2 x codebook dim 8"):
        load_diffusion(bad, ckpt["preset"])


# -- everything and the command line ----------------------------------------------------------------------------
def test_cli_names_the_missing_argument(ckpt, tmp_path, capsys):
    from illume_rt.cli import main

    assert main(["export", "--checkpoint", str(ckpt["root"] / "mllm"), "-o", str(tmp_path / "b")]) == 2
    assert "--tokenizer-checkpoint" in capsys.readouterr().err
    assert main(["export", "--diffusion", str(ckpt["root"] / "decoder"), "-o", str(tmp_path / "b")]) == 2
    assert "--diffusion needs --checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_export_from_checkpoints(ckpt, official_ckpt_bundle):
    """illume-rt export --checkpoint ... on the synthetic folders: a verified bundle of the loaded weights (the
    session's one export of them, conftest.py official_ckpt_bundle; tests/test_verify_tokens.py checks it too)."""
    import numpy as np

    from illume_rt.runtime.bundle import load_bundle

    rc, err, out = official_ckpt_bundle
    assert rc == 0, err
    bundle = load_bundle(out)
    model = bundle.manifest["model"]
    assert model["random_weights"] is False
    src = model["source"]
    assert src["dualvitok"]["weights"] == "ema"
    for part in ("mllm", "dualvitok", "diffusion"):
        assert src[part]["files"] and all(len(f["sha256"]) == 64 for f in src[part]["files"].values()), part
    assert model["config"]["diffusion"]["scheduler"]["timestep_spacing"] == "trailing"
    assert bundle.manifest["tokenizer"] == {"kind": "hf", "file": "tokenizer.json"}
    embed = np.load(out / "embed_tokens.npy")
    assert np.array_equal(embed, ckpt["untied"]["model.embed_tokens.weight"].float().numpy())


def test_load_reference_models_without_tokenizer(ckpt):
    models = load_reference_models(ckpt["root"] / "mllm_tied", base=BASE)
    assert models.dualvitok is None and not models.random_weights
    assert models.source["tokenizer_file"].endswith("tokenizer.json")

"""Synthetic checkpoints in the official ILLUME+ layout, random weights at a preset's real shapes.

For measuring export at size without the released files: the MLLM ``save_pretrained`` folder (``config.json``,
``tokenizer.json``, sharded ``model-*.safetensors`` in bfloat16 like the release, with its index) and the DualViTok
``pytorch_model.bin``, under the key names export/checkpoints.py checks. The writer is bounded like the exporter:
names and shapes come from modules built on the meta device, and each shard (one LLM layer, the embedding, the
head, a few vision blocks) is generated, written and dropped before the next.

Values: seeded per tensor name (the same name always gets the same values), normal with std 1/sqrt(fan in) for
matrices, 1 for norm scales, small for biases, std 1 for the embedding table (as ``build_llm`` does, so greedy
decisions are distinct). No tokenizer is released with them: ``tokenizer.json`` is a word-level stand-in holding
the structure tokens at the official ids (what the loader checks); prompt words map to its unknown token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from illume_rt.export.configs import Preset, get_preset

SHARD_BYTES = 1 << 30  # tensors of one shard are generated and held together: the writer's bound


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(seed, name))
    if len(shape) == 1 and ("norm" in name or name.endswith(("ln_q.weight", "norm1.weight", "norm2.weight"))) \
            and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    if len(shape) <= 1:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    std = 1.0 if name.endswith("embed_tokens.weight") else (shape[1] * max(1, int(torch.tensor(shape[2:]).prod()))
                                                            ) ** -0.5
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def mllm_config(preset: Preset) -> dict:
    """``config.json`` of an ILLUME+ MLLM with the preset's LLM and vocabulary (the fields the loader reads)."""
    from illume_rt.contract import official_vocab_layout
    from illume_rt.export.checkpoints import COMPACT_VOCAB_KEY

    llm = preset.llm
    try:
        official = preset.vocab == official_vocab_layout(preset.vocab.vocab_rows)
    except ValueError:  # fewer rows than the official layout needs
        official = False
    # a test preset's small vocabulary (tiny) is described in config.json, as illume-nano's is
    compact = {} if official else {COMPACT_VOCAB_KEY: preset.vocab.to_dict()}
    return {
        **compact,
        "architectures": ["IllumeQwen2ForCausalLM"], "model_type": "illume_qwen2",
        "hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_hidden_layers,
        "num_attention_heads": llm.num_attention_heads, "num_key_value_heads": llm.num_key_value_heads,
        "intermediate_size": llm.intermediate_size, "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
        "max_position_embeddings": llm.max_position_embeddings, "hidden_act": "silu",
        "tie_word_embeddings": llm.tie_word_embeddings, "vocab_size": preset.vocab.vocab_rows,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "mm_patch_merge_type": "flat",
        "mm_hidden_size": list(preset.projector_in_dims),
        "mm_vision_tower": {"type": "DualVisionTower"},
        "mm_projector": {"type": "MixedProjector", "projector_cfg1": {"type": "MLPProjector", "mlp_depth": 2},
                         "projector_cfg2": {"type": "MLPProjector", "mlp_depth": 2}},
    }


def stand_in_tokenizer(vocab) -> dict:
    """A loadable word-level ``tokenizer.json`` with the structure tokens, size tags and first/last codes at the
    official ids (what ``check_tokenizer_vocab`` requires)."""
    ids = {"<|endoftext|>": vocab.pad_id, "<|im_start|>": vocab.im_start_id, "<|im_end|>": vocab.im_end_id,
           "<start_of_image>": vocab.start_of_image_id, "<end_of_image>": vocab.end_of_image_id,
           "<end_of_line>": vocab.end_of_line_id, "<start_of_level0>": vocab.start_of_level0_id,
           "<end_of_level0>": vocab.end_of_level0_id, "<start_of_level1>": vocab.start_of_level1_id,
           "<end_of_level1>": vocab.end_of_level1_id}
    step = vocab.size_tag_step
    ids.update({f"<height_{step * (i + 1)}>": vocab.height_tag(step * (i + 1)) for i in range(vocab.num_size_tags)})
    ids.update({f"<width_{step * (i + 1)}>": vocab.width_tag(step * (i + 1)) for i in range(vocab.num_size_tags)})
    last_sem, last_pix = vocab.semantic_codebook_size - 1, vocab.pixel_codebook_size - 1
    ids.update({"<|image_level0_0|>": vocab.semantic_code_offset,
                f"<|image_level0_{last_sem}|>": vocab.semantic_code_offset + last_sem,
                "<|image_level1_0|>": vocab.pixel_code_offset,
                f"<|image_level1_{last_pix}|>": vocab.pixel_code_offset + last_pix})
    words = {"a": 0, "cat": 1, "[UNK]": 2}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t, i in ids.items()],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {**words, **ids}, "unk_token": "[UNK]"}}


def mllm_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """Every MLLM tensor under its official name, with its shape (modules built on the meta device)."""
    from illume_rt.export.checkpoints import PIXEL_ENCODER_PREFIX
    from illume_rt.export.llm import build_llm
    from illume_rt.export.networks.dualvitok import build_dualvitok_pixel
    from illume_rt.export.networks.vision import (PROJECTOR_PREFIX, VISION_TOWER_PREFIX, build_projectors,
                                                  build_vision_tower)

    with torch.device("meta"):
        llm = build_llm(preset)
    shapes = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    if preset.llm.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # save_pretrained drops the tied copy
    for prefix, module in ((VISION_TOWER_PREFIX, build_vision_tower(preset, device="meta")),
                           (PROJECTOR_PREFIX, build_projectors(preset, device="meta")),
                           (PIXEL_ENCODER_PREFIX, build_dualvitok_pixel(preset, device="meta").pixel_encoder)):
        shapes.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})
    return shapes


def _shards(shapes: dict[str, tuple[int, ...]], itemsize: int) -> Iterator[list[str]]:
    """Names grouped in file order into shards of at most SHARD_BYTES (a larger tensor gets a shard alone)."""
    group, size = [], 0
    for name in shapes:
        n = itemsize
        for d in shapes[name]:
            n *= d
        if group and size + n > SHARD_BYTES:
            yield group
            group, size = [], 0
        group.append(name)
        size += n
    if group:
        yield group


def write_mllm(folder: Path, preset: Preset, seed: int = 0, log: Callable[[str], None] = print) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=False)
    (folder / "config.json").write_text(json.dumps(mllm_config(preset), indent=1))
    if preset.vocab.text_vocab_size == 256:  # byte-level text ids (tiny): the tokenizer must be byte-level too
        from illume_rt.export.tokenizer_files import write_byte_tokenizer

        write_byte_tokenizer(folder / "tokenizer.json", preset.vocab)
    else:
        (folder / "tokenizer.json").write_text(json.dumps(stand_in_tokenizer(preset.vocab)))
    shapes = mllm_shapes(preset)
    groups = list(_shards(shapes, 2))
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        fname = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {n: synthetic_tensor(n, shapes[n], seed, torch.bfloat16) for n in names}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({n: fname for n in names})
        del part
        log(f"  {fname}: {len(names)} tensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


def write_dualvitok(path: Path, preset: Preset, seed: int = 0) -> Path:
    """DualViTok ``pytorch_model.bin`` (the pixel path: codebooks, pixel encoder, quant convs, pixel decoder),
    float32, the raw state dict. It is one pickle, so it is held whole while written (1.9 GB at official size)."""
    from illume_rt.export.networks.dualvitok import build_dualvitok_pixel

    model = build_dualvitok_pixel(preset, device="meta")
    state = {k: synthetic_tensor(k, tuple(v.shape), seed, torch.float32) for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def write_checkpoint(root: str | Path, preset_name: str, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """``root/mllm`` and ``root/dualvitok.bin`` for the preset; refuses an existing ``root``."""
    from illume_rt.export.components import ExportError

    root = Path(root)
    if root.exists():
        raise ExportError(f"{root} exists; pass a new folder for the synthetic checkpoint")
    preset = get_preset(preset_name)
    root.mkdir(parents=True)
    log(f"writing a synthetic {preset_name} checkpoint to {root}")
    write_mllm(root / "mllm", preset, seed, log)
    write_dualvitok(root / "dualvitok.bin", preset, seed)
    return {"mllm": str(root / "mllm"), "dualvitok": str(root / "dualvitok.bin")}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m illume_rt.export.synthetic",
                                     description="write a random-weight checkpoint in the official layout")
    parser.add_argument("preset", help="tiny, bench, 3b or 7b")
    parser.add_argument("-o", "--output", required=True, help="new folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_checkpoint(args.output, args.preset, args.seed)


if __name__ == "__main__":
    main()

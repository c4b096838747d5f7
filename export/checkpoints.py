"""Loaders for the released ILLUME+ checkpoints: the MLLM folder, the DualViTok ``pytorch_model.bin`` and the
diffusion-decoder diffusers folder, into the reference networks of this package (``ReferenceModels``).

Rules every loader follows:

- Nothing from a checkpoint is executed: safetensors are preferred, pickles are read with ``torch.load(...,
  weights_only=True)``, configs are plain JSON, and no ``trust_remote_code`` / custom class is ever imported.
- The preset is the single source of shapes. ``preset_from_mllm_config`` derives it from ``config.json`` (LLM and
  vocabulary) plus a base preset for what ``config.json`` does not describe (the ViT internals, MoVQ, codebook dim);
  the diffusion folder's own configs replace the preset's ``DiffusionConfig``. Modules are then built from the preset
  (on the meta device, materialised empty) and the checkpoint must match them exactly.
- Strict checking: every tensor the module expects must be present with the same shape, and every tensor in the
  checkpoint must be used or explicitly ignored (a named list of training-only prefixes). All problems of one
  checkpoint part are reported together, by name, in one ``CheckpointError``.
- ``source`` records the path and the sha256 of every file read (streamed in 4 MiB blocks, cached per process by
  path, size and mtime).

Key layout (official ILLUME_plus, commit 51de69d; read for facts, nothing copied):

- MLLM (``IllumeQwen2ForCausalLM.save_pretrained``): the LLM keeps the stock ``Qwen2ForCausalLM`` names
  (``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``lm_head``; ILLUME/illume/model/language_model/
  illume_qwen2.py:223-230, config ``model_type`` "illume_qwen2" at :121-122). ``IllumeMetaModel.__init__``
  (ILLUME/illume/model/illume_arch.py:35-44) adds ``model.vision_tower`` (DualVisionTower) and ``model.mm_projector``
  (MixedProjector). DualVisionTower keeps ``pixel_encoder = vq_model.pixel_encoder`` and ``semantic_encoder =
  vq_model.semantic_encoder.model`` (ILLUME/illume/model/multimodal_encoder/dual_encoder.py:84-85; its
  ScalingLayerForQwen2ViT is not an nn.Module, vision_tokenizer/tokenizer/dualvitok_model.py:77, so it has no keys).
  MixedProjector has ``projector_1`` / ``projector_2``, each an ``nn.Sequential`` Linear, GELU, Linear (keys 0.*, 2.*;
  ILLUME/illume/model/multimodal_projector/builder.py:72-91). ``image_newline`` only exists when
  ``mm_patch_merge_type`` contains "unpad" (illume_arch.py:46-49); the released config uses "flat"
  (configs/_base_/models/qwen2_5_dualencoder.py:9), and "unpad" is refused here.
- DualViTok (``DualViTok`` sub-modules, vision_tokenizer/tokenizer/dualvitok_model.py:518-545): ``semantic_encoder``,
  ``semantic_quantizer``, ``semantic_decoder``, ``pixel_encoder``, ``pixel_quant_conv``, ``pixel_quantizer``,
  ``pixel_post_quant_conv``, ``pixel_decoder``. The checkpoint may be raw or wrapped under "ema" / "model" /
  "state_dict" (dual_encoder.py:70-78 picks ema only when asked, then model, then state_dict, else raw). The semantic
  encoder/decoder are training-only here (the MLLM carries its own fine-tuned ViT).
- Diffusion decoder: a diffusers pipeline folder (``StableDiffusionXLDecoderPipeline`` registers vae, unet,
  scheduler; vision_tokenizer/tokenizer/sdxl_decoder_pipe.py:335-351); the UNet takes 4 latent + 64 map channels
  (:367, the pixel + semantic channels).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from illume_rt.export.components import ExportError
from illume_rt.export.configs import DiffusionConfig, LLMConfig, Preset, get_preset
from illume_rt.contract import VocabLayout, official_vocab_layout

log = logging.getLogger(__name__)

MAX_NAMES = 10  # names listed per kind of problem in one error message

MLLM_MODEL_TYPE = "illume_qwen2"
VISION_ROOT = "model.vision_tower."  # everything the DualVisionTower stores
PIXEL_ENCODER_PREFIX = "model.vision_tower.pixel_encoder."  # + MoVQEncoder keys (the MLLM's fine-tuned copy)

# DualViTok top-level modules that inference never needs (the MLLM has its own ViT; the semantic decoder only
# serves the training loss), plus loss/discriminator names a training checkpoint might carry (unverified).
DUALVITOK_TRAINING_ONLY_PREFIXES = ("semantic_encoder.", "semantic_decoder.", "discriminator.", "loss.")
DUALVITOK_WRAPPERS = ("ema", "model", "state_dict")
# config.json entry of a model with its own compact vocabulary (not in released configs): a VocabLayout dict.
COMPACT_VOCAB_KEY = "illume_rt_vocab"

# Diffusers keys of attention blocks saved by old diffusers versions -> current names.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class CheckpointError(ExportError):
    """A checkpoint that cannot be loaded as it is: missing, unexpected or mis-shaped tensors, a bad config."""


# ----------------------------------------------------------------------------------------------------------------
# Hashing
# ----------------------------------------------------------------------------------------------------------------
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed in 4 MiB blocks; cached in this process by (real path, size, mtime)."""
    from illume_rt.files import sha256_file

    path = Path(path)
    st = path.stat()
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


def _file_records(root: Path, files: Iterable[Path]) -> dict[str, dict]:
    """{path relative to root: {bytes, sha256}} for each file, in name order."""
    out = {}
    for f in sorted(set(files)):
        out[f.relative_to(root).as_posix()] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tensor sources: names and shapes first (no data read), tensors on demand
# ----------------------------------------------------------------------------------------------------------------
class TensorSource:
    """The tensors of one checkpoint part. ``shapes`` is known without reading data; ``get`` reads one tensor,
    or only its rows [start, stop) (an LM-head range: the export never holds the whole head for it)."""

    def __init__(self, label: str, files: list[Path], shapes: dict[str, tuple[int, ...]],
                 getter: Callable[..., torch.Tensor]):
        self.label = label
        self.files = files
        self.shapes = shapes
        self._getter = getter  # (name, rows: (start, stop) or None) -> tensor

    def get(self, name: str) -> torch.Tensor:
        return self._getter(name, None)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._getter(name, (start, stop))

    def subset(self, prefix: str) -> "TensorSource":
        """The tensors under ``prefix``, renamed without it."""
        shapes = {k[len(prefix):]: v for k, v in self.shapes.items() if k.startswith(prefix)}
        return TensorSource(self.label, self.files, shapes, lambda name, rows: self._getter(prefix + name, rows))

    def without(self, names: Iterable[str]) -> "TensorSource":
        drop = set(names)
        return TensorSource(self.label, self.files, {k: v for k, v in self.shapes.items() if k not in drop},
                            self._getter)

    def renamed(self, mapping: dict[str, str]) -> "TensorSource":
        """New name -> tensor of the old name, for the pairs in ``mapping`` (old -> new)."""
        if not mapping:
            return self
        back = {new: old for old, new in mapping.items()}
        shapes = {mapping.get(k, k): v for k, v in self.shapes.items()}
        return TensorSource(self.label, self.files, shapes,
                            lambda name, rows: self._getter(back.get(name, name), rows))

    @classmethod
    def from_state_dict(cls, label: str, files: list[Path], state: Mapping) -> "TensorSource":
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{label}: entries that are not tensors: {_names(bad)}")
        return cls(label, files, {k: tuple(v.shape) for k, v in state.items()},
                   lambda name, rows: _copy_of_mapped(state[name] if rows is None else state[name][rows[0]:rows[1]]))


def _copy_of_mapped(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor of a memory-mapped pickle (``torch.load(mmap=True)``), whose pages are then dropped from
    this process's resident set (``madvise(MADV_DONTNEED)``; they are clean file pages, read again if touched):
    a streamed export would otherwise keep every page it read resident. Elsewhere it is just a copy."""
    copy = tensor.clone()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes >= (1 << 20):
        _drop_pages(tensor.data_ptr(), nbytes)
    return copy


def _drop_pages(address: int, nbytes: int) -> None:
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start = (address + page - 1) // page * page  # whole pages inside the tensor only
        stop = (address + nbytes) // page * page
        if stop > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), 4)  # 4 = MADV_DONTNEED
    except (OSError, AttributeError):
        pass


def _names(names: Iterable[str], limit: int = MAX_NAMES) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _open_safetensors(label: str, files: list[Path], weight_map: dict[str, str] | None = None) -> TensorSource:
    from safetensors import safe_open

    handles = {}
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            h = safe_open(str(f), framework="pt", device="cpu")
        except Exception as exc:  # corrupt header, not a safetensors file
            raise CheckpointError(f"{label}: cannot read {f}: {exc}") from None
        handles[f] = h
        for key in h.keys():
            if key in where:
                raise CheckpointError(f"{label}: tensor {key} is stored twice ({where[key].name}, {f.name})")
            where[key] = f
            shapes[key] = tuple(h.get_slice(key).get_shape())
    if weight_map is not None:
        wrong = [k for k, fname in weight_map.items() if k not in where or where[k].name != Path(fname).name]
        if wrong:
            raise CheckpointError(f"{label}: the index names tensors its shards do not hold as listed: {_names(wrong)}")
        unlisted = [k for k in where if k not in weight_map]
        if unlisted:
            raise CheckpointError(f"{label}: shards hold tensors the index does not list: {_names(unlisted)}")
    offsets = {f: _safetensors_offsets(label, f) for f in files}
    return TensorSource(label, list(files), shapes,
                        lambda name, rows: _read_safetensor(where[name], name, offsets, rows))


# safetensors dtype codes -> torch dtypes (the ones a checkpoint of these networks holds)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_offsets(label: str, path: Path) -> dict[str, tuple[torch.dtype, tuple, int, int]]:
    """name -> (dtype, shape, absolute offset, bytes), from the header (safe_open has validated it)."""
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{label}: {path.name}: tensor {name} has dtype {info['dtype']}, which these "
                                  "networks never store")
        begin, end = info["data_offsets"]
        out[name] = (dtype, tuple(info["shape"]), 8 + size + begin, end - begin)
    return out


def _read_safetensor(path: Path, name: str, offsets: dict, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor, read with ordinary file reads rather than through a memory map: pages of a mapped file count
    in the process's resident set as they are touched, so streaming a 6 GB checkpoint through a map would show
    (and, under pressure, hold) 6 GB; read pages stay in the kernel's page cache instead."""
    dtype, shape, offset, length = offsets[path][name]
    if rows is not None:  # rows of a row-major tensor are one contiguous byte range
        row_bytes = length // shape[0] if shape and shape[0] else 0
        start, stop = max(0, rows[0]), min(shape[0], rows[1])
        shape, offset, length = (max(0, stop - start), *shape[1:]), offset + start * row_bytes, \
            max(0, stop - start) * row_bytes
    tensor = torch.empty(shape, dtype=dtype)
    if length:
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(view) != length:
                raise CheckpointError(f"{path}: tensor {name} is cut short (the file is truncated)")
    return tensor


def _torch_load(label: str, path: Path):
    """torch.load with weights_only=True (no code from the file runs), memory-mapped when the format allows."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) serialization cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{label}: {path} holds objects other than tensors and plain containers; refusing to "
                              f"unpickle them (weights_only=True): {first}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{label}: cannot read {path}: {exc}") from None


def _open_bins(label: str, files: list[Path]) -> TensorSource:
    state: dict = {}
    for f in files:
        part = _torch_load(label, f)
        if not isinstance(part, Mapping):
            raise CheckpointError(f"{label}: {f} is not a state dict (got {type(part).__name__})")
        state.update(part)
    return TensorSource.from_state_dict(label, files, state)


def open_weights(folder: Path, stem: str, label: str) -> TensorSource:
    """The weights of a ``save_pretrained`` folder: ``{stem}.safetensors[.index.json]`` preferred, then the
    ``fp16`` safetensors variant, then pickles (``pytorch_model`` / ``diffusion_pytorch_model`` ``.bin``)."""
    bin_stem = "pytorch_model" if stem == "model" else stem
    candidates = [
        (folder / f"{stem}.safetensors.index.json", "safetensors"),
        (folder / f"{stem}.safetensors", "safetensors"),
        (folder / f"{stem}.fp16.safetensors.index.json", "safetensors"),
        (folder / f"{stem}.fp16.safetensors", "safetensors"),
        (folder / f"{bin_stem}.bin.index.json", "bin"),
        (folder / f"{bin_stem}.bin", "bin"),
    ]
    for path, kind in candidates:
        if not path.is_file():
            continue
        weight_map = None
        files = [path]
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{label}: {path} is not a weight index ({exc})") from None
            files = sorted({folder / Path(f).name for f in weight_map.values()})
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{label}: shards listed in {path.name} are missing: {_names(absent)}")
        if kind == "safetensors":
            src = _open_safetensors(label, files, weight_map)
        else:
            src = _open_bins(label, files)
        src.files = ([path] if weight_map is not None else []) + files
        return src
    raise CheckpointError(f"{label}: no weights in {folder} (expected {stem}.safetensors, its sharded index "
                          f"{stem}.safetensors.index.json, or {bin_stem}.bin)")


# ----------------------------------------------------------------------------------------------------------------
# Strict checking and loading
# ----------------------------------------------------------------------------------------------------------------
def mismatch_report(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str:
    """'' when the names and shapes agree, else one line naming the missing, unexpected and mis-shaped tensors."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shaped = sorted(k for k in expected if k in found and tuple(found[k]) != tuple(expected[k]))
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
    if shaped:
        shown = ", ".join(f"{k} {list(found[k])} in the checkpoint vs {list(expected[k])} expected"
                          for k in shaped[:MAX_NAMES])
        more = f" (+{len(shaped) - MAX_NAMES} more)" if len(shaped) > MAX_NAMES else ""
        parts.append(f"shape mismatch {len(shaped)}: {shown}{more}")
    return "; ".join(parts)


def _expected_shapes(module: torch.nn.Module, skip: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
    drop = set(skip)
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in drop}


def check_source(label: str, expected: Mapping[str, tuple], source: TensorSource, hint: str = "") -> None:
    report = mismatch_report(expected, source.shapes)
    if report:
        raise CheckpointError(f"{label}: {report}" + (f" ({hint})" if hint else ""))


def _copy_into(module: torch.nn.Module, source: TensorSource, names: Iterable[str]) -> None:
    """Copy tensor by tensor (dtype converted to the module's), so a large checkpoint is never held twice. A lazy
    module (fake tensors, ``_materialize(..., lazy=True)``) gets a reader per tensor instead: the export streams
    each from the checkpoint when it writes it (export/streaming.py)."""
    from functools import partial

    from illume_rt.export import streaming

    targets = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in names:
            if streaming.is_fake(targets[name]):
                streaming.lazy(targets[name], partial(source.get, name), partial(source.get_rows, name))
            else:
                targets[name].copy_(source.get(name))


def _materialize(module: torch.nn.Module, lazy: bool = False) -> torch.nn.Module:
    """A meta-device module -> uninitialised CPU tensors (every one is overwritten by the checkpoint), or, when
    ``lazy``, fake tensors that ``_copy_into`` gives readers of the checkpoint (nothing is read now)."""
    if lazy:
        from illume_rt.export import streaming

        return streaming.fake_empty(module)
    return module.to_empty(device="cpu")


def _check_buffers(module: torch.nn.Module, rebuilt: Iterable[str], label: str) -> None:
    """Non-persistent buffers are not in checkpoints: each must have been recomputed after ``_materialize``."""
    persistent = set(module.state_dict())
    left = [n for n, _ in module.named_buffers() if n not in persistent and not n.startswith(tuple(rebuilt))]
    if left:
        raise RuntimeError(f"{label}: no rule to recompute non-persistent buffers {left} after loading")


def load_module_strict(module: torch.nn.Module, source: TensorSource, label: str, hint: str = "") -> torch.nn.Module:
    """Check ``source`` against ``module``'s state dict (names and shapes), then copy every tensor in."""
    expected = _expected_shapes(module)
    check_source(label, expected, source, hint)
    _copy_into(module, source, expected)
    return module


# ----------------------------------------------------------------------------------------------------------------
# MLLM folder
# ----------------------------------------------------------------------------------------------------------------
# Official structure ids that must sit where the official layout puts them (token -> VocabLayout attribute or id).
def _official_token_ids(vocab: VocabLayout) -> dict[str, int]:
    ids = {
        "<|endoftext|>": vocab.pad_id, "<|im_start|>": vocab.im_start_id, "<|im_end|>": vocab.im_end_id,
        "<start_of_image>": vocab.start_of_image_id, "<end_of_image>": vocab.end_of_image_id,
        "<end_of_line>": vocab.end_of_line_id,
        "<start_of_level0>": vocab.start_of_level0_id, "<end_of_level0>": vocab.end_of_level0_id,
        "<start_of_level1>": vocab.start_of_level1_id, "<end_of_level1>": vocab.end_of_level1_id,
    }
    top = vocab.size_tag_step * vocab.num_size_tags
    ids[f"<height_{vocab.size_tag_step}>"] = vocab.height_tag(vocab.size_tag_step)
    ids[f"<height_{top}>"] = vocab.height_tag(top)
    ids[f"<width_{vocab.size_tag_step}>"] = vocab.width_tag(vocab.size_tag_step)
    ids[f"<width_{top}>"] = vocab.width_tag(top)
    # code tokens, named by ILLUME/scripts/prepare_llm_with_extended_vision_tokenizer.py:13 "<|image_level{}_{}|>"
    ids["<|image_level0_0|>"] = vocab.semantic_code_offset
    ids[f"<|image_level0_{vocab.semantic_codebook_size - 1}|>"] = vocab.semantic_range[1] - 1
    ids["<|image_level1_0|>"] = vocab.pixel_code_offset
    ids[f"<|image_level1_{vocab.pixel_codebook_size - 1}|>"] = vocab.pixel_range[1] - 1
    return ids


def check_tokenizer_vocab(tokenizer_file: Path, vocab: VocabLayout) -> None:
    """The tokenizer must map the structure tokens, size tags and first/last codes to the official ids."""
    try:
        data = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"tokenizer {tokenizer_file}: not JSON ({exc})") from None
    table: dict[str, int] = {}
    model_vocab = (data.get("model") or {}).get("vocab")
    if isinstance(model_vocab, dict):
        table.update(model_vocab)
    for tok in data.get("added_tokens") or []:
        table[tok["content"]] = tok["id"]
    wrong = []
    for token, want in _official_token_ids(vocab).items():
        got = table.get(token)
        if got != want:
            wrong.append(f"{token} -> {got if got is not None else 'absent'} (official {want})")
    if wrong:
        raise CheckpointError(f"tokenizer {tokenizer_file}: not the official ILLUME+ vocabulary: "
                              f"{'; '.join(wrong[:MAX_NAMES])}" + (f" (+{len(wrong) - MAX_NAMES} more)"
                                                                    if len(wrong) > MAX_NAMES else ""))


def read_json(path: Path, label: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{label}: {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{label}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{label}: {path} is not a JSON object")
    return data


def _resolve_base(base: Preset | str | None) -> Preset:
    if isinstance(base, Preset):
        return base
    try:
        return get_preset(base or "3b")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def preset_from_mllm_config(config: dict, base: Preset | str | None = None, label: str = "config.json") -> Preset:
    """The preset of an MLLM checkpoint.

    From ``config.json``: every LLM dimension, ``tie_word_embeddings``, the vocabulary rows (the layout is the
    official one, which is refused when the table is too small for it) and ``mm_hidden_size``. From ``base`` (a
    preset or its name; default the official networks of "3b", identical to "7b"'s): the ViT internals (heads,
    depth, patch), the MoVQ encoder/decoder, the codebook dim and the default diffusion config, which
    ``config.json`` does not describe. Codebook sizes come from the vocabulary layout.
    """
    base = _resolve_base(base)
    if config.get("model_type") != MLLM_MODEL_TYPE:
        raise CheckpointError(f"{label}: model_type {config.get('model_type')!r} is not {MLLM_MODEL_TYPE!r} "
                              "(pass the ILLUME+ MLLM folder)")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "mm_hidden_size")
    absent = [k for k in required if k not in config]
    if absent:
        raise CheckpointError(f"{label}: missing fields {', '.join(absent)}")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{label}: hidden_act {config['hidden_act']!r} is not silu")
    if config.get("use_sliding_window"):
        raise CheckpointError(f"{label}: use_sliding_window is not supported")
    rope_scaling = config.get("rope_scaling")
    if rope_scaling and (rope_scaling.get("rope_type") or rope_scaling.get("type")) not in (None, "default"):
        raise CheckpointError(f"{label}: rope_scaling {rope_scaling} is not supported")
    if "unpad" in str(config.get("mm_patch_merge_type", "flat")):
        raise CheckpointError(f"{label}: mm_patch_merge_type {config['mm_patch_merge_type']!r} (image_newline) "
                              "is not supported; the released model uses 'flat'")
    tower = config.get("mm_vision_tower")
    if isinstance(tower, dict) and tower.get("type", "DualVisionTower") != "DualVisionTower":
        raise CheckpointError(f"{label}: mm_vision_tower type {tower.get('type')!r} is not DualVisionTower")
    proj = config.get("mm_projector")
    if isinstance(proj, dict):
        if proj.get("type", "MixedProjector") != "MixedProjector":
            raise CheckpointError(f"{label}: mm_projector type {proj.get('type')!r} is not MixedProjector")
        for key in ("projector_cfg1", "projector_cfg2"):
            sub = proj.get(key) or {}
            if sub.get("type", "MLPProjector") != "MLPProjector" or sub.get("mlp_depth", 2) != 2 \
                    or sub.get("pre_norm", False):
                raise CheckpointError(f"{label}: mm_projector.{key} {sub} is not an MLPProjector of depth 2 "
                                      "without pre-norm")

    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if hidden % heads:
        raise CheckpointError(f"{label}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if config.get("head_dim") not in (None, hidden // heads):
        raise CheckpointError(f"{label}: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    rope_theta = config.get("rope_theta")
    if rope_theta is None:
        rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)  # transformers' default
    llm = LLMConfig(
        hidden_size=hidden, num_hidden_layers=int(config["num_hidden_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        intermediate_size=int(config["intermediate_size"]), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta), max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )

    rows = int(config["vocab_size"])
    compact = config.get(COMPACT_VOCAB_KEY)
    if compact is not None:
        vocab = _compact_vocab(compact, rows, label)
    else:
        need = official_vocab_layout(10 ** 9)
        need_rows = need.pixel_code_offset + need.pixel_codebook_size
        if rows < need_rows:
            raise CheckpointError(f"{label}: vocab_size {rows} is smaller than the official ILLUME+ vocabulary "
                                  f"({need_rows} ids: Qwen2.5 text, structure tokens, 32768 semantic and 98304 "
                                  f"pixel codes); a smaller vocabulary must be described by {COMPACT_VOCAB_KEY}")
        vocab = official_vocab_layout(rows)
    codebook = replace(base.codebook, semantic_size=vocab.semantic_codebook_size,
                       pixel_size=vocab.pixel_codebook_size)

    mm = config["mm_hidden_size"]
    if not (isinstance(mm, (list, tuple)) and len(mm) == 2 and all(isinstance(v, int) for v in mm)):
        raise CheckpointError(f"{label}: mm_hidden_size {mm!r} is not [semantic_dim, pixel_dim]")
    vision_tower = replace(base.vision_tower, out_dim=mm[0])
    name = _official_name(llm) or (base.name if compact is not None else "checkpoint")
    preset = replace(base, name=name, vocab=vocab, llm=llm,
                     vision_tower=vision_tower, codebook=codebook)
    if tuple(preset.projector_in_dims) != tuple(mm):
        raise CheckpointError(f"{label}: mm_hidden_size {list(mm)} but the pixel encoder of the base preset "
                              f"{base.name!r} emits {preset.projector_in_dims[1]} channels")
    return preset


def _compact_vocab(data, rows: int, label: str) -> VocabLayout:
    """The ``illume_rt_vocab`` entry of a small model's config.json (illume-nano): a ``VocabLayout`` as a dict,
    e.g. byte-level text ids then the ILLUME+ structure tokens and codes (``compact_vocab_layout``)."""
    try:
        vocab = VocabLayout.from_dict(dict(data))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{label}: {COMPACT_VOCAB_KEY} is not a vocabulary layout ({exc})") from None
    if vocab.vocab_rows != rows:
        raise CheckpointError(f"{label}: {COMPACT_VOCAB_KEY} has {vocab.vocab_rows} rows but vocab_size is {rows}")
    return vocab


def check_byte_tokenizer(tokenizer_file: Path, vocab: VocabLayout) -> None:
    """A 256-id text vocabulary is byte-level (the runtime's ByteTokenizer): tokenizer.json must agree."""
    from tokenizers import Tokenizer

    sample = "a red circle at the top left, größer {x}\n"
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(sample, add_special_tokens=False).ids
    if ids != list(sample.encode("utf-8")):
        raise CheckpointError(f"tokenizer {tokenizer_file}: a {vocab.text_vocab_size}-id text vocabulary must map "
                              "UTF-8 bytes to ids 0..255 (the bundle uses the byte tokenizer)")


def _official_name(llm: LLMConfig) -> str | None:
    dims = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    for name in ("3b", "7b"):
        ref = get_preset(name).llm
        if all(getattr(ref, d) == getattr(llm, d) for d in dims):
            return name
    return None


@dataclass
class MLLMCheckpoint:
    preset: Preset
    llm: object  # transformers Qwen2ForCausalLM, float32
    vision_tower: object  # Qwen2VisionTransformer
    projectors: object  # Projectors
    pixel_encoder: object  # MoVQEncoder (the MLLM's fine-tuned copy)
    tokenizer_file: Path
    source: dict = field(default_factory=dict)


def _build_llm_empty(preset: Preset, lazy: bool = False):
    from illume_rt.export.llm import build_llm

    with torch.device("meta"):
        llm = build_llm(preset)
    _materialize(llm, lazy)
    rotary = llm.model.rotary_emb
    llm.model.rotary_emb = type(rotary)(config=llm.config)  # recomputes the non-persistent inv_freq on the CPU
    _check_buffers(llm, ["model.rotary_emb."], "LLM")
    if preset.llm.tie_word_embeddings:
        llm.tie_weights()
    return llm


def _llm_plan(llm, source: TensorSource, preset: Preset, label: str):
    """(expected shapes, source, hint) for the LLM keys of the MLLM (vision and projector keys removed).

    Tied head: ``lm_head.weight`` may be absent (it is the embedding table); when present it must equal it."""
    expected = _expected_shapes(llm)
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    hint = ""
    if preset.llm.tie_word_embeddings:
        expected.pop(head)
        if head in source.shapes:
            if source.shapes[head] != source.shapes.get(embed) or not torch.equal(source.get(head),
                                                                                   source.get(embed)):
                raise CheckpointError(f"{label}: config.json ties the word embeddings (tie_word_embeddings true) "
                                      f"but {head} differs from {embed}")
            source = source.without([head])
    elif head not in source.shapes:
        hint = "config.json has tie_word_embeddings false, so the checkpoint must hold lm_head.weight"
    return expected, source, hint


def _load_parts(label: str, parts: list[tuple]) -> None:
    """Check every part first and raise one error naming every problem, then copy the tensors in.

    A part is (module or None, expected shapes, source, display prefix, hint); names in ``expected`` and
    ``source`` are the module's, the prefix restores the checkpoint's names in the message. A part whose module
    is None only checks (everything in it is unexpected when ``expected`` is empty)."""
    problems = []
    for _, expected, source, prefix, hint in parts:
        report = mismatch_report({prefix + k: v for k, v in expected.items()},
                                 {prefix + k: v for k, v in source.shapes.items()})
        if report:
            problems.append(report + (f" ({hint})" if hint else ""))
    if problems:
        raise CheckpointError(f"{label}: " + "; ".join(problems))
    for module, expected, source, _, _ in parts:
        if module is not None:
            _copy_into(module, source, expected)


def _finish_llm(llm, preset: Preset):
    if preset.llm.tie_word_embeddings:
        llm.tie_weights()
        if llm.lm_head.weight is not llm.model.embed_tokens.weight:
            raise RuntimeError("LLM: tie_weights did not tie lm_head to embed_tokens")
    return llm.eval()


def load_mllm(folder: str | Path, base: Preset | str | None = None, lazy: bool = False) -> MLLMCheckpoint:
    """The ILLUME+ MLLM ``save_pretrained`` folder -> preset, LLM, vision tower, projectors, pixel encoder.

    Every part is checked (names and shapes) before any tensor is read into a module; one error lists the
    problems of all parts. ``lazy``: the modules hold fake tensors with readers of the (memory-mapped)
    checkpoint instead of the weights, for the streaming export; the checks are the same."""
    from illume_rt.export.networks.dualvitok import build_dualvitok_pixel
    from illume_rt.export.networks.vision import (PROJECTOR_PREFIX, VISION_TOWER_PREFIX, VisionRotaryEmbedding,
                                                  build_projectors, build_vision_tower)

    folder = Path(folder).resolve()
    label = f"MLLM checkpoint {folder}"
    if not folder.is_dir():
        raise CheckpointError(f"{label}: not a folder")
    config_path = folder / "config.json"
    config = read_json(config_path, label)
    preset = preset_from_mllm_config(config, base, label=f"{label}: config.json")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{label}: tokenizer.json is missing (the bundle needs the fast tokenizer file)")
    check_tokenizer_vocab(tokenizer_file, preset.vocab)
    if preset.vocab.text_vocab_size == 256:
        check_byte_tokenizer(tokenizer_file, preset.vocab)

    weights = open_weights(folder, "model", label)
    vision_keys = [k for k in weights.shapes if k.startswith(VISION_ROOT)]
    projector_keys = [k for k in weights.shapes if k.startswith(PROJECTOR_PREFIX)]
    known = (VISION_TOWER_PREFIX, PIXEL_ENCODER_PREFIX)
    stray = {k: weights.shapes[k] for k in vision_keys if not k.startswith(known)}

    llm = _build_llm_empty(preset, lazy)
    tower = _materialize(build_vision_tower(preset, device="meta"), lazy)
    tower.rotary_pos_emb = VisionRotaryEmbedding(preset.vision_tower.embed_dim // preset.vision_tower.num_heads // 2)
    _check_buffers(tower, ["rotary_pos_emb."], "vision tower")
    projectors = _materialize(build_projectors(preset, device="meta"), lazy)
    pixel_encoder = _materialize(build_dualvitok_pixel(preset, device="meta").pixel_encoder, lazy)
    _check_buffers(pixel_encoder, [], "pixel encoder")

    llm_expected, llm_source, llm_hint = _llm_plan(llm, weights.without(vision_keys + projector_keys), preset, label)
    parts = [(llm, llm_expected, llm_source, "", llm_hint)]
    for prefix, module in ((VISION_TOWER_PREFIX, tower), (PROJECTOR_PREFIX, projectors),
                           (PIXEL_ENCODER_PREFIX, pixel_encoder)):
        parts.append((module, _expected_shapes(module), weights.subset(prefix), prefix, ""))
    if stray:
        hint = f"the vision tower holds only {VISION_TOWER_PREFIX}* and {PIXEL_ENCODER_PREFIX}*"
        parts.append((None, {}, TensorSource(label, [], stray, weights._getter), "", hint))
    _load_parts(label, parts)
    _finish_llm(llm, preset)

    files = [config_path, tokenizer_file, *weights.files]
    source = {"path": str(folder), "files": _file_records(folder, files)}
    return MLLMCheckpoint(preset, llm, tower.eval(), projectors.eval(), pixel_encoder.eval(), tokenizer_file, source)


# ----------------------------------------------------------------------------------------------------------------
# DualViTok pytorch_model.bin
# ----------------------------------------------------------------------------------------------------------------
def read_dualvitok_state(path: str | Path, use_ema: bool = False) -> tuple[dict, str]:
    """(state dict, which): the raw state dict, or the one under 'ema' (only when ``use_ema``; else as a last
    resort), 'model' or 'state_dict', as the official DualVisionTower picks it. A common DDP 'module.' prefix is
    removed."""
    path = Path(path)
    label = f"DualViTok checkpoint {path}"
    if not path.is_file():
        raise CheckpointError(f"{label}: no such file")
    obj = _torch_load(label, path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: not a state dict (got {type(obj).__name__})")
    wrapped = [k for k in DUALVITOK_WRAPPERS if isinstance(obj.get(k), Mapping)]
    if use_ema and "ema" in wrapped:
        which = "ema"
    elif [k for k in wrapped if k != "ema"]:
        which = next(k for k in wrapped if k != "ema")
        if use_ema:
            log.warning("%s: no 'ema' weights; using '%s'", label, which)
    elif wrapped:  # only 'ema'
        which = "ema"
        if not use_ema:
            log.warning("%s: only 'ema' weights are stored; using them", label)
    else:
        which = "raw"
    state = dict(obj[which]) if which != "raw" else dict(obj)
    if not wrapped:
        nested = [k for k, v in state.items() if isinstance(v, Mapping)]
        if nested:
            raise CheckpointError(f"{label}: top-level entries {_names(nested)} are neither tensors nor one of the "
                                  f"known wrappers {', '.join(DUALVITOK_WRAPPERS)}")
    for wrapper in ("module.", "_orig_mod."):
        if state and all(k.startswith(wrapper) for k in state):
            state = {k[len(wrapper):]: v for k, v in state.items()}
    return state, which


def load_dualvitok(path: str | Path, preset: Preset, use_ema: bool = False, lazy: bool = False):
    """``DualViTokPixel`` (codebooks, tokenizer pixel encoder + quant conv, pixel decoder) from ``pytorch_model.bin``.

    Returns (model, source record). Training-only keys (``DUALVITOK_TRAINING_ONLY_PREFIXES``) are ignored and listed
    in a debug log; any other key the pixel path does not have is an error."""
    from illume_rt.export.networks.dualvitok import DualViTokPixel, build_dualvitok_pixel

    path = Path(path).resolve()
    label = f"DualViTok checkpoint {path}"
    state, which = read_dualvitok_state(path, use_ema)
    keep = tuple(p + "." for p in DualViTokPixel.PREFIXES)
    ignored = sorted(k for k in state if k.startswith(DUALVITOK_TRAINING_ONLY_PREFIXES) and not k.startswith(keep))
    if ignored:
        counts = {p: sum(k.startswith(p) for k in ignored) for p in DUALVITOK_TRAINING_ONLY_PREFIXES}
        log.debug("%s: ignoring %d training-only tensors (%s): %s", label, len(ignored),
                  ", ".join(f"{p}* {n}" for p, n in counts.items() if n), ", ".join(ignored))
    for k in ignored:
        del state[k]
    source = TensorSource.from_state_dict(f"{label} [{which}]", [path], state)
    model = _materialize(build_dualvitok_pixel(preset, device="meta"), lazy)
    _check_buffers(model, [], "DualViTok")
    load_module_strict(model, source, source.label)
    record = {"path": str(path), "weights": which,
              "files": {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}},
              "ignored_training_only": len(ignored)}
    return model.eval(), record


# ----------------------------------------------------------------------------------------------------------------
# Diffusion decoder (diffusers folder)
# ----------------------------------------------------------------------------------------------------------------
def read_diffusion_config(folder: str | Path) -> tuple[DiffusionConfig, list[Path]]:
    """The folder's unet/vae/scheduler configs as a ``DiffusionConfig`` (model init kwargs only), and the files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder).resolve()
    label = f"diffusion decoder {folder}"
    if not folder.is_dir():
        raise CheckpointError(f"{label}: not a folder")
    index_path = folder / "model_index.json"
    index = read_json(index_path, label)
    for part, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == cls):
            raise CheckpointError(f"{label}: model_index.json lists {part} as {entry!r}, expected "
                                  f"['diffusers', '{cls}']")
    configs = {}
    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        path = folder / part / "config.json"
        raw = read_json(path, label)
        if raw.get("_class_name", cls.__name__) != cls.__name__:
            raise CheckpointError(f"{label}: {part}/config.json is a {raw['_class_name']}, not {cls.__name__}")
        init = cls.extract_init_dict(dict(raw))[0]
        configs[part] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in init.items()}
    sched_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = {k: v for k, v in read_json(sched_path, label).items() if k != "_diffusers_version"}
    import diffusers

    name = scheduler.get("_class_name")
    if not name or not hasattr(diffusers, name):
        raise CheckpointError(f"{label}: scheduler/scheduler_config.json names no diffusers scheduler ({name!r})")
    files = [index_path, folder / "unet" / "config.json", folder / "vae" / "config.json", sched_path]
    return DiffusionConfig(unet=configs["unet"], vae=configs["vae"], scheduler=scheduler), files


def _legacy_attention_renames(source: TensorSource, expected: Mapping[str, tuple]) -> dict[str, str]:
    renames = {}
    for key in source.shapes:
        if key in expected or ".attentions." not in key:
            continue
        head, _, leaf = key.rpartition(".")  # leaf: weight / bias
        stem, _, old = head.rpartition(".")
        if old in _LEGACY_ATTENTION_NAMES:
            new = f"{stem}.{_LEGACY_ATTENTION_NAMES[old]}.{leaf}"
            if new in expected and new not in source.shapes:
                renames[key] = new
    return renames


def load_diffusion(folder: str | Path, preset: Preset):
    """(preset with the folder's DiffusionConfig, unet, vae, source record) from a diffusers pipeline folder."""
    from illume_rt.export.networks.diffusion import build_diffusion, check_config, map_channels

    folder = Path(folder).resolve()
    label = f"diffusion decoder {folder}"
    diffusion, files = read_diffusion_config(folder)
    preset = replace(preset, diffusion=diffusion)
    want = diffusion.vae.get("latent_channels", 4) + map_channels(preset)
    if diffusion.unet.get("in_channels") != want:
        raise CheckpointError(f"{label}: unet in_channels {diffusion.unet.get('in_channels')} != latent channels "
                              f"{diffusion.vae.get('latent_channels', 4)} + 2 x codebook dim {preset.codebook.dim} "
                              f"= {want}")
    try:
        check_config(preset)
    except ValueError as exc:
        raise CheckpointError(f"{label}: {exc}") from None
    unet, vae = build_diffusion(preset, device="meta")
    for part, module in (("unet", unet), ("vae", vae)):
        _materialize(module)
        _check_buffers(module, [], part)
        weights = open_weights(folder / part, "diffusion_pytorch_model", f"{label} ({part})")
        expected = _expected_shapes(module)
        weights = weights.renamed(_legacy_attention_renames(weights, expected))
        load_module_strict(module, weights, f"{label} ({part})")
        files += weights.files
    record = {"path": str(folder), "files": _file_records(folder, files)}
    return preset, unet.eval(), vae.eval(), record


# ----------------------------------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------------------------------
def load_reference_models(mllm_dir: str | Path, dualvitok: str | Path | None = None,
                          diffusion_dir: str | Path | None = None, base: Preset | str | None = None,
                          use_ema: bool = False, lazy: bool = False):
    """``ReferenceModels`` (random_weights False) from the official checkpoints.

    ``dualvitok`` (the tokenizer ``pytorch_model.bin``) gives the codebooks and the pixel decoder; without it
    ``models.dualvitok`` is None and no bundle can be written. ``diffusion_dir`` is optional. ``lazy``: the MLLM
    and tokenizer networks hold readers of the checkpoint, not the weights (``load_mllm``), for the streaming
    export; the diffusion decoder is still loaded whole (its export folds weights into constants when built)."""
    from illume_rt.export.bundle import ReferenceModels

    mllm = load_mllm(mllm_dir, base, lazy)
    preset = mllm.preset
    source: dict = {"mllm": mllm.source, "tokenizer_file": str(mllm.tokenizer_file)}
    unet = vae = None
    if diffusion_dir is not None:
        preset, unet, vae, source["diffusion"] = load_diffusion(diffusion_dir, preset)
    tokenizer_model = None
    if dualvitok is not None:
        tokenizer_model, source["dualvitok"] = load_dualvitok(dualvitok, preset, use_ema, lazy)
    return ReferenceModels(preset=preset, llm=mllm.llm, dualvitok=tokenizer_model, random_weights=False,
                           source=source, vision_tower=mllm.vision_tower, projectors=mllm.projectors,
                           pixel_encoder=mllm.pixel_encoder, unet=unet, vae=vae)

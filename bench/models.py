"""The benchmark's models: the bench bundle (exported once, cached) with the byte-level stand-in tokenizer, and the same
weights saved as a transformers folder for the peer (onnxruntime-genai's model builder).

Everything is deterministic from the preset's seed, so the bundle, the PyTorch reference and the peer share weights.
Torch is imported only by the functions that build things.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from illume_rt.export.tokenizer_files import write_text_byte_tokenizer


def cache_root() -> Path:
    return Path(os.environ.get("ILLUME_RT_CACHE", Path.home() / ".cache" / "illume-rt"))


def _source_digest() -> str:
    """Export code + preset: a change re-exports (same rule as the CLI's default bundle)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("export",):
        for file in sorted((root / folder).rglob("*.py")):
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def reference_models(preset_name: str, tokenizer_dir: Path):
    from illume_rt.export.bundle import build_reference_models
    from illume_rt.export.configs import get_preset

    preset = get_preset(preset_name)
    models = build_reference_models(preset)
    if preset.vocab.text_vocab_size != 256:
        models.source = {**models.source,
                         "tokenizer_file": str(write_text_byte_tokenizer(tokenizer_dir / "tokenizer.json"))}
    return models


def bench_bundle(preset_name: str = "bench", log: Callable[[str], None] = print) -> Path:
    """The cached bundle of ``preset_name`` (exported on first use)."""
    from illume_rt.export.bundle import write_bundle

    path = cache_root() / "bundles" / f"{preset_name}-{_source_digest()}"
    if (path / "manifest.json").is_file():
        return path
    log(f"exporting the '{preset_name}' preset once to {path} (random weights) ...")
    with tempfile.TemporaryDirectory() as tmp:
        models = reference_models(preset_name, Path(tmp))
        write_bundle(models, path, log=lambda m: log("  " + m))
    return path


def hf_folder(preset_name: str, bundle: Path, log: Callable[[str], None] = print) -> Path:
    """The same LLM as a transformers folder (config, safetensors, tokenizer) for onnxruntime-genai's builder."""
    path = bundle.parent.parent / "peer" / f"{bundle.name}-hf"
    if (path / "config.json").is_file():
        return path
    from transformers import PreTrainedTokenizerFast

    from illume_rt.export.configs import get_preset
    from illume_rt.export.llm import build_llm

    log(f"saving the {preset_name} LLM as a transformers folder at {path} ...")
    preset = get_preset(preset_name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent if path.parent.exists() else None))
    try:
        build_llm(preset).save_pretrained(tmp)
        # no special tokens: the stand-in's vocabulary is the 256 bytes (ids of the structure come from the config)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(write_text_byte_tokenizer(tmp / "tokenizer.json")))
        tok.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["eos_token_id"], config["pad_token_id"] = preset.vocab.im_end_id, preset.vocab.pad_id
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path

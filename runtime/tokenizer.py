"""Tokenizers the runtime can load from a bundle, and prompt assembly from (text | special id) segments.

Special ids are inserted by id from the vocabulary layout, never re-tokenized from strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from illume_rt.contract import VocabLayout


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: the text vocabulary of the tiny presets (no tokenizer file needed)."""

    def __init__(self, layout: VocabLayout) -> None:
        if layout.text_vocab_size != 256:
            raise ValueError("ByteTokenizer needs a 256-id text vocabulary")
        self.layout = layout

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` (Qwen2.5's for the released checkpoints) through the small ``tokenizers`` package."""

    def __init__(self, path: Path, layout: VocabLayout) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.layout = layout

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        text_ids = [i for i in ids if i < self.layout.text_vocab_size]
        return self._tok.decode(text_ids)


def load_tokenizer(spec: dict, bundle_dir: Path, layout: VocabLayout) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer(layout)
    if kind == "hf":
        return HFTokenizer(bundle_dir / spec["file"], layout)
    from illume_rt.runtime.bundle import BundleError

    raise BundleError(f"unknown tokenizer kind {kind!r} in the bundle manifest; re-export the bundle")


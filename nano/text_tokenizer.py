"""illume-nano's text tokenizer: a byte-level BPE, the kind Qwen2.5's ``tokenizer.json`` is, whose merges make every
word nano's prompts use one token (" triangle", "Generate", " background"), while any other text still encodes, byte
by byte. Torch-free: training, the checkpoint writer and the tests build it from the grammar alone.

Why not bytes: with one id per byte, a text-to-image prompt is 165 of a training sequence's 534 ids and an
understanding chat's text about 270 of 652, so attention and matrix products spend a third of every MLLM step on
spelling; the LLM must also learn to read a shape's name from up to eight bytes. With the words as tokens the same
prompts are about a quarter as long (nano/README.md, "Text tokenizer").

The merges are learned from ``corpus()``: every text string the MLLM stages and the runtime tokenize for nano's
grammar (prompts, questions, answers, edit instructions, and the chat template's text between special ids), each
once, until no pair is left, so every such word ends as one token. The result is a pure function of the grammar
(data.py) and the templates (illume_rt.contract); ``TEXT_VOCAB_SIZE`` in the nano preset (export/configs.py) is its
size, and a test checks the two agree.
"""

from __future__ import annotations

import functools
from pathlib import Path

from illume_rt.nano import data


def corpus() -> list[str]:
    """Every distinct string the MLLM stages tokenize for the grammar, in a fixed order: the prompts built by the
    runtime's own prompt builders (recorded as they call ``encode``), then the understanding turns and answers as
    train.und_example builds them."""
    from illume_rt.export.configs import get_preset
    from illume_rt.runtime import prompts

    seen: dict[str, None] = {}

    class Recorder:
        def encode(self, text: str) -> list[int]:
            seen.setdefault(text)
            return []

    rec, vocab = Recorder(), get_preset("nano").vocab
    for scene in data.all_scenes():
        for prompt in (scene.caption, scene.short_caption):
            prompts.text_to_image_ids(rec, vocab, prompt, 256, 256)
        for question, answer in scene.qa():
            prompts.understanding_ids(rec, vocab, question)
            for text in (f"user\n{question}", answer):
                seen.setdefault(text)
        for instruction, _ in data.edits(scene):
            prompts.editing_ids(rec, vocab, instruction, 256, 256)
    for text in ("\n", "assistant\n"):
        seen.setdefault(text)
    return list(seen)


def build():
    """The tokenizer (a new ``tokenizers.Tokenizer``): byte-level BPE, ids 0..255 the bytes (in the
    ``bytes_to_unicode`` symbols Qwen2.5's tokenizer uses), then one id per merge, learned from ``corpus()``."""
    from tokenizers import Tokenizer, decoders, models

    symbols, merges = _learned()
    tok = Tokenizer(models.BPE(vocab=dict(symbols), merges=list(merges)))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    return tok


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's word split, as Qwen2.5's


@functools.lru_cache(maxsize=1)
def _learned() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """(symbol -> id, merges in rank order): plain BPE over the corpus' words, merging the most frequent adjacent
    pair (ties: the first in sorted order) until no pair is left."""
    from illume_rt.export.tokenizer_files import bytes_to_unicode

    pre = _pre_tokenizer()
    byte_char = bytes_to_unicode()
    symbols = {byte_char[b]: b for b in range(256)}
    words: dict[tuple[str, ...], int] = {}
    for text in corpus():
        for piece, _ in pre.pre_tokenize_str(text):
            words[tuple(piece)] = words.get(tuple(piece), 0) + 1
    merges: list[tuple[str, str]] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        symbols[best[0] + best[1]] = len(symbols)
        words = {_merge(word, best): count for word, count in words.items()}
    return tuple(symbols.items()), tuple(merges)


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def text_vocab_size() -> int:
    return len(_learned()[0])


class NanoTokenizer:
    """The runtime's Tokenizer protocol over ``build()`` for a layout (the text ids below its special ids)."""

    def __init__(self, layout) -> None:
        self._tok = build()
        if self._tok.get_vocab_size() != layout.text_vocab_size:
            raise ValueError(f"nano's text tokenizer has {self._tok.get_vocab_size()} ids, the layout "
                             f"{layout.text_vocab_size}: update TEXT_VOCAB_SIZE in export/configs.py")
        self.layout = layout

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([i for i in ids if 0 <= i < self.layout.text_vocab_size])


def write(path: Path, vocab) -> None:
    """``build()`` with the ILLUME+ special tokens at ``vocab``'s ids, saved as a ``tokenizer.json``."""
    from illume_rt.export.tokenizer_files import special_tokens

    tok = build()
    names = special_tokens(vocab)
    tok.add_special_tokens(names)
    for i, name in enumerate(names):
        if tok.token_to_id(name) != vocab.pad_id + i:
            raise RuntimeError(f"tokenizer: {name} got id {tok.token_to_id(name)}, layout says {vocab.pad_id + i}")
    tok.save(str(path))

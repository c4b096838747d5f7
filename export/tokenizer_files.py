"""tokenizer.json files for checkpoints written here (illume-nano's, and the synthetic tiny checkpoint): a byte-level
tokenizer whose text ids are the UTF-8 bytes, with the official special-token names at the vocabulary layout's ids.
Torch-free: the export side (export/synthetic.py) and illume-nano's checkpoint writer both use it."""

from __future__ import annotations

from pathlib import Path


def special_tokens(vocab) -> list[str]:
    """Token strings in id order from ``vocab.pad_id`` to the last pixel code (the official names)."""
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<start_of_image>", "<end_of_image>", "<end_of_line>",
             "<start_of_level0>", "<end_of_level0>", "<start_of_level1>", "<end_of_level1>"]
    step = vocab.size_tag_step
    names += [f"<height_{step * (i + 1)}>" for i in range(vocab.num_size_tags)]
    names += [f"<width_{step * (i + 1)}>" for i in range(vocab.num_size_tags)]
    names += [f"<|image_level0_{k}|>" for k in range(vocab.semantic_codebook_size)]
    names += [f"<|image_level1_{k}|>" for k in range(vocab.pixel_codebook_size)]
    return names


def write_byte_tokenizer(path: Path, vocab) -> None:
    """A ``tokenizer.json`` whose text ids are the UTF-8 bytes (as ``runtime.tokenizer.ByteTokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte-level BPE
    byte_to_char = bytes_to_unicode()
    assert sorted(byte_to_char.values()) == sorted(alphabet)
    tok = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = special_tokens(vocab)
    tok.add_special_tokens(names)
    for i, name in enumerate(names):
        if tok.token_to_id(name) != vocab.pad_id + i:
            raise RuntimeError(f"tokenizer: {name} got id {tok.token_to_id(name)}, layout says {vocab.pad_id + i}")
    tok.save(str(path))


def write_text_byte_tokenizer(path: Path) -> Path:
    """A ``tokenizer.json`` whose text ids 0..255 are the UTF-8 bytes (byte-level BPE without merges), nothing
    else: the stand-in for Qwen2.5's tokenizer in random-weight presets that use the official vocabulary layout
    (bench, 3b, 7b without --checkpoint). Their special tokens sit at the layout's ids, far above 255, and the
    runtime reads those ids from the layout (contract.py), never from this file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={char: b for b, char in bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one ByteLevel pre-tokenization uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}

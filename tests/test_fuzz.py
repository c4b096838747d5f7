"""Fuzzing (issue 11, item 7): prompts, option values, image bytes and manifests. Every case must end either in a
result or in an IllumeError (the CLI: exit 0 or 2 with one line), never in another exception, never with a file
written outside the target. Derandomized (the same cases every run) and sized for CI: about 10,500 cases in all,
counted by ``test_fuzz_case_count``."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="fuzzing needs hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from illume_rt.cli import main  # noqa: E402
from illume_rt.errors import IllumeError  # noqa: E402
from illume_rt.runtime import bundle as bundle_module  # noqa: E402
from illume_rt.runtime.bundle import BundleError, load_bundle, sha256_file  # noqa: E402
from illume_rt.runtime.images import load_image, pad_to_anchor, semantic_view, understanding_image  # noqa: E402
from illume_rt.runtime.images import unpad_and_resize_back  # noqa: E402
from illume_rt.contract import LayoutError  # noqa: E402
from illume_rt.runtime.options import SamplingConfig  # noqa: E402
from illume_rt.runtime.prompts import editing_ids, text_to_image_ids, understanding_ids  # noqa: E402
from illume_rt.runtime.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.runtime

CASES = {"cli": 3000, "images": 3000, "manifests": 3000, "prompts": 1500, "generate": 12}


def fuzz(name: str):
    return settings(max_examples=CASES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_fuzz_case_count():
    assert sum(CASES.values()) >= 10_000


# -- text ----------------------------------------------------------------------------------------------------------

ODD_TEXT = st.sampled_from(["\udce9", "\x00", "\n", "\r\n", "\t", "\u202e", "\ufeff", "{content}", "{", "<image>",
                            "<|im_end|>", "<start_of_image>", "\U0001F600", "\u0301", " ", "%s", "--help", "-o"])
TEXT = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=60),  # lone surrogates included
    st.lists(st.one_of(ODD_TEXT, st.text(max_size=5)), max_size=12).map("".join),
    st.integers(0, 6000).map(lambda n: "a " * n),
)


@pytest.fixture(scope="module")
def tokenizer_and_vocab(tiny_bundle):
    bundle = load_bundle(tiny_bundle, verify=False)
    return load_tokenizer(bundle.manifest["tokenizer"], bundle.path, bundle.vocab), bundle.vocab


def test_fuzz_prompts(tokenizer_and_vocab):
    tokenizer, vocab = tokenizer_and_vocab

    @fuzz("prompts")
    @given(text=TEXT, which=st.sampled_from(["generate", "understand", "edit"]))
    def case(text, which):
        try:
            if which == "generate":
                rows = text_to_image_ids(tokenizer, vocab, text, 256, 256)
            elif which == "understand":
                rows = (understanding_ids(tokenizer, vocab, text),)
            else:
                rows = editing_ids(tokenizer, vocab, text, 512, 512)
        except LayoutError:
            return
        for ids in rows:
            assert all(isinstance(i, int) and (i == -200 or 0 <= i < vocab.vocab_rows) for i in ids)

    case()


def test_fuzz_generate_end_to_end(tiny_pipe):
    @fuzz("generate")
    @given(text=TEXT, seed=st.integers(0, 2**63 - 1), guidance=st.floats(1.0, 8.0))
    def case(text, seed, guidance):
        try:
            result = tiny_pipe.generate(text, seed=seed, sampling=SamplingConfig(guidance_scale=guidance, top_k=16))
        except IllumeError:
            return
        assert result.image.shape == (256, 256, 3) and result.image.dtype == np.uint8

    case()


# -- command-line option values ---------------------------------------------------------------------------------

NUMBER_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), st.integers(-2**70, 2**70).map(str),
                        st.sampled_from(["nan", "-inf", "1e400", "0x10", "", " 3", "1_000", "٣", "2.", "-0"]), TEXT)
OPTIONS = {
    "generate": ["--seed", "--guidance", "--temperature", "--top-k", "--pixel-top-k", "--top-p", "--threads",
                 "--steps", "--refine-guidance", "--resolution", "--backend", "-o"],
    "edit": ["--seed", "--guidance", "--temperature", "--top-k", "--top-p", "--threads", "-o"],
    "understand": ["--max-new-tokens", "--threads", "--backend"],
}


def test_fuzz_cli_options(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    image = work / "in.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    before = sorted(os.listdir(work))
    missing_bundle = tmp_path / "no-bundle"  # the command stops at the bundle, after every value was checked

    @fuzz("cli")
    @given(command=st.sampled_from(list(OPTIONS)), data=st.data())
    def case(command, data):
        options = data.draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=4, unique=True))
        argv = [command]
        argv += [data.draw(TEXT)] if command == "generate" else [str(image), data.draw(TEXT)]
        for option in options:
            value = data.draw(NUMBER_TEXT) if option != "-o" else str(work / data.draw(
                st.sampled_from(["x.png", "x.gif", "", ".", "in.png/x.png", "sub/x.jpg", "x"])))
            argv += [option, value] if not value.startswith("-") else [f"{option}={value}"]
        if data.draw(st.booleans()):
            argv.append("--refine")
        argv += ["--bundle", str(missing_bundle)]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err and "internal error" not in err, (argv, err)
        assert sorted(os.listdir(work)) == before, argv  # nothing written, nothing half-written

    case()


# -- image bytes --------------------------------------------------------------------------------------------------

def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    seeds = []
    for mode, fmt in (("RGB", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("L", "BMP"),
                      ("I;16", "PNG"), ("CMYK", "TIFF"), ("1", "PNG"), ("RGB", "WEBP"), ("LA", "PNG"), ("F", "TIFF")):
        buffer = io.BytesIO()
        try:
            rgb.convert(mode).save(buffer, format=fmt)
        except (OSError, ValueError, KeyError):
            continue
        seeds.append(buffer.getvalue())
    return seeds


SEEDS = _seed_images()


@st.composite
def image_bytes(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op, at = draw(st.integers(0, 2)), draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def test_fuzz_image_bytes(tmp_path):
    path = tmp_path / "case.img"

    @fuzz("images")
    @given(data=image_bytes())
    def case(data):
        path.write_bytes(data)
        try:
            img = load_image(path)
        except LayoutError:
            return
        assert img.mode == "RGB"
        pixels = understanding_image(img)
        assert pixels.shape[2] % 16 == 0 and pixels.shape[3] % 16 == 0 and np.isfinite(pixels).all()
        assert np.isfinite(semantic_view(pixels)).all()
        padded, padding = pad_to_anchor(img)
        assert (padded.height, padded.width) == padding.anchor
        assert unpad_and_resize_back(padded, padding).size == img.size

    case()


# -- manifests ----------------------------------------------------------------------------------------------------

JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | TEXT,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=6)
PATHS = st.sampled_from(["/etc/passwd", "../x.onnx", "a/../../b.onnx", "llm.onnx", "./llm.onnx", "lm_head_text.onnx",
                         "escape.onnx", "", "a//b", "C:\\x", "embed_tokens.npy", "\x00", "manifest.json"])


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def test_fuzz_manifests(tiny_bundle, tmp_path, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy, copy_function=os.link)
    (copy / "escape.onnx").symlink_to(Path(tiny_bundle) / "llm.onnx")  # a way out, for the fuzzer to find
    original = json.loads((Path(tiny_bundle) / "manifest.json").read_text())
    (copy / "manifest.json").unlink()
    locations = [p for p in _paths(original) if p]
    root = os.path.realpath(copy)
    hashes = {}

    def recording_hash(path):  # every file hashed lies inside the bundle; each real file is hashed once
        real = os.path.realpath(path)
        assert real.startswith(root + os.sep), f"opened {path} outside the bundle"
        if real not in hashes:
            hashes[real] = sha256_file(path)
        return hashes[real]

    monkeypatch.setattr(bundle_module, "sha256_file", recording_hash)

    @fuzz("manifests")
    @given(data=st.data())
    def case(data):
        manifest = json.loads(json.dumps(original))
        for _ in range(data.draw(st.integers(1, 3))):
            where = data.draw(st.sampled_from(locations))
            node = manifest
            try:
                for key in where[:-1]:
                    node = node[key]
                kind = data.draw(st.integers(0, 3))
                if kind == 0:
                    del node[where[-1]]
                elif kind == 1 and where[-1] == "file":
                    node[where[-1]] = data.draw(PATHS)
                else:
                    node[where[-1]] = data.draw(JSON_VALUE)
            except (KeyError, IndexError, TypeError):
                continue
        if data.draw(st.integers(0, 20)) == 0:
            manifest = data.draw(JSON_VALUE)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        try:
            bundle = load_bundle(copy)
            bundle.vocab, bundle.llm, bundle.random_weights
            for name in bundle.manifest["tables"]:
                bundle.table(name)
            load_tokenizer(bundle.manifest["tokenizer"], bundle.path, bundle.vocab)
        except BundleError as exc:
            assert "\n" not in str(exc)

    case()

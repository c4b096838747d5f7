"""The bundle reader (runtime/bundle.py) on small synthetic bundles: every manifest rule with the field it names,
the files against their sizes and hashes, and the on-demand row table. Fast and torch-free (the mutation run of
bundle.py uses it: bench/mutation/README.md); tests/test_safety.py and tests/test_fuzz.py do the same on a real
exported bundle."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from illume_rt.runtime.bundle import (MAX_DIM, Bundle, BundleError, RowTable, load_bundle, member_path, sha256_file,
                                      validate_manifest)
from illume_rt.contract import BUNDLE_FORMAT_VERSION, compact_vocab_layout, component_io, host_contract

VOCAB = compact_vocab_layout(text_vocab_size=8, semantic_codebook_size=4, pixel_codebook_size=4, row_multiple=8)
HIDDEN = 6


CONTRACT = json.loads(json.dumps(host_contract(VOCAB)))


def _io(name: str, layers: int | None = None) -> dict:
    inputs, outputs = component_io(name, layers)
    return {"inputs": [{"name": n} for n in inputs], "outputs": [{"name": n} for n in outputs]}


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture()
def bundle(tmp_path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "llm.onnx").write_bytes(b"not really a graph, but bytes with a hash")
    (root / "llm.onnx.data").write_bytes(b"\x00" * 40)
    (root / "head.onnx").write_bytes(b"head")
    (root / "tokenizer.json").write_text("{}")
    embed = np.arange(VOCAB.vocab_rows * HIDDEN, dtype=np.float32).reshape(VOCAB.vocab_rows, HIDDEN)
    np.save(root / "embed_tokens.npy", embed)
    np.save(root / "codebook.npy", np.ones((4, 3), dtype=np.float16))
    tables = {}
    for name, array in (("embed_tokens", embed), ("codebook", np.ones((4, 3), dtype=np.float16))):
        tables[name] = {**_entry(root / f"{name}.npy"), "dtype": str(array.dtype), "shape": list(array.shape)}
    manifest = {
        "format": "illume-rt-bundle", "format_version": 4,
        "model": {"preset": "synthetic", "random_weights": True, "trained_resolutions": [[256, 256], [384, 512]]},
        "vocab": VOCAB.to_dict(), "contract": CONTRACT,
        "llm": {"num_hidden_layers": 2, "num_key_value_heads": 1, "head_dim": 3, "hidden_size": HIDDEN,
                "max_context": 64, "kv_dtype": "float16"},
        "diffusion": {"scheduler": {"name": "euler"}},
        "tokenizer": {"kind": "hf", "file": "tokenizer.json"},
        "components": {"llm": {**_entry(root / "llm.onnx"), "external_data": "llm.onnx.data", **_io("llm", 2)},
                       "lm_head_text": {**_entry(root / "head.onnx"), **_io("lm_head_text")}},
        "tables": tables,
        "files": {"tokenizer": _entry(root / "tokenizer.json"), "llm_data": _entry(root / "llm.onnx.data")},
    }
    write(root, manifest)
    return root


def manifest_of(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write(root: Path, manifest) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


def refused(root: Path, **kwargs) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(root, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- a good bundle -------------------------------------------------------------------------------------------------

def test_a_good_bundle_reads_back(bundle):
    b = load_bundle(str(bundle))
    assert isinstance(b, Bundle) and b.path == bundle
    assert b.manifest == manifest_of(bundle)
    assert b.vocab == VOCAB and b.llm["hidden_size"] == HIDDEN and b.random_weights is True
    assert b.component("lm_head_text")["file"] == "head.onnx"
    assert b.component_path("llm") == bundle / "llm.onnx"
    with pytest.raises(BundleError) as info:
        b.component("vae")
    assert str(info.value) == f"bundle {bundle} has no component 'vae' (has llm, lm_head_text); re-export it"
    on_demand = b.table("embed_tokens")
    assert isinstance(on_demand, RowTable) and on_demand.shape == (VOCAB.vocab_rows, HIDDEN)
    whole = b.table("codebook", on_demand=False)
    assert isinstance(whole, np.ndarray) and whole.dtype == np.float16 and whole.shape == (4, 3)
    with pytest.raises(BundleError) as info:
        b.table("pixel_codebook")
    assert str(info.value) == f"bundle {bundle} has no table 'pixel_codebook'; re-export it"


def test_random_weights_flag(bundle):
    manifest = manifest_of(bundle)
    for value, want in ((False, False), (None, False), (KeyError, False)):
        if value is KeyError:
            del manifest["model"]["random_weights"]
        else:
            manifest["model"]["random_weights"] = value
        write(bundle, manifest)
        assert load_bundle(bundle).random_weights is want


def test_tables_are_checked_against_the_manifest_when_opened(bundle):
    manifest = manifest_of(bundle)
    b = Bundle(bundle, manifest)
    manifest["tables"]["codebook"]["shape"] = [3, 4]
    for on_demand in (True, False):
        with pytest.raises(BundleError) as info:
            b.table("codebook", on_demand=on_demand)
        assert str(info.value) == ("table codebook is float16[4, 3], manifest says float16[3, 4]; "
                                   "re-export the bundle")
    manifest["tables"]["codebook"]["shape"] = [4, 3]
    manifest["tables"]["codebook"]["dtype"] = "float32"
    with pytest.raises(BundleError, match=r"^table codebook is float16\[4, 3\], manifest says float32\[4, 3\]"):
        b.table("codebook")
    (bundle / "codebook.npy").write_bytes(b"garbage, not an npy file")
    for on_demand in (True, False):
        with pytest.raises(BundleError) as info:
            b.table("codebook", on_demand=on_demand)
        assert str(info.value).startswith("table codebook (codebook.npy) is not a readable .npy file (")
        assert str(info.value).endswith("); re-export the bundle")


# -- the files the manifest lists ----------------------------------------------------------------------------------

@pytest.mark.parametrize("section,name,file", [("components", "llm", "llm.onnx"), ("tables", "codebook", "codebook.npy"),
                                               ("files", "tokenizer", "tokenizer.json")])
def test_every_listed_file_is_present_whole_and_unaltered(bundle, section, name, file):
    path = bundle / file
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit changed
    assert refused(bundle) == (f"bundle file {path} ({name}) does not match its sha256 in the manifest: it was "
                               "altered; re-export the bundle")
    load_bundle(bundle, verify=False)  # sizes only
    path.write_bytes(data + b"x")
    assert refused(bundle, verify=False) == (f"bundle file {path} ({name}) has {len(data) + 1} bytes, manifest says "
                                             f"{len(data)}: it was altered or truncated; re-export the bundle")
    path.unlink()
    assert refused(bundle, verify=False) == f"bundle file {path} ({name}) is missing; re-export the bundle"
    path.mkdir()
    assert "is missing" in refused(bundle, verify=False)


def test_every_file_is_hashed_once_and_only_with_verify(bundle, monkeypatch):
    hashed = []
    monkeypatch.setattr("illume_rt.runtime.bundle.sha256_file", lambda path: hashed.append(path.name) or
                        hashlib.sha256(path.read_bytes()).hexdigest())
    load_bundle(bundle, verify=False)
    assert hashed == []
    load_bundle(bundle)
    assert sorted(hashed) == sorted(["llm.onnx", "head.onnx", "embed_tokens.npy", "codebook.npy", "tokenizer.json",
                                     "llm.onnx.data"])


def test_sha256_file_in_chunks(tmp_path):
    path = tmp_path / "x"
    data = bytes(range(256)) * 5
    path.write_bytes(data)
    assert sha256_file(path) == sha256_file(path, chunk=7) == sha256_file(path, chunk=1) == \
        hashlib.sha256(data).hexdigest()
    path.write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(b"").hexdigest()


# -- the manifest file itself --------------------------------------------------------------------------------------

def test_no_manifest_bad_json_and_unreadable(bundle, monkeypatch):
    (bundle / "manifest.json").write_text("{not json")
    assert refused(bundle).startswith(f"{bundle / 'manifest.json'} is not valid JSON (")
    (bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)  # too deep for the parser
    assert refused(bundle).endswith("is not valid JSON (maximum recursion depth exceeded while decoding a JSON "
                                    "array from a unicode string); re-export the bundle")
    with monkeypatch.context() as patch:  # the parser's reason is cut at 120 characters
        patch.setattr(json, "loads", lambda data: (_ for _ in ()).throw(ValueError("0123456789" * 30)))
        assert refused(bundle) == (f"{bundle / 'manifest.json'} is not valid JSON ({'0123456789' * 12}); "
                                   "re-export the bundle")
    (bundle / "manifest.json").unlink()
    assert refused(bundle) == (f"{bundle} is not an illume-rt bundle (no manifest.json); create one with "
                               "`illume-rt export`")
    (bundle / "manifest.json").mkdir()
    assert "is not an illume-rt bundle" in refused(bundle)
    (bundle / "manifest.json").rmdir()
    (bundle / "manifest.json").write_text("{}")

    def unreadable(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    assert refused(bundle) == f"cannot read {bundle / 'manifest.json'} (Permission denied); check its permissions"


def _set(*path, value):
    def change(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return change


BAD = {
    "not an object": (lambda m: [m], "{manifest} must hold a JSON object, not list; re-export the bundle"),
    "no format": (_set("format", value=KeyError), "{manifest} is not an illume-rt manifest; re-export the bundle"),
    "other format": (_set("format", value="onnx"), "{manifest} is not an illume-rt manifest; re-export the bundle"),
    "old version": (_set("format_version", value=3), "bundle format 3 is not supported by this runtime "
                    "(reads format 4); re-export it: `illume-rt export --preset synthetic -o NEW_BUNDLE`"),
    "version as text": (_set("format_version", value="4"), "bundle format '4' is not supported"),
    "no version": (_set("format_version", value=KeyError), "bundle format None is not supported"),
    "no model": (_set("model", value=KeyError), "manifest field model is missing; re-export the bundle"),
    "model a list": (_set("model", value=[]), "manifest field model must be an object, not list; re-export the bundle"),
    "preset a number": (_set("model", "preset", value=3), "manifest field model.preset must be a string, not int"),
    "random_weights text": (_set("model", "random_weights", value="yes"),
                            "manifest field model.random_weights must be a boolean, not str"),
    "resolutions a dict": (_set("model", "trained_resolutions", value={}),
                           "manifest field model.trained_resolutions must be a list, not dict"),
    "resolution of one": (_set("model", "trained_resolutions", value=[[256, 256], [256]]),
                          "manifest field model.trained_resolutions[1] must be [height, width]; re-export the bundle"),
    "resolution of three": (_set("model", "trained_resolutions", value=[[256, 256, 1]]),
                            "model.trained_resolutions[0] must be"),
    "resolution zero": (_set("model", "trained_resolutions", value=[[0, 256]]), "model.trained_resolutions[0]"),
    "resolution huge": (_set("model", "trained_resolutions", value=[[256, MAX_DIM]]), "trained_resolutions[0]"),
    "resolution boolean": (_set("model", "trained_resolutions", value=[[True, 256]]), "trained_resolutions[0]"),
    "resolution float": (_set("model", "trained_resolutions", value=[[256.0, 256]]), "trained_resolutions[0]"),
    "resolution a tuple-ish": (_set("model", "trained_resolutions", value=["ab"]), "trained_resolutions[0]"),
    "sampling defaults a list": (_set("model", "sampling_defaults", value=[]),
                                 "manifest field model.sampling_defaults must be an object, not list"),
    "sampling defaults of no task": (_set("model", "sampling_defaults", value={"drawing": {"top_p": 0.8}}),
                                     "model.sampling_defaults.drawing: expected one of ['editing', 'text_to_image']"),
    "sampling defaults declare greedy": (_set("model", "sampling_defaults", value={"editing": {"greedy": True}}),
                                         "model.sampling_defaults.editing: ['greedy'] cannot be declared"),
    "sampling defaults out of range": (_set("model", "sampling_defaults",
                                            value={"text_to_image": {"top_p": 1.5}}),
                                       "model.sampling_defaults.text_to_image: top_p must be in (0, 1]"),
    "sampling defaults a string": (_set("model", "sampling_defaults", value={"text_to_image": {"temperature": "hot"}}),
                                   "temperature must be a finite number"),
    "refine defaults a list": (_set("model", "refine_defaults", value=[]),
                               "manifest field model.refine_defaults must be an object, not list"),
    "refine defaults declare a scheduler": (_set("model", "refine_defaults", value={"scheduler": "ddim"}),
                                            "model.refine_defaults: ['scheduler'] cannot be declared"),
    "refine defaults out of range": (_set("model", "refine_defaults", value={"guidance_scale": 0.5}),
                                     "model.refine_defaults: --refine-guidance must be >= 1"),
    "refine defaults a string": (_set("model", "refine_defaults", value={"steps": "many"}),
                                 "model.refine_defaults: refine steps must be a whole number"),
    "no vocab": (_set("vocab", value=KeyError), "manifest field vocab is missing"),
    "vocab key missing": (_set("vocab", "pad_id", value=KeyError),
                          "manifest field vocab is not a valid vocabulary layout ("),
    "vocab overlapping": (_set("vocab", "pixel_code_offset", value=VOCAB.semantic_code_offset),
                          "manifest field vocab is not a valid vocabulary layout (pixel codes overlap semantic codes); "
                          "re-export the bundle"),
    "vocab unknown key": (_set("vocab", "extra", value=1), "manifest field vocab is not a valid vocabulary layout"),
    "vocab negative": (_set("vocab", "pad_id", value=-1),
                       "manifest field vocab.pad_id must be a non-negative integer; re-export the bundle"),
    "vocab boolean": (_set("vocab", "im_end_id", value=True), "manifest field vocab.im_end_id must be a non-negative"),
    "vocab float": (_set("vocab", "im_end_id", value=3.0), "manifest field vocab.im_end_id must be a non-negative"),
    "vocab huge": (_set("vocab", "vocab_rows", value=MAX_DIM), "manifest field vocab.vocab_rows must be"),
    "no llm": (_set("llm", value=KeyError), "manifest field llm is missing"),
    "llm field missing": (_set("llm", "head_dim", value=KeyError), "manifest field llm.head_dim is missing"),
    "llm field text": (_set("llm", "max_context", value="64"),
                       "manifest field llm.max_context must be an integer, not str; re-export the bundle"),
    "llm field boolean": (_set("llm", "num_hidden_layers", value=True),
                          "manifest field llm.num_hidden_layers must be an integer, not a boolean; re-export the bundle"),
    "llm field zero": (_set("llm", "num_key_value_heads", value=0),
                       "manifest field llm.num_key_value_heads = 0 is out of range; re-export the bundle"),
    "llm field huge": (_set("llm", "max_context", value=MAX_DIM), f"llm.max_context = {MAX_DIM} is out of range"),
    "llm hidden size": (_set("llm", "hidden_size", value=None), "manifest field llm.hidden_size must be an integer, "
                        "not NoneType"),
    "kv dtype": (_set("llm", "kv_dtype", value="bfloat16"),
                 "manifest field llm.kv_dtype must be one of float32, float16; re-export the bundle"),
    "diffusion a list": (_set("diffusion", value=[]), "manifest field diffusion must be an object, not list"),
    "diffusion without scheduler": (_set("diffusion", value={}), "manifest field diffusion.scheduler is missing"),
    "no tokenizer": (_set("tokenizer", value=KeyError), "manifest field tokenizer is missing"),
    "tokenizer kind": (_set("tokenizer", "kind", value="sentencepiece"),
                       "manifest field tokenizer.kind 'sentencepiece' is not bytes or hf; re-export the bundle"),
    "tokenizer kind number": (_set("tokenizer", "kind", value=1), "manifest field tokenizer.kind must be a string"),
    "hf without file": (_set("tokenizer", "file", value=KeyError), "manifest field tokenizer.file is missing"),
    "hf file outside": (_set("tokenizer", "file", value="../tokenizer.json"),
                        "manifest field tokenizer.file = '../tokenizer.json' points outside the bundle"),
    "no components": (_set("components", value=KeyError), "manifest field components is missing"),
    "files a list": (_set("files", value=[]), "manifest field files must be an object, not list"),
    "entry a string": (_set("components", "llm", value="llm.onnx"),
                       "manifest field components.llm must be an object; re-export the bundle"),
    "entry without file": (_set("tables", "codebook", "file", value=KeyError),
                           "manifest field tables.codebook.file is missing"),
    "file a number": (_set("files", "tokenizer", "file", value=7), "manifest field files.tokenizer.file must be a "
                      "string, not int"),
    "empty file name": (_set("components", "llm", "file", value=""),
                        "manifest field components.llm.file must name a file of the bundle; re-export the bundle"),
    "nul in file name": (_set("components", "llm", "file", value="llm\x00.onnx"),
                         "manifest field components.llm.file must name a file of the bundle"),
    "absolute file": (_set("components", "llm", "file", value="/etc/passwd"),
                      "manifest field components.llm.file = '/etc/passwd' points outside the bundle (absolute path or "
                      "'..'); a bundle may only name its own files. Re-export it"),
    "parent file": (_set("components", "llm", "file", value="a/../../llm.onnx"), "points outside the bundle"),
    "empty segment": (_set("components", "llm", "file", value="a//llm.onnx"), "points outside the bundle"),
    "trailing slash": (_set("components", "llm", "file", value="llm.onnx/"), "points outside the bundle"),
    "backslash": (_set("components", "llm", "file", value="sub\\llm.onnx"), "points outside the bundle"),
    "no bytes": (_set("components", "llm", "bytes", value=KeyError), "manifest field components.llm.bytes is missing"),
    "bytes negative": (_set("components", "llm", "bytes", value=-1),
                       "manifest field components.llm.bytes is negative; re-export the bundle"),
    "bytes float": (_set("components", "llm", "bytes", value=1.5), "components.llm.bytes must be an integer, not float"),
    "no sha": (_set("files", "tokenizer", "sha256", value=KeyError), "manifest field files.tokenizer.sha256 is missing"),
    "short sha": (_set("files", "tokenizer", "sha256", value="ab" * 31),
                  "manifest field files.tokenizer.sha256 is not a sha256 hex digest; re-export the bundle"),
    "long sha": (_set("files", "tokenizer", "sha256", value="ab" * 33), "files.tokenizer.sha256 is not a sha256"),
    "upper-case sha": (_set("files", "tokenizer", "sha256", value="AB" * 32), "files.tokenizer.sha256 is not a sha256"),
    "sha of X": (_set("files", "tokenizer", "sha256", value="X" * 64), "files.tokenizer.sha256 is not"),
    "non-hex sha": (_set("files", "tokenizer", "sha256", value="0" * 63 + "g"), "files.tokenizer.sha256 is not"),
    "external data outside": (_set("components", "llm", "external_data", value="../llm.onnx.data"),
                              "manifest field components.llm.external_data = '../llm.onnx.data' points outside"),
    "external data a list": (_set("components", "llm", "external_data", value=[]),
                             "manifest field components.llm.external_data must be a string, not list"),
    "table dtype object": (_set("tables", "codebook", "dtype", value="object"),
                           "manifest field tables.codebook.dtype 'object' is not a numeric dtype; re-export the bundle"),
    "table dtype unknown": (_set("tables", "codebook", "dtype", value="float99"),
                            "manifest field tables.codebook.dtype 'float99' is not a numeric dtype"),
    "table dtype complex": (_set("tables", "codebook", "dtype", value="complex64"), "tables.codebook.dtype 'complex64'"),
    "table dtype bool": (_set("tables", "codebook", "dtype", value="bool"), "tables.codebook.dtype 'bool'"),
    "table without dtype": (_set("tables", "codebook", "dtype", value=KeyError), "tables.codebook.dtype is missing"),
    "table shape 1-D": (_set("tables", "codebook", "shape", value=[12]),
                        "manifest field tables.codebook.shape must be [rows, columns]; re-export the bundle"),
    "table shape 3-D": (_set("tables", "codebook", "shape", value=[1, 4, 3]), "tables.codebook.shape must be"),
    "table shape zero": (_set("tables", "codebook", "shape", value=[0, 3]), "tables.codebook.shape must be"),
    "table shape huge": (_set("tables", "codebook", "shape", value=[MAX_DIM, 1]), "tables.codebook.shape must be"),
    "table shape float": (_set("tables", "codebook", "shape", value=[4.0, 3]), "tables.codebook.shape must be"),
    "table shape text": (_set("tables", "codebook", "shape", value="4x3"), "tables.codebook.shape must be a list"),
    "table larger than its file": (_set("tables", "codebook", "shape", value=[400, 3]),
                                   "manifest field tables.codebook.shape [400, 3] needs more bytes than the file has "
                                   "("),
    "embed rows": (_set("tables", "embed_tokens", "shape", value=[VOCAB.vocab_rows - 1, HIDDEN]),
                   f"manifest field tables.embed_tokens.shape [{VOCAB.vocab_rows - 1}, {HIDDEN}] does not match "
                   f"vocab.vocab_rows {VOCAB.vocab_rows} x llm.hidden_size {HIDDEN}; re-export the bundle"),
    "embed columns": (_set("tables", "embed_tokens", "shape", value=[VOCAB.vocab_rows, HIDDEN - 1]),
                      "tables.embed_tokens.shape"),
    "embed vs hidden size": (_set("llm", "hidden_size", value=HIDDEN + 1), "does not match vocab.vocab_rows"),
    "no contract": (_set("contract", value=KeyError), "manifest field contract is missing; re-export the bundle"),
    "contract a list": (_set("contract", value=[]),
                        "manifest field contract must be an object, not list; re-export the bundle"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_manifests_are_refused_naming_the_field(bundle, name, monkeypatch):
    change, message = BAD[name]
    manifest = manifest_of(bundle)
    manifest = change(manifest) or manifest
    write(bundle, manifest)
    monkeypatch.setattr("illume_rt.runtime.bundle.sha256_file", lambda path: pytest.fail("hashed before refusing"))
    got = refused(bundle).replace(str(bundle / "manifest.json"), "{manifest}")
    assert message in got, got


GOOD = {
    "no optional model fields": [_set("model", "random_weights", value=KeyError),
                                 _set("model", "trained_resolutions", value=KeyError)],
    "null optional model fields": [_set("model", "random_weights", value=None),
                                   _set("model", "trained_resolutions", value=None)],
    "no resolutions": [_set("model", "trained_resolutions", value=[])],
    "declared sampling": [_set("model", "sampling_defaults", value={"text_to_image": {"top_p": 0.8, "temperature": 0.9},
                                                                    "editing": {}})],
    "declared refine": [_set("model", "refine_defaults", value={"guidance_scale": 1.0, "steps": 10})],
    "largest resolution": [_set("model", "trained_resolutions", value=[[MAX_DIM - 1, 1]])],
    "no diffusion": [_set("diffusion", value=KeyError)],
    "null diffusion": [_set("diffusion", value=None)],
    "no kv dtype": [_set("llm", "kv_dtype", value=KeyError)],
    "kv float32": [_set("llm", "kv_dtype", value="float32")],
    "largest llm field": [_set("llm", "max_context", value=MAX_DIM - 1)],
    "byte tokenizer without file": [_set("tokenizer", value={"kind": "bytes"})],
    "zero vocab id and largest": [_set("vocab", "pad_id", value=0), _set("vocab", "im_start_id", value=MAX_DIM - 1)],
    "no embed table": [lambda m: m["tables"].pop("embed_tokens"), lambda m: os.remove(m.pop("_root") /
                                                                                     "embed_tokens.npy")],
    "no external data": [_set("components", "llm", "external_data", value=KeyError)],
    "nested path": [lambda m: m["components"]["lm_head_text"].update(file="sub/head.onnx"),
                    lambda m: (m["_root"] / "sub").mkdir() or (m["_root"] / "head.onnx").rename(
                        m.pop("_root") / "sub" / "head.onnx")],
    "an empty listed file": [lambda m: (m.pop("_root") / "empty.txt").write_bytes(b""),
                             lambda m: m["files"].update(empty={"file": "empty.txt", "bytes": 0,
                                                                "sha256": hashlib.sha256(b"").hexdigest()})],
    "dot path": [lambda m: m["components"]["lm_head_text"].update(file="./head.onnx")],
}


@pytest.mark.parametrize("name", list(GOOD))
def test_what_the_schema_allows(bundle, name):
    manifest = manifest_of(bundle)
    for change in GOOD[name]:
        manifest["_root"] = bundle
        change(manifest)
        manifest.pop("_root", None)
    write(bundle, manifest)
    assert load_bundle(bundle).manifest == manifest


def test_table_size_check_is_exact(tmp_path):
    manifest = json.loads(json.dumps({
        "format": "illume-rt-bundle", "format_version": 4, "model": {"preset": "p"}, "vocab": VOCAB.to_dict(),
        "contract": CONTRACT,
        "llm": {"num_hidden_layers": 1, "num_key_value_heads": 1, "head_dim": 1, "hidden_size": 1, "max_context": 1},
        "tokenizer": {"kind": "bytes"}, "components": {}, "files": {},
        "tables": {"t": {"file": "t.npy", "bytes": 4 * 3 * 2, "sha256": "0" * 64, "dtype": "float16",
                         "shape": [4, 3]}}}))
    validate_manifest(manifest, tmp_path)  # exactly the bytes the rows need
    broken = copy.deepcopy(manifest)
    broken["tables"]["t"]["bytes"] -= 1
    with pytest.raises(BundleError, match=r"shape \[4, 3\] needs more bytes than the file has \(23\)"):
        validate_manifest(broken, tmp_path)
    wide = copy.deepcopy(manifest)
    wide["tables"]["t"]["dtype"] = "float32"
    with pytest.raises(BundleError, match="needs more bytes"):
        validate_manifest(wide, tmp_path)
    one = copy.deepcopy(manifest)
    one["tables"]["t"]["shape"] = [1, 1]
    validate_manifest(one, tmp_path)  # a table of one row and one column
    for dtype in ("int8", "uint16"):
        small = copy.deepcopy(manifest)
        small["tables"]["t"]["dtype"] = dtype
        validate_manifest(small, tmp_path)


def test_member_paths_and_symlinks(tmp_path):
    root = tmp_path / "b"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside.onnx").write_bytes(b"x")
    assert member_path(root, "sub/a.onnx", "w") == root / "sub" / "a.onnx"
    assert member_path(root, ".", "w") == root  # the folder itself: inside (and not a file, refused later)
    (root / "leak.onnx").symlink_to(tmp_path / "outside.onnx")
    (root / "out").symlink_to(tmp_path)
    (root / "inner.onnx").symlink_to("sub")
    for name in ("leak.onnx", "out/outside.onnx", "out"):
        with pytest.raises(BundleError) as info:
            member_path(root, name, "components.x.file")
        assert str(info.value) == (f"manifest field components.x.file = {name!r} leads outside the bundle (through a "
                                   "symlink); a bundle may only name its own files. Re-export it")
    assert member_path(root, "inner.onnx", "w") == root / "inner.onnx"
    twin = tmp_path / "b-twin"  # a sibling whose name starts with the bundle's: outside
    twin.mkdir()
    (root / "twin").symlink_to(twin)
    with pytest.raises(BundleError, match="leads outside"):
        member_path(root, "twin/x", "w")
    for bad in (None, 3, ["a"]):
        with pytest.raises(BundleError, match="^manifest field w must name a file of the bundle; re-export the bundle$"):
            member_path(root, bad, "w")


# -- the on-demand row table ---------------------------------------------------------------------------------------

@pytest.fixture(params=[(1, 0), (2, 0)], ids=["npy1", "npy2"])
def table(tmp_path, request):
    array = np.arange(7 * 5, dtype=np.int32).reshape(7, 5) - 10
    path = tmp_path / "t.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array(fh, array, version=request.param)
    return RowTable(path), array


def test_row_table_indexes_as_the_array(table):
    rows, array = table
    assert (len(rows), rows.shape, rows.dtype, rows.ndim) == (7, (7, 5), np.dtype(np.int32), 2)
    for index in (3, 0, 6, -1, -7, [2, 2, 0], np.array([[1, 2], [6, -3]]), np.array([], dtype=np.int64),
                  np.int64(4), np.array([5], dtype=np.uint8)):
        got = rows[index]
        want = array[np.asarray(index)]
        want = want.reshape(*np.shape(index), 5)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32
    for index in (slice(None), slice(2, 5), slice(1, None, 3), slice(-3, None), slice(5, 2), slice(0, 100),
                  slice(None, None, 2), slice(None, None, -1), slice(5, 1, -2)):
        np.testing.assert_array_equal(rows[index], array[index], err_msg=str(index))
    whole = np.asarray(rows)
    assert whole.dtype == np.int32 and (whole == array).all()
    as_float = np.asarray(rows, dtype=np.float32)
    assert as_float.dtype == np.float32 and (as_float == array).all()
    for bad in (7, -8, [0, 7], [100]):
        with pytest.raises(IndexError, match="^row id out of range for a table of 7 rows$"):
            rows[bad]
    for bad in (1.0, [0.5], np.array([True])):
        with pytest.raises(TypeError, match="RowTable takes integer row ids or a slice"):
            rows[bad]


def test_row_table_refuses_what_is_not_a_plain_2d_table(tmp_path, monkeypatch):
    import gc
    import sys

    unraisable = []  # a refused table has no file open: nothing left for __del__ to trip over
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    for name, array in (("fortran", np.asfortranarray(np.ones((3, 2), dtype=np.float32))),
                        ("3d", np.ones((2, 2, 2), dtype=np.float32)), ("1d", np.ones(4, dtype=np.float32)),
                        ("objects", np.array([[None, 1]], dtype=object))):
        path = tmp_path / f"{name}.npy"
        np.save(path, array, allow_pickle=True)
        with pytest.raises(BundleError) as info:
            RowTable(path)
        assert str(info.value) == f"{path}: expected a C-order 2-D numeric table; re-export the bundle"
    gc.collect()
    assert unraisable == []
    np.save(tmp_path / "one.npy", np.ones((1, 1), dtype=np.float32))
    assert RowTable(tmp_path / "one.npy")[0].tolist() == [1.0]


def test_row_table_closes_its_file(tmp_path):
    np.save(tmp_path / "t.npy", np.ones((2, 2), dtype=np.float32))
    rows = RowTable(tmp_path / "t.npy")
    fd = rows._fd
    os.fstat(fd)
    del rows
    with pytest.raises(OSError):
        os.fstat(fd)


# -- the format version, the contract and the graph interfaces -----------------------------------------------------

@pytest.mark.parametrize("model,how", [
    ({"preset": "3b", "random_weights": False}, "--checkpoint MLLM_DIR --tokenizer-checkpoint dualvitok.bin"),
    ({"random_weights": False}, "--checkpoint MLLM_DIR --tokenizer-checkpoint dualvitok.bin"),
    ({"preset": "nano", "random_weights": False}, "--preset nano"),  # the trained miniature has its own preset
    ({"preset": "3b", "random_weights": True}, "--preset 3b"),
    ({"preset": "3b"}, "--preset 3b"),  # no flag: not known to be a checkpoint
    ({"preset": "3b", "random_weights": None}, "--preset 3b"),
    ({"preset": 3, "random_weights": True}, "--preset PRESET"),
    ([], "--preset PRESET"),
    (KeyError, "--preset PRESET"),
])
def test_another_format_version_is_refused_with_the_export_command_that_remakes_it(bundle, model, how):
    manifest = manifest_of(bundle)
    manifest["format_version"] = BUNDLE_FORMAT_VERSION - 1
    if model is KeyError:
        del manifest["model"]
    else:
        manifest["model"] = model
    write(bundle, manifest)
    assert refused(bundle) == (f"bundle format {BUNDLE_FORMAT_VERSION - 1} is not supported by this runtime (reads "
                               f"format {BUNDLE_FORMAT_VERSION}); re-export it: `illume-rt export {how} -o NEW_BUNDLE`")


def _contract_differs(key: str) -> str:
    return (f"manifest field contract.{key} differs from what this runtime implements; the bundle was made by another "
            "illume-rt version: re-export it with this one")


@pytest.mark.parametrize("key,change", [
    ("decode_max_seq", lambda c: c.pop("decode_max_seq")),  # a rule the bundle lacks
    ("a_rule_of_another_version", lambda c: c.update(a_rule_of_another_version=1)),  # one this runtime lacks
    ("decode_max_seq", lambda c: c.update(decode_max_seq=c["decode_max_seq"] + 1)),
    ("prompts", lambda c: c["prompts"].update(system=c["prompts"]["system"] + " ")),
    ("structure_tokens", lambda c: c["structure_tokens"].update({k: v + 1 for k, v in
                                                                 list(c["structure_tokens"].items())[:1]})),
    ("image_grammar", lambda c: c["image_grammar"].reverse()),
    ("grids", lambda c: c["grids"].pop(sorted(c["grids"])[0])),
])
def test_the_contract_must_be_the_one_this_runtime_implements(bundle, key, change):
    manifest = manifest_of(bundle)
    assert manifest["contract"] == CONTRACT
    change(manifest["contract"])
    assert manifest["contract"] != CONTRACT
    write(bundle, manifest)
    assert refused(bundle) == _contract_differs(key)


def _add_component(root: Path, manifest: dict, name: str, first: bool = False, **fields) -> None:
    (root / f"{name}.onnx").write_bytes(name.encode())
    entry = {**_entry(root / f"{name}.onnx"), **fields}
    others = manifest["components"]
    manifest["components"] = {name: entry, **others} if first else {**others, name: entry}


def test_a_component_the_runtime_does_not_run_may_list_any_interface(bundle):
    manifest = manifest_of(bundle)
    _add_component(bundle, manifest, "a_tool_graph", first=True)  # no inputs or outputs at all
    _add_component(bundle, manifest, "another_tool", inputs="x", outputs=[1])
    write(bundle, manifest)
    assert list(load_bundle(bundle).manifest["components"]) == ["a_tool_graph", "llm", "lm_head_text",
                                                                "another_tool"]


def _io_differs(name: str, have: tuple, want: tuple) -> str:
    return (f"component {name} has inputs {list(have[0])} and outputs {list(have[1])}; this runtime expects "
            f"{list(want[0])} -> {list(want[1])} (illume_rt/contract.py): re-export the bundle")


def test_components_the_runtime_runs_have_exactly_the_contracts_inputs_and_outputs(bundle):
    llm_io, head_io = component_io("llm", 2), component_io("lm_head_text")
    good = manifest_of(bundle)
    cases = [
        ("llm", component_io("llm", 3)),  # the graph of a 3-layer body in a manifest of 2 layers
        ("llm", component_io("llm", 1)),
        ("llm", (llm_io[0][::-1], llm_io[1])),  # the same names in another order
        ("llm", (llm_io[0], llm_io[1][:1])),
        ("llm", (llm_io[0], (*llm_io[1], "extra"))),
        ("lm_head_text", (head_io[1], head_io[0])),  # inputs and outputs swapped
        ("lm_head_text", (("hidden_states",), head_io[1])),
    ]
    for name, have in cases:
        manifest = copy.deepcopy(good)
        _add_component(bundle, manifest, "a_tool_graph", first=True)  # checked past a graph it does not run
        manifest["components"][name].update(inputs=[{"name": n} for n in have[0]],
                                            outputs=[{"name": n} for n in have[1]])
        write(bundle, manifest)
        assert refused(bundle) == _io_differs(name, have, component_io(name, 2)), (name, have)
    manifest = copy.deepcopy(good)
    manifest["components"]["lm_head_text"]["inputs"] = [{"shape": [1, 6]}]  # an entry without a name
    write(bundle, manifest)
    assert refused(bundle) == _io_differs("lm_head_text", ([None], head_io[1]), head_io)


@pytest.mark.parametrize("inputs", [KeyError, None, "hidden", ["hidden"], [{"name": "hidden"}, "logits"], {}])
def test_a_component_the_runtime_runs_must_list_its_inputs_and_outputs(bundle, inputs):
    good = manifest_of(bundle)
    for field in ("inputs", "outputs"):
        manifest = copy.deepcopy(good)
        if inputs is KeyError:
            del manifest["components"]["lm_head_text"][field]
        else:
            manifest["components"]["lm_head_text"][field] = inputs
        write(bundle, manifest)
        assert refused(bundle) == ("manifest field components.lm_head_text must list its inputs and outputs; "
                                   "re-export the bundle")

"""What README.md and docs/ promise, each checked so that the test fails when the claim breaks (issue 17, item 3).

- forced runs: every forced token goes through the body with the next sampled position, one call per code;
- no head runs for a position whose successor is forced, and image generation never opens the text head;
- the KV cache is handed to the engine in place (np.shares_memory), never copied;
- the runtime imports no torch, transformers, diffusers or onnx (a subprocess's sys.modules);
- the bundle reader checks the sha256 of every file it lists (graphs, tables, other files);
- an export whose graph misses its tolerance fails with ExportError;
- the text-to-image prompt ids equal the facts table's template, written out here by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from illume_rt.runtime.bundle import BundleError, load_bundle, sha256_file
from illume_rt.runtime.generate import KVCache, LanguageModel
from illume_rt.contract import image_grid
from illume_rt.runtime.options import SamplingConfig
from illume_rt.runtime.pipeline import Pipeline
from illume_rt.runtime.prompts import text_to_image_ids

from conftest import TEST_THREADS

pytestmark = pytest.mark.runtime


class Counting:
    """An engine wrapper that records each call's feeds (shapes, and a check run on them)."""

    def __init__(self, inner, check=None) -> None:
        self.inner, self.check, self.calls = inner, check, []
        self.name, self.input_names, self.output_names = inner.name, inner.input_names, inner.output_names
        self.accepts_out = getattr(inner, "accepts_out", False)

    def run(self, feeds, out=None):
        self.calls.append({k: np.shape(v) for k, v in feeds.items()})
        if self.check is not None:
            self.check(feeds)
        return self.inner.run(feeds, out=out) if out is not None else self.inner.run(feeds)


@pytest.fixture()
def fresh_pipe(tiny_bundle):
    return Pipeline.from_bundle(tiny_bundle, threads=TEST_THREADS)


def test_forced_tokens_ride_with_the_next_code_and_no_head_runs_before_a_forced_token(fresh_pipe, monkeypatch):
    pipe = fresh_pipe
    caches: list[KVCache] = []
    original = LanguageModel.new_cache
    monkeypatch.setattr(LanguageModel, "new_cache", lambda self, *a: caches.append(original(self, *a)) or caches[-1])

    def cache_in_place(feeds):  # every cache input is a view of the call's one cache buffer
        if caches and caches[-1].length:
            for name in caches[-1].names:
                assert np.shares_memory(feeds[name], caches[-1].kv), f"{name} was copied"

    body = Counting(pipe.engines["llm"], cache_in_place)
    pipe.replace_engine("llm", body)
    heads = {}
    for which in ("semantic", "pixel"):
        heads[which] = Counting(pipe.engines[f"lm_head_{which}"])
        pipe.replace_engine(f"lm_head_{which}", heads[which])
    grid = image_grid(256, 256)
    result = pipe.generate("a cat", seed=0, sampling=SamplingConfig(top_k=32))
    semantic_codes = grid.semantic_rows * grid.semantic_cols
    # one body call per code: the prefill (prompt + <start_of_image><start_of_level0>) and one per later code,
    # each carrying the forced tokens before it
    assert len(body.calls) == result.tokens.steps == grid.num_codes
    new_positions = [shapes["inputs_embeds"][1] for shapes in body.calls[1:]]
    # every position but the two forced ones of the prefill and the last code with the 3 forced after it
    assert sum(new_positions) == grid.num_tokens - 2 - 4
    assert new_positions.count(2) == grid.semantic_rows + grid.pixel_rows - 2  # a row's last code + <end_of_line>
    assert new_positions.count(4) == 1  # last semantic code, <end_of_line>, <end_of_level0>, <start_of_level1>
    assert len(heads["semantic"].calls) == semantic_codes
    assert len(heads["pixel"].calls) == grid.pixel_rows * grid.pixel_cols
    assert not pipe.engines.is_open("lm_head_text")  # the text head (the largest) was never opened for an image
    assert caches and caches[0].batch == 2  # guidance: both rows in each call


def test_the_runtime_imports_no_build_time_package(tiny_bundle):
    script = f"""
import sys
from illume_rt.runtime.pipeline import Pipeline
from illume_rt.runtime.options import SamplingConfig
pipe = Pipeline.from_bundle({str(tiny_bundle)!r}, threads=1)
from PIL import Image
pipe.generate("a cat", seed=0, sampling=SamplingConfig(greedy=True))
pipe.understand(Image.new("RGB", (64, 48), (200, 30, 30)), "What?", max_new_tokens=2)
pipe.edit(Image.new("RGB", (64, 48), (200, 30, 30)), "make it blue", seed=0)
heavy = sorted(m for m in ("torch", "transformers", "diffusers", "onnx", "modelopt") if m in sys.modules)
print(",".join(heavy))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"the runtime imported {run.stdout.strip()}"


def test_the_reader_checks_the_hash_of_every_listed_file(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "notes.txt").write_text("extra file")
    manifest["files"]["notes"] = {"file": "notes.txt", "bytes": 10, "sha256": sha256_file(bundle / "notes.txt")}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    load_bundle(bundle)
    listed = [(section, name, entry["file"]) for section in ("components", "tables", "files")
              for name, entry in manifest[section].items()]
    assert {s for s, _, _ in listed} == {"components", "tables", "files"}
    for section, name, file in listed:
        path = bundle / file
        original = path.read_bytes()
        altered = bytearray(original)
        altered[len(altered) // 2] ^= 0x01  # same size: only the hash can tell
        path.write_bytes(bytes(altered))
        with pytest.raises(BundleError, match="sha256"):
            load_bundle(bundle)
        path.write_bytes(original)
    load_bundle(bundle)


@pytest.mark.export
def test_an_export_that_misses_its_tolerance_fails(tmp_path):
    torch = pytest.importorskip("torch", reason="export needs the export extra")
    from illume_rt.export.components import Component, ExportError, TensorSpec, Tolerance, export_onnx

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2.0

    def component(tolerance):
        return Component(name="double", inputs=(TensorSpec("x", "float32", ("n", 4)),),
                         outputs=(TensorSpec("y", "float32", ("n", 4)),), dims={"n": (2, 3, (1, 2, 4))},
                         build_module=Double,
                         make_inputs=lambda dims, rng: {"x": rng.standard_normal((dims["n"], 4)).astype(np.float32)},
                         tolerance=tolerance)

    report = export_onnx(component(Tolerance()), Double(), tmp_path / "ok.onnx")
    assert report["ok"] and (tmp_path / "ok.onnx").is_file()
    with pytest.raises(ExportError, match="differs from the reference"):
        export_onnx(component(Tolerance(min_cosine=1.01)), Double(), tmp_path / "miss.onnx")  # cannot be met
    assert not (tmp_path / "miss.onnx").exists()


def test_text_to_image_prompt_ids_follow_the_facts_table(tiny_pipe):
    """Written out from illume-plus-facts.md ("Prompts (text to image)" and the Qwen chat template), not from the
    prompt builder: the tiny model's text ids are UTF-8 bytes."""
    v = tiny_pipe.vocab
    text = lambda s: list(s.encode("utf-8"))  # noqa: E731
    h, w = v.first_height_tag_id + 512 // 64 - 1, v.first_width_tag_id + 256 // 64 - 1
    cond = ([v.im_start_id] + text("system\nYou are a helpful assistant.") + [v.im_end_id] + text("\n")
            + [v.im_start_id] + text("user\nGenerate an image of ") + [h, w]
            + text(", the content of image is a red cat\n") + [v.im_end_id] + text("\n")
            + [v.im_start_id] + text("assistant\n") + [h, w])
    uncond = ([v.im_start_id] + text("system\nYou are a helpful assistant.") + [v.im_end_id] + text("\n")
              + [v.im_start_id] + text("user\nGenerate a random image of ") + [h, w] + text("\n") + [v.im_end_id]
              + text("\n") + [v.im_start_id] + text("assistant\n") + [h, w])
    got_cond, got_uncond = text_to_image_ids(tiny_pipe.tokenizer, v, "a red cat", 512, 256)
    assert got_cond == cond
    assert got_uncond == uncond


def test_the_default_bundle_key_follows_the_sources(monkeypatch, tmp_path):
    from illume_rt import cli

    monkeypatch.setenv("ILLUME_RT_CACHE", str(tmp_path))
    first = cli.default_bundle_path("tiny")
    assert first.parent == Path(tmp_path) / "bundles" and first.name.startswith("tiny-")
    assert cli.default_bundle_path("tiny") == first  # stable
    # the key reads the packages where they are installed (a wheel has no export/ beside illume_rt/): a changed
    # runtime source wherever the runtime lives is a new key
    import importlib.util
    import shutil

    real_find_spec = importlib.util.find_spec
    runtime_copy = tmp_path / "site" / "runtime"
    shutil.copytree(real_find_spec("illume_rt.runtime").submodule_search_locations[0], runtime_copy)

    def find_spec(name, *args):
        spec = real_find_spec(name, *args)
        if name == "illume_rt.runtime":
            spec.submodule_search_locations = [str(runtime_copy)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert cli.default_bundle_path("tiny") == first  # same files, other place
    (runtime_copy / "generate.py").write_text((runtime_copy / "generate.py").read_text() + "\n# changed\n")
    assert cli.default_bundle_path("tiny") != first


def test_a_packaged_builtin_bundle_is_used_only_when_made_from_these_sources(tiny_bundle, tmp_path, monkeypatch):
    """`illume-rt package-builtin` puts the built-in bundle in the package (a wheel without torch runs the main job);
    a stale one (other sources or weights) is ignored."""
    import json
    import shutil

    from illume_rt import cli

    packaged = tmp_path / "builtin" / "tiny"
    shutil.copytree(tiny_bundle, packaged)
    manifest = json.loads((packaged / "manifest.json").read_text())
    manifest["model"]["builtin_key"] = cli.builtin_key("tiny")
    (packaged / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(cli, "packaged_bundle_path", lambda preset: tmp_path / "builtin" / preset)
    monkeypatch.setenv("ILLUME_RT_CACHE", str(tmp_path / "cache"))
    assert cli.ensure_default_bundle("tiny") == packaged
    manifest["model"]["builtin_key"] = "0" * 12
    (packaged / "manifest.json").write_text(json.dumps(manifest))
    # stale: passed over for the cache's bundle (exported from these sources), which the same call then returns;
    # without one it would export (or, on a runtime-only install, say which extra to install)
    cached = tmp_path / "cache" / "bundles" / "tiny-current"
    cached.mkdir(parents=True)
    (cached / "manifest.json").write_text("{}")
    monkeypatch.setattr(cli, "default_bundle_path", lambda preset: cached)
    assert cli.ensure_default_bundle("tiny") == cached

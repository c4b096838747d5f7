"""End to end on the tiny preset: export a bundle, generate with the runtime, compare with the PyTorch reference."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from illume_rt.export.configs import get_preset
from illume_rt.runtime.bundle import BundleError, load_bundle
from illume_rt.contract import LayoutError, image_grid
from illume_rt.runtime.options import SamplingConfig
from illume_rt.runtime.prompts import text_to_image_ids

PROMPTS = ["a cat with a hat", "a red circle at the top left on a blue background", "two green squares"]


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle):
    return tiny_bundle


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def reference(models, pipe, prompt, resolution, sampling, seed):
    from illume_rt.export.reference import reference_image_tokens

    cond, uncond = text_to_image_ids(pipe.tokenizer, pipe.vocab, prompt, *resolution)
    return reference_image_tokens(models.llm, pipe.vocab, image_grid(*resolution), cond, uncond, sampling,
                                  np.random.default_rng(seed))


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("sampling", [SamplingConfig(greedy=True), SamplingConfig(top_k=40, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_token_grids_match_reference_256(models, pipe, prompt, sampling):
    got = pipe.generate(prompt, (256, 256), seed=11, sampling=sampling)
    want = reference(models, pipe, prompt, (256, 256), sampling, seed=11)
    np.testing.assert_array_equal(got.tokens.semantic, want.semantic)
    np.testing.assert_array_equal(got.tokens.pixel, want.pixel)


@pytest.mark.parametrize("sampling", [SamplingConfig(greedy=True), SamplingConfig(guidance_scale=1.5, temperature=0.9)],
                         ids=["greedy", "sampled"])
def test_token_grids_match_reference_non_square(models, pipe, sampling):
    got = pipe.generate(PROMPTS[0], (384, 512), seed=5, sampling=sampling)
    want = reference(models, pipe, PROMPTS[0], (384, 512), sampling, seed=5)
    assert got.tokens.semantic.shape == (12, 16) and got.tokens.pixel.shape == (24, 32)
    np.testing.assert_array_equal(got.tokens.semantic, want.semantic)
    np.testing.assert_array_equal(got.tokens.pixel, want.pixel)


@pytest.mark.runtime
def test_seed_changes_the_sample_and_guidance_matters(pipe):
    a = pipe.generate(PROMPTS[0], seed=1).tokens
    b = pipe.generate(PROMPTS[0], seed=2).tokens
    c = pipe.generate(PROMPTS[0], seed=1, sampling=SamplingConfig(guidance_scale=1.0)).tokens
    assert not np.array_equal(a.pixel, b.pixel)
    assert not np.array_equal(a.pixel, c.pixel)
    np.testing.assert_array_equal(a.pixel, pipe.generate(PROMPTS[0], seed=1).tokens.pixel)


def test_decoded_image_matches_reference_decoder(models, pipe):
    import torch

    result = pipe.generate(PROMPTS[1], (256, 256), seed=3)
    with torch.no_grad():
        want = models.dualvitok.decode_code(torch.from_numpy(result.tokens.semantic)[None],
                                            torch.from_numpy(result.tokens.pixel)[None])[0].numpy()
    got = pipe.decode_image(result.tokens.semantic, result.tokens.pixel)
    assert got.shape == (3, 256, 256)
    # stated tolerance: float32 graph vs float32 module, max abs error 1e-3 on values of order 1
    assert np.max(np.abs(got - want)) < 1e-3
    assert result.image.shape == (256, 256, 3) and result.image.dtype == np.uint8
    assert result.image.std() > 0  # not a constant picture
    for stage in ("prefill", "semantic", "pixel", "image_decode", "total"):
        assert result.timings[stage] >= 0


@pytest.mark.runtime
def test_bad_requests_get_clear_errors(pipe):
    with pytest.raises(LayoutError, match="empty"):
        pipe.generate("   ")
    with pytest.raises(LayoutError, match="unsupported resolution"):
        pipe.generate("a cat", (300, 300))
    with pytest.raises(LayoutError, match="context"):
        pipe.generate("word " * 2000, (512, 512))


@pytest.mark.runtime
def test_altered_or_missing_bundle_files_are_refused(bundle_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    head = bad / "lm_head_pixel.onnx"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="altered"):
        load_bundle(bad)
    head.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="re-export"):
        load_bundle(bad)
    with pytest.raises(BundleError, match="illume-rt export"):
        load_bundle(tmp_path / "nowhere")


@pytest.mark.runtime
def test_embedding_rows_are_read_on_demand(bundle_dir):
    """The embedding table is read row by row (not mapped): same values as the .npy file, clear errors."""
    bundle = load_bundle(bundle_dir, verify=False)
    table = bundle.table("embed_tokens")
    full = np.load(bundle.path / bundle.manifest["tables"]["embed_tokens"]["file"])
    assert table.shape == full.shape and table.dtype == full.dtype
    ids = np.array([[0, 5, len(full) - 1], [7, 7, 2]])
    np.testing.assert_array_equal(table[ids], full[ids])
    np.testing.assert_array_equal(table[-3:], full[-3:])
    with pytest.raises(IndexError):
        table[[len(full)]]
    if sys.platform == "linux":  # nothing of the table is mapped into the process
        assert not any("embed_tokens" in line for line in open("/proc/self/maps"))


@pytest.mark.runtime
def test_manifest_records_accuracy_and_layout(bundle_dir):
    manifest = load_bundle(bundle_dir).manifest
    assert manifest["model"]["random_weights"] is True
    assert manifest["vocab"] == get_preset("tiny").vocab.to_dict()
    for name in ("llm", "lm_head_text", "lm_head_semantic", "lm_head_pixel", "pixel_decoder"):
        entry = manifest["components"][name]
        assert entry["accuracy"]["worst_cosine"] > 0.9999
        assert len(entry["accuracy"]["cases"]) == 2


@pytest.mark.runtime
def test_cli_generate_writes_a_png(bundle_dir, tmp_path):
    out = tmp_path / "cli.png"
    run = subprocess.run([sys.executable, "-m", "illume_rt.cli", "generate", "a cat with a hat", "--bundle",
                          str(bundle_dir), "-o", str(out), "--seed", "4", "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RANDOM weights" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "illume_rt.cli", "generate", "x", "--bundle", str(bundle_dir),
                          "--resolution", "100x100", "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "unsupported resolution" in bad.stderr
    assert not (tmp_path / "x.png").exists()

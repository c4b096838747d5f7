"""Fast checks of the benchmark's building blocks on the tiny preset: text decoding against transformers, IO binding
and in-place cache writes, the loop variants (they must decode the same tokens as the runtime's loop, or the
ablation would compare different work), measuring helpers and the report."""

import json

import numpy as np
import pytest
import torch

from illume_rt.bench.loops import probe_grid, step_time_at_context, variant_image_tokens
from illume_rt.bench.measure import read_bandwidth, stats
from illume_rt.bench.run import merge_rounds
from illume_rt.engines.ort import OrtEngine
from illume_rt.export.components import export_onnx
from illume_rt.export.configs import get_preset
from illume_rt.export.llm import build_llm, head_component
from illume_rt.runtime.generate import LanguageModel, generate_image_tokens, generate_text
from illume_rt.contract import image_grid
from illume_rt.runtime.options import SamplingConfig

HEADS = ("text", "semantic", "pixel")


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    """The tiny LLM and its graphs: the LLM and head graphs of the session's tiny export (conftest.py tiny_bundle:
    export_onnx of these components on this model's weights, the preset's seed), not exported again here."""
    preset = get_preset("tiny")
    model = build_llm(preset)
    folder = tiny_bundle
    embed = model.get_input_embeddings().weight.detach().numpy().copy()
    llm_info = {"num_hidden_layers": preset.llm.num_hidden_layers, "num_key_value_heads": preset.llm.num_key_value_heads,
                "head_dim": preset.llm.head_dim, "max_context": preset.llm.max_position_embeddings}

    def open_lm(io_binding=True):
        def engine(name):
            return OrtEngine(name, folder / f"{name}.onnx", io_binding=io_binding)

        return LanguageModel(engine("llm"), {w: engine(f"lm_head_{w}") for w in HEADS}, embed, llm_info, preset.vocab)

    return preset, model, open_lm


def test_generate_text_matches_transformers_greedy(tiny):
    preset, model, open_lm = tiny
    prompt = [int(i) for i in np.random.default_rng(0).integers(0, 256, 12)]
    got = generate_text(open_lm(), prompt, 10, greedy=True)
    # transformers greedy, with the head restricted to the text rows as the runtime does outside an image
    ids, want = list(prompt), []
    stop = preset.vocab.text_range[1]
    with torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, :stop]
            want.append(int(torch.argmax(logits)))
            ids.append(want[-1])
    assert got == want
    assert generate_text(open_lm(), prompt, 10, greedy=True, stop_ids=(want[3],)) == want[:4]
    sampled = generate_text(open_lm(), prompt, 6, greedy=False, rng=np.random.default_rng(1))
    assert len(sampled) == 6 and all(0 <= t < stop for t in sampled)
    with pytest.raises(ValueError):
        generate_text(open_lm(), prompt, 3, greedy=False)


def test_io_binding_writes_outputs_in_place(tiny):
    preset, _, open_lm = tiny
    bound, plain = open_lm(io_binding=True), open_lm(io_binding=False)
    hidden = np.random.default_rng(0).standard_normal((2, preset.llm.hidden_size), dtype=np.float32)
    out = np.full((2, bound.head_rows("pixel")), np.nan, dtype=np.float32)
    (logits,) = bound.heads["pixel"].run({"hidden": hidden}, out={"logits": out})
    assert logits is out and not np.isnan(out).any()
    (want,) = plain.heads["pixel"].run({"hidden": hidden})
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        bound.heads["pixel"].run({"hidden": hidden}, out={"logits": out[:, ::2]})
    # IO binding and session.run fill the same cache
    caches = []
    for lm in (bound, plain):
        cache = lm.new_cache(2, 32)
        lm.prefill(cache, [[1, 2, 3, 4, 5], [6, 7, 8]])
        lm.step(cache, [9, 10])
        caches.append(cache)
    assert caches[0].length == caches[1].length == 7
    np.testing.assert_allclose(caches[0].kv, caches[1].kv, rtol=1e-5, atol=1e-5)
    written = caches[0].kv.any(axis=(0, 1, 3, 5))  # [batch, capacity]: columns holding keys/values
    assert written[:, :7].all() and not written[:, 7:].any()


@pytest.mark.parametrize("sampling", [SamplingConfig(greedy=True), SamplingConfig(top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_loop_variants_decode_the_same_tokens(tiny, sampling):
    preset, _, open_lm = tiny
    lm = open_lm()
    grid = probe_grid(image_grid(256, 256), 5)
    cond, uncond = [1, 2, 3, 4, 5, 6], [1, 2, 3]
    want = generate_image_tokens(lm, grid, cond, uncond, sampling, np.random.default_rng(3))
    for guidance, head in (("sequential", "active"), ("batched", "full"), ("sequential", "full")):
        got = variant_image_tokens(lm, grid, cond, uncond, sampling, np.random.default_rng(3), guidance, head)
        np.testing.assert_array_equal(got.semantic, want.semantic)
        np.testing.assert_array_equal(got.pixel, want.pixel)
        assert got.steps > want.steps
    with pytest.raises(ValueError):
        variant_image_tokens(lm, grid, cond, uncond, sampling, np.random.default_rng(3), guidance="nope")
    assert step_time_at_context(lm, 100, steps=2) > 0


def test_measuring_helpers():
    s = stats([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 4
    bw = read_bandwidth(nbytes=16 << 20, repeats=2)
    assert bw["bytes_per_s"] > 1e8 and bw["best_method"]
    # In a fresh interpreter: what earlier tests left in this worker process (threads, malloc settings, freed blocks
    # kept resident) moved its RSS between the two readings under pytest-xdist.
    import subprocess
    import sys

    check = """
import numpy as np
from illume_rt.bench.measure import peak_rss_bytes, reset_peak_rss, rss_bytes
if reset_peak_rss():  # Linux: the peak follows what this process touches
    base = rss_bytes()
    big = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB touched
    assert peak_rss_bytes() >= base + (60 << 20)
    del big
    reset_peak_rss()
    assert peak_rss_bytes() < base + (32 << 20), (peak_rss_bytes(), base)  # the reset forgot the 64 MiB peak
else:
    assert peak_rss_bytes() > 0
"""
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    merged = merge_rounds([{"a": stats([1.0, 2.0]), "peak_rss_bytes": 5, "load_s": 1.0, "tag": "x"},
                           {"a": stats([3.0]), "peak_rss_bytes": 9, "load_s": 3.0, "tag": "y"}])
    assert merged["a"]["n"] == 3 and merged["a"]["median"] == 2.0
    assert merged["peak_rss_bytes"] == 9 and merged["load_s"] == 3.0 and merged["tag"] == "x"


def _synthetic_results() -> dict:
    def st(v):
        return stats([v, v * 1.1])

    gb = 10**9
    entry = {"grid": [9, 9, 16, 16], "num_codes": 337, "num_tokens": 362, "prefill_s": st(1.0),
             "semantic_step_s": st(0.2), "pixel_step_s": st(0.25), "pixel_step_late_s": st(0.27),
             "image_decode_s": st(0.5)}
    ref = {"grid": [9, 9, 16, 16], "num_codes": 337, "num_tokens": 362, "prefill_s": st(2.0),
           "token_step_s": st(1.0), "image_decode_s": st(1.0)}
    mem = {"peak_rss_generate_bytes": 2.5 * gb, "peak_rss_load_bytes": 3 * gb}
    results = {
        "command": "test", "created_at": "now", "machine": {"cpu_count": 2}, "versions": {"numpy": "x"},
        "bundle": "b", "preset": "bench", "settings": {}, "int8": "not run", "peer": "not run",
        "bandwidth": {"best": {"bytes_per_s": 10 * gb, "best_method": "np.max", "method": "m"}},
        "manifest": {"components": {"llm": {"bytes": 1.4 * gb}, "lm_head_text": {"bytes": 0.5 * gb},
                                    "lm_head_semantic": {"bytes": 0.1 * gb}, "lm_head_pixel": {"bytes": 0.35 * gb}}},
        "contenders": {
            "runtime fp32": {"resolutions": {"256x256": entry}, "memory": mem, "kv_cache_bytes": {"256x256": gb // 10},
                             "weights": {"graphs": {"llm": 1.4 * gb, "lm_head_pixel": 0.35 * gb},
                                         "tables": {"embed_tokens": gb, "semantic_codebook": 0, "pixel_codebook": 0}}},
            "reference (transformers)": {"resolutions": {"256x256": ref}, "memory": {**mem, "peak_rss_generate_bytes": 5 * gb}},
        },
        "ablations": None,
    }
    return results


def test_report_from_synthetic_results(tmp_path):
    from illume_rt.bench.report import analyse, write_reports

    results = _synthetic_results()
    d = analyse(results)
    assert d["ratios"]["runtime vs reference per image 256x256"] == pytest.approx(
        (2.0 + 361 * 1.0 + 1.0) / (1.0 + 81 * 0.2 + 256 * 0.26 + 0.5))
    assert d["bandwidth_fraction"]["semantic step 256x256"] == pytest.approx(1.5 / 10 / 0.21)
    targets = {t["target"]: t for t in d["targets"]}
    assert targets["runtime peak < reference peak"]["met"]
    assert not targets["runtime peak memory / (weights + kv)"]["met"]  # 2.5 GB > 1.25 x 1.85 GB
    results["derived"] = d
    results.pop("manifest")
    write_reports(results, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["preset"] == "bench"
    assert "| runtime vs reference per image 256x256 | >= 3.0x |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_int8_vs_fp32_measurement(tiny_bundle, tmp_path):
    """One process, interleaved: a tiny INT8 bundle (quick plan, LLM body only) against its FP32 source; finite
    positive times and ratios, the figures of the quick quantization in its manifest, and the report rows."""
    from illume_rt.bench.int8 import measure_int8, quantize_quick, ratio_rows, write_results
    from illume_rt.bench.report import analyse, markdown

    int8 = tmp_path / "tiny-int8"
    q = quantize_quick(tiny_bundle, int8, threads=1, log=lambda m: None)
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["quantization"]["status"] == "passed" and manifest["quantization"]["components"] == ["llm"]
    assert manifest["components"]["llm"]["precision"] == "int8"
    assert manifest["components"]["llm"]["quantization"]["accuracy"]["teacher_forced"]["pixel"]["positions"] > 0
    assert manifest["components"]["pixel_decoder"]["precision"] == "fp32"
    assert manifest["components"]["pixel_decoder"]["kept_fp32"]
    assert q["seconds"] > 0 and manifest["quantization"]["timings"]["calibration_capture"] >= 0

    section = measure_int8(tiny_bundle, int8, repeats=2, warmup=1, steps=2, threads=1, log=lambda m: None)
    for label in ("fp32", "int8"):
        for key in ("prefill", "semantic step", "pixel step", "pixel body", "pixel head"):
            fig = section["times_s"][label][key]
            assert fig["n"] == 2 and np.isfinite(fig["median"]) and fig["min"] > 0, (label, key)
    for key, value in section["ratios"].items():
        assert np.isfinite(value) and value > 0, key
    assert section["paired_ratios"]["pixel step"]["n"] == 2
    assert section["weight_bytes_ratio"]["body"] > 1  # INT8 weights are smaller
    assert section["int8_quantization"]["components"]["llm"]["teacher_forced"]["semantic"]["top1_agreement"] >= 0.6
    assert 0 < section["contexts"]["semantic"] < section["contexts"]["pixel"]
    assert len(section["loadavg"]["per_repeat_1min"]) == 3

    out = write_results({"command": "test", "created_at": "now", "machine": {"cpu_count": 2}, "versions": {},
                         "int8_vs_fp32": section, "wall_s": 1.0}, tmp_path / "res")
    assert json.loads((out / "results.json").read_text())["int8_vs_fp32"]["ratios"]["pixel step"] > 0
    assert "| **" in (out / "results.md").read_text()
    results = {**_synthetic_results(), "int8_vs_fp32": section}
    d = analyse(results)
    for row in ratio_rows(section):
        assert d["ratios"][row] == ratio_rows(section)[row]
    assert any(t["target"].startswith("INT8 decode speed-up") for t in d["targets"])
    results["derived"] = d
    assert "INT8 vs FP32 decode (one process" in markdown(results)


def test_external_data_export_is_listed_and_verified(tmp_path):
    """Graphs over 2 GiB keep their weights in a side file; forced here on the tiny head to test the path."""
    import onnxruntime as ort

    preset = get_preset("tiny")
    model = build_llm(preset)
    comp = head_component(preset, model, "pixel")
    path = tmp_path / f"{comp.name}.onnx"
    report = export_onnx(comp, comp.build_module(), path, seed=0, external_data=True)
    data = tmp_path / f"{comp.name}.onnx.data"
    assert report["ok"] and report["external_data"] == [data.name]
    assert data.stat().st_size >= 4 * preset.llm.hidden_size * preset.vocab.pixel_codebook_size
    assert path.stat().st_size < 64 * 1024  # the graph alone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, data.name])  # no temporaries left
    hidden = np.ones((1, preset.llm.hidden_size), dtype=np.float32)
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"hidden": hidden})
    assert logits.shape == (1, preset.vocab.pixel_codebook_size)
    export_onnx(comp, comp.build_module(), path, seed=0, external_data=False)  # re-export inline: side file gone
    assert not data.exists()


def test_weights_identity_tells_equal_folders_from_different_ones(tmp_path):
    """bench/weights_identity.py, how runs of nano's one command are compared: a file that differs, a torch archive
    whose tensors are equal though its bytes are not, a file one side lacks, and a stage's final loss."""
    from illume_rt.bench.weights_identity import compare

    new, old = tmp_path / "new", tmp_path / "old"
    for folder in (new, old):
        (folder / "mllm").mkdir(parents=True)
        (folder / "mllm" / "config.json").write_text('{"hidden": 128}')
        (folder / "training.json").write_text(json.dumps({"semantic": {"final_loss": 0.5, "cpu_s": 1.0}}))
    torch.save({"w": torch.ones(3)}, new / "tok.bin")
    torch.save({"w": torch.ones(3), "_": torch.zeros(())}, old / "tok.bin")  # other tensors
    out = compare(new, old)
    assert out["files"]["tok.bin"]["tensors_equal"] is False and not out["all_equal"]
    torch.save({"w": torch.ones(3)}, old / "tok.bin", _use_new_zipfile_serialization=False)  # same tensors, other bytes
    out = compare(new, old)
    assert out["files"]["tok.bin"]["equal"] and out["final_loss"]["semantic"]["equal"] and out["all_equal"]
    assert "training.json" not in out["files"]  # timings differ from run to run

    (new / "training.json").write_text(json.dumps({"semantic": {"final_loss": 0.5000001}}))
    (new / "mllm" / "config.json").write_text('{"hidden": 256}')
    (old / "mllm" / "sampling.json").write_text("{}")
    out = compare(new, old)
    assert not out["final_loss"]["semantic"]["equal"] and not out["files"]["mllm/config.json"]["equal"]
    assert out["files"]["mllm/sampling.json"] == {"new": None, "old": out["files"]["mllm/sampling.json"]["old"],
                                                 "equal": False}
    assert not out["all_equal"]

"""The streaming exporter (export/streaming.py) against the exporter it replaced, and its memory bound.

``legacy_export`` below is the previous export path, kept here only as the baseline: ``torch.onnx.export`` of the
module holding real weights, the exporter's default optimisation, the whole ``ModelProto`` in memory.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from illume_rt.export import components as components_module
from illume_rt.export import streaming
from illume_rt.export.bundle import components_for
from illume_rt.export.components import (ONNX_IR_VERSION, ONNX_OPSET, ExportError, _dynamic_shapes, _name_dims,
                                         _torch_inputs, export_onnx)
from illume_rt.export.configs import get_preset
from illume_rt.export.llm import build_llm, head_component, llm_component

COMPARED = ("llm", "lm_head_pixel", "semantic_encoder", "token_map")


def legacy_export(component, module, path: Path) -> None:
    sample = component.make_inputs(component.sample_dims(0), np.random.default_rng(0))
    with torch.no_grad():
        program = torch.onnx.export(module, _torch_inputs(component, sample), input_names=component.input_names(),
                                     output_names=component.output_names(),
                                     dynamic_shapes=_dynamic_shapes(component, module), dynamo=True,
                                     opset_version=ONNX_OPSET, external_data=False, verbose=False)
    model = program.model_proto
    model.ir_version = ONNX_IR_VERSION
    _name_dims(model, component)
    onnx.save(model, str(path))


def _io(path: Path):
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return describe(model.graph.input), describe(model.graph.output)


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", COMPARED)
def test_streamed_graph_matches_the_previous_exporter(name, tiny_models, tiny_bundle, tmp_path):
    """Same inputs and outputs (names, dtypes, symbolic shapes) and the same numbers as the previous exporter."""
    comp = next(c for c in components_for(tiny_models) if c.name == name)
    old = tmp_path / f"{name}.legacy.onnx"
    legacy_export(comp, comp.build_module(), old)
    new = tiny_bundle / f"{name}.onnx"
    assert _io(new) == _io(old)
    old_s, new_s = _session(old), _session(new)
    for which in (0, 1):
        feeds = comp.make_inputs(comp.sample_dims(which), np.random.default_rng(7 + which))
        for got, want in zip(new_s.run(None, feeds), old_s.run(None, feeds)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def _lazy_copy(module: torch.nn.Module, reads: list, alive: list | None = None):
    """A fake-tensor copy of ``module`` whose readers return its real tensors (cloned, recorded in ``reads``)."""
    import copy

    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    skeleton = copy.deepcopy(module).to("meta")
    lazy = streaming.fake_empty(skeleton)
    targets = lazy.state_dict(keep_vars=True)

    def reader(key):
        def read():
            reads.append(key)
            value = state[key].clone()
            if alive is not None:
                alive.append(weakref.ref(value))
            return value
        return read

    for key in state:
        streaming.lazy(targets[key], reader(key))
    return lazy


class _Foldable(torch.nn.Module):
    """What the fold after a trace removes: reshapes of reshapes, a full-length slice, a constant range, two
    transposes that cancel, an added zero."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        b, n, d = x.shape
        y = self.proj(x).reshape(b, n * d).reshape(b, n, d)
        y = y[:, 0:n, :] * torch.arange(d, dtype=x.dtype)
        return y.transpose(1, 2).transpose(1, 2) + 0.0


def test_the_fold_after_a_trace_gives_the_graph_onnxscripts_optimiser_gives(monkeypatch):
    """streaming.fold_small_constants leaves out rewrite rules (SKIPPED_REWRITE_RULES) for speed: every other
    pass and rule must still run, so a graph comes out as onnxscript's optimize_ir makes it."""
    from illume_rt.bench.export_fold import graph_signature, optimize_ir_as_it_is

    fold = streaming.fold_small_constants
    monkeypatch.setattr(streaming, "fold_small_constants", lambda model: None)

    def trace():
        dims = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)
        return streaming.export_structure(_Foldable(), (torch.randn(2, 3, 8),), ["x"], ["y"], dims)

    traced, ours, theirs = trace(), trace(), trace()
    fold(ours)
    optimize_ir_as_it_is(theirs)
    assert len(graph_signature(ours)[0]) < len(graph_signature(traced)[0]) / 2
    assert graph_signature(ours) == graph_signature(theirs)


def test_lazy_weights_stream_one_tensor_at_a_time(tmp_path):
    """External data written from lazy weights: the same file as from real weights, and no tensor read is still
    alive when the next is read (the bound: one tensor beyond what is being written)."""
    preset = get_preset("tiny")
    real = build_llm(preset)
    reads, alive = [], []
    lazy = _lazy_copy(real, reads, alive)
    lazy.model.rotary_emb = real.model.rotary_emb  # non-persistent, recomputed by loaders (real here)
    comp_lazy = llm_component(preset, lazy)
    comp_real = llm_component(preset, real)
    graph = streaming.export_structure(comp_lazy.build_module(), _torch_inputs(
        comp_lazy, comp_lazy.make_inputs(comp_lazy.sample_dims(0), np.random.default_rng(0))),
        comp_lazy.input_names(), comp_lazy.output_names(), _dynamic_shapes(comp_lazy, comp_lazy.build_module()))
    assert reads == []  # tracing read nothing
    peak = []

    def progress(_name):
        gc.collect()
        peak.append(sum(ref() is not None for ref in alive))

    streaming.write_weights(graph, comp_lazy.build_module(), tmp_path, "lazy.data", progress=progress)
    assert len(reads) == len(set(reads)) > 20  # each tensor read once
    assert max(peak) <= 1
    ref = export_onnx(comp_real, comp_real.build_module(), tmp_path / "real" / "llm.onnx", external_data=True)
    assert ref["ok"]
    assert (tmp_path / "lazy.data").read_bytes() == (tmp_path / "real" / "llm.onnx.data").read_bytes()


def test_lazy_export_verifies_a_stated_sample_of_layers(tmp_path, monkeypatch):
    """Over the full-verification budget, the LLM is checked layer by layer on a sample, recorded in the report;
    a graph whose stored weights differ from the checkpoint's is refused."""
    preset = get_preset("tiny")
    real = build_llm(preset)
    reads: list = []
    lazy = _lazy_copy(real, reads)
    lazy.model.rotary_emb = real.model.rotary_emb
    monkeypatch.setattr(components_module, "FULL_VERIFY_BYTES", 0)
    comp = llm_component(preset, lazy)
    report = export_onnx(comp, comp.build_module(), tmp_path / "llm.onnx", external_data=True)
    assert report["method"] == "sampled" and report["layers"] == [0, 1]
    assert report["bytes_compared"] > 0 and report["worst_cosine"] > 0.99999
    assert {case["layer"] for case in report["cases"]} == {0, 1}

    # a reader that returns other values the second time (a checkpoint changed under the export): caught
    calls = {}
    weight = lazy.model.layers[1].mlp.up_proj.weight
    original = getattr(weight, streaming.LAZY_READER)

    def drifting():
        calls["n"] = calls.get("n", 0) + 1
        value = original()
        return value if calls["n"] == 1 else value + 1.0

    streaming.lazy(weight, drifting)
    with pytest.raises(ExportError, match="up_proj"):
        export_onnx(comp, comp.build_module(), tmp_path / "again" / "llm.onnx", external_data=True)


def test_weight_dtype_halves_the_bundle_and_keeps_float32_io(tmp_path):
    preset = get_preset("tiny")
    real = build_llm(preset)
    comp = head_component(preset, real, "pixel")
    sizes = {}
    for storage in ("fp32", "fp16", "bf16"):
        path = tmp_path / storage / "head.onnx"
        report = export_onnx(comp, comp.build_module(), path, external_data=True, storage=storage)
        assert report["ok"] and report["method"] == "full"
        sizes[storage] = (path.parent / "head.onnx.data").stat().st_size
        model = onnx.load(str(path), load_external_data=False)
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert sizes["fp16"] == sizes["bf16"] < 0.55 * sizes["fp32"]
    with pytest.raises(ExportError, match="fp8"):
        export_onnx(comp, comp.build_module(), tmp_path / "x.onnx", storage="fp8")


def test_checkpoint_reads_rows_and_whole_tensors_alike(tmp_path):
    """An LM-head range is read from the safetensors file as that byte range only; whole tensors and row ranges
    give what safetensors itself loads (any dtype, bf16 included)."""
    from safetensors.torch import load_file, save_file

    from illume_rt.export.checkpoints import _open_safetensors

    path = tmp_path / "model.safetensors"
    save_file({"lm_head.weight": torch.randn(50, 8).to(torch.bfloat16), "model.norm.weight": torch.randn(8),
               "steps": torch.arange(3)}, str(path))
    want = load_file(str(path))
    source = _open_safetensors("test", [path])
    for name, tensor in want.items():
        assert torch.equal(source.get(name), tensor) and source.get(name).dtype == tensor.dtype
    assert torch.equal(source.get_rows("lm_head.weight", 13, 41), want["lm_head.weight"][13:41])
    assert source.get_rows("lm_head.weight", 50, 60).shape == (0, 8)


def _lazy_semantic_encoder(preset, reads: list):
    """The tiny semantic encoder with lazy weights (readers of real tensors), and its real twin."""
    from illume_rt.export.networks.vision import build_projectors, build_vision_tower, vision_tower_component

    tower, projectors = build_vision_tower(preset), build_projectors(preset)
    lazy_tower, lazy_projectors = _lazy_copy(tower, reads), _lazy_copy(projectors, reads)
    lazy_tower.rotary_pos_emb = tower.rotary_pos_emb  # non-persistent, recomputed by loaders (real here)
    return vision_tower_component(preset, lazy_tower, lazy_projectors), lazy_tower


def test_lazy_semantic_encoder_verifies_a_stated_sample_of_blocks(tmp_path, monkeypatch):
    """Over the budget, the semantic encoder is checked on a sample of ViT blocks, each as a one-block encoder with
    the real ends, and the stored weights of those blocks and ends byte for byte; recorded in the report."""
    preset = get_preset("tiny")
    reads: list = []
    comp, _ = _lazy_semantic_encoder(preset, reads)
    monkeypatch.setattr(components_module, "FULL_VERIFY_BYTES", 0)
    report = export_onnx(comp, comp.build_module(), tmp_path / "semantic_encoder.onnx", external_data=True)
    assert report["ok"] and report["method"] == "sampled" and report["blocks"] == [0, 1]
    assert {case["block"] for case in report["cases"]} == {0, 1} and len(report["cases"]) == 4
    assert report["worst_cosine"] > 0.99999 and "ViT blocks [0, 1]" in report["sample"]
    stored = sum(t.numel() * 4 for t in comp.build_module().parameters())
    assert report["bytes_compared"] == stored  # tiny: both blocks sampled, so every weight was compared


def test_semantic_encoder_sample_catches_wrong_stored_weights(tmp_path, monkeypatch):
    """A sampled block whose stored weights differ from the checkpoint's (here: a reader that returns other values
    after the big graph was written) fails the export, naming the tensor."""
    preset = get_preset("tiny")
    comp, tower = _lazy_semantic_encoder(preset, [])
    monkeypatch.setattr(components_module, "FULL_VERIFY_BYTES", 0)
    weight = tower.blocks[1].mlp.fc1.weight
    original, calls = getattr(weight, streaming.LAZY_READER), []

    def drifting():
        calls.append(1)
        value = original()
        return value if len(calls) == 1 else value + 1e-3

    streaming.lazy(weight, drifting)
    with pytest.raises(ExportError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        export_onnx(comp, comp.build_module(), tmp_path / "semantic_encoder.onnx", external_data=True)
    assert not (tmp_path / "semantic_encoder.onnx").exists()


def test_semantic_encoder_sample_catches_a_wrong_graph(tmp_path, monkeypatch):
    """A graph that computes something else than the reference (here: traced with GELU where the ViT MLP has
    quick_gelu) fails on the sampled blocks, though each stored weight is right."""
    from illume_rt.export.networks import vision

    preset = get_preset("tiny")
    comp, _ = _lazy_semantic_encoder(preset, [])
    monkeypatch.setattr(components_module, "FULL_VERIFY_BYTES", 0)
    trace = streaming.export_structure

    def traced_with_gelu(*args, **kwargs):
        saved = vision.quick_gelu
        vision.quick_gelu = torch.nn.functional.gelu
        try:
            return trace(*args, **kwargs)
        finally:
            vision.quick_gelu = saved

    monkeypatch.setattr(streaming, "export_structure", traced_with_gelu)
    with pytest.raises(ExportError, match="semantic_encoder: exported graph differs"):
        export_onnx(comp, comp.build_module(), tmp_path / "semantic_encoder.onnx", external_data=True)


def test_lazy_head_verifies_sampled_rows_and_catches_wrong_ones(tmp_path, monkeypatch):
    """Over the budget (the 7B text head), an LM head is checked on row ranges (first, middle, last), each as a head
    graph vs PyTorch, and those rows of the stored (transposed) weight byte for byte; wrong stored rows fail."""
    from illume_rt.export import llm as llm_module

    preset = get_preset("tiny")
    real = build_llm(preset)
    lazy = _lazy_copy(real, [])
    monkeypatch.setattr(components_module, "FULL_VERIFY_BYTES", 0)
    monkeypatch.setattr(llm_module, "SAMPLE_ROWS", 16)
    comp = head_component(preset, lazy, "semantic")
    start, stop = preset.vocab.head_range("semantic")
    report = export_onnx(comp, comp.build_module(), tmp_path / "head.onnx", external_data=True, storage="fp16")
    middle = start + (stop - start - 16) // 2
    assert report["method"] == "sampled" and report["rows"] == [[start, start + 16], [middle, middle + 16],
                                                                [stop - 16, stop]]
    assert report["bytes_compared"] == 3 * 16 * preset.llm.hidden_size * 2  # fp16 as stored
    assert report["worst_cosine"] > 0.99999 and len(report["cases"]) == 6
    assert llm_module.sample_row_ranges(20, 16) == [(0, 20)]  # overlapping ranges merge

    weight = lazy.lm_head.weight
    original, calls = getattr(weight, streaming.LAZY_READER), []

    def drifting():
        calls.append(1)
        value = original()
        if len(calls) > 1:
            value = value.clone()
            value[stop - 1, 0] += 1.0  # the last row of the range only
        return value

    streaming.lazy(weight, drifting)
    with pytest.raises(ExportError, match=rf"rows {stop - start - 16}\.\.{stop - start - 1} of initializer weight"):
        export_onnx(comp, comp.build_module(), tmp_path / "again" / "head.onnx", external_data=True)


def _official_layout(models, **changes):
    """``models`` with the official vocabulary layout (text ids far beyond the 256 bytes), other fields changed."""
    from dataclasses import replace

    from illume_rt.contract import official_vocab_layout

    return replace(models, preset=replace(models.preset, vocab=official_vocab_layout(283047)), **changes)


def test_export_refuses_a_checkpoint_without_its_tokenizer_before_any_graph(tiny_models, tmp_path, monkeypatch):
    """A checkpoint whose vocabulary needs tokenizer.json, without one: refused before minutes of graph export
    (it used to fail after exporting every graph), and nothing is left in the output folder."""
    import illume_rt.export.bundle as bundle_module

    def exported(*args, **kwargs):
        raise AssertionError("a graph was exported before the tokenizer was settled")

    monkeypatch.setattr(bundle_module, "export_onnx", exported)
    with pytest.raises(ExportError, match="needs a tokenizer.json; pass --checkpoint"):
        bundle_module.write_bundle(_official_layout(tiny_models, random_weights=False, source={}), tmp_path / "b",
                                   log=lambda m: None)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_random_weights_with_the_official_layout_get_the_byte_level_stand_in(tiny_models, tmp_path, monkeypatch):
    """`illume-rt export --preset bench` (random weights, official layout, no tokenizer of its own): the bundle
    carries the byte-level stand-in, which the runtime reads (text ids are the UTF-8 bytes)."""
    import json

    import illume_rt.export.bundle as bundle_module
    from illume_rt.runtime.tokenizer import load_tokenizer

    models = _official_layout(tiny_models, source={})
    monkeypatch.setattr(bundle_module, "components_for", lambda m: [])  # the tokenizer, not the graphs
    monkeypatch.setattr(bundle_module, "tables_for", lambda m: [])
    out = bundle_module.write_bundle(models, tmp_path / "b", log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"kind": "hf", "file": "tokenizer.json"}
    assert manifest["files"]["tokenizer"]["file"] == "tokenizer.json"
    assert "stand-in" in manifest["model"]["source"]["tokenizer_file"]
    tokenizer = load_tokenizer(manifest["tokenizer"], out, models.preset.vocab)
    assert tokenizer.encode("hé") == list("hé".encode())

"""The LLM's export form against transformers, its ONNX graph against both, and the runtime's cache handling."""

import numpy as np
import pytest
import torch

from conftest import export_report
from illume_rt.engines.ort import OrtEngine
from illume_rt.export.configs import get_preset
from illume_rt.export.llm import HEAD_RANGES, LLMStep, build_llm, head_component, head_range, llm_component
from illume_rt.runtime.generate import LanguageModel


@pytest.fixture(scope="module")
def tiny():
    preset = get_preset("tiny")
    return preset, build_llm(preset)


@pytest.fixture(scope="module")
def exported(tiny, tiny_bundle):
    """The LLM and LM-head graphs as the session's tiny export wrote them (conftest.py tiny_bundle: export_onnx of
    these components on this model's weights, the preset's seed), with their verification reports; not exported
    again here."""
    preset, model = tiny
    reports = {}
    for comp in [llm_component(preset, model)] + [head_component(preset, model, w) for w in HEAD_RANGES]:
        reports[comp.name], path = export_report(tiny_bundle, comp.name)
        assert path == tiny_bundle / f"{comp.name}.onnx"
    return tiny_bundle, reports


def empty_past(preset, batch, columns=0):
    """Per-layer cache inputs (keys, values) of ``columns`` columns."""
    c = preset.llm
    return [torch.zeros(batch, c.num_key_value_heads, columns, c.head_dim) for _ in range(2 * c.num_hidden_layers)]


def test_step_matches_transformers_full_forward(tiny):
    preset, model = tiny
    ids = torch.randint(0, preset.vocab.vocab_rows, (2, 10), generator=torch.Generator().manual_seed(0))
    step = LLMStep(model).eval()
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[-1]  # every position (verify steps read all)
        got, kv = step(model.model.embed_tokens(ids), torch.ones(2, 10, dtype=torch.long),
                       torch.arange(10).repeat(2, 1), *empty_past(preset, 2))
    assert torch.allclose(got, want, atol=1e-5)
    c = preset.llm
    assert kv.shape == (c.num_hidden_layers, 2, 2, c.num_key_value_heads, 10, c.head_dim)


def test_unwritten_cache_columns_get_no_attention(tiny):
    """Decode over the whole capacity: columns with mask 0 (not yet written, any content) change nothing."""
    preset, model = tiny
    step = LLMStep(model).eval()
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    emb = model.model.embed_tokens
    with torch.no_grad():
        _, kv = step(emb(ids[:, :6]), torch.ones(1, 6, dtype=torch.long), torch.arange(6)[None],
                     *empty_past(preset, 1))
        exact = [kv[layer, kind] for layer in range(kv.shape[0]) for kind in range(2)]  # 6 columns
        want, _ = step(emb(ids[:, 6:]), torch.ones(1, 7, dtype=torch.long), torch.tensor([[6]]), *exact)
        capacity = [torch.cat([p, torch.randn(1, p.shape[1], 5, p.shape[3])], dim=2) for p in exact]
        mask = torch.tensor([[1] * 6 + [0] * 5 + [1]])
        got, _ = step(emb(ids[:, 6:]), mask, torch.tensor([[6]]), *capacity)
        assert torch.allclose(got, want, atol=1e-5)
        mask[0, 8] = 1  # an unwritten column let through does change the result: the mask is what hides them
        assert not torch.allclose(step(emb(ids[:, 6:]), mask, torch.tensor([[6]]), *capacity)[0], want, atol=1e-3)


def test_left_padding_does_not_change_a_row(tiny):
    preset, model = tiny
    step = LLMStep(model).eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    emb = model.model.embed_tokens
    with torch.no_grad():
        alone, _ = step(emb(ids), torch.ones(1, 6, dtype=torch.long), torch.arange(6)[None], *empty_past(preset, 1))
        padded_ids = torch.cat([torch.full((1, 3), preset.vocab.pad_id), ids], dim=1)
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
        pos = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
        padded, _ = step(emb(padded_ids), mask, pos, *empty_past(preset, 1))
    assert torch.allclose(alone, padded[:, 3:], atol=1e-5)
    assert not torch.allclose(alone, step(emb(padded_ids), torch.ones(1, 9, dtype=torch.long), pos,
                                          *empty_past(preset, 1))[0][:, 3:], atol=1e-3)


def test_export_reports_are_within_tolerance(exported):
    _, reports = exported
    for name, report in reports.items():
        assert report["ok"], name
        assert len(report["cases"]) == 2  # two different sizes: the dynamic dims stayed dynamic
        assert report["worst_cosine"] > 0.99999


def test_head_slices_cover_their_rows(tiny, exported):
    preset, model = tiny
    out, _ = exported
    hidden = np.random.default_rng(0).standard_normal((2, preset.llm.hidden_size), dtype=np.float32)
    full = model.lm_head(torch.from_numpy(hidden)).detach().numpy()
    for which in HEAD_RANGES:
        lo, hi = head_range(preset, which)
        (got,) = OrtEngine(which, out / f"lm_head_{which}.onnx").run({"hidden": hidden})
        assert np.allclose(got, full[:, lo:hi], atol=1e-5)


def test_cached_decode_matches_full_recompute_through_onnx(tiny, exported):
    """Prefill + token-by-token steps through the runtime's cache give the hidden states of a full forward."""
    preset, model = tiny
    out, _ = exported
    c = preset.llm
    info = {"num_hidden_layers": c.num_hidden_layers, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "max_context": c.max_position_embeddings}
    lm = LanguageModel(OrtEngine("llm", out / "llm.onnx"), {}, model.get_input_embeddings().weight.detach().numpy(),
                       info, preset.vocab)
    rows = [list(range(40, 52)), list(range(60, 67))]  # different lengths: left padding in row 1
    extra = [300, 301, 302, 303]
    cache = lm.new_cache(2, 32)
    lm.prefill(cache, rows)
    lm.step(cache, extra[:1])
    hidden = lm.step(cache, extra[1:])  # a run of several tokens in one call
    assert cache.length == 12 + 4
    with torch.no_grad():
        for i, row in enumerate(rows):
            want = model(torch.tensor([row + extra]), output_hidden_states=True).hidden_states[-1][0, -1]
            assert np.allclose(hidden[i], want.numpy(), atol=1e-4)


def test_no_op_copies_the_cache(exported, tmp_path):
    """In the graph onnxruntime runs (after its optimizations), every cache input feeds matmuls directly: no
    Split/Slice/Transpose/Concat copies the cache, so step time cannot grow with the context through copies."""
    import onnx
    import onnxruntime as ort

    out, _ = exported
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(out / "llm.onnx"), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    cache_inputs = [i.name for i in graph.input if i.name.startswith("past_")]
    assert len(cache_inputs) == 2 * get_preset("tiny").llm.num_hidden_layers
    consumers = {}
    for node in graph.node:
        for name in node.input:
            if name in cache_inputs:
                consumers.setdefault(name, set()).add(node.op_type)
    assert set(consumers) == set(cache_inputs)
    assert set().union(*consumers.values()) <= {"MatMul", "FusedMatMul", "Shape"}, consumers  # Shape: metadata


def test_malloc_tuning_is_an_opt_in_that_the_cli_takes(tiny_bundle, tmp_path):
    """Opening a Pipeline leaves the process's malloc alone (a host embedding the runtime decides); the CLI opts in."""
    import subprocess
    import sys

    code = ("import sys; from illume_rt.engines import ort; from illume_rt.runtime.pipeline import Pipeline; "
            "Pipeline.from_bundle(sys.argv[1]); print(ort._malloc_tuned)")
    bundle = str(tiny_bundle)
    out = subprocess.run([sys.executable, "-c", code, bundle], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    code = ("import sys; from illume_rt import cli; from illume_rt.engines import ort; "
            "cli.main(['generate', 'a', '-o', sys.argv[2], '--bundle', sys.argv[1], '-q', '--resolution', '256x256']); "
            "print(ort._malloc_tuned)")
    out = subprocess.run([sys.executable, "-c", code, bundle, str(tmp_path / "x.png")], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(sys.platform.startswith("linux"))

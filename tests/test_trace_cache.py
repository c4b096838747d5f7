"""The trace cache (export/trace_cache.py): a cached structure gives the graph a fresh trace gives, and anything
the trace reads besides the weights' values tells two structures apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from illume_rt.export import components as components_module
from illume_rt.export import streaming, trace_cache
from illume_rt.export.components import Component, ExportError, TensorSpec, export_onnx


class _Scaled(torch.nn.Module):
    """A linear layer, a plain attribute the forward reads (``scale``) and a plain tensor it adds (``offset``, not a
    registered buffer: the trace bakes its value in)."""

    def __init__(self, scale: float = 2.0, offset: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(8, 8)
        self.scale = scale
        self.offset = torch.full((8,), offset)

    def forward(self, x):
        return (self.proj(x) * self.scale + self.offset,)


class _Doubled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return (self.proj(x) * 2.0 + 1.0,)


def _component(build) -> Component:
    return Component(
        name="scaled", inputs=(TensorSpec("x", "float32", ("batch", 8)),), outputs=(TensorSpec("y", "float32",
                                                                                                 ("batch", 8)),),
        dims={"batch": (2, 3, (1, 2, 4))}, build_module=build,
        make_inputs=lambda dims, rng: {"x": rng.standard_normal((dims["batch"], 8)).astype(np.float32)})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "traces"
    monkeypatch.setenv(trace_cache.TRACE_CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def traces(monkeypatch):
    """How many times torch.onnx.export ran (a miss traces; a hit does not)."""
    calls = []
    original = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def _export(build, path):
    comp = _component(build)
    return export_onnx(comp, comp.build_module(), path)


def _key(module) -> str | None:
    comp = _component(lambda: module)
    sample = comp.make_inputs(comp.sample_dims(0), np.random.default_rng(0))
    return trace_cache.structure_key(module, components_module._torch_inputs(comp, sample), ["x"], ["y"],
                                     components_module._dynamic_shapes(comp, module))


def test_a_cached_structure_with_other_weights_gives_the_bytes_a_fresh_trace_gives(cache, traces, tmp_path,
                                                                                  monkeypatch):
    _export(lambda: _Scaled(seed=0), tmp_path / "first" / "g.onnx")
    assert len(traces) == 1 and len(list(cache.glob("*.onnx"))) == 1
    _export(lambda: _Scaled(seed=1), tmp_path / "cached" / "g.onnx")  # other weights, same structure
    assert len(traces) == 1, "the second export traced again"
    monkeypatch.delenv(trace_cache.TRACE_CACHE_ENV)
    _export(lambda: _Scaled(seed=1), tmp_path / "fresh" / "g.onnx")
    assert len(traces) == 2
    assert (tmp_path / "cached" / "g.onnx").read_bytes() == (tmp_path / "fresh" / "g.onnx").read_bytes()
    assert (tmp_path / "cached" / "g.onnx").read_bytes() != (tmp_path / "first" / "g.onnx").read_bytes()


def test_what_the_trace_reads_besides_weight_values_changes_the_key():
    base = _key(_Scaled())
    assert base is not None and base == _key(_Scaled(seed=3))  # weight values are not part of the structure
    assert _key(_Scaled(scale=3.0)) != base  # a number the forward reads
    assert _key(_Scaled(offset=1.0)) != base  # a plain tensor's value, baked into the graph
    wider = _Scaled()
    wider.proj = torch.nn.Linear(8, 8, bias=False)
    assert _key(wider) != base  # a parameter less
    assert _key(_Doubled()) != base  # another class
    hooked = _Scaled()
    hooked.register_forward_hook(lambda module, args, out: out)
    assert _key(hooked) is None  # a hook: uncacheable


def test_a_config_path_is_not_part_of_the_key():
    from types import SimpleNamespace

    first, second = _Scaled(), _Scaled()
    first.config = SimpleNamespace(eps=1e-6, _name_or_path="/weights/a")
    second.config = SimpleNamespace(eps=1e-6, _name_or_path="/elsewhere/b")
    assert _key(first) == _key(second)
    second.config.eps = 1e-5
    assert _key(first) != _key(second)


def test_a_swapped_tracer_misses(cache, traces, tmp_path, monkeypatch):
    _export(_Scaled, tmp_path / "a" / "g.onnx")
    trace = streaming.export_structure
    monkeypatch.setattr(streaming, "export_structure", lambda *a: trace(*a))
    _export(_Scaled, tmp_path / "b" / "g.onnx")
    assert len(traces) == 2


def test_a_damaged_entry_is_traced_again_and_replaced(cache, traces, tmp_path):
    _export(_Scaled, tmp_path / "a" / "g.onnx")
    (entry,) = cache.glob("*.onnx")
    entry.write_bytes(b"not a graph")
    _export(_Scaled, tmp_path / "b" / "g.onnx")
    assert len(traces) == 2 and entry.read_bytes() != b"not a graph"
    assert (tmp_path / "a" / "g.onnx").read_bytes() == (tmp_path / "b" / "g.onnx").read_bytes()


def test_a_stale_entry_that_fails_verification_is_traced_again_and_replaced(cache, traces, tmp_path):
    """An entry the key did not tell apart (here: another network's graph put under this key) gives a graph that
    differs from PyTorch: the export traces afresh instead of failing, and replaces the entry."""
    _export(_Doubled, tmp_path / "other" / "g.onnx")
    (wrong,) = cache.glob("*.onnx")
    key = _key(_Scaled())
    wrong.rename(cache / f"{key}.onnx")
    report = _export(_Scaled, tmp_path / "a" / "g.onnx")
    assert report["ok"] and len(traces) == 2
    assert trace_cache.load(cache, key) is not None
    _export(_Scaled, tmp_path / "b" / "g.onnx")
    assert len(traces) == 2  # the replaced entry is right
    assert (tmp_path / "a" / "g.onnx").read_bytes() == (tmp_path / "b" / "g.onnx").read_bytes()


def test_graphs_not_verified_whole_never_use_the_cache(cache, traces, tmp_path, monkeypatch):
    """Weights beyond FULL_VERIFY_BYTES (the 3B/7B) get a sampled check or none: a cached structure is not trusted
    there, so such an export neither reads nor writes the cache."""
    monkeypatch.setattr(components_module, "FULL_VERIFY_BYTES", 0)
    reads: list = []

    def lazy_scaled():
        from test_streaming import _lazy_copy

        return _lazy_copy(_Scaled(), reads)

    _export(lazy_scaled, tmp_path / "a" / "g.onnx")
    _export(lazy_scaled, tmp_path / "b" / "g.onnx")
    assert len(traces) == 2 and not cache.exists()


def test_an_export_that_fails_its_check_without_the_cache_still_fails(cache, tmp_path, monkeypatch):
    """The cache's retry is for cached structures only: a fresh trace that differs from PyTorch is an error."""
    trace = streaming.export_structure

    def traced_wrong(module, *rest):
        graph = trace(_Doubled(), *rest)
        return graph

    monkeypatch.setattr(streaming, "export_structure", traced_wrong)
    with pytest.raises(ExportError, match="differs from the reference"):
        _export(_Scaled, tmp_path / "a" / "g.onnx")

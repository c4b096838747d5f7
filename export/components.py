"""Component descriptors: one description per exported network, feeding export, verification, the manifest,
engine profiles and the runtime's shape checks.

A descriptor names its inputs and outputs with symbolic dims, says which sample size each dim takes at export
(at least 2, or the dynamo exporter silently fixes it) and a second size used to prove the dim stayed dynamic,
builds the reference module in "export form" (positional inputs in descriptor order, a tuple of outputs), and
makes sample inputs. Shapes are never written down anywhere else.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from illume_rt.errors import IllumeError


ONNX_IR_VERSION = 10  # onnxruntime-gpu rejects IR 14; TensorRT 10 parsers accept 10
ONNX_OPSET = 18


class ExportError(IllumeError, RuntimeError):
    """An exported graph that does not match its reference, or an export that could not be written."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints and symbolic dim names

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Tolerance:
    """Export verification: max |a-b| <= atol + rtol*max|b|, and cosine >= min_cosine."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.99999


@dataclass
class Component:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Symbolic dim -> (export sample size, verification size, (min, opt, max) for engine profiles).
    dims: dict[str, tuple[int, int, tuple[int, int, int]]]
    build_module: Callable[[], "object"]  # -> torch.nn.Module in export form
    make_inputs: Callable[[dict[str, int], np.random.Generator], dict[str, np.ndarray]]
    tolerance: Tolerance = field(default_factory=Tolerance)
    description: str = ""
    # (graph path, seed, storage torch dtype) -> report, for graphs too large to compare whole (see export_onnx)
    verify_at_size: Callable[[Path, int, object], dict] | None = None

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def sample_dims(self, which: int = 0) -> dict[str, int]:
        return {d: v[which] for d, v in self.dims.items()}

    def profiles(self) -> dict[str, list[int]]:
        return {d: list(v[2]) for d, v in self.dims.items()}

    def manifest_entry(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "profiles": self.profiles(),
            "description": self.description,
        }


def compare_arrays(got: np.ndarray, want: np.ndarray, tol: Tolerance) -> dict:
    """Figures for one output; 'ok' says whether they meet the tolerance."""
    got64, want64 = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    if got64.shape != want64.shape:
        return {"ok": False, "error": f"shape {got.shape} != {want.shape}"}
    max_abs = float(np.max(np.abs(got64 - want64))) if got64.size else 0.0
    scale = float(np.max(np.abs(want64))) if want64.size else 0.0
    denom = np.linalg.norm(got64) * np.linalg.norm(want64)
    cosine = float(got64 @ want64 / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    ok = max_abs <= tol.atol + tol.rtol * scale and cosine >= tol.min_cosine
    return {"ok": bool(ok), "max_abs_err": max_abs, "ref_max_abs": scale, "cosine": cosine}


def _torch_inputs(component: Component, arrays: dict[str, np.ndarray]):
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[t.name])) for t in component.inputs)


def run_reference(component: Component, module, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        outs = module(*_torch_inputs(component, arrays))
    if not isinstance(outs, (tuple, list)):
        outs = (outs,)
    return {t.name: o.detach().float().numpy() if o.dtype.is_floating_point else o.numpy()
            for t, o in zip(component.outputs, outs)}


PROTOBUF_LIMIT = 2**31 - 1  # one serialized ModelProto cannot exceed 2 GiB
INLINE_LIMIT = PROTOBUF_LIMIT - (64 << 20)  # weights above this go to external data (margin for the graph itself)
# A graph whose lazy weights (export/streaming.py) exceed this is not compared whole against PyTorch at export:
# the reference and the onnxruntime session would each hold the weights. Its component's ``verify_at_size`` (a
# stated sample, e.g. of LLM layers) runs instead, or the manifest says it was not verified.
FULL_VERIFY_BYTES = 2 << 30
# Lazy weights over this always go to external data: inline, every tensor would be held until the proto is written.
LAZY_INLINE_BYTES = 256 << 20


def export_onnx(component: Component, module, path: Path, seed: int = 0,
                external_data: bool | None = None, storage: str = "fp32") -> dict:
    """Export ``module`` to ``path`` (atomically) by streaming (export/streaming.py), then verify it.

    The structure is traced on fake tensors; the weights are then written one tensor at a time, in ``storage``
    (fp32, fp16 or bf16: a 16-bit weight is cast to float32 inside the graph). Graphs whose weights exceed the
    2 GiB protobuf limit (or any graph with ``external_data=True``) keep them in one side file,
    ``<path name>.data`` beside ``path``; the report then names it under ``external_data`` (relative to ``path``'s
    folder) so the bundle lists it with its size and hash. Both files are written in a temporary folder beside
    ``path`` and moved into place only after verification, the data file first.

    Verification: the whole graph against the module at two sizes per dim when its weights are in memory or fit
    ``FULL_VERIFY_BYTES``; else the component's ``verify_at_size`` (a stated sample), else none (said in the report).
    Returns the verification report; raises ExportError when a figure misses the tolerance.

    With ``ILLUME_RT_TRACE_CACHE`` set, a graph verified whole takes its structure from the trace cache when the
    same network was traced before (export/trace_cache.py), and is traced afresh if that structure fails the check.
    """
    from illume_rt.export import streaming, trace_cache

    if storage not in streaming.STORAGE_DTYPES:
        raise ExportError(f"weight dtype {storage!r} is not one of {', '.join(streaming.STORAGE_DTYPES)}")
    storage_dtype = streaming.STORAGE_DTYPES[storage]
    rng = np.random.default_rng(seed)
    sample = component.make_inputs(component.sample_dims(0), rng)
    dyn = _dynamic_shapes(component, module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = work / path.name
    trace_args = (module, _torch_inputs(component, sample), component.input_names(), component.output_names(), dyn)
    # A cached structure (export/trace_cache.py) is trusted only where the whole graph is checked against PyTorch.
    cache = trace_cache.cache_folder() if streaming.lazy_bytes(module) <= FULL_VERIFY_BYTES else None
    key = trace_cache.structure_key(*trace_args) if cache is not None else None

    def trace():
        graph = streaming.export_structure(*trace_args)
        if key is not None:
            trace_cache.store(cache, key, graph, streaming.module_tensors(module))
        return graph

    try:
        graph = trace_cache.load(cache, key) if key is not None else None
        cached = graph is not None
        if not cached:
            graph = trace()
        if external_data is None:
            stored = streaming.weight_bytes(graph, storage_dtype)
            external_data = stored > INLINE_LIMIT or (streaming.lazy_bytes(module) > 0 and stored > LAZY_INLINE_BYTES)
        data_name = f"{path.name}.data"
        written_as = (component, module, work, tmp, data_name if external_data else None, seed, storage_dtype)
        report = _write_and_verify(graph, *written_as)
        if not report["ok"] and cached:  # a stale entry the key did not tell apart: trace afresh, replace it
            trace_cache.evict(cache, key)
            report = _write_and_verify(trace(), *written_as)
        if not report["ok"]:
            raise ExportError(f"{component.name}: exported graph differs from the reference: {report}")
        report["storage"] = storage
        if external_data:
            os.replace(work / data_name, path.parent / data_name)
            report["external_data"] = [data_name]
        elif (path.parent / data_name).exists():  # a stale side file of an earlier export
            (path.parent / data_name).unlink()
        os.replace(tmp, path)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_and_verify(graph, component: Component, module, work: Path, tmp: Path, data_name: str | None, seed: int,
                      storage) -> dict:
    """Write ``module``'s weights into the traced ``graph`` (in ``work``; ``data_name``: the external-data file or
    None), save it as ``tmp``, check it and verify it against ``module``; the verification report."""
    import onnx

    from illume_rt.export import streaming

    streaming.write_weights(graph, module, work, data_name, storage)
    model = streaming.serialize(graph)
    del graph
    model.ir_version = ONNX_IR_VERSION
    _name_dims(model, component)
    onnx.save(model, str(tmp))
    del model
    onnx.checker.check_model(str(tmp))  # by path: the checker reads the data file as ORT will
    return _verify(component, module, tmp, seed, storage)


def _verify(component: Component, module, path: Path, seed: int, storage) -> dict:
    from illume_rt.export import streaming

    lazy = streaming.lazy_bytes(module)
    if lazy <= FULL_VERIFY_BYTES:
        with streaming.materialized(module, storage):
            report = verify_onnx(component, module, path, seed=seed)
        report["method"] = "full"
        return report
    if component.verify_at_size is not None:
        report = component.verify_at_size(path, seed, storage)
        report.setdefault("method", "sampled")
        return report
    return {"ok": True, "method": "none", "cases": [], "worst_cosine": None, "worst_max_abs_err": None,
            "note": f"not compared with PyTorch at export: {lazy / 2**30:.1f} GiB of weights exceed the "
                    f"{FULL_VERIFY_BYTES / 2**30:.1f} GiB verification budget and this graph has no sampled check"}


def _dynamic_shapes(component: Component, module):
    """torch.export's dynamic_shapes in the structure of ``module.forward``'s arguments: one entry per named
    parameter, and one tuple for a trailing ``*args`` (the llm's per-layer cache inputs)."""
    import inspect

    import torch

    axes = [{i: torch.export.Dim.DYNAMIC for i, d in enumerate(spec.shape) if isinstance(d, str)} or None
            for spec in component.inputs]
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        named = len(params) - 1
        return (*axes[:named], tuple(axes[named:]))
    return tuple(axes)


def _name_dims(model, component: Component) -> None:
    """Give graph inputs/outputs the descriptor's symbolic dim names (the exporter invents its own)."""
    by_name = {t.name: t for t in (*component.inputs, *component.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        spec = by_name.get(value.name)
        if spec is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, spec.shape):
            if isinstance(want, str):
                dim.ClearField("dim_value")
                dim.dim_param = want


def verify_onnx(component: Component, module, path: Path, seed: int = 0) -> dict:
    """Run graph and reference at the export sample size and at the second size; compare every output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got_names = [o.name for o in session.get_outputs()]
    if got_names != component.output_names():
        return {"ok": False, "error": f"graph outputs {got_names} != descriptor {component.output_names()}"}
    report: dict = {"ok": True, "cases": []}
    for which in (0, 1):
        dims = component.sample_dims(which)
        arrays = component.make_inputs(dims, np.random.default_rng(seed + 1 + which))
        want = run_reference(component, module, arrays)
        got = dict(zip(got_names, session.run(None, {t.name: arrays[t.name] for t in component.inputs})))
        case = {"dims": dims, "outputs": {}}
        for name in got_names:
            figures = compare_arrays(got[name], want[name], component.tolerance)
            case["outputs"][name] = figures
            report["ok"] &= figures["ok"]
        report["cases"].append(case)
    report["worst_cosine"] = min(o.get("cosine", 0.0) for c in report["cases"] for o in c["outputs"].values())
    report["worst_max_abs_err"] = max(o.get("max_abs_err", math.inf) for c in report["cases"]
                                      for o in c["outputs"].values())
    return report

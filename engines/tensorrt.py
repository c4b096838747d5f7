"""Native TensorRT backend: engine building (``build_bundle_engines``) and the runner (``TrtEngine``,
``TrtLanguageModel``), written against TensorRT 10's Python API.

Imports of ``tensorrt`` and of cuda-python happen inside functions, so this module imports (and its pure parts are
tested) on machines without them; using the backend there raises a BackendError that says what to install.

Building (one engine per graph of the bundle):
- network from the ONNX file with TensorRT's ONNX parser; graphs holding Q/DQ nodes (INT8/FP8 recipes) are parsed
  into a STRONGLY_TYPED network, so TensorRT follows the graph's types instead of choosing its own (no precision
  flags may be set then); float graphs built at fp16/bf16 get the FP16/BF16 builder flag (weakly typed: IO stays
  float32, TensorRT may run layers in the reduced type);
- optimization profiles from ``engines.profiles.engine_profiles`` (prefill + decode for the LLM);
- ``builder_optimization_level`` (0..5, TensorRT's default 3), a workspace limit, the bundle's timing cache loaded
  before and saved after each build (atomically);
- the serialized engine written atomically under ``bundle/engines/`` and recorded in the index with its key
  (``engines.engine_cache``).

Running:
- one CUDA stream per runner; tensors bound by name (``set_input_shape``, ``set_tensor_address``); device buffers
  allocated once per tensor at the largest size the profiles allow (capped for the LLM by the request's needs) and
  grown if a larger output comes; one execution context per optimization profile;
- ``TrtLanguageModel`` keeps the KV cache in device memory [layers, 2, batch, kv_heads, capacity, head_dim]; each
  layer's cache inputs are bound to their block of it (the whole capacity, masked); decode steps replay a CUDA
  graph of the fixed-shape step (engines/decode_graph.py); after each call one strided device-to-device copy puts
  ``new_kv`` into the cache's next columns; only ``hidden`` (batch x hidden floats, what the LM head and the
  sampler need) comes back to the host.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from illume_rt.engines.base import BackendError
from illume_rt.engines.engine_cache import (
    PRECISIONS, TIMING_CACHE, DeviceInfo, EngineCacheError, EngineKey, engine_dir, find_engine, record_engine,
    rebuild_command, write_atomic,
)
from illume_rt.engines.profiles import (
    DECODE_MAX_SEQ, GRAPH_STEP_SEQ, Profile, engine_profiles, io_buffer_bytes, kv_cache_bytes, llm_shapes,
    select_profile,
)

DEFAULT_OPT_LEVEL = 3
DEFAULT_WORKSPACE = 4 << 30
ENGINE_PRECISION_ENV = "ILLUME_RT_TRT_PRECISION"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("the tensorrt backend needs TensorRT 10 (pip install 'illume-rt[tensorrt]' on a machine "
                           "with an NVIDIA GPU); use --backend ort-cpu or ort-cuda here") from None
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise BackendError(f"TensorRT {trt.__version__} is too old: this backend uses the TensorRT 10 API "
                           "(named tensors, execute_async_v3); install tensorrt>=10")
    return trt


_LOGGER = None


def _logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def current_device() -> DeviceInfo:
    from illume_rt.engines.cuda_rt import Cuda

    trt = import_tensorrt()
    name, cc = Cuda().device_properties(0)
    return DeviceInfo(trt.__version__, name, cc)


def graph_is_quantized(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def build_recipe(precision: str, opt_level: int, profiles: list[Profile], strongly_typed: bool,
                 workspace: int) -> dict:
    """Everything about a build that changes the engine, as part of its cache key."""
    return {"opt_level": opt_level, "strongly_typed": strongly_typed, "workspace": workspace,
            "profiles": [p.to_dict() for p in profiles], "precision_flags": precision_flags(precision, strongly_typed)}


def precision_flags(precision: str, strongly_typed: bool) -> list[str]:
    """Builder flags for a precision. Strongly typed networks take none (their types come from the graph)."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if strongly_typed:
        return []
    return {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "int8": [], "fp8": []}[precision]


def plan_build(bundle, name: str, precision: str, opt_level: int = DEFAULT_OPT_LEVEL,
               workspace: int = DEFAULT_WORKSPACE, device: DeviceInfo | None = None) -> tuple[EngineKey, dict]:
    """The key and build settings of one component's engine (pure: no TensorRT calls)."""
    entry = bundle.component(name)
    graph_precision = entry.get("precision", "fp32")
    quantized = graph_precision in ("int8", "fp8", "int4") or graph_is_quantized(bundle.component_path(name))
    if precision in ("int8", "fp8") and not quantized:
        raise BackendError(f"{name}: precision {precision} needs a Q/DQ graph (TensorRT 10 builds INT8/FP8 from "
                           "explicit quantization only); quantize the bundle first, or build with --precision fp16")
    profiles = engine_profiles(name, entry)
    strongly_typed = quantized
    recipe = entry.get("quantization", {}).get("recipe", "none") if quantized else "none"
    key = EngineKey(name, entry["sha256"], precision if not quantized else graph_precision, recipe,
                    build_recipe(precision, opt_level, profiles, strongly_typed, workspace), device)
    return key, {"profiles": profiles, "strongly_typed": strongly_typed, "opt_level": opt_level,
                 "workspace": workspace, "flags": precision_flags(precision, strongly_typed)}


def build_engine(onnx_path: Path, profiles: list[Profile], flags: list[str], strongly_typed: bool, opt_level: int,
                 workspace: int, timing_cache: Path | None, log: Callable[[str], None] = print) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (TensorRT 10 API)."""
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network_flags = 0
    if strongly_typed:
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for profile in profiles:
        p = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in profile.shapes.items():
            p.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build {onnx_path.name} (see the log above)")
    log(f"  built {onnx_path.name} in {time.perf_counter() - t0:.1f}s")
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def build_bundle_engines(bundle, precision: str = "fp16", opt_level: int = DEFAULT_OPT_LEVEL,
                         components: list[str] | None = None, workspace: int = DEFAULT_WORKSPACE,
                         force: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Build (or find in the cache) an engine per component; returns the index entries."""
    from illume_rt.engines.checks import check_graph_ops

    device = current_device()
    out = engine_dir(bundle.path)
    names = components or list(bundle.manifest["components"])
    built = []
    for name in names:
        key, settings = plan_build(bundle, name, precision, opt_level, workspace, device)
        path = out / key.filename()
        if path.is_file() and not force:
            log(f"{name}: cached engine {path.name}")
            record_engine(bundle.path, key, {"bytes": path.stat().st_size})
            built.append(key.to_dict())
            continue
        report = check_graph_ops(bundle.component_path(name))
        if not report.ok:
            raise BackendError(f"{name}: TensorRT {device.tensorrt_version} cannot take this graph: "
                               + "; ".join(report.errors[:5]))
        log(f"{name}: building {key.precision} (opt level {opt_level}"
            f"{', strongly typed' if settings['strongly_typed'] else ''}) for {device.describe()}")
        data = build_engine(bundle.component_path(name), settings["profiles"], settings["flags"],
                            settings["strongly_typed"], opt_level, workspace, out / TIMING_CACHE, log)
        write_atomic(path, data)
        record_engine(bundle.path, key, {"bytes": len(data),
                                         "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        built.append(key.to_dict())
    return built


# ---------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------

class TrtEngine:
    """One deserialized engine behind the ``Engine`` interface: run(feeds) -> outputs, host arrays in and out."""

    def __init__(self, name: str, entry: dict, plan: bytes, profiles: list[Profile], caps: dict | None = None):
        from illume_rt.engines.cuda_rt import Cuda, DeviceBuffer

        trt = import_tensorrt()
        self.trt, self.cuda = trt, Cuda()
        self.name, self.entry, self.profiles = name, entry, profiles
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"{name}: TensorRT could not deserialize the engine (built by another TensorRT "
                               "version?); rebuild it with `illume-rt build-engines BUNDLE`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in = [t["name"] for t in entry["inputs"]]
        if sorted(self.input_names) != sorted(want_in):
            raise BackendError(f"{name}: engine inputs {self.input_names} differ from the manifest {want_in}; "
                               "rebuild the engines")
        self.input_names = want_in
        self.output_names = [t["name"] for t in entry["outputs"]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = self.cuda.stream()
        # One context per profile: switching profiles on one context costs a synchronisation each time.
        self.contexts = []
        for index in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream)
            self.contexts.append(context)
        sizes = io_buffer_bytes(entry, profiles, caps)
        self.buffers = {n: DeviceBuffer(self.cuda, sizes.get(n) or 0) for n in names}
        self.cuda.synchronize(self.stream)

    def profile_for(self, shapes: dict, prefer: str | None = None) -> int:
        return select_profile(self.profiles, shapes, prefer)

    def enqueue(self, context, shapes: dict, addresses: dict) -> dict[str, tuple]:
        """Set input shapes and every tensor address on ``context``, launch on the stream, return output shapes."""
        for tensor, shape in shapes.items():
            if not context.set_input_shape(tensor, tuple(shape)):
                raise BackendError(f"{self.name}: TensorRT refused shape {tuple(shape)} for {tensor}")
        out_shapes = {n: tuple(context.get_tensor_shape(n)) for n in self.output_names}
        for tensor, ptr in addresses.items():
            context.set_tensor_address(tensor, ptr)
        if not context.execute_async_v3(self.stream):
            raise BackendError(f"{self.name}: TensorRT execution failed")
        return out_shapes

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        shapes = {n: tuple(np.shape(feeds[n])) for n in self.input_names}
        context = self.contexts[self.profile_for(shapes)]
        for tensor, shape in shapes.items():
            context.set_input_shape(tensor, shape)
        addresses = {}
        for tensor in self.input_names:
            array = np.ascontiguousarray(feeds[tensor], dtype=self.dtypes[tensor])
            addresses[tensor] = self.buffers[tensor].ensure(array.nbytes)
            self.cuda.h2d_async(addresses[tensor], array, self.stream)
        outs = []
        for tensor in self.output_names:
            shape = tuple(context.get_tensor_shape(tensor))
            addresses[tensor] = self.buffers[tensor].ensure(int(np.prod(shape)) * self.dtypes[tensor].itemsize)
            outs.append(np.empty(shape, self.dtypes[tensor]))
        self.enqueue(context, shapes, addresses)
        for tensor, out in zip(self.output_names, outs):
            self.cuda.d2h_async(out, addresses[tensor], self.stream)
        self.cuda.synchronize(self.stream)
        return outs

    @property
    def language_model_class(self):
        return TrtLanguageModel if self.name == "llm" else None


class DeviceKV:
    """Shape-only stand-in for ``KVCache.kv`` (the loop reads ``kv.shape``); the data lives at ``ptr``."""

    def __init__(self, shape, ptr: int) -> None:
        self.shape, self.ptr = tuple(shape), ptr


class DeviceKVCache:
    """The KV cache in device memory, same fields and layout as ``runtime.generate.KVCache``: [layers, 2, batch,
    kv_heads, capacity, head_dim], so each layer's keys (values) are one block the graph reads in place."""

    def __init__(self, kv: DeviceKV, itemsize: int) -> None:
        from illume_rt.runtime.generate import cache_input_names

        layers, _, batch, kv_heads, capacity, head_dim = kv.shape
        self.kv = kv
        self.mask = np.zeros((batch, capacity), dtype=np.int64)
        self.next_position = np.zeros(batch, dtype=np.int64)
        self.length = 0
        self.names = cache_input_names(layers)
        self.column_bytes = head_dim * itemsize
        self.block_bytes = batch * kv_heads * capacity * self.column_bytes  # one layer's keys (or values)

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

    def addresses(self) -> dict[str, int]:
        """Device address of each cache input (past_key_0, past_value_0, ...): the layer's block."""
        return {name: self.kv.ptr + i * self.block_bytes for i, name in enumerate(self.names)}

    def input_shape(self) -> tuple[int, ...]:
        """Shape of each cache input this call: the whole capacity, or zero columns while the cache is empty."""
        _, _, batch, kv_heads, capacity, head_dim = self.kv.shape
        return batch, kv_heads, capacity if self.length else 0, head_dim

    def write(self, cuda, new_kv: int, columns: int, first: int, start: int, seq: int, stream) -> None:
        """Copy columns ``first:first + seq`` of the device array ``new_kv`` [layers, 2, batch, kv_heads,
        ``columns``, head_dim] into the cache's columns ``start:start + seq`` (one strided copy)."""
        layers, _, batch, kv_heads, capacity, _ = self.kv.shape
        cb = self.column_bytes
        cuda.d2d_2d_async(self.kv.ptr + start * cb, capacity * cb, new_kv + first * cb, columns * cb, seq * cb,
                          layers * 2 * batch * kv_heads, stream)


def _language_model_base():
    from illume_rt.runtime.generate import LanguageModel

    return LanguageModel


class TrtLanguageModel(_language_model_base()):
    """``LanguageModel`` on a TensorRT body: device KV cache written in place, CUDA-graph decode steps."""

    use_cuda_graph = True

    def __init__(self, body: TrtEngine, heads, embed_tokens, llm_info, vocab) -> None:
        super().__init__(body, heads, embed_tokens, llm_info, vocab)
        self.cuda, self.stream = body.cuda, body.stream
        self.step_seq = GRAPH_STEP_SEQ
        self._kv_buffer = None
        self._graph = None  # (key, graph_exec, pinned host inputs, staging buffers)
        self._hidden = None

    def new_cache(self, batch: int, capacity: int):
        from illume_rt.engines.cuda_rt import DeviceBuffer
        from illume_rt.engines.decode_graph import bucket_capacity

        super().new_cache(batch, capacity)  # context check only (host arrays are lazily mapped, never touched)
        bucketed = bucket_capacity(capacity, self.max_context, self.step_seq) or capacity
        shape = (self.layers, 2, batch, self.kv_heads, bucketed, self.head_dim)
        size = kv_cache_bytes(bucketed, {"num_hidden_layers": self.layers, "num_key_value_heads": self.kv_heads,
                                         "head_dim": self.head_dim, "kv_dtype": str(self.kv_dtype)}, batch)
        if self._kv_buffer is None:
            self._kv_buffer = DeviceBuffer(self.cuda)
        ptr = self._kv_buffer.ensure(size)
        self.cuda.memset_async(ptr, 0, size, self.stream)  # unwritten columns must be finite (they are masked)
        return DeviceKVCache(DeviceKV(shape, ptr), self.kv_dtype.itemsize)

    def _new_kv_bytes(self, cache, seq: int) -> int:
        return 2 * self.layers * cache.batch * self.kv_heads * seq * cache.column_bytes

    def _run(self, cache, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        from illume_rt.runtime.layout import LayoutError

        start, seq = cache.length, ids.shape[1]
        if start + seq > cache.capacity:
            raise LayoutError(f"KV cache full ({cache.capacity} positions)")
        from illume_rt.engines.decode_graph import new_embeddings

        embeds = new_embeddings(self, ids)
        if (self.use_cuda_graph and start > 0 and seq <= self.step_seq
                and cache.capacity + self.step_seq <= self.max_context):
            cache.mask[:, start:start + seq] = mask
            hidden = self._graph_step(cache, start, embeds, positions, seq)
        else:
            hidden = self._dynamic_step(cache, start, embeds, mask, positions, seq)
            cache.mask[:, start:start + seq] = mask
        cache.length = start + seq
        cache.next_position = positions[:, -1] + 1
        return hidden

    def _dynamic_step(self, cache, start, embeds, mask, positions, seq) -> np.ndarray:
        """Any shape: the cache inputs are the whole capacity (none while empty); new_kv goes to a staging
        buffer and from there into the cache's next columns."""
        body: TrtEngine = self.body
        batch = embeds.shape[0]
        past = cache.input_shape()[2]
        shapes = llm_shapes(body.entry, batch, seq, past)
        index = body.profile_for(shapes, prefer="decode" if seq <= 8 and start > 0 else "prefill")
        bufs = body.buffers
        from illume_rt.runtime.generate import step_attention_mask

        host = {"inputs_embeds": embeds, "attention_mask": step_attention_mask(cache, mask),
                "position_ids": np.ascontiguousarray(positions, dtype=np.int64)}
        addresses = cache.addresses()
        addresses["new_kv"] = bufs["new_kv"].ensure(self._new_kv_bytes(cache, seq))
        for tensor, array in host.items():
            addresses[tensor] = bufs[tensor].ensure(array.nbytes)
            self.cuda.h2d_async(addresses[tensor], array, self.stream)
        hidden = np.empty((batch, embeds.shape[2]), np.float32)
        addresses["hidden"] = bufs["hidden"].ensure(hidden.nbytes)
        body.enqueue(body.contexts[index], shapes, addresses)
        cache.write(self.cuda, addresses["new_kv"], seq, 0, start, seq, self.stream)
        self.cuda.d2h_async(hidden, addresses["hidden"], self.stream)
        self.cuda.synchronize(self.stream)
        return hidden

    def _graph_step(self, cache, start, embeds, positions, seq) -> np.ndarray:
        """Fixed shape (batch, step_seq, capacity): replay the captured graph (see engines/decode_graph.py)."""
        from illume_rt.engines.decode_graph import static_step_feeds

        batch, step = embeds.shape[0], self.step_seq
        key = (batch, step, cache.capacity, cache.kv.ptr)
        if self._graph is None or self._graph["key"] != key:
            self._capture(cache, key)
        g = self._graph
        static_step_feeds(cache.mask, start, embeds, positions, step, out=g["host"])
        for tensor, pinned in g["host"].items():
            self.cuda.h2d_async(g["dev"][tensor], pinned, self.stream)
        self.cuda.launch(g["exec"], self.stream)
        cache.write(self.cuda, g["dev"]["new_kv"], step, step - seq, start, seq, self.stream)
        self.cuda.d2h_async(g["hidden"].array, g["dev"]["hidden"], self.stream)
        self.cuda.synchronize(self.stream)
        return g["hidden"].array.copy()

    def _capture(self, cache, key) -> None:
        from illume_rt.engines.cuda_rt import PinnedArray

        body: TrtEngine = self.body
        batch, step, capacity, _ = key
        self._release_graph()
        shapes = llm_shapes(body.entry, batch, step, capacity)
        index = body.profile_for(shapes, prefer="decode")
        context = body.contexts[index]
        hidden_size = self.embed_tokens.shape[1]
        pinned = {"inputs_embeds": PinnedArray(self.cuda, (batch, step, hidden_size), np.float32),
                  "attention_mask": PinnedArray(self.cuda, (batch, capacity + step), np.int64),
                  "position_ids": PinnedArray(self.cuda, (batch, step), np.int64)}
        dev = {t: body.buffers[t].ensure(p.array.nbytes) for t, p in pinned.items()}
        dev["new_kv"] = body.buffers["new_kv"].ensure(self._new_kv_bytes(cache, step))
        dev["hidden"] = body.buffers["hidden"].ensure(batch * hidden_size * 4)
        addresses = dict(dev, **cache.addresses())
        for p in pinned.values():
            p.array[...] = 0
        pinned["attention_mask"].array[:, capacity:] = 1
        for tensor, p in pinned.items():
            self.cuda.h2d_async(dev[tensor], p.array, self.stream)
        body.enqueue(context, shapes, addresses)  # one plain run first: TensorRT finishes shape-dependent setup
        self.cuda.synchronize(self.stream)
        self.cuda.begin_capture(self.stream)
        try:
            if not context.execute_async_v3(self.stream):
                raise BackendError("llm: TensorRT execution failed during CUDA graph capture")
        finally:
            graph_exec = self.cuda.end_capture(self.stream)
        self._graph = {"key": key, "exec": graph_exec, "host": {t: p.array for t, p in pinned.items()},
                       "pinned": pinned, "dev": dev, "hidden": PinnedArray(self.cuda, (batch, hidden_size), np.float32)}

    def _release_graph(self) -> None:
        if self._graph is not None:
            self.cuda.destroy_graph(self._graph["exec"])
            for p in (*self._graph["pinned"].values(), self._graph["hidden"]):
                p.free()
            self._graph = None


def open_engine(bundle, name: str, precision: str | None = None) -> TrtEngine:
    """The engine of component ``name`` built for this GPU and TensorRT version, or a BackendError naming the
    rebuild command."""
    import os

    import_tensorrt()
    entry = bundle.component(name)
    precision = precision or os.environ.get(ENGINE_PRECISION_ENV) or None
    device = current_device()
    try:
        found = find_engine(bundle.path, name, entry["sha256"], device, precision)
    except EngineCacheError as exc:
        raise BackendError(str(exc)) from None
    plan = (engine_dir(bundle.path) / found["file"]).read_bytes()
    profiles = [Profile.from_dict(p) for p in found["build"]["profiles"]]
    caps = None
    if name == "llm":  # the LLM's max shapes span the whole context; size IO for one decode/prefill at a time
        ctx = bundle.llm["max_context"]
        caps = {"seq": min(ctx, 2048), "past": 0, "total": ctx + DECODE_MAX_SEQ}  # cache inputs: the device cache
    return TrtEngine(name, entry, plan, profiles, caps)


def describe_index(bundle_path) -> str:
    from illume_rt.engines.engine_cache import read_index

    return json.dumps(read_index(bundle_path), indent=1)


__all__ = ["build_bundle_engines", "open_engine", "TrtEngine", "TrtLanguageModel", "plan_build", "current_device",
           "rebuild_command", "asdict"]

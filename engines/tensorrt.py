"""Native TensorRT backend: engine building (``build_bundle_engines``, ``refit_engine``) and the runner
(``TrtEngine``, ``TrtLanguageModel``), written against TensorRT 11's Python API (also valid on 10.16; every name
and call here is checked against both real APIs by tests/test_trt_api.py).

Imports of ``tensorrt`` and of cuda-python happen inside functions, so this module imports (and its pure parts are
tested) on machines without them; using the backend there raises a BackendError that says what to install.

Building (one engine per graph of the bundle), strongly typed only:
- TensorRT 11 has no precision builder flags (FP16, BF16, INT8, FP8, ...) and no INT8 calibrator: every network is
  strongly typed, so each layer runs in the type the ONNX graph gives it. The precision therefore comes from the
  bundle: FP32 graphs build FP32 engines, ``illume-rt quantize --precision fp16|bf16 --target tensorrt`` bundles
  (ModelOpt AutoCast) build FP16/BF16 engines, INT8/FP8 bundles (Q/DQ, fp16 high precision) build INT8/FP8
  engines. The network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (required on 10.x, the
  only mode on 11.x);
- optimization profiles from ``engines.profiles.engine_profiles`` (prefill + decode for the LLM);
- ``builder_optimization_level`` (0..5, TensorRT's default 3), a workspace limit, the bundle's timing cache
  loaded before and saved after each build (atomically); ``editable_timing_cache`` sets
  ``BuilderFlag.EDITABLE_TIMING_CACHE`` (TensorRT 11's replacement for the removed algorithm selector: tactics are
  chosen by editing the cache);
- ``weight_streaming``: ``BuilderFlag.WEIGHT_STREAMING``; the runner then keeps only a budget of the weights on the
  GPU (``ILLUME_RT_TRT_WEIGHT_BUDGET`` bytes, or ``auto``), for the 7B on smaller GPUs;
- ``refittable``: ``BuilderFlag.REFIT``; ``refit_engine`` swaps in the weights of a fine-tuned graph of the same
  architecture (``Refitter`` + ``OnnxParserRefitter``) without a rebuild;
- the serialized engine written atomically under ``bundle/engines/`` and recorded in the index with its key
  (``engines.engine_cache``: graph hash, precision, recipe, build options, TensorRT major.minor, GPU).

Running:
- one CUDA stream per runner; tensors bound by name (``set_input_shape``, ``set_tensor_address``), launched with
  ``execute_async_v3``; device buffers allocated once per tensor at the largest size the profiles allow (capped
  for the LLM by the request's needs) and grown if a larger output comes; one execution context per optimization
  profile;
- ``TrtLanguageModel`` keeps the KV cache in device memory [layers, 2, batch, kv_heads, capacity, head_dim]; each
  layer's cache inputs are bound to their block of it (the whole capacity, masked); decode steps replay a CUDA
  graph of the fixed-shape step (engines/decode_graph.py); after each call one strided device-to-device copy puts
  ``new_kv`` into the cache's next columns; only ``hidden`` (batch x hidden floats, what the LM head and the
  sampler need) comes back to the host.

None of the TensorRT calls here has executed (no GPU or TensorRT library where this was written): see
docs/engines.md, "What has run where".
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from illume_rt.engines.base import BackendError
from illume_rt.engines.engine_cache import (
    PRECISIONS, TIMING_CACHE, DeviceInfo, EngineCacheError, EngineKey, engine_dir, find_engine, major_minor,
    record_engine, rebuild_command, write_atomic,
)
from illume_rt.engines.profiles import (
    DECODE_MAX_SEQ, GRAPH_STEP_SEQ, Profile, engine_profiles, io_buffer_bytes, kv_cache_bytes, llm_shapes,
    select_profile,
)

if TYPE_CHECKING:  # annotations only (tests/trt_api.py reads them to type the objects it checks)
    import tensorrt as trt

DEFAULT_OPT_LEVEL = 3
DEFAULT_WORKSPACE = 4 << 30
ENGINE_PRECISION_ENV = "ILLUME_RT_TRT_PRECISION"
WEIGHT_BUDGET_ENV = "ILLUME_RT_TRT_WEIGHT_BUDGET"  # bytes of weights kept on the GPU, or "auto"
MIN_TENSORRT = (10, 16)  # the oldest release this module was checked against (tests/test_trt_api.py)
QUANTIZED_PRECISIONS = ("int8", "fp8", "int4")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError("the tensorrt backend needs TensorRT 11 (or 10.16+): pip install 'illume-rt[tensorrt]' "
                           "on a machine with an NVIDIA GPU; use --backend ort-cpu or ort-cuda here") from None
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise BackendError(f"TensorRT {trt.__version__} is too old: this backend is written for TensorRT 11 and "
                           f"checked down to {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]}; pip install 'tensorrt>=10.16'")
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
    return DeviceInfo(major_minor(trt.__version__), name, cc)


def graph_is_quantized(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


@dataclass(frozen=True)
class BuildOptions:
    """Builder options beyond the optimization level and workspace (all part of the engine's cache key)."""
    weight_streaming: bool = False  # BuilderFlag.WEIGHT_STREAMING: run with a GPU weight budget
    refittable: bool = False  # BuilderFlag.REFIT: weights can be swapped in later (refit_engine)
    editable_timing_cache: bool = False  # BuilderFlag.EDITABLE_TIMING_CACHE

    def flags(self) -> list[str]:
        """The BuilderFlag names these options set (never a precision flag: TensorRT 11 has none)."""
        return [name for name, on in (("WEIGHT_STREAMING", self.weight_streaming), ("REFIT", self.refittable),
                                      ("EDITABLE_TIMING_CACHE", self.editable_timing_cache)) if on]


def build_recipe(opt_level: int, profiles: list[Profile], workspace: int, options: BuildOptions) -> dict:
    """Everything about a build that changes the engine, as part of its cache key."""
    return {"opt_level": opt_level, "strongly_typed": True, "workspace": workspace,
            "profiles": [p.to_dict() for p in profiles], "flags": options.flags()}


def bundle_precision(bundle) -> str:
    """The precision a bundle was made at (``quantize`` records it; an exported bundle is fp32)."""
    return (bundle.manifest.get("quantization") or {}).get("precision", "fp32")


def check_requested_precision(bundle, precision: str | None) -> None:
    """``build-engines --precision P`` only confirms the bundle's precision: TensorRT 11 takes it from the graphs."""
    if precision is None:
        return
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    have = bundle_precision(bundle)
    if precision != have:
        fix = (f"illume-rt quantize {bundle.path} --precision {precision} --target tensorrt -o "
               f"{bundle.path}-{precision}" if precision != "fp32" else "export an FP32 bundle")
        raise BackendError(f"this bundle is {have}; TensorRT builds strongly typed engines whose precision comes "
                           f"from the graphs, so make a {precision} bundle first: `{fix}`")


def plan_build(bundle, name: str, opt_level: int = DEFAULT_OPT_LEVEL, workspace: int = DEFAULT_WORKSPACE,
               device: DeviceInfo | None = None, options: BuildOptions = BuildOptions()) -> tuple[EngineKey, dict]:
    """The key and build settings of one component's engine (pure: no TensorRT calls)."""
    entry = bundle.component(name)
    precision = entry.get("precision", "fp32")
    if precision not in PRECISIONS and precision != "int4":
        raise BackendError(f"{name}: unknown precision {precision!r} in the manifest; re-export or re-quantize")
    quantized = graph_is_quantized(bundle.component_path(name))
    if precision in QUANTIZED_PRECISIONS and not quantized:
        raise BackendError(f"{name}: labelled {precision} but the graph holds no Q/DQ nodes (it would build in "
                           f"float); re-run `illume-rt quantize ... --precision {precision} --target tensorrt`")
    profiles = engine_profiles(name, entry)
    quant = entry.get("quantization") or {}
    recipe = quant.get("recipe", "none")
    key = EngineKey(name, entry["sha256"], precision, recipe, build_recipe(opt_level, profiles, workspace, options),
                    device)
    return key, {"profiles": profiles, "opt_level": opt_level, "workspace": workspace, "options": options,
                 "quantized": quantized}


def build_engine(onnx_path: Path, profiles: list[Profile], opt_level: int, workspace: int,
                 timing_cache: Path | None, options: BuildOptions = BuildOptions(),
                 log: Callable[[str], None] = print) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine."""
    trt = import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.editable_timing_cache:
        config.set_flag(trt.BuilderFlag.EDITABLE_TIMING_CACHE)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in profile.shapes.items():
            p.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(p)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"  timing cache {timing_cache} does not fit this GPU/TensorRT; building without it")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build {onnx_path.name} (see the log above)")
    log(f"  built {onnx_path.name} in {time.perf_counter() - t0:.1f}s")
    if timing_cache is not None:
        write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def build_bundle_engines(bundle, precision: str | None = None, opt_level: int = DEFAULT_OPT_LEVEL,
                         components: list[str] | None = None, workspace: int = DEFAULT_WORKSPACE,
                         force: bool = False, log: Callable[[str], None] = print,
                         options: BuildOptions = BuildOptions()) -> list[dict]:
    """Build (or find in the cache) an engine per component; returns the index entries.

    ``precision`` only confirms the bundle's (see ``check_requested_precision``)."""
    from illume_rt.engines.checks import check_graph_ops

    check_requested_precision(bundle, precision)
    trt = import_tensorrt()
    device = current_device()
    out = engine_dir(bundle.path)
    names = components or list(bundle.manifest["components"])
    built = []
    for name in names:
        key, settings = plan_build(bundle, name, opt_level, workspace, device, options)
        path = out / key.filename()
        if path.is_file() and not force:
            log(f"{name}: cached engine {path.name}")
            record_engine(bundle.path, key, {"bytes": path.stat().st_size, "tensorrt_build": trt.__version__})
            built.append(key.to_dict())
            continue
        report = check_graph_ops(bundle.component_path(name))
        if not report.ok:
            raise BackendError(f"{name}: TensorRT {device.tensorrt_version} cannot take this graph: "
                               + "; ".join(report.errors[:5]))
        flags = ", ".join(options.flags())
        log(f"{name}: building {key.precision} (strongly typed, opt level {opt_level}{', ' + flags if flags else ''})"
            f" for {device.describe()}")
        data = build_engine(bundle.component_path(name), settings["profiles"], opt_level, workspace,
                            out / TIMING_CACHE, options, log)
        write_atomic(path, data)
        record_engine(bundle.path, key, {"bytes": len(data), "tensorrt_build": trt.__version__,
                                         "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        built.append(key.to_dict())
    return built


def refit_engine(bundle, name: str, onnx_path: Path | str, log: Callable[[str], None] = print) -> dict:
    """Swap the weights of ``onnx_path`` (a fine-tuned graph of the same architecture) into the refittable engine
    of ``name``; the refitted engine replaces the old one in the cache, keyed by the new graph's hash."""
    from illume_rt.runtime.bundle import sha256_file

    trt = import_tensorrt()
    logger = _logger(trt)
    device = current_device()
    entry = bundle.component(name)
    try:
        found = find_engine(bundle.path, name, entry["sha256"], device)
    except EngineCacheError as exc:
        raise BackendError(str(exc)) from None
    if "REFIT" not in found["build"].get("flags", []):
        raise BackendError(f"the {name} engine was not built refittable; rebuild it with "
                           f"`illume-rt build-engines {bundle.path} --components {name} --refittable --force`")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine((engine_dir(bundle.path) / found["file"]).read_bytes())
    if engine is None:
        raise BackendError(f"{name}: TensorRT could not deserialize the engine; rebuild it with "
                           f"`{rebuild_command(bundle.path)}`")
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
        raise BackendError(f"{name}: the weights of {onnx_path} do not fit the engine: {errors}")
    if not refitter.refit_cuda_engine():
        raise BackendError(f"{name}: TensorRT refused the refit (missing weights: {refitter.get_missing_weights()})")
    data = bytes(memoryview(engine.serialize()))
    key = EngineKey(name, sha256_file(Path(onnx_path)), found["precision"], found["recipe"], found["build"], device)
    write_atomic(engine_dir(bundle.path) / key.filename(), data)
    record_engine(bundle.path, key, {"bytes": len(data), "tensorrt_build": trt.__version__,
                                     "refitted_from": found["file"]})
    log(f"{name}: refitted from {Path(onnx_path).name} -> {key.filename()}")
    return key.to_dict()


def weight_budget_from_env() -> int | str | None:
    """``ILLUME_RT_TRT_WEIGHT_BUDGET``: bytes (``8e9`` or ``8000000000``), ``auto``, or unset (all weights)."""
    raw = os.environ.get(WEIGHT_BUDGET_ENV, "").strip()
    if not raw:
        return None
    if raw == "auto":
        return "auto"
    try:
        value = int(float(raw))
    except ValueError:
        value = -1
    if value < 0:
        raise BackendError(f"{WEIGHT_BUDGET_ENV}={raw!r}: give a number of bytes (e.g. 8e9) or 'auto'")
    return value


def apply_weight_budget(engine: trt.ICudaEngine, name: str, budget: int | str | None) -> int | None:
    """Set the GPU weight budget of a weight-streaming engine before its contexts are created."""
    if budget is None:
        return None
    streamable = engine.streamable_weights_size
    if streamable <= 0:
        raise BackendError(f"{name}: {WEIGHT_BUDGET_ENV} is set but the engine was not built for weight streaming; "
                           "rebuild with `illume-rt build-engines BUNDLE --weight-streaming --force`")
    value = engine.get_weight_streaming_automatic_budget() if budget == "auto" else min(int(budget), streamable)
    engine.weight_streaming_budget_v2 = int(value)
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------------

class TrtEngine:
    """One deserialized engine behind the ``Engine`` interface: run(feeds) -> outputs, host arrays in and out."""

    engine: trt.ICudaEngine
    contexts: list[trt.IExecutionContext]

    def __init__(self, name: str, entry: dict, plan: bytes, profiles: list[Profile], caps: dict | None = None,
                 weight_budget: int | str | None = None):
        from illume_rt.engines.cuda_rt import Cuda, DeviceBuffer

        trt = import_tensorrt()
        self.trt, self.cuda = trt, Cuda()
        self.name, self.entry, self.profiles = name, entry, profiles
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"{name}: TensorRT could not deserialize the engine (built by another TensorRT "
                               "version?); rebuild it with `illume-rt build-engines BUNDLE --force`")
        self.weight_budget = apply_weight_budget(self.engine, name, weight_budget)  # before any context
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
        self.stream_handle = self.cuda.handle(self.stream)  # TensorRT takes the cudaStream_t as an integer
        # One context per profile: switching profiles on one context costs a synchronisation each time.
        self.contexts = []
        for index in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            if context is None:
                raise BackendError(f"{name}: TensorRT could not create an execution context (out of GPU memory?"
                                   f"{' lower ' + WEIGHT_BUDGET_ENV if self.weight_budget else ''})")
            if not context.set_optimization_profile_async(index, self.stream_handle):
                raise BackendError(f"{name}: TensorRT refused optimization profile {index}")
            self.contexts.append(context)
        sizes = io_buffer_bytes(entry, profiles, caps)
        self.buffers = {n: DeviceBuffer(self.cuda, sizes.get(n) or 0) for n in names}
        self.cuda.synchronize(self.stream)

    def profile_for(self, shapes: dict, prefer: str | None = None) -> int:
        return select_profile(self.profiles, shapes, prefer)

    def enqueue(self, context: trt.IExecutionContext, shapes: dict, addresses: dict) -> dict[str, tuple]:
        """Set input shapes and every tensor address on ``context``, launch on the stream, return output shapes."""
        for tensor, shape in shapes.items():
            if not context.set_input_shape(tensor, tuple(shape)):
                raise BackendError(f"{self.name}: TensorRT refused shape {tuple(shape)} for {tensor}")
        out_shapes = {n: tuple(context.get_tensor_shape(n)) for n in self.output_names}
        for tensor, ptr in addresses.items():
            if not context.set_tensor_address(tensor, int(ptr)):
                raise BackendError(f"{self.name}: TensorRT refused the address of {tensor}")
        if not context.execute_async_v3(self.stream_handle):
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
        self.logits_buffers: dict = {}  # the heads' host output buffers, per call (as KVCache)
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
            if not context.execute_async_v3(body.stream_handle):
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


def open_engine(bundle, name: str, precision: str | None = None,
                weight_budget: int | str | None = None) -> TrtEngine:
    """The engine of component ``name`` built for this GPU and TensorRT version, or a BackendError naming the
    rebuild command. ``weight_budget`` (default: ``ILLUME_RT_TRT_WEIGHT_BUDGET``) applies to weight-streaming
    engines."""
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
    budget = weight_budget
    if budget is None and "WEIGHT_STREAMING" in found["build"].get("flags", []):
        budget = weight_budget_from_env()  # the variable applies to the engines built for weight streaming
    return TrtEngine(name, entry, plan, profiles, caps, budget)


def describe_index(bundle_path) -> str:
    from illume_rt.engines.engine_cache import read_index

    return json.dumps(read_index(bundle_path), indent=1)


__all__ = ["build_bundle_engines", "refit_engine", "open_engine", "TrtEngine", "TrtLanguageModel", "plan_build",
           "BuildOptions", "current_device", "rebuild_command", "asdict"]

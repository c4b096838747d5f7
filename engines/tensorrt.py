"""TensorRT at run time: ``open_engine`` (the engine built for this GPU, from the bundle's engine cache), the runner
``TrtEngine`` and ``TrtStep`` (the LLM body's step with a device KV cache), written against TensorRT 11's Python API
(also valid on 10.16; every name and call here is checked against both real APIs by tests/test_trt_api.py).
Building engines is build-time tooling: engines/tensorrt_build.py.

Imports of ``tensorrt`` and of cuda-python happen inside functions, so this module imports (and its pure parts are
tested) on machines without them; using the backend there raises a BackendError that says what to install.

Running:
- one CUDA stream per runner; tensors bound by name (``set_input_shape``, ``set_tensor_address``), launched with
  ``execute_async_v3``; device buffers allocated once per tensor at the largest size the profiles allow (capped
  for the LLM by the request's needs) and grown if a larger output comes; one execution context per optimization
  profile;
- ``weight_streaming`` engines keep only a budget of the weights on the GPU (``ILLUME_RT_TRT_WEIGHT_BUDGET`` bytes,
  or ``auto``), for the 7B on smaller GPUs;
- ``TrtStep`` keeps the KV cache in device memory [layers, 2, batch, kv_heads, capacity, head_dim]; each layer's
  cache inputs are bound to their block of it (the whole capacity, masked); decode steps replay a CUDA graph of the
  fixed-shape step (engines/decode_graph.py); after each call one strided device-to-device copy puts ``new_kv``
  into the cache's next columns; only ``hidden`` (batch x seq x hidden floats: the new positions' states, what
  the LM head and the sampler need) comes back to the host.

None of the TensorRT calls here has executed (no GPU or TensorRT library where this was written): see
docs/engines.md, "What has run where".
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping

import numpy as np

from illume_rt.contract import ATTENTION_MASK, DECODE_MAX_SEQ, HIDDEN, INPUTS_EMBEDS, NEW_KV, POSITION_IDS
from illume_rt.engines.base import BackendError
from illume_rt.engines.engine_cache import DeviceInfo, EngineCacheError, engine_dir, find_engine, major_minor
from illume_rt.engines.llm_step import DeviceKV, DeviceKVCache, host_feeds
from illume_rt.engines.profiles import (GRAPH_STEP_SEQ, Profile, io_buffer_bytes, kv_cache_bytes, llm_shapes,
                                        select_profile)

if TYPE_CHECKING:  # annotations only (tests/trt_api.py reads them to type the objects it checks)
    import tensorrt as trt

WEIGHT_BUDGET_ENV = "ILLUME_RT_TRT_WEIGHT_BUDGET"  # bytes of weights kept on the GPU, or "auto"
MIN_TENSORRT = (10, 16)  # the oldest release this module was checked against (tests/test_trt_api.py)


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

    def language_step(self, dims) -> "TrtStep":
        """The LLM body's step with the cache on the GPU (engines/llm_step.py)."""
        if self.name != "llm":
            raise BackendError(f"{self.name} is not the LLM body")
        return TrtStep(self, dims)


class TrtStep:
    """The LLM body step on a TensorRT engine (engines/llm_step.py): device KV cache written in place, CUDA-graph
    decode steps."""

    use_cuda_graph = True

    def __init__(self, body: TrtEngine, dims) -> None:
        self.body, self.dims = body, dims
        self.cuda, self.stream = body.cuda, body.stream
        self.step_seq = GRAPH_STEP_SEQ
        self._kv_buffer = None
        self._graph = None  # (key, graph_exec, pinned host inputs, staging buffers)

    def new_cache(self, batch: int, capacity: int) -> DeviceKVCache:
        from illume_rt.engines.cuda_rt import DeviceBuffer
        from illume_rt.engines.decode_graph import bucket_capacity

        d = self.dims
        bucketed = bucket_capacity(capacity, d.max_context, self.step_seq) or capacity
        shape = d.shape(batch, bucketed)
        size = kv_cache_bytes(bucketed, {"num_hidden_layers": d.layers, "num_key_value_heads": d.kv_heads,
                                         "head_dim": d.head_dim, "kv_dtype": str(d.dtype)}, batch)
        if self._kv_buffer is None:
            self._kv_buffer = DeviceBuffer(self.cuda)
        ptr = self._kv_buffer.ensure(size)
        self.cuda.memset_async(ptr, 0, size, self.stream)  # unwritten columns must be finite (they are masked)
        return DeviceKVCache(DeviceKV(shape, ptr), d.dtype.itemsize)

    def _new_kv_bytes(self, cache, seq: int) -> int:
        return 2 * self.dims.layers * cache.batch * self.dims.kv_heads * seq * cache.column_bytes

    def run_step(self, cache, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        start, seq = cache.length, embeds.shape[1]
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if (self.use_cuda_graph and start > 0 and seq <= self.step_seq
                and cache.capacity + self.step_seq <= self.dims.max_context):
            return self._graph_step(cache, start, embeds, positions, seq)
        return self._dynamic_step(cache, start, embeds, mask, positions, seq)

    def _dynamic_step(self, cache, start, embeds, mask, positions, seq) -> np.ndarray:
        """Any shape: the cache inputs are the whole capacity (none while empty); new_kv goes to a staging
        buffer and from there into the cache's next columns."""
        body: TrtEngine = self.body
        batch = embeds.shape[0]
        past = cache.input_shape()[2]
        shapes = llm_shapes(body.entry, batch, seq, past)
        index = body.profile_for(shapes, prefer="decode" if seq <= DECODE_MAX_SEQ and start > 0 else "prefill")
        bufs = body.buffers
        host = host_feeds(cache, embeds, mask, positions)
        addresses = cache.addresses()
        addresses[NEW_KV] = bufs[NEW_KV].ensure(self._new_kv_bytes(cache, seq))
        for tensor, array in host.items():
            addresses[tensor] = bufs[tensor].ensure(array.nbytes)
            self.cuda.h2d_async(addresses[tensor], array, self.stream)
        hidden = np.empty((batch, seq, embeds.shape[2]), np.float32)
        addresses[HIDDEN] = bufs[HIDDEN].ensure(hidden.nbytes)
        body.enqueue(body.contexts[index], shapes, addresses)
        cache.write(self.cuda, addresses[NEW_KV], seq, 0, start, seq, self.stream)
        self.cuda.d2h_async(hidden, addresses[HIDDEN], self.stream)
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
        cache.write(self.cuda, g["dev"][NEW_KV], step, step - seq, start, seq, self.stream)
        self.cuda.d2h_async(g["hidden"].array, g["dev"][HIDDEN], self.stream)
        self.cuda.synchronize(self.stream)
        return g["hidden"].array[:, step - seq:].copy()  # the real positions (right-aligned)

    def _capture(self, cache, key) -> None:
        from illume_rt.engines.cuda_rt import PinnedArray

        body: TrtEngine = self.body
        batch, step, capacity, _ = key
        self._release_graph()
        shapes = llm_shapes(body.entry, batch, step, capacity)
        index = body.profile_for(shapes, prefer="decode")
        context = body.contexts[index]
        hidden_size = self.body.entry["inputs"][0]["shape"][2]  # inputs_embeds [batch, seq, hidden]
        pinned = {INPUTS_EMBEDS: PinnedArray(self.cuda, (batch, step, hidden_size), np.float32),
                  ATTENTION_MASK: PinnedArray(self.cuda, (batch, capacity + step), np.int64),
                  POSITION_IDS: PinnedArray(self.cuda, (batch, step), np.int64)}
        dev = {t: body.buffers[t].ensure(p.array.nbytes) for t, p in pinned.items()}
        dev[NEW_KV] = body.buffers[NEW_KV].ensure(self._new_kv_bytes(cache, step))
        dev[HIDDEN] = body.buffers[HIDDEN].ensure(batch * step * hidden_size * 4)
        addresses = dict(dev, **cache.addresses())
        for p in pinned.values():
            p.array[...] = 0
        pinned[ATTENTION_MASK].array[:, capacity:] = 1
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
                       "pinned": pinned, "dev": dev,
                       "hidden": PinnedArray(self.cuda, (batch, step, hidden_size), np.float32)}

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

"""The seam between the decoding loop and a backend: a KV cache and one step of the LLM body.

The loop (runtime/generate.py ``LanguageModel``) owns the bookkeeping: embeddings, positions, the capacity check,
and after each step the cache's mask, length and next positions. A backend owns where the cache lives and how a
step runs: ``new_cache(batch, capacity)`` and ``run_step(cache, embeds, mask, positions) -> hidden``, which writes
the new keys/values into the cache's columns ``cache.length : cache.length + seq`` and touches nothing else.

- ``HostStep``: any ``Engine`` (onnxruntime on CPU, or a wrapper of one) with the cache in host memory:
  ``KVCache``. Each layer's keys (values) are handed to the graph as they lie, over the whole capacity with the
  unwritten columns masked, so nothing copies the cache; each step writes only its new columns.
- engines/decode_graph.py ``StaticHostStep``: the fixed-shape step of the CUDA-graph path, on any engine.
- engines/ort_cuda.py ``OrtCudaStep`` and engines/tensorrt.py ``TrtStep``: the cache on the GPU
  (``DeviceKVCache``, same layout), written in place by a device copy.

An engine that brings its own step has ``language_step(dims)``; ``language_step`` below picks it, or the host step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from illume_rt.contract import (ATTENTION_MASK, INPUTS_EMBEDS, POSITION_IDS, LayoutError, cache_input_names)
from illume_rt.engines.base import Engine


@dataclass(frozen=True)
class CacheDims:
    """The KV cache's shape per row and column (contract.KV_CACHE_LAYOUT), from the manifest's ``llm`` entry."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype
    max_context: int

    @classmethod
    def from_llm_info(cls, llm: dict) -> "CacheDims":
        return cls(llm["num_hidden_layers"], llm["num_key_value_heads"], llm["head_dim"],
                   np.dtype(llm.get("kv_dtype", "float32")), llm["max_context"])

    def shape(self, batch: int, capacity: int) -> tuple[int, ...]:
        return self.layers, 2, batch, self.kv_heads, capacity, self.head_dim

    def check_capacity(self, capacity: int) -> None:
        if capacity > self.max_context:
            raise LayoutError(f"this request needs {capacity} positions but the model's context is "
                              f"{self.max_context}; shorten the prompt or choose a smaller resolution")


class CacheState:
    """What the loop keeps per cache row, wherever the keys and values live: which columns are written (mask),
    how many (length), the next position of each row, and the heads' output buffers of this call (per cache,
    i.e. per call, so threads never share one)."""

    def __init__(self, batch: int, capacity: int) -> None:
        self.mask = np.zeros((batch, capacity), dtype=np.int64)
        self.next_position = np.zeros(batch, dtype=np.int64)
        self.length = 0
        self.logits_buffers: dict[tuple[str, int], np.ndarray] = {}

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def rewind(self, length: int) -> None:
        """Forget the columns from ``length`` on (drafted tokens that verification rejected): their mask goes to 0
        and every row's next position back by as many, so the next step overwrites them. Keys and values stay
        where they are (masked columns get exactly zero attention), on every backend."""
        dropped = self.length - length
        if not 0 <= dropped <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} columns to {length}")
        self.mask[:, length:self.length] = 0
        self.next_position = self.next_position - dropped
        self.length = length

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


class KVCache(CacheState):
    """Keys/values of every layer in host memory: ``kv`` [layers, 2, batch, kv_heads, capacity, head_dim]."""

    def __init__(self, dims: CacheDims, batch: int, capacity: int) -> None:
        super().__init__(batch, capacity)
        # np.zeros maps untouched pages lazily: memory grows with the filled length, not the capacity.
        self.kv = np.zeros(dims.shape(batch, capacity), dtype=dims.dtype)
        self.names = cache_input_names(dims.layers)
        self._views = [self.kv[layer, kind] for layer in range(dims.layers) for kind in range(2)]

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.mask.nbytes

    def inputs(self) -> dict[str, np.ndarray]:
        """The graph's cache inputs: every layer over the whole capacity; none (zero columns) while empty."""
        if self.length == 0:
            return {name: view[:, :, :0] for name, view in zip(self.names, self._views)}
        return dict(zip(self.names, self._views))

    def fill(self, length: int, value: float = 0.01) -> None:
        """Mark the first ``length`` columns written, with ``value`` (benchmarks: real pages, no prefill)."""
        self.kv[..., :length, :] = value
        self.mask[:, :length] = 1
        self.length = length
        self.next_position[:] = length


class DeviceKV:
    """Shape-only stand-in for ``KVCache.kv`` (the loop reads ``kv.shape``); the data lives at ``ptr``."""

    def __init__(self, shape, ptr: int) -> None:
        self.shape, self.ptr = tuple(shape), ptr


class DeviceKVCache(CacheState):
    """The KV cache in device memory (GPU backends), same layout as ``KVCache``: [layers, 2, batch, kv_heads,
    capacity, head_dim], so each layer's keys (values) are one block the graph reads in place."""

    def __init__(self, kv: DeviceKV, itemsize: int) -> None:
        layers, _, batch, kv_heads, capacity, head_dim = kv.shape
        super().__init__(batch, capacity)
        self.kv = kv
        self.names = cache_input_names(layers)
        self.column_bytes = head_dim * itemsize
        self.block_bytes = batch * kv_heads * capacity * self.column_bytes  # one layer's keys (or values)

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


def step_attention_mask(cache: CacheState, mask: np.ndarray) -> np.ndarray:
    """The graph's ``attention_mask`` for a step adding positions with ``mask`` [batch, seq]: the cache's columns
    (its whole capacity once it holds anything, none while empty; unwritten ones are 0), then the new ones."""
    cached = cache.mask if cache.length else cache.mask[:, :0]
    return np.concatenate([cached, np.asarray(mask, dtype=np.int64)], axis=1)


def host_feeds(cache: CacheState, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict:
    """The body graph's inputs other than the cache."""
    return {INPUTS_EMBEDS: np.ascontiguousarray(embeds, dtype=np.float32),
            ATTENTION_MASK: step_attention_mask(cache, mask),
            POSITION_IDS: np.ascontiguousarray(positions, dtype=np.int64)}


class HostStep:
    """The body on any ``Engine`` with the cache in host memory (module docstring)."""

    def __init__(self, body: Engine, dims: CacheDims) -> None:
        self.body, self.dims = body, dims

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.dims, batch, capacity)

    def run_step(self, cache: KVCache, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        start, seq = cache.length, embeds.shape[1]
        hidden, new_kv = self.body.run({**host_feeds(cache, embeds, mask, positions), **cache.inputs()})
        cache.kv[..., start:start + seq, :] = new_kv
        return hidden


def language_step(body: Engine, dims: CacheDims):
    """The step a body engine brings (``language_step(dims)``: device caches), or the host step."""
    own = getattr(body, "language_step", None)
    return own(dims) if own is not None else HostStep(body, dims)

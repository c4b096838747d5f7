"""The fixed-shape decode step that a CUDA graph can replay.

A CUDA graph replays kernels with the shapes and addresses they were captured with. Every decode step already
passes the cache's whole capacity (docs/bundle-format.md), so only the number of new positions varies; this plan
fixes that too:

- the cache inputs (``past_key_<i>``/``past_value_<i>``) are the cache's whole (bucketed) capacity ``P`` -- the same
  device addresses and shapes each step. Columns not yet written are zeros (the cache is zeroed once when
  allocated) and their ``attention_mask`` columns are 0, so they get exactly zero attention weight.
- the step always has ``S`` new positions (GRAPH_STEP_SEQ): the real ones are right-aligned, the leading padding
  positions have mask 0 (no real query attends to them) and their outputs are dropped: ``hidden`` [batch, S,
  hidden] keeps its last ``seq`` positions, the real ones.
- ``new_kv`` goes to a fixed staging buffer; after the replay one strided device-to-device copy moves its last
  ``seq`` columns to the cache's columns ``start:start + seq``.

Cost: the GEMMs see ``S`` rows instead of 1-4.
Decode is bound by reading the weights, so both are small (3B, 512x512 with guidance: P ~ 1.4k rows x 36 KiB x 2
rows ~ 0.1 GB per step against ~6 GB of bf16 weights). A request with a different bucket recaptures once.

``static_step_feeds`` below is the host-side part, shared by the TensorRT step and by ``StaticHostStep``, which
runs the same plan on any engine with a host cache so that the equivalence is tested on any machine.
"""

from __future__ import annotations

import numpy as np

from illume_rt.contract import ATTENTION_MASK, INPUTS_EMBEDS, POSITION_IDS
from illume_rt.engines.llm_step import HostStep, KVCache
from illume_rt.engines.profiles import GRAPH_STEP_SEQ

CAPACITY_BUCKET = 64


def bucket_capacity(capacity: int, max_context: int, step: int = GRAPH_STEP_SEQ) -> int | None:
    """Capacity rounded up to a bucket (so requests of similar length share one captured graph), or None when the
    fixed-shape step would not fit the context (then the runtime uses the plain dynamic-shape step)."""
    bucketed = -(-capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET
    if bucketed + step > max_context:
        bucketed = capacity
    return bucketed if bucketed + step <= max_context else None


def static_step_feeds(cache_mask: np.ndarray, start: int, embeds: np.ndarray, positions: np.ndarray,
                      step: int, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Host inputs of one fixed-shape step (all but the cache). ``cache_mask`` is [batch, P] with the filled
    columns set; ``embeds`` [batch, seq, hidden] and ``positions`` [batch, seq] are the real new positions.
    ``out`` holds preallocated (pinned) arrays to fill in place."""
    batch, seq, hidden = embeds.shape
    capacity = cache_mask.shape[1]
    if seq > step:
        raise ValueError(f"a fixed-shape step takes at most {step} new positions, got {seq}")
    if out is None:
        out = {INPUTS_EMBEDS: np.empty((batch, step, hidden), np.float32),
               ATTENTION_MASK: np.empty((batch, capacity + step), np.int64),
               POSITION_IDS: np.empty((batch, step), np.int64)}
    pad = step - seq
    out[INPUTS_EMBEDS][:, :pad] = 0.0
    out[INPUTS_EMBEDS][:, pad:] = embeds
    mask = out[ATTENTION_MASK]
    mask[:, :capacity] = cache_mask
    mask[:, start:capacity] = 0  # rows not written yet (also stale rows of an earlier request)
    mask[:, capacity:capacity + pad] = 0
    mask[:, capacity + pad:] = 1
    out[POSITION_IDS][:, :pad] = positions[:, :1]
    out[POSITION_IDS][:, pad:] = positions
    return out


class StaticHostStep(HostStep):
    """The host step whose short decode steps use the fixed-shape plan above (host buffers, any engine).

    Exists to prove on CPU that the plan the CUDA-graph path runs gives the same tokens as the plain step."""

    step_seq = GRAPH_STEP_SEQ

    def run_step(self, cache: KVCache, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        start, seq = cache.length, embeds.shape[1]
        if start == 0 or seq > self.step_seq or cache.capacity + self.step_seq > self.dims.max_context:
            return super().run_step(cache, embeds, mask, positions)
        feeds = static_step_feeds(cache.mask, start, np.asarray(embeds, dtype=np.float32), positions, self.step_seq)
        feeds.update(cache.inputs())  # the whole capacity, every step
        hidden, new_kv = self.body.run(feeds)
        cache.kv[..., start:start + seq, :] = new_kv[..., self.step_seq - seq:, :]
        return hidden[:, self.step_seq - seq:]

"""Decoding-loop variants the benchmark compares with the runtime's own loop. Each one is the runtime's loop
(runtime/generate.py ``generate_image_tokens``) run on a ``LanguageModel`` proxy that undoes one optimisation, so
only the one thing measured differs and there is no second copy of the loop:

- ``guidance="sequential"``: the unconditional prompt in its own batch-1 cache and a second forward per step, as
  the official code does (the runtime batches both rows into one forward);
- ``head="full"``: every step computes the whole LM head (text, semantic and pixel rows) and forced structural
  tokens go through the body one at a time with a head call each (the runtime computes only the active level's
  rows and no head for forced tokens).

Also: probe grids (the first codes of each level, to time steps without decoding a whole 512x512 image) and a
step-time-versus-context sweep.
"""

from __future__ import annotations

import time

import numpy as np

from illume_rt.contract import HEADS, ImageGrid
from illume_rt.runtime.generate import ImageTokens, LanguageModel, generate_image_tokens
from illume_rt.runtime.options import SamplingConfig


def probe_grid(grid: ImageGrid, codes: int) -> ImageGrid:
    """A grid of one row of ``codes`` codes per level (structure as in ``grid``), to time a fixed number of steps
    of each level with the real prompt of ``grid``'s resolution."""
    return ImageGrid(grid.height, grid.width, 1, codes, 1, codes)


class _Proxy:
    """Passes everything to the wrapped LanguageModel; counts the body calls it makes."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm, self.body_calls = lm, 0

    def __getattr__(self, name):
        return getattr(self.lm, name)


class _RowCaches:
    """One batch-1 cache per guidance row."""

    def __init__(self, rows: list) -> None:
        self.rows, self.logits_buffers = rows, rows[0].logits_buffers


class SequentialGuidance(_Proxy):
    """Each guidance row in its own cache, a forward and a head call per row and step."""

    def new_cache(self, batch: int, capacity: int) -> _RowCaches:
        return _RowCaches([self.lm.new_cache(1, capacity) for _ in range(batch)])

    def prefill(self, cache: _RowCaches, rows: list) -> np.ndarray:
        self.body_calls += len(rows)
        return np.concatenate([self.lm.prefill(c, [r]) for c, r in zip(cache.rows, rows)])

    def step(self, cache: _RowCaches, token_ids: list[int]) -> np.ndarray:
        self.body_calls += len(cache.rows)
        return np.concatenate([self.lm.step(c, token_ids) for c in cache.rows])

    def logits(self, hidden: np.ndarray, which: str, buffers=None) -> np.ndarray:
        return np.concatenate([np.array(self.lm.logits(hidden[i:i + 1], which, buffers))
                               for i in range(hidden.shape[0])])


class FullHead(_Proxy):
    """Every head slice each step; forced tokens one per forward, each with a (discarded) full head."""

    def _full(self, hidden: np.ndarray, buffers) -> np.ndarray:
        return np.concatenate([np.array(self.lm.logits(hidden, name, buffers)) for name in HEADS], axis=1)

    def prefill(self, cache, rows: list) -> np.ndarray:
        self.body_calls += 1
        return self.lm.prefill(cache, rows)

    def step(self, cache, token_ids: list[int]) -> np.ndarray:
        for token in token_ids[:-1]:
            self._full(self.lm.step(cache, [token]), cache.logits_buffers)
        self.body_calls += len(token_ids)
        return self.lm.step(cache, token_ids[-1:])

    def logits(self, hidden: np.ndarray, which: str, buffers=None) -> np.ndarray:
        start, stop = self.lm.vocab.head_range(which)
        return self._full(hidden, buffers)[:, start:stop]


def variant_image_tokens(lm: LanguageModel, grid: ImageGrid, cond_ids: list[int], uncond_ids: list[int],
                         sampling: SamplingConfig, rng: np.random.Generator, guidance: str = "batched",
                         head: str = "active") -> ImageTokens:
    """The runtime's loop with one of its optimisations undone (see module docstring); ``steps`` counts body
    calls."""
    if guidance not in ("batched", "sequential") or head not in ("active", "full"):
        raise ValueError(f"unknown variant guidance={guidance!r} head={head!r}")
    if (guidance, head) == ("batched", "active"):
        return generate_image_tokens(lm, grid, cond_ids, uncond_ids, sampling, rng)
    proxy = counter = SequentialGuidance(lm) if guidance == "sequential" else lm
    if head == "full":
        proxy = FullHead(proxy)
        counter = counter if guidance == "sequential" else proxy  # the innermost proxy sees every body call
    tokens = generate_image_tokens(proxy, grid, cond_ids, uncond_ids, sampling, rng)
    tokens.steps = counter.body_calls
    return tokens


def step_time_at_context(lm: LanguageModel, context: int, steps: int = 6, batch: int = 2, which: str = "pixel",
                         capacity: int | None = None, warmup: int = 1) -> float:
    """Median seconds of one decode step (body + head of ``which``) with ``context`` positions already cached.
    The cache prefix is filled with small values (real pages, not the shared zero page) instead of a prefill."""
    capacity = max(capacity or 0, context + steps + warmup)
    cache = lm.new_cache(batch, capacity)
    cache.fill(context)
    token = lm.vocab.pixel_code_offset if which == "pixel" else lm.vocab.semantic_code_offset
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        hidden = lm.step(cache, [token])
        lm.logits(hidden, which, cache.logits_buffers)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fill_cache_pages(lm: LanguageModel, batch: int, capacity: int) -> int:
    """Allocate a cache of ``capacity`` positions and touch all of it, as a whole image would: returns its bytes.
    Used so that the peak-memory figure while generating covers a full cache, not the probe's small one."""
    cache = lm.new_cache(batch, capacity)
    cache.kv[...] = 0.0 + 1e-3
    cache.mask[...] = 1
    return cache.nbytes

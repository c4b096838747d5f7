"""Decoding-loop variants the benchmark compares with the runtime's own loop (runtime/generate.py), built from the
same pieces (``LanguageModel``, ``image_schedule``, ``guide``, ``choose``) so that only the one thing measured
differs:

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

from illume_rt.runtime.generate import (LEVEL_HEADS, PIXEL, SEMANTIC, ImageTokens, LanguageModel,
                                        image_schedule)
from illume_rt.runtime.layout import ImageGrid, SamplingConfig
from illume_rt.runtime.sampler import choose, guide


def probe_grid(grid: ImageGrid, codes: int) -> ImageGrid:
    """A grid of one row of ``codes`` codes per level (structure as in ``grid``), to time a fixed number of steps
    of each level with the real prompt of ``grid``'s resolution."""
    return ImageGrid(grid.height, grid.width, 1, codes, 1, codes)


def variant_image_tokens(lm: LanguageModel, grid: ImageGrid, cond_ids: list[int], uncond_ids: list[int],
                         sampling: SamplingConfig, rng: np.random.Generator, guidance: str = "batched",
                         head: str = "active") -> ImageTokens:
    """The runtime's loop with one of its optimisations undone (see module docstring)."""
    if guidance not in ("batched", "sequential") or head not in ("active", "full"):
        raise ValueError(f"unknown variant guidance={guidance!r} head={head!r}")
    vocab = lm.vocab
    guided = sampling.guidance_scale != 1.0
    rows = [cond_ids, uncond_ids] if guided else [cond_ids]
    schedule = image_schedule(vocab, grid)
    capacity = max(len(r) for r in rows) + len(schedule)
    caches = [lm.new_cache(len(rows), capacity)] if guidance == "batched" else [lm.new_cache(1, capacity)
                                                                               for _ in rows]
    offsets = {SEMANTIC: vocab.semantic_code_offset, PIXEL: vocab.pixel_code_offset}
    codes: dict[int, list[int]] = {SEMANTIC: [], PIXEL: []}
    timings = {"prefill": 0.0, "semantic": 0.0, "pixel": 0.0}

    def forward(tokens: list[int]) -> list[np.ndarray]:
        if guidance == "batched":
            return [lm.step(caches[0], tokens)]
        return [lm.step(cache, tokens) for cache in caches]

    def head_rows(hiddens: list[np.ndarray], which: str) -> np.ndarray:
        """[rows, level rows] logits; with head='full' every slice is computed and the level's cut out."""
        out = []
        for hidden in hiddens:
            if head == "active":
                out.append(np.array(lm.logits(hidden, which, caches[0].logits_buffers)))
                continue
            full = np.concatenate([lm.logits(hidden, name, caches[0].logits_buffers)
                                   for name in ("text", "semantic", "pixel")], axis=1)
            start, stop = vocab.head_range(which)
            out.append(full[:, start:stop])
        return np.concatenate(out, axis=0)

    first = next(i for i, s in enumerate(schedule) if s.level is not None)
    prompt_tail = [s.token for s in schedule[:first]]
    t0 = time.perf_counter()
    if guidance == "batched":
        hiddens = [lm.prefill(caches[0], [r + prompt_tail for r in rows])]
    else:
        hiddens = [lm.prefill(cache, [r + prompt_tail]) for cache, r in zip(caches, rows)]
    timings["prefill"] = time.perf_counter() - t0
    pending: list[int] = []
    steps, level = len(caches), SEMANTIC
    for slot in schedule[first:]:
        t0 = time.perf_counter()
        if slot.level is None and head == "active":
            pending.append(slot.token)
            continue
        if pending:
            hiddens = forward(pending)
            steps += len(caches)
        if slot.level is None:  # the naive loop: one position per forward, a head computed and discarded
            head_rows(hiddens, "text")
            pending = [slot.token]
            timings[LEVEL_HEADS[level]] += time.perf_counter() - t0
            continue
        level = slot.level
        logits = head_rows(hiddens, LEVEL_HEADS[slot.level])
        scores = guide(logits[0], logits[1] if guided else None, sampling.guidance_scale)
        temperature, top_k, top_p = sampling.level(slot.level)
        index = choose(scores, temperature, top_k, top_p, sampling.greedy, rng)
        codes[slot.level].append(index)
        pending = [offsets[slot.level] + index]
        timings[LEVEL_HEADS[slot.level]] += time.perf_counter() - t0
    semantic = np.asarray(codes[SEMANTIC], dtype=np.int64).reshape(grid.semantic_rows, grid.semantic_cols)
    pixel = np.asarray(codes[PIXEL], dtype=np.int64).reshape(grid.pixel_rows, grid.pixel_cols)
    return ImageTokens(semantic, pixel, timings, steps)


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

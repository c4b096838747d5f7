"""The decoding loop: prefill, decode steps, and the coarse-to-fine walk over an image's tokens.

Read top to bottom: ``LanguageModel`` (embedding lookup, one body step per call through the backend's step --
engines/llm_step.py owns the KV cache -- the bookkeeping after it, and the head over one row range) and
``generate_image_tokens`` (the loop, following ``contract.decode_plan``), then ``generate_text``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from illume_rt.contract import (HIDDEN, LEVEL_NAMES, LOGITS, PIXEL, SEMANTIC, ImageGrid, LayoutError, VocabLayout,
                                decode_plan)
from illume_rt.engines.base import Engine
from illume_rt.engines.llm_step import CacheDims, CacheState, KVCache, language_step
from illume_rt.runtime.options import SamplingConfig
from illume_rt.runtime.sampler import choose, guide

__all__ = ["KVCache", "LanguageModel", "ImageTokens", "generate_image_tokens", "generate_text", "SEMANTIC", "PIXEL"]


class LanguageModel:
    """The body graph (through a backend's step: engines/llm_step.py), the head slices and the embedding table."""

    def __init__(self, body: Engine, heads, embed_tokens: np.ndarray, llm_info: dict, vocab: VocabLayout) -> None:
        self.heads, self.embed_tokens, self.vocab = heads, embed_tokens, vocab
        self.dims = CacheDims.from_llm_info(llm_info)
        self.max_context = self.dims.max_context
        self.body = body

    @property
    def body(self) -> Engine:
        return self._body

    @body.setter
    def body(self, engine: Engine) -> None:
        """A new body engine brings its own step (a device cache) or gets the host one."""
        self._body = engine
        self.stepper = language_step(engine, self.dims)

    def new_cache(self, batch: int, capacity: int) -> CacheState:
        self.dims.check_capacity(capacity)
        return self.stepper.new_cache(batch, capacity)

    def prefill(self, cache: KVCache, rows: list) -> np.ndarray:
        """Left-pad rows of different lengths into one batch, run them, return the last hidden state per row.

        A row is a list of token ids, or a float32 [length, hidden] array of embeddings (prompts with spliced
        image features)."""
        longest = max(len(r) for r in rows)
        embeds = np.zeros((len(rows), longest, self.embed_tokens.shape[1]), dtype=np.float32)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, row in enumerate(rows):
            embeds[i, longest - len(row):] = row if isinstance(row, np.ndarray) else self.embed(row)
            mask[i, longest - len(row):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        return self._run(cache, embeds, mask, positions)

    def embed(self, ids) -> np.ndarray:
        return np.asarray(self.embed_tokens[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def extend(self, row, ids: list[int]):
        """A prompt row (ids, or embeddings) followed by more token ids, in the row's own form."""
        if isinstance(row, np.ndarray):
            return np.concatenate([row, self.embed(ids).reshape(len(ids), row.shape[1])])
        return list(row) + list(ids)

    def step(self, cache: KVCache, token_ids: list[int]) -> np.ndarray:
        """Feed the same tokens to every row (the guidance rows share the generated image)."""
        batch, seq = cache.batch, len(token_ids)
        embeds = np.broadcast_to(self.embed(token_ids), (batch, seq, self.embed_tokens.shape[1]))
        positions = cache.next_position[:, None] + np.arange(seq, dtype=np.int64)[None]
        return self._run(cache, embeds, np.ones((batch, seq), dtype=np.int64), positions)

    def _run(self, cache: CacheState, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One body call through the backend's step, then the bookkeeping every backend shares."""
        start, seq = cache.length, embeds.shape[1]
        if start + seq > cache.capacity:
            raise LayoutError(f"KV cache full ({cache.capacity} positions)")
        hidden = self.stepper.run_step(cache, embeds, mask, positions)
        cache.mask[:, start:start + seq] = mask
        cache.length = start + seq
        cache.next_position = positions[:, -1] + 1
        return hidden

    def logits(self, hidden: np.ndarray, which: str, buffers: dict | None = None) -> np.ndarray:
        """Logits of one head slice. With ``buffers`` (the call's ``cache.logits_buffers``) and an engine that
        accepts out=, they land in a buffer reused by the next call of the same head and batch size (the loop
        consumes them at once; copy to keep them)."""
        head = self.heads[which]
        if buffers is None or not getattr(head, "accepts_out", False):
            return head.run({HIDDEN: hidden})[0]
        key = (which, hidden.shape[0])
        buffer = buffers.get(key)
        if buffer is None:
            buffer = buffers[key] = np.empty((hidden.shape[0], self.head_rows(which)), dtype=np.float32)
        return head.run({HIDDEN: hidden}, out={LOGITS: buffer})[0]

    def head_rows(self, which: str) -> int:
        start, stop = self.vocab.head_range(which)
        return stop - start


@dataclass
class ImageTokens:
    semantic: np.ndarray  # [sem_rows, sem_cols] code indices
    pixel: np.ndarray  # [pix_rows, pix_cols]
    timings: dict = field(default_factory=dict)
    steps: int = 0  # body-graph calls


def generate_image_tokens(lm: LanguageModel, grid: ImageGrid, cond_ids: list[int], uncond_ids: list[int],
                          sampling: SamplingConfig, rng: np.random.Generator,
                          on_token: Callable[[int], None] | None = None) -> ImageTokens:
    """Coarse-to-fine decoding of one image with guidance batched as two rows of each forward."""
    vocab = lm.vocab
    guided = sampling.guidance_scale != 1.0
    rows = [cond_ids, uncond_ids] if guided else [cond_ids]
    plan = decode_plan(grid)
    cache = lm.new_cache(len(rows), max(len(r) for r in rows) + grid.num_tokens)
    codes: dict[int, list[int]] = {SEMANTIC: [], PIXEL: []}
    timings = {"prefill": 0.0, "semantic": 0.0, "pixel": 0.0}

    # The forced tokens before the first code go with the prompt; then each body call feeds the code sampled last
    # and the forced tokens up to the next code (contract.decode_plan): no head runs for a forced position.
    t0 = time.perf_counter()
    hidden = lm.prefill(cache, [lm.extend(r, [vocab.token_id(t) for t in plan.prefix]) for r in rows])
    timings["prefill"] = time.perf_counter() - t0
    last: list[int] = []
    calls = 1
    for step in plan.steps:
        t0 = time.perf_counter()
        feed = last + [vocab.token_id(t) for t in step.forced]
        if feed:
            hidden = lm.step(cache, feed)
            calls += 1
        logits = lm.logits(hidden, LEVEL_NAMES[step.level], cache.logits_buffers)
        scores = guide(logits[0], logits[1] if guided else None, sampling.guidance_scale)
        temperature, top_k, top_p = sampling.level(step.level)
        index = choose(scores, temperature, top_k, top_p, sampling.greedy, rng)
        codes[step.level].append(index)
        last = [vocab.code_offset(step.level) + index]
        timings[LEVEL_NAMES[step.level]] += time.perf_counter() - t0
        if on_token is not None:
            on_token(step.level)
    semantic = np.asarray(codes[SEMANTIC], dtype=np.int64).reshape(grid.semantic_rows, grid.semantic_cols)
    pixel = np.asarray(codes[PIXEL], dtype=np.int64).reshape(grid.pixel_rows, grid.pixel_cols)
    return ImageTokens(semantic, pixel, timings, calls)


def generate_text(lm: LanguageModel, prompt, max_new_tokens: int, greedy: bool = True,
                  rng: np.random.Generator | None = None, temperature: float = 1.0,
                  stop_ids: tuple[int, ...] = (), banned_ids: tuple[int, ...] = (),
                  on_token: Callable[[int], None] | None = None) -> list[int]:
    """Plain text decoding with the text rows of the head (``lm_head_text``), batch 1: prefill the prompt (ids, or
    embeddings with spliced image features), then one body call and one head call per new token. Greedy takes
    the argmax; otherwise a temperature-scaled sample (one uniform per token, inverse CDF). ``banned_ids`` never
    come out (image structure tokens in a text answer). Stops after ``max_new_tokens`` or at a token in
    ``stop_ids`` (included in the result); ``on_token`` sees each token as it is produced (streaming)."""
    if max_new_tokens < 1:
        return []
    if not greedy and rng is None:
        raise ValueError("sampling needs an rng (numpy Generator)")
    cache = lm.new_cache(1, len(prompt) + max_new_tokens)
    hidden = lm.prefill(cache, [prompt if isinstance(prompt, np.ndarray) else list(prompt)])
    banned = np.asarray(banned_ids, dtype=np.int64)
    out: list[int] = []
    while True:
        logits = lm.logits(hidden, "text", cache.logits_buffers)[0]
        if banned.size:
            logits = logits.copy()
            logits[banned] = -np.inf
        if greedy:
            token = int(np.argmax(logits))
        else:
            token = choose(logits, temperature, 0, 1.0, False, rng)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if len(out) == max_new_tokens or token in stop_ids:
            return out
        hidden = lm.step(cache, [token])

"""The decoding loop: KV cache, prefill, decode steps, and the coarse-to-fine image-token schedule.

Read top to bottom: ``KVCache`` (one preallocated buffer, passed without copies, written in place),
``LanguageModel`` (embedding lookup, one call of the body graph per step, the head over one row range),
``image_schedule`` (which positions of an image are forced and which are sampled) and ``generate_image_tokens``
(the loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from illume_rt.engines.base import Engine
from illume_rt.runtime.layout import ImageGrid, LayoutError, SamplingConfig, VocabLayout
from illume_rt.runtime.sampler import choose, guide

SEMANTIC, PIXEL = 0, 1
LEVEL_HEADS = {SEMANTIC: "semantic", PIXEL: "pixel"}


CACHE_INPUT_PREFIX = "past_"


def cache_input_names(layers: int) -> list[str]:
    """The llm graph's cache inputs, in order (docs/bundle-format.md): past_key_0, past_value_0, past_key_1, ..."""
    return [f"{CACHE_INPUT_PREFIX}{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def step_attention_mask(cache, mask) -> np.ndarray:
    """The graph's ``attention_mask`` for a call adding positions with ``mask`` [batch, seq]: the cache's columns
    (its whole capacity once it holds anything, none while empty; unwritten ones are 0) and then the new ones.
    Call it before the cache's mask takes the new columns. Serves every backend's cache (same fields)."""
    cached = cache.mask if cache.length else cache.mask[:, :0]
    return np.concatenate([cached, np.asarray(mask, dtype=np.int64)], axis=1)


class KVCache:
    """Keys/values of every layer for ``batch`` rows: [layers, 2, batch, kv_heads, capacity, head_dim].

    Each layer's keys (and values) are one contiguous block, handed to the graph as they lie -- over the whole
    capacity, with the columns not yet written masked -- so nothing copies the cache; each step writes only its
    new columns."""

    def __init__(self, capacity: int, layers: int, batch: int, kv_heads: int, head_dim: int,
                 dtype=np.float32) -> None:
        # np.zeros maps untouched pages lazily: memory grows with the filled length, not the capacity.
        self.kv = np.zeros((layers, 2, batch, kv_heads, capacity, head_dim), dtype=dtype)
        self.mask = np.zeros((batch, capacity), dtype=np.int64)
        self.next_position = np.zeros(batch, dtype=np.int64)
        self.length = 0
        self.names = cache_input_names(layers)
        # the heads' output buffers, reused step after step; per cache, i.e. per call, so threads never share one
        self.logits_buffers: dict[tuple[str, int], np.ndarray] = {}
        self._views = [self.kv[layer, kind] for layer in range(layers) for kind in range(2)]

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def batch(self) -> int:
        return self.kv.shape[2]

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


class LanguageModel:
    """The body graph, the three head slices and the embedding table of a bundle."""

    def __init__(self, body: Engine, heads: dict[str, Engine], embed_tokens: np.ndarray, llm_info: dict,
                 vocab: VocabLayout) -> None:
        self.body, self.heads, self.embed_tokens = body, heads, embed_tokens
        self.layers, self.kv_heads = llm_info["num_hidden_layers"], llm_info["num_key_value_heads"]
        self.head_dim, self.max_context = llm_info["head_dim"], llm_info["max_context"]
        self.vocab = vocab
        self.kv_dtype = np.dtype(llm_info.get("kv_dtype", "float32"))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        if capacity > self.max_context:
            raise LayoutError(f"this request needs {capacity} positions but the model's context is "
                              f"{self.max_context}; shorten the prompt or choose a smaller resolution")
        return KVCache(capacity, self.layers, batch, self.kv_heads, self.head_dim, self.kv_dtype)

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

    def _run(self, cache: KVCache, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        start, seq = cache.length, embeds.shape[1]
        if start + seq > cache.capacity:
            raise LayoutError(f"KV cache full ({cache.capacity} positions)")
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "attention_mask": step_attention_mask(cache, mask),
            "position_ids": np.ascontiguousarray(positions),
            **cache.inputs(),
        }
        hidden, new_kv = self.body.run(feeds)
        cache.kv[..., start:start + seq, :] = new_kv
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
            return head.run({"hidden": hidden})[0]
        key = (which, hidden.shape[0])
        buffer = buffers.get(key)
        if buffer is None:
            buffer = buffers[key] = np.empty((hidden.shape[0], self.head_rows(which)), dtype=np.float32)
        return head.run({"hidden": hidden}, out={"logits": buffer})[0]

    def head_rows(self, which: str) -> int:
        start, stop = self.vocab.head_range(which)
        return stop - start


@dataclass(frozen=True)
class Slot:
    """One position of an image: a forced token id, or a code sampled at ``level``."""

    token: int | None = None
    level: int | None = None


def image_schedule(vocab: VocabLayout, grid: ImageGrid) -> list[Slot]:
    """Every position from <start_of_image> to <end_of_image>: structure forced, codes sampled, coarse first."""
    slots = [Slot(vocab.start_of_image_id), Slot(vocab.start_of_level0_id)]
    for level, rows, cols, end in ((SEMANTIC, grid.semantic_rows, grid.semantic_cols, vocab.end_of_level0_id),
                                   (PIXEL, grid.pixel_rows, grid.pixel_cols, vocab.end_of_level1_id)):
        for _ in range(rows):
            slots += [Slot(level=level)] * cols + [Slot(vocab.end_of_line_id)]
        slots.append(Slot(end))
        if level == SEMANTIC:
            slots.append(Slot(vocab.start_of_level1_id))
    slots.append(Slot(vocab.end_of_image_id))
    assert len(slots) == grid.num_tokens
    return slots


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
    schedule = image_schedule(vocab, grid)
    cache = lm.new_cache(len(rows), max(len(r) for r in rows) + len(schedule))
    codes: dict[int, list[int]] = {SEMANTIC: [], PIXEL: []}
    offsets = {SEMANTIC: vocab.semantic_code_offset, PIXEL: vocab.pixel_code_offset}
    timings = {"prefill": 0.0, "semantic": 0.0, "pixel": 0.0}

    # Forced tokens accumulate in ``pending`` and go through the body in one call just before the next sample:
    # no head runs for a position whose successor is forced.
    first = next(i for i, s in enumerate(schedule) if s.level is not None)
    pending = [s.token for s in schedule[:first]]
    t0 = time.perf_counter()
    hidden = lm.prefill(cache, [lm.extend(r, pending) for r in rows])
    timings["prefill"] = time.perf_counter() - t0
    pending, steps = [], 1
    for slot in schedule[first:]:
        if slot.level is None:
            pending.append(slot.token)
            continue
        t0 = time.perf_counter()
        if pending:
            hidden = lm.step(cache, pending)
            steps += 1
        logits = lm.logits(hidden, LEVEL_HEADS[slot.level], cache.logits_buffers)
        scores = guide(logits[0], logits[1] if guided else None, sampling.guidance_scale)
        temperature, top_k, top_p = sampling.level(slot.level)
        index = choose(scores, temperature, top_k, top_p, sampling.greedy, rng)
        codes[slot.level].append(index)
        pending = [offsets[slot.level] + index]
        timings[LEVEL_HEADS[slot.level]] += time.perf_counter() - t0
        if on_token is not None:
            on_token(slot.level)
    semantic = np.asarray(codes[SEMANTIC], dtype=np.int64).reshape(grid.semantic_rows, grid.semantic_cols)
    pixel = np.asarray(codes[PIXEL], dtype=np.int64).reshape(grid.pixel_rows, grid.pixel_cols)
    return ImageTokens(semantic, pixel, timings, steps)


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

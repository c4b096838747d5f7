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

__all__ = ["KVCache", "LanguageModel", "ImageTokens", "ImageGenerator", "TextGenerator", "LogitsProcessor",
           "generate_image_tokens", "generate_text", "SEMANTIC", "PIXEL"]


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


# A logits processor sees the scores of the next token (after guidance; the level's codebook rows for an image,
# the text rows for text) and returns the scores to sample from: (scores, level or None for text, index) -> scores.
LogitsProcessor = Callable[[np.ndarray, "int | None", int], np.ndarray]


class ImageGenerator:
    """Step-wise decoding of one image, for hosts that own the loop (shaped like onnxruntime-genai's generator):
    ``while not g.done: g.generate_next()``, or ``g.compute_logits()`` then ``g.append(code)`` with a code the host
    chose. Guidance rows ride in one batch; structure tokens are forced (contract.decode_plan) and never offered.
    ``generate_image_tokens`` is this object run to the end: there is one loop."""

    def __init__(self, lm: LanguageModel, grid: ImageGrid, cond_ids, uncond_ids, sampling: SamplingConfig,
                 rng: np.random.Generator, logits_processor: LogitsProcessor | None = None) -> None:
        self.lm, self.grid, self.sampling, self.rng = lm, grid, sampling, rng
        self.logits_processor = logits_processor
        self.guided = sampling.guidance_scale != 1.0
        self._rows = [cond_ids, uncond_ids] if self.guided else [cond_ids]
        self.plan = decode_plan(grid)
        self.cache = lm.new_cache(len(self._rows), max(len(r) for r in self._rows) + grid.num_tokens)
        self.codes: dict[int, list[int]] = {SEMANTIC: [], PIXEL: []}
        self.timings = {"prefill": 0.0, "semantic": 0.0, "pixel": 0.0}
        self.calls = 0  # body calls
        self._index = 0  # the next step of the plan
        self._last: list[int] = []  # the code appended last, as a token id (fed with the next step's forced tokens)
        self._hidden: np.ndarray | None = None  # body output for the next code, once computed
        self._scores: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self._index == len(self.plan.steps)

    @property
    def next_level(self) -> int | None:
        """SEMANTIC or PIXEL for the next code; None when done."""
        return None if self.done else self.plan.steps[self._index].level

    def _advance_body(self) -> np.ndarray:
        """Feed what precedes the next code (the prompt on the first call; then the last code and the forced
        tokens after it) in one body call; no head runs for a forced position."""
        if self._hidden is None:
            if self.done:
                raise LayoutError("the image is complete: no next code")
            vocab, t0 = self.lm.vocab, time.perf_counter()
            step = self.plan.steps[self._index]
            feed = self._last + [vocab.token_id(t) for t in step.forced]
            if self.calls == 0:
                prefix = [vocab.token_id(t) for t in self.plan.prefix]
                self._hidden = self.lm.prefill(self.cache, [self.lm.extend(r, prefix + feed) for r in self._rows])
                self.timings["prefill"] += time.perf_counter() - t0
            else:
                self._hidden = self.lm.step(self.cache, feed)
                self.timings[LEVEL_NAMES[step.level]] += time.perf_counter() - t0
            self.calls += 1
        return self._hidden

    def compute_logits(self) -> np.ndarray:
        """Scores of the next code over its level's codebook (guided, after the logits processor). The array is the
        generator's: copy it to keep it past the next append."""
        if self._scores is None:
            hidden = self._advance_body()
            t0 = time.perf_counter()
            level = self.next_level
            logits = self.lm.logits(hidden, LEVEL_NAMES[level], self.cache.logits_buffers)
            scores = guide(logits[0], logits[1] if self.guided else None, self.sampling.guidance_scale)
            if self.logits_processor is not None:
                scores = self.logits_processor(scores, level, len(self.codes[level]))
            self._scores = scores
            self.timings[LEVEL_NAMES[level]] += time.perf_counter() - t0
        return self._scores

    def generate_next(self) -> int:
        """Sample the next code (SamplingConfig's level settings), append it, return its index in the codebook."""
        scores = self.compute_logits()
        t0, level = time.perf_counter(), self.next_level
        temperature, top_k, top_p = self.sampling.level(level)
        index = choose(scores, temperature, top_k, top_p, self.sampling.greedy, self.rng)
        self.timings[LEVEL_NAMES[level]] += time.perf_counter() - t0
        self.append(index)
        return index

    def append(self, index: int) -> None:
        """Take ``index`` (a code of the next level, chosen by the caller or sampled) as the next code."""
        level = self.next_level
        if level is None:
            raise LayoutError("the image is complete: no next code")
        size = self.lm.vocab.semantic_codebook_size if level == SEMANTIC else self.lm.vocab.pixel_codebook_size
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < size:
            raise LayoutError(f"a {LEVEL_NAMES[level]} code is a whole number from 0 to {size - 1}, got {index!r}")
        self._advance_body()  # the positions before this code, if the caller appends without computing logits
        self.codes[level].append(int(index))
        self._last = [self.lm.vocab.code_offset(level) + int(index)]
        self._index += 1
        self._hidden = self._scores = None

    def result(self) -> ImageTokens:
        if not self.done:
            raise LayoutError(f"the image is not complete: {len(self.plan.steps) - self._index} codes to go")
        g = self.grid
        semantic = np.asarray(self.codes[SEMANTIC], dtype=np.int64).reshape(g.semantic_rows, g.semantic_cols)
        pixel = np.asarray(self.codes[PIXEL], dtype=np.int64).reshape(g.pixel_rows, g.pixel_cols)
        return ImageTokens(semantic, pixel, dict(self.timings), self.calls)


def generate_image_tokens(lm: LanguageModel, grid: ImageGrid, cond_ids: list[int], uncond_ids: list[int],
                          sampling: SamplingConfig, rng: np.random.Generator,
                          on_token: Callable[[int], None] | None = None,
                          logits_processor: LogitsProcessor | None = None) -> ImageTokens:
    """Coarse-to-fine decoding of one image with guidance batched as two rows of each forward."""
    generator = ImageGenerator(lm, grid, cond_ids, uncond_ids, sampling, rng, logits_processor)
    while not generator.done:
        level = generator.next_level
        generator.generate_next()
        if on_token is not None:
            on_token(level)
    return generator.result()


class TextGenerator:
    """Step-wise text decoding (batch 1) with the text rows of the head, for hosts that own the loop:
    ``while not g.done: g.generate_next()``; ``append(token)`` feeds a token the caller chose."""

    def __init__(self, lm: LanguageModel, prompt, max_new_tokens: int, greedy: bool = True,
                 rng: np.random.Generator | None = None, temperature: float = 1.0,
                 stop_ids: tuple[int, ...] = (), banned_ids: tuple[int, ...] = (),
                 logits_processor: LogitsProcessor | None = None) -> None:
        if not greedy and rng is None:
            raise ValueError("sampling needs an rng (numpy Generator)")
        self.lm, self.greedy, self.rng, self.temperature = lm, greedy, rng, temperature
        self.max_new_tokens, self.stop_ids = max_new_tokens, tuple(stop_ids)
        self.banned = np.asarray(banned_ids, dtype=np.int64)
        self.logits_processor = logits_processor
        self.tokens: list[int] = []
        self._prompt = prompt if isinstance(prompt, np.ndarray) else list(prompt)
        self.cache = lm.new_cache(1, len(prompt) + max(max_new_tokens, 1))
        self._hidden: np.ndarray | None = None
        self._scores: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens or bool(self.tokens and self.tokens[-1] in self.stop_ids)

    def _advance_body(self) -> np.ndarray:
        if self._hidden is None:
            if self.done:
                raise LayoutError("the text is complete (length limit or stop token)")
            self._hidden = (self.lm.step(self.cache, self.tokens[-1:]) if self.tokens
                            else self.lm.prefill(self.cache, [self._prompt]))
        return self._hidden

    def compute_logits(self) -> np.ndarray:
        """Scores of the next token over the text rows (banned ids at -inf, after the logits processor)."""
        if self._scores is None:
            logits = self.lm.logits(self._advance_body(), "text", self.cache.logits_buffers)[0]
            if self.banned.size:
                logits = logits.copy()
                logits[self.banned] = -np.inf
            if self.logits_processor is not None:
                logits = self.logits_processor(logits, None, len(self.tokens))
            self._scores = logits
        return self._scores

    def generate_next(self) -> int:
        """Greedy: the argmax; otherwise a temperature-scaled sample (one uniform per token, inverse CDF)."""
        scores = self.compute_logits()
        token = int(np.argmax(scores)) if self.greedy else choose(scores, self.temperature, 0, 1.0, False, self.rng)
        self.append(token)
        return token

    def append(self, token: int) -> None:
        rows = self.lm.head_rows("text")
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < rows:
            raise LayoutError(f"a text token is a whole number from 0 to {rows - 1}, got {token!r}")
        self._advance_body()
        self.tokens.append(int(token))
        self._hidden = self._scores = None


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
    generator = TextGenerator(lm, prompt, max_new_tokens, greedy, rng, temperature, stop_ids, banned_ids)
    while not generator.done:
        token = generator.generate_next()
        if on_token is not None:
            on_token(token)
    return generator.tokens

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

from illume_rt.contract import (DECODE_MAX_SEQ, HIDDEN, LEVEL_NAMES, LOGITS, PIXEL, SEMANTIC, ImageGrid, LayoutError,
                                VocabLayout, decode_plan)
from illume_rt.engines.base import Engine
from illume_rt.engines.llm_step import CacheDims, CacheState, KVCache, language_step
from illume_rt.runtime.options import SamplingConfig
from illume_rt.runtime.sampler import choose, guide, warp

__all__ = ["KVCache", "LanguageModel", "ImageTokens", "ImageGenerator", "TextGenerator", "LogitsProcessor",
           "generate_image_tokens", "generate_images_tokens", "generate_text", "SEMANTIC", "PIXEL"]


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
        return self._run(cache, embeds, mask, positions)[:, -1]

    def embed(self, ids) -> np.ndarray:
        return np.asarray(self.embed_tokens[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def extend(self, row, ids: list[int]):
        """A prompt row (ids, or embeddings) followed by more token ids, in the row's own form."""
        if isinstance(row, np.ndarray):
            return np.concatenate([row, self.embed(ids).reshape(len(ids), row.shape[1])])
        return list(row) + list(ids)

    def step(self, cache: KVCache, token_ids) -> np.ndarray:
        """Feed tokens and return the last new position's hidden state per row [batch, hidden]. ``token_ids``: a
        list (the same tokens for every row: the guidance rows share the generated image) or an int array
        [batch, seq] (a row's own tokens: several images in one batch)."""
        return self._feed(cache, token_ids)[:, -1]

    def verify(self, cache: KVCache, token_ids, read: list[int]) -> np.ndarray:
        """Feed tokens as ``step`` does and return the hidden states of the new positions ``read`` [batch,
        len(read), hidden]: one body call that scores several drafted tokens (speculative decoding)."""
        return self._feed(cache, token_ids)[:, read]

    def _feed(self, cache: KVCache, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        batch, seq = cache.batch, ids.shape[-1]
        embeds = self.embed(np.broadcast_to(ids, (batch, seq)))
        positions = cache.next_position[:, None] + np.arange(seq, dtype=np.int64)[None]
        return self._run(cache, embeds, np.ones((batch, seq), dtype=np.int64), positions)

    def _run(self, cache: CacheState, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One body call through the backend's step, then the bookkeeping every backend shares. Returns the
        hidden state of every new position [batch, seq, hidden]."""
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
    steps: int = 0  # body-graph calls (of the whole batch, when several images share it)
    # per level name: body calls, codes, drafted codes verified and accepted (parallel decoding)
    levels: dict = field(default_factory=dict)


# A logits processor sees the scores of the next token (after guidance; the level's codebook rows for an image,
# the text rows for text) and returns the scores to sample from: (scores, level or None for text, index) -> scores.
LogitsProcessor = Callable[[np.ndarray, "int | None", int], np.ndarray]


def _probabilities(scores: np.ndarray, temperature: float, top_k: int, top_p: float, greedy: bool) -> np.ndarray:
    """The distribution ``choose`` draws from (float64): warped softmax, or one-hot at the argmax when greedy."""
    if greedy:
        probs = np.zeros(scores.shape[0])
        probs[int(np.argmax(scores))] = 1.0
        return probs
    warped = warp(scores.astype(np.float64), temperature, top_k, top_p)
    probs = np.exp(warped - warped.max())
    return probs / probs.sum()


class ImageGenerator:
    """Step-wise decoding of one image, or of several in one batch, for hosts that own the loop (shaped like
    onnxruntime-genai's generator): ``while not g.done: g.generate_next()``, or ``g.compute_logits()`` then
    ``g.append(code)`` with a code the host chose. Guidance rows ride in one batch (the images' conditional rows,
    then their unconditional rows); structure tokens are forced (contract.decode_plan) and never offered.
    ``generate_image_tokens`` is this object run to the end: there is one loop.

    Several images (``ImageGenerator.batch``): each has its own prompt rows and random generator; they advance
    together, one body call per step for all, and image i's codes equal a run of it alone with its generator.

    Parallel decoding (``sampling.parallel_window`` k > 0): speculative Jacobi decoding (Teng et al. 2024) with the
    lossless acceptance of speculative sampling. ``generate_next`` feeds, in one body call, the last code, the
    drafts of the next codes of the same level and the forced tokens between them, and reads the hidden state
    before each of those codes: the target distributions p. Walking the drafts in order, a draft x drawn from q
    is accepted with probability min(1, p(x)/q(x)); the first rejected one is replaced by a draw from the residual
    max(0, p - q) (normalised), and if all are accepted one more code is drawn from the last p. Each code then has
    exactly the distribution of the plain loop. The cache forgets the rejected positions (``rewind``). Drafts are
    Jacobi iterates: the unverified positions of the window get new drafts distributed as this call's p there
    (their q), coupled to the old draft so that it stays where p barely moved (MC-SJD); positions never reached
    start as uniform draws over the codebook, as SJD initialises them. Greedy
    decoding accepts a draft iff it is the argmax, so it gives the plain loop's codes. With several images each
    image verifies its own drafts; the batch keeps the codes all of them reached (a choice that depends only on
    the other images' draws, so each image's distribution is unchanged)."""

    def __init__(self, lm: LanguageModel, grid: ImageGrid, cond_ids, uncond_ids, sampling: SamplingConfig,
                 rng: np.random.Generator, logits_processor: LogitsProcessor | None = None) -> None:
        self._setup(lm, grid, [(cond_ids, uncond_ids)], sampling, [rng], logits_processor)

    @classmethod
    def batch(cls, lm: LanguageModel, grid: ImageGrid, prompts: list[tuple], sampling: SamplingConfig,
              rngs: list[np.random.Generator], logits_processor: LogitsProcessor | None = None) -> "ImageGenerator":
        """Several images in one batch: ``prompts`` are (cond_ids, uncond_ids) pairs, ``rngs`` one generator each.
        ``compute_logits`` gives [images, codebook] scores, ``append`` takes one code per image, ``results`` the
        images' tokens."""
        if len(prompts) != len(rngs) or not prompts:
            raise LayoutError(f"a batch needs one random generator per prompt, got {len(prompts)} prompts and "
                              f"{len(rngs)} generators")
        generator = cls.__new__(cls)
        generator._setup(lm, grid, list(prompts), sampling, list(rngs), logits_processor)
        return generator

    def _setup(self, lm, grid, prompts, sampling, rngs, logits_processor) -> None:
        self.lm, self.grid, self.sampling, self.rngs = lm, grid, sampling, rngs
        self.rng = rngs[0]
        self.logits_processor = logits_processor
        self.images = len(prompts)
        self.guided = sampling.guidance_scale != 1.0
        self._rows = [c for c, _ in prompts] + ([u for _, u in prompts] if self.guided else [])
        self.plan = decode_plan(grid)
        self.cache = lm.new_cache(len(self._rows), max(len(r) for r in self._rows) + grid.num_tokens)
        self._codes: list[dict[int, list[int]]] = [{SEMANTIC: [], PIXEL: []} for _ in prompts]
        self.timings = {"prefill": 0.0, "semantic": 0.0, "pixel": 0.0}
        self.levels = {name: {"calls": 0, "codes": 0, "drafted": 0, "accepted": 0} for name in LEVEL_NAMES.values()}
        self.calls = 0  # body calls
        self._index = 0  # the next step of the plan
        self._last: list[list[int]] = [[] for _ in prompts]  # per image: the code appended last, as a token id
        self._hidden: np.ndarray | None = None  # body output [rows, hidden] for the next code, once computed
        self._scores: np.ndarray | None = None  # [images, codebook]
        self._fed_end: np.ndarray | None = None  # after a verify call: the cache length just after each read position
        # parallel decoding: per image, step index -> (draft code, its q over the codebook, None for uniform)
        self._drafts: list[dict[int, tuple[int, np.ndarray | None]]] = [{} for _ in prompts]

    # -- state ----------------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._index == len(self.plan.steps)

    @property
    def next_level(self) -> int | None:
        """SEMANTIC or PIXEL for the next code; None when done."""
        return None if self.done else self.plan.steps[self._index].level

    @property
    def codes(self) -> dict[int, list[int]]:
        """The codes so far by level (of the first image; ``image_codes(i)`` for others)."""
        return self._codes[0]

    @property
    def decided(self) -> int:
        """Code positions decided so far (per image)."""
        return self._index

    def image_codes(self, image: int) -> dict[int, list[int]]:
        return self._codes[image]

    def _codebook(self, level: int) -> int:
        return self.lm.vocab.semantic_codebook_size if level == SEMANTIC else self.lm.vocab.pixel_codebook_size

    # -- body calls -----------------------------------------------------------------------------------------------
    def _fed_ids(self, first: int, count: int) -> tuple[np.ndarray, list[int]]:
        """Token ids per row [rows, seq] that precede codes ``first .. first + count - 1`` of the plan: each
        image's last code, then per code its forced tokens (and, but for the last, the image's draft of it); and
        the index of the position before each of those codes."""
        vocab, per_image, read = self.lm.vocab, [], []
        for image in range(self.images):
            ids = list(self._last[image])
            for index in range(first, first + count):
                step = self.plan.steps[index]
                ids += [vocab.token_id(t) for t in step.forced]
                if image == 0:
                    read.append(len(ids) - 1)
                if index < first + count - 1:
                    ids.append(vocab.code_offset(step.level) + self._drafts[image][index][0])
            per_image.append(ids)
        rows = per_image * (len(self._rows) // self.images)
        return np.asarray(rows, dtype=np.int64), read

    def _window(self) -> int:
        """Codes the next body call decides: 1, or with parallel decoding up to ``parallel_window`` codes of the
        current level whose fed tokens fit DECODE_MAX_SEQ (the prefill call decides one)."""
        window = self.sampling.parallel_window
        if window < 2 or self.calls == 0:
            return 1
        level, width, count = self.next_level, len(self._last[0]), 0
        for step in self.plan.steps[self._index:self._index + window]:
            width += len(step.forced) + (1 if count else 0)
            if step.level != level or width > DECODE_MAX_SEQ:
                break
            count += 1
        return max(count, 1)

    def _advance_body(self, count: int = 1) -> np.ndarray:
        """Feed what precedes the next ``count`` codes in one body call (the prompt on the first call); returns the
        hidden states before each [rows, count, hidden]. No head runs for a forced position."""
        if self._hidden is None:
            if self.done:
                raise LayoutError("the image is complete: no next code")
            vocab, t0 = self.lm.vocab, time.perf_counter()
            level = self.next_level
            if count > 1:
                self._draft(self._index, count - 1)
            ids, read = self._fed_ids(self._index, count)
            if self.calls == 0:
                prefix = [vocab.token_id(t) for t in self.plan.prefix]
                rows = [self.lm.extend(r, prefix + [int(t) for t in ids[i]]) for i, r in enumerate(self._rows)]
                self._hidden = self.lm.prefill(self.cache, rows)[:, None]
                self.timings["prefill"] += time.perf_counter() - t0
            else:
                if count > 1:
                    self._hidden = self.lm.verify(self.cache, ids, read)
                elif self.images == 1:  # every row feeds the same ids: a list (what bench/loops.py proxies take)
                    self._hidden = self.lm.step(self.cache, list(ids[0]))[:, None]
                else:
                    self._hidden = self.lm.step(self.cache, ids)[:, None]
                self.timings[LEVEL_NAMES[level]] += time.perf_counter() - t0
            if count > 1:  # the cache's length just after each read position: where a rejection rewinds it to
                self._fed_end = self.cache.length - (ids.shape[1] - 1 - np.asarray(read))
            self.calls += 1
            self.levels[LEVEL_NAMES[level]]["calls"] += 1
        return self._hidden

    def _guided_scores(self, hidden: np.ndarray) -> np.ndarray:
        """Scores [images, count, codebook] of the codes after each read position (guided, processed)."""
        level = self.next_level
        rows, count, width = hidden.shape
        logits = self.lm.logits(np.ascontiguousarray(hidden.reshape(rows * count, width)), LEVEL_NAMES[level],
                                self.cache.logits_buffers).reshape(rows, count, -1)
        n = self.images
        scores = guide(logits[:n], logits[n:] if self.guided else None, self.sampling.guidance_scale)
        if self.logits_processor is not None:
            done = len(self._codes[0][level])
            scores = np.stack([np.stack([self.logits_processor(scores[i, j], level, done + j) for j in range(count)])
                               for i in range(n)])
        return scores

    # -- the step-wise API ----------------------------------------------------------------------------------------
    def compute_logits(self) -> np.ndarray:
        """Scores of the next code over its level's codebook (guided, after the logits processor): [codebook], or
        [images, codebook] for a batch. The array is the generator's: copy it to keep it past the next append."""
        if self._scores is None:
            hidden = self._advance_body()
            t0 = time.perf_counter()
            self._scores = self._guided_scores(hidden)[:, 0]
            self.timings[LEVEL_NAMES[self.next_level]] += time.perf_counter() - t0
        return self._scores[0] if self.images == 1 else self._scores

    def generate_next(self):
        """Decide the next code of every image with one body call (SamplingConfig's level settings) and append
        it; with parallel decoding, the next few codes. Returns the last code appended (one per image for a
        batch)."""
        if self.done:
            raise LayoutError("the image is complete: no next code")
        level = self.next_level
        temperature, top_k, top_p = self.sampling.level(level)
        greedy = self.sampling.greedy
        if self._scores is not None:  # the host looked first: decide that one code
            scores, count = self._scores[:, None], 1
        else:
            count = self._window()
            hidden = self._advance_body(count)
            t0 = time.perf_counter()
            scores = self._guided_scores(hidden)
            self.timings[LEVEL_NAMES[level]] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if count == 1:
            decided = [[choose(scores[i, 0], temperature, top_k, top_p, greedy, rng)]
                       for i, rng in enumerate(self.rngs)]
            targets = None
        else:
            targets = [[_probabilities(scores[i, j], temperature, top_k, top_p, greedy) for j in range(count)]
                       for i in range(self.images)]
            decided = [self._verify(i, targets[i]) for i in range(self.images)]
        kept = min(len(d) for d in decided)
        first = self._index
        if count > 1:
            self.cache.rewind(int(self._fed_end[kept - 1]))  # up to the forced tokens before the last kept code
        for j in range(kept):
            self._commit([d[j] for d in decided])
        if targets is not None:
            self._redraft(first + kept, first + count, targets, first)
        self.timings[LEVEL_NAMES[level]] += time.perf_counter() - t0
        return decided[0][kept - 1] if self.images == 1 else [d[kept - 1] for d in decided]

    def append(self, index) -> None:
        """Take ``index`` (a code of the next level, chosen by the caller or sampled; one per image for a batch)
        as the next code."""
        level = self.next_level
        if level is None:
            raise LayoutError("the image is complete: no next code")
        indices = list(index) if self.images > 1 and isinstance(index, (list, tuple, np.ndarray)) else [index]
        size = self._codebook(level)
        if len(indices) != self.images:
            raise LayoutError(f"append takes one code per image ({self.images}), got {len(indices)}")
        for code in indices:
            if isinstance(code, bool) or not isinstance(code, (int, np.integer)) or not 0 <= code < size:
                raise LayoutError(f"a {LEVEL_NAMES[level]} code is a whole number from 0 to {size - 1}, "
                                  f"got {code!r}")
        self._advance_body()  # the positions before this code, if the caller appends without computing logits
        self._commit(indices)

    def _commit(self, indices: list[int]) -> None:
        """Record one code per image; the positions before it are in the cache."""
        level = self.next_level
        for image, code in enumerate(indices):
            self._codes[image][level].append(int(code))
            self._last[image] = [self.lm.vocab.code_offset(level) + int(code)]
            self._drafts[image].pop(self._index, None)
        self.levels[LEVEL_NAMES[level]]["codes"] += 1
        self._index += 1
        self._hidden = self._scores = None

    # -- parallel decoding ----------------------------------------------------------------------------------------
    def _draft(self, first: int, count: int) -> None:
        """Make sure every image has drafts of codes ``first .. first + count - 1``: a position no call has
        reached yet starts as a uniform draw over the codebook (q = None)."""
        size = self._codebook(self.plan.steps[first].level)
        for image, rng in enumerate(self.rngs):
            drafts = self._drafts[image]
            for index in range(first, first + count):
                if index not in drafts:
                    drafts[index] = (int(rng.integers(size)), None)

    def _verify(self, image: int, targets: list[np.ndarray]) -> list[int]:
        """The lossless acceptance walk over one image's drafts (class docstring): the codes it decides, one to
        ``len(targets)``. ``targets[j]`` is p of the j-th code of the window."""
        rng, drafts, stats = self.rngs[image], self._drafts[image], self.levels[LEVEL_NAMES[self.next_level]]
        greedy, out = self.sampling.greedy, []
        for j, p in enumerate(targets[:-1]):
            code, q = drafts[self._index + j]
            q_code = 1.0 / p.shape[0] if q is None else q[code]
            stats["drafted"] += 1
            accept = p[code] == 1.0 if greedy else rng.random() * q_code < p[code]
            if accept:
                stats["accepted"] += 1
                out.append(code)
                continue
            if greedy:
                out.append(int(np.argmax(p)))
            else:
                residual = np.maximum(p - (1.0 / p.shape[0] if q is None else q), 0.0)
                out.append(_draw(residual, rng.random()))
            return out
        out.append(int(np.argmax(targets[-1])) if greedy else _draw(targets[-1], rng.random()))
        return out

    def _redraft(self, start: int, stop: int, targets: list[list[np.ndarray]], first: int) -> None:
        """The Jacobi update: codes ``start .. stop - 1`` were in the window but not decided; each gets a new draft
        with this call's p at its position as its q. The draw is coupled to the old draft (MC-SJD's maximal
        coupling): the old code stays with probability min(1, p(x)/q_old(x)), else a draw from the residual
        max(0, p - q_old). The new draft is distributed as p all the same, but stays put where p barely moved, so
        the drafts after it keep the context they were drawn in and are accepted more often."""
        greedy = self.sampling.greedy
        for image, rng in enumerate(self.rngs):
            drafts = self._drafts[image]
            for index in range(start, stop):
                p = targets[image][index - first]
                if greedy or index not in drafts:  # (the window's last code had no draft)
                    drafts[index] = (int(np.argmax(p)) if greedy else _draw(p, rng.random()), p)
                    continue
                code, q_old = drafts[index]
                q_code = 1.0 / p.shape[0] if q_old is None else q_old[code]
                if rng.random() * q_code >= p[code]:
                    code = _draw(np.maximum(p - (1.0 / p.shape[0] if q_old is None else q_old), 0.0),
                                 rng.random())
                drafts[index] = (code, p)

    # -- results --------------------------------------------------------------------------------------------------
    def result(self, image: int = 0) -> ImageTokens:
        if not self.done:
            raise LayoutError(f"the image is not complete: {len(self.plan.steps) - self._index} codes to go")
        g, codes = self.grid, self._codes[image]
        semantic = np.asarray(codes[SEMANTIC], dtype=np.int64).reshape(g.semantic_rows, g.semantic_cols)
        pixel = np.asarray(codes[PIXEL], dtype=np.int64).reshape(g.pixel_rows, g.pixel_cols)
        return ImageTokens(semantic, pixel, dict(self.timings), self.calls,
                           {name: dict(stats) for name, stats in self.levels.items()})

    def results(self) -> list[ImageTokens]:
        """Every image's tokens, in the order of the prompts."""
        return [self.result(i) for i in range(self.images)]


def _draw(probs: np.ndarray, uniform: float) -> int:
    """Inverse-CDF draw over ascending ids from non-negative weights (need not sum to 1)."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    return min(index, int(np.flatnonzero(probs)[-1]))


def generate_image_tokens(lm: LanguageModel, grid: ImageGrid, cond_ids: list[int], uncond_ids: list[int],
                          sampling: SamplingConfig, rng: np.random.Generator,
                          on_token: Callable[[int], None] | None = None,
                          logits_processor: LogitsProcessor | None = None) -> ImageTokens:
    """Coarse-to-fine decoding of one image with guidance batched as two rows of each forward."""
    return generate_images_tokens(lm, grid, [(cond_ids, uncond_ids)], sampling, [rng], on_token,
                                  logits_processor)[0]


def generate_images_tokens(lm: LanguageModel, grid: ImageGrid, prompts: list[tuple], sampling: SamplingConfig,
                           rngs: list[np.random.Generator], on_token: Callable[[int], None] | None = None,
                           logits_processor: LogitsProcessor | None = None) -> list[ImageTokens]:
    """Several images in one batch (``ImageGenerator.batch``) run to the end; ``on_token(level)`` once per code
    position decided (for all images together)."""
    generator = ImageGenerator.batch(lm, grid, prompts, sampling, rngs, logits_processor)
    while not generator.done:
        level, before = generator.next_level, generator.decided
        generator.generate_next()
        if on_token is not None:
            for _ in range(generator.decided - before):
                on_token(level)
    return generator.results()


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

"""The decoding loop (runtime/generate.py) against a cache-free oracle, on a small numpy attention model.

The fake body is a real (tiny) causal attention stack in numpy: keys carry the position, the mask hides padding and
unwritten columns, every layer reads its own ``past_key_i`` / ``past_value_i``. The oracle recomputes each step
from the whole token sequence without any cache, so a wrong cache column, position, mask, forced token, code
offset, head slice or guidance row shows up as different tokens. Fast (no torch, no bundle): it is what the
mutation run of generate.py uses (bench/mutation/README.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from illume_rt.contract import ImageGrid, LayoutError, compact_vocab_layout, image_slots
from illume_rt.runtime.generate import KVCache, LanguageModel, generate_image_tokens, generate_text
from illume_rt.runtime.options import SamplingConfig
from illume_rt.runtime.sampler import choose

HIDDEN, LAYERS = 8, 2
VOCAB = compact_vocab_layout(text_vocab_size=24, semantic_codebook_size=12, pixel_codebook_size=10, row_multiple=8)
GRID = ImageGrid(height=0, width=0, semantic_rows=2, semantic_cols=3, pixel_rows=3, pixel_cols=2)


def positional(positions: np.ndarray) -> np.ndarray:
    freqs = np.linspace(0.3, 1.7, HIDDEN, dtype=np.float32)
    return np.sin(positions[..., None].astype(np.float32) * freqs).astype(np.float32)


class FakeBody:
    """Causal attention over [past columns (masked) + new columns]; returns every new hidden state and new k/v."""

    name, input_names, output_names = "llm", [], ["hidden", "present"]

    def __init__(self, rng: np.random.Generator) -> None:
        self.w = rng.standard_normal((LAYERS, 3, HIDDEN, HIDDEN)).astype(np.float32) / np.sqrt(HIDDEN)
        self.calls: list[dict] = []

    def run(self, feeds):
        self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        x = np.asarray(feeds["inputs_embeds"], dtype=np.float32)
        mask, positions = feeds["attention_mask"], feeds["position_ids"]
        batch, seq, _ = x.shape
        past = mask.shape[1] - seq
        assert positions.shape == (batch, seq) and mask.dtype == np.int64 and positions.dtype == np.int64
        new_kv = np.zeros((LAYERS, 2, batch, 1, seq, HIDDEN), dtype=np.float32)
        causal = np.arange(past + seq)[None, :] <= past + np.arange(seq)[:, None]  # [seq, past + seq]
        allowed = causal[None] & (mask[:, None, :] == 1)
        allowed[:, :, past:] |= np.eye(seq, dtype=bool)  # a padding position sees itself: finite, never seen
        h = x
        for layer in range(LAYERS):
            past_k, past_v = feeds[f"past_key_{layer}"], feeds[f"past_value_{layer}"]
            assert past_k.shape == past_v.shape == (batch, 1, past, HIDDEN)
            wq, wk, wv = self.w[layer]
            placed = h + positional(positions)
            k_new, v_new = placed @ wk, h @ wv
            new_kv[layer, 0, :, 0], new_kv[layer, 1, :, 0] = k_new, v_new
            keys = np.concatenate([past_k[:, 0], k_new], axis=1)
            values = np.concatenate([past_v[:, 0], v_new], axis=1)
            scores = np.where(allowed, (placed @ wq) @ keys.transpose(0, 2, 1), -np.inf)
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            h = np.tanh(h + (weights / weights.sum(axis=-1, keepdims=True)) @ values)
        return [h.astype(np.float32), new_kv]  # every new position (bundle format 4)


class FakeHead:
    def __init__(self, weight: np.ndarray, accepts_out: bool) -> None:
        self.weight, self.accepts_out, self.calls, self.outs = weight, accepts_out, [], []
        self.name, self.input_names, self.output_names = "head", ["hidden"], ["logits"]

    def run(self, feeds, out=None):
        self.calls.append(feeds["hidden"].shape)
        self.outs.append(None if out is None else out["logits"])
        logits = (feeds["hidden"] @ self.weight.T).astype(np.float32)
        if out is None:
            return [logits]
        out["logits"][...] = logits
        return [out["logits"]]


class Model:
    """One set of weights: a LanguageModel over the fakes, and the cache-free oracle over the same weights."""

    def __init__(self, seed: int = 0, max_context: int = 512, accepts_out: bool = True, kv_dtype=None) -> None:
        rng = np.random.default_rng(seed)
        self.embed = rng.standard_normal((VOCAB.vocab_rows, HIDDEN)).astype(np.float32)
        self.head = rng.standard_normal((VOCAB.vocab_rows, HIDDEN)).astype(np.float32) * 3
        self.body = FakeBody(rng)
        self.heads = {w: FakeHead(self.head[slice(*VOCAB.head_range(w))], accepts_out)
                      for w in ("text", "semantic", "pixel")}
        info = {"num_hidden_layers": LAYERS, "num_key_value_heads": 1, "head_dim": HIDDEN, "max_context": max_context}
        if kv_dtype is not None:
            info["kv_dtype"] = kv_dtype
        self.lm = LanguageModel(self.body, self.heads, self.embed, info, VOCAB)
        self.oracle_body = FakeBody(np.random.default_rng(0))
        self.oracle_body.w = self.body.w

    def last_hidden(self, row) -> np.ndarray:
        """The hidden state after a whole sequence (ids, or embeddings), computed without any cache."""
        x = np.asarray(row if isinstance(row, np.ndarray) else self.embed[np.asarray(row)], dtype=np.float32)
        n = len(x)
        feeds = {"inputs_embeds": x[None], "attention_mask": np.ones((1, n), dtype=np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None]}
        for layer in range(LAYERS):
            for kind in ("key", "value"):
                feeds[f"past_{kind}_{layer}"] = np.zeros((1, 1, 0, HIDDEN), dtype=np.float32)
        return self.oracle_body.run(feeds)[0][0, -1]

    def logits(self, row, rows: tuple[int, int]) -> np.ndarray:
        return self.head[rows[0]:rows[1]] @ self.last_hidden(row)


def image_sequence_template() -> list:
    """The image's tokens written out by hand: ints are forced, "s"/"p" a semantic/pixel code."""
    seq = [VOCAB.start_of_image_id, VOCAB.start_of_level0_id]
    for _ in range(GRID.semantic_rows):
        seq += ["s"] * GRID.semantic_cols + [VOCAB.end_of_line_id]
    seq += [VOCAB.end_of_level0_id, VOCAB.start_of_level1_id]
    for _ in range(GRID.pixel_rows):
        seq += ["p"] * GRID.pixel_cols + [VOCAB.end_of_line_id]
    return seq + [VOCAB.end_of_level1_id, VOCAB.end_of_image_id]


def oracle_image(model: Model, cond, uncond, sampling: SamplingConfig, rng) -> tuple[np.ndarray, np.ndarray]:
    guided = sampling.guidance_scale != 1.0
    rows = [cond, uncond] if guided else [cond]

    def extend(row, ids):
        if isinstance(row, np.ndarray):
            return np.concatenate([row, model.embed[np.asarray(ids, dtype=np.int64)]]) if ids else row
        return list(row) + ids

    done: list[int] = []
    codes = {"s": [], "p": []}
    for item in image_sequence_template():
        if isinstance(item, int):
            done.append(item)
            continue
        level = 0 if item == "s" else 1
        span = VOCAB.semantic_range if level == 0 else VOCAB.pixel_range
        c = model.logits(extend(rows[0], done), span)
        scores = sampling.guidance_scale * c + (1 - sampling.guidance_scale) * model.logits(extend(rows[1], done), span) \
            if guided else c
        temperature, top_k, top_p = (sampling.temperature, sampling.top_k, sampling.top_p) if level == 0 else \
            (sampling.pixel_temperature or sampling.temperature,
             3 * sampling.top_k if sampling.pixel_top_k is None else sampling.pixel_top_k,
             sampling.pixel_top_p or sampling.top_p)
        index = choose(scores, temperature, top_k, top_p, sampling.greedy, rng)
        codes[item].append(index)
        done.append(span[0] + index)
    return (np.array(codes["s"]).reshape(GRID.semantic_rows, GRID.semantic_cols),
            np.array(codes["p"]).reshape(GRID.pixel_rows, GRID.pixel_cols))


COND, UNCOND = [3, 9, 1, 17, 4, 22, 5], [3, 9, 2]
SAMPLINGS = {
    "greedy guided": SamplingConfig(greedy=True, guidance_scale=3.0),
    "sampled guided": SamplingConfig(guidance_scale=2.5, top_k=5, top_p=0.9),
    "sampled unguided": SamplingConfig(guidance_scale=1.0, top_k=0, temperature=0.7),
    "pixel settings": SamplingConfig(guidance_scale=1.5, top_k=2, pixel_top_k=0, pixel_temperature=2.0,
                                     pixel_top_p=0.8, temperature=0.5),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_image_tokens_equal_the_cache_free_oracle(name):
    sampling = SAMPLINGS[name]
    model = Model()
    got = generate_image_tokens(model.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(7))
    semantic, pixel = oracle_image(model, COND, UNCOND, sampling, np.random.default_rng(7))
    np.testing.assert_array_equal(got.semantic, semantic)
    np.testing.assert_array_equal(got.pixel, pixel)
    assert got.semantic.dtype == got.pixel.dtype == np.int64


def test_the_oracle_is_not_degenerate():
    """Different prompts, guidance and seeds give different codes: the comparisons above can fail."""
    model = Model()
    greedy = SamplingConfig(greedy=True, guidance_scale=3.0)
    a = generate_image_tokens(model.lm, GRID, COND, UNCOND, greedy, np.random.default_rng(0))
    b = generate_image_tokens(model.lm, GRID, [8, 2, 11], UNCOND, greedy, np.random.default_rng(0))
    c = generate_image_tokens(model.lm, GRID, COND, UNCOND, SamplingConfig(greedy=True, guidance_scale=1.0),
                              np.random.default_rng(0))
    d = generate_image_tokens(model.lm, GRID, COND, [1], greedy, np.random.default_rng(0))
    for other in (b, c, d):
        assert not np.array_equal(np.concatenate([a.semantic.ravel(), a.pixel.ravel()]),
                                  np.concatenate([other.semantic.ravel(), other.pixel.ravel()]))
    sampled = SAMPLINGS["sampled guided"]
    e = generate_image_tokens(model.lm, GRID, COND, UNCOND, sampled, np.random.default_rng(1))
    f = generate_image_tokens(model.lm, GRID, COND, UNCOND, sampled, np.random.default_rng(2))
    assert not np.array_equal(e.pixel, f.pixel)
    # codes use the whole codebook, not a constant
    assert len(set(a.pixel.ravel().tolist() + e.pixel.ravel().tolist())) > 2


def test_a_prompt_of_embeddings_decodes_as_its_ids():
    model = Model()
    sampling = SAMPLINGS["sampled guided"]
    by_ids = generate_image_tokens(model.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(4))
    embedded = model.embed[np.asarray(COND)].copy()
    by_embeds = generate_image_tokens(model.lm, GRID, embedded, UNCOND, sampling, np.random.default_rng(4))
    np.testing.assert_array_equal(by_ids.semantic, by_embeds.semantic)
    np.testing.assert_array_equal(by_ids.pixel, by_embeds.pixel)


def test_calls_steps_timings_and_streaming(monkeypatch):
    import time

    # a clock that moves only while an engine runs (one tick per body or head call): the timings then count
    # exactly the engine calls made for each phase, however often the loop reads the clock
    ticks = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: ticks[0])
    model = Model()
    for engine in (model.body, model.heads["semantic"], model.heads["pixel"]):
        inner = engine.run
        engine.run = lambda *a, _inner=inner, **k: (ticks.__setitem__(0, ticks[0] + 1), _inner(*a, **k))[1]
    seen: list[int] = []
    got = generate_image_tokens(model.lm, GRID, COND, UNCOND, SamplingConfig(top_k=4), np.random.default_rng(0),
                                on_token=seen.append)
    semantic_codes = GRID.semantic_rows * GRID.semantic_cols
    pixel_codes = GRID.pixel_rows * GRID.pixel_cols
    assert seen == [0] * semantic_codes + [1] * pixel_codes
    calls = model.body.calls
    assert got.steps == len(calls) == GRID.num_codes
    # the prefill carries both prompts (left-padded) and <start_of_image><start_of_level0>
    assert calls[0]["inputs_embeds"].shape == (2, len(COND) + 2, HIDDEN)
    assert calls[0]["attention_mask"].tolist() == [[1] * 9, [0] * 4 + [1] * 5]
    assert calls[0]["position_ids"].tolist() == [list(range(9)), [0] * 4 + list(range(5))]
    # then one call per code, carrying the forced tokens that follow the previous code
    lengths = [c["inputs_embeds"].shape[1] for c in calls[1:]]
    assert sum(lengths) == GRID.num_tokens - 2 - 4
    assert lengths.count(2) == GRID.semantic_rows + GRID.pixel_rows - 2
    assert lengths.count(4) == 1 and set(lengths) == {1, 2, 4}
    assert len(model.heads["semantic"].calls) == semantic_codes
    assert len(model.heads["pixel"].calls) == pixel_codes
    assert model.heads["text"].calls == []
    assert all(shape == (2, HIDDEN) for shape in model.heads["pixel"].calls)
    # the prefill is one body call; each code one head call and (but the first) one body call
    assert got.timings == {"prefill": 1.0, "semantic": float(2 * semantic_codes - 1), "pixel": float(2 * pixel_codes)}
    # the heads wrote into the call's reused buffers, one per head and batch size
    outs = model.heads["semantic"].outs + model.heads["pixel"].outs
    assert all(o is not None for o in outs)
    assert len({id(o) for o in model.heads["semantic"].outs}) == len({id(o) for o in model.heads["pixel"].outs}) == 1


def test_unguided_runs_one_row():
    model = Model()
    got = generate_image_tokens(model.lm, GRID, COND, UNCOND, SamplingConfig(guidance_scale=1.0, greedy=True),
                                np.random.default_rng(0))
    assert all(c["inputs_embeds"].shape[0] == 1 for c in model.body.calls)
    assert model.body.calls[0]["inputs_embeds"].shape[1] == len(COND) + 2
    assert got.steps == GRID.num_codes


def test_the_cache_is_sized_exactly_for_the_image():
    need = len(COND) + GRID.num_tokens
    generate_image_tokens(Model(max_context=need).lm, GRID, COND, UNCOND, SAMPLINGS["greedy guided"],
                          np.random.default_rng(0))
    with pytest.raises(LayoutError, match="context"):
        generate_image_tokens(Model(max_context=need - 1).lm, GRID, COND, UNCOND, SAMPLINGS["greedy guided"],
                              np.random.default_rng(0))


def test_image_slots_are_the_layout_written_out():
    slots = image_slots(GRID)
    got = [VOCAB.token_id(s.token) if s.level is None else "sp"[s.level] for s in slots]
    assert got == image_sequence_template()
    assert all((s.token is None) != (s.level is None) for s in slots)


# -- the cache and the model's single steps -------------------------------------------------------------------------

def test_prefill_and_steps_equal_whole_sequences():
    model = Model()
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    cache = model.lm.new_cache(2, 12)
    hidden = model.lm.prefill(cache, rows)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(hidden[i], model.last_hidden(row), rtol=1e-5, atol=1e-5)
    assert cache.length == 5 and cache.next_position.tolist() == [5, 2]
    assert cache.next_position.dtype == cache.mask.dtype == np.int64  # positions stay whole numbers
    assert cache.mask[:, :6].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]]
    hidden = model.lm.step(cache, [12, 13])
    for i, row in enumerate(rows):
        np.testing.assert_allclose(hidden[i], model.last_hidden(row + [12, 13]), rtol=1e-5, atol=1e-5)
    assert model.body.calls[-1]["position_ids"].tolist() == [[5, 6], [2, 3]]
    assert cache.length == 7 and cache.next_position.tolist() == [7, 4] and cache.next_position.dtype == np.int64
    hidden = model.lm.step(cache, [14])
    np.testing.assert_allclose(hidden[1], model.last_hidden(rows[1] + [12, 13, 14]), rtol=1e-5, atol=1e-5)
    written = cache.kv.any(axis=(0, 1, 3, 5))
    assert written[0, :8].all() and written[1, 3:8].all() and not written[:, 8:].any()
    # a row of embeddings prefills like its ids
    other = model.lm.new_cache(1, 6)
    np.testing.assert_allclose(model.lm.prefill(other, [model.embed[[10, 11]]])[0], model.last_hidden([10, 11]),
                               rtol=1e-6, atol=1e-6)


def test_cache_inputs_are_the_buffer_itself_and_empty_before_the_prefill():
    model = Model()
    cache = model.lm.new_cache(2, 10)
    assert cache.names == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    empty = cache.inputs()
    assert list(empty) == cache.names and all(v.shape == (2, 1, 0, HIDDEN) for v in empty.values())
    model.lm.prefill(cache, [[1, 2, 3], [4, 5, 6]])
    full = cache.inputs()
    for i, name in enumerate(cache.names):
        assert full[name].shape == (2, 1, 10, HIDDEN)
        assert np.shares_memory(full[name], cache.kv)
        np.testing.assert_array_equal(full[name], cache.kv[i // 2, i % 2])
    model.lm.step(cache, [7])
    step = model.body.calls[-1]
    assert step["attention_mask"].shape == (2, 11)  # the whole capacity, then the new column
    assert step["attention_mask"][:, :10].tolist() == [[1, 1, 1] + [0] * 7] * 2
    assert step["past_key_1"].shape == (2, 1, 10, HIDDEN)


def test_cache_shape_size_dtype_and_fill():
    from illume_rt.engines.llm_step import CacheDims

    cache = KVCache(CacheDims(layers=3, kv_heads=4, head_dim=5, dtype=np.dtype(np.float32), max_context=8), batch=2,
                    capacity=6)
    assert cache.kv.shape == (3, 2, 2, 4, 6, 5) and cache.kv.dtype == np.float32
    assert (cache.capacity, cache.batch, cache.length) == (6, 2, 0)
    assert cache.next_position.dtype == cache.mask.dtype == np.int64 and cache.logits_buffers == {}
    assert cache.nbytes == 3 * 2 * 2 * 4 * 6 * 5 * 4 + 2 * 6 * 8
    assert len(cache.names) == 6 and cache.names[-1] == "past_value_2"
    cache.fill(4, value=0.5)
    assert cache.length == 4 and cache.next_position.tolist() == [4, 4]
    assert cache.mask.tolist() == [[1, 1, 1, 1, 0, 0]] * 2
    assert (cache.kv[..., :4, :] == 0.5).all() and (cache.kv[..., 4:, :] == 0).all()
    cache.fill(2)
    assert cache.length == 2 and (cache.kv[..., :2, :] == np.float32(0.01)).all()
    half = Model(kv_dtype="float16").lm.new_cache(1, 4)
    assert half.kv.dtype == np.float16
    assert Model().lm.new_cache(1, 4).kv.dtype == np.float32


def test_context_and_capacity_limits():
    model = Model(max_context=8)
    model.lm.new_cache(1, 8)
    with pytest.raises(LayoutError, match="needs 9 positions but the model's context is 8"):
        model.lm.new_cache(1, 9)
    cache = model.lm.new_cache(1, 4)
    model.lm.prefill(cache, [[1, 2, 3]])
    model.lm.step(cache, [4])  # exactly full
    assert cache.length == 4
    with pytest.raises(LayoutError, match=r"KV cache full \(4 positions\)"):
        model.lm.step(cache, [5])


def test_the_language_models_context_and_float32_embeddings():
    model = Model(max_context=300)
    assert model.lm.max_context == 300  # what the pipeline checks prompts against
    half = LanguageModel(model.body, model.heads, model.embed.astype(np.float16),
                         {"num_hidden_layers": LAYERS, "num_key_value_heads": 1, "head_dim": HIDDEN,
                          "max_context": 64}, VOCAB)
    rows = half.embed([1, 2, 3])
    assert rows.dtype == np.float32 and rows.shape == (3, HIDDEN)  # a float16 table is read as float32
    np.testing.assert_array_equal(rows, model.embed[[1, 2, 3]].astype(np.float16).astype(np.float32))


def test_extend_keeps_the_rows_form():
    model = Model()
    assert model.lm.extend([1, 2], [3]) == [1, 2, 3]
    assert model.lm.extend((1, 2), [3, 4]) == [1, 2, 3, 4]
    row = model.embed[[1, 2]]
    extended = model.lm.extend(row, [3, 4])
    np.testing.assert_array_equal(extended, model.embed[[1, 2, 3, 4]])
    np.testing.assert_array_equal(model.lm.extend(row, []), row)  # nothing to add (an empty id list)


def test_logits_buffers_are_reused_per_head_and_batch():
    model = Model()
    hidden = np.random.default_rng(0).standard_normal((2, HIDDEN)).astype(np.float32)
    buffers: dict = {}
    first = model.lm.logits(hidden, "pixel", buffers)
    assert first.shape == (2, VOCAB.pixel_codebook_size) and model.lm.head_rows("pixel") == 10
    np.testing.assert_allclose(first, hidden @ model.head[slice(*VOCAB.pixel_range)].T, rtol=1e-6)
    assert list(buffers) == [("pixel", 2)] and buffers[("pixel", 2)] is first
    assert model.lm.logits(hidden * 2, "pixel", buffers) is first  # the same buffer, refilled
    model.lm.logits(hidden[:1], "pixel", buffers)
    model.lm.logits(hidden, "semantic", buffers)
    assert sorted(buffers) == [("pixel", 1), ("pixel", 2), ("semantic", 2)]
    assert buffers[("semantic", 2)].shape == (2, 12) and buffers[("semantic", 2)].dtype == np.float32
    assert model.lm.logits(hidden, "pixel") is not first  # no buffers: a fresh array
    plain = Model(accepts_out=False)
    untouched: dict = {}
    plain.lm.logits(hidden, "pixel", untouched)
    assert untouched == {}

    class PlainHead:  # an engine without out= (and without the attribute saying so)
        def run(self, feeds):
            return [feeds["hidden"] @ model.head[slice(*VOCAB.pixel_range)].T]

    model.lm.heads["pixel"] = PlainHead()
    want = hidden @ model.head[slice(*VOCAB.pixel_range)].T
    np.testing.assert_allclose(model.lm.logits(hidden, "pixel", buffers), want, rtol=1e-6)


# -- text ----------------------------------------------------------------------------------------------------------

def oracle_text(model: Model, prompt, n, temperature=1.0, rng=None, banned=(), stop=()):
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model.logits(ids, VOCAB.text_range)
        logits[list(banned)] = -np.inf
        token = int(np.argmax(logits)) if rng is None else choose(logits, temperature, 0, 1.0, False, rng)
        out.append(token)
        ids.append(token)
        if token in stop:
            break
    return out


PROMPT = [2, 7, 1, 8, 2, 8]


def test_text_greedy_equals_the_oracle_and_stops():
    model = Model()
    want = oracle_text(model, PROMPT, 8)
    assert len(set(want)) > 2
    seen: list[int] = []
    assert generate_text(model.lm, PROMPT, 8, on_token=seen.append) == want
    assert seen == want
    assert generate_text(model.lm, PROMPT, 8, stop_ids=(want[3], 999)) == want[:4]
    assert generate_text(model.lm, PROMPT, 1) == want[:1]
    assert generate_text(model.lm, model.embed[PROMPT], 3) == want[:3]  # embeddings
    banned = tuple(sorted(set(want)))[:2]
    got = generate_text(model.lm, PROMPT, 8, banned_ids=banned)
    assert got == oracle_text(model, PROMPT, 8, banned=banned) and not set(got) & set(banned)
    # the cache is exactly prompt + new tokens long
    generate_text(Model(max_context=len(PROMPT) + 8).lm, PROMPT, 8)


def test_text_sampling_honours_its_temperature():
    model = Model()
    for temperature in (0.3, 1.0, 4.0):
        got = generate_text(model.lm, PROMPT, 10, greedy=False, rng=np.random.default_rng(5),
                            temperature=temperature)
        assert got == oracle_text(model, PROMPT, 10, temperature, np.random.default_rng(5))
    hot = generate_text(model.lm, PROMPT, 10, greedy=False, rng=np.random.default_rng(5), temperature=50.0)
    cold = generate_text(model.lm, PROMPT, 10, greedy=False, rng=np.random.default_rng(5), temperature=0.3)
    assert hot != cold
    default = generate_text(model.lm, PROMPT, 10, greedy=False, rng=np.random.default_rng(5))
    assert default == oracle_text(model, PROMPT, 10, 1.0, np.random.default_rng(5))
    banned = tuple(range(0, 12))
    got = generate_text(model.lm, PROMPT, 10, greedy=False, rng=np.random.default_rng(5), temperature=50.0,
                        banned_ids=banned)
    assert not set(got) & set(banned)


def test_text_edge_cases():
    model = Model()
    assert generate_text(model.lm, PROMPT, 0) == [] and generate_text(model.lm, PROMPT, -3) == []
    assert model.body.calls == []
    with pytest.raises(ValueError, match=r"^sampling needs an rng \(numpy Generator\)$"):
        generate_text(model.lm, PROMPT, 3, greedy=False)
    assert model.body.calls == []
    assert len(generate_text(model.lm, PROMPT, 2, greedy=True, rng=None)) == 2
    assert len(model.body.calls) == 2  # prefill, one step; no step after the last token
    assert len(model.heads["text"].outs) == 2 and model.heads["text"].outs[0] is model.heads["text"].outs[1] \
        is not None  # one reused logits buffer
    assert model.heads["semantic"].calls == [] and model.heads["pixel"].calls == []

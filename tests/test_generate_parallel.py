"""Parallel decoding, batches and the step-wise API of runtime/generate.py (ImageGenerator, TextGenerator) against
the cache-free oracle of test_generate_loop.py (a small numpy attention model; no torch, no bundle).

What is checked, each against something computed independently of the loop:
- greedy parallel decoding gives the plain loop's codes for several windows, guided and unguided, and every body
  call feeds what the window rule says (the previous code, the forced tokens, the drafts; same level only, at most
  contract.DECODE_MAX_SEQ wide), at the right positions, over a cache whose rejected columns were rewound;
- sampled parallel decoding keeps the plain loop's distribution (a chi-square test of the first codes against the
  oracle's exact distribution), and the acceptance rule, the residual draw and the draft coupling are exact;
- image i of a batch is the single run with its own generator;
- compute_logits / append / generate_next / result, their messages, and the logits-processor hook, for images and
  text.
Fast: the mutation run of generate.py uses it (bench/mutation/README.md).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from illume_rt.contract import DECODE_MAX_SEQ, PIXEL, SEMANTIC, ImageGrid, LayoutError, compact_vocab_layout
from illume_rt.runtime.generate import (ImageGenerator, ImageTokens, LanguageModel, TextGenerator, _draw,
                                        _probabilities, generate_image_tokens, generate_images_tokens,
                                        generate_text)
from illume_rt.runtime.options import SamplingConfig
from test_generate_loop import (COND, GRID, HIDDEN, PROMPT, UNCOND, VOCAB, Model, image_sequence_template,
                                oracle_image, oracle_text)

TEMPLATE = image_sequence_template()
CODE_POS = [i for i, t in enumerate(TEMPLATE) if isinstance(t, str)]  # where each code sits in the image
CODE_LEVEL = [SEMANTIC if TEMPLATE[p] == "s" else PIXEL for p in CODE_POS]
N_SEM = GRID.semantic_rows * GRID.semantic_cols
N_CODES = GRID.num_codes
CODEBOOK = {SEMANTIC: VOCAB.semantic_codebook_size, PIXEL: VOCAB.pixel_codebook_size}


def offset(level: int) -> int:
    return VOCAB.semantic_code_offset if level == SEMANTIC else VOCAB.pixel_code_offset


def image_ids(codes: list[int], upto: int | None = None) -> list[int]:
    """The image's token ids with ``codes`` (flat: semantic then pixel) in place, cut before code ``upto``."""
    end = len(TEMPLATE) if upto is None or upto >= N_CODES else CODE_POS[upto]
    out, taken = [], iter(codes)
    for i, item in enumerate(TEMPLATE[:end]):
        out.append(item if isinstance(item, int) else offset(CODE_LEVEL[CODE_POS.index(i)]) + next(taken))
    return out


def oracle_scores(model: Model, cond, uncond, scale: float, codes: list[int]) -> np.ndarray:
    """Guided scores of code ``len(codes)`` after the image so far, from whole sequences (no cache)."""
    level = CODE_LEVEL[len(codes)]
    span = VOCAB.semantic_range if level == SEMANTIC else VOCAB.pixel_range
    done = image_ids(codes, len(codes))
    c = model.logits(list(cond) + done, span)
    return c if scale == 1.0 else scale * c + (1 - scale) * model.logits(list(uncond) + done, span)


def flat(tokens: ImageTokens) -> list[int]:
    return tokens.semantic.ravel().tolist() + tokens.pixel.ravel().tolist()


def fed_ids(model: Model, embeds: np.ndarray) -> list[int]:
    """Token ids of one row of fed embeddings (each embedding row is unique); -1 for padding."""
    table = {model.embed[i].tobytes(): i for i in range(model.embed.shape[0])}
    return [table.get(row.tobytes(), -1) for row in embeds]


def expected_window(first: int, k: int) -> int:
    """Codes a verify call starting at code ``first`` decides at most, written from the rule: up to k codes of one
    level, the fed span (previous code .. the position before the last of them) at most DECODE_MAX_SEQ wide."""
    count = 1
    while (count < k and first + count < N_CODES and CODE_LEVEL[first + count] == CODE_LEVEL[first]
           and CODE_POS[first + count] - CODE_POS[first - 1] <= DECODE_MAX_SEQ):
        count += 1
    return count


def check_calls(model: Model, prompts: list[tuple], codes: list[list[int]], window: int, guided: bool,
                greedy: bool) -> dict:
    """Walk the body calls of a finished run: the prefill, then calls that each start at the code after the one
    decided last. Checks every row's fed ids, positions and attention mask; returns the per-level call, code,
    draft and acceptance counts the walk implies."""
    calls, images = model.body.calls, len(prompts)
    rows = [p[0] for p in prompts] + ([p[1] for p in prompts] if guided else [])
    longest = max(len(r) for r in rows)
    capacity = longest + len(TEMPLATE)
    want = {name: {"calls": 0, "codes": 0, "drafted": 0, "accepted": 0} for name in ("semantic", "pixel")}
    # the prefill: each prompt, left-padded, then <start_of_image><start_of_level0>
    assert calls[0]["inputs_embeds"].shape == (len(rows), longest + 2, HIDDEN)
    for r, row in enumerate(rows):
        ids = fed_ids(model, calls[0]["inputs_embeds"][r])
        pad = longest - len(row)
        assert ids == [-1] * pad + list(row) + TEMPLATE[:2]
        assert calls[0]["position_ids"][r].tolist() == [0] * pad + list(range(len(row) + 2))
    want["semantic"]["calls"] = want["semantic"]["codes"] = 1
    first = 1
    for n, call in enumerate(calls[1:], start=1):
        count = expected_window(first, window) if window else 1
        width = CODE_POS[first + count - 1] - CODE_POS[first - 1]
        assert call["inputs_embeds"].shape == (len(rows), width, HIDDEN) and width <= DECODE_MAX_SEQ
        if n + 1 < len(calls):  # where the next call starts: the codes this one decided
            decided = int(calls[n + 1]["position_ids"][0, 0]) - len(rows[0])
            decided = CODE_POS.index(decided) + 1 - first
        else:
            decided = N_CODES - first
        assert 1 <= decided <= count
        reached = []  # per image: the codes its drafts reach (greedy)
        for r, row in enumerate(rows):
            image = r % images
            sequence = image_ids(codes[image])
            start = CODE_POS[first - 1]
            ids = fed_ids(model, call["inputs_embeds"][r])
            drafts = []
            for j, token in enumerate(ids):
                if isinstance(TEMPLATE[start + j], int) or j == 0:  # forced tokens and the previous code
                    assert token == sequence[start + j], (n, r, j)
                else:  # a draft of a later code of this level
                    level = CODE_LEVEL[CODE_POS.index(start + j)]
                    assert level == CODE_LEVEL[first] and 0 <= token - offset(level) < CODEBOOK[level]
                    drafts.append(token == sequence[start + j])
            assert len(drafts) == count - 1
            if r < images:  # a greedy draft is accepted iff it is the code: the leading right drafts, one more
                reached.append(next((i for i, ok in enumerate(drafts) if not ok), len(drafts)) + 1)
            before = len(row) + start  # this row's tokens before the fed ones
            assert call["position_ids"][r].tolist() == list(range(before, before + width))
            pad = longest - len(row)
            cached = call["attention_mask"][r]
            assert cached.tolist() == [0] * pad + [1] * before + [0] * (capacity - pad - before) + [1] * width
        if greedy:  # a batch keeps the codes every image reached
            assert decided == min(reached), (n, reached)
        name = "semantic" if CODE_LEVEL[first] == SEMANTIC else "pixel"
        want[name]["calls"] += 1
        want[name]["codes"] += decided
        if count > 1 and images == 1:
            want[name]["drafted"] += min(decided, count - 1)
            want[name]["accepted"] += decided - 1
        first += decided
    assert first == N_CODES
    return want


# -- greedy parallel decoding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [2, 3, 5, 12])
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["unguided", "guided"])
def test_greedy_parallel_decoding_is_the_plain_loop(window, scale):
    model = Model()
    sampling = SamplingConfig(greedy=True, guidance_scale=scale, parallel_window=window)
    seen: list[int] = []
    got = generate_image_tokens(model.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(3), seen.append)
    assert seen == CODE_LEVEL  # once per code, several per call
    semantic, pixel = oracle_image(model, COND, UNCOND, replace(sampling, parallel_window=0), None)
    np.testing.assert_array_equal(got.semantic, semantic)
    np.testing.assert_array_equal(got.pixel, pixel)
    want = check_calls(model, [(COND, UNCOND)], [flat(got)], window, scale != 1.0, greedy=True)
    assert got.levels == want and got.steps == len(model.body.calls)
    assert got.steps == want["semantic"]["calls"] + want["pixel"]["calls"] < N_CODES
    assert want["semantic"]["accepted"] + want["pixel"]["accepted"] > 0  # drafts do get accepted
    assert want["semantic"]["drafted"] > want["semantic"]["accepted"]  # and rejected


def test_a_window_is_cut_at_decode_max_seq():
    """One code per line: after the previous code, each code of the window brings the end-of-line before it and
    (but the last) its draft, so a window of 12 feeds 2 tokens a code and stops at 8 codes (16 tokens)."""
    grid = ImageGrid(0, 0, 12, 1, 2, 1)
    model = Model()
    sampling = SamplingConfig(greedy=True, guidance_scale=1.0, parallel_window=12)
    g = ImageGenerator(model.lm, grid, COND, UNCOND, sampling, np.random.default_rng(0))
    g.generate_next()  # the prefill decides one
    assert g._window() == 8
    g.generate_next()
    call = model.body.calls[-1]
    assert call["inputs_embeds"].shape[1] == DECODE_MAX_SEQ
    ids = fed_ids(model, call["inputs_embeds"][0])
    assert ids[1::2] == [VOCAB.end_of_line_id] * 8  # code, end-of-line, draft, end-of-line, ...
    while not g.done:
        g.generate_next()
    plain = generate_image_tokens(Model().lm, grid, COND, UNCOND, replace(sampling, parallel_window=0), None)
    np.testing.assert_array_equal(g.result().semantic, plain.semantic)
    np.testing.assert_array_equal(g.result().pixel, plain.pixel)


def test_the_window_stays_on_one_level_and_shrinks_at_its_end():
    model = Model()
    g = ImageGenerator(model.lm, GRID, COND, UNCOND, SamplingConfig(greedy=True, parallel_window=12),
                       np.random.default_rng(0))
    assert g._window() == 1  # the prefill decides one code
    windows = []
    while not g.done:
        if g.calls:
            windows.append((g.decided, g._window()))
        g.generate_next()
    for first, count in windows:
        assert count == expected_window(first, 12)
    assert (1, N_SEM - 1) in windows  # the rest of the semantic level, not past it
    assert all(first + count <= N_SEM for first, count in windows if first < N_SEM)
    plain = ImageGenerator(Model().lm, GRID, COND, UNCOND, SamplingConfig(greedy=True, parallel_window=0), None)
    plain.generate_next()
    assert plain._window() == 1  # no parallel decoding: always one
    two = ImageGenerator(Model().lm, GRID, COND, UNCOND, SamplingConfig(greedy=True, parallel_window=2), None)
    two.generate_next()
    assert two._window() == 2


def test_a_rejection_rewinds_the_cache_and_later_steps_equal_the_oracle():
    """Sampled parallel decoding, stepped: after each call the cache holds exactly the image's tokens before the
    last decided code (rejected drafts forgotten: mask zeros, next positions back), so the next scores are the
    oracle's for the codes decided so far."""
    model = Model()
    sampling = SamplingConfig(guidance_scale=2.0, top_k=3, parallel_window=4)
    g = ImageGenerator(model.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(11))
    rejected, looked = 0, False
    while not g.done:
        level, before, calls = g.next_level, g.decided, g.calls
        last = g.generate_next()
        codes = g.codes[SEMANTIC] + g.codes[PIXEL]
        assert last == g.codes[level][-1]
        if looked:  # the host looked at the scores: that call decides this one code
            assert g.calls == calls and g.decided == before + 1
        else:
            assert g.calls == calls + 1
            rejected += calls > 0 and g.decided - before < expected_window(before, 4)
        looked = False
        if g.done:
            break
        kept = CODE_POS[g.decided - 1]  # the image tokens before the last decided code are in the cache
        assert g.cache.length == len(COND) + kept
        assert g.cache.next_position.tolist() == [len(COND) + kept, len(UNCOND) + kept]
        pad = len(COND) - len(UNCOND)
        assert g.cache.mask.tolist() == [[1] * g.cache.length + [0] * (g.cache.capacity - g.cache.length),
                                         [0] * pad + [1] * (g.cache.length - pad)
                                         + [0] * (g.cache.capacity - g.cache.length)]
        if g.decided % 3 == 0:  # look at the scores now and then: they are the oracle's
            np.testing.assert_allclose(g.compute_logits(), oracle_scores(model, COND, UNCOND, 2.0, codes),
                                       rtol=1e-4, atol=1e-4)
            looked = True
    assert rejected > 0
    assert g.decided == N_CODES and len(g.result().pixel.ravel()) == GRID.pixel_rows * GRID.pixel_cols


def test_a_verify_call_feeds_the_drafts_and_redrafts_the_undecided_codes():
    """Greedy, with drafts the test chooses (the scripted uniform draws): the first two drafts are the argmax codes,
    the third is not. The call feeds the previous code and the drafts, keeps the two, replaces the third by the
    argmax, and the codes it did not decide get the argmax of this call's scores there (stale context) as drafts."""
    model = Model()
    scale = 2.0

    def argmax(codes):
        return int(np.argmax(oracle_scores(model, COND, UNCOND, scale, codes)))

    c0 = argmax([])
    a1 = argmax([c0])
    a2 = argmax([c0, a1])
    a3 = argmax([c0, a1, a2])
    d3 = (a3 + 1) % 12
    rng = ScriptedRng(integers=[a1, a2, d3, 5])
    g = ImageGenerator(model.lm, GRID, COND, UNCOND, SamplingConfig(greedy=True, guidance_scale=scale,
                                                                    parallel_window=5), rng)
    assert g.rng is rng and g.rngs == [rng]
    assert g.generate_next() == c0 and rng.sizes == [] and g._drafts == [{}]  # the prefill decides code 0
    assert g.generate_next() == a3  # codes 1..5 in one call: drafts of 1..4 fed
    assert rng.sizes == [12] * 4 and rng.ints == []
    s = VOCAB.semantic_code_offset
    assert fed_ids(model, model.body.calls[-1]["inputs_embeds"][0]) == [s + c0, s + a1, s + a2, VOCAB.end_of_line_id,
                                                                          s + d3, s + 5]
    assert g.codes[SEMANTIC] == [c0, a1, a2, a3] and g.decided == 4
    assert g.levels["semantic"] == {"calls": 2, "codes": 4, "drafted": 3, "accepted": 2}
    b4, b5 = argmax([c0, a1, a2, d3]), argmax([c0, a1, a2, d3, 5])
    assert sorted(g._drafts[0]) == [4, 5]  # decided codes leave no draft behind
    assert g._drafts[0][4][0] == b4 and g._drafts[0][5][0] == b5
    np.testing.assert_array_equal(g._drafts[0][4][1], np.eye(12)[b4])
    assert g.cache.length == len(COND) + CODE_POS[3]  # up to the last decided code (fed next)
    g.generate_next()  # codes 4, 5: the last code and the stale draft of 4
    assert fed_ids(model, model.body.calls[-1]["inputs_embeds"][0]) == [s + a3, s + b4]
    a4 = argmax([c0, a1, a2, a3])
    assert g.codes[SEMANTIC][4] == a4 and g.decided == (6 if b4 == a4 else 5)
    assert rng.sizes == [12] * 4  # no new uniform drafts


def test_redrafts_take_this_calls_distribution_as_their_q():
    """Sampled: after each verify call the undecided codes of the window hold drafts whose q is the warped softmax
    of the oracle's scores after the codes decided before the call and the drafts fed (read back from the call)."""
    model = Model()
    sampling = SamplingConfig(guidance_scale=1.5, top_k=0, temperature=0.8, parallel_window=6)
    g = ImageGenerator(model.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(4))
    redrafted = 0
    while not g.done:
        first, count = g.decided, g._window()
        before = g.codes[SEMANTIC] + g.codes[PIXEL]
        g.generate_next()
        if count == 1:
            assert g._drafts == [{}]
            continue
        fed = fed_ids(model, model.body.calls[-1]["inputs_embeds"][0])
        drafts = [t - offset(CODE_LEVEL[first]) for j, t in enumerate(fed)
                  if j and not isinstance(TEMPLATE[CODE_POS[first - 1] + j], int)]
        assert len(drafts) == count - 1
        assert sorted(g._drafts[0]) == list(range(g.decided, first + count))
        for index in range(g.decided, first + count):
            code, q = g._drafts[0][index]
            scores = oracle_scores(model, COND, UNCOND, 1.5, before + drafts[:index - first]).astype(np.float64) / 0.8
            want = np.exp(scores - scores.max())
            np.testing.assert_allclose(q, want / want.sum(), rtol=1e-3, atol=1e-6)
            assert 0 <= code < CODEBOOK[CODE_LEVEL[index]]
            redrafted += 1
    assert redrafted > 3


def test_parallel_levels_stats_are_consistent():
    model = Model()
    sampling = SamplingConfig(guidance_scale=1.5, top_k=4, parallel_window=5)
    got = generate_image_tokens(model.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(2))
    want = check_calls(model, [(COND, UNCOND)], [flat(got)], 5, True, greedy=False)
    assert got.levels == want
    assert got.levels["semantic"]["codes"] == N_SEM and got.levels["pixel"]["codes"] == N_CODES - N_SEM
    for stats_ in got.levels.values():  # one code per call is never a draft; each call decides accepted + 1
        assert stats_["accepted"] == stats_["codes"] - stats_["calls"]
    assert got.steps == len(model.body.calls) == want["semantic"]["calls"] + want["pixel"]["calls"]


def test_parallel_logits_processor_sees_each_position_of_the_window():
    """In a verify call the processor runs for every read position with that code's index; what it returns is
    what decides (here: code = a function of the index, so every draft after the first guess is right)."""
    model = Model()
    seen = []

    def pick(scores, level, index):
        seen.append((level, index))
        size = scores.shape[0]
        assert size == (12 if level == SEMANTIC else 10)
        out = np.full(size, -np.inf)
        out[(5 * index + 3 * level + 1) % size] = 0.0
        return out

    got = generate_image_tokens(model.lm, GRID, COND, UNCOND, SamplingConfig(top_k=0, parallel_window=3),
                                np.random.default_rng(0), logits_processor=pick)
    assert got.semantic.ravel().tolist() == [(5 * i + 1) % 12 for i in range(N_SEM)]
    assert got.pixel.ravel().tolist() == [(5 * i + 4) % 10 for i in range(N_CODES - N_SEM)]
    # each call's positions: the next codes of its level, in order (the prefill's: the first code)
    assert seen[0] == (SEMANTIC, 0) and seen[1:4] == [(SEMANTIC, 1), (SEMANTIC, 2), (SEMANTIC, 3)]
    assert {s for s in seen} == {(SEMANTIC, i) for i in range(N_SEM)} | {(PIXEL, i) for i in range(N_CODES - N_SEM)}


# -- the acceptance rule, the draw and the draft coupling, exactly -------------------------------------------------

class ScriptedRng:
    """A Generator stand-in: ``random()`` returns the scripted uniforms in order, ``integers`` the scripted ints."""

    def __init__(self, uniforms=(), integers=()) -> None:
        self.uniforms, self.ints, self.sizes = list(uniforms), list(integers), []

    def random(self) -> float:
        return self.uniforms.pop(0)

    def integers(self, size) -> int:
        self.sizes.append(size)
        return self.ints.pop(0)


def scripted(sampling: SamplingConfig, *rngs) -> ImageGenerator:
    model = Model()
    if len(rngs) == 1:
        return ImageGenerator(model.lm, GRID, COND, UNCOND, sampling, rngs[0])
    return ImageGenerator.batch(model.lm, GRID, [(COND, UNCOND)] * len(rngs), sampling, list(rngs))


P = np.array([0.5, 0.375, 0.125, 0.0])  # binary fractions: the products below are exact


@pytest.mark.parametrize("u,accepted", [(0.4999, True), (0.5, False), (0.75, False)])
def test_a_uniform_draft_is_accepted_iff_u_times_q_is_below_p(u, accepted):
    """q = 1/4 (uniform over the codebook) for a draft with p = 1/8: accepted iff u/4 < 1/8, i.e. u < 1/2."""
    rng = ScriptedRng([u, 0.7, 0.9])
    g = scripted(SamplingConfig(parallel_window=3), rng)
    g._index = 2
    g._drafts[0] = {2: (2, None), 3: (1, np.array([0.25, 0.25, 0.25, 0.25]))}
    out = g._verify(0, [P, P * 2, np.array([0.0, 0.0, 1.0, 3.0])])
    if accepted:  # then the draft 1 (q = 1/4, p = 3/4) with u = 0.7: 0.175 < 0.75; then a draw from the last p
        assert out == [2, 1, 3] and rng.uniforms == []
        assert g.levels["semantic"] == {"calls": 0, "codes": 0, "drafted": 2, "accepted": 2}
    else:  # the residual max(0, p - 1/4) = (1/4, 1/8, 0, 0): 0.7 * 3/8 = 0.2625 lands on id 1
        assert out == [1] and rng.uniforms == [0.9]
        assert g.levels["semantic"] == {"calls": 0, "codes": 0, "drafted": 1, "accepted": 0}


def test_a_drafts_q_decides_its_acceptance():
    p = np.array([0.25, 0.25, 0.5, 0.0])
    q = np.array([0.125, 0.5, 0.25, 0.125])
    g = scripted(SamplingConfig(parallel_window=3), ScriptedRng())
    for u, code, want in [(0.499, 1, [1]), (0.5, 1, None), (0.25, 1, [1]), (0.99, 0, [0]), (0.99, 2, [2])]:
        # code 1: u * 1/2 < 1/4 iff u < 1/2 (u / q would accept only below 1/8); codes 0, 2: p >= q, always
        g.rngs[0] = ScriptedRng([u, 0.0, 0.5])
        g._drafts[0] = {0: (code, q)}
        out = g._verify(0, [p, np.array([0.0, 0.0, 0.0, 1.0])])
        if want is None:  # rejected: the residual max(0, p - q) = (1/8, 0, 1/4, 0); u = 0 -> id 0
            assert out == [0] and g.rngs[0].uniforms == [0.5]
        else:
            assert out == want + [3] and g.rngs[0].uniforms == [0.5]
    g.rngs[0] = ScriptedRng([0.9, 0.5])  # rejected again: 0.5 * 3/8 = 0.1875 is past 1/8 -> id 2, never 1 or 3
    g._drafts[0] = {0: (1, q)}
    assert g._verify(0, [p, p]) == [2]
    g.rngs[0] = ScriptedRng([0.9, 0.3])  # 0.3 * 3/8 = 0.1125 < 1/8 -> id 0
    g._drafts[0] = {0: (3, q)}  # p(3) = 0: never accepted
    assert g._verify(0, [p, p]) == [0]


def test_greedy_verification_takes_the_argmax_and_draws_nothing():
    g = scripted(SamplingConfig(greedy=True, parallel_window=4), ScriptedRng())
    one_hot = [np.eye(5)[i] for i in (3, 1, 4, 0)]
    g._drafts[0] = {0: (3, None), 1: (1, np.full(5, 0.2)), 2: (2, None)}
    assert g._verify(0, one_hot) == [3, 1, 4]  # two accepted, the third replaced by the argmax
    assert g.levels["semantic"]["drafted"] == 3 and g.levels["semantic"]["accepted"] == 2
    g._drafts[0] = {0: (3, None), 1: (1, None), 2: (4, None)}
    assert g._verify(0, one_hot) == [3, 1, 4, 0]  # all accepted: the last p's argmax
    assert g.levels["semantic"]["drafted"] == 6 and g.levels["semantic"]["accepted"] == 5


def test_probabilities_are_what_choose_draws_from():
    scores = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    np.testing.assert_array_equal(_probabilities(scores, 1.0, 0, 1.0, True), [0.0, 1.0, 0.0, 0.0])
    e = np.exp(np.array([1.0, 3.0, 2.0, -1.0]) / 0.5)
    np.testing.assert_allclose(_probabilities(scores, 0.5, 0, 1.0, False), e / e.sum(), rtol=1e-12)
    top2 = np.exp(np.array([3.0, 2.0]))
    np.testing.assert_allclose(_probabilities(scores, 1.0, 2, 1.0, False), [0.0, *(top2 / top2.sum()), 0.0],
                               rtol=1e-12)
    p = _probabilities(scores, 1.0, 0, 0.5, False)  # top-p 0.5: the largest alone crosses it
    np.testing.assert_array_equal(p, [0.0, 1.0, 0.0, 0.0])
    assert _probabilities(scores, 1.0, 0, 1.0, False).dtype == np.float64
    for shift in (1000.0, -1000.0):  # softmax shifted by the largest score: no overflow or underflow
        np.testing.assert_allclose(_probabilities(scores + np.float32(shift), 1.0, 0, 1.0, False),
                                   _probabilities(scores, 1.0, 0, 1.0, False), rtol=1e-4)
    # choose's inverse CDF over these probabilities: the same code for the same uniform
    from illume_rt.runtime.sampler import choose

    probs = _probabilities(scores, 0.7, 3, 0.95, False)
    for u in (0.0, 0.1, 0.35, 0.6, 0.9, 0.999):
        assert _draw(probs, u) == choose(scores, 0.7, 3, 0.95, False, ScriptedRng([u]))


def test_draw_is_an_inverse_cdf_over_ascending_ids():
    probs = np.array([0.25, 0.0, 0.5, 0.25])
    assert [_draw(probs, u) for u in (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999, 1.0)] == [0, 0, 2, 2, 3, 3, 3]
    assert _draw(np.array([1.0, 3.0]), 0.25) == 1 and _draw(np.array([1.0, 3.0]), 0.2499) == 0  # unnormalised
    assert _draw(np.array([2.0, 6.0, 0.0]), 0.25) == 1
    assert _draw(np.array([0.5, 0.5, 0.0, 0.0]), 1.0) == 1  # the very top: the last id with weight
    assert _draw(np.array([0.0, 0.0, 1.0]), 0.0) == 2  # never a leading zero-weight id
    assert isinstance(_draw(probs, 0.5), int)


def test_redraft_couples_a_new_draft_to_the_old_one():
    p = np.array([0.5, 0.25, 0.25, 0.0])
    q_old = np.array([0.25, 0.5, 0.125, 0.125])
    last = np.array([0.0, 1.0, 3.0, 0.0])
    rng = ScriptedRng([0.49, 0.5, 0.9, 0.9, 0.75])
    g = scripted(SamplingConfig(parallel_window=5), rng)
    g._drafts[0] = {4: (1, q_old), 5: (1, q_old), 6: (2, None), 9: (0, None)}
    targets = [[None, p, p, p, last, p]]  # targets[image][index - first], first = 3
    g._redraft(4, 8, targets, 3)
    d = g._drafts[0]
    # 4: u = 0.49, 0.49 * 1/2 < 1/4: code 1 stays, with q = this call's p
    assert d[4][0] == 1 and d[4][1] is p
    # 5: u = 0.5, 0.5 * 1/2 = 1/4 is not below p(1) = 1/4: a draw (u = 0.9) from max(0, p - q_old) = (1/4, 0, 1/8, 0):
    # 0.9 * 3/8 = 0.3375 -> id 2 (a uniform q_old's residual (1/4, 0, 0, 0) would give 0)
    assert d[5][0] == 2 and d[5][1] is p
    # 6: uniform old draft (q = 1/4), p(2) = 1/4: u = 0.9 * 1/4 < 1/4 stays
    assert d[6][0] == 2 and d[6][1] is p
    # 7: no draft yet (the window's last code): a draw from p itself, u = 0.75 on (0, 1/4, 3/4, 0) -> id 2
    assert d[7] == (2, last) and d[7][1] is last
    assert d[9] == (0, None) and 8 not in d and rng.uniforms == []  # outside [start, stop): untouched
    # a uniform old draft that p rules out: replaced by a draw from max(0, p - 1/4) = (1/4, 0, 0, 0)
    g.rngs[0] = ScriptedRng([0.0, 0.99])
    g._drafts[0] = {0: (3, None)}
    g._redraft(0, 1, [[p]], 0)
    assert g._drafts[0][0][0] == 0


def test_redraft_greedy_takes_the_argmax_and_each_image_its_own():
    g = scripted(SamplingConfig(greedy=True, parallel_window=3), ScriptedRng(), ScriptedRng())
    a, b = np.eye(4)[2], np.eye(4)[1]
    g._drafts = [{1: (0, None)}, {}]
    g._redraft(1, 3, [[None, a, b], [None, b, a]], 0)
    assert g._drafts[0] == {1: (2, a), 2: (1, b)} and g._drafts[1] == {1: (1, b), 2: (2, a)}


def test_drafts_start_as_uniform_codes_of_the_level():
    rng = ScriptedRng(integers=[7, 0, 11])
    g = scripted(SamplingConfig(parallel_window=4), rng)
    g._drafts[0] = {2: (5, np.ones(12))}
    g._draft(1, 3)  # codes 1, 2, 3: 2 has a draft already
    assert rng.sizes == [12, 12] and g._drafts[0][1] == (7, None) and g._drafts[0][3] == (0, None)
    assert g._drafts[0][2][0] == 5 and 4 not in g._drafts[0]
    pixel = ScriptedRng(integers=[9])
    h = scripted(SamplingConfig(parallel_window=4), pixel)
    h._draft(N_SEM + 1, 1)
    assert pixel.sizes == [10] and h._drafts[0] == {N_SEM + 1: (9, None)}


# -- sampled parallel decoding keeps the distribution ---------------------------------------------------------------

STAT_SAMPLING = SamplingConfig(guidance_scale=1.5, top_k=3, temperature=3.0)  # hot: no cell near 1
STAT_CODES, STAT_ALPHA = 3, 0.001


def exact_first_codes(model: Model) -> dict[tuple, float]:
    """The plain loop's distribution of the first codes, from the oracle's scores: top-3 softmax per step."""
    out = {(): 1.0}
    for _ in range(STAT_CODES):
        nxt = {}
        for prefix, mass in out.items():
            scores = oracle_scores(model, COND, UNCOND, STAT_SAMPLING.guidance_scale, list(prefix)).astype(
                np.float64) / STAT_SAMPLING.temperature
            top = np.argsort(-scores)[:3]
            weights = np.exp(scores[top] - scores[top].max())
            for code, w in zip(top, weights / weights.sum()):
                nxt[prefix + (int(code),)] = mass * float(w)
        out = nxt
    return out


def first_codes(model: Model, sampling: SamplingConfig, seeds, images: int = 1) -> list[tuple]:
    out = []
    for seed in seeds:
        g = ImageGenerator.batch(model.lm, GRID, [(COND, UNCOND)] * images, sampling,
                                 [np.random.default_rng([seed, i]) for i in range(images)])
        while g.decided < STAT_CODES:
            g.generate_next()
        out += [tuple(g.image_codes(i)[SEMANTIC][:STAT_CODES]) for i in range(images)]
    return out


def chi_square_p(samples: list[tuple], exact: dict[tuple, float]) -> float:
    """Goodness of fit of the samples' joint codes to ``exact``; cells expected fewer than 5 times pooled."""
    n = len(samples)
    counts = {cell: 0 for cell in exact}
    for s in samples:
        counts[s] += 1  # a code outside the top 3 is a KeyError: never sampled
    big = [c for c in exact if exact[c] * n >= 5]
    small = [c for c in exact if exact[c] * n < 5]
    observed = [counts[c] for c in big] + ([sum(counts[c] for c in small)] if small else [])
    expected = [exact[c] * n for c in big] + ([sum(exact[c] for c in small) * n] if small else [])
    return float(stats.chisquare(observed, np.array(expected) * n / sum(expected)).pvalue)


def test_sampled_parallel_decoding_keeps_the_plain_distribution():
    """The joint distribution of the first three codes (27 cells under top-3) of seeded runs with window 3 (600
    single images; both images of 200 two-image batches) against the exact distribution of the plain loop: no
    difference at alpha 0.001 each (fixed seeds: the outcome is deterministic). The window's first call verifies
    uniform drafts, the next one Jacobi redrafts (q = a stale p); the power check below shows a wrong rejection
    rule fails this."""
    model = Model()
    exact = exact_first_codes(model)
    assert abs(sum(exact.values()) - 1.0) < 1e-9 and len(exact) == 27
    assert max(exact.values()) < 0.5  # not a near-constant: the codes really are random
    parallel = replace(STAT_SAMPLING, parallel_window=3)
    single = first_codes(model, parallel, range(600))
    assert chi_square_p(single, exact) > STAT_ALPHA
    batch = first_codes(model, parallel, range(10_000, 10_200), images=2)
    assert chi_square_p(batch[0::2], exact) > STAT_ALPHA and chi_square_p(batch[1::2], exact) > STAT_ALPHA


def test_the_distribution_test_has_power(monkeypatch):
    """The same test (400 runs) rejects a rejection step that redraws from p instead of the residual
    max(0, p - q): the classic slip, which leans the codes towards the drafts (p = 2e-6 here)."""
    from illume_rt.runtime import generate

    def redraw_from_p(self, image, targets):
        rng, drafts, out = self.rngs[image], self._drafts[image], []
        for j, p in enumerate(targets[:-1]):
            code, q = drafts[self._index + j]
            if rng.random() * (1.0 / p.shape[0] if q is None else q[code]) < p[code]:
                out.append(code)
                continue
            return out + [_draw(p, rng.random())]
        return out + [_draw(targets[-1], rng.random())]

    model = Model()
    exact = exact_first_codes(model)
    parallel = replace(STAT_SAMPLING, parallel_window=3)
    monkeypatch.setattr(generate.ImageGenerator, "_verify", redraw_from_p)
    assert chi_square_p(first_codes(model, parallel, range(400)), exact) < STAT_ALPHA


# -- batches ------------------------------------------------------------------------------------------------------

BATCH = [(COND, UNCOND), ([8, 2, 11], [3, 1, 4, 1, 5, 9, 2, 6]), ([20, 21, 22, 23], [7])]
BATCH_SAMPLINGS = {
    "greedy guided": SamplingConfig(greedy=True, guidance_scale=3.0),
    "sampled guided": SamplingConfig(guidance_scale=2.5, top_k=5, top_p=0.9),
    "sampled unguided": SamplingConfig(guidance_scale=1.0, top_k=0, temperature=0.7, pixel_top_k=3),
    "greedy guided parallel": SamplingConfig(greedy=True, guidance_scale=2.0, parallel_window=4),
    "greedy unguided parallel": SamplingConfig(greedy=True, guidance_scale=1.0, parallel_window=12),
}


@pytest.mark.parametrize("name", list(BATCH_SAMPLINGS))
def test_image_i_of_a_batch_is_its_single_run(name):
    sampling = BATCH_SAMPLINGS[name]
    model = Model()
    seen: list[int] = []
    got = generate_images_tokens(model.lm, GRID, BATCH, sampling, [np.random.default_rng(40 + i) for i in range(3)],
                                 on_token=seen.append)
    assert len(got) == 3 and all(isinstance(t, ImageTokens) for t in got)
    plain = replace(sampling, parallel_window=0)
    for i, (cond, uncond) in enumerate(BATCH):
        semantic, pixel = oracle_image(model, cond, uncond, plain, np.random.default_rng(40 + i))
        np.testing.assert_array_equal(got[i].semantic, semantic)
        np.testing.assert_array_equal(got[i].pixel, pixel)
    assert not np.array_equal(flat(got[0]), flat(got[1]))  # the images differ: each row is its own
    assert seen == [SEMANTIC] * N_SEM + [PIXEL] * (N_CODES - N_SEM)  # once per position, for all images
    guided = sampling.guidance_scale != 1.0
    assert all(c["inputs_embeds"].shape[0] == (6 if guided else 3) for c in model.body.calls)
    want = check_calls(model, BATCH, [flat(t) for t in got], sampling.parallel_window, guided, sampling.greedy)
    assert all(t.steps == len(model.body.calls) for t in got)
    for name_ in ("semantic", "pixel"):
        assert got[0].levels[name_]["calls"] == want[name_]["calls"]
        assert got[0].levels[name_]["codes"] == want[name_]["codes"]
    if sampling.parallel_window:
        assert got[0].steps < N_CODES
        lv = got[0].levels
        assert lv["semantic"]["drafted"] >= lv["semantic"]["accepted"] > 0
    else:
        assert got[0].steps == N_CODES


def test_a_sampled_parallel_batch_decides_the_codes_every_image_reached():
    model = Model()
    sampling = SamplingConfig(guidance_scale=2.0, top_k=3, pixel_top_k=3, parallel_window=4)
    g = ImageGenerator.batch(model.lm, GRID, BATCH[:2], sampling, [np.random.default_rng(5), np.random.default_rng(6)])
    while not g.done:
        level, before = g.next_level, g.decided
        last = g.generate_next()
        assert last == [g.image_codes(0)[level][-1], g.image_codes(1)[level][-1]]
        assert len(g.image_codes(0)[level]) == len(g.image_codes(1)[level]) == g.decided - (N_SEM if level else 0)
        assert g.decided > before
    tokens = g.results()
    check_calls(model, BATCH[:2], [flat(t) for t in tokens], 4, True, greedy=False)
    # every code is among the top 3 of its guided scores after the image's own codes
    for i, (cond, uncond) in enumerate(BATCH[:2]):
        codes = flat(tokens[i])
        for n in range(N_CODES):
            scores = oracle_scores(model, cond, uncond, 2.0, codes[:n])
            assert codes[n] in np.argsort(-scores)[:3].tolist()
    stats_ = tokens[0].levels
    assert stats_["semantic"]["drafted"] >= stats_["semantic"]["accepted"] + 1  # each image verified its drafts


def test_a_batch_needs_one_generator_per_prompt():
    model = Model()
    with pytest.raises(LayoutError) as info:
        ImageGenerator.batch(model.lm, GRID, BATCH[:2], SamplingConfig(), [np.random.default_rng(0)])
    assert str(info.value) == "a batch needs one random generator per prompt, got 2 prompts and 1 generators"
    with pytest.raises(LayoutError) as info:
        generate_images_tokens(model.lm, GRID, [], SamplingConfig(), [])
    assert str(info.value) == "a batch needs one random generator per prompt, got 0 prompts and 0 generators"
    with pytest.raises(LayoutError, match="got 1 prompts and 2 generators"):
        ImageGenerator.batch(model.lm, GRID, BATCH[:1], SamplingConfig(), [None, None])
    assert model.body.calls == []


# -- the step-wise API ----------------------------------------------------------------------------------------------

def test_compute_logits_are_the_oracles_and_then_append_is_generate_next():
    model, other = Model(), Model()
    sampling = SamplingConfig(guidance_scale=2.0, top_k=4, parallel_window=4)  # looking first: one code a call
    looked = ImageGenerator(model.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(9))
    stepped = ImageGenerator(other.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(9))
    codes: list[int] = []
    while not looked.done:
        scores = looked.compute_logits()
        assert scores.shape == ((12,) if looked.next_level == SEMANTIC else (10,))
        np.testing.assert_allclose(scores, oracle_scores(model, COND, UNCOND, 2.0, codes), rtol=1e-4, atol=1e-4)
        heads = sum(len(h.calls) for h in model.heads.values())
        assert np.shares_memory(looked.compute_logits(), scores)  # cached: no second head call
        code = looked.generate_next()
        assert sum(len(h.calls) for h in model.heads.values()) == heads  # decided from the scores seen
        codes.append(code)
        stepped.compute_logits()
        stepped.append(code)
    assert looked.codes == stepped.codes and looked.calls == stepped.calls == N_CODES
    semantic, pixel = oracle_image(model, COND, UNCOND, replace(sampling, parallel_window=0), np.random.default_rng(9))
    assert codes == semantic.ravel().tolist() + pixel.ravel().tolist()
    assert looked.levels["semantic"] == {"calls": N_SEM, "codes": N_SEM, "drafted": 0, "accepted": 0}
    assert len(model.body.calls) == N_CODES


def test_host_chosen_codes_are_fed_as_the_image():
    """append without compute_logits: the codes land in the cache as the image's, so the scores after them are
    the oracle's for those codes; the head only runs when asked."""
    model = Model()
    g = ImageGenerator(model.lm, GRID, COND, UNCOND, SamplingConfig(guidance_scale=3.0), np.random.default_rng(0))
    chosen = [(7 * i + 2) % (12 if CODE_LEVEL[i] == SEMANTIC else 10) for i in range(N_CODES)]
    for i, code in enumerate(chosen):
        if i in (4, 7, N_CODES - 1):
            np.testing.assert_allclose(g.compute_logits(), oracle_scores(model, COND, UNCOND, 3.0, chosen[:i]),
                                       rtol=1e-4, atol=1e-4)
        g.append(np.int64(code) if i % 2 else code)
        assert g.decided == i + 1 and g.calls == i + 1
    assert flat(g.result()) == chosen and all(type(c) is int for c in g.codes[SEMANTIC])
    assert sum(len(h.calls) for h in model.heads.values()) == 3
    assert g.result().steps == N_CODES and g.result().levels["pixel"]["codes"] == N_CODES - N_SEM


def test_append_refuses_what_is_not_a_code_of_the_level():
    g = ImageGenerator(Model().lm, GRID, COND, UNCOND, SamplingConfig(), np.random.default_rng(0))
    for bad in (True, False, 12, -1, 1.0, "3", [3], None):
        with pytest.raises(LayoutError) as info:
            g.append(bad)
        assert str(info.value) == f"a semantic code is a whole number from 0 to 11, got {bad!r}"
    assert g.decided == 0 and g.calls == 0  # nothing was fed
    g.append(0)
    g.append(11)
    for _ in range(N_SEM - 2):
        g.append(5)
    assert g.next_level == PIXEL
    with pytest.raises(LayoutError) as info:
        g.append(10)
    assert str(info.value) == "a pixel code is a whole number from 0 to 9, got 10"
    g.append(9)
    assert g.codes == {SEMANTIC: [0, 11] + [5] * (N_SEM - 2), PIXEL: [9]}


def test_a_batch_appends_one_code_per_image():
    g = ImageGenerator.batch(Model().lm, GRID, BATCH, SamplingConfig(), [np.random.default_rng(i) for i in range(3)])
    assert g.compute_logits().shape == (3, 12)
    for bad, got in (([1, 2], 2), (4, 1), ([1, 2, 3, 4], 4)):
        with pytest.raises(LayoutError) as info:
            g.append(bad)
        assert str(info.value) == f"append takes one code per image (3), got {got}"
    with pytest.raises(LayoutError, match=r"^a semantic code is a whole number from 0 to 11, got 12$"):
        g.append([1, 12, 3])
    with pytest.raises(LayoutError, match=r"got True$"):
        g.append((1, True, 3))
    g.append([1, 2, 3])
    g.append((4, 5, 6))
    g.append(np.array([7, 8, 9]))
    assert [g.image_codes(i)[SEMANTIC] for i in range(3)] == [[1, 4, 7], [2, 5, 8], [3, 6, 9]]
    assert g.codes is g.image_codes(0)
    two = ImageGenerator.batch(Model().lm, GRID, BATCH[:2], SamplingConfig(), [None, None])
    two.append([3, 4])
    two.append(np.array([5, 6]))
    assert two.image_codes(0)[SEMANTIC] == [3, 5] and two.image_codes(1)[SEMANTIC] == [4, 6]
    with pytest.raises(LayoutError, match=r"^append takes one code per image \(2\), got 1$"):
        two.append(3)


def test_a_batchs_scores_are_each_images_own():
    model = Model()
    g = ImageGenerator.batch(model.lm, GRID, BATCH, SamplingConfig(guidance_scale=2.0),
                             [np.random.default_rng(i) for i in range(3)])
    g.append([1, 2, 3])
    scores = g.compute_logits()
    for i, (cond, uncond) in enumerate(BATCH):
        np.testing.assert_allclose(scores[i], oracle_scores(model, cond, uncond, 2.0, [i + 1]), rtol=1e-4, atol=1e-4)


def test_results_before_and_calls_after_the_end():
    model = Model()
    g = ImageGenerator(model.lm, GRID, COND, UNCOND, SamplingConfig(greedy=True), None)
    assert (g.done, g.next_level, g.decided) == (False, SEMANTIC, 0)
    with pytest.raises(LayoutError) as info:
        g.result()
    assert str(info.value) == f"the image is not complete: {N_CODES} codes to go"
    levels = []
    while not g.done:
        levels.append(g.next_level)
        g.generate_next()
        if g.decided == 5:
            with pytest.raises(LayoutError, match=rf"^the image is not complete: {N_CODES - 5} codes to go$"):
                g.results()
    assert levels == CODE_LEVEL and g.next_level is None and g.decided == N_CODES
    calls = len(model.body.calls)
    for action in (g.generate_next, g.compute_logits, lambda: g.append(0)):
        with pytest.raises(LayoutError) as info:
            action()
        assert str(info.value) == "the image is complete: no next code"
    assert len(model.body.calls) == calls
    result = g.result()
    assert result.steps == calls == g.calls and result.levels == g.levels and result.levels is not g.levels
    result.levels["semantic"]["calls"] = -1
    result.timings["pixel"] = -1.0
    assert g.levels["semantic"]["calls"] == N_SEM and g.timings["pixel"] >= 0.0  # the result holds copies
    assert [r.pixel.tolist() for r in g.results()] == [g.result().pixel.tolist()]


def test_parallel_timings_count_each_levels_engine_calls_and_sampling(monkeypatch):
    """A clock that moves 1 per engine call and 1000 per sampling call (choose, or the window's probabilities):
    each level's time is exactly its calls, whichever path (compute_logits, plain, verify) decided its codes."""
    from illume_rt.runtime import generate

    ticks = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: ticks[0])
    model = Model()
    for engine in (model.body, model.heads["semantic"], model.heads["pixel"]):
        inner = engine.run
        engine.run = lambda *a, _inner=inner, **k: (ticks.__setitem__(0, ticks[0] + 1), _inner(*a, **k))[1]
    sampled = {SEMANTIC: 0, PIXEL: 0}
    g = None

    def ticking(inner):
        def run(*args, **kwargs):
            sampled[g.next_level] += 1
            ticks[0] += 1000
            return inner(*args, **kwargs)
        return run

    monkeypatch.setattr(generate, "choose", ticking(generate.choose))
    monkeypatch.setattr(generate, "_probabilities", ticking(generate._probabilities))
    g = ImageGenerator(model.lm, GRID, COND, UNCOND, SamplingConfig(top_k=3, parallel_window=4),
                       np.random.default_rng(1))
    g.compute_logits()  # the host looks at the first code: prefill, then one head call
    assert g.timings == {"prefill": 1.0, "semantic": 1.0, "pixel": 0.0}
    g.generate_next()
    g.compute_logits()  # and at the second: a body call and a head call, added to the level's time
    assert g.timings == {"prefill": 1.0, "semantic": 3.0 + 1000 * sampled[SEMANTIC], "pixel": 0.0}
    while not g.done:
        g.generate_next()
    levels = g.result().levels
    assert levels["semantic"]["calls"] < levels["semantic"]["codes"]  # verify calls among them
    # one body call and one head call per call; the prefill's body call counts as the prefill
    assert g.timings == {"prefill": 1.0,
                         "semantic": 2 * levels["semantic"]["calls"] - 1 + 1000.0 * sampled[SEMANTIC],
                         "pixel": 2 * levels["pixel"]["calls"] + 1000.0 * sampled[PIXEL]}
    assert sampled[PIXEL] > levels["pixel"]["calls"]  # windows sample several positions


def test_the_logits_processor_sees_guided_scores_and_decides():
    model = Model()
    seen = []

    def processor(scores, level, index):
        seen.append((level, index, scores.copy()))
        out = np.full_like(scores, -np.inf)
        out[(index + 2 * level) % scores.shape[0]] = 1.0
        return out

    sampling = SamplingConfig(guidance_scale=2.0, top_k=0)
    g = ImageGenerator(model.lm, GRID, COND, UNCOND, sampling, np.random.default_rng(0), logits_processor=processor)
    first = g.compute_logits()
    assert first.tolist() == [1.0] + [-np.inf] * 11  # what the host sees is the processor's output
    while not g.done:
        g.generate_next()
    assert [(lv, i) for lv, i, _ in seen] == [(SEMANTIC, i) for i in range(N_SEM)] + \
        [(PIXEL, i) for i in range(N_CODES - N_SEM)]
    codes = flat(g.result())
    assert codes == [i for i in range(N_SEM)] + [(i + 2) % 10 for i in range(N_CODES - N_SEM)]
    for n, (_, _, scores) in enumerate(seen):  # guided scores of the codes so far
        np.testing.assert_allclose(scores, oracle_scores(model, COND, UNCOND, 2.0, codes[:n]), rtol=1e-4, atol=1e-4)
    # a batch: the processor runs per image
    calls = []
    b = ImageGenerator.batch(model.lm, GRID, BATCH[:2], sampling, [np.random.default_rng(0)] * 2,
                             logits_processor=lambda s, lv, i: (calls.append((lv, i)), s)[1])
    b.generate_next()
    b.generate_next()
    assert calls == [(SEMANTIC, 0), (SEMANTIC, 0), (SEMANTIC, 1), (SEMANTIC, 1)]


# -- text ------------------------------------------------------------------------------------------------------------

def test_the_text_generator_steps_as_generate_text():
    model = Model()
    want = oracle_text(model, PROMPT, 6, 0.8, np.random.default_rng(3))
    g = TextGenerator(model.lm, PROMPT, 6, greedy=False, rng=np.random.default_rng(3), temperature=0.8)
    got = []
    while not g.done:
        scores = g.compute_logits()
        assert scores.shape == (VOCAB.semantic_code_offset,) and g.compute_logits() is scores
        got.append(g.generate_next())
    assert got == g.tokens == want
    assert len(model.body.calls) == 6  # the prefill, then one step per token but the last
    with pytest.raises(LayoutError) as info:
        g.compute_logits()
    assert str(info.value) == "the text is complete (length limit or stop token)"
    with pytest.raises(LayoutError, match=r"^the text is complete \(length limit or stop token\)$"):
        g.append(1)
    assert g.tokens == want and len(model.body.calls) == 6
    default = TextGenerator(model.lm, PROMPT, 10, greedy=False, rng=np.random.default_rng(5))
    while not default.done:
        default.generate_next()
    assert default.tokens == oracle_text(model, PROMPT, 10, 1.0, np.random.default_rng(5))  # temperature 1
    assert default.tokens != oracle_text(model, PROMPT, 10, 2.0, np.random.default_rng(5))


def test_text_done_stop_and_host_tokens():
    model = Model()
    want = oracle_text(model, PROMPT, 8)
    stop = next(k for k in range(2, 8) if want[k] not in want[:k])  # a token first produced at k
    g = TextGenerator(model.lm, PROMPT, 8, stop_ids=(want[stop],))
    assert not g.done
    while not g.done:
        g.generate_next()
    assert g.tokens == want[:stop + 1]
    assert TextGenerator(model.lm, PROMPT, 0).done
    capped = TextGenerator(Model(max_context=len(PROMPT) + 1).lm, PROMPT, 0)  # a cache of at least one
    assert capped.cache.capacity == len(PROMPT) + 1
    h = TextGenerator(model.lm, PROMPT, 5)
    h.append(5)  # a host's token, fed without looking
    h.append(np.int64(23))
    assert h.tokens == [5, 23] and type(h.tokens[1]) is int
    np.testing.assert_allclose(h.compute_logits(), model.logits(PROMPT + [5, 23], VOCAB.text_range),
                               rtol=1e-4, atol=1e-4)
    assert h.generate_next() == oracle_text(model, PROMPT + [5, 23], 1)[0]
    rows = VOCAB.semantic_code_offset
    for bad in (True, rows, -1, 2.0, "1"):
        with pytest.raises(LayoutError) as info:
            h.append(bad)
        assert str(info.value) == f"a text token is a whole number from 0 to {rows - 1}, got {bad!r}"
    h.append(0)  # the first and last text ids are tokens
    assert h.tokens[-1] == 0 and not h.done
    h2 = TextGenerator(model.lm, PROMPT, 1)
    h2.append(rows - 1)
    assert h2.done and h2.tokens == [rows - 1]


def test_text_bans_then_the_processor():
    model = Model()
    greedy = oracle_text(model, PROMPT, 1)[0]
    seen = []

    def processor(scores, level, index):
        seen.append((level, index, bool(np.isneginf(scores[greedy]))))
        out = np.full_like(scores, -np.inf)
        out[(index * 3 + 1) % scores.shape[0]] = 0.0
        return out

    g = TextGenerator(model.lm, PROMPT, 4, banned_ids=(greedy,), logits_processor=processor)
    while not g.done:
        g.generate_next()
    assert g.tokens == [1, 4, 7, 10] and [s[:2] for s in seen] == [(None, i) for i in range(4)]
    assert seen[0][2] is True  # the processor sees the ban
    plain = TextGenerator(model.lm, PROMPT, 2, banned_ids=(greedy,))
    assert plain.compute_logits()[greedy] == -np.inf and plain.generate_next() != greedy
    assert generate_text(model.lm, PROMPT, 2, banned_ids=(greedy,))[0] == oracle_text(
        model, PROMPT, 1, banned=(greedy,))[0]
    with pytest.raises(ValueError, match=r"^sampling needs an rng \(numpy Generator\)$"):
        TextGenerator(model.lm, PROMPT, 2, greedy=False)


def test_the_language_models_verify_reads_the_asked_positions():
    model = Model()
    cache = model.lm.new_cache(1, 12)
    model.lm.prefill(cache, [[1, 2, 3]])
    hidden = model.lm.verify(cache, [4, 5, 6, 7], [0, 2, 3])
    assert hidden.shape == (1, 3, HIDDEN) and cache.length == 7
    for j, upto in enumerate((4, 6, 7)):
        np.testing.assert_allclose(hidden[0, j], model.last_hidden([1, 2, 3, 4, 5, 6, 7][:upto]), rtol=1e-5,
                                   atol=1e-5)
    # a rewind forgets the last columns: the next step overwrites them
    cache.rewind(5)
    assert cache.length == 5 and cache.next_position.tolist() == [5] and cache.mask[0].tolist() == [1] * 5 + [0] * 7
    np.testing.assert_allclose(model.lm.step(cache, [9])[0], model.last_hidden([1, 2, 3, 4, 5, 9]), rtol=1e-5,
                               atol=1e-5)


def test_a_language_model_over_another_vocabulary():
    """head_rows and the codebooks follow the vocabulary the model was given (not the test's)."""
    vocab = compact_vocab_layout(text_vocab_size=10, semantic_codebook_size=5, pixel_codebook_size=7, row_multiple=8)
    rng = np.random.default_rng(0)
    heads = {w: type("Head", (), {"run": lambda self, feeds, _w=w: [np.zeros((feeds["hidden"].shape[0],
                                                                              vocab.head_range(_w)[1]
                                                                              - vocab.head_range(_w)[0]))]})()
             for w in ("text", "semantic", "pixel")}
    info = {"num_hidden_layers": 2, "num_key_value_heads": 1, "head_dim": HIDDEN, "max_context": 128}
    from test_generate_loop import FakeBody

    lm = LanguageModel(FakeBody(rng), heads, rng.standard_normal((vocab.vocab_rows, HIDDEN)).astype(np.float32),
                       info, vocab)
    assert [lm.head_rows(w) for w in ("text", "semantic", "pixel")] == [vocab.semantic_code_offset, 5, 7]
    g = ImageGenerator(lm, GRID, [1, 2], [1], SamplingConfig(top_k=0), np.random.default_rng(0))
    assert g.compute_logits().shape == (5,)
    with pytest.raises(LayoutError, match="from 0 to 4, got 5"):
        g.append(5)

"""The numpy sampler against straightforward definitions of guidance, top-k, top-p and inverse-CDF sampling."""

import numpy as np
import pytest

from illume_rt.contract import LayoutError

from illume_rt.runtime.options import SamplingConfig
from illume_rt.runtime.sampler import choose, guide, sample, warp

pytestmark = pytest.mark.runtime


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_guidance_on_a_range_equals_the_log_prob_mix():
    rng = np.random.default_rng(0)
    full_c, full_u = rng.normal(size=50), rng.normal(size=50)
    lo, hi, w = 10, 30, 2.0
    official = w * (log_softmax(full_c) - log_softmax(full_u)) + log_softmax(full_u)
    ours = guide(full_c[lo:hi], full_u[lo:hi], w)
    diff = official[lo:hi] - ours
    assert np.allclose(diff, diff[0])  # equal up to one constant
    np.testing.assert_array_equal(guide(full_c, full_u, 1.0), full_c)  # w = 1: the conditional row alone
    np.testing.assert_allclose(guide(full_c, full_u, 3.0), 3.0 * full_c - 2.0 * full_u)
    assert guide(full_c, None, 2.0) is full_c


def test_top_k_keeps_ties_and_removes_the_rest():
    scores = np.array([1.0, 5.0, 3.0, 3.0, 0.5])
    out = warp(scores, 1.0, 2, 1.0)
    assert np.isfinite(out).tolist() == [False, True, True, True, False]


def test_top_k_without_ties_keeps_exactly_k():
    scores = np.array([1.0, 5.0, 3.0, 2.0, 0.5, 4.0])
    for k, kept in ((1, [1]), (2, [1, 5]), (3, [1, 2, 5]), (5, [0, 1, 2, 3, 5]), (6, [0, 1, 2, 3, 4, 5])):
        assert np.flatnonzero(np.isfinite(warp(scores, 1.0, k, 1.0))).tolist() == kept, k
    assert np.isfinite(warp(scores, 1.0, 0, 1.0)).all()  # 0 disables top-k


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    out = warp(np.log(probs), 1.0, 0, 0.7)
    assert np.isfinite(out).tolist() == [True, True, False, False]
    out = warp(np.log(probs), 1.0, 0, 0.45)
    assert np.isfinite(out).tolist() == [True, False, False, False]


def test_temperature_scales():
    scores = np.array([1.0, 2.0])
    assert np.allclose(warp(scores, 0.5, 0, 1.0), scores * 2)


def test_inverse_cdf_sampling_frequencies():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    scores = np.log(np.where(probs > 0, probs, 1e-300))
    scores[1] = -np.inf
    rng = np.random.default_rng(1)
    draws = np.array([sample(scores, rng.random()) for _ in range(20000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    assert freq[1] == 0
    assert np.allclose(freq, probs, atol=0.015)


def test_choose_greedy_takes_argmax_without_drawing():
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    assert choose(np.array([0.1, 3.0, 2.0]), 1.0, 0, 1.0, True, rng) == 1
    assert rng.bit_generator.state == state


def test_sampling_config_levels_and_validation():
    cfg = SamplingConfig(top_k=100)
    assert cfg.level(0) == (1.0, 100, 1.0)
    assert cfg.level(1) == (1.0, 300, 1.0)
    assert SamplingConfig(top_k=100, pixel_top_k=7).level(1)[1] == 7
    for bad in (SamplingConfig(temperature=0), SamplingConfig(top_p=1.5), SamplingConfig(guidance_scale=0.5)):
        with pytest.raises(LayoutError):
            bad.validate()


def test_text_decoding_honours_its_temperature(tiny_pipe):
    """generate_text samples from softmax(logits / temperature): each draw matches the sampler fed the scaled
    logits, and a different temperature changes the draws."""
    from illume_rt.runtime.generate import generate_text

    lm = tiny_pipe.lm
    prompt = list(range(1, 9))
    runs = {t: generate_text(lm, prompt, 12, greedy=False, rng=np.random.default_rng(5), temperature=t)
            for t in (0.3, 1.0, 3.0)}
    assert len({tuple(r) for r in runs.values()}) == 3
    # the first token, by hand: the text head's logits for the prompt, scaled, inverse CDF of the same draw
    cache = lm.new_cache(1, 32)
    logits = lm.logits(lm.prefill(cache, [prompt]), "text")[0].astype(np.float64)
    for t, tokens in runs.items():
        assert tokens[0] == sample(warp(logits, t, 0, 1.0), np.random.default_rng(5).random())
    greedy = generate_text(lm, prompt, 12, greedy=True)
    assert generate_text(lm, prompt, 12, greedy=False, rng=np.random.default_rng(5), temperature=1e-4) == greedy


def test_removed_entries_are_minus_infinity_and_kept_ones_unchanged():
    scores = np.array([0.3, 2.7, -1.1, 1.9, 0.8])
    out = warp(scores, 0.7, 2, 1.0)
    assert out.tolist()[1::2] == pytest.approx([2.7 / 0.7, 1.9 / 0.7])  # temperature on fractional scores
    assert (out[[0, 2, 4]] == -np.inf).all()
    out = warp(np.log(np.array([0.5, 0.25, 0.25])), 1.0, 0, 0.5)  # exact: 0.5 reaches, does not cross, 0.5
    assert np.isfinite(out).tolist() == [True, True, False] and out[2] == -np.inf
    assert np.isfinite(warp(scores, 1.0, 10, 1.0)).all()  # top-k above the size keeps everything


def test_top_k_then_top_p_see_the_removed_entries():
    scores = np.log(np.array([0.05, 0.4, 0.3, 0.2, 0.05]))
    out = warp(scores, 1.0, 3, 0.6)  # top-k leaves 0.4, 0.3, 0.2; top-p over those (renormalized) keeps two
    assert np.isfinite(out).tolist() == [False, True, True, False, False]


def test_sampling_is_exact_at_the_edges():
    huge = np.array([800.0, 799.0, -np.inf])  # exp would overflow without the shift
    assert sample(huge, 0.5) == 0 and sample(huge, 0.8) == 1
    trailing = np.array([0.0, 0.0, -np.inf, -np.inf])
    assert sample(trailing, 1.0) == 1  # never a removed id, even for a draw at the very top
    assert sample(trailing, 0.0) == 0


def test_top_k_on_a_long_row_keeps_exactly_the_k_largest():
    scores = np.random.default_rng(7).permutation(1000).astype(np.float64) / 10.0  # distinct values
    for k in (1, 37, 500, 999):
        kept = np.flatnonzero(np.isfinite(warp(scores, 1.0, k, 1.0)))
        assert sorted(kept.tolist()) == sorted(np.argsort(-scores)[:k].tolist()), k


def test_top_p_on_huge_or_already_removed_scores():
    huge = np.array([800.0, 799.0, 790.0, 780.0])  # exp(800) overflows: the shift by the largest must be kept
    assert np.isfinite(warp(huge, 1.0, 0, 0.5)).tolist() == [True, False, False, False]
    assert np.isfinite(warp(huge, 1.0, 0, 0.8)).tolist() == [True, True, False, False]
    assert np.isfinite(warp(np.array([800.0, 0.0, -1.0]), 1.0, 0, 0.5)).tolist() == [True, False, False]
    scores = np.array([0.1, 2.0, 1.0, 0.5])
    assert np.isfinite(warp(scores, 1.0, 1, 0.5)).tolist() == [False, True, False, False]  # -inf after top-k

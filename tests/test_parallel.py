"""Parallel image decoding (speculative Jacobi decoding with lossless acceptance) and several images in one batch:
runtime/generate.py ImageGenerator. Greedy parallel decoding gives the plain loop's codes; sampled parallel
decoding keeps the per-position distribution (a two-sample test); image i of a batch equals a run of it alone with
seed + i."""

from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from illume_rt import LayoutError, SamplingConfig
from illume_rt.contract import MAX_IMAGES, PIXEL, SEMANTIC, ImageGrid, image_grid
from illume_rt.runtime.generate import ImageGenerator
from illume_rt.runtime.prompts import text_to_image_ids

SAMPLED = SamplingConfig(top_k=32, top_p=0.9)
PROMPT = "a red circle"


def test_greedy_parallel_decoding_gives_the_plain_codes_in_fewer_calls(tiny_pipe):
    greedy = SamplingConfig(greedy=True)
    plain = tiny_pipe.generate(PROMPT, seed=0, sampling=greedy)
    parallel = tiny_pipe.generate(PROMPT, seed=0, sampling=SamplingConfig(greedy=True, parallel_window=8))
    np.testing.assert_array_equal(parallel.tokens.semantic, plain.tokens.semantic)
    np.testing.assert_array_equal(parallel.tokens.pixel, plain.tokens.pixel)
    np.testing.assert_array_equal(parallel.image, plain.image)
    levels = parallel.tokens.levels
    assert plain.tokens.steps == image_grid(256, 256).num_codes
    assert parallel.tokens.steps == levels["semantic"]["calls"] + levels["pixel"]["calls"]
    assert parallel.tokens.steps < plain.tokens.steps  # Jacobi iterates of a greedy model do get accepted
    assert levels["semantic"]["accepted"] + levels["pixel"]["accepted"] > 0


def test_parallel_decoding_on_a_batch_keeps_each_image(tiny_pipe):
    """Greedy parallel decoding of two prompts in one batch: each image as the plain loop gives it alone."""
    prompts = [PROMPT, "a blue square at the bottom right"]
    got = tiny_pipe.generate(prompts, seed=0, sampling=SamplingConfig(greedy=True, parallel_window=6))
    for prompt, result in zip(prompts, got):
        want = tiny_pipe.generate(prompt, seed=0, sampling=SamplingConfig(greedy=True))
        np.testing.assert_array_equal(result.tokens.pixel, want.tokens.pixel)
        np.testing.assert_array_equal(result.tokens.semantic, want.tokens.semantic)


@pytest.mark.parametrize("sampling", [SAMPLED, SamplingConfig(greedy=True), SamplingConfig(guidance_scale=1.0)],
                         ids=["sampled", "greedy", "unguided"])
def test_image_i_of_a_batch_is_a_single_run_with_seed_plus_i(tiny_pipe, sampling):
    prompts = [PROMPT, "a blue square at the bottom right, large"]  # different lengths: left padding
    got = tiny_pipe.generate(prompts, seed=7, sampling=sampling, num_images=2)
    assert [r.seed for r in got] == [7, 8, 9, 10]
    singles = [tiny_pipe.generate(p, seed=7 + i, sampling=sampling)
               for i, p in enumerate([prompts[0], prompts[0], prompts[1], prompts[1]])]
    for result, want in zip(got, singles):
        np.testing.assert_array_equal(result.tokens.semantic, want.tokens.semantic)
        np.testing.assert_array_equal(result.tokens.pixel, want.tokens.pixel)
        np.testing.assert_array_equal(result.image, want.image)
    assert got[0].tokens.steps == singles[0].tokens.steps  # one body call per code for the whole batch
    if not sampling.greedy:  # (greedy, tiny's random weights draw the same picture for both prompts)
        assert not np.array_equal(got[0].tokens.pixel, got[1].tokens.pixel)  # seeds differ, so do the images


def test_bad_batch_and_window_requests_name_the_fix(tiny_pipe):
    with pytest.raises(LayoutError, match="num_images must be a whole number from 1 to 8"):
        tiny_pipe.generate(PROMPT, num_images=0)
    with pytest.raises(LayoutError, match="at most 8 decode in one batch: split the request"):
        tiny_pipe.generate([PROMPT] * 3, num_images=3)
    with pytest.raises(LayoutError, match="parallel_window must be 0 .off. or a whole number from 2 to 12"):
        tiny_pipe.generate(PROMPT, sampling=SamplingConfig(parallel_window=1))
    g = ImageGenerator.batch(tiny_pipe.lm, image_grid(256, 256),
                             [text_to_image_ids(tiny_pipe.tokenizer, tiny_pipe.vocab, PROMPT, 256, 256)] * 2,
                             SAMPLED, [np.random.default_rng(0), np.random.default_rng(1)])
    assert g.compute_logits().shape == (2, tiny_pipe.vocab.semantic_codebook_size)
    with pytest.raises(LayoutError, match=r"one code per image \(2\), got 1"):
        g.append([3])
    g.append([3, 4])
    assert g.image_codes(0)[SEMANTIC] == [3] and g.image_codes(1)[SEMANTIC] == [4]


def test_cli_writes_one_file_per_image_with_parallel_decoding(tiny_bundle, tmp_path, capsys):
    from PIL import Image

    from illume_rt.cli import main

    out = tmp_path / "pic.png"
    assert main(["generate", PROMPT, "--bundle", str(tiny_bundle), "-o", str(out), "-q", "--greedy",
                 "--num-images", "2", "--parallel-decoding", "6", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    want = [tmp_path / "pic-0.png", tmp_path / "pic-1.png"]
    assert all(p.is_file() for p in want) and not out.exists() and printed.count("wrote ") == 2
    alone = tmp_path / "alone.png"  # greedy: the codes do not depend on the seed
    assert main(["generate", PROMPT, "--bundle", str(tiny_bundle), "-o", str(alone), "-q", "--greedy"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(want[1])), np.asarray(Image.open(alone)))
    assert main(["generate", PROMPT, "--bundle", str(tiny_bundle), "-o", str(out), "--num-images", "9"]) == 2
    assert "--num-images: 9 is out of range" in capsys.readouterr().err


# --- the distribution test ---------------------------------------------------------------------------------------

FIRST_CODES = 12  # the first semantic codes: at 256x256 (9 per row) the windows cross a line's end
ALPHA = 0.01


def first_codes(pipe, sampling: SamplingConfig, seed: int, count: int = FIRST_CODES) -> list[int]:
    g = pipe.image_generator(PROMPT, seed=seed, sampling=sampling)
    while g.decided < count:
        g.generate_next()
    return g.codes[SEMANTIC][:count]


def two_sample_p_values(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Chi-square test of homogeneity per position (columns of a, b: [samples, positions]); codes seen fewer than
    10 times in both samples together are pooled into one category so that expected counts stay >= 5."""
    values = []
    for j in range(a.shape[1]):
        codes, counts = np.unique(np.concatenate([a[:, j], b[:, j]]), return_counts=True)
        rare = set(codes[counts < 10].tolist())
        keys = [c for c in codes if c not in rare] + (["rare"] if rare else [])
        table = np.array([[sum(1 for x in sample[:, j] if (x in rare if k == "rare" else x == k)) for k in keys]
                          for sample in (a, b)])
        values.append(1.0 if table.shape[1] < 2 else stats.chi2_contingency(table)[1])
    return values


def power(samples: int, categories: int, shift: float, tests: int, alpha: float = ALPHA) -> float:
    """Power of one position's test (Bonferroni level alpha/tests) against moving ``shift`` of probability between
    two of ``categories`` equally likely codes: noncentrality n/2 * sum (p1 - p2)^2 / ((p1 + p2) / 2)."""
    p = 1.0 / categories
    noncentrality = samples / 2 * 2 * shift ** 2 / p
    critical = stats.chi2.ppf(1 - alpha / tests, categories - 1)
    return float(stats.ncx2.sf(critical, categories - 1, noncentrality))


SEEDS = 300
SHARP = dict(top_k=6, pixel_top_k=6)  # six codes per position: marginals a few hundred draws can pin down


@pytest.mark.parametrize("window", [4, 8])
def test_sampled_parallel_decoding_keeps_the_distribution(tiny_pipe, window):
    """Per-position marginals of the first codes over many seeds, plain against parallel: no position differs at
    family-wise alpha 0.01 (Bonferroni). Power: test_the_power_stated_for_the_distribution_tests."""
    plain = np.array([first_codes(tiny_pipe, SamplingConfig(**SHARP), s) for s in range(SEEDS)])
    parallel = np.array([first_codes(tiny_pipe, SamplingConfig(**SHARP, parallel_window=window), 10_000 + s)
                         for s in range(SEEDS)])
    p_values = two_sample_p_values(plain, parallel)
    assert min(p_values) > ALPHA / FIRST_CODES, p_values


# --- the same test with power: a model whose next code depends strongly on the previous one ----------------------

class _MarkovBody:
    """An LLM body whose hidden state at a position is that position's embedding (one-hot token id): the head then
    gives logits that depend on the current token only, a sharp first-order chain over the codes. A Jacobi draft
    made before the previous code was decided is often wrong, so a wrong acceptance rule shows."""

    def run(self, feeds):
        embeds = feeds["inputs_embeds"]
        batch, seq, _ = embeds.shape
        return [embeds.copy(), np.zeros((1, 2, batch, 1, seq, 1), np.float32)]


class _Head:
    def __init__(self, weight):
        self.weight = weight

    def run(self, feeds):
        return [feeds["hidden"] @ self.weight]


def markov_lm(codebook: int = 4, seed: int = 0):
    from illume_rt.contract import compact_vocab_layout
    from illume_rt.runtime.generate import LanguageModel

    vocab = compact_vocab_layout(16, codebook, codebook)
    rng = np.random.default_rng(seed)
    # guidance mixes two rows: the conditional rows see the prompt's last token through the same one-hot path,
    # so both rows carry the chain; the spread of 3 makes each transition row sharp
    weight = rng.normal(0.0, 3.0, (vocab.vocab_rows, vocab.vocab_rows)).astype(np.float32)
    heads = {w: _Head(np.ascontiguousarray(weight[:, slice(*vocab.head_range(w))])) for w in ("semantic", "pixel")}
    info = {"num_hidden_layers": 1, "num_key_value_heads": 1, "head_dim": 1, "max_context": 4096}
    return LanguageModel(_MarkovBody(), heads, np.eye(vocab.vocab_rows, dtype=np.float32), info, vocab)


MARKOV_GRID = ImageGrid(256, 256, 3, 5, 2, 5)  # rows of 5: windows cross lines' ends and the level change
MARKOV_SEEDS = 1000
MARKOV_CODES = 20  # every code of this grid but the last pixel row


def markov_codes(lm, sampling: SamplingConfig, seed: int) -> list[int]:
    g = ImageGenerator(lm, MARKOV_GRID, [1, 2, 3], [1, 2], sampling, np.random.default_rng(seed))
    while g.decided < MARKOV_CODES:
        g.generate_next()
    return (g.codes[SEMANTIC] + g.codes[PIXEL])[:MARKOV_CODES]


def pair_columns(codes: np.ndarray, codebook: int) -> np.ndarray:
    """Each consecutive pair of codes as one category: the chain's transitions, not only its marginals."""
    return codes[:, :-1] * codebook + codes[:, 1:]


def test_the_power_stated_for_the_distribution_tests():
    # tiny/nano (300 draws per side, 6 codes, 12 positions, family-wise alpha 0.01): moving 0.15 of probability
    # between two codes at one position is caught with probability >= 0.9
    assert power(SEEDS, 6, 0.15, FIRST_CODES) >= 0.9
    # the chain (1000 per side, 4 codes, 39 tests): a shift of 0.1 at one position is caught with probability
    # >= 0.95 (the two broken rules of the test below give p-values below 1e-17 at 3000 per side)
    assert power(MARKOV_SEEDS, 4, 0.1, 2 * MARKOV_CODES - 1) >= 0.95


@pytest.mark.parametrize("sampling", [SamplingConfig(top_k=0, parallel_window=6),
                                      SamplingConfig(top_k=3, pixel_top_k=3, temperature=0.7, parallel_window=12)],
                         ids=["plain-warp", "top-k-and-temperature"])
def test_parallel_decoding_keeps_a_sharp_chain_distribution(sampling):
    """Per-position marginals and consecutive pairs of 20 codes over 1000 seeds, plain against parallel decoding,
    on a model where acceptance matters (most Jacobi drafts are stale): no difference at family-wise alpha 0.01.
    An acceptance rule that keeps drafts too often, or a rejection that resamples from p instead of the residual,
    fails it (checked by breaking runtime/generate.py ``_verify``)."""
    from dataclasses import replace

    lm = markov_lm()
    plain = np.array([markov_codes(lm, replace(sampling, parallel_window=0), s) for s in range(MARKOV_SEEDS)])
    parallel = np.array([markov_codes(lm, sampling, 50_000 + s) for s in range(MARKOV_SEEDS)])
    p_values = two_sample_p_values(plain, parallel) + two_sample_p_values(pair_columns(plain, 4),
                                                                          pair_columns(parallel, 4))
    assert min(p_values) > ALPHA / len(p_values), sorted(p_values)[:3]


# --- illume-nano: a trained model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nano_pipe():
    """The built-in nano bundle; ILLUME_RT_TEST_NANO_BUNDLE names one exported earlier (development only)."""
    import os

    from illume_rt.cli import ensure_default_bundle
    from illume_rt.runtime.pipeline import Pipeline

    bundle = os.environ.get("ILLUME_RT_TEST_NANO_BUNDLE") or ensure_default_bundle("nano", log=lambda m: None)
    return Pipeline.from_bundle(bundle, threads=1)


def test_sampled_parallel_decoding_keeps_nanos_distribution(nano_pipe):
    """As on tiny, on the trained model (its codes depend on the prompt and on each other)."""
    plain = np.array([first_codes(nano_pipe, SamplingConfig(**SHARP), s) for s in range(SEEDS)])
    parallel = np.array([first_codes(nano_pipe, SamplingConfig(**SHARP, parallel_window=12), 10_000 + s)
                         for s in range(SEEDS)])
    p_values = two_sample_p_values(plain, parallel)
    assert min(p_values) > ALPHA / FIRST_CODES, p_values


def test_nanos_scorer_accuracy_is_equal_with_parallel_decoding(nano_pipe):
    """The held-out prompts (nano/heldout.py) with default sampling, plain and parallel (different seeds): the share
    of pictures the scorer (nano/score.py) reads right, per attribute and all together, does not differ (Fisher's
    exact test, family-wise alpha 0.01 over the 6 rates). 90 pictures a side: this finds a gap of about 0.25 in a
    rate near 0.5, not a small one; the per-position tests above are the sharp check.
    The plain side runs in batches of the prompts: picture i is the one a call for prompt i alone with seed i gives
    (Pipeline.generate; test_image_i_of_a_batch_is_a_single_run_with_seed_plus_i). The parallel side stays one call
    per prompt: in a batch, parallel decoding keeps only the codes every image reached, which would hide its drafts."""
    from illume_rt.nano import data, heldout, score

    prompts = heldout.eval_prompts()
    plain = []
    for start in range(0, len(prompts), MAX_IMAGES):
        plain += nano_pipe.generate([prompt for prompt, _ in prompts[start:start + MAX_IMAGES]], (256, 256),
                                    seed=start, sampling=nano_pipe.default_sampling("text_to_image"))
    assert [r.seed for r in plain] == list(range(len(prompts)))
    marks = {"plain": [score.score_picture(r.image, wanted) for r, (_, wanted) in zip(plain, prompts)],
             "parallel": []}
    for i, (prompt, wanted) in enumerate(prompts):
        image = nano_pipe.generate(prompt, (256, 256), seed=1000 + i,
                                   sampling=replace(nano_pipe.default_sampling("text_to_image"),
                                                    parallel_window=12)).image
        marks["parallel"].append(score.score_picture(image, wanted))
    rates = {name: score.summarize(m) for name, m in marks.items()}
    for key in ["all", *data.ATTRIBUTES]:
        counts = []
        for name in ("plain", "parallel"):
            right = [m[key] for m in marks[name] if key in m]  # score_picture marks "all" too
            counts.append([sum(right), len(right) - sum(right)])
        assert stats.fisher_exact(counts)[1] > ALPHA / 6, (key, rates)

"""Guidance and sampling over one level's logits, in numpy.

Semantics follow ILLUME+'s InterleavedLogitsProcessor (ILLUME/generation_eval/models/inference_utils.py):
guidance on log-probabilities, hard mask, then temperature, top-k (ties at the k-th value kept), top-p
(the first token past the threshold kept). Inside one level every allowed token lies in one contiguous row
range and everything else is masked, so ``w*(lsm(c)-lsm(u)) + lsm(u)`` equals ``w*c + (1-w)*u`` on those rows
up to a constant, which softmax, top-k and top-p ignore: the runtime only computes the active rows.

Randomness: one uniform draw from a numpy Generator per sampled token, turned into a token by inverse CDF over
ascending ids. The PyTorch reference consumes the same stream the same way, so seeded runs agree token for token.
"""

from __future__ import annotations

import numpy as np


def guide(cond: np.ndarray, uncond: np.ndarray | None, scale: float) -> np.ndarray:
    """Classifier-free guidance on raw logits restricted to one level's rows."""
    if uncond is None or scale == 1.0:
        return cond
    return scale * cond + (1.0 - scale) * uncond


def warp(scores: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, then top-k, then top-p; removed entries become -inf. float64 in, float64 out."""
    scores = scores / temperature
    if 0 < top_k < scores.size:
        kth = np.partition(scores, scores.size - top_k)[scores.size - top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(-scores, kind="stable")
        sorted_scores = scores[order]
        probs = np.exp(sorted_scores - sorted_scores[0])
        cumulative = np.cumsum(probs / probs.sum())
        remove = np.zeros(scores.size, dtype=bool)
        remove[1:] = cumulative[:-1] > top_p  # keep the token that crosses the threshold
        scores = scores.copy()
        scores[order[remove]] = -np.inf
    return scores


def sample(scores: np.ndarray, uniform: float) -> int:
    """Inverse-CDF draw over ascending ids from already-warped scores."""
    probs = np.exp(scores - scores.max())
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    # a draw at the very top (uniform * total rounding to the total) lands past the last entry: take the last id
    # that has probability, never a removed one
    return min(index, int(np.flatnonzero(probs)[-1]))


def choose(scores: np.ndarray, temperature: float, top_k: int, top_p: float, greedy: bool,
           rng: np.random.Generator) -> int:
    """The next code index within the level (greedy: argmax, no random draw)."""
    if greedy:
        return int(np.argmax(scores))
    return sample(warp(scores.astype(np.float64), temperature, top_k, top_p), float(rng.random()))

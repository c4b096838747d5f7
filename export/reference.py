"""The PyTorch reference text-to-image loop: the oracle every runtime result is compared with.

Written the way the official code runs (ILLUME/generation_eval/models/inference_utils.py,
``InterleavedLogitsProcessor``), independently of the runtime's loop:

- transformers ``Qwen2ForCausalLM`` forwards one token at a time with its own cache; the unconditional prompt
  runs as a second, sequential forward with its own cache (batch 1 each);
- guidance on full-vocabulary log-probabilities: ``w*(lsm(cond) - lsm(uncond)) + lsm(uncond)``;
- a state machine counting tokens per row and rows per level builds the hard mask;
- temperature, top-k, top-p per level, applied once (as ILLUME/app.py does; the eval script applies HF's warpers a
  second time, which we do not follow, see README);
- a position whose mask allows exactly one token takes it without a random draw; otherwise one uniform from the
  numpy Generator picks the token by inverse CDF over ascending ids (the runtime draws the same way).

One deliberate difference from the official loop: ``<start_of_image>`` is forced after the prompt (the official
loop lets the model choose it from the text vocabulary), since the caller asked for an image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from typing import TYPE_CHECKING

from illume_rt.contract import ImageGrid, VocabLayout

if TYPE_CHECKING:  # the reference takes the runtime's options object (annotation only: export never imports runtime)
    from illume_rt.runtime.options import SamplingConfig


@dataclass
class ReferenceImage:
    semantic: np.ndarray
    pixel: np.ndarray
    token_ids: list[int]
    timings: dict = field(default_factory=dict)


class _ImageState:
    """The official processor's counters: level, tokens in the current row, rows in the current level."""

    def __init__(self, vocab: VocabLayout, grid: ImageGrid) -> None:
        self.vocab, self.grid = vocab, grid
        self.level: int | None = None
        self.tokens_in_row = 0
        self.rows_in_level = 0
        self.done = False

    def update(self, token: int) -> None:
        v = self.vocab
        if token in (v.start_of_level0_id, v.start_of_level1_id):
            self.level = 0 if token == v.start_of_level0_id else 1
            self.tokens_in_row = self.rows_in_level = 0
        elif token in (v.end_of_level0_id, v.end_of_level1_id):
            self.level = None
        elif token == v.end_of_image_id:
            self.done = True
        elif token == v.end_of_line_id:
            self.tokens_in_row = 0
            self.rows_in_level += 1
        elif self.level is not None:
            self.tokens_in_row += 1

    def allowed(self, last: int) -> tuple[int, int]:
        """[start, stop) of the ids the next token may take."""
        v, g = self.vocab, self.grid
        if self.level is not None:
            rows, cols = (g.semantic_rows, g.semantic_cols) if self.level == 0 else (g.pixel_rows, g.pixel_cols)
            end = v.end_of_level0_id if self.level == 0 else v.end_of_level1_id
            if self.rows_in_level == rows:
                return end, end + 1
            if self.tokens_in_row == cols:
                return v.end_of_line_id, v.end_of_line_id + 1
            return v.semantic_range if self.level == 0 else v.pixel_range
        follow = {v.start_of_image_id: v.start_of_level0_id, v.end_of_level0_id: v.start_of_level1_id,
                  v.end_of_level1_id: v.end_of_image_id}
        token = follow[last]
        return token, token + 1


def _warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The official _apply_sampling, on a [1, V] float64 tensor."""
    scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.size(-1)))[0][:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[:, 1:] = remove[:, :-1].clone()
        remove[:, 0] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    return scores


class _Stream:
    """One sequence with its own transformers cache, fed token by token."""

    def __init__(self, model, prompt) -> None:
        """``prompt``: token ids, or a [length, hidden] tensor of embeddings (image features spliced in)."""
        import inspect

        self.model = model
        # transformers 5 renamed past_key_values to cache
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if isinstance(prompt, torch.Tensor):
            self._consume(model(inputs_embeds=prompt[None], use_cache=True))
        else:
            self._consume(model(input_ids=torch.tensor([prompt]), use_cache=True))

    def _consume(self, out) -> None:
        self.past = getattr(out, self.cache_arg)
        self.logits = out.logits[:, -1].float()

    def feed(self, token: int) -> None:
        self._consume(self.model(input_ids=torch.tensor([[token]]), use_cache=True, **{self.cache_arg: self.past}))


def _extend(model, prompt, ids: list[int]):
    if isinstance(prompt, torch.Tensor):
        return torch.cat([prompt, model.get_input_embeddings()(torch.tensor(ids))])
    return list(prompt) + list(ids)


@torch.no_grad()
def reference_image_tokens(model, vocab: VocabLayout, grid: ImageGrid, cond_ids: list[int],
                           uncond_ids: list[int], sampling: SamplingConfig, rng: np.random.Generator,
                           max_codes: int | None = None,
                           on_scores: Callable[[int, np.ndarray], None] | None = None) -> ReferenceImage:
    """The image's tokens, decoded the official way (module docstring).

    ``max_codes``: stop once that many codes (of either level) are decided; ``semantic`` and ``pixel`` are then
    the flat codes so far (the grids are incomplete). ``on_scores(level, scores)``: called before each code is
    decided with the guided scores over that level's codebook (float64; the official full-vocabulary
    log-softmax form, so they differ from the runtime's raw-logit guidance by one constant per step)."""
    timings = {"prefill": 0.0, "semantic": 0.0, "pixel": 0.0}
    guided = sampling.guidance_scale != 1.0
    t0 = time.perf_counter()
    cond = _Stream(model, _extend(model, cond_ids, [vocab.start_of_image_id]))
    uncond = _Stream(model, _extend(model, uncond_ids, [vocab.start_of_image_id])) if guided else None
    timings["prefill"] = time.perf_counter() - t0
    state = _ImageState(vocab, grid)
    generated = [vocab.start_of_image_id]
    phase = "semantic"
    codes = 0
    while not state.done and (max_codes is None or codes < max_codes):
        t0 = time.perf_counter()
        level = state.level
        start, stop = state.allowed(generated[-1])
        if stop - start == 1:
            token = start
        else:
            scores = F.log_softmax(cond.logits.double(), dim=-1)
            if guided:
                u = F.log_softmax(uncond.logits.double(), dim=-1)
                scores = sampling.guidance_scale * (scores - u) + u
            if on_scores is not None:
                on_scores(level, scores[0, start:stop].numpy().copy())
            masked = torch.full_like(scores, -float("inf"))
            masked[:, start:stop] = scores[:, start:stop]
            if sampling.greedy:
                token = int(torch.argmax(masked, dim=-1))
            else:
                temperature, top_k, top_p = sampling.level(level)
                probs = torch.softmax(_warp(masked, temperature, top_k, top_p), dim=-1)[0]
                cdf = torch.cumsum(probs, dim=0)
                target = torch.tensor([float(rng.random()) * float(cdf[-1])], dtype=cdf.dtype)
                token = min(int(torch.searchsorted(cdf, target, right=True)), probs.numel() - 1)
        generated.append(token)
        codes += any(lo <= token < hi for lo, hi in (vocab.semantic_range, vocab.pixel_range))
        state.update(token)
        if not state.done and (max_codes is None or codes < max_codes):
            cond.feed(token)
            if guided:
                uncond.feed(token)
        timings[phase] += time.perf_counter() - t0
        if token == vocab.end_of_level0_id:
            phase = "pixel"
    sem_lo, sem_hi = vocab.semantic_range
    pix_lo, pix_hi = vocab.pixel_range
    semantic = [t - sem_lo for t in generated if sem_lo <= t < sem_hi]
    pixel = [t - pix_lo for t in generated if pix_lo <= t < pix_hi]
    semantic, pixel = np.asarray(semantic, dtype=np.int64), np.asarray(pixel, dtype=np.int64)
    if state.done:
        semantic = semantic.reshape(grid.semantic_rows, grid.semantic_cols)
        pixel = pixel.reshape(grid.pixel_rows, grid.pixel_cols)
    return ReferenceImage(semantic, pixel, generated, timings)


# ---------------------------------------------------------------------------------------------------------------
# Understanding and editing: image features computed the official way, then the loops above / below.
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_image_block(models, image: np.ndarray) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] -> the image block of embeddings, as ILLUME's encode_images builds it: the ViT view
    through torch's antialiased bicubic (ScalingLayerForQwen2ViT), the pixel encoder on the image as is."""
    from illume_rt.contract import CLIP_MEAN, CLIP_STD, semantic_size
    from illume_rt.contract import PIXEL_PATCH, SEMANTIC_PATCH

    x = torch.from_numpy(image)
    height, width = semantic_size(*image.shape[2:])
    unit = F.interpolate((x + 1) / 2, size=(height, width), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)
    mean, std = torch.tensor(CLIP_MEAN)[None, :, None, None], torch.tensor(CLIP_STD)[None, :, None, None]
    vit_in = (unit - mean) / std
    semantic = models.projectors.projector_1(models.vision_tower(vit_in))
    features = models.pixel_encoder(x)
    pixel = models.projectors.projector_2(features.flatten(2).transpose(1, 2)[0])
    vocab = models.preset.vocab
    embed = models.llm.get_input_embeddings()

    def tok(i):
        return embed(torch.tensor([i]))

    parts = [tok(vocab.start_of_image_id)]
    grids = ((semantic, height // SEMANTIC_PATCH, width // SEMANTIC_PATCH, vocab.start_of_level0_id,
              vocab.end_of_level0_id),
             (pixel, image.shape[2] // PIXEL_PATCH, image.shape[3] // PIXEL_PATCH, vocab.start_of_level1_id,
              vocab.end_of_level1_id))
    for feats, rows, cols, start, end in grids:
        parts.append(tok(start))
        for r in range(rows):
            parts += [feats[r * cols:(r + 1) * cols], tok(vocab.end_of_line_id)]
        parts.append(tok(end))
    parts.append(tok(vocab.end_of_image_id))
    return torch.cat(parts)


def reference_splice(models, ids: list[int], block: torch.Tensor) -> torch.Tensor:
    from illume_rt.contract import IMAGE_PLACEHOLDER

    at = ids.index(IMAGE_PLACEHOLDER)
    embed = models.llm.get_input_embeddings()
    with torch.no_grad():
        return torch.cat([embed(torch.tensor(ids[:at], dtype=torch.long)), block,
                          embed(torch.tensor(ids[at + 1:], dtype=torch.long))])


@torch.no_grad()
def reference_answer(models, prompt: torch.Tensor, max_new_tokens: int, banned: tuple[int, ...],
                     temperature: float = 1.0, rng: np.random.Generator | None = None) -> list[int]:
    """Text answer, one token per forward with the transformers cache: greedy, or with ``rng`` a draw from
    softmax(logits / temperature) by inverse CDF, one uniform per token (the runtime's sampled text)."""
    vocab = models.preset.vocab
    stream = _Stream(models.llm, prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = stream.logits[0].double()
        logits[list(banned)] = -float("inf")
        logits[vocab.semantic_code_offset:] = -float("inf")  # image codes never appear in text
        if rng is None:
            token = int(torch.argmax(logits))
        else:
            cdf = torch.cumsum(torch.softmax(logits / temperature, dim=-1), dim=0)
            target = torch.tensor([float(rng.random()) * float(cdf[-1])], dtype=cdf.dtype)
            token = min(int(torch.searchsorted(cdf, target, right=True)), logits.numel() - 1)
        out.append(token)
        if token == vocab.im_end_id:
            break
        stream.feed(token)
    return out

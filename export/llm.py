"""The ILLUME+ language model: transformers ``Qwen2ForCausalLM`` with the extended vocabulary, and its export form.

Export form (what the ONNX graph computes), built on the very parameters of the transformers module:

- ``LLMStep``: ``inputs_embeds`` [batch, seq, hidden], ``attention_mask`` [batch, past+seq] (1 real, 0 padding),
  ``position_ids`` [batch, seq], ``past_kv`` [past, layers, 2, batch, kv_heads, head_dim]  ->
  ``hidden`` [batch, hidden] (final-normed state of the last position) and ``new_kv`` [seq, layers, 2, batch,
  kv_heads, head_dim] (only the keys/values of the new positions).
  The cache's time axis is outermost, so the runtime keeps one preallocated buffer and passes its filled prefix
  (a contiguous view) as ``past_kv``; it writes ``new_kv`` after it. Nothing grows by concatenation and the graph
  never returns the whole cache. The same graph serves prefill (past = 0) and decode (seq = 1 or a run of
  forced tokens).
- ``LMHeadSlice``: the LM head restricted to one contiguous row range (text, semantic codes, pixel codes), so a
  decode step only reads the rows its level can emit.

Token embedding lookup happens in the runtime from the ``embed_tokens`` table of the bundle, because understanding
and editing splice image features between token embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from illume_rt.export.components import Component, TensorSpec, Tolerance
from illume_rt.export.configs import Preset


def build_llm(preset: Preset):
    """Random-weight ``Qwen2ForCausalLM`` for a preset (deterministic from ``preset.seed``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = preset.llm
    config = Qwen2Config(
        vocab_size=preset.vocab.vocab_rows, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=None, eos_token_id=preset.vocab.im_end_id, pad_token_id=preset.vocab.pad_id,
        attn_implementation="eager", dtype="float32",
    )
    torch.manual_seed(preset.seed)
    model = Qwen2ForCausalLM(config).eval()
    # The default init (std 0.02) makes a tiny random model's logits nearly flat; a larger head spread gives
    # distinct argmax decisions so greedy parity tests can fail when something is wrong.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.normal_(0.0, 1.0 / cfg.hidden_size ** 0.5)
    return model


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LLMStep(nn.Module):
    """One forward over ``seq`` new positions with an explicit KV cache (see module docstring)."""

    def __init__(self, hf_model) -> None:
        super().__init__()
        self.body = hf_model.model
        cfg = hf_model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        theta = _rope_theta(cfg)
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, inputs_embeds, attention_mask, position_ids, past_kv):
        batch, seq, _ = inputs_embeds.shape
        past = past_kv.shape[0]
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
        cos, sin = emb.cos(), emb.sin()

        # Additive mask [B, 1, S, P+S]: causal over absolute cache columns, and padding columns hidden.
        total = past + seq
        cols = torch.arange(total, device=inputs_embeds.device)
        rows = torch.arange(seq, device=inputs_embeds.device) + past
        allowed = (cols[None, :] <= rows[:, None])[None] & (attention_mask[:, None, :] > 0)
        neg = torch.finfo(torch.float32).min
        mask = torch.where(allowed, 0.0, neg)[:, None]

        hidden = inputs_embeds
        new_kv = []
        group = self.num_heads // self.num_kv_heads
        for index, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            new_kv.append(torch.stack((k, v)).permute(3, 0, 1, 2, 4))  # [S, 2, B, KVH, D]
            past_k = past_kv[:, index, 0].permute(1, 2, 0, 3)  # [B, KVH, P, D]
            past_v = past_kv[:, index, 1].permute(1, 2, 0, 3)
            keys = torch.cat((past_k, k), dim=2)
            values = torch.cat((past_v, v), dim=2)
            # Grouped-query attention without materialising repeated kv heads: fold the group into queries.
            qg = q.reshape(batch, self.num_kv_heads, group * seq, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(2, 3)) * (self.head_dim ** -0.5)
            scores = scores.view(batch, self.num_kv_heads, group, seq, total) + mask[:, :, None]
            probs = torch.softmax(scores, dim=-1).view(batch, self.num_kv_heads, group * seq, total)
            out = torch.matmul(probs, values).view(batch, self.num_heads, seq, self.head_dim)
            out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = self.body.norm(hidden[:, -1])
        return hidden, torch.stack(new_kv, dim=1)  # [S, L, 2, B, KVH, D]


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta")
    return float(theta)


class LMHeadSlice(nn.Module):
    """Logits for vocabulary rows [start, stop) only."""

    def __init__(self, hf_model, start: int, stop: int) -> None:
        super().__init__()
        weight = hf_model.get_output_embeddings().weight.detach()[start:stop].clone()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden):
        return torch.matmul(hidden, self.weight.t())


HEAD_RANGES = ("text", "semantic", "pixel")


def head_range(preset: Preset, which: str) -> tuple[int, int]:
    return preset.vocab.head_range(which)


def llm_component(preset: Preset, hf_model) -> Component:
    cfg = preset.llm
    layers, kvh, hd, hidden = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    max_ctx = cfg.max_position_embeddings

    def make_inputs(dims, rng):
        b, s, p = dims["batch"], dims["seq"], dims["past"]
        mask = np.ones((b, p + s), dtype=np.int64)
        mask[0, : min(2, p)] = 0  # exercise left padding in row 0
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, p:]
        return {
            "inputs_embeds": rng.standard_normal((b, s, hidden), dtype=np.float32),
            "attention_mask": mask,
            "position_ids": pos.astype(np.int64),
            "past_kv": rng.standard_normal((p, layers, 2, b, kvh, hd), dtype=np.float32),
        }

    return Component(
        name="llm",
        description="Qwen2 body: one step over new positions with an explicit, externally owned KV cache",
        inputs=(
            TensorSpec("inputs_embeds", "float32", ("batch", "seq", hidden)),
            TensorSpec("attention_mask", "int64", ("batch", "total")),
            TensorSpec("position_ids", "int64", ("batch", "seq")),
            TensorSpec("past_kv", "float32", ("past", layers, 2, "batch", kvh, hd)),
        ),
        outputs=(
            TensorSpec("hidden", "float32", ("batch", hidden)),
            TensorSpec("new_kv", "float32", ("seq", layers, 2, "batch", kvh, hd)),
        ),
        # total = past + seq; profiles: decode seq 1..8 (forced runs), prefill up to the context
        dims={
            "batch": (2, 3, (1, 2, 2)),
            "seq": (3, 5, (1, 1, max_ctx)),
            "past": (4, 2, (0, 512, max_ctx)),
            "total": (7, 7, (1, 512, max_ctx)),
        },
        build_module=lambda: LLMStep(hf_model).eval(),
        make_inputs=make_inputs,
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    )


def head_component(preset: Preset, hf_model, which: str) -> Component:
    start, stop = head_range(preset, which)
    hidden = preset.llm.hidden_size

    def make_inputs(dims, rng):
        return {"hidden": rng.standard_normal((dims["batch"], hidden), dtype=np.float32)}

    return Component(
        name=f"lm_head_{which}",
        description=f"LM head rows [{start}, {stop}) ({which})",
        inputs=(TensorSpec("hidden", "float32", ("batch", hidden)),),
        outputs=(TensorSpec("logits", "float32", ("batch", stop - start)),),
        dims={"batch": (2, 3, (1, 2, 2))},
        build_module=lambda: LMHeadSlice(hf_model, start, stop).eval(),
        make_inputs=make_inputs,
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    )

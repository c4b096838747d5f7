"""The ILLUME+ language model: transformers ``Qwen2ForCausalLM`` with the extended vocabulary, and its export form.

Export form (what the ONNX graph computes), built on the very parameters of the transformers module:

- ``LLMStep``: ``inputs_embeds`` [batch, seq, hidden], ``attention_mask`` [batch, past+seq] (1 real, 0 padding or
  not yet written), ``position_ids`` [batch, seq], and per layer ``past_key_<i>`` / ``past_value_<i>`` [batch,
  kv_heads, past, head_dim]  ->  ``hidden`` [batch, seq, hidden] (final-normed state of every new position: a decode step reads the last one,
  a verify step of speculative decoding all of them) and
  ``new_kv`` [layers, 2, batch, kv_heads, seq, head_dim] (only the keys/values of the new positions).
  The runtime keeps one preallocated cache [layers, 2, batch, kv_heads, capacity, head_dim] and passes each
  layer's keys and values as they lie in it (contiguous views: no copy), over the whole capacity; columns not
  yet written have mask 0 and get exactly zero attention weight (keys are stored after rotary embedding and
  positions are explicit). Attention takes the cache and the new positions as two operands (scores concatenated,
  values summed), so no op in the graph copies or concatenates the cache: step time does not grow with the
  context through copies. The runtime writes ``new_kv`` into the next columns. The same graph serves prefill
  (past = 0) and decode (seq = 1 or a run of forced tokens).
- ``LMHeadSlice``: the LM head restricted to one contiguous row range (text, semantic codes, pixel codes), so a
  decode step only reads the rows its level can emit.

Token embedding lookup happens in the runtime from the ``embed_tokens`` table of the bundle, because understanding
and editing splice image features between token embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from illume_rt.contract import (ATTENTION_MASK, HEADS, HIDDEN, INPUTS_EMBEDS, LOGITS, NEW_KV, POSITION_IDS,
                                cache_input_names)
from illume_rt.contract import head_component as head_component_name
from illume_rt.export import streaming
from illume_rt.export.components import Component, TensorSpec, Tolerance
from illume_rt.export.configs import Preset
from illume_rt.export.sampled import compare_stored, real_copy, sample_indices, storage_name


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

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        batch, seq, _ = inputs_embeds.shape
        cached = past[0].shape[2]
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
        cos, sin = emb.cos(), emb.sin()

        # Additive mask [B, 1, S, P+S]: cache columns by attention_mask alone (they all precede the new positions),
        # new columns causal and by attention_mask (left padding in a prefill).
        total = cached + seq
        cols = torch.arange(total, device=inputs_embeds.device)
        rows = torch.arange(seq, device=inputs_embeds.device) + cached
        allowed = (cols[None, :] <= rows[:, None])[None] & (attention_mask[:, None, :] > 0)
        neg = torch.finfo(torch.float32).min
        mask = torch.where(allowed, 0.0, neg)[:, None]

        hidden = inputs_embeds
        new_kv = []
        group = self.num_heads // self.num_kv_heads
        scale = self.head_dim ** -0.5
        for index, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            past_k, past_v = past[2 * index], past[2 * index + 1]  # [B, KVH, P, D]
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            new_kv.append(torch.stack((k, v)))  # [2, B, KVH, S, D]
            # Grouped-query attention without materialising repeated kv heads: fold the group into queries.
            qg = q.reshape(batch, self.num_kv_heads, group * seq, self.head_dim)
            scores = torch.cat((torch.matmul(qg, past_k.transpose(2, 3)), torch.matmul(qg, k.transpose(2, 3))), -1)
            scores = (scores * scale).view(batch, self.num_kv_heads, group, seq, total) + mask[:, :, None]
            probs = torch.softmax(scores, dim=-1).view(batch, self.num_kv_heads, group * seq, total)
            out = torch.matmul(probs[..., :cached], past_v) + torch.matmul(probs[..., cached:], v)
            out = out.view(batch, self.num_heads, seq, self.head_dim).transpose(1, 2)
            hidden = residual + attn.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.body.norm(hidden), torch.stack(new_kv)  # [L, 2, B, KVH, S, D]


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

        full = hf_model.get_output_embeddings().weight
        if streaming.is_fake(full):  # lazy (checkpoint) weights: read the head, keep the rows, when written
            with streaming.fake_mode():
                weight = nn.Parameter(torch.empty(stop - start, full.shape[1], dtype=full.dtype), requires_grad=False)
            streaming.lazy(weight, lambda: streaming.real_rows(full, start, stop))
            self.weight = weight
        else:
            self.weight = nn.Parameter(full.detach()[start:stop].clone(), requires_grad=False)

    def forward(self, hidden):
        return torch.matmul(hidden, self.weight.t())


HEAD_RANGES = HEADS


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
        if p > 3:
            mask[:, p - 1] = 0  # and a cache column not yet written
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, p:]
        feeds = {
            INPUTS_EMBEDS: rng.standard_normal((b, s, hidden), dtype=np.float32),
            ATTENTION_MASK: mask,
            POSITION_IDS: pos.astype(np.int64),
        }
        for name in cache_input_names(layers):
            feeds[name] = rng.standard_normal((b, kvh, p, hd), dtype=np.float32)
        return feeds

    return Component(
        name="llm",
        description="Qwen2 body: one step over new positions with an explicit, externally owned KV cache "
                    "(per-layer cache inputs over the whole capacity, masked; only new keys/values out)",
        inputs=(
            TensorSpec(INPUTS_EMBEDS, "float32", ("batch", "seq", hidden)),
            TensorSpec(ATTENTION_MASK, "int64", ("batch", "total")),
            TensorSpec(POSITION_IDS, "int64", ("batch", "seq")),
            *(TensorSpec(name, "float32", ("batch", kvh, "past", hd)) for name in cache_input_names(layers)),
        ),
        outputs=(
            TensorSpec(HIDDEN, "float32", ("batch", "seq", hidden)),
            TensorSpec(NEW_KV, "float32", (layers, 2, "batch", kvh, "seq", hd)),
        ),
        # total = past + seq; past is the cache's capacity on decode (0 on a prefill); profiles: decode seq 1..8
        # (forced runs), prefill up to the context
        dims={
            "batch": (2, 3, (1, 2, 2)),
            "seq": (3, 5, (1, 1, max_ctx)),
            "past": (4, 2, (0, 512, max_ctx)),
            "total": (7, 7, (1, 512, max_ctx)),
        },
        build_module=lambda: LLMStep(hf_model).eval(),
        make_inputs=make_inputs,
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
        verify_at_size=lambda path, seed, storage: verify_sampled_layers(preset, hf_model, path, seed, storage),
    )


def sample_layers(num_layers: int) -> list[int]:
    """The layers checked when the whole LLM is too large to compare with PyTorch: first, middle and last."""
    return sample_indices(num_layers)


def verify_sampled_layers(preset: Preset, hf_model, path, seed: int, storage) -> dict:
    """Verification of an LLM graph too large to compare whole (its weights are lazy, export/streaming.py).

    For each sampled layer: (1) the one-layer step graph, exported by the same code and streaming path with that
    layer's real weights and the final norm, is compared with PyTorch at two sizes per dim (export_onnx's full
    check); (2) every weight of that layer and the final norm in ``path``'s external data is compared byte for
    byte with the checkpoint tensor as stored. This proves the export form is right at this width on real
    weights and that the big graph stores those tensors under the right names; it does not run the big graph
    itself (its structure is the same code traced with more layers)."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from illume_rt.export.components import export_onnx

    cfg = preset.llm
    layers = sample_layers(cfg.num_hidden_layers)
    one_layer = dataclasses.replace(preset, llm=dataclasses.replace(cfg, num_hidden_layers=1))
    report: dict = {"ok": True, "method": "sampled", "layers": layers, "cases": [], "bytes_compared": 0,
                    "sample": f"LLM layers {layers} of {cfg.num_hidden_layers}, each exported as a one-layer step "
                              "graph with the final norm and compared with PyTorch at two sizes; the stored weights "
                              "of those layers and of the final norm compared byte for byte"}
    cosines, errors = [], []
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=Path(path).parent) as scratch:
        for index in layers:
            sub = _one_layer_model(one_layer, hf_model, index)
            comp = llm_component(one_layer, sub)
            comp.verify_at_size = None
            part = export_onnx(comp, comp.build_module(), Path(scratch) / f"layer{index}.onnx", seed=seed,
                               storage=storage_name(storage))
            report["cases"] += [{"layer": index, **case} for case in part["cases"]]
            cosines.append(part["worst_cosine"])
            errors.append(part["worst_max_abs_err"])
            del sub, comp
            names = [n for n in _layer_names(hf_model, index)] + ["body.norm.weight"]
            report["bytes_compared"] += compare_stored(path, {n: _tensor_of(hf_model, n) for n in names}, storage)
    report["worst_cosine"] = min(cosines)
    report["worst_max_abs_err"] = max(errors)
    return report


def _layer_names(hf_model, index: int) -> list[str]:
    return [f"body.layers.{index}.{name}" for name, _ in hf_model.model.layers[index].named_parameters()]


def _tensor_of(hf_model, name: str) -> torch.Tensor:
    """The hf model tensor of an ``LLMStep`` initializer name (``body.`` is ``hf_model.model``)."""
    return hf_model.model.get_parameter(name[len("body."):])


def _one_layer_model(one_layer: Preset, hf_model, index: int):
    """A one-layer ``Qwen2ForCausalLM`` holding real copies of layer ``index`` and the final norm (no embedding
    or head: the step graph reads neither)."""

    with torch.device("meta"):
        sub = build_llm(one_layer)
    sub.model.embed_tokens = None
    sub.lm_head = None
    rotary = sub.model.rotary_emb
    sub.model.rotary_emb = type(rotary)(config=sub.config)
    for target, source in ((sub.model.layers[0], hf_model.model.layers[index]), (sub.model.norm, hf_model.model.norm)):
        real_copy(target, source)
    for name, t in sub.named_parameters():
        if t.is_meta:
            raise RuntimeError(f"one-layer model: {name} was not filled")
    return sub.eval()


def head_component(preset: Preset, hf_model, which: str) -> Component:
    start, stop = head_range(preset, which)
    comp = _head_rows_component(preset, head_component_name(which), f"LM head rows [{start}, {stop}) ({which})",
                                stop - start, lambda: LMHeadSlice(hf_model, start, stop).eval())
    comp.verify_at_size = lambda path, seed, storage: verify_sampled_rows(preset, hf_model, which, path, seed,
                                                                          storage)
    return comp


def _head_rows_component(preset: Preset, name: str, description: str, rows: int, build_module) -> Component:
    hidden = preset.llm.hidden_size

    def make_inputs(dims, rng):
        return {HIDDEN: rng.standard_normal((dims["batch"], hidden), dtype=np.float32)}

    return Component(
        name=name,
        description=description,
        inputs=(TensorSpec(HIDDEN, "float32", ("batch", hidden)),),
        outputs=(TensorSpec(LOGITS, "float32", ("batch", rows)),),
        dims={"batch": (2, 3, (1, 2, 2))},
        build_module=build_module,
        make_inputs=make_inputs,
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    )


class _RowsHead(nn.Module):
    """An LM head over given (real) rows: what ``LMHeadSlice`` computes, for a sampled row range."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(rows, requires_grad=False)

    def forward(self, hidden):
        return torch.matmul(hidden, self.weight.t())


SAMPLE_ROWS = 1024  # rows per sampled range of an LM head too large to compare whole (the 7B text head: 2.0 GiB)


def sample_row_ranges(rows: int, size: int | None = None) -> list[tuple[int, int]]:
    """First, middle and last ``size`` rows of a head range of ``rows`` rows (fewer, merged, when they overlap)."""
    size = min(size or SAMPLE_ROWS, rows)
    starts = sorted({0, (rows - size) // 2, rows - size})
    ranges: list[tuple[int, int]] = []
    for a in starts:
        if ranges and a < ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], a + size)
        else:
            ranges.append((a, a + size))
    return ranges


def verify_sampled_rows(preset: Preset, hf_model, which: str, path, seed: int, storage) -> dict:
    """Verification of an LM-head graph too large to compare whole (the 7B text head, 2.0 GiB in fp32).

    For each sampled row range (first, middle, last ``SAMPLE_ROWS`` rows of the head's range): (1) a head graph over
    those rows, read from the checkpoint and exported by the same streaming path, compared with PyTorch at two
    batch sizes; (2) those rows of the big graph's stored weight compared byte for byte with the checkpoint's,
    reading only them. The head is one MatMul, so this proves the export form on real rows and that the big graph
    stores the sampled rows where they belong; it does not run the big graph or compare the other rows."""
    import tempfile
    from pathlib import Path

    from illume_rt.export.components import export_onnx
    from illume_rt.export.sampled import compare_stored_rows

    start, stop = head_range(preset, which)
    full = hf_model.get_output_embeddings().weight
    ranges = sample_row_ranges(stop - start)
    absolute = [[start + a, start + b] for a, b in ranges]
    report: dict = {"ok": True, "method": "sampled", "rows": absolute, "cases": [], "bytes_compared": 0,
                    "sample": f"LM head rows {absolute} of [{start}, {stop}), each range exported as a head graph "
                              "and compared with PyTorch at two batch sizes; those rows of the stored weight "
                              "compared byte for byte"}
    cosines, errors = [], []
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=Path(path).parent) as scratch:
        for a, b in ranges:
            rows = streaming.real_rows(full, start + a, start + b).contiguous()
            comp = _head_rows_component(preset, head_component_name(which), f"rows [{start + a}, {start + b})",
                                        b - a, lambda rows=rows: _RowsHead(rows).eval())
            part = export_onnx(comp, comp.build_module(), Path(scratch) / f"rows{a}.onnx", seed=seed,
                               storage=storage_name(storage))
            report["cases"] += [{"rows": [start + a, start + b], **case} for case in part["cases"]]
            cosines.append(part["worst_cosine"])
            errors.append(part["worst_max_abs_err"])
            report["bytes_compared"] += compare_stored_rows(path, "weight", rows, a, storage)
            del rows, comp
    report["worst_cosine"] = min(cosines)
    report["worst_max_abs_err"] = max(errors)
    return report

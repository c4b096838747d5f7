"""Accuracy of a quantized graph against the FP32 graph of the same bundle, on held-out runs of the runtime.

- ``record_eval``: runs the FP32 pipeline over the evaluation plan with every engine recorded (feeds and outputs,
  and one ordered event log per run so each head call is tied to the body call before it).
- ``graph_figures``: every output of a graph, quantized vs FP32 on the same feeds: worst cosine, max |err|.
- ``llm_teacher_forced``: the quantized body replays the FP32 run's exact inputs (the FP32 token sequence) with its
  **own** KV cache; at every sampled position the FP32 head slice turns both hidden states into logits. Figures per
  level (semantic, pixel; the guided scores of the two rows, what the sampler draws from) and for answers (greedy
  text logits): top-1 agreement and mean KL(FP32 || quantized) in nats.
- ``psnr``: decoded images, quantized vs FP32 (both clipped to [-1, 1], peak 2).
- ``refinement_figures``: the diffusion refinement end to end (token map, the UNet at every step of the schedule,
  the VAE decoder), quantized graphs vs FP32 from the same codes and noise (``record_eval`` keeps the FP32 pictures).
- ``prompt_scorers`` / ``prompt_gate``: end-to-end prompt accuracy, per figure (e.g. per attribute), FP32 vs
  quantized on the same prompts: illume-nano's scorer for nano bundles, plus any ``register_prompt_scorer`` added.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from illume_rt.calibration.datasets import CalibrationPlan, Recorder, plan_images, plan_refine, refinable

# name -> callable(pipeline) -> {figure: fraction right in [0, 1]} (e.g. one per attribute; a plain float counts as
# one figure, "accuracy"). Registered scorers apply to every bundle; ``model_scorers`` adds the scorer of a model the
# repository knows (illume-nano). quantize_bundle scores the FP32 and the quantized bundle on the same prompts and
# gates every figure (``prompt_gate``).
PROMPT_SCORERS: dict[str, Callable] = {}
# The most a quantized bundle may lose on any one figure of a prompt scorer, against FP32 (3 points: issue 13's
# quantize gate for nano). Per figure, not on their mean: a mean hides one attribute the quantized model lost.
MAX_PROMPT_ACCURACY_DROP = 0.03


def register_prompt_scorer(name: str, scorer: Callable) -> None:
    PROMPT_SCORERS[name] = scorer


def model_scorers(model: dict | None) -> dict[str, Callable]:
    """The prompt scorers of the bundle's model (its manifest's ``model``): nano's pixel and answer scorer
    (nano/heldout.py PromptScorer on every scene of nano's grammar, GATE_SPLIT, and the held-out questions;
    torch-free) for illume-nano, none otherwise."""
    if (model or {}).get("preset") == "nano":
        from illume_rt.nano.heldout import GATE_SPLIT, PromptScorer

        return {"nano": PromptScorer(which=GATE_SPLIT)}
    return {}


def prompt_scorers(model: dict | None) -> dict[str, Callable]:
    """Every scorer that applies to a bundle of ``model``: the model's own, then the registered ones."""
    return {**model_scorers(model), **PROMPT_SCORERS}


def score_prompts(scorer: Callable, pipe) -> dict[str, float]:
    """``scorer(pipe)`` as {figure: fraction}; a scorer of the old form (one float) gives {'accuracy': value}."""
    got = scorer(pipe)
    if isinstance(got, dict):
        return {str(k): float(v) for k, v in got.items()}
    return {"accuracy": float(got)}


def prompt_gate(name: str, fp32: dict[str, float], quantized: dict[str, float],
                informational: tuple[str, ...] = ()) -> list[str]:
    """Failures (readable lines) of one scorer: every figure but the ``informational`` ones may drop at most
    MAX_PROMPT_ACCURACY_DROP below FP32; a figure the quantized run lacks fails."""
    fails = []
    for key, want in fp32.items():
        if key in informational:
            continue
        got = quantized.get(key)
        if got is None or not math.isfinite(got):
            fails.append(f"prompt accuracy ({name}) {key}: no figure for the quantized bundle")
        elif want - got > MAX_PROMPT_ACCURACY_DROP + 1e-9:  # 1e-9: k/n fractions are not exact in binary
            fails.append(f"prompt accuracy ({name}) {key} {got:.3f} vs FP32 {want:.3f}: drop "
                         f"{want - got:.3f} > {MAX_PROMPT_ACCURACY_DROP}")
    return fails


def psnr(got: np.ndarray, want: np.ndarray, peak: float = 2.0) -> float:
    a, b = np.clip(got, -1, 1).astype(np.float64), np.clip(want, -1, 1).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d > 0 else (1.0 if np.array_equal(a, b) else 0.0)


def record_eval(pipe, plan: CalibrationPlan, refinements: bool = False) -> dict:
    """FP32 runs with everything recorded: {'generate': [...], 'understand': [...], 'calls': {component: [..]},
    'refinements': [...]}. ``refinements``: also refine the codes of every generated picture and of the plan's
    ``refine_checks`` (the reference of ``refinement_figures``; when the bundle has a diffusion decoder)."""
    comps = pipe.bundle.manifest["components"]
    out: dict = {"generate": [], "understand": [], "calls": {}, "refinements": []}
    refinements = refinements and refinable(comps)

    def swap(name, events, keep=lambda i: True):
        rec = Recorder(pipe.engines[name], keep, True, events)
        pipe.replace_engine(name, rec)
        return rec

    def restore(name, rec):
        pipe.replace_engine(name, rec.inner)

    def collect(names, events, run):
        recs = {n: swap(n, events) for n in names}
        try:
            result = run()
        finally:
            for n, r in recs.items():
                restore(n, r)
        for n, r in recs.items():
            out["calls"].setdefault(n, []).extend(r.calls)
        return result

    sampling = pipe.default_sampling("text_to_image")  # what a call without options runs (the model's defaults)
    for index, (prompt, resolution, seed) in enumerate(plan.generate):
        events: list = []
        names = ["llm", "lm_head_semantic", "lm_head_pixel", "pixel_decoder"]
        refine = None
        if index in plan.refine and refinable(comps):
            refine = plan_refine(pipe, plan)
            names += ["diffusion_unet", "vae_decoder"]
        result = collect(names, events, lambda: pipe.generate(prompt, tuple(resolution), seed=seed,
                                                               sampling=sampling, refine=refine))
        out["generate"].append({"prompt": prompt, "resolution": list(resolution), "seed": seed, "events": events,
                                "guidance": sampling.guidance_scale, "refine": refine, "image": result.image})
        if refinements:
            out["refinements"].append(_fp32_refinement(pipe, plan, result.tokens, resolution, seed))
    if refinements:
        for prompt, resolution, seed in plan.refine_checks:  # drawn for their codes only: nothing recorded
            result = pipe.generate(prompt, tuple(resolution), seed=seed, sampling=sampling)
            out["refinements"].append(_fp32_refinement(pipe, plan, result.tokens, resolution, seed))
    if plan.understand and "semantic_encoder" in comps:
        pool = plan_images(plan)
        names = list(pool)[:plan.max_images]
        for which, question in plan.understand:
            events = []
            name = names[which % len(names)]
            result = collect(["llm", "lm_head_text", "semantic_encoder", "pixel_embedder"], events,
                             lambda: pipe.understand(pool[name], question, max_new_tokens=plan.max_new_tokens))
            out["understand"].append({"image": name, "question": question, "events": events,
                                      "answer_tokens": len(result.token_ids)})
    return out


# The graphs of the diffusion refinement, in the order they run: each graph's own gate compares single calls on FP32
# inputs, but the UNet runs once per step, each step on the previous one's output, so an error it passes per call can
# grow along the schedule, and the calls of one refined picture say little about other scenes: illume-nano's INT8
# onnxruntime CPU UNet calibrated on one picture passed its gate (worst cosine 0.9985) and refined other scenes at
# 6.7 dB against FP32 (docs/quantization.md). So quantize also gates the chain end to end (``refinement_figures``).
REFINE_CHAIN = ("diffusion_unet", "vae_decoder")


def _fp32_refinement(pipe, plan: CalibrationPlan, tokens, resolution, seed: int) -> dict:
    """One generated picture's codes refined by the FP32 graphs, from noise seeded with ``seed``: the reference the
    quantized chain is compared with."""
    from illume_rt.contract import image_grid

    config, grid = plan_refine(pipe, plan), image_grid(*resolution)
    image, _ = pipe.refine_image(tokens.semantic, tokens.pixel, grid, config, np.random.default_rng(seed))
    return {"semantic": tokens.semantic, "pixel": tokens.pixel, "grid": grid, "config": config, "seed": seed,
            "image": image}


def refinement_figures(pipe, quantized: dict, refinements: list[dict]) -> dict:
    """The refinements ``record_eval`` kept, run again with the ``quantized`` engines ({component: engine}, some of
    REFINE_CHAIN) in place of the FP32 ones, from the same codes and noise: PSNR of each picture against FP32's. The
    pipeline's own engines for those components are closed afterwards (opened again, FP32, on next use)."""
    for name, engine in quantized.items():
        pipe.replace_engine(name, engine)
    try:
        scores = [psnr(pipe.refine_image(r["semantic"], r["pixel"], r["grid"], r["config"],
                                         np.random.default_rng(r["seed"]))[0], r["image"]) for r in refinements]
    finally:
        for name in quantized:
            pipe.engines.close(name)
    first = refinements[0]["config"]
    return {"worst_psnr_db": round(min(scores), 2), "mean_psnr_db": round(float(np.mean(scores)), 2),
            "pictures": len(scores), "steps": first.steps, "guidance": first.guidance_scale,
            "quantized": sorted(quantized)}


def graph_figures(engine, calls: list[dict], output_names: list[str], every: int = 1) -> dict:
    """Quantized ``engine`` vs the recorded FP32 outputs of ``calls`` (every ``every``-th)."""
    worst_cos, worst_err = 1.0, 0.0
    per_output = {n: {"worst_cosine": 1.0, "max_abs_err": 0.0} for n in output_names}
    used = 0
    for call in calls[::every]:
        got = engine.run(call["feeds"])
        used += 1
        for name, g, w in zip(output_names, got, call["outputs"]):
            c, e = _cos(g, w), float(np.max(np.abs(g.astype(np.float64) - w))) if w.size else 0.0
            fig = per_output[name]
            fig["worst_cosine"] = min(fig["worst_cosine"], c)
            fig["max_abs_err"] = max(fig["max_abs_err"], e)
            fig["ref_max_abs"] = max(fig.get("ref_max_abs", 0.0), float(np.max(np.abs(w))) if w.size else 0.0)
            worst_cos, worst_err = min(worst_cos, c), max(worst_err, e)
    return {"worst_cosine": worst_cos, "worst_max_abs_err": worst_err, "outputs": per_output, "cases": used}


def image_psnr(engine, calls: list[dict]) -> float:
    """Worst PSNR over recorded decoder calls (output 0 is the image)."""
    worst = math.inf
    for call in calls:
        worst = min(worst, psnr(engine.run(call["feeds"])[0], call["outputs"][0]))
    return worst


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = p_logits.astype(np.float64) - p_logits.max()
    q = q_logits.astype(np.float64) - q_logits.max()
    lp = p - np.log(np.exp(p).sum())
    lq = q - np.log(np.exp(q).sum())
    return float(np.sum(np.exp(lp) * (lp - lq)))


def _replay(lm, events: list, head_engines: dict, guide_scale: float | None) -> list[tuple[str, float, bool]]:
    """Feed the recorded body calls through ``lm`` (quantized body, own cache); per head call: (level, KL, agree)."""
    from illume_rt.runtime.sampler import guide

    body_calls = [c for n, c in events if n == "llm"]
    if not body_calls:
        return []
    batch = body_calls[0]["feeds"]["inputs_embeds"].shape[0]
    last = body_calls[-1]["feeds"]
    capacity = last["attention_mask"].shape[1]
    cache = lm.new_cache(batch, capacity)
    figures = []
    hidden_q = None
    for name, call in events:
        if name == "llm":
            f = call["feeds"]
            seq = f["inputs_embeds"].shape[1]
            hidden_q = lm._run(cache, f["inputs_embeds"], f["attention_mask"][:, -seq:], f["position_ids"])
            hidden_q = hidden_q[:, -1].copy()  # the heads read the last new position
        elif name.startswith("lm_head_"):
            which = name[len("lm_head_"):]
            want = call["outputs"][0]
            (got,) = head_engines[which].run({"hidden": hidden_q})
            if guide_scale is not None and want.shape[0] == 2:
                want, got = guide(want[0], want[1], guide_scale), guide(got[0], got[1], guide_scale)
            else:
                want, got = want[0], got[0]
            figures.append((which, _kl(want, got), int(np.argmax(want)) == int(np.argmax(got))))
    return figures


def llm_teacher_forced(quant_body, pipe, evals: dict) -> dict:
    """Top-1 agreement and mean KL per level (images) and for answers."""
    from illume_rt.runtime.generate import LanguageModel

    bundle = pipe.bundle
    heads = {w: pipe.lm.heads[w] for w in ("text", "semantic", "pixel")}
    lm = LanguageModel(quant_body, heads, bundle.table("embed_tokens"), bundle.llm, bundle.vocab)
    per: dict[str, list] = {"semantic": [], "pixel": [], "answer": []}
    for run in evals["generate"]:
        for which, kl, agree in _replay(lm, run["events"], heads, run["guidance"]):
            per[which].append((kl, agree))
    for run in evals["understand"]:
        for _, kl, agree in _replay(lm, run["events"], heads, None):
            per["answer"].append((kl, agree))
    figures = {}
    for key, vals in per.items():
        if vals:
            figures[key] = {"top1_agreement": float(np.mean([a for _, a in vals])),
                            "kl_mean": float(np.mean([k for k, _ in vals])),
                            "kl_max": float(np.max([k for k, _ in vals])), "positions": len(vals)}
    return figures

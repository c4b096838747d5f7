"""End-to-end token check at size: the first image codes of a short prompt, PyTorch reference vs the bundle.

Issue 16 ("Verification at size"): the large graphs are verified at export on a stated sample
(docs/bundle-format.md, "Export at size"); this check runs the whole model end to end on a short prompt, bounded in
memory, one side after the other:

1. The PyTorch reference (``export/reference.py reference_image_tokens``, transformers ``Qwen2ForCausalLM`` in
   float32 from the MLLM checkpoint, the weights rounded to the bundle's stored dtype if it is 16-bit) decodes the
   first ``codes`` image codes of the prompt, greedy with guidance, and records each code and the guided scores
   over its level's codebook. It runs in a child process (only the LLM is read from the checkpoint), which exits
   before step 2: its memory is returned whole, so the peak is the larger of the two sides, never their sum.
2. The runtime (onnxruntime CPU, the public step-wise API: ``Pipeline.image_generator``, ``compute_logits`` then
   ``generate_next``) decodes the same codes from the bundle.

Result: the codes must be equal (``ok``); per step the scores are compared after removing their mean (the reference
guides full-vocabulary log-probabilities, the runtime raw logits of the level's rows: the two differ by one constant
per step), as a cosine and a max abs error, with the reference's margin between its best and second-best code (a
margin near the error would make a differing code a tie, not a fault).

``illume-rt verify-tokens --checkpoint MLLM_DIR --bundle BUNDLE --codes 8 -o result.json [--record]``:
``--record`` adds the result to the manifest under the LLM's ``accuracy.end_to_end`` (the manifest is replaced
atomically; nothing else in the bundle changes). It lives in calibration/ (the layer above export and runtime:
it drives both), not in export/, which imports neither runtime nor the CLI.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

DEFAULT_PROMPT = "a cat"
DEFAULT_CODES = 8
DEFAULT_RESOLUTION = (256, 256)
DEFAULT_GUIDANCE = 2.0


def _peak_rss_gb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    except (ImportError, OSError):
        return None


def _sampling(guidance: float):
    from illume_rt.runtime.options import SamplingConfig

    sampling = SamplingConfig(guidance_scale=guidance, greedy=True)
    sampling.validate()
    return sampling


def prompt_ids(bundle: str | Path, prompt: str, resolution: tuple[int, int]):
    """(cond ids, uncond ids, vocab) of a text-to-image prompt with the bundle's tokenizer (no graph is opened)."""
    from illume_rt.runtime.bundle import load_bundle
    from illume_rt.runtime.prompts import text_to_image_ids
    from illume_rt.runtime.tokenizer import load_tokenizer

    b = load_bundle(bundle, verify=False)
    tokenizer = load_tokenizer(b.manifest["tokenizer"], b.path, b.vocab)
    cond, uncond = text_to_image_ids(tokenizer, b.vocab, prompt, *resolution)
    return cond, uncond, b.vocab


def reference_steps(llm, vocab, cond: list[int], uncond: list[int], resolution: tuple[int, int], guidance: float,
                    codes: int) -> dict:
    """The reference's first ``codes`` codes (greedy, guided) with the guided scores before each."""
    from illume_rt.contract import image_grid
    from illume_rt.export.reference import reference_image_tokens

    levels, scores = [], []

    def on_scores(level: int, values: np.ndarray) -> None:
        levels.append(int(level))
        scores.append(values)

    t0 = time.perf_counter()
    ref = reference_image_tokens(llm, vocab, image_grid(*resolution), cond, uncond, _sampling(guidance),
                                 np.random.default_rng(0), max_codes=codes, on_scores=on_scores)
    codes_by_step = [int(c) for c in (*ref.semantic.ravel(), *ref.pixel.ravel())]
    return {"codes": codes_by_step, "levels": levels, "scores": scores, "seconds": time.perf_counter() - t0}


def reference_from_checkpoint(checkpoint: str | Path, bundle: str | Path, prompt: str, resolution: tuple[int, int],
                              guidance: float, codes: int, threads: int | None = None,
                              base: str | None = None) -> dict:
    """``reference_steps`` on the checkpoint's LLM in float32 (only the LLM is read; rounded to the bundle's weight
    dtype when it stores 16-bit weights, as the export's own checks do)."""
    import torch

    from illume_rt.export import streaming
    from illume_rt.export.checkpoints import load_mllm
    from illume_rt.runtime.bundle import load_bundle

    if threads:
        torch.set_num_threads(threads)
    manifest = load_bundle(bundle, verify=False).manifest
    weight_dtype = manifest.get("export", {}).get("weight_dtype", "fp32")
    cond, uncond, vocab = prompt_ids(bundle, prompt, resolution)
    t0 = time.perf_counter()
    mllm = load_mllm(checkpoint, base=base, lazy=True)
    if mllm.preset.vocab.to_dict() != vocab.to_dict():
        from illume_rt.export.components import ExportError

        raise ExportError(f"{checkpoint} has another vocabulary layout than the bundle {bundle}: not the same model")
    llm = mllm.llm
    del mllm  # the vision tower and projectors hold only readers: nothing of them was read
    with streaming.materialized(llm, streaming.STORAGE_DTYPES[weight_dtype]):
        load_s = time.perf_counter() - t0
        out = reference_steps(llm, vocab, cond, uncond, resolution, guidance, codes)
    out.update(load_seconds=load_s, peak_rss_gb=_peak_rss_gb(), weight_dtype=weight_dtype)
    return out


def runtime_steps(bundle: str | Path, prompt: str, resolution: tuple[int, int], guidance: float, codes: int,
                  threads: int | None = None, verify: bool = True) -> dict:
    """The bundle's first ``codes`` codes on onnxruntime CPU through the step-wise API, with the guided scores
    before each."""
    from illume_rt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, backend="ort-cpu", threads=threads, verify=verify)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    generator = pipe.image_generator(prompt, resolution, seed=0, sampling=_sampling(guidance))
    levels, scores, got = [], [], []
    for _ in range(codes):
        if generator.done:
            break
        levels.append(int(generator.next_level))
        scores.append(np.array(generator.compute_logits(), dtype=np.float64))
        got.append(int(generator.generate_next()))
    return {"codes": got, "levels": levels, "scores": scores, "seconds": time.perf_counter() - t0,
            "load_seconds": load_s, "peak_rss_gb": _peak_rss_gb()}


def _centered(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values - values.mean()


def compare_steps(ref: dict, got: dict) -> dict:
    """Figures per step and overall; ``ok`` when every code is equal."""
    steps = []
    for i in range(max(len(ref["codes"]), len(got["codes"]))):
        step: dict = {"step": i}
        if i < len(ref["codes"]):
            step.update(level=ref["levels"][i], reference=ref["codes"][i])
            top = np.sort(ref["scores"][i])[-2:]
            step["reference_margin"] = float(top[-1] - top[0]) if top.size == 2 else None
        if i < len(got["codes"]):
            step["runtime"] = got["codes"][i]
        if i < len(ref["codes"]) and i < len(got["codes"]):
            a, b = _centered(got["scores"][i]), _centered(ref["scores"][i])
            if a.shape == b.shape:
                denom = np.linalg.norm(a) * np.linalg.norm(b)
                step["cosine"] = float(a @ b / denom) if denom > 0 else 1.0
                step["max_abs_err"] = float(np.max(np.abs(a - b)))
            else:
                step["error"] = f"scores over {a.shape} vs {b.shape}"
        step["equal"] = step.get("reference") == step.get("runtime") and "error" not in step
        steps.append(step)
    cosines = [s["cosine"] for s in steps if "cosine" in s]
    errors = [s["max_abs_err"] for s in steps if "max_abs_err" in s]
    first_diff = next((s["step"] for s in steps if not s["equal"]), None)
    return {"ok": first_diff is None and len(steps) > 0, "codes_compared": len(steps),
            "codes_equal": sum(s["equal"] for s in steps), "first_difference": first_diff,
            "worst_cosine": min(cosines) if cosines else None, "worst_max_abs_err": max(errors) if errors else None,
            "steps": steps}


def _reference_in_child(kwargs: dict) -> dict:
    """``reference_from_checkpoint`` in a fresh process (spawned: no torch state or heap shared with this one)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from illume_rt.export.components import ExportError

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(reference_from_checkpoint, **kwargs).result()
    except BrokenProcessPool:
        raise ExportError("the PyTorch reference process died before it finished (killed for memory? it holds the "
                          "LLM in float32: 4 bytes per parameter)") from None


def verify_tokens(checkpoint: str | Path | None, bundle: str | Path, prompt: str = DEFAULT_PROMPT,
                  codes: int = DEFAULT_CODES, resolution: tuple[int, int] = DEFAULT_RESOLUTION,
                  guidance: float = DEFAULT_GUIDANCE, threads: int | None = None, verify_bundle: bool = True,
                  base: str | None = None, reference_llm=None, log=print) -> dict:
    """The check (module docstring). The reference comes from ``checkpoint`` in a child process, or, for tests,
    from ``reference_llm`` (an in-memory ``Qwen2ForCausalLM``) in this one. Returns the result (JSON-ready)."""
    from illume_rt.contract import image_grid
    from illume_rt.errors import UsageError

    grid = image_grid(*resolution)
    if not 0 < codes <= grid.num_codes:
        raise UsageError(f"--codes must be 1 to {grid.num_codes} at {resolution[0]}x{resolution[1]}, got {codes}")
    if (checkpoint is None) == (reference_llm is None):
        raise UsageError("pass a checkpoint (or, in tests, a reference model): one of them")
    t0 = time.perf_counter()
    if reference_llm is not None:
        cond, uncond, vocab = prompt_ids(bundle, prompt, resolution)
        ref = reference_steps(reference_llm, vocab, cond, uncond, resolution, guidance, codes)
        ref["peak_rss_gb"] = None
    else:
        log(f"reference: {checkpoint} (PyTorch fp32, child process), {codes} codes")
        ref = _reference_in_child(dict(checkpoint=str(checkpoint), bundle=str(bundle), prompt=prompt,
                                       resolution=tuple(resolution), guidance=guidance, codes=codes,
                                       threads=threads, base=base))
    log(f"reference: {len(ref['codes'])} codes in {ref['seconds']:.1f}s; runtime: {bundle} (onnxruntime CPU)")
    got = runtime_steps(bundle, prompt, resolution, guidance, codes, threads, verify_bundle)
    result = compare_steps(ref, got)
    result.update({
        "method": "end_to_end_tokens",
        "prompt": prompt, "resolution": list(resolution), "guidance_scale": guidance, "greedy": True,
        "codes": codes,
        "reference": {"what": "transformers Qwen2ForCausalLM, float32"
                              + (f", weights rounded to {ref['weight_dtype']}" if ref.get("weight_dtype", "fp32")
                                 != "fp32" else ""),
                      "checkpoint": str(checkpoint) if checkpoint is not None else None,
                      "seconds": ref["seconds"], "load_seconds": ref.get("load_seconds"),
                      "peak_rss_gb": ref.get("peak_rss_gb")},
        "runtime": {"what": "onnxruntime CPU, Pipeline.image_generator", "bundle": str(bundle),
                    "seconds": got["seconds"], "load_seconds": got["load_seconds"],
                    "peak_rss_gb": got["peak_rss_gb"]},
        "total_seconds": time.perf_counter() - t0,
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return result


def summary(result: dict) -> dict:
    """What the manifest records (the per-step figures stay in the JSON result)."""
    keep = ("ok", "method", "prompt", "resolution", "guidance_scale", "greedy", "codes", "codes_equal",
            "first_difference", "worst_cosine", "worst_max_abs_err", "checked_at")
    out = {k: result[k] for k in keep}
    out["reference"] = result["reference"]["what"]
    out["min_reference_margin"] = min((s["reference_margin"] for s in result["steps"]
                                       if s.get("reference_margin") is not None), default=None)
    return out


def record_in_manifest(bundle: str | Path, result: dict) -> Path:
    """Add ``summary(result)`` to the manifest under ``components.llm.accuracy.end_to_end``: the new manifest is
    written beside the old one, flushed, and renamed over it (a crash leaves the old one or the new one)."""
    from illume_rt.contract import MANIFEST

    path = Path(bundle) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["components"]["llm"].setdefault("accuracy", {})["end_to_end"] = summary(result)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_result(path: str | Path, result: dict) -> Path:
    """The JSON result, written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

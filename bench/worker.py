"""One contender of the benchmark, run in its own process so that its peak resident memory is its own:
``python -m illume_rt.bench.worker SPEC.json OUT.json``.

Kinds: ``runtime`` (the bundle through onnxruntime, the runtime's own loop), ``reference`` (transformers, the
official way: see export/reference.py), ``ablations`` (loop variants on the runtime), ``runtime-text`` and
``peer-text`` (text decoding: this runtime vs onnxruntime-genai on the same body), ``int8`` (FP32 vs INT8 bundle
decode steps and prefill in one process, interleaved: bench/int8.py), ``parallel`` (parallel decoding and
several images per batch: bench/parallel.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from illume_rt.bench.measure import peak_rss_bytes, reset_peak_rss, rss_bytes, stats


def _sampling(spec: dict):
    from illume_rt.runtime.options import SamplingConfig

    return SamplingConfig(**spec.get("sampling", {}))


def _timed(fn, repeats: int, warmup: int) -> list:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def _prompts(bundle_path: str, prompt: str, resolution):
    from illume_rt.runtime.bundle import load_bundle
    from illume_rt.runtime.prompts import text_to_image_ids
    from illume_rt.runtime.tokenizer import load_tokenizer

    bundle = load_bundle(bundle_path, verify=False)
    tokenizer = load_tokenizer(bundle.manifest["tokenizer"], bundle.path, bundle.vocab)
    return text_to_image_ids(tokenizer, bundle.vocab, prompt, *resolution)


_BASELINE: dict = {}


def _baseline() -> None:
    """Resident memory of the process with its libraries imported, before any weights are loaded."""
    _BASELINE["rss"] = rss_bytes()


def _memory(load_peak: int | None, after_load: int | None) -> dict:
    return {"rss_before_load_bytes": _BASELINE.get("rss"), "peak_rss_load_bytes": load_peak,
            "rss_after_load_bytes": after_load, "peak_rss_generate_bytes": peak_rss_bytes()}


def _weights_split(bundle, components: list[str], tables: list[str]) -> dict:
    return {"graphs": {c: bundle.component(c)["bytes"] for c in components},
            "tables": {t: bundle.manifest["tables"][t]["bytes"] for t in tables}}


def run_runtime(spec: dict) -> dict:
    from illume_rt.bench.loops import probe_grid, step_time_at_context
    from illume_rt.runtime.generate import generate_image_tokens
    from illume_rt.contract import image_grid
    from illume_rt.runtime.pipeline import Pipeline

    _baseline()
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(spec["bundle"], threads=spec.get("threads"), verify=False)
    load_s = time.perf_counter() - t0
    load_peak, after_load = peak_rss_bytes(), rss_bytes()
    reset_peak_rss()
    sampling, k = _sampling(spec), spec["probe_codes"]
    out: dict = {"load_s": load_s, "resolutions": {}, "kv_cache_bytes": {}}
    whole = {}
    if spec.get("full"):
        # Whole images first, on the fresh pipeline: their peak is what a process generating that image holds,
        # without what the probes below leave behind.
        res = spec["resolutions"][0]

        def one_full():
            return pipe.generate(spec["prompt"], tuple(res), seed=spec.get("seed", 0), sampling=sampling).timings

        reset_peak_rss()
        fulls = _timed(one_full, spec.get("full_repeats", 1), 0)
        whole[f"{res[0]}x{res[1]}"] = ({name: stats([f[name] for f in fulls]) for name in fulls[0]},
                                       peak_rss_bytes())
    for res in spec["resolutions"]:
        res_key = f"{res[0]}x{res[1]}"
        grid = image_grid(*res)
        probe = probe_grid(grid, k)
        cond, uncond = _prompts(spec["bundle"], spec["prompt"], res)
        rng = np.random.default_rng(spec.get("seed", 0))

        def one_probe():
            tok = generate_image_tokens(pipe.lm, probe, cond, uncond, sampling, rng)
            return {"prefill": tok.timings["prefill"], "semantic_step": tok.timings["semantic"] / k,
                    "pixel_step": tok.timings["pixel"] / k}

        reset_peak_rss()
        runs = _timed(one_probe, spec["repeats"], spec["warmup"])
        capacity = max(len(cond), len(uncond)) + grid.num_tokens
        rows = 2 if sampling.guidance_scale != 1.0 else 1
        # the last steps of a whole image: the cache of the real capacity, filled to its end
        late = [step_time_at_context(pipe.lm, capacity - 8, steps=4, batch=rows, capacity=capacity)
                for _ in range(spec["repeats"])]
        out["kv_cache_bytes"][f"{res[0]}x{res[1]}"] = pipe.lm.new_cache(rows, capacity).nbytes
        sem = np.random.default_rng(1).integers(0, pipe.vocab.semantic_codebook_size,
                                                (grid.semantic_rows, grid.semantic_cols))
        pix = np.random.default_rng(2).integers(0, pipe.vocab.pixel_codebook_size, (grid.pixel_rows, grid.pixel_cols))

        def one_decode():
            t = time.perf_counter()
            pipe.decode_image(sem, pix)
            return time.perf_counter() - t

        peaks = {"tokens": peak_rss_bytes()}
        reset_peak_rss()
        decode = _timed(one_decode, spec["repeats"], 1)
        peaks["image_decode"] = peak_rss_bytes()
        entry = {
            "peak_rss_bytes": peaks,
            "grid": [grid.semantic_rows, grid.semantic_cols, grid.pixel_rows, grid.pixel_cols],
            "num_codes": grid.num_codes, "num_tokens": grid.num_tokens, "probe_codes_per_level": k,
            "prefill_s": stats([r["prefill"] for r in runs]),
            "semantic_step_s": stats([r["semantic_step"] for r in runs]),
            "pixel_step_s": stats([r["pixel_step"] for r in runs]),
            "pixel_step_late_s": stats(late),
            "image_decode_s": stats(decode),
        }
        if res_key in whole:
            entry["measured"], peaks["whole_image"] = whole[res_key]
        out["resolutions"][res_key] = entry
    out["memory"] = _memory(load_peak, after_load)
    out["memory"]["peak_rss_generate_bytes"] = max(p for e in out["resolutions"].values()
                                                  for p in e["peak_rss_bytes"].values())
    out["weights"] = _weights_split(pipe.bundle, ["llm", "lm_head_semantic", "lm_head_pixel", "pixel_decoder"],
                                    ["embed_tokens", "semantic_codebook", "pixel_codebook"])
    return out


def run_reference(spec: dict) -> dict:
    import torch

    from illume_rt.bench.loops import probe_grid
    from illume_rt.export.configs import get_preset
    from illume_rt.export.llm import build_llm
    from illume_rt.export.networks.dualvitok import build_dualvitok_pixel
    from illume_rt.export.reference import reference_image_tokens
    from illume_rt.runtime.bundle import load_bundle
    from illume_rt.contract import image_grid

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    bundle = load_bundle(spec["bundle"], verify=False)
    preset = get_preset(bundle.manifest["model"]["preset"])
    _baseline()
    t0 = time.perf_counter()
    model = build_llm(preset)
    tokenizer_model = build_dualvitok_pixel(preset)
    load_s = time.perf_counter() - t0
    # same weights as the bundle: the embedding table of the reference equals the bundle's
    table = bundle.table("embed_tokens")
    same = bool(np.array_equal(model.get_input_embeddings().weight[:64].detach().numpy(), table[:64])
                and np.array_equal(model.get_input_embeddings().weight[-64:].detach().numpy(), table[-64:]))
    if not same:
        raise RuntimeError("the reference's weights differ from the bundle's; re-export the bench bundle")
    load_peak, after_load = peak_rss_bytes(), rss_bytes()
    reset_peak_rss()
    sampling, k = _sampling(spec), spec["probe_codes"]
    vocab = bundle.vocab
    out: dict = {"load_s": load_s, "resolutions": {}, "same_weights_as_bundle": same}
    for res in spec["resolutions"]:
        res_key = f"{res[0]}x{res[1]}"
        grid = image_grid(*res)
        probe = probe_grid(grid, k)
        cond, uncond = _prompts(spec["bundle"], spec["prompt"], res)
        rng = np.random.default_rng(spec.get("seed", 0))

        def one_probe(cond=cond, uncond=uncond):
            ref = reference_image_tokens(model, vocab, probe, cond, uncond, sampling, rng)
            tokens = len(ref.token_ids) - 1  # positions fed after the prompt (forced ones included)
            return {"prefill": ref.timings["prefill"],
                    "token_step": (ref.timings["semantic"] + ref.timings["pixel"]) / tokens}

        runs = _timed(one_probe, spec["repeats"], spec["warmup"])
        # The same probe at the end of an image: both prompts lengthened by the image's other positions, so the
        # probe's steps run with the cache an image of this size ends with (transformers' cache grows by
        # concatenation, so its late steps cost more than the early ones).
        filler = [cond[i % len(cond)] for i in range(grid.num_tokens - probe.num_tokens)]
        late = _timed(lambda: one_probe(cond + filler, uncond + filler), spec["repeats"], 0)
        sem = torch.from_numpy(np.random.default_rng(1).integers(0, vocab.semantic_codebook_size,
                                                                 (1, grid.semantic_rows, grid.semantic_cols)))
        pix = torch.from_numpy(np.random.default_rng(2).integers(0, vocab.pixel_codebook_size,
                                                                 (1, grid.pixel_rows, grid.pixel_cols)))

        def one_decode():
            t = time.perf_counter()
            with torch.no_grad():
                tokenizer_model.decode_code(sem, pix)
            return time.perf_counter() - t

        decode = _timed(one_decode, spec["repeats"], 1)
        entry = {"grid": [grid.semantic_rows, grid.semantic_cols, grid.pixel_rows, grid.pixel_cols],
                 "num_codes": grid.num_codes, "num_tokens": grid.num_tokens, "probe_codes_per_level": k,
                 "prefill_s": stats([r["prefill"] for r in runs]),
                 "token_step_s": stats([r["token_step"] for r in runs]),
                 "token_step_late_s": stats([r["token_step"] for r in late]),
                 "image_decode_s": stats(decode)}
        if spec.get("full"):
            def one_full():
                ref = reference_image_tokens(model, vocab, grid, cond, uncond, sampling, np.random.default_rng(0))
                return {**ref.timings, "total": sum(ref.timings.values())}

            fulls = _timed(one_full, spec.get("full_repeats", 1), 0)
            entry["measured"] = {name: stats([f[name] for f in fulls]) for name in fulls[0]}
        out["resolutions"][res_key] = entry
    out["memory"] = _memory(load_peak, after_load)
    out["weights"] = {"torch_parameters": {"llm": sum(p.numel() * p.element_size() for p in model.parameters()),
                                           "dualvitok": sum(p.numel() * p.element_size()
                                                            for p in tokenizer_model.parameters())}}
    return out


def _open_lm(bundle_path: str, threads, heads=("semantic", "pixel"), io_binding: bool = True,
             spin: bool | None = None):
    from illume_rt.engines.ort import OrtEngine
    from illume_rt.runtime.bundle import load_bundle
    from illume_rt.runtime.generate import LanguageModel

    bundle = load_bundle(bundle_path, verify=False)

    def engine(name):
        return OrtEngine(name, bundle.component_path(name), "ort-cpu", threads, io_binding=io_binding, spin=spin)

    return bundle, LanguageModel(engine("llm"), {h: engine(f"lm_head_{h}") for h in heads},
                                 bundle.table("embed_tokens"), bundle.llm, bundle.vocab)


def run_ablations(spec: dict) -> dict:
    """Loop variants, interleaved repeat by repeat, at the first resolution."""
    from illume_rt.bench.loops import probe_grid, step_time_at_context, variant_image_tokens
    from illume_rt.runtime.generate import generate_image_tokens
    from illume_rt.contract import image_grid

    threads = spec.get("threads")
    bundle, lm = _open_lm(spec["bundle"], threads, heads=("text", "semantic", "pixel"))
    _, lm_plain = _open_lm(spec["bundle"], threads, heads=("semantic", "pixel"), io_binding=False)
    _, lm_spin = _open_lm(spec["bundle"], threads, heads=("semantic", "pixel"), spin=True)
    sampling, k = _sampling(spec), spec["probe_codes"]
    res = spec["resolutions"][0]
    probe = probe_grid(image_grid(*res), k)
    cond, uncond = _prompts(spec["bundle"], spec["prompt"], res)
    variants = {
        "runtime loop (batched guidance, active head, io binding)":
            lambda rng: generate_image_tokens(lm, probe, cond, uncond, sampling, rng),
        "io binding off (session.run, outputs copied)":
            lambda rng: generate_image_tokens(lm_plain, probe, cond, uncond, sampling, rng),
        "intra-op spinning on (onnxruntime's default)":
            lambda rng: generate_image_tokens(lm_spin, probe, cond, uncond, sampling, rng),
        "sequential guidance (second forward)":
            lambda rng: variant_image_tokens(lm, probe, cond, uncond, sampling, rng, guidance="sequential"),
        "full head, forced tokens one by one":
            lambda rng: variant_image_tokens(lm, probe, cond, uncond, sampling, rng, head="full"),
    }
    per = {name: [] for name in variants}
    for rep in range(spec["warmup"] + spec["repeats"]):
        for name, fn in variants.items():
            tok = fn(np.random.default_rng(rep))
            if rep >= spec["warmup"]:
                per[name].append((tok.timings["semantic"] + tok.timings["pixel"]) / (2 * k))
    contexts = spec.get("contexts", [32, 256, 512, 1024, 1536])
    sweep = {str(c): stats([step_time_at_context(lm, c, steps=4) for _ in range(max(1, spec["repeats"] - 1))])
             for c in contexts}
    return {"resolution": f"{res[0]}x{res[1]}", "probe_codes_per_level": k,
            "per_code_s": {name: stats(v) for name, v in per.items()}, "step_vs_context_s": sweep}


def _text_prompt(spec: dict) -> list[int]:
    return [int(i) for i in np.random.default_rng(7).integers(0, 256, spec.get("text_prompt_len", 32))]


def run_runtime_text(spec: dict) -> dict:
    from illume_rt.runtime.generate import generate_text

    import onnxruntime  # noqa: F401  (imported before the baseline, as the peer's is)

    _baseline()
    t0 = time.perf_counter()
    _, lm = _open_lm(spec["bundle"], spec.get("threads"), heads=("text",))
    load_s = time.perf_counter() - t0
    load_peak, after_load = peak_rss_bytes(), rss_bytes()
    reset_peak_rss()
    prompt, n = _text_prompt(spec), spec["text_tokens"]
    tokens: list[int] = []

    def timed(count):
        nonlocal tokens
        t = time.perf_counter()
        tokens = generate_text(lm, prompt, count, greedy=True)
        return time.perf_counter() - t

    firsts, wholes = [], []
    for rep in range(spec["warmup"] + spec["repeats"]):
        a, b = timed(1), timed(n)
        if rep >= spec["warmup"]:
            firsts.append(a)
            wholes.append(b)
    return _text_result(firsts, wholes, n, tokens, load_s, load_peak, after_load, "text rows only (151,704)")


def _text_result(firsts, wholes, n, tokens, load_s, load_peak, after_load, head) -> dict:
    decode = [(b - a) / (n - 1) for a, b in zip(firsts, wholes)]
    return {"load_s": load_s, "new_tokens": n, "first_token_s": stats(firsts), "total_s": stats(wholes),
            "decode_step_s": stats(decode), "decode_tokens_per_s": (n - 1) / (np.median(wholes) - np.median(firsts)),
            "first_tokens": tokens[:8], "head": head, "memory": _memory(load_peak, after_load)}


def run_peer_text(spec: dict) -> dict:
    import onnxruntime_genai as og

    _baseline()
    t0 = time.perf_counter()
    model = og.Model(spec["peer_model"])
    load_s = time.perf_counter() - t0
    load_peak, after_load = peak_rss_bytes(), rss_bytes()
    reset_peak_rss()
    prompt, n = _text_prompt(spec), spec["text_tokens"]
    tokens: list[int] = []

    def timed(count):
        nonlocal tokens
        t = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + count, min_length=len(prompt) + count, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        produced = 0
        while produced < count and not gen.is_done():
            gen.generate_next_token()
            produced += 1
        tokens = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
        return time.perf_counter() - t

    firsts, wholes = [], []
    for rep in range(spec["warmup"] + spec["repeats"]):
        a, b = timed(1), timed(n)
        if rep >= spec["warmup"]:
            firsts.append(a)
            wholes.append(b)
    return _text_result(firsts, wholes, n, tokens, load_s, load_peak, after_load, "full vocabulary (283,047)")


def run_parallel(spec: dict) -> dict:
    from illume_rt.bench.parallel import run_parallel as measure

    return measure(spec)


def run_int8(spec: dict) -> dict:
    from illume_rt.bench.int8 import run_worker_spec

    return run_worker_spec(spec)


KINDS = {"runtime": run_runtime, "reference": run_reference, "ablations": run_ablations,
         "runtime-text": run_runtime_text, "peer-text": run_peer_text, "int8": run_int8,
         "parallel": run_parallel}


def main(argv: list[str]) -> int:
    from illume_rt.engines.ort import release_large_blocks_promptly

    release_large_blocks_promptly()  # as the CLI does for its process (docs/runtime.md): the memory figures are the CLI's
    spec = json.loads(Path(argv[0]).read_text())
    result = KINDS[spec["kind"]](spec)
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

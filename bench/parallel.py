"""Parallel image decoding and several images per batch, measured (issue 14): ``illume-rt bench --parallel``.

Three measurements, each a ratio taken in one process, runs interleaved:

- ``acceptance``: whole images with the plain loop and with parallel decoding (speculative Jacobi decoding, window
  k), same prompt, seeds 0..n-1: body calls per image, codes decided per call and drafts accepted per level, wall
  time per image. Meaningful on a trained model (nano): random weights give near-uniform distributions.
- ``verify_cost``: one body call plus the head over its positions, of width w = 1 (a plain step) and of a verify
  window of k codes, at the context of a whole image: what a verify step costs against a plain step on this CPU.
  With codes-per-call from ``acceptance`` this projects the per-image gain.
- ``batch``: N images of one prompt in one batch (2N rows) against N runs one after the other: images per second,
  and peak resident memory of each.
"""

from __future__ import annotations

import time

import numpy as np

from illume_rt.bench.measure import peak_rss_bytes, reset_peak_rss


def _pipeline(bundle: str, threads):
    from illume_rt.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(bundle, threads=threads)


def measure_acceptance(pipe, resolution, windows: list[int], seeds: int, prompt: str, sampling_kwargs: dict) -> dict:
    """Whole images, plain and parallel with each window, interleaved per seed."""
    from dataclasses import replace

    from illume_rt.runtime.options import SamplingConfig

    plain_cfg = SamplingConfig(**sampling_kwargs)
    modes = {"plain": plain_cfg, **{f"window {w}": replace(plain_cfg, parallel_window=w) for w in windows}}
    runs: dict = {name: [] for name in modes}
    pipe.generate(prompt, resolution, seed=0, sampling=plain_cfg)  # warm-up: first-call allocations
    for seed in range(seeds):
        for name, cfg in modes.items():
            t0 = time.perf_counter()
            result = pipe.generate(prompt, resolution, seed=seed, sampling=cfg)
            wall = time.perf_counter() - t0
            runs[name].append({"wall_s": wall, "calls": result.tokens.steps, "levels": result.tokens.levels})
    out = {"windows": windows, "seeds": seeds, "resolution": list(resolution), "prompt": prompt,
           "sampling": sampling_kwargs, "modes": {}}
    for name, items in runs.items():
        levels = {}
        for level in ("semantic", "pixel"):
            totals = {k: sum(r["levels"][level][k] for r in items) for k in ("calls", "codes", "drafted", "accepted")}
            totals["codes_per_call"] = totals["codes"] / totals["calls"]
            totals["draft_acceptance"] = totals["accepted"] / totals["drafted"] if totals["drafted"] else None
            levels[level] = totals
        out["modes"][name] = {"calls_per_image": float(np.mean([r["calls"] for r in items])),
                              "wall_s_per_image": float(np.median([r["wall_s"] for r in items])),
                              "wall_s_runs": [round(r["wall_s"], 3) for r in items], "levels": levels}
    plain = out["modes"]["plain"]
    for name, mode in out["modes"].items():
        mode["calls_ratio"] = plain["calls_per_image"] / mode["calls_per_image"]
        mode["wall_ratio"] = plain["wall_s_per_image"] / mode["wall_s_per_image"]
    return out


def measure_verify_cost(lm, context: int, widths: list[int], repeats: int = 5, batch: int = 2) -> dict:
    """Median seconds of one body call of width w (w pixel codes fed, every position read) plus the pixel head over
    its w x batch positions, with ``context`` positions cached; w = 1 is the plain step."""
    token = lm.vocab.pixel_code_offset
    capacity = context + max(widths) + 2
    cache = lm.new_cache(batch, capacity)
    cache.fill(context)
    times = {w: [] for w in widths}
    for rep in range(repeats + 1):
        for w in widths:  # interleaved, so drift in the machine's load hits every width alike
            t0 = time.perf_counter()
            hidden = lm.verify(cache, [token] * w, list(range(w)))
            lm.logits(np.ascontiguousarray(hidden.reshape(batch * w, -1)), "pixel", cache.logits_buffers)
            elapsed = time.perf_counter() - t0
            cache.rewind(context)
            if rep:
                times[w].append(elapsed)
    base = float(np.median(times[widths[0]]))
    return {"context": context, "batch": batch, "repeats": repeats,
            "seconds": {str(w): float(np.median(t)) for w, t in times.items()},
            "relative": {str(w): float(np.median(t)) / base for w, t in times.items()}}


def measure_batch(pipe, resolution, images: int, prompt: str, sampling_kwargs: dict, repeats: int = 1,
                  probe_codes: int | None = None) -> dict:
    """N images in one batch against N single runs (seeds 0..N-1), interleaved; ``probe_codes`` decodes that many
    codes per level (bench/loops.py probe_grid) instead of whole images."""
    from illume_rt.bench.loops import probe_grid
    from illume_rt.contract import image_grid
    from illume_rt.runtime.generate import generate_images_tokens
    from illume_rt.runtime.options import SamplingConfig
    from illume_rt.runtime.prompts import text_to_image_ids

    sampling = SamplingConfig(**sampling_kwargs)
    grid = image_grid(*resolution)
    grid = probe_grid(grid, probe_codes) if probe_codes else grid
    rows = text_to_image_ids(pipe.tokenizer, pipe.vocab, prompt, *resolution)
    seq, bat, seq_peak, bat_peak = [], [], 0, 0
    for _ in range(repeats):
        reset_peak_rss()
        t0 = time.perf_counter()
        for i in range(images):
            generate_images_tokens(pipe.lm, grid, [rows], sampling, [np.random.default_rng(i)])
        seq.append(time.perf_counter() - t0)
        seq_peak = max(seq_peak, peak_rss_bytes() or 0)
        reset_peak_rss()
        t0 = time.perf_counter()
        generate_images_tokens(pipe.lm, grid, [rows] * images, sampling,
                               [np.random.default_rng(i) for i in range(images)])
        bat.append(time.perf_counter() - t0)
        bat_peak = max(bat_peak, peak_rss_bytes() or 0)
    s, b = float(np.median(seq)), float(np.median(bat))
    kv = pipe.lm.new_cache(2 * images, max(len(r) for r in rows) + grid.num_tokens)
    return {"images": images, "resolution": list(resolution), "probe_codes": probe_codes,
            "codes_per_image": grid.num_codes, "sequential_s": s, "batch_s": b,
            "images_per_s": {"sequential": images / s, "batch": images / b}, "throughput_ratio": s / b,
            "peak_rss_bytes": {"sequential": seq_peak, "batch": bat_peak},
            "kv_cache_bytes_batch": int(kv.kv.nbytes) if hasattr(kv, "kv") else None}


def run_parallel(spec: dict) -> dict:
    """Worker kind ``parallel`` (bench/worker.py): the measurements the spec asks for."""
    out: dict = {}
    pipe = _pipeline(spec["bundle"], spec.get("threads"))
    if spec.get("acceptance"):
        a = spec["acceptance"]
        out["acceptance"] = measure_acceptance(pipe, tuple(a["resolution"]), a["windows"], a["seeds"],
                                               spec["prompt"], a.get("sampling", {}))
    if spec.get("verify_cost"):
        v = spec["verify_cost"]
        out["verify_cost"] = measure_verify_cost(pipe.lm, v["context"], v["widths"], v.get("repeats", 5))
    if spec.get("batch"):
        b = spec["batch"]
        out["batch"] = [measure_batch(pipe, tuple(b["resolution"]), n, spec["prompt"], b.get("sampling", {}),
                                      b.get("repeats", 1), b.get("probe_codes")) for n in b["images"]]
    return out


def markdown(results: dict) -> str:
    """The measured figures as a short report."""
    lines = [f"# Parallel decoding and batching: {results['preset']}", "",
             f"Command: `{results['command']}`  ", f"Created: {results['created_at']}  ",
             f"Machine: {results['machine']}  ", f"Versions: {results['versions']}", ""]
    a = results.get("acceptance")
    if a:
        lines += [f"## Whole images, plain vs parallel decoding ({a['seeds']} seeds each, {a['resolution'][0]}x"
                  f"{a['resolution'][1]}, sampling {a['sampling'] or 'default'}, runs interleaved)", "",
                  "| mode | body calls / image | fewer calls | wall s / image (median) | less wall time | semantic "
                  "codes/call | pixel codes/call | semantic drafts accepted | pixel drafts accepted |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in a["modes"].items():
            acc = [r["levels"][lv]["draft_acceptance"] for lv in ("semantic", "pixel")]
            lines.append(f"| {name} | {r['calls_per_image']:.0f} | {r['calls_ratio']:.2f}x | "
                         f"{r['wall_s_per_image']:.2f} | {r['wall_ratio']:.2f}x | "
                         f"{r['levels']['semantic']['codes_per_call']:.2f} | "
                         f"{r['levels']['pixel']['codes_per_call']:.2f} | "
                         + " | ".join("-" if x is None else f"{x:.3f}" for x in acc) + " |")
        lines += ["", "Targets on nano: 2.5x fewer body calls, 1.3x less wall time per image.", ""]
    v = results.get("verify_cost")
    if v:
        lines += [f"## Verify step of width w vs a plain step (context {v['context']}, batch {v['batch']})", "",
                  "| w | s per call | relative to w=1 |", "|---|---|---|"]
        lines += [f"| {w} | {s:.4f} | {v['relative'][w]:.2f} |" for w, s in v["seconds"].items()]
        lines.append("")
    p = results.get("projection")
    if p:
        lines += [f"## Projected per-image gain: this run's verify-step cost at the acceptance of {p['acceptance_from']}",
                  "", "| mode | calls / image | verify width costed | projected gain per image (CPU) |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {m['calls_per_image']:.0f} | {m['width_used']} | {m['projected_cpu_gain']:.2f}x |"
                  for n, m in p["modes"].items()]
        lines.append("")
    g = results.get("gpu_estimate")
    if g:
        lines += [f"## GPU estimate ({g['preset']}, bf16, H200 at its nominal 4.8 TB/s): "
                  f"{g['weight_bytes_per_step'] / 1e9:.2f} GB per step, floor {g['floor_s_per_step'] * 1e3:.2f} ms",
                  "", "| mode | decode s per image at the floor |", "|---|---|"]
        lines += [f"| {n} | {s:.2f} |" for n, s in g["s_per_image"].items()]
        lines += ["", "An estimate, not a measurement: calls x floor, a verify step costed as one floor (32 GEMM "
                  "rows stay memory-bound), nano's acceptance assumed for the 3B.", ""]
    for b in results.get("batch") or []:
        lines += [f"## {b['images']} images in one batch vs one after another ({b['resolution'][0]}x"
                  f"{b['resolution'][1]}" + (f", probe of {b['probe_codes']} codes per level" if b["probe_codes"]
                                             else "") + ")", "",
                  f"sequential {b['sequential_s']:.2f}s, batch {b['batch_s']:.2f}s: **{b['throughput_ratio']:.2f}x "
                  f"the images per second**; peak RSS sequential {b['peak_rss_bytes']['sequential'] / 2**20:.0f} "
                  f"MiB, batch {b['peak_rss_bytes']['batch'] / 2**20:.0f} MiB; KV cache of the batch "
                  f"{(b['kv_cache_bytes_batch'] or 0) / 2**20:.1f} MiB", ""]
    return "\n".join(lines) + "\n"


def run_parallel_bench(bundle, preset: str, spec: dict, out_dir, command: str = "", log=print,
                       acceptance: dict | None = None, acceptance_source: str | None = None):
    """One worker process (bench/worker.py kind ``parallel``), then results.json and results.md in ``out_dir``."""
    import json
    from pathlib import Path

    from illume_rt.bench.measure import machine, versions
    from illume_rt.bench.run import run_worker

    t0 = time.perf_counter()
    result = run_worker({"kind": "parallel", "label": "parallel decoding and batching", "bundle": str(bundle),
                         **spec}, log)
    results = {"command": command, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(), "versions": versions(), "bundle": str(bundle), "preset": preset,
               "spec": spec, **result, "wall_s": time.perf_counter() - t0}
    measured = results.get("acceptance") or acceptance
    if measured and results.get("verify_cost"):
        results["projection"] = {"acceptance_from": acceptance_source or "this run",
                                 "modes": projection(measured, results["verify_cost"])}
    if measured:
        results["gpu_estimate"] = gpu_estimate(measured)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown(results))
    log(f"results in {out_dir}")
    return out_dir


def projection(acceptance: dict, verify_cost: dict, gpu_step_floor_s: float | None = None) -> dict:
    """Per-image gain of each measured window if its verify step costs what ``verify_cost`` measured (another model,
    e.g. the bench preset's) at the acceptance measured in ``acceptance`` (a trained model's), ignoring the sampler:
    plain calls x t(1) / sum over levels of calls x t(w). With ``gpu_step_floor_s`` (weight bytes / bandwidth of a
    GPU), also the per-image decode time at that floor, where a verify step of up to 16 positions x 2 rows still
    reads the weights once and so costs one floor."""
    seconds = {int(w): s for w, s in verify_cost["seconds"].items()}
    plain = acceptance["modes"]["plain"]
    out = {}
    for name, mode in acceptance["modes"].items():
        window = 1 if name == "plain" else int(name.split()[-1])
        width = min(seconds, key=lambda w: (abs(w - window), w))  # the measured width nearest the window
        cpu = plain["calls_per_image"] * seconds[1] / (mode["calls_per_image"] * seconds[width])
        entry = {"calls_per_image": mode["calls_per_image"], "width_used": width, "projected_cpu_gain": cpu}
        if gpu_step_floor_s:
            entry["gpu_s_per_image_at_floor"] = mode["calls_per_image"] * gpu_step_floor_s
        out[name] = entry
    return out


H200_NOMINAL_BYTES_PER_S = 4.8e12  # NVIDIA's H200 HBM3e figure: a nominal floor, not a measurement


def step_weight_bytes(preset_name: str = "3b", level: str = "pixel", bytes_per_weight: int = 2) -> int:
    """Weights one decode step reads (bf16): the body's matrices and the head slice of ``level``."""
    from illume_rt.export.configs import get_preset

    preset = get_preset(preset_name)
    c = preset.llm
    kv = c.num_key_value_heads * c.head_dim
    per_layer = (2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size)
    start, stop = preset.vocab.head_range(level)
    return bytes_per_weight * (c.num_hidden_layers * per_layer + (stop - start) * c.hidden_size)


def gpu_estimate(acceptance: dict, preset_name: str = "3b") -> dict:
    """Per-image decode time on an H200 at its nominal bandwidth floor: calls x (weight bytes / bandwidth). A verify
    step of <= 16 positions x 2 rows is 32 rows of GEMM: still far below the compute a weight read allows, so it is
    costed as one floor. Acceptance is nano's; a larger model's may differ."""
    floor = step_weight_bytes(preset_name) / H200_NOMINAL_BYTES_PER_S
    return {"preset": preset_name, "weight_bytes_per_step": step_weight_bytes(preset_name), "floor_s_per_step": floor,
            "s_per_image": {name: m["calls_per_image"] * floor for name, m in acceptance["modes"].items()}}

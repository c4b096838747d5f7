"""INT8 against FP32 decode speed, measured in ONE process with interleaved repeats (issue 5 item 4, issue 6 item 3c).

Both bundles' language models (body graph + the semantic and pixel head slices + the embedding table) are opened
side by side in this process; every repeat then times, for each bundle in turn (the order alternates repeat by
repeat: FP32 first, then INT8 first), the things that decide decode speed at the same context:

- **prefill**: the real prompt of the resolution (conditional + unconditional row, batch 2, left-padded);
- **semantic step** and **pixel step**: one decode step (body call, then the active level's head) with guidance
  batched as 2 rows, the cache filled to the context of the middle of that level in a whole image of the
  resolution; body and head are timed apart, so the share of the FP32 heads (kept FP32 by recipe) is visible.

Ratios are FP32 time / INT8 time (> 1: INT8 faster), given as the ratio of the medians and as the spread of the
ratios of each interleaved pair. Load average is recorded at the start and the end: absolute times on a shared
machine move with the load, the paired ratios much less.

Entry point (writes results.json and results.md with the command, machine, versions)::

    python -m illume_rt.bench.int8 --fp32 BUNDLE --int8 BUNDLE [-o bench/results/<stamp>-int8/]
    python -m illume_rt.bench.int8 --fp32 BUNDLE --int8 NEW --quantize   # produce NEW first (quick plan, timed)

``illume-rt bench --int8-bundle PATH`` runs the same measurement (in its own worker process) and reports it in its
``int8_vs_fp32`` section and its ratio/target tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from illume_rt.bench.measure import machine, stats, versions

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a cat with a hat"
HEADLINE = "pixel step"  # the step most of an image is made of (256 of the 337 codes at 256x256)


# ---------------------------------------------------------------------------------------------------------------
# Producing the INT8 bundle cheaply (2-core machines): a small calibration/evaluation plan, the LLM body only
# ---------------------------------------------------------------------------------------------------------------
def quick_plans(resolution: tuple[int, int] = (256, 256), seed: int = 0, samples: int = 12):
    """One text-to-image run to calibrate on and one held-out run to evaluate on, both at ``resolution`` (guidance
    on: both rows, both levels), no understanding or refinement: what decode speed needs, for the bench preset
    whose bundle has only the LLM and the pixel decoder. ``samples`` decode-step feeds are kept per run."""
    from illume_rt.calibration.datasets import CalibrationPlan, generated_prompts

    cal = CalibrationPlan(generate=[(generated_prompts(1, seed)[0], tuple(resolution), seed)],
                          llm_samples_per_run=samples, decoder_samples=0, seed=seed)
    ev = CalibrationPlan(generate=[(generated_prompts(1, seed + 1000)[0], tuple(resolution), seed + 1000)],
                         llm_samples_per_run=10 ** 9, decoder_samples=0, seed=seed + 1000)
    return cal, ev


def quantize_quick(fp32: str | Path, dst: str | Path, threads: int | None = None, components=("llm",),
                   resolution: tuple[int, int] = (256, 256), keep_failed: bool = False,
                   log: Callable[[str], None] = print, overwrite: bool = True) -> dict:
    """INT8 ort-cpu bundle of ``fp32`` with ``quick_plans`` and only ``components`` quantized (the heads stay FP32
    by recipe; others not listed stay FP32 too). Gates apply as usual; figures land in the new manifest. Returns
    {'seconds', 'manifest'}."""
    from illume_rt.calibration.quantize import quantize_bundle

    cal, ev = quick_plans(resolution)
    t0 = time.perf_counter()
    manifest = quantize_bundle(fp32, dst, "int8", "ort-cpu", keep_failed=keep_failed, threads=threads,
                               calibration=cal, evaluation=ev, components=list(components), log=log,
                               overwrite=overwrite)  # a re-run replaces its own bundle (never another folder)
    return {"seconds": time.perf_counter() - t0, "manifest": manifest}


# ---------------------------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------------------------
def _open_lm(path: str | Path, threads: int | None, spin: bool | None):
    from illume_rt.engines.ort import OrtEngine
    from illume_rt.runtime.bundle import load_bundle
    from illume_rt.runtime.generate import LanguageModel

    bundle = load_bundle(path, verify=False)

    def engine(name):
        return OrtEngine(name, bundle.component_path(name), "ort-cpu", threads, spin=spin)

    lm = LanguageModel(engine("llm"), {h: engine(f"lm_head_{h}") for h in ("semantic", "pixel")},
                       bundle.table("embed_tokens"), bundle.llm, bundle.vocab)
    return bundle, lm


def _filled_cache(lm, batch: int, context: int, capacity: int):
    cache = lm.new_cache(batch, capacity)
    cache.fill(context)  # real pages, as a run would have written them
    return cache


def step_split(lm, context: int, which: str, steps: int = 4, warmup: int = 1, batch: int = 2) -> dict:
    """Median seconds of the body call, the head call and the whole of one decode step of level ``which``
    with ``context`` positions cached (batch rows: 2 = guidance)."""
    cache = _filled_cache(lm, batch, context, context + steps + warmup)
    token = lm.vocab.pixel_code_offset if which == "pixel" else lm.vocab.semantic_code_offset
    body, head = [], []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        hidden = lm.step(cache, [token])
        t1 = time.perf_counter()
        lm.logits(hidden, which, cache.logits_buffers)
        t2 = time.perf_counter()
        if i >= warmup:
            body.append(t1 - t0)
            head.append(t2 - t1)
    total = [b + h for b, h in zip(body, head)]
    return {"body": float(np.median(body)), "head": float(np.median(head)), "total": float(np.median(total))}


def image_contexts(vocab, grid, cond: list[int], uncond: list[int]) -> dict:
    """The prefill rows and the cached context at the middle of each level of a whole image."""
    from illume_rt.contract import PIXEL, SEMANTIC, image_slots

    schedule = image_slots(grid)
    first = next(i for i, s in enumerate(schedule) if s.level is not None)
    tail = [vocab.token_id(s.token) for s in schedule[:first]]
    rows = [list(cond) + tail, list(uncond) + tail]
    prompt = max(len(r) for r in rows)  # left-padded batch: the cache holds the longest row
    contexts = {}
    for level, name in ((SEMANTIC, "semantic"), (PIXEL, "pixel")):
        slots = [i for i, s in enumerate(schedule) if s.level == level]
        contexts[name] = prompt + slots[len(slots) // 2] - first  # positions fed before that sample's step
    return {"rows": rows, "prompt_positions": prompt, "capacity": prompt + len(schedule) - first,
            "contexts": contexts, "codes": {"semantic": grid.semantic_rows * grid.semantic_cols,
                                            "pixel": grid.pixel_rows * grid.pixel_cols}}


def _weights(bundle, which: str) -> dict:
    body = bundle.component("llm")
    head = bundle.component(f"lm_head_{which}")
    return {"body_bytes": body["bytes"], "head_bytes": head["bytes"], "step_bytes": body["bytes"] + head["bytes"],
            "body_precision": body.get("precision", "fp32"), "head_precision": head.get("precision", "fp32")}


def _quantization_summary(manifest: dict) -> dict | None:
    q = manifest.get("quantization")
    if not q:
        return None
    comps = {}
    for name, entry in manifest["components"].items():
        info = entry.get("quantization")
        if info:
            a = info["accuracy"]
            comps[name] = {"recipe": info["recipe"], "passed": info["passed"],
                           "calibration_samples": info.get("calibration_samples"),
                           "worst_cosine": a["worst_cosine"], "worst_max_abs_err": a["worst_max_abs_err"],
                           "teacher_forced": a.get("teacher_forced"), "psnr_db": a.get("psnr_db"),
                           "quantized_nodes": info.get("graph", {}).get("quantized_nodes")}
    cal = q.get("calibration", {})
    return {"precision": q["precision"], "target": q["target"], "status": q["status"],
            "thresholds": q["thresholds"], "failures": q.get("failures", []), "seconds": q.get("seconds"),
            "timings": q.get("timings"), "components_requested": q.get("components"),
            "calibration_generate": cal.get("generate"), "calibration_samples": cal.get("samples"),
            "evaluation_generate": q.get("evaluation", {}).get("generate"), "components": comps}


def measure_int8(fp32: str | Path, int8: str | Path, resolution: tuple[int, int] = (256, 256), repeats: int = 7,
                 warmup: int = 1, steps: int = 4, threads: int | None = None, spin: bool | None = None,
                 prompt: str = PROMPT, log: Callable[[str], None] = print) -> dict:
    """FP32 vs INT8 decode and prefill times of two bundles of the same model, one process, interleaved repeats.
    Returns the ``int8_vs_fp32`` section (times in seconds, ratios FP32/INT8)."""
    from illume_rt.bench.worker import _prompts
    from illume_rt.contract import image_grid

    load_start = os.getloadavg()
    t_start = time.perf_counter()
    lms, bundles = {}, {}
    for label, path in (("fp32", fp32), ("int8", int8)):
        t0 = time.perf_counter()
        bundles[label], lms[label] = _open_lm(path, threads, spin)
        log(f"  opened {label} bundle {path} in {time.perf_counter() - t0:.1f}s")
    grid = image_grid(*resolution)
    cond, uncond = _prompts(str(fp32), prompt, resolution)
    plan = image_contexts(lms["fp32"].vocab, grid, cond, uncond)
    ctx = plan["contexts"]
    raw = {label: {k: [] for k in ("prefill", "semantic body", "semantic head", "semantic step", "pixel body",
                                    "pixel head", "pixel step")} for label in lms}
    loads = []

    def one(label: str) -> None:
        lm, r = lms[label], raw[label]
        cache = lm.new_cache(2, plan["capacity"])
        t0 = time.perf_counter()
        lm.prefill(cache, plan["rows"])
        r["prefill"].append(time.perf_counter() - t0)
        for which in ("semantic", "pixel"):
            s = step_split(lm, ctx[which], which, steps=steps)
            r[f"{which} body"].append(s["body"])
            r[f"{which} head"].append(s["head"])
            r[f"{which} step"].append(s["total"])

    for rep in range(warmup + repeats):
        order = ("fp32", "int8") if rep % 2 == 0 else ("int8", "fp32")
        if rep == warmup:  # drop the warm-up values (first runs allocate, page in, tune)
            for r in raw.values():
                for v in r.values():
                    v.clear()
        for label in order:
            one(label)
        loads.append(os.getloadavg()[0])
        if rep >= warmup:
            f, q = raw["fp32"], raw["int8"]
            log(f"  repeat {rep - warmup + 1}/{repeats}: pixel step fp32 {f['pixel step'][-1] * 1e3:.0f} ms, "
                f"int8 {q['pixel step'][-1] * 1e3:.0f} ms; semantic {f['semantic step'][-1] * 1e3:.0f} / "
                f"{q['semantic step'][-1] * 1e3:.0f} ms; prefill {f['prefill'][-1]:.2f} / {q['prefill'][-1]:.2f} s; "
                f"load {loads[-1]:.2f}")
    times = {label: {k: stats(v) for k, v in r.items()} for label, r in raw.items()}
    ratios, paired = {}, {}
    for key in raw["fp32"]:
        f, q = raw["fp32"][key], raw["int8"][key]
        ratios[key] = float(np.median(f) / np.median(q))
        paired[key] = stats([a / b for a, b in zip(f, q)])
    # a whole image's token generation from the same medians: prefill + codes x step at mid-level context
    per_image = {label: times[label]["prefill"]["median"]
                 + plan["codes"]["semantic"] * times[label]["semantic step"]["median"]
                 + plan["codes"]["pixel"] * times[label]["pixel step"]["median"] for label in raw}
    ratios["image tokens (estimate)"] = per_image["fp32"] / per_image["int8"]
    weights = {label: {w: _weights(b, w) for w in ("semantic", "pixel")} for label, b in bundles.items()}
    bytes_ratio = {f"{w} step": weights["fp32"][w]["step_bytes"] / weights["int8"][w]["step_bytes"]
                   for w in ("semantic", "pixel")}
    bytes_ratio["body"] = weights["fp32"]["pixel"]["body_bytes"] / weights["int8"]["pixel"]["body_bytes"]
    return {
        "fp32_bundle": str(Path(fp32).resolve()), "int8_bundle": str(Path(int8).resolve()),
        "resolution": f"{resolution[0]}x{resolution[1]}", "prompt": prompt, "batch": 2,
        "prompt_positions": plan["prompt_positions"], "contexts": ctx, "codes": plan["codes"],
        "repeats": repeats, "warmup": warmup, "steps_per_repeat": steps, "threads": threads, "spin": spin,
        "order": "alternating (fp32 first on even repeats, int8 first on odd)",
        "times_s": times, "ratios": ratios, "paired_ratios": paired, "headline": HEADLINE,
        "per_image_tokens_s": per_image, "weights": weights, "weight_bytes_ratio": bytes_ratio,
        "int8_quantization": _quantization_summary(bundles["int8"].manifest),
        "loadavg": {"start": list(load_start), "end": list(os.getloadavg()), "per_repeat_1min": loads},
        "seconds": time.perf_counter() - t_start,
    }


def run_worker_spec(spec: dict) -> dict:
    """``illume-rt bench --int8-bundle``: the measurement as one worker (bench/worker.py kind ``int8``)."""
    return measure_int8(spec["bundle"], spec["int8_bundle"], tuple(spec["resolutions"][0]), spec["repeats"],
                        spec["warmup"], spec.get("int8_steps", 4), spec.get("threads"), prompt=spec["prompt"],
                        log=lambda m: print(m, file=sys.stderr, flush=True))


# ---------------------------------------------------------------------------------------------------------------
# Reporting (shared with bench/report.py)
# ---------------------------------------------------------------------------------------------------------------
def ratio_rows(section: dict) -> dict[str, float]:
    """The rows this section adds to the benchmark's ratio table."""
    r = section["ratios"]
    res = section["resolution"]
    return {f"INT8 vs FP32 pixel step, batch 2 ({res}, same process)": r["pixel step"],
            f"INT8 vs FP32 semantic step, batch 2 ({res}, same process)": r["semantic step"],
            f"INT8 vs FP32 LLM body only, pixel step ({res})": r["pixel body"],
            f"INT8 vs FP32 prefill ({res})": r["prefill"],
            f"INT8 vs FP32 image tokens, estimate ({res})": r["image tokens (estimate)"]}


def target_row(section: dict) -> dict:
    v = section["ratios"][HEADLINE]
    p = section["paired_ratios"][HEADLINE]
    note = (f"same process, {section['repeats']} interleaved repeats, paired ratios {p['min']:.2f}-{p['max']:.2f}; "
            f"weight bytes ratio {section['weight_bytes_ratio'][HEADLINE]:.2f}x (heads stay FP32)")
    return {"target": "INT8 decode speed-up over FP32 (pixel step)", "goal": "reported (> 1.0x)", "reached": v,
            "met": v > 1.0, "note": note}


def _dur(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def markdown_section(section: dict, level: str = "##") -> list[str]:
    t, r, p = section["times_s"], section["ratios"], section["paired_ratios"]
    la = section["loadavg"]
    out = [f"{level} INT8 vs FP32 decode (one process, interleaved repeats)", "",
           f"{section['resolution']} contexts (cached positions): semantic {section['contexts']['semantic']}, "
           f"pixel {section['contexts']['pixel']}; prefill of {section['prompt_positions']} positions; batch 2 "
           f"(guidance rows); {section['repeats']} repeats after {section['warmup']} warm-up, each the median of "
           f"{section['steps_per_repeat']} steps; threads {section['threads'] or 'default'}; load average "
           f"{la['start'][0]:.2f} at start, {la['end'][0]:.2f} at end (1-min; per repeat "
           f"{min(la['per_repeat_1min']):.2f}-{max(la['per_repeat_1min']):.2f}).", "",
           "| measure | FP32 median | INT8 median | FP32 / INT8 | paired ratios min-max (IQR) |",
           "|---|---|---|---|---|"]
    for key in ("prefill", "semantic step", "semantic body", "semantic head", "pixel step", "pixel body",
                "pixel head"):
        f, q = t["fp32"][key], t["int8"][key]
        bold = "**" if key == section["headline"] else ""
        out.append(f"| {key} | {_dur(f['median'])} ({_dur(f['min'])}-{_dur(f['max'])}) | {_dur(q['median'])} "
                   f"({_dur(q['min'])}-{_dur(q['max'])}) | {bold}{r[key]:.2f}x{bold} | "
                   f"{p[key]['min']:.2f}-{p[key]['max']:.2f} ({p[key]['iqr']:.2f}) |")
    pi = section["per_image_tokens_s"]
    out.append(f"| image tokens, estimate (prefill + {section['codes']['semantic']} x semantic + "
               f"{section['codes']['pixel']} x pixel step) | {_dur(pi['fp32'])} | {_dur(pi['int8'])} | "
               f"{r['image tokens (estimate)']:.2f}x | |")
    w = section["weights"]
    out += ["", "FP32 and INT8 columns: median (min-max over repeats).", "",
            "| weights read per step | FP32 | INT8 | ratio |", "|---|---|---|---|"]
    out.append(f"| LLM body graph | {_size(w['fp32']['pixel']['body_bytes'])} | "
               f"{_size(w['int8']['pixel']['body_bytes'])} | {section['weight_bytes_ratio']['body']:.2f}x |")
    for which in ("semantic", "pixel"):
        out.append(f"| {which} step (body + {which} head, head {w['int8'][which]['head_precision'].upper()}) | "
                   f"{_size(w['fp32'][which]['step_bytes'])} | {_size(w['int8'][which]['step_bytes'])} | "
                   f"{section['weight_bytes_ratio'][f'{which} step']:.2f}x |")
    q = section.get("int8_quantization")
    if q:
        out += ["", f"INT8 bundle: {q['precision']} for {q['target']}, gates {q['status']} "
                    f"(thresholds {json.dumps(q['thresholds'])}), quantized in {q['seconds']} s; calibration "
                    f"{json.dumps(q['calibration_generate'])}, feeds {json.dumps(q['calibration_samples'])}; "
                    f"evaluation {json.dumps(q['evaluation_generate'])}.", ""]
        out += ["| graph | recipe | worst cosine | max abs err | teacher-forced (top-1, mean KL) |",
                "|---|---|---|---|---|"]
        for name, c in q["components"].items():
            tf = "; ".join(f"{k}: {v['top1_agreement']:.3f}, {v['kl_mean']:.2e} ({v['positions']} positions)"
                           for k, v in (c.get("teacher_forced") or {}).items()) or "-"
            out.append(f"| {name} | {c['recipe']} | {c['worst_cosine']:.5f} | {c['worst_max_abs_err']:.3g} | {tf} |")
    return out


def write_results(results: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = results["int8_vs_fp32"]
    md = ["# illume-rt INT8 vs FP32 decode", "", f"command: `{results['command']}`  ",
          f"created: {results['created_at']}  ",
          f"FP32 bundle: `{s['fp32_bundle']}`  ", f"INT8 bundle: `{s['int8_bundle']}`  ",
          f"machine: {results['machine'].get('cpu', '?')}, {results['machine'].get('cpu_count')} cores, "
          f"{results['machine'].get('mem_total_bytes', 0) / 1e9:.2f} GB RAM  ",
          "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v) + "  "]
    if results.get("quantize_run"):
        qr = results["quantize_run"]
        md.append(f"INT8 bundle produced by this command in {qr['seconds']:.0f} s (quick plan, components "
                  f"{qr['components']}).  ")
    md += [""] + markdown_section(s) + ["", "| ratio row (as in `illume-rt bench`) | value |", "|---|---|"]
    md += [f"| {k} | {v:.2f}x |" for k, v in ratio_rows(s).items()]
    md += ["", f"Whole command: {results['wall_s']:.0f} s.", ""]
    for name, text in (("results.json", json.dumps(results, indent=1, default=str)), ("results.md", "\n".join(md))):
        tmp = out_dir / f".tmp-{name}"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from illume_rt.contract import parse_resolution
    from illume_rt.engines.ort import release_large_blocks_promptly

    release_large_blocks_promptly()  # as the CLI does for its process (docs/runtime.md)

    p = argparse.ArgumentParser(prog="python -m illume_rt.bench.int8", description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32", required=True, help="the FP32 bundle")
    p.add_argument("--int8", required=True, help="the INT8 bundle of the same model (written first with --quantize)")
    p.add_argument("--quantize", action="store_true",
                   help="produce --int8 from --fp32 first (int8 ort-cpu, quick plan, LLM body only; timed)")
    p.add_argument("--components", default="llm", help="graphs quantized with --quantize (comma-separated)")
    p.add_argument("--keep-failed", action="store_true", help="with --quantize: write the bundle even if a gate misses")
    p.add_argument("--resolution", default="256x256")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed repeats")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="decode steps per measurement (median taken)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--no-spin", action="store_true",
                   help="intra-op workers do not spin-wait (the default for CPU sessions now; kept for old command lines)")
    p.add_argument("-o", "--output", help="results folder (default bench/results/<time>-int8)")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    resolution = parse_resolution(args.resolution)
    command = "python -m illume_rt.bench.int8 " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: dict = {"command": command,
                     "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                     "versions": versions()}
    if args.quantize:
        from illume_rt.calibration.quantize import summary_lines

        components = [c for c in args.components.split(",") if c]
        log(f"quantizing {args.fp32} -> {args.int8} (int8 ort-cpu, quick plan, components {components}) ...")
        q = quantize_quick(args.fp32, args.int8, threads=args.threads, components=components,
                           resolution=resolution, keep_failed=args.keep_failed, log=log)
        log("\n".join(summary_lines(q["manifest"])))
        results["quantize_run"] = {"seconds": q["seconds"], "components": components,
                                   "loadavg_end": list(os.getloadavg())}
    log(f"measuring INT8 vs FP32 at {args.resolution} ...")
    results["int8_vs_fp32"] = measure_int8(args.fp32, args.int8, resolution, args.repeats, args.warmup, args.steps,
                                           args.threads, False if args.no_spin else None, log=log)
    results["wall_s"] = time.perf_counter() - t0
    out = Path(args.output) if args.output else RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-int8"
    write_results(results, out)
    for k, v in ratio_rows(results["int8_vs_fp32"]).items():
        print(f"{k}: {v:.2f}x")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

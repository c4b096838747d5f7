"""``illume-rt bench``: every contender in its own process on the same weights, then the derived figures (per-image
latency, bandwidth against the floor, ratios against the targets, memory) written as JSON, markdown and a chart.

With ``--int8-bundle`` the INT8 bundle is a contender of its own (per-image latency) and, for the ratio, both bundles
are also opened in ONE worker that times their decode steps and prefill at the same contexts with interleaved
repeats (bench/int8.py): the ``int8_vs_fp32`` section, rows in the ratio and target tables.

Decoding a whole 512x512 image takes minutes per contender on a small CPU machine, so each contender decodes a
*probe*: the real prompt of the resolution, then ``--probe-codes`` codes of each level. Per-image latency is
prefill + codes x step time (+ image decode), with the pixel-level step averaged between the start of the image
and its end (the runtime's step is also timed with a cache filled to the whole image's length). ``--full`` also
decodes whole images with the runtime at the first resolution to check the estimate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from illume_rt.bench.measure import machine, read_bandwidth, stats, versions

RESULTS = Path(__file__).resolve().parent / "results"


def run_worker(spec: dict, log: Callable[[str], None], timeout: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run([sys.executable, "-m", "illume_rt.bench.worker", str(spec_path), str(out_path)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise RuntimeError(f"bench worker {spec['kind']} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out_path.read_text())
        result["wall_s"] = time.perf_counter() - t0
        log(f"  {spec['label']:<28} done in {result['wall_s']:.0f}s")
        return result


def merge_rounds(results: list, key: str = ""):
    """Pool repeated rounds of one contender: stats pooled over all values, memory figures maximal, other numbers
    the median."""
    first = results[0]
    if isinstance(first, dict):
        if "values" in first:
            return stats([v for r in results for v in r["values"]])
        return {k: merge_rounds([r[k] for r in results if k in r], k) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        numbers = [r for r in results if r is not None]
        if "rss" in key or "bytes" in key:
            return max(numbers)
        return sorted(numbers)[len(numbers) // 2]
    return first


def peer_model(bundle: Path, preset: str, log: Callable[[str], None], threads: int | None) -> Path | None:
    """onnxruntime-genai's model builder run once on the same weights (fp32, cpu); None when it is not installed."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        log("  onnxruntime-genai not installed (pip install 'illume-rt[peer]'): peer skipped")
        return None
    from illume_rt.bench.models import hf_folder

    out = bundle.parent.parent / "peer" / f"{bundle.name}-genai-fp32-cpu"
    if not (out / "genai_config.json").is_file():
        hf = hf_folder(preset, bundle, log)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"  building the peer model with onnxruntime_genai.models.builder into {out} ...")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
               "-p", "fp32", "-e", "cpu", "-c", str(tmp.with_name(tmp.name + "-cache"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai builder failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
        shutil.rmtree(tmp.with_name(tmp.name + "-cache"), ignore_errors=True)
        tmp.rename(out)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if threads:
        options["intra_op_num_threads"] = threads
    else:
        options.pop("intra_op_num_threads", None)
    config_path.write_text(json.dumps(config, indent=4))
    return out


def run_bench(bundle: Path, preset: str, resolutions: list[tuple[int, int]], repeats: int = 3, warmup: int = 1,
              probe_codes: int = 12, rounds: int = 1, threads: int | None = None, full: bool = False,
              int8_bundle: Path | None = None, peer: bool = True, reference: bool = True,
              ablations: bool = True, text_tokens: int = 48, out_dir: Path | None = None,
              command: str = "", int8_repeats: int = 7, log: Callable[[str], None] = print) -> Path:
    from illume_rt.bench.report import analyse, write_reports

    t_start = time.perf_counter()
    base = {"bundle": str(bundle), "resolutions": [list(r) for r in resolutions], "repeats": repeats,
            "warmup": warmup, "probe_codes": probe_codes, "threads": threads, "prompt": "a cat with a hat",
            "seed": 0, "sampling": {}, "text_tokens": text_tokens}
    contenders = [{"label": "runtime fp32", "kind": "runtime", "full": full}]
    if int8_bundle:
        contenders.append({"label": "runtime int8", "kind": "runtime", "bundle": str(int8_bundle)})
    if reference:  # probes only: a whole image takes the reference minutes (256x256) to a quarter hour
        contenders.append({"label": "reference (transformers)", "kind": "reference", "full": False})
    if ablations:
        contenders.append({"label": "runtime fp32, 1 thread", "kind": "runtime", "threads": 1,
                           "resolutions": [list(resolutions[0])], "full": False})
    contenders.append({"label": "runtime text decode", "kind": "runtime-text"})
    peer_dir = peer_model(bundle, preset, log, threads) if peer else None
    if peer_dir:
        contenders.append({"label": "onnxruntime-genai text decode", "kind": "peer-text", "peer_model": str(peer_dir)})
    log("measuring read bandwidth ...")
    bandwidth = [read_bandwidth()]
    raw: dict[str, list] = {c["label"]: [] for c in contenders}
    ablation_runs: list = []
    int8_runs: list = []  # FP32 vs INT8 in one process, interleaved (bench/int8.py)
    errors: dict[str, str] = {}
    for rnd in range(rounds):
        log(f"round {rnd + 1}/{rounds}")
        for c in contenders:
            try:
                raw[c["label"]].append(run_worker({**base, **c}, log))
            except (RuntimeError, subprocess.SubprocessError) as exc:  # recorded; the other contenders go on
                log(f"  {c['label']} FAILED: {str(exc)[-400:]}")
                errors[c["label"]] = str(exc)[-2000:]
        if int8_bundle:
            try:
                int8_runs.append(run_worker({**base, "label": "int8 vs fp32 (one process)", "kind": "int8",
                                             "int8_bundle": str(int8_bundle), "repeats": int8_repeats}, log))
            except (RuntimeError, subprocess.SubprocessError) as exc:
                log(f"  int8 vs fp32 FAILED: {str(exc)[-400:]}")
                errors["int8 vs fp32 (one process)"] = str(exc)[-2000:]
        if ablations:
            try:
                ablation_runs.append(run_worker({**base, "label": "loop variants", "kind": "ablations"}, log))
            except (RuntimeError, subprocess.SubprocessError) as exc:
                errors["loop variants"] = str(exc)[-2000:]
        bandwidth.append(read_bandwidth())
    best_bw = max(bandwidth, key=lambda b: b["bytes_per_s"])
    results = {
        "command": command, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "versions": versions(), "bundle": str(bundle), "preset": preset,
        "settings": {k: base[k] for k in ("resolutions", "repeats", "warmup", "probe_codes", "threads",
                                          "prompt", "seed", "text_tokens")} | {"rounds": rounds, "full": full},
        "bandwidth": {"best": best_bw, "runs": bandwidth},
        "contenders": {label: merge_rounds(runs) for label, runs in raw.items() if runs},
        "errors": errors,
        "ablations": merge_rounds(ablation_runs) if ablation_runs else None,
        "int8_vs_fp32": merge_rounds(int8_runs) if int8_runs else None,
        "int8": ("measured (runtime int8 contender; int8_vs_fp32: one process, interleaved)" if int8_bundle
                 else "not run: no quantized bundle given (--int8-bundle; issue 5)"),
        "peer": "measured" if peer_dir else "not run",
    }
    with open(bundle / "manifest.json") as fh:
        results["manifest"] = json.load(fh)
    results["derived"] = analyse(results)
    results.pop("manifest")
    results["wall_s"] = time.perf_counter() - t_start
    out_dir = out_dir or RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}"
    write_reports(results, out_dir)
    log(f"results in {out_dir}")
    return out_dir

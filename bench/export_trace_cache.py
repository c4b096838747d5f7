"""Export time with the trace cache (export/trace_cache.py): a bundle exported without it, with an empty cache
(every network traced, its structure stored) and with that cache filled (every structure taken from it), and whether
the graphs come out the same.

    python -m illume_rt.bench.export_trace_cache [--preset nano] -o DIR

``--preset nano``: the built-in model's committed weights; any other preset: its random weights. One process, one
thread, in the order empty cache, filled cache, no cache: the first export of a process also pays for loading the
exporter, so the empty-cache arm carries that and the no-cache baseline does not (the ratio filled / no cache is not
flattered by it). "Same graphs": every graph file (and external-data file) of the filled-cache bundle is
byte-identical to the no-cache bundle's. Writes ``results.json`` and ``NOTES.md`` into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ARMS = ("empty cache", "filled cache", "no cache")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m illume_rt.bench.export_trace_cache",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch

    from illume_rt.bench.measure import machine, versions
    from illume_rt.export import trace_cache
    from illume_rt.export.bundle import build_reference_models, write_bundle
    from illume_rt.export.configs import get_preset

    torch.set_num_threads(1)
    if args.preset == "nano":
        from illume_rt.nano.checkpoint import load_models

        models = load_models()
    else:
        models = build_reference_models(get_preset(args.preset))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="illume-rt-bench-trace-cache.") as tmp:
        tmp = Path(tmp)
        saved = os.environ.get(trace_cache.TRACE_CACHE_ENV)
        try:
            for arm in ARMS:
                if arm == "no cache":
                    os.environ.pop(trace_cache.TRACE_CACHE_ENV, None)
                else:
                    os.environ[trace_cache.TRACE_CACHE_ENV] = str(tmp / "traces")
                cpu, wall = time.process_time(), time.perf_counter()
                write_bundle(models, tmp / arm.replace(" ", "-"), log=lambda m: None)
                rows[arm] = {"cpu_s": round(time.process_time() - cpu, 2), "wall_s": round(time.perf_counter() - wall,
                                                                                          2)}
                print(arm, rows[arm], flush=True)
        finally:
            if saved is None:
                os.environ.pop(trace_cache.TRACE_CACHE_ENV, None)
            else:
                os.environ[trace_cache.TRACE_CACHE_ENV] = saved
        filled, fresh = tmp / "filled-cache", tmp / "no-cache"
        graphs = sorted(p.name for p in fresh.iterdir() if p.suffix in (".onnx", ".data"))
        same = bool(graphs) and all((filled / g).is_file() and (filled / g).read_bytes() == (fresh / g).read_bytes()
                                    for g in graphs)
        entries = len(list((tmp / "traces").glob("*.onnx")))
    summary = {"graphs": len(graphs), "cache_entries": entries, "same_graphs": same,
               "speed_ratio_filled_vs_no_cache": round(rows["no cache"]["cpu_s"] / rows["filled cache"]["cpu_s"], 2),
               "cost_ratio_empty_vs_no_cache": round(rows["empty cache"]["cpu_s"] / rows["no cache"]["cpu_s"], 2)}
    given = sys.argv[1:] if argv is None else argv
    results = {"command": "python -m illume_rt.bench.export_trace_cache " + " ".join(map(shlex.quote, given)),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "versions": versions(), "preset": args.preset, "arms": rows, "summary": summary}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Export of the {args.preset} bundle with the trace cache", "",
             f"`{results['command']}`, {results['created']}, {machine().get('cpu', '?')}, one thread, one process "
             f"(arms in this order).", "", "| arm | CPU s | wall s |", "|---|---|---|"]
    lines += [f"| {arm} | {rows[arm]['cpu_s']} | {rows[arm]['wall_s']} |" for arm in ARMS]
    lines += ["", f"Filled cache: {summary['speed_ratio_filled_vs_no_cache']}x faster than no cache (CPU); an empty "
              f"cache costs {summary['cost_ratio_empty_vs_no_cache']}x no cache (it also loads the exporter). "
              f"{summary['graphs']} graph files, {entries} cache entries; the same bytes with the filled cache as "
              f"without: {same}."]
    (args.output / "NOTES.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

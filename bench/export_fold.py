"""CPU seconds of the constant folding that follows each graph's trace at export (export/streaming.py
``fold_small_constants``): onnxscript's ``optimize_ir`` as it is, against the same passes without the rewrite rules
of ``streaming.SKIPPED_REWRITE_RULES``, and whether both give the same graph.

    python -m illume_rt.bench.export_fold [--preset tiny] [--rounds 2] -o DIR

Each component of the preset is traced once (``export_structure``, its time recorded too, so the share of a whole
export is known), then each round folds a fresh trace both ways, in alternating order, on one thread. "Same graph":
the same operators with the same attributes in the same order (onnx_ir's recursive node iterator), and the same
initializer names. Writes ``results.json`` and ``NOTES.md`` into DIR.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from illume_rt.export import streaming

# the fold itself, taken before main (and tests) swap streaming.fold_small_constants out for the traces
FOLD = streaming.fold_small_constants

def graph_signature(model) -> tuple:
    import onnx_ir as ir

    nodes = [(n.op_type, n.domain, tuple(sorted((k, str(a)) for k, a in n.attributes.items())))
             for n in ir.traversal.RecursiveGraphIterator(model.graph)]
    return tuple(nodes), tuple(sorted(model.graph.initializers))


def optimize_ir_as_it_is(model) -> None:
    """The fold as it was before SKIPPED_REWRITE_RULES: onnxscript's optimize_ir, weights held out."""
    from onnxscript.optimizer import optimize_ir

    FOLD(model, optimize=optimize_ir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m illume_rt.bench.export_fold", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("export_fold: --rounds must be at least 1")
    import logging

    import numpy as np
    import torch

    from illume_rt.bench.measure import machine, versions
    from illume_rt.export import components as C
    from illume_rt.export.bundle import build_reference_models, components_for
    from illume_rt.export.configs import get_preset

    torch.set_num_threads(1)
    logging.getLogger("onnx_ir.passes.common.initializer_deduplication").setLevel(logging.ERROR)
    arms = {"optimize_ir": optimize_ir_as_it_is, "without skipped rules": FOLD}
    models = build_reference_models(get_preset(args.preset))
    traced_as_is = streaming.fold_small_constants
    rows = []
    try:
        streaming.fold_small_constants = lambda model: None  # export_structure traces; the arms fold
        for comp in components_for(models):
            module = comp.build_module()
            sample = C._torch_inputs(comp, comp.make_inputs(comp.sample_dims(0), np.random.default_rng(0)))
            dyn = C._dynamic_shapes(comp, module)

            def trace():
                return streaming.export_structure(module, sample, comp.input_names(), comp.output_names(), dyn)

            start = time.process_time()
            trace()
            row = {"component": comp.name, "trace_cpu_s": round(time.process_time() - start, 2),
                   "fold_cpu_s": {name: [] for name in arms}}
            signatures = {}
            for r in range(args.rounds):
                order = list(arms) if r % 2 == 0 else list(arms)[::-1]
                for name in order:
                    graph = trace()
                    start = time.process_time()
                    arms[name](graph)
                    row["fold_cpu_s"][name].append(round(time.process_time() - start, 3))
                    signatures[name] = graph_signature(graph)
            first, second = signatures.values()
            row["nodes"] = len(first[0])
            row["same_graph"] = first == second
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        streaming.fold_small_constants = traced_as_is

    def total(name: str) -> float:
        return sum(min(row["fold_cpu_s"][name]) for row in rows)

    trace_total = sum(row["trace_cpu_s"] for row in rows)
    before, after = total("optimize_ir"), total("without skipped rules")
    summary = {"skipped_rules": list(streaming.SKIPPED_REWRITE_RULES),
               "every_graph_the_same": all(row["same_graph"] for row in rows),
               "fold_cpu_s": {"optimize_ir": round(before, 2), "without skipped rules": round(after, 2)},
               "fold_speed_ratio": round(before / after, 2), "trace_cpu_s": round(trace_total, 2),
               "trace_and_fold_speed_ratio": round((trace_total + before) / (trace_total + after), 3)}
    given = sys.argv[1:] if argv is None else argv
    results = {"command": "python -m illume_rt.bench.export_fold " + " ".join(map(shlex.quote, given)),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "versions": {**versions(), **_onnx_tool_versions()}, "preset": args.preset, "rounds": args.rounds,
               "rows": rows, "summary": summary}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Export: constant folding with and without {', '.join(summary['skipped_rules'])}", "",
             f"`{results['command']}`, {results['created']}, {machine().get('cpu', '?')}, one thread; the least of "
             f"{args.rounds} rounds per arm.", "",
             "| component | nodes | trace CPU s | fold, optimize_ir | fold, without | same graph |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['component']} | {row['nodes']} | {row['trace_cpu_s']} | "
                     f"{min(row['fold_cpu_s']['optimize_ir'])} | {min(row['fold_cpu_s']['without skipped rules'])} | "
                     f"{row['same_graph']} |")
    lines += ["", f"Fold: {before:.1f} -> {after:.1f} CPU s ({summary['fold_speed_ratio']}x); trace + fold "
              f"{summary['trace_and_fold_speed_ratio']}x. Every graph the same: {summary['every_graph_the_same']}."]
    (args.output / "NOTES.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))
    return 0 if summary["every_graph_the_same"] else 1


def _onnx_tool_versions() -> dict:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("onnxscript", "onnx-ir")}


if __name__ == "__main__":
    raise SystemExit(main())

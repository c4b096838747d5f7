"""Peak memory of chosen export phases on a checkpoint, without a whole export (bench/scale.py runs that).

    python -m illume_rt.bench.export_phases MLLM_DIR DUALVITOK_BIN --components lm_head_text,pixel_decoder --tables

Loads the checkpoint lazily as ``illume-rt export --checkpoint`` does, exports the named components with the same
``export_onnx`` into a scratch folder (deleted after), optionally writes the tables, and prints the process's peak
RSS (``ru_maxrss``) after each phase, with the verification figures (and, for a sampled check, what was sampled).
For re-measuring or re-verifying one phase after a change, in minutes instead of the export's half hour.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m illume_rt.bench.export_phases", description=__doc__.splitlines()[0])
    parser.add_argument("mllm")
    parser.add_argument("dualvitok")
    parser.add_argument("--components", default="", help="comma-separated component names")
    parser.add_argument("--tables", action="store_true", help="also write the tables (embedding, codebooks)")
    parser.add_argument("--scratch", default=None, help="folder for the scratch output (default: beside the mllm)")
    args = parser.parse_args(argv)

    import numpy as np

    from illume_rt.export.bundle import SAMPLED_KEYS, components_for, tables_for
    from illume_rt.export.checkpoints import load_reference_models
    from illume_rt.export.components import export_onnx

    t0 = time.perf_counter()
    models = load_reference_models(args.mllm, args.dualvitok, lazy=True)
    phases = [{"phase": "load (lazy)", "seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": peak_rss_bytes()}]
    print(json.dumps(phases[-1]), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-phases-", dir=args.scratch or Path(args.mllm).parent))
    try:
        wanted = [c for c in args.components.split(",") if c]
        for comp in components_for(models):
            if comp.name not in wanted:
                continue
            t0 = time.perf_counter()
            report = export_onnx(comp, comp.build_module(), scratch / f"{comp.name}.onnx", seed=models.preset.seed)
            phases.append({"phase": comp.name, "method": report["method"], "seconds": round(time.perf_counter() - t0, 1),
                           "peak_rss_bytes": peak_rss_bytes(), "worst_cosine": report["worst_cosine"],
                           "worst_max_abs_err": report["worst_max_abs_err"],
                           **{k: report[k] for k in SAMPLED_KEYS if k in report}})
            print(json.dumps(phases[-1]), flush=True)
            for f in scratch.iterdir():
                f.unlink()
        if args.tables:
            t0 = time.perf_counter()
            for name, table in tables_for(models):
                np.save(scratch / f"{name}.npy", np.ascontiguousarray(table))
                del table
            phases.append({"phase": "tables", "seconds": round(time.perf_counter() - t0, 1),
                           "peak_rss_bytes": peak_rss_bytes()})
            print(json.dumps(phases[-1]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

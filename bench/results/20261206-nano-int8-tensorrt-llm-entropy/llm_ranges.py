"""The INT8 tensorrt LLM of a nano FP32 bundle quantized with each of ModelOpt's activation-range methods (max,
entropy), the LLM only, the other graphs FP32: its graph-gate figures (worst held-out cosine against FP32,
teacher-forced top-1) and the calibration time. No prompt scoring: the recipe's whole flavour is scored by
``python -m illume_rt.nano.quantized_eval --flavours int8-tensorrt``.

    python llm_ranges.py FP32_BUNDLE OUT.json [THREADS]
"""
import json
import sys
import tempfile
import time
from pathlib import Path

from illume_rt.calibration import recipes
from illume_rt.calibration.quantize import quantize_bundle
from illume_rt.nano import quantized_eval

METHODS = ("max", "entropy")


def main(bundle: str, out: str, threads: str = "2") -> int:
    result = {"command": " ".join(["python llm_ranges.py", bundle, out, threads]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": quantized_eval._machine(), "versions": quantized_eval._versions(),
              "code_commit": quantized_eval._commit(),
              "bundle_weights": json.loads((Path(bundle) / "manifest.json").read_text())["model"].get("source"),
              "methods": {}}
    committed = recipes.LLM_TENSORRT_CALIBRATION["nano"]
    try:
        for method in METHODS:
            recipes.LLM_TENSORRT_CALIBRATION["nano"] = method
            with tempfile.TemporaryDirectory() as scratch:
                t0 = time.time()
                manifest = quantize_bundle(bundle, Path(scratch) / "q", "int8", "tensorrt", keep_failed=True,
                                           threads=int(threads), components=["llm"], prompt_scorers={},
                                           log=lambda m: None)
                q = manifest["quantization"]
                result["methods"][method] = {"recipe": manifest["components"]["llm"]["quantization"]["recipe"],
                                             "llm": quantized_eval._graph_summary(manifest)["llm"],
                                             "status": q["status"], "failures": q["failures"],
                                             "seconds": round(time.time() - t0, 1)}
            print(method, json.dumps(result["methods"][method]), flush=True)
    finally:
        recipes.LLM_TENSORRT_CALIBRATION["nano"] = committed
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

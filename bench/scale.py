"""Cost growth with model size: export (and optionally one 256x256 image) at each preset's real shapes.

    python -m illume_rt.bench.scale 3b 7b --work DIR [--generate] [-o bench/results/<time>-scale]

For each preset: a random-weight checkpoint in the official layout is written once under ``--work``
(export/synthetic.py), then ``illume-rt export --checkpoint`` runs in a child process, which is what the
figures time: wall time and peak resident set (the child's ``ru_maxrss``, the same figure ``/usr/bin/time -v``
prints). ``--generate`` then runs ``illume-rt generate`` on the bundle (FP32, ort-cpu, 256x256, greedy) in another
child and records its time and peak. These runs take minutes to hours: they are a bench, never CI.
Results: ``results.json`` and ``results.md`` with the command, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def _child(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` (niced) and return its wall time, exit code and peak RSS; output goes to ``log_path``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"command": " ".join(shlex.quote(c) for c in cmd), "exit_code": os.waitstatus_to_exitcode(status),
            "seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "log": log_path.name}


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _parameters(preset_name: str) -> dict:
    from illume_rt.export.synthetic import mllm_shapes
    from illume_rt.export.configs import get_preset

    shapes = mllm_shapes(get_preset(preset_name))
    count = {"llm": 0, "vision": 0}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        count["vision" if name.startswith("model.vision_tower.") or name.startswith("model.mm_projector.")
              else "llm"] += n
    return count


def run(presets: list[str], work: Path, out: Path, generate: bool, dtype: str) -> dict:
    from illume_rt.bench.measure import machine, versions
    from illume_rt.export.synthetic import write_checkpoint

    out.mkdir(parents=True, exist_ok=False)
    exe = [sys.executable, "-m", "illume_rt.cli"]
    nice = ["nice", "-n", "10"]
    results: dict = {"command": "python -m illume_rt.bench.scale " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                     "machine": machine(), "versions": versions(), "rows": []}
    for name in presets:
        ckpt = work / f"ckpt-{name}"
        if not ckpt.exists():
            write_checkpoint(ckpt, name)
        bundle = work / f"bundle-{name}-{dtype}"
        row: dict = {"preset": name, "parameters": _parameters(name), "weight_dtype": dtype,
                     "checkpoint_bytes": _bytes(ckpt)}
        cmd = nice + exe + ["export", "--checkpoint", str(ckpt / "mllm"), "--tokenizer-checkpoint",
                            str(ckpt / "dualvitok.bin"), "--dtype", dtype, "-o", str(bundle), "--overwrite"]
        row["export"] = _child(cmd, out / f"export-{name}.log")
        if row["export"]["exit_code"] == 0:
            row["bundle_bytes"] = _bytes(bundle)
            manifest = json.loads((bundle / "manifest.json").read_text())
            row["verification"] = {c: e["accuracy"].get("method") for c, e in manifest["components"].items()}
            if generate:
                cmd = nice + exe + ["generate", "a cat", "--bundle", str(bundle), "--resolution", "256x256",
                                    "--greedy", "--seed", "0", "-q", "-o", str(out / f"{name}-256.png")]
                row["generate_256"] = _child(cmd, out / f"generate-{name}.log")
        results["rows"].append(row)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    return results


def table(results: dict) -> str:
    lines = [f"command: `{results['command']}`", "",
             "| preset | LLM params | vision params | checkpoint | bundle | export time | export peak RSS | "
             "256x256 image time | image peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        gen = r.get("generate_256") or {}
        exp = r["export"]
        ok = "" if exp["exit_code"] == 0 else f" (exit {exp['exit_code']})"
        lines.append(
            f"| {r['preset']} | {r['parameters']['llm'] / 1e9:.2f} B | {r['parameters']['vision'] / 1e9:.2f} B | "
            f"{r['checkpoint_bytes'] / 1e9:.1f} GB | {r.get('bundle_bytes', 0) / 1e9:.1f} GB | "
            f"{exp['seconds'] / 60:.1f} min{ok} | {exp['peak_rss_bytes'] / 1e9:.2f} GB | "
            + (f"{gen['seconds'] / 60:.1f} min | {gen['peak_rss_bytes'] / 1e9:.2f} GB |" if gen else "not run | |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m illume_rt.bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+", help="3b, 7b (or bench)")
    parser.add_argument("--work", required=True, help="folder for the synthetic checkpoints and bundles (tens of GB)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--generate", action="store_true", help="also generate one 256x256 image per bundle")
    parser.add_argument("-o", "--output", help="results folder (default bench/results/<time>-scale)")
    args = parser.parse_args(argv)
    out = Path(args.output) if args.output else (Path(__file__).resolve().parent / "results" /
                                                 time.strftime("%Y%m%d-%H%M%S-scale"))
    print(table(run(args.presets, Path(args.work), out, args.generate, args.dtype)))


if __name__ == "__main__":
    main()

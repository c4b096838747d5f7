"""Cost growth with model size: export (and optionally one 256x256 image) at each preset's real shapes.

    python -m illume_rt.bench.scale 3b 7b --work DIR [--generate] [-o bench/results/<time>-scale]

For each preset: a random-weight checkpoint in the official layout is written once under ``--work``
(export/synthetic.py), then ``illume-rt export --checkpoint`` runs in a child process, which is what the
figures time: wall time and peak resident set (the child's ``ru_maxrss``, the same figure ``/usr/bin/time -v``
prints). A step probe then opens the bundle in another child (``--probe``): the prefill of a 256x256 prompt, then
``--probe-steps`` semantic decode steps (body and semantic head, guidance batched), timed one by one; the median
step is set against the memory-bandwidth floor, the bytes one step must read (the body's weights and the semantic
head slice) over the read bandwidth measured in the same run (bench/measure.py). ``--generate`` also runs
``illume-rt generate`` on the bundle (ort-cpu, 256x256, greedy) in another child and records its time and peak.
A bundle whose weights do not fit in this machine's memory in float32 is not opened (the row says so). These runs
take minutes to hours: they are a bench, never CI. ``--bundle PRESET=DIR`` reuses a bundle already exported (its
export figures are then not measured). Results: ``results.json`` and ``results.md`` with the command, machine and
versions.
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


OFFICIAL = ("3b", "7b")  # presets with the official checkpoint layout (export/synthetic.py writes them)


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


def probe(bundle: Path, steps: int) -> dict:
    """In this process: open ``bundle`` (ort-cpu), prefill a 256x256 prompt, time ``steps`` semantic decode steps
    one by one (ImageGenerator.generate_next: one body call and one semantic head call, guidance batched)."""
    from illume_rt.runtime.bundle import load_bundle
    from illume_rt.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    # no sha256 pass over the files (5.5 min at 3B): the probe times decode steps, and the export just checked them
    pipe = Pipeline(load_bundle(bundle, verify=False), "ort-cpu")
    opened = time.perf_counter() - t0
    generator = pipe.image_generator("a cat", (256, 256), seed=0)
    t0 = time.perf_counter()
    generator.generate_next()  # the prefill and the first code
    prefill = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        generator.generate_next()
        times.append(time.perf_counter() - t0)
    held = _held_bytes(pipe.bundle.manifest, "llm") + _held_bytes(pipe.bundle.manifest, "lm_head_semantic")
    return {"open_s": round(opened, 2), "prefill_s": round(prefill, 3), "step_s": [round(t, 4) for t in times],
            "median_step_s": float(sorted(times)[len(times) // 2]),
            "step_bytes": held}


def _held_bytes(manifest: dict, name: str) -> int:
    """Bytes of graph ``name`` as onnxruntime holds it: its file and its external data, with 16-bit weights at
    twice their stored size (onnxruntime folds the Cast after each one to float32 when it loads the graph)."""
    entry = manifest["components"][name]
    stored = entry["bytes"] + manifest["files"].get(f"{name}_external_data", {}).get("bytes", 0)
    return stored * {"fp32": 1, "fp16": 2, "bf16": 2}[entry.get("weight_dtype", "fp32")]


def _weights_fit(bundle: Path) -> tuple[bool, int]:
    """Whether the bundle's graphs, held in float32 by onnxruntime (16-bit weights are cast when loaded), leave
    room on this machine: at most 80% of physical memory."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    need = sum(_held_bytes(manifest, name) for name in manifest["components"])
    return need <= 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), need


def run(presets: list[str], work: Path, out: Path, generate: bool, dtype: str, probe_steps: int = 8,
        bundles: dict[str, Path] | None = None) -> dict:
    from illume_rt.bench.measure import machine, read_bandwidth, versions
    from illume_rt.export.synthetic import write_checkpoint

    out.mkdir(parents=True, exist_ok=False)
    exe = [sys.executable, "-m", "illume_rt.cli"]
    nice = ["nice", "-n", "10"]
    results: dict = {"command": "python -m illume_rt.bench.scale " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                     "machine": machine(), "versions": versions(), "bandwidth": read_bandwidth(), "rows": []}
    bandwidth = results["bandwidth"]["bytes_per_s"]
    for spec in presets:
        name, _, own_dtype = spec.partition(":")  # PRESET or PRESET:DTYPE (e.g. 7b:bf16)
        dtype_here = own_dtype or dtype
        row: dict = {"preset": name, "parameters": _parameters(name), "weight_dtype": dtype_here}
        if bundles and name in bundles:
            bundle = bundles[name]
            row["export"] = None  # reused: not measured in this run
            row["source"] = f"reused bundle {bundle}"
            row["weight_dtype"] = json.loads((bundle / "manifest.json").read_text()).get("export", {}).get(
                "weight_dtype", "fp32")
        elif name not in OFFICIAL:
            # no official checkpoint layout (its vocabulary is not ILLUME+'s): exported from the preset's random
            # weights, built in memory, through the same streaming writer
            bundle = work / f"bundle-{name}-{dtype_here}"
            row["source"] = "--preset (random weights in memory)"
            cmd = nice + exe + ["export", "--preset", name, "--dtype", dtype_here, "-o", str(bundle), "--overwrite"]
            row["export"] = _child(cmd, out / f"export-{name}.log")
        else:
            ckpt = work / f"ckpt-{name}"
            if not ckpt.exists():
                write_checkpoint(ckpt, name)
            bundle = work / f"bundle-{name}-{dtype_here}"
            row["source"] = "--checkpoint (synthetic, official layout)"
            row["checkpoint_bytes"] = _bytes(ckpt)
            cmd = nice + exe + ["export", "--checkpoint", str(ckpt / "mllm"), "--tokenizer-checkpoint",
                                str(ckpt / "dualvitok.bin"), "--dtype", dtype_here, "-o", str(bundle), "--overwrite"]
            row["export"] = _child(cmd, out / f"export-{name}.log")
        row["bundle"] = str(bundle)
        if (bundle / "manifest.json").exists() and (row["export"] is None or row["export"]["exit_code"] == 0):
            row["bundle_bytes"] = _bytes(bundle)
            manifest = json.loads((bundle / "manifest.json").read_text())
            row["verification"] = {c: e["accuracy"].get("method") for c, e in manifest["components"].items()}
            fits, need = _weights_fit(bundle)
            if not fits:
                row["probe"] = {"skipped": f"needs {need / 1e9:.1f} GB of float32 weights in memory"}
            else:
                cmd = nice + [sys.executable, "-m", "illume_rt.bench.scale", "--probe", str(bundle),
                              "--probe-steps", str(probe_steps), "--work", str(work)]
                probe_run = _child(cmd, out / f"probe-{name}.log")
                row["probe"] = probe_run
                if probe_run["exit_code"] == 0:
                    figures = json.loads((out / f"probe-{name}.log").read_text().strip().splitlines()[-1])
                    figures["floor_s"] = figures["step_bytes"] / bandwidth
                    figures["floor_fraction"] = figures["floor_s"] / figures["median_step_s"]
                    probe_run.update(figures)
            if generate and fits:
                cmd = nice + exe + ["generate", "a cat", "--bundle", str(bundle), "--resolution", "256x256",
                                    "--greedy", "--seed", "0", "-q", "-o", str(out / f"{name}-256.png")]
                row["generate_256"] = _child(cmd, out / f"generate-{name}.log")
        results["rows"].append(row)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    return results


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def table(results: dict) -> str:
    bw = results["bandwidth"]["bytes_per_s"]
    lines = [f"command: `{results['command']}`", "",
             f"read bandwidth (same run): {bw / 1e9:.1f} GB/s", "",
             "| preset | LLM params | vision params | weights stored | bundle | export time | export peak RSS | "
             "step bytes | median step | floor | fraction of floor | 256x256 image | image peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        gen = r.get("generate_256") or {}
        exp = r.get("export")
        if exp is None:
            export_cells = "not measured (bundle reused) | |"
        else:
            ok = "" if exp["exit_code"] == 0 else f" (exit {exp['exit_code']})"
            export_cells = f"{exp['seconds'] / 60:.1f} min{ok} | {exp['peak_rss_bytes'] / 1e9:.2f} GB |"
        p = r.get("probe") or {}
        if "median_step_s" in p:
            probe_cells = (f"{p['step_bytes'] / 1e9:.2f} GB | {p['median_step_s'] * 1e3:.0f} ms | "
                           f"{p['floor_s'] * 1e3:.0f} ms | {100 * p['floor_fraction']:.0f}% |")
        else:
            probe_cells = f"{p.get('skipped', 'not run')} | | | |"
        lines.append(
            f"| {r['preset']} | {_count(r['parameters']['llm'])} | {_count(r['parameters']['vision'])} | "
            f"{r['weight_dtype']} | {r.get('bundle_bytes', 0) / 1e9:.2f} GB | {export_cells} {probe_cells} "
            + (f"{gen['seconds'] / 60:.1f} min | {gen['peak_rss_bytes'] / 1e9:.2f} GB |" if gen else "not run | |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m illume_rt.bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="tiny, bench, 3b, 7b; PRESET:DTYPE overrides --dtype for one")
    parser.add_argument("--work", required=True, help="folder for the synthetic checkpoints and bundles (tens of GB)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--generate", action="store_true", help="also generate one 256x256 image per bundle")
    parser.add_argument("--probe-steps", type=int, default=8, help="semantic decode steps timed per bundle")
    parser.add_argument("--bundle", action="append", default=[], metavar="PRESET=DIR",
                        help="reuse this exported bundle for PRESET (no export measured)")
    parser.add_argument("--probe", metavar="BUNDLE", help=argparse.SUPPRESS)  # the child: print probe figures
    parser.add_argument("-o", "--output", help="results folder (default bench/results/<time>-scale)")
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(Path(args.probe), args.probe_steps)))
        return
    if not args.presets:
        parser.error("name at least one preset")
    bundles = {}
    for item in args.bundle:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "manifest.json").is_file():
            parser.error(f"--bundle takes PRESET=DIR with a bundle in DIR, got {item!r}")
        bundles[name] = Path(folder)
    out = Path(args.output) if args.output else (Path(__file__).resolve().parent / "results" /
                                                 time.strftime("%Y%m%d-%H%M%S-scale"))
    print(table(run(args.presets, Path(args.work), out, args.generate, args.dtype, args.probe_steps, bundles)))


if __name__ == "__main__":
    main()

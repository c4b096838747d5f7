"""Arguments of ``illume-rt bench`` (kept here so the CLI module only gains a subcommand)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--preset", default="bench", help="preset exported once for the benchmark (default: bench)")
    p.add_argument("--bundle", help="benchmark this bundle instead (its preset's reference is rebuilt from the seed)")
    p.add_argument("--int8-bundle", help="a quantized bundle of the same model: adds the INT8 runtime contender and "
                   "the FP32-vs-INT8 decode comparison in one process (make one with python -m illume_rt.bench.int8 "
                   "--quantize)")
    p.add_argument("--int8-repeats", type=int, default=7, help="interleaved repeats of the FP32-vs-INT8 comparison")
    p.add_argument("--resolutions", default="256x256,512x512", help="comma-separated HEIGHTxWIDTH list")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per contender and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--rounds", type=int, default=1, help="contenders re-run in turn this many times (interleaved)")
    p.add_argument("--probe-codes", type=int, default=12, help="codes decoded per level in each timed probe")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every contender (default: all)")
    p.add_argument("--text-tokens", type=int, default=48, help="new tokens in the text-decoding comparison")
    p.add_argument("--full", action="store_true", help="also decode whole images with the runtime at the first resolution (slow) to check the estimate")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("-o", "--output", help="results folder (default bench/results/<time>-<preset>)")
    par = p.add_argument_group("parallel decoding and batching (bench/parallel.py)")
    par.add_argument("--parallel", action="store_true",
                     help="measure only these: whole images plain vs parallel decoding (acceptance per level, calls, "
                          "wall time), verify-step cost vs width, N images in one batch vs one after another")
    par.add_argument("--parallel-windows", default="4,8,12",
                     help="comma-separated windows (codes per verify step) to compare with the plain loop")
    par.add_argument("--parallel-seeds", type=int, default=4,
                     help="whole images per mode at --parallel-resolution (0: skip; meaningful on a trained model)")
    par.add_argument("--parallel-resolution", default="512x512")
    par.add_argument("--batch-images", default="2,4", help="comma-separated N for the batch comparison (0: skip)")
    par.add_argument("--batch-resolution", default="256x256")
    par.add_argument("--acceptance-from", metavar="RESULTS_JSON",
                     help="a --parallel results.json of a trained model (nano): project its acceptance onto this run's "
                          "verify-step cost, and estimate the GPU time at the bandwidth floor")
    par.add_argument("--batch-probe-codes", type=int, default=0,
                     help="codes per level in the batch comparison (0: whole images)")
    p.add_argument("--scale", metavar="PRESETS", help="instead: cost growth with size for these presets (e.g. 3b,7b): "
                   "synthetic checkpoint, export, and with --scale-generate one 256x256 image each (bench/scale.py; "
                   "hours, tens of GB of disk under --scale-work)")
    p.add_argument("--scale-work", metavar="DIR", help="folder for --scale's checkpoints and bundles")
    p.add_argument("--scale-generate", action="store_true", help="with --scale: generate one 256x256 image per bundle")
    p.add_argument("--scale-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="with --scale: how the exported weights are stored")


def run_from_args(args) -> Path:
    if args.scale:
        from illume_rt.bench import scale

        if not args.scale_work:
            raise SystemExit("illume-rt bench: --scale needs --scale-work DIR (tens of GB)")
        argv = [*args.scale.split(","), "--work", args.scale_work, "--dtype", args.scale_dtype]
        argv += ["--generate"] if args.scale_generate else []
        argv += ["-o", args.output] if args.output else []
        scale.main(argv)
        return Path(args.output or ".")
    from illume_rt.bench.models import bench_bundle
    from illume_rt.bench.run import run_bench
    from illume_rt.runtime.bundle import load_bundle
    from illume_rt.contract import parse_resolution

    resolutions = [parse_resolution(r.strip()) for r in args.resolutions.split(",") if r.strip()]
    bundle = Path(args.bundle) if args.bundle else bench_bundle(args.preset)
    preset = load_bundle(bundle, verify=False).manifest["model"]["preset"]
    command = "illume-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.parallel:
        return _run_parallel(args, bundle, preset, command)
    return run_bench(bundle, preset, resolutions, repeats=args.repeats, warmup=args.warmup,
                     probe_codes=args.probe_codes, rounds=args.rounds, threads=args.threads, full=args.full,
                     int8_bundle=Path(args.int8_bundle) if args.int8_bundle else None, peer=not args.no_peer,
                     reference=not args.no_reference, ablations=not args.no_ablations,
                     text_tokens=args.text_tokens, out_dir=Path(args.output) if args.output else None,
                     int8_repeats=args.int8_repeats,
                     command="illume-rt " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


def _run_parallel(args, bundle: Path, preset: str, command: str) -> Path:
    import time

    from illume_rt.bench.parallel import run_parallel_bench
    from illume_rt.bench.run import RESULTS
    from illume_rt.contract import image_grid, parse_resolution

    resolution = parse_resolution(args.parallel_resolution)
    spec: dict = {"prompt": "a red circle at the top left on a blue background", "threads": args.threads,
                  "verify_cost": {"context": 64 + image_grid(*resolution).num_tokens,
                                  "widths": [1, 2, 4, 8, 12, 16],
                                  "repeats": args.repeats}}
    if args.parallel_seeds:
        spec["acceptance"] = {"resolution": list(resolution), "seeds": args.parallel_seeds,
                              "windows": [int(w) for w in args.parallel_windows.split(",")]}
    images = [int(n) for n in args.batch_images.split(",") if int(n) > 0]
    if images:
        spec["batch"] = {"resolution": list(parse_resolution(args.batch_resolution)), "images": images,
                         "probe_codes": args.batch_probe_codes or None}
    out = Path(args.output) if args.output else RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-parallel-{preset}"
    acceptance = None
    if args.acceptance_from:
        import json

        acceptance = json.loads(Path(args.acceptance_from).read_text())["acceptance"]
    return run_parallel_bench(bundle, preset, spec, out, command, acceptance=acceptance,
                              acceptance_source=args.acceptance_from)

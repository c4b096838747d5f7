"""``illume-rt`` command line. Heavy packages (torch) are imported only by the commands that need them."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

from illume_rt.errors import INTERNAL_ERROR_EXIT, INTERRUPTED_EXIT, USER_ERROR_EXIT, IllumeError, UsageError

DEFAULT_PRESET = "nano"  # illume-nano, the trained miniature (nano/weights/); "tiny" is random weights
MAX_REFINE_STEPS = 1000  # a diffusers scheduler's num_train_timesteps; the bundle's own limit is checked too
MAX_NEW_TOKENS = 1 << 20


# -- values checked while parsing, so a bad one stops the command before any work -------------------------------

def _number(text: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'number' if kind is float else 'whole number'}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def ranged(kind, low=None, high=None, low_open: bool = False, hint: str = ""):
    """An argparse type: a finite float or an int within [low, high] (``low_open``: above low)."""
    def parse(text: str):
        value = _number(text, kind)
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            bounds = (f"above {low}" if low_open else f"at least {low}") if low is not None else ""
            bounds += (" and " if bounds and high is not None else "") + (f"at most {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bounds}{hint}")
        return value
    parse.__name__ = "number"
    return parse


def thread_count(text: str) -> int:
    from illume_rt.contract import LayoutError
    from illume_rt.runtime.options import check_threads

    try:
        return check_threads(_number(text, int))
    except LayoutError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def utf8_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the text is not valid UTF-8; pass it in UTF-8") from None
    return text


def resolution(text: str) -> tuple[int, int]:
    from illume_rt.contract import LayoutError, image_grid, parse_resolution

    try:
        value = parse_resolution(text)
        image_grid(*value)
    except LayoutError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported on one line (the usage text is one --help away)."""

    def error(self, message: str):
        self.exit(USER_ERROR_EXIT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cache_dir() -> Path:
    return Path(os.environ.get("ILLUME_RT_CACHE", Path.home() / ".cache" / "illume-rt"))


def default_bundle_path(preset: str = DEFAULT_PRESET) -> Path:
    """Cached bundle of a built-in preset, keyed by the exporter's source so a code change re-exports it."""
    return cache_dir() / "bundles" / f"{preset}-{builtin_key(preset)}"


def packaged_bundle_path(preset: str = DEFAULT_PRESET) -> Path:
    """Where a release puts the built-in model's bundle inside the package (``illume-rt package-builtin``), so a
    runtime-only install (no torch) runs the main job out of the box."""
    return Path(__file__).resolve().parent / "builtin" / preset


def builtin_key(preset: str) -> str:
    """Hash of what a built-in bundle is made from: the version, the exporter, runtime and contract sources, and
    (nano) the weights."""
    import illume_rt
    from illume_rt.files import source_files

    digest = hashlib.sha256(illume_rt.__version__.encode())
    for file in source_files(("illume_rt.export", "illume_rt.runtime"), modules=("illume_rt.contract",)):
        digest.update(file.read_bytes())
    if preset == "nano":  # the trained weights are part of the key
        from illume_rt.nano import checkpoint

        # the weights, and the loader that records facts about them (e.g. the trained resolutions)
        for file in [*checkpoint.weight_files(), Path(checkpoint.__file__)]:
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:12]


def builtin_models(preset: str):
    """The reference models of a built-in preset: 'nano' loads the committed illume-nano checkpoint through the
    official-checkpoint loaders; the others are random weights from the preset's seed."""
    if preset == "nano":
        from illume_rt.nano.checkpoint import available, load_models

        if not available():
            raise UsageError("the illume-nano weights (nano/weights/) are missing; run "
                             "python -m illume_rt.nano.train, or pass --preset tiny")
        return load_models()
    from illume_rt.export.bundle import build_reference_models
    from illume_rt.export.configs import get_preset

    try:
        return build_reference_models(get_preset(preset))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def ensure_default_bundle(preset: str = DEFAULT_PRESET, log=print) -> Path:
    """The built-in model's bundle, exported on first use. Concurrent first runs take a lock, so it is exported
    once: the others wait and then find it."""
    from illume_rt.files import MANIFEST, exclusive_lock

    packaged = packaged_bundle_path(preset)
    if (packaged / MANIFEST).is_file():
        try:
            made_from = json.loads((packaged / MANIFEST).read_text())["model"].get("builtin_key")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            made_from = None
        if made_from == builtin_key(preset):  # made from these very sources and weights
            return packaged
    path = default_bundle_path(preset)
    if (path / MANIFEST).is_file():
        return path
    import importlib.util

    # export/ imports torch lazily, so check for it here: a runtime-only install gets this line, not an error later
    missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"no --bundle given and the built-in model cannot be exported here ({', '.join(missing)} "
                         "not installed); install the export extra (pip install 'illume-rt[export]') or pass --bundle")
    from illume_rt.export.bundle import write_bundle

    with exclusive_lock(path.parent / f".{path.name}.lock"):
        if (path / MANIFEST).is_file():  # another run exported it while this one waited
            return path
        log(f"exporting the built-in '{preset}' model once to {path} ...")
        write_bundle(builtin_models(preset), path, log=lambda m: log("  " + m),
                     model_info={"builtin_key": builtin_key(preset)})
    return path


def cmd_package_builtin(args) -> None:
    """Put the built-in model's bundle into the package (illume_rt/builtin/PRESET), for a wheel that runs without
    torch: the cached export of these sources (made now if missing), copied in atomically."""
    import shutil

    from illume_rt.files import check_output_dir, publish_dir, scratch_dir

    source = ensure_default_bundle(args.preset, log=(lambda m: None) if args.quiet else print)
    out = packaged_bundle_path(args.preset)
    out.parent.mkdir(exist_ok=True)
    if source == out:
        print(f"the built-in '{args.preset}' model is already packaged at {out}")
        return
    out = check_output_dir(out, overwrite=True)
    work = scratch_dir(out)
    try:
        shutil.copytree(source, work, dirs_exist_ok=True)
        publish_dir(work, out, overwrite=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"packaged the built-in '{args.preset}' model at {out}; a wheel built now (pip install .) ships it")


def cmd_export(args) -> None:
    from illume_rt.files import check_output_dir

    check_output_dir(args.output, args.overwrite)  # before any model is loaded
    try:
        from illume_rt.export.bundle import write_bundle
    except ImportError as exc:
        raise UsageError(f"export needs the export extra ({exc}); pip install 'illume-rt[export]'") from None

    if args.checkpoint:
        from illume_rt.export.checkpoints import load_reference_models

        if not args.tokenizer_checkpoint:
            raise UsageError("--tokenizer-checkpoint DUALVITOK.bin is required with --checkpoint: the bundle's "
                             "pixel decoder and codebooks come from the DualViTok checkpoint (ILLUME-MLLM/dualvitok "
                             "pytorch_model.bin)")
        # lazy: the networks hold readers of the memory-mapped checkpoint; export streams each tensor from it
        models = load_reference_models(args.checkpoint, args.tokenizer_checkpoint, args.diffusion,
                                       base=args.preset, use_ema=args.tokenizer_ema, lazy=True)
        print(f"loaded {args.checkpoint} (preset {models.preset.name}, vocab {models.preset.vocab.vocab_rows} rows, "
              f"{'tied' if models.preset.llm.tie_word_embeddings else 'untied'} head)")
    else:
        for flag, value in (("--tokenizer-checkpoint", args.tokenizer_checkpoint), ("--diffusion", args.diffusion),
                            ("--tokenizer-ema", args.tokenizer_ema)):
            if value:
                raise UsageError(f"{flag} needs --checkpoint MLLM_DIR")
        models = builtin_models(args.preset or DEFAULT_PRESET)
    out = write_bundle(models, args.output, overwrite=args.overwrite, weight_dtype=args.dtype)
    print(f"bundle written to {out}")


def _sampling(args, task: str, pipe=None):
    """Sampling from the command line; options left unset keep the task's defaults: the model's when its bundle
    declares them (``pipe``), else the official ones. Called once before the model loads (bad options are refused
    up front) and again with ``pipe``."""
    from dataclasses import replace

    from illume_rt.runtime.options import OFFICIAL_SAMPLING

    defaults = pipe.default_sampling(task) if pipe is not None else OFFICIAL_SAMPLING[task]
    given = {"guidance_scale": args.guidance, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "pixel_top_k": args.pixel_top_k, "parallel_window": args.parallel_decoding}
    sampling = replace(defaults, greedy=args.greedy, **{k: v for k, v in given.items() if v is not None})
    sampling.validate()
    return sampling


def _refine(args, pipe=None):
    """--refine's RefineConfig: the options given, the rest the model's own defaults (``pipe``) or the official ones
    (before the pipeline is open: to refuse bad options first)."""
    from dataclasses import replace

    from illume_rt.runtime.refine import OFFICIAL_REFINE

    if not args.refine:
        return None
    defaults = pipe.default_refine() if pipe is not None else OFFICIAL_REFINE
    given = {"steps": args.steps, "guidance_scale": args.refine_guidance}
    config = replace(defaults, **{k: v for k, v in given.items() if v is not None})
    config.validate()
    return config


def _open_pipeline(args):
    """The pipeline of --bundle (or the built-in model)."""
    from illume_rt.runtime.pipeline import Pipeline

    bundle = Path(args.bundle) if args.bundle else ensure_default_bundle()
    if args.backend == "ort-cpu":
        from illume_rt.engines.ort import release_large_blocks_promptly

        release_large_blocks_promptly()  # a process-wide malloc setting: the CLI owns its process, so it opts in
    pipe = Pipeline.from_bundle(bundle, backend=args.backend, threads=args.threads,
                                trt_precision=getattr(args, "trt_precision", None))
    if pipe.random_weights:
        print(f"note: bundle {bundle.name} has RANDOM weights ({pipe.bundle.manifest['model']['preset']} preset): "
              "output is noise-like; pass --bundle with a real model for real results", file=sys.stderr)
    return pipe


def _draw(args, grid, run, printed: str | None = None, outputs: list[str] | None = None):
    """Run an image task under a progress bar over the sampled codes, save the PNG(s), print the stage table."""
    from tqdm import tqdm

    with tqdm(total=grid.num_codes, unit="tok", desc="semantic", disable=args.quiet, file=sys.stderr) as bar:
        levels_seen = {0}

        def on_token(level: int) -> None:
            if level not in levels_seen:  # disabled bars (-q) keep no description, so track the level here
                levels_seen.add(level)
                bar.set_description("pixel")
            bar.update(1)

        results = run(on_token)
    results = results if isinstance(results, list) else [results]
    outputs = outputs or [args.output]
    for result, output in zip(results, outputs):
        out = result.save(output)
        for line in result.notices:
            if line != printed:  # the resolution notice was printed before drawing
                print(f"note: {line}", file=sys.stderr)
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        print(f"wrote {out} ({result.image.shape[0]}x{result.image.shape[1]}); {stages} "
              f"({result.tokens.steps} decode steps)")


def _notice(pipe, size) -> str | None:
    """Print the resolution notice before the long decode; return it so that it is not printed twice."""
    line = pipe.resolution_notice(size)
    if line:
        print(f"note: {line}", file=sys.stderr)
    return line


def cmd_verify_tokens(args) -> None:
    """0 when the codes are equal, exit 1 when they differ (calibration/verify_tokens.py)."""
    try:
        from illume_rt.calibration.verify_tokens import record_in_manifest, verify_tokens, write_result
    except ImportError as exc:
        raise UsageError(f"verify-tokens needs the export extra ({exc}); pip install 'illume-rt[export]'") from None
    result = verify_tokens(args.checkpoint, args.bundle, prompt=args.prompt, codes=args.codes,
                           resolution=tuple(args.resolution), guidance=args.guidance, threads=args.threads,
                           verify_bundle=not args.no_verify_bundle, base=args.preset)
    out = write_result(args.output or f"{Path(args.bundle).resolve().name}-tokens.json", result)
    worst = (f"worst cosine {result['worst_cosine']:.8f}, max|err| {result['worst_max_abs_err']:.2e}"
             if result["worst_cosine"] is not None else "no scores compared")
    print(f"{'codes equal' if result['ok'] else 'CODES DIFFER'}: {result['codes_equal']}/{result['codes_compared']}"
          f" ({worst}); reference peak RSS {result['reference']['peak_rss_gb'] or 0:.1f} GB, runtime "
          f"{result['runtime']['peak_rss_gb'] or 0:.1f} GB; wrote {out}")
    if args.record:
        print(f"recorded in {record_in_manifest(args.bundle, result)}")
    if not result["ok"]:
        raise SystemExit(1)


def cmd_generate(args) -> None:
    from illume_rt.files import image_target
    from illume_rt.contract import image_grid

    outputs = numbered_outputs(args.output, args.num_images)
    for output in outputs:
        image_target(output)  # an unwritable target is refused before the model is loaded
    _sampling(args, "text_to_image")
    _refine(args)  # bad options refused before the model is loaded
    pipe = _open_pipeline(args)
    sampling = _sampling(args, "text_to_image", pipe)
    refine = _refine(args, pipe)  # the model's refinement defaults under the options given
    pipe.check_refine(refine)  # no decoder, or too many steps: said now, not after the image is decoded
    printed = _notice(pipe, args.resolution)
    _draw(args, image_grid(*args.resolution), lambda on_token: pipe.generate(
        args.prompt, args.resolution, seed=args.seed, sampling=sampling, refine=refine, on_token=on_token,
        num_images=args.num_images), printed, outputs)


def numbered_outputs(output: str, count: int) -> list[str]:
    """OUT.png for one image; OUT-0.png, OUT-1.png, ... for several (image i has seed + i)."""
    if count == 1:
        return [output]
    path = Path(output)
    return [str(path.with_name(f"{path.stem}-{i}{path.suffix}")) for i in range(count)]


def cmd_edit(args) -> None:
    from illume_rt.files import image_target
    from illume_rt.runtime.images import load_image, nearest_anchor
    from illume_rt.contract import image_grid

    image_target(args.output)
    _sampling(args, "editing")
    _refine(args)  # bad options refused before the model is loaded
    source = load_image(args.image)
    pipe = _open_pipeline(args)
    sampling = _sampling(args, "editing", pipe)
    refine = _refine(args, pipe)  # the model's refinement defaults under the options given
    pipe.check_refine(refine)  # no decoder, or too many steps: said now, not after the image is decoded
    anchor = nearest_anchor(source.height, source.width, pipe.edit_anchors)
    printed = _notice(pipe, anchor)
    grid = image_grid(*anchor)
    _draw(args, grid, lambda on_token: pipe.edit(source, args.instruction, seed=args.seed, sampling=sampling,
                                                 refine=refine, on_token=on_token), printed)


def cmd_understand(args) -> None:
    from illume_rt.runtime.images import load_image

    image = load_image(args.image)
    pipe = _open_pipeline(args)
    result = pipe.understand(image, args.question, max_new_tokens=args.max_new_tokens,
                             on_text=lambda text: print(text, end="", flush=True))
    print()
    for line in result.notices:
        print(f"note: {line}", file=sys.stderr)
    t = result.timings
    print(f"({len(result.token_ids)} tokens; image encode {t['image_encode']:.2f}s, decode {t['decode']:.2f}s)",
          file=sys.stderr)


def cmd_build_engines(args) -> None:
    """Check every graph against TensorRT's operator table and Q/DQ rules, then build (or reuse) the engines."""
    from illume_rt.engines.checks import check_bundle
    from illume_rt.engines.profiles import uncovered_requests
    from illume_rt.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    if args.precision is not None:  # strongly typed: the precision is the bundle's; --precision only confirms it
        from illume_rt.engines.tensorrt_build import check_requested_precision

        check_requested_precision(bundle, args.precision)
    failed = False
    for report in check_bundle(bundle, args.tensorrt_ops):
        status = "ok" if report.ok else "FAIL"
        print(f"{report.graph:<18} {status}  {sum(report.ops.values())} nodes, {len(report.ops)} op types"
              + (f", {len(report.warnings)} warnings" if report.warnings else ""))
        for line in report.errors[:10]:
            print(f"  error: {line}")
        failed |= not report.ok
    missing = uncovered_requests(bundle.manifest, [16, 256])
    for line in missing[:10]:
        print(f"  uncovered shape: {line}")
    if failed or missing:
        raise UsageError("the bundle's graphs do not fit TensorRT as they are (see above); re-export them")
    if args.check_only:
        print("checks passed (no engines built: --check-only)")
        return
    from illume_rt.engines.tensorrt_build import BuildOptions, build_bundle_engines

    components = args.components.split(",") if args.components else None
    options = BuildOptions(weight_streaming=args.weight_streaming, refittable=args.refittable,
                           editable_timing_cache=args.editable_timing_cache)
    entries = build_bundle_engines(bundle, args.precision, args.opt_level, components,
                                   workspace=args.workspace_gib << 30, force=args.force, options=options)
    print(f"{len(entries)} engines in {bundle.path / 'engines'}")


def cmd_quantize(args) -> None:
    """FP32 bundle -> new INT8/FP8 bundle with calibration record, accuracy figures and gates (issue 5)."""
    try:
        from illume_rt.calibration.quantize import quantize_bundle, summary_lines
    except ImportError as exc:
        raise UsageError(f"quantize needs the export and quant extras ({exc}); "
                         "pip install -e '.[export,quant]'") from None
    plans = {}
    if args.plan == "quick":  # one 256x256 image to calibrate on, one held out (bench/int8.py quick_plans)
        from illume_rt.bench.int8 import quick_plans

        plans["calibration"], plans["evaluation"] = quick_plans()
    manifest = quantize_bundle(args.bundle, args.output, args.precision, args.target, keep_failed=args.keep_failed,
                               **plans,
                               threads=args.threads, log=lambda m: print(m, file=sys.stderr),
                               high_precision=args.high_precision, overwrite=args.overwrite,
                               components=args.components.split(",") if args.components else None)
    print("\n".join(summary_lines(manifest)))
    status = manifest["quantization"]["status"]
    print(f"bundle written to {args.output}" + (" (marked FAILED: --keep-failed)" if status != "passed" else ""))
    if status != "passed":
        raise UsageError("accuracy gates missed (bundle kept for inspection, marked failed in its manifest)")


def cmd_bench(args) -> None:
    from illume_rt.bench.cli import run_from_args

    run_from_args(args)


def _runtime_options(parser) -> None:
    parser.add_argument("--bundle", help="bundle folder (default: the built-in model, illume-nano, exported once)")
    parser.add_argument("--backend", default="ort-cpu", choices=["ort-cpu", "ort-cuda", "tensorrt"])
    parser.add_argument("--trt-precision", choices=["fp32", "fp16", "bf16", "int8", "fp8"], default=None,
                        help="tensorrt: which of the bundle's built engines to run when there are several "
                             "(default: the bundle's own precision)")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="intra-op threads, 1 to the number of cores (default: all cores)")


def _image_task_options(parser, defaults: str) -> None:
    _runtime_options(parser)
    group = parser.add_argument_group("sampling", f"defaults: {defaults}")
    from illume_rt.runtime.options import MAX_SEED

    group.add_argument("--seed", type=ranged(int, 0, MAX_SEED), default=0)
    group.add_argument("--guidance", type=ranged(float, 1.0, 1e4), default=None,
                       help="classifier-free guidance scale (1 = off)")
    group.add_argument("--temperature", type=ranged(float, 0.0, 1e4, low_open=True), default=None)
    group.add_argument("--top-k", type=ranged(int, 0), default=None,
                       help="semantic level (0 = off); the pixel level uses 3x")
    group.add_argument("--pixel-top-k", type=ranged(int, 0), default=None, help="override the pixel-level top-k")
    group.add_argument("--top-p", type=ranged(float, 0.0, 1.0, low_open=True), default=None)
    group.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    from illume_rt.runtime.options import DEFAULT_PARALLEL_WINDOW, MAX_PARALLEL_WINDOW

    group.add_argument("--parallel-decoding", type=ranged(int, 2, MAX_PARALLEL_WINDOW), nargs="?",
                       const=DEFAULT_PARALLEL_WINDOW, default=None, metavar="K",
                       help="speculative Jacobi decoding: draft and verify up to K codes per body call (default "
                            f"{DEFAULT_PARALLEL_WINDOW}); lossless: the same distribution, fewer calls")
    ref = parser.add_argument_group("diffusion refinement (2x output)")
    ref.add_argument("--refine", action="store_true", help="decode with the diffusion decoder instead")
    ref.add_argument("--steps", type=ranged(int, 1, MAX_REFINE_STEPS), default=None,
                     help="denoising steps (default: the model's, else 20)")
    ref.add_argument("--refine-guidance", type=ranged(float, 1.0, 1e4), default=None,
                     help="diffusion guidance (default: the model's, else 2.0)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="illume-rt", description="ILLUME+ inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("export", help="export a model to a bundle (ONNX graphs + tables + manifest)")
    exp.add_argument("-o", "--output", required=True,
                     help="bundle folder to write: a new or empty folder (an existing bundle needs --overwrite)")
    exp.add_argument("--overwrite", action="store_true", help="replace the bundle at -o (atomically)")
    exp.add_argument("--preset", default=None,
                     help="without --checkpoint: a built-in preset, nano (default: illume-nano, trained here) or "
                          "tiny, bench, 3b, 7b (random weights); with "
                          "--checkpoint: the preset whose vision tower, MoVQ and codebook-dim shapes the checkpoints "
                          "have (default: the official ones; the LLM and vocabulary come from config.json)")
    exp.add_argument("--checkpoint", metavar="MLLM_DIR",
                     help="official ILLUME+ MLLM folder (config.json, tokenizer.json, safetensors)")
    exp.add_argument("--tokenizer-checkpoint", metavar="DUALVITOK_BIN",
                     help="DualViTok pytorch_model.bin (codebooks and pixel decoder); required with --checkpoint")
    exp.add_argument("--tokenizer-ema", action="store_true", help="use the 'ema' weights of the DualViTok checkpoint")
    exp.add_argument("--diffusion", metavar="DIR", help="diffusion decoder diffusers folder (optional)")
    exp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                     help="how the graphs store their weights (default fp32); 16-bit weights are cast to float32 "
                          "inside each graph, so inputs, outputs and arithmetic stay float32 and the bundle is "
                          "half the size on disk (onnxruntime on a CPU holds them as float32 once loaded)")
    exp.set_defaults(func=cmd_export)

    ver = sub.add_parser("verify-tokens", help="first image codes of a prompt: PyTorch reference from the checkpoint "
                                               "vs the bundle (exit 1 when they differ)")
    from illume_rt.calibration import verify_tokens as vt  # its defaults (numpy only at import)

    ver.add_argument("--checkpoint", required=True, metavar="MLLM_DIR",
                     help="the MLLM folder the bundle was exported from (only the LLM is read)")
    ver.add_argument("--bundle", required=True, help="the bundle to check")
    ver.add_argument("--codes", type=ranged(int, 1), default=vt.DEFAULT_CODES,
                     help=f"image codes to compare (default {vt.DEFAULT_CODES}: the first semantic codes)")
    ver.add_argument("--prompt", default=vt.DEFAULT_PROMPT, help=f"text-to-image prompt (default {vt.DEFAULT_PROMPT!r})")
    ver.add_argument("--resolution", type=resolution, default=vt.DEFAULT_RESOLUTION,
                     help="HEIGHTxWIDTH (default %dx%d)" % vt.DEFAULT_RESOLUTION)
    ver.add_argument("--guidance", type=ranged(float, 1.0, 1e4), default=vt.DEFAULT_GUIDANCE,
                     help=f"guidance scale (default {vt.DEFAULT_GUIDANCE})")
    ver.add_argument("--threads", type=thread_count, default=None,
                     help="threads of each side, 1 to the number of cores (default: all cores)")
    ver.add_argument("--preset", default=None,
                     help="as for export --checkpoint: the preset whose vision/MoVQ shapes the checkpoint has "
                          "(default: the official ones)")
    ver.add_argument("--no-verify-bundle", action="store_true",
                     help="skip the sha256 check of the bundle's files when the runtime opens it")
    ver.add_argument("-o", "--output", default=None, help="JSON result (default: BUNDLE_NAME-tokens.json here)")
    ver.add_argument("--record", action="store_true",
                     help="also record the summary in the bundle's manifest (components.llm.accuracy.end_to_end)")
    ver.set_defaults(func=cmd_verify_tokens)

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("prompt", type=utf8_text)
    gen.add_argument("-o", "--output", default="illume.png", help="image to write (.png, .jpg or .webp)")
    gen.add_argument("--resolution", type=resolution, default=(256, 256),
                     help="HEIGHTxWIDTH, one of the ILLUME+ anchors")
    from illume_rt.contract import MAX_IMAGES

    gen.add_argument("--num-images", type=ranged(int, 1, MAX_IMAGES), default=1, metavar="N",
                     help="N images in one batch (seeds SEED..SEED+N-1), written as OUT-0.png ... OUT-{N-1}.png")
    _image_task_options(gen, "guidance 2.0, temperature 1.0, top-k 2048 (pixel 6144), top-p 1.0")
    gen.set_defaults(func=cmd_generate)

    edit = sub.add_parser("edit", help="edit an image by instruction")
    edit.add_argument("image", help="PNG or JPEG (any size; generated at the nearest anchor, resized back)")
    edit.add_argument("instruction", type=utf8_text)
    edit.add_argument("-o", "--output", default="edited.png", help="image to write (.png, .jpg or .webp)")
    _image_task_options(edit, "guidance 1.5, temperature 0.7, top-k 512 (pixel 1536), top-p 0.8")
    edit.set_defaults(func=cmd_edit)

    und = sub.add_parser("understand", help="answer a question about an image (streamed)")
    und.add_argument("image")
    und.add_argument("question", type=utf8_text)
    und.add_argument("--max-new-tokens", type=ranged(int, 1, MAX_NEW_TOKENS), default=1024,
                     help="answer length limit (capped to the room the context leaves; a note says when an answer reaches it)")
    _runtime_options(und)
    und.set_defaults(func=cmd_understand)

    eng = sub.add_parser("build-engines", help="build TensorRT engines for a bundle (into BUNDLE/engines)")
    eng.add_argument("bundle")
    eng.add_argument("--precision", default=None, choices=["fp16", "bf16", "fp32", "int8", "fp8"],
                     help="confirm the bundle's precision (engines are strongly typed: the precision comes from "
                          "the bundle; make one with `illume-rt quantize --precision P --target tensorrt`)")
    eng.add_argument("--weight-streaming", action="store_true",
                     help="build for weight streaming (run with ILLUME_RT_TRT_WEIGHT_BUDGET=BYTES|auto)")
    eng.add_argument("--refittable", action="store_true", help="build refittable engines (swap weights later)")
    eng.add_argument("--editable-timing-cache", action="store_true", help="TensorRT's editable timing cache")
    eng.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="N",
                     help="TensorRT builder optimization level 0..5 (default 3)")
    eng.add_argument("--components", help="comma-separated subset (default: every graph)")
    eng.add_argument("--workspace-gib", type=int, default=4)
    eng.add_argument("--force", action="store_true", help="rebuild even when a cached engine matches")
    eng.add_argument("--check-only", action="store_true",
                     help="run the operator, Q/DQ and profile checks only (works without TensorRT)")
    eng.add_argument("--tensorrt-ops", default=None, help="operator table version (default: newest shipped)")
    eng.set_defaults(func=cmd_build_engines)

    quant = sub.add_parser("quantize", help="quantize (INT8/FP8) or convert (FP16/BF16) a bundle into a new one, gated")
    quant.add_argument("bundle", help="FP32 bundle folder")
    quant.add_argument("--precision", required=True, choices=["int8", "fp8", "fp16", "bf16"],
                       help="int8/fp8: calibrated Q/DQ; fp16/bf16: ModelOpt AutoCast (TensorRT target only)")
    quant.add_argument("--target", default="tensorrt", choices=["tensorrt", "ort-cpu"],
                       help="tensorrt: symmetric signed Q/DQ (modelopt); ort-cpu: U8S8 INT8 for onnxruntime CPU")
    quant.add_argument("--high-precision", default=None, choices=["fp16", "bf16", "fp32"],
                       help="int8/fp8: type of the unquantized layers (default fp16 for tensorrt, fp32 for ort-cpu)")
    quant.add_argument("-o", "--output", required=True,
                       help="bundle folder to write: a new or empty folder (an existing bundle needs --overwrite)")
    quant.add_argument("--overwrite", action="store_true", help="replace the bundle at -o (atomically)")
    quant.add_argument("--keep-failed", action="store_true",
                       help="write the bundle even when a gate is missed (marked failed in the manifest; exit 2)")
    quant.add_argument("--threads", type=thread_count, default=None, help="onnxruntime intra-op threads")
    quant.add_argument("--components", default=None,
                       help="comma-separated graphs to quantize (default: every one the recipes cover); the others "
                            "stay FP32, e.g. --components llm")
    quant.add_argument("--plan", default="default", choices=["default", "quick"],
                       help="calibration/evaluation runs: default (docs/quantization.md) or quick (one 256x256 "
                            "image each, no understanding or refinement: for the big presets on a small machine)")
    quant.set_defaults(func=cmd_quantize)

    from illume_rt.bench.cli import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="latency, bandwidth and memory against the reference and a peer")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    package = sub.add_parser("package-builtin", help="export the built-in model into the package (release builds: "
                                                     "a wheel built after this runs the main job without torch)")
    package.add_argument("--preset", default=DEFAULT_PRESET, choices=["nano", "tiny"])
    package.add_argument("-q", "--quiet", action="store_true")
    package.set_defaults(func=cmd_package_builtin)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; 2 with one line for anything the user can fix (IllumeError, OSError, bad arguments);
    130 on Ctrl-C; 70 for an illume-rt bug (ILLUME_RT_DEBUG=1 shows its traceback)."""
    for stream in (sys.stdout, sys.stderr):  # paths that are not UTF-8 must not crash a print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except SystemExit as exc:  # argparse: --help (0) or a bad argument (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else USER_ERROR_EXIT
    except IllumeError as exc:
        print(f"illume-rt: error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("illume-rt: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except OSError as exc:  # the disk filled, a file vanished, permissions: the system said why
        from illume_rt.files import describe_oserror

        print(f"illume-rt: error: {describe_oserror(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except Exception as exc:  # noqa: BLE001 -- a bug: one line, and the traceback on request
        if os.environ.get("ILLUME_RT_DEBUG"):
            raise
        print(f"illume-rt: internal error: {type(exc).__name__}: {str(exc)[:300]} (this is a bug in illume-rt; "
              "rerun with ILLUME_RT_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return INTERNAL_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())

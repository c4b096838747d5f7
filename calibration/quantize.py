"""``quantize_bundle``: FP32 bundle in, a NEW quantized (int8/fp8) or converted (fp16/bf16) bundle out, with
calibration record, figures and gates.

fp16/bf16 (TensorRT target only: TensorRT 11 builds strongly typed, so the bundle carries the precision): the graphs
are converted by ModelOpt AutoCast (recipes.convert_float), whose reference run takes the captured calibration feeds
(it keeps in FP32 the nodes whose values leave the low-precision range), and measured like the others.
The converted graphs run on onnxruntime CPU for the figures: FP16 on its own FP16 kernels; BF16, which it has no
kernels for, as an FP32 graph that rounds every BF16 tensor to BF16 (recipes.emulate_bf16). The manifest says
which (``accuracy.evaluated_on``).

Steps: open the source bundle on onnxruntime CPU; capture calibration feeds from the runtime's own runs
(datasets.capture) and record held-out evaluation runs (accuracy.record_eval); quantize every graph of
recipes.QUANTIZED with its recipe; measure each against the FP32 graph; gate; when the diffusion UNet or VAE decoder
is quantized, also refine the evaluation's generated codes end to end with the quantized graphs and gate the worst
picture against FP32's (accuracy.refinement_figures: a per-call error can grow over the schedule's steps); copy the
bundle into a temporary sibling folder, replace the quantized graphs, update their manifest entries (precision,
quantization: recipe, target, tool, calibration sizes/seeds, figures, gates), write the manifest last and rename the
folder into place.

A missed gate raises QuantizationError (nothing is written) unless ``keep_failed`` (then the bundle is written with
``quantization.status = "failed"`` in the manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from illume_rt.export.components import ExportError
from illume_rt.contract import MANIFEST
from illume_rt.files import sha256_file
from illume_rt.runtime.bundle import load_bundle
from illume_rt.files import check_output_dir, publish_dir, scratch_dir

from illume_rt.calibration import accuracy, datasets, recipes, streamed


class QuantizationError(ExportError):
    """A quantized graph that misses its accuracy gate."""


def _gate(name: str, figures: dict, limits: dict) -> list[str]:
    """Failures of one component as readable lines (empty when it passes).

    A graph that decodes pictures (it has a ``psnr_db`` figure: pixel decoder, VAE decoder) is gated on that PSNR
    against FP32; its cosine is reported, not gated. The cosine of a picture in [-1, 1] weighs the error against
    the picture's distance from mid-gray (0), not against its range: illume-nano's held-out VAE picture (rms 0.10
    around mid-gray) reads cosine 0.905 at 33.2 dB PSNR, where the same error on a white picture reads 0.999."""
    fails = []
    if "psnr_db" not in figures and figures["worst_cosine"] < limits["cosine"]:
        fails.append(f"{name}: worst cosine {figures['worst_cosine']:.5f} < {limits['cosine']}")
    if "psnr_db" in figures and figures["psnr_db"] < limits["psnr_db"]:
        fails.append(f"{name}: PSNR {figures['psnr_db']:.2f} dB < {limits['psnr_db']}")
    for key, fig in figures.get("teacher_forced", {}).items():
        if fig["top1_agreement"] < limits["llm_top1"]:
            fails.append(f"{name}/{key}: top-1 agreement {fig['top1_agreement']:.4f} < {limits['llm_top1']}")
        if fig['kl_mean'] > limits["llm_kl"]:
            fails.append(f"{name}/{key}: mean KL {fig['kl_mean']:.4f} > {limits['llm_kl']}")
    return fails


def _acceptable(result: dict) -> bool:
    """A graph passes its own gate and is not to blame for a missed refinement gate (``_refinement_gate``)."""
    return result["passed"] and not result.get("blamed_for_refinement")


def _fp32_hint(results: dict) -> str:
    """The other way out when some graphs miss their gates and others pass: quantize only those that pass (illume-nano's
    small VAE decoder misses at INT8 while the rest passes, nano/README.md "Quantized")."""
    missed = [name for name, r in results.items() if not _acceptable(r)]
    passed = [name for name, r in results.items() if _acceptable(r)]
    if not missed or not passed:
        return ""
    return f"; or leave {', '.join(missed)} in FP32: --components {','.join(passed)}"


def _refinement_gate(pipe, results: dict, refinements: list[dict], limit: float, open_quantized: Callable) -> dict:
    """The diffusion refinement end to end with the quantized graphs of accuracy.REFINE_CHAIN in ``results`` (the
    figures, the limit and its failures). When it misses with both graphs quantized, each is measured alone: the one
    that misses alone is blamed (``results[name]["blamed_for_refinement"]``, so the hint leaves it FP32), both when
    neither misses alone."""
    chain = [n for n in accuracy.REFINE_CHAIN if n in results]
    engines = {n: open_quantized(n) for n in chain}
    figures = accuracy.refinement_figures(pipe, engines, refinements)
    figures["limit_psnr_db"] = limit
    figures["failures"] = []
    if figures["worst_psnr_db"] >= limit:
        return figures
    figures["failures"].append(
        f"refinement ({' + '.join(chain)} quantized, {figures['steps']} steps): worst picture PSNR "
        f"{figures['worst_psnr_db']:.2f} dB vs FP32 < {limit}")
    blamed = chain
    if len(chain) > 1:
        figures["alone"] = {n: accuracy.refinement_figures(pipe, {n: engines[n]}, refinements)["worst_psnr_db"]
                            for n in chain}
        blamed = [n for n in chain if figures["alone"][n] < limit] or chain
    for name in blamed:
        results[name]["blamed_for_refinement"] = True
    return figures


def summary_lines(manifest: dict) -> list[str]:
    """The accuracy table printed by the CLI."""
    q = manifest["quantization"]
    lines = [f"quantization {q['precision']} for {q['target']}: {q['status'].upper()} "
             f"(thresholds {q['thresholds_key']}: {json.dumps(q['thresholds'])})"]
    for name, entry in manifest["components"].items():
        info = entry.get("quantization")
        if not info:
            continue
        a = info["accuracy"]
        text = f"  {name:<17} {info['recipe']:<38} cos {a['worst_cosine']:.5f}  max|err| {a['worst_max_abs_err']:.3g}"
        if "psnr_db" in a:
            text += f"  PSNR {a['psnr_db']:.1f} dB"
        text += "  ok" if info["passed"] else "  FAIL"
        lines.append(text)
        for key, fig in a.get("teacher_forced", {}).items():
            lines.append(f"    teacher-forced {key:<8} top-1 {fig['top1_agreement']:.4f}  KL {fig['kl_mean']:.2e} "
                         f"(max {fig['kl_max']:.2e}, {fig['positions']} positions)")
    refinement = q.get("refinement")
    if refinement:
        lines.append(f"  refinement ({' + '.join(refinement['quantized'])} quantized, {refinement['steps']} steps, "
                     f"{refinement['pictures']} pictures): worst PSNR {refinement['worst_psnr_db']:.1f} dB vs FP32 "
                     f"(gate {refinement['limit_psnr_db']})" + ("  ok" if not refinement["failures"] else "  FAIL"))
    if isinstance(q.get("prompt_accuracy"), dict):
        for scorer_name, fig in q["prompt_accuracy"].items():
            lines.append(f"  prompt accuracy ({scorer_name}) FP32:      {_figures_text(fig['fp32'])}")
            if "quantized" in fig:
                lines.append(f"  prompt accuracy ({scorer_name}) quantized: {_figures_text(fig['quantized'])}")
    for line in q.get("failures", []):
        lines.append(f"  miss: {line}")
    return lines


def _figures_text(figures: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in figures.items())


def _measured_pipeline(path: Path, measured: dict[str, Path], threads: int | None):
    """The quantized bundle at ``path`` on onnxruntime CPU, each graph opened from the file its figures were
    measured on (``measured``): the bundle's own, or for BF16 the BF16-emulating FP32 copy (onnxruntime CPU has no
    BF16 kernels: recipes.emulate_bf16), so the prompt scorer runs every precision the graph figures run."""
    from illume_rt.runtime.pipeline import Pipeline

    bundle = load_bundle(path)
    own = bundle.component_path
    bundle.component_path = lambda name: Path(measured[name]) if name in measured else own(name)
    return Pipeline(bundle, "ort-cpu", threads)


def _memory() -> str:
    """'  (RSS x.x GB, peak y.y GB)' of this process (Linux /proc), or '' where unknown."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        rss, peak = (int(status[k].split()[0]) * 1024 / 1e9 for k in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return ""
    return f"  (RSS {rss:.1f} GB, peak {peak:.1f} GB)"


def _release_engines(pipe) -> None:
    """Close every FP32 session of ``pipe``; the LM head slices open again when the teacher-forced figures use them.
    The pipeline does not generate after this."""
    import gc

    pipe.replace_engine("llm", None)  # the loop's reference to the body goes too
    for name in pipe.engines.opened():
        pipe.engines.close(name)
    gc.collect()


def _link_or_copy(source: str, target: str) -> None:
    """Files kept as they are share the source's bytes (a hard link: no disk used; at 3B the rest of the bundle is
    over 15 GB) where the file system allows, else are copied. Neither bundle's files are ever written in place
    (every writer here makes a new folder and renames it), so the link is never seen through."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _ignore_top_level(root: Path, names: set[str]):
    """copytree ``ignore`` that leaves out ``names`` at the top of ``root`` only."""
    def ignore(folder, entries):
        return [e for e in entries if e in names] if Path(folder) == root else []
    return ignore


def _check_external(name: str, entry: dict, recipe, src: Path) -> None:
    """Before any run: a graph with external data must be one the streamed recipe reproduces (calibration/
    streamed.py: ort-cpu INT8 of MatMul weights); else one line saying why and what it needs."""
    import onnx

    size = (src / entry["external_data"]).stat().st_size / 1e9
    if streamed.streamable(recipe) is None:
        what = ("this preset's percentile ranges hold every calibrated value in memory"
                if recipe.calibration_method == "Percentile"
                else "this preset's entropy ranges take histograms of the whole graph's activations"
                if recipe.calibration_method == "entropy"
                else "the FP16/BF16 remainder is made by AutoCast, which loads the whole graph several times over"
                if recipe.precision == "int8"
                else f"{recipe.precision} is made by modelopt's quantizer and AutoCast, which load the whole graph "
                "several times over")
        raise QuantizationError(
            f"{name}: its weights are in external data ({size:.1f} GB); graphs that size are quantized streamed, "
            "which reproduces --precision int8 with --target ort-cpu, or --target tensorrt --high-precision fp32, "
            f"only: {what}; quantize it on a machine with several "
            "times its size in memory, or leave it FP32 (--components without it)")
    try:
        model = onnx.load(str(src / entry["file"]), load_external_data=False)
        recipes._ensure_names(model)  # as the streamed quantizer names them
        streamed.Plan(model, recipes.kept_nodes(recipe, model))
    except streamed.StreamingUnsupported as exc:
        raise QuantizationError(f"{name} ({size:.1f} GB of external data): {exc}; leave it FP32 (--components "
                                "without it)") from None


def quantize_bundle(src: str | Path, dst: str | Path, precision: str, target: str, keep_failed: bool = False,
                    threads: int | None = None, calibration: datasets.CalibrationPlan | None = None,
                    evaluation: datasets.CalibrationPlan | None = None, thresholds: dict | None = None,
                    components: list[str] | None = None, log: Callable[[str], None] = print,
                    high_precision: str | None = None, overwrite: bool = False,
                    prompt_scorers: dict[str, Callable] | None = None) -> dict:
    """Quantize the FP32 bundle ``src`` into a new bundle ``dst`` (a new or empty folder, or with ``overwrite`` a
    bundle, replaced atomically: illume_rt/files.py); return its manifest.

    ``precision`` int8|fp8|fp16|bf16, ``target`` tensorrt|ort-cpu (see recipes; fp16/bf16 are tensorrt only).
    ``high_precision`` (int8/fp8): the type of the layers left unquantized, default fp16 for tensorrt, fp32 for
    ort-cpu. ``calibration`` and ``evaluation`` replace
    the plans chosen for the bundle's model (``datasets.plan_for``: nano's grammar for illume-nano, else the default
    plans; e.g. one short 256x256 run each where calibrating on a small machine: bench/int8.py ``quick_plans``);
    both plans are recorded in the manifest with the figures. ``prompt_scorers`` replaces the end-to-end scorers
    chosen for the bundle's model (``accuracy.prompt_scorers``; ``{}``: none): the FP32 and the quantized bundle are
    scored on the same prompts and each figure gated (``accuracy.prompt_gate``).
    ``components`` limits which graphs are quantized (default: every graph in recipes.QUANTIZED that the bundle
    has); the others stay FP32, marked ``kept_fp32`` in the manifest. Gates apply to every quantized graph."""
    from illume_rt.engines.ort import OrtEngine
    from illume_rt.runtime.pipeline import Pipeline

    try:
        recipes.recipe_for("llm", precision, target, high_precision)  # validates the names and their combination
    except ValueError as exc:
        raise QuantizationError(str(exc)) from None
    src = Path(src).resolve()
    bundle = load_bundle(src)
    dst = check_output_dir(dst, overwrite, sources=(src,))  # before the long calibration
    manifest = json.loads((src / MANIFEST).read_text())
    for name, entry in manifest["components"].items():
        if entry.get("precision", "fp32") != "fp32":
            raise QuantizationError(f"{src} is already quantized ({name} is {entry['precision']}); quantize the "
                                    "FP32 bundle")
    preset = manifest["model"]["preset"]
    random = bool(manifest["model"].get("random_weights"))
    thresholds_key = preset if preset in recipes.THRESHOLDS else ("tiny" if random else "default")
    limits = dict(thresholds or recipes.thresholds_for(preset, precision, random))
    unknown = [n for n in (components or []) if n not in recipes.QUANTIZED or n not in manifest["components"]]
    if unknown:
        raise QuantizationError(f"cannot quantize {', '.join(unknown)}: choose among the bundle's "
                                + ", ".join(n for n in recipes.QUANTIZED if n in manifest["components"]))
    names = [n for n in (components or recipes.QUANTIZED) if n in manifest["components"]]
    for name in names:  # refuse what cannot be done before the long calibration
        if manifest["components"][name].get("external_data"):
            _check_external(name, manifest["components"][name],
                            recipes.recipe_for(name, precision, target, high_precision, preset), src)
    calibration = calibration or datasets.plan_for(manifest["model"], "calibration")
    evaluation = evaluation or datasets.plan_for(manifest["model"], "evaluation")
    scorers = accuracy.prompt_scorers(manifest["model"]) if prompt_scorers is None else dict(prompt_scorers)

    t0 = time.perf_counter()
    pipe = Pipeline(bundle, "ort-cpu", threads)
    # int8/fp8: calibration; fp16/bf16: AutoCast's reference run (which nodes see values out of FP16/BF16 range)
    chain = any(n in names for n in accuracy.REFINE_CHAIN)  # refinements cost UNet steps: only when it is asked for
    feeds, cal_record = datasets.capture(pipe, calibration, log, refinements=chain,
                                         vae_refinements="vae_decoder" in names)
    timings = {"calibration_capture": round(time.perf_counter() - t0, 1)}
    log(f"calibration: {cal_record['samples']} feeds captured in {timings['calibration_capture']:.1f}s{_memory()}")
    t1 = time.perf_counter()
    evals = accuracy.record_eval(pipe, evaluation, refinements=chain)
    timings["evaluation_record"] = round(time.perf_counter() - t1, 1)
    log(f"evaluation runs recorded in {timings['evaluation_record']:.1f}s{_memory()}")
    prompt_accuracy = {}
    for scorer_name, scorer in scorers.items():  # end-to-end: FP32 now, the quantized bundle once it is written
        t1 = time.perf_counter()
        prompt_accuracy[scorer_name] = {"fp32": accuracy.score_prompts(scorer, pipe)}
        if hasattr(scorer, "describe"):
            prompt_accuracy[scorer_name]["scored_on"] = scorer.describe()
        timings[f"prompt_accuracy_fp32_{scorer_name}"] = round(time.perf_counter() - t1, 1)
        log(f"prompt accuracy ({scorer_name}), FP32: {_figures_text(prompt_accuracy[scorer_name]['fp32'])}")
    # The FP32 sessions are done with: close them before any graph is calibrated or measured, so that at most one
    # big session is alive at a time (at 3B the FP32 LLM alone holds 11 GB, the LM head slices 2.3 GB; these open
    # again, FP32, when the teacher-forced figures map the quantized body's hidden states through them).
    _release_engines(pipe)
    log(f"FP32 sessions closed{_memory()}")

    samples = {name: len(v) for name, v in feeds.items()}  # feeds are dropped as each graph is done with them
    scratch, work = scratch_dir(dst), scratch_dir(dst)
    try:
        results: dict[str, dict] = {}
        failures: list[str] = []
        for name in names:
            t2 = time.perf_counter()
            entry = manifest["components"][name]
            if not feeds.get(name):
                raise QuantizationError(f"{name}: no calibration inputs were captured (is the component used?)")
            recipe = recipes.recipe_for(name, precision, target, high_precision, preset)
            out = scratch / entry["file"]
            if entry.get("external_data"):  # weights beside the graph (over 2 GiB): structure + one tensor at a time
                info = streamed.quantize_external(recipe, src / entry["file"], out, feeds[name], threads,
                                                  lambda m, n=name: log(f"{n}:{m}"), entry["external_data"])
            else:
                info = recipes.quantize_graph(recipe, src / entry["file"], out, feeds.get(name, []), threads,
                                              scratch)
            feeds.pop(name, None)  # this graph's calibration feeds are no longer needed
            if info["custom_domains"]:
                raise QuantizationError(f"{name}: quantized graph uses custom op domains {info['custom_domains']}")
            measured, evaluated_on = out, "onnxruntime CPU"
            if precision == "bf16" or recipe.high_precision == "bf16":
                measured = recipes.emulate_bf16(out, scratch / f"{name}.bf16-emulated.onnx")
                evaluated_on = ("onnxruntime CPU on a BF16-emulating FP32 copy (every BF16 tensor rounded to BF16, "
                                "FP32 compute; recipes.emulate_bf16): onnxruntime has no BF16 kernels")
            elif precision == "fp16" or recipe.high_precision == "fp16":
                evaluated_on = "onnxruntime CPU, the graph as converted (its FP16 kernels)"
            engine = OrtEngine(name, measured, "ort-cpu", threads, emulate_fp8=precision == "fp8")
            outputs = [o["name"] for o in entry["outputs"]]
            calls = evals["calls"].get(name, [])
            if not calls:  # a gate over no inputs would pass anything
                raise QuantizationError(f"{name}: the evaluation plan never runs it (no held-out inputs to measure "
                                        "it on); add an evaluation run that uses it (e.g. a generate entry without "
                                        "refine for pixel_decoder)")
            every = max(1, len(calls) // 48) if name == "llm" else 1
            figures = accuracy.graph_figures(engine, calls, outputs, every)
            if name in ("pixel_decoder", "vae_decoder"):
                figures["psnr_db"] = accuracy.image_psnr(engine, calls)
            if name == "llm":
                figures["teacher_forced"] = accuracy.llm_teacher_forced(engine, pipe, evals)
                _release_engines(pipe)  # the head slices it opened
            figures["reference"] = "fp32 graph of the source bundle, held-out evaluation runs"
            figures["evaluated_on"] = evaluated_on
            fails = _gate(name, figures, limits)
            failures += fails
            results[name] = {"recipe": recipe, "info": info, "figures": figures, "passed": not fails,
                             # the graph is moved into the bundle below; a separate measured copy (BF16) is not
                             "measured": measured if measured != out else None, "evaluated_on": evaluated_on}
            log(f"quantized {name:<17} cos {figures['worst_cosine']:.5f}"
                + (f"  PSNR {figures['psnr_db']:.1f} dB" if "psnr_db" in figures else "")
                + ("".join(f"  {k} top-1 {v['top1_agreement']:.3f} KL {v['kl_mean']:.4f}"
                           for k, v in figures.get("teacher_forced", {}).items()))
                + f"  {'ok' if not fails else 'FAIL'}  {time.perf_counter() - t2:.1f}s{_memory()}")
            timings[f"quantize_and_measure_{name}"] = round(time.perf_counter() - t2, 1)
            del engine

        refinement = None
        if any(n in results for n in accuracy.REFINE_CHAIN) and evals["refinements"]:
            t2 = time.perf_counter()

            def open_quantized(name):
                file = results[name]["measured"] or scratch / manifest["components"][name]["file"]
                return OrtEngine(name, file, "ort-cpu", threads, emulate_fp8=precision == "fp8")

            refinement = _refinement_gate(pipe, results, evals["refinements"], recipes.refine_psnr_limit(limits),
                                          open_quantized)
            failures += refinement["failures"]
            _release_engines(pipe)
            timings["refinement_end_to_end"] = round(time.perf_counter() - t2, 1)
            log(f"refinement end to end: worst PSNR {refinement['worst_psnr_db']:.1f} dB vs FP32 over "
                f"{refinement['pictures']} pictures  {'ok' if not refinement['failures'] else 'FAIL'}"
                + (f" (alone: {json.dumps(refinement['alone'])})" if "alone" in refinement else "")
                + f"  {timings['refinement_end_to_end']:.1f}s{_memory()}")

        status = "passed" if not failures else "failed"
        if failures and not keep_failed:
            raise QuantizationError("quantized graphs miss their accuracy gates (pass --keep-failed to write the "
                                    f"bundle anyway, marked failed{_fp32_hint(results)}):\n  " + "\n  ".join(failures))

        # new bundle: copy (no engines: they were built from the FP32 graphs; not the files about to be replaced),
        # replace graphs, manifest last
        shutil.rmtree(work)
        replaced = {f for n in results for f in (manifest["components"][n]["file"],
                                                 manifest["components"][n].get("external_data")) if f}
        shutil.copytree(src, work, ignore=_ignore_top_level(src, {"engines", MANIFEST, *replaced}),
                        copy_function=_link_or_copy)
        for name, res in results.items():
            entry = manifest["components"][name]
            os.replace(scratch / entry["file"], work / entry["file"])
            entry["bytes"] = (work / entry["file"]).stat().st_size
            entry["sha256"] = sha256_file(work / entry["file"])
            if entry.get("external_data"):  # its own data file, written with the graph (calibration/streamed.py)
                os.replace(scratch / entry["external_data"], work / entry["external_data"])
                manifest["files"][f"{name}_external_data"] = {
                    "file": entry["external_data"], "bytes": (work / entry["external_data"]).stat().st_size,
                    "sha256": sha256_file(work / entry["external_data"])}
            entry["precision"] = precision
            export_figures = entry.get("accuracy")
            entry["accuracy"] = {**res["figures"], "export": export_figures}
            entry["quantization"] = {
                "recipe": res["recipe"].name, "details": res["recipe"].to_dict(), "target": target,
                "tool": res["info"].get("streamed", {}).get("tool", res["recipe"].tool), "graph": res["info"],
                "accuracy": res["figures"],
                "calibration_samples": samples.get(name, 0), "passed": res["passed"],
                "blamed_for_refinement": bool(res.get("blamed_for_refinement")),
                "high_precision": None if precision in recipes.FLOAT_PRECISIONS else res["recipe"].high_precision,
            }
        for name, why in recipes.KEEP_FP32.items():
            if name in manifest["components"]:
                manifest["components"][name]["quantization"] = None
                manifest["components"][name]["kept_fp32"] = why
        for name in recipes.QUANTIZED:
            if name in manifest["components"] and name not in results:
                manifest["components"][name]["quantization"] = None
                manifest["components"][name]["kept_fp32"] = "not requested (quantize_bundle components=)"
        manifest["quantization"] = {
            "precision": precision, "target": target, "status": status, "failures": failures,
            # converted graphs (FP16/BF16) keep FP32 where they need it
            "high_precision": (None if precision in recipes.FLOAT_PRECISIONS else
                               recipes.recipe_for("llm", precision, target, high_precision, preset).high_precision),
            "components": names,
            "thresholds_key": thresholds_key, "thresholds": limits,
            "source_bundle": {"path": str(src), "manifest_sha256": sha256_file(src / MANIFEST)},
            "calibration": cal_record,
            "evaluation": {"plan": evaluation.to_dict(),
                           "generate": [{k: r[k] for k in ("prompt", "resolution", "seed", "guidance")}
                                        for r in evals["generate"]],
                           "understand": [{k: r[k] for k in ("image", "question", "answer_tokens")}
                                          for r in evals["understand"]]},
            "refinement": refinement,
            "prompt_accuracy": prompt_accuracy or "no prompt scorer for this model (accuracy.prompt_scorers)",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 1), "timings": timings,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if prompt_accuracy:  # end-to-end: score the quantized bundle on the same prompts, gate each figure
            qpipe = _measured_pipeline(work, {n: r["measured"] for n, r in results.items() if r["measured"]},
                                       threads)
            for scorer_name, scorer in scorers.items():
                t1 = time.perf_counter()
                fig = prompt_accuracy[scorer_name]
                fig["quantized"] = accuracy.score_prompts(scorer, qpipe)
                fig["evaluated_on"] = sorted({r["evaluated_on"] for r in results.values()})
                fig["max_drop"] = accuracy.MAX_PROMPT_ACCURACY_DROP
                fig["failures"] = accuracy.prompt_gate(scorer_name, fig["fp32"], fig["quantized"],
                                                       tuple(getattr(scorer, "informational", ())))
                failures += fig["failures"]
                timings[f"prompt_accuracy_quantized_{scorer_name}"] = round(time.perf_counter() - t1, 1)
                log(f"prompt accuracy ({scorer_name}), {precision}: {_figures_text(fig['quantized'])}"
                    f"  {'ok' if not fig['failures'] else 'FAIL'}")
            del qpipe
            if failures and not keep_failed:
                raise QuantizationError("end-to-end prompt accuracy misses its gate:\n  " + "\n  ".join(failures))
            manifest["quantization"].update(status="passed" if not failures else "failed", failures=failures)
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        publish_dir(work, dst, overwrite, sources=(src,))
        return manifest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
